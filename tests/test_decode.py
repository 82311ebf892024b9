"""Issue #9: the decoder reads what the kernel resolved (no kernel needed: records are built
with the ctypes mirror of bpf/events.h, as sensor.c writes them)."""

from __future__ import annotations

import ctypes
import os

import pytest

from ebpf_guard.events import (
    F_BY_INODE,
    F_CREATED,
    F_KILLED,
    F_NOTHING_CUT,
    F_REAL,
    F_REAL2,
    F_REAL_CUT,
    F_SENDTO,
    KIND_CODES,
    NOTE_KILLED,
    NOTE_NOTHING_CUT,
    Kind,
    RawConnectEvent,
    RawEvent,
    RawExecEvent,
    RawPathEvent,
)
from ebpf_guard.sensor.decode import DecodeError, Decoder, kernel_dev, proc_alias, socket_protocol, user_dev
from ebpf_guard.sensor.procfs import ProcModel, ProcState
from ebpf_guard.sensor.transport import SensorStats

CODE = {kind: code for code, kind in KIND_CODES.items()}
TGID = 4242
AT_FDCWD = -100


def decoder(cwd: str = "/home/u/ws") -> Decoder:
    model = ProcModel()
    model.procs[TGID] = ProcState(start_ns=1, ppid=1, cwd=cwd, born_seen=True, exe="/usr/bin/bash")
    return Decoder(model, SensorStats(), btf=True)


def path_record(kind: Kind, *, path: bytes = b"", path2: bytes | None = None, real: bytes = b"",
                real2: bytes = b"", flags: int = 0, fd: int = AT_FDCWD, fd2: int = AT_FDCWD,
                dev: int = 0, ino: int = 0, ret: int = 0) -> bytes:
    ev = RawPathEvent()
    h = ev.h
    h.ts_ns, h.start_ns, h.tgid, h.pid, h.kind, h.flags, h.fd, h.ret = 10, 1, TGID, TGID, CODE[kind], flags, fd, ret
    h.comm = b"agent"
    strs = b""
    if path:
        strs += path + b"\0"
        h.path_len = len(path) + 1
    if path2 is not None:
        strs += path2 + b"\0"
        ev.path2_len = len(path2) + 1
        h.child_pid = fd2 & 0xFFFFFFFF
    strs += real + real2
    ev.obj.dev, ev.obj.ino, ev.obj.real_len, ev.obj.real2_len = dev, ino, len(real), len(real2)
    ctypes.memmove(ctypes.addressof(ev) + RawPathEvent.strs.offset, strs, len(strs))
    return bytes(ev)[: RawPathEvent.strs.offset + len(strs)]


def test_dev_encodings_round_trip() -> None:
    st_dev = os.stat("/").st_dev
    assert user_dev(kernel_dev(st_dev)) == st_dev
    assert kernel_dev(os.makedev(259, 3)) == (259 << 20) | 3


def test_open_through_a_symlink_carries_the_file_it_reached() -> None:
    kdev = kernel_dev(os.makedev(8, 1))
    ev = decoder().decode(path_record(Kind.OPEN, path=b"notes.txt", real=b"/home/u/.ssh/id_ed25519",
                                      flags=F_REAL, dev=kdev, ino=77, ret=3))
    assert ev.raw_path == "notes.txt" and ev.path == "/home/u/ws/notes.txt"
    assert ev.real_path == "/home/u/.ssh/id_ed25519" and (ev.dev, ev.ino) == (os.makedev(8, 1), 77)
    assert ev.exe == "/usr/bin/bash"


def test_a_cut_walk_is_marked_and_never_absolute() -> None:
    ev = decoder().decode(path_record(Kind.OPEN, path=b"x", real=b"/deep/tail", flags=F_REAL | F_REAL_CUT,
                                      ino=1, ret=3))
    assert ev.path_cut and ev.real_path == "…/deep/tail"


def test_unlink_joins_the_walked_directory_with_the_name() -> None:
    # dirfd 5 was /tmp/scratch in the model, but the kernel walked the fd table: /home/u/docs.
    d = decoder()
    d._model.procs[TGID].fds[5] = "/tmp/scratch"
    ev = d.decode(path_record(Kind.UNLINK, path=b"f1", real=b"/home/u/docs", flags=F_REAL, fd=5))
    assert ev.path == ev.real_path == "/home/u/docs/f1"
    assert d._model.procs[TGID].fds[5] == "/home/u/docs"  # the model corrected from the kernel


def test_rename_has_both_ends() -> None:
    ev = decoder().decode(path_record(Kind.RENAME, path=b"a", path2=b"../b", real=b"/home/u/ws",
                                      real2=b"/home/u/ws", flags=F_REAL | F_REAL2))
    assert (ev.raw_path, ev.real_path) == ("a", "/home/u/ws/a")
    assert (ev.dest_raw_path, ev.dest_path, ev.dest_real_path) == ("../b", "/home/u/b", "/home/u/b")


def test_absolute_names_rewrite_proc_aliases_of_the_process_itself() -> None:
    ev = decoder().decode(path_record(Kind.UNLINK, path=b"/proc/self/root/home/u/.ssh/id_rsa"))
    assert ev.real_path == "/home/u/.ssh/id_rsa"
    st = ProcState(start_ns=1, ppid=1, cwd="/w")
    assert proc_alias(f"/proc/{TGID}/cwd/x", TGID, st) == "/w/x"
    assert proc_alias("/proc/1/root/etc/shadow", TGID, st) == "/proc/1/root/etc/shadow"  # not ours


def test_symlink_keeps_its_target_as_text() -> None:
    ev = decoder().decode(path_record(Kind.SYMLINK, path=b"/home/u/.ssh/id_rsa", path2=b"innocent",
                                      real2=b"/home/u/ws", flags=F_REAL2))
    assert ev.raw_path == ev.path == "/home/u/.ssh/id_rsa" and ev.real_path == ""
    assert ev.dest_real_path == "/home/u/ws/innocent"


def test_exec_killed_by_inode_at_exit_reports_the_result() -> None:
    ev = RawExecEvent()
    ev.h.kind, ev.h.tgid, ev.h.start_ns, ev.h.flags = CODE[Kind.EXEC], TGID, 1, F_REAL | F_KILLED | F_BY_INODE
    real = b"/usr/bin/curl"
    ev.h.path_len = len(b"/tmp/mytool") + 1
    ev.path = b"/tmp/mytool"
    ev.real = real
    ev.obj.real_len, ev.obj.ino = len(real), 9
    ev.argc = 1
    ev.argv[0].value = b"mytool"
    out = decoder().decode(bytes(ev)[: RawExecEvent.argv.offset + 256])
    assert out.real_path == out.exe == "/usr/bin/curl" and out.raw_path == "/tmp/mytool"
    assert NOTE_KILLED in out.notes and out.ret == 0


def test_sendto_is_a_connect_with_its_way_noted() -> None:
    ev = RawConnectEvent()
    ev.h.kind, ev.h.tgid, ev.h.start_ns, ev.h.flags, ev.h.sc_flags = CODE[Kind.CONNECT], TGID, 1, F_SENDTO, 0x20000000
    ev.family, ev.port = 2, 0x5000  # port 80 in network order
    ev.addr[:4] = [127, 0, 0, 2]
    out = decoder().decode(bytes(ev))
    assert (out.via, out.addr, out.port, out.flags) == ("sendto", "127.0.0.2", 80, 0x20000000)


@pytest.mark.parametrize("sk,protocol", [
    ((2, 1, 6), "tcp"), ((10, 1, 262), "tcp"), ((2, 2, 17), "udp"), ((10, 2, 136), "udp"), ((2, 3, 255), "raw"),
    ((2, 2, 1), "icmp"), ((10, 2, 58), "icmp"), ((2, 1, 132), "sctp"), ((10, 5, 132), "sctp"),
    ((1, 1, 0), "stream"), ((1, 2, 0), "dgram"), ((1, 5, 0), "seqpacket"),
    ((0, 0, 0), ""), ((2, 2, 115), ""), ((2, 5, 0), ""), ((16, 3, 0), ""), ((1, 3, 0), ""),
])
def test_a_connect_names_its_sockets_protocol(sk: tuple[int, int, int], protocol: str) -> None:
    ev = RawConnectEvent()
    ev.h.kind, ev.h.tgid, ev.h.start_ns = CODE[Kind.CONNECT], TGID, 1
    ev.family, ev.port = 2, 0x3500  # port 53 in network order
    ev.addr[:4] = [127, 0, 0, 53]
    ev.sk_family, ev.sk_type, ev.sk_protocol = sk
    out = decoder().decode(bytes(ev))
    assert (out.addr, out.port, out.protocol) == ("127.0.0.53", 53, protocol)
    assert socket_protocol(*sk) == protocol


def test_a_connect_record_without_the_socket_tail_has_no_protocol() -> None:
    ev = RawConnectEvent()
    ev.h.kind, ev.h.tgid, ev.h.start_ns, ev.family = CODE[Kind.CONNECT], TGID, 1, 2
    ev.sk_family, ev.sk_type, ev.sk_protocol = 2, 1, 6
    assert decoder().decode(bytes(ev)[: RawConnectEvent.sk_family.offset]).protocol == ""


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("flags,sc_flags,ret,created", [
    (F_CREATED, 0o101, 3, True),  # O_CREAT of a new name
    (0, 0o1101, 3, False),  # O_CREAT|O_TRUNC of an existing file: it was emptied, not made
    (0, 0, 3, False),
    (0, 0o20000002, 3, True),  # O_TMPFILE: always a new inode, never FMODE_CREATED
    (0, 0o20000002, -95, False),  # ... unless it failed
])
def test_open_says_whether_it_created_the_file(fast: bool, flags: int, sc_flags: int, ret: int,
                                               created: bool) -> None:
    rec = bytearray(path_record(Kind.OPEN, path=b"/home/u/ws/f", real=b"/home/u/ws/f", flags=F_REAL | flags,
                                ino=5, ret=ret))
    RawEvent.from_buffer(rec).sc_flags = sc_flags  # the header leads every record
    d = decoder()
    if not fast:
        d._model.procs.clear()  # the general path, not the open fast path
    ev = d.decode(bytes(rec))
    assert (ev.created, ev.flags) == (created, sc_flags)


@pytest.mark.parametrize("flags,noted", [(F_NOTHING_CUT, True), (0, False)])
def test_ftruncate_notes_when_nothing_was_cut(flags: int, noted: bool) -> None:
    ev = decoder().decode(path_record(Kind.TRUNCATE, real=b"/home/u/ws/log", flags=F_REAL | flags, fd=4, ino=3))
    assert (NOTE_NOTHING_CUT in ev.notes) is noted and ev.real_path == "/home/u/ws/log"


@pytest.mark.parametrize("field,value", [("real_len", 512), ("real2_len", 4000)])
def test_string_lengths_out_of_range_are_refused(field: str, value: int) -> None:
    rec = bytearray(path_record(Kind.OPEN, path=b"x", real=b"/x", flags=F_REAL, ret=3))
    ev = RawPathEvent.from_buffer_copy(bytes(rec) + bytes(ctypes.sizeof(RawPathEvent) - len(rec)))
    setattr(ev.obj, field, value)
    with pytest.raises(DecodeError):
        d = decoder()
        d._model.procs.clear()  # the general path, not the open fast path
        d.decode(bytes(ev)[: len(rec)])


def test_a_rewritten_program_is_hashed_again_even_with_its_mtime_put_back(tmp_path) -> None:
    """The hash cache must not be fooled: same inode, size and mtime, other bytes (ctime moved)."""
    import hashlib

    from ebpf_guard.files import sha256_of

    tool = tmp_path / "tool"
    tool.write_bytes(b"A" * 64)
    first = sha256_of(tool)
    st = tool.stat()
    with open(tool, "r+b") as f:  # same inode, same size
        f.write(b"B" * 64)
    os.utime(tool, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert tool.stat().st_mtime_ns == st.st_mtime_ns
    assert sha256_of(tool) == hashlib.sha256(b"B" * 64).hexdigest() != first
