"""Raw perf-buffer records (the layouts of bpf/events.h) -> `Event`s."""

from __future__ import annotations

import ctypes
import os
import socket
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ebpf_guard.events import (
    ARG_LEN,
    CREATE,
    F_ARGV_TRUNC,
    F_BY_INODE,
    F_CREATED,
    F_HELD,
    F_KILLED,
    F_NO_PROC,
    F_NOTHING_CUT,
    F_PATH_TRUNC,
    F_RATE_HELD,
    F_REAL,
    F_REAL2,
    F_REAL2_CUT,
    F_REAL_CUT,
    F_SENDMSG,
    F_SENDTO,
    KIND_CODES,
    MAX_ARGS,
    NOTE_HELD,
    NOTE_KILLED,
    NOTE_NOTHING_CUT,
    NOTE_PATH_TRUNCATED,
    NOTE_PROC_UNKNOWN,
    NOTE_RATE_HELD,
    NOTE_UNRESOLVED,
    PATH_LEN,
    READ,
    REAL_LEN,
    TRUNCATE,
    WRITE,
    Event,
    Kind,
    RawConnectEvent,
    RawEvent,
    RawExecEvent,
    RawPathEvent,
)
from ebpf_guard.pathnames import normalize

from .procfs import AT_FDCWD, ProcModel, ProcState

if TYPE_CHECKING:
    from .transport import SensorStats

O_ACCMODE, O_WRONLY, O_RDWR = 0o3, 0o1, 0o2
O_CREAT, O_TRUNC, O_PATH, O_TMPFILE = 0o100, 0o1000, 0o10000000, 0o20000000
AT_REMOVEDIR, AT_EMPTY_PATH = 0x200, 0x1000
_PRUNE_EVERY_NS = 10_000_000_000


class DecodeError(ValueError):
    """A raw record that cannot be an event of bpf/events.h (too short, or a length or count
    out of range). `poll()` counts such records in `SensorStats.bad` and goes on."""


def _struct_of(cls: type[ctypes.Structure]) -> struct.Struct:
    """A struct.Struct matching a flat ctypes mirror (3x faster than ctypes field access)."""
    codes = {
        ctypes.c_uint64: "Q",
        ctypes.c_int64: "q",
        ctypes.c_uint32: "I",
        ctypes.c_int32: "i",
        ctypes.c_uint16: "H",
    }
    fmt, pos = "<", 0
    for name, ctype in cls._fields_:
        off = getattr(cls, name).offset
        fmt += "x" * (off - pos)
        size = ctypes.sizeof(ctype)
        fmt += codes.get(ctype, f"{size}s")
        pos = off + size
    fmt += "x" * (ctypes.sizeof(cls) - pos)
    s = struct.Struct(fmt)
    assert s.size == ctypes.sizeof(cls), cls
    return s


_HDR = _struct_of(RawEvent)
_HDR_SIZE = _HDR.size
_OBJ = struct.Struct("<QQII")  # struct ev_obj: dev (kernel encoding), ino, real_len, real2_len
_OBJ_OFF = RawPathEvent.obj.offset
assert RawExecEvent.obj.offset == _OBJ_OFF
_PATH2 = struct.Struct("<I")
_PATH2_OFF = RawPathEvent.path2_len.offset
_STRS_OFF = RawPathEvent.strs.offset
_EXEC_REAL_OFF = RawExecEvent.real.offset
_EXEC_CWD_OFF = RawExecEvent.cwd.offset
_EXEC_PATH_OFF = RawExecEvent.path.offset
_EXEC_ARGC = struct.Struct("<I")
_EXEC_ARGC_OFF = RawExecEvent.argc.offset
_EXEC_ARGV_OFF = RawExecEvent.argv.offset
_CONN = struct.Struct("<HHI16s")  # family, port (big-endian on the wire), addrlen, addr
_CONN_OFF = RawConnectEvent.family.offset
_CONN_UNIX_OFF = RawConnectEvent.unix_path.offset
_SOCK = struct.Struct("<BBH")  # the socket behind the fd: family, type, protocol (0 = unknown)
_SOCK_OFF = RawConnectEvent.sk_family.offset
_OPEN = next(code for code, kind in KIND_CODES.items() if kind is Kind.OPEN)
_FAMILIES = {socket.AF_INET: "ipv4", socket.AF_INET6: "ipv6", socket.AF_UNIX: "unix"}
# Kinds whose record is a struct ev_path.
_PATH_KINDS = frozenset({Kind.OPEN, Kind.UNLINK, Kind.CHDIR, Kind.RENAME, Kind.LINK, Kind.SYMLINK,
                         Kind.TRUNCATE, Kind.MMAP_EXEC})
# ... and of those, the kinds whose `real` names a directory entry's base directory, not the
# object itself (ftruncate, which has no name, is an object kind: see _decode).
_DIR_KINDS = frozenset({Kind.UNLINK, Kind.RENAME, Kind.LINK, Kind.SYMLINK, Kind.TRUNCATE})
_CUT = "…"  # marks a real path whose kernel walk hit a bound
MSG_FASTOPEN = 0x20000000
SOCK_STREAM, SOCK_DGRAM, SOCK_RAW, SOCK_SEQPACKET = 1, 2, 3, 5
_UNIX_TYPES = {SOCK_STREAM: "stream", SOCK_DGRAM: "dgram", SOCK_SEQPACKET: "seqpacket"}
_TCP = frozenset({6, 262})  # IPPROTO_TCP, IPPROTO_MPTCP
_UDP = frozenset({17, 136})  # IPPROTO_UDP, IPPROTO_UDPLITE
_ICMP = frozenset({1, 58})  # IPPROTO_ICMP, IPPROTO_ICMPV6: ping sockets
IPPROTO_SCTP = 132


def socket_protocol(family: int, sock_type: int, protocol: int) -> str:
    """A socket's protocol name (Event.protocol) from its family, type and IPPROTO_*; "" when
    unknown. The one mapping: bpf/egress.c's eg_class() classifies the same way."""
    if family == socket.AF_UNIX:
        return _UNIX_TYPES.get(sock_type, "")
    if family not in (socket.AF_INET, socket.AF_INET6):
        return ""
    if protocol == IPPROTO_SCTP:
        return "sctp"
    if sock_type == SOCK_RAW:
        return "raw"
    if sock_type == SOCK_STREAM and protocol in _TCP:
        return "tcp"
    if sock_type == SOCK_DGRAM:
        return "udp" if protocol in _UDP else "icmp" if protocol in _ICMP else ""
    return ""


def user_dev(kernel_dev: int) -> int:
    """super_block.s_dev (MAJOR << 20 | MINOR) -> st_dev as stat(2) reports it."""
    return os.makedev(kernel_dev >> 20, kernel_dev & 0xFFFFF)


_USER_DEVS: dict[int, int] = {}  # kernel dev_t -> st_dev: a host has a handful of devices


def kernel_dev(st_dev: int) -> int:
    """st_dev -> the kernel's dev_t encoding (the key of the exec_inodes map)."""
    return (os.major(st_dev) << 20) | os.minor(st_dev)


def proc_alias(path: str, tgid: int, st: ProcState) -> str:
    """/proc/self|thread-self|TGID/{root,cwd}/... -> what it names, for the process itself
    (an absolute name is not walked in the kernel: the text is all there is). Assumes the
    process's root is the guard's, as under `run` and `watch` on one host."""
    if not path.startswith("/proc/"):
        return path
    parts = path.split("/", 4)  # "", "proc", who, root|cwd, rest
    if len(parts) < 4 or parts[2] not in ("self", "thread-self", str(tgid)):
        return path
    rest = parts[4] if len(parts) > 4 else ""
    if parts[3] == "root":
        return normalize("/" + rest)
    if parts[3] == "cwd" and st.cwd:
        return normalize(rest, st.cwd) if rest else st.cwd
    return path


def _text(b: bytes) -> str:
    # backslashreplace: a non-UTF-8 path stays distinguishable and JSON-safe.
    return b.split(b"\0", 1)[0].decode("utf-8", "backslashreplace")


def _access(flags: int) -> frozenset[str]:
    """The access classes (READ, WRITE, CREATE, TRUNCATE) of open(2) flags."""
    acc = flags & O_ACCMODE
    out = set()
    if acc in (0, O_RDWR) and not flags & O_PATH:
        out.add(READ)
    if acc in (O_WRONLY, O_RDWR):
        out.add(WRITE)
    if flags & O_CREAT or (flags & O_TMPFILE) == O_TMPFILE:
        out.add(CREATE)
    if flags & O_TRUNC:
        # Linux truncates even with O_RDONLY when the caller may write the file.
        out.add(TRUNCATE)
    return frozenset(out)


def _created(flags: int, sc_flags: int, ret: int) -> bool:
    """Did this open create its file? FMODE_CREATED as the kernel left it at exit (F_CREATED),
    or a successful O_TMPFILE open, which always makes a new (nameless) inode but is not
    marked FMODE_CREATED."""
    return bool(flags & F_CREATED) or ((sc_flags & O_TMPFILE) == O_TMPFILE and ret >= 0)


_ACCESS_CACHE: dict[int, frozenset[str]] = {}


def _access_cached(flags: int) -> frozenset[str]:
    # A program uses a handful of flag combinations; decoding runs at ~10^5 events/s.
    acc = _ACCESS_CACHE.get(flags)
    if acc is None:
        if len(_ACCESS_CACHE) > 4096:
            _ACCESS_CACHE.clear()
        acc = _ACCESS_CACHE[flags] = _access(flags)
    return acc


class Decoder:
    """Owns raw record -> Event: the record layouts, the comm cache, and the updates each
    event makes to the process model (fork, exit, chdir, open fds). Needs no kernel;
    `learn` (optional) is told what /proc taught us about a process that predates attach."""

    def __init__(
        self, model: ProcModel, stats: SensorStats,
        learn: Callable[[int, ProcState], None] | None = None,
        identify: Callable[[Event], None] | None = None, btf: bool = True,
    ) -> None:
        """identify: fills exe_sha256/real_args of a successful exec (I/O; None in pure
        decoding). btf: the kernel side walks paths (absolute names then get a real_path)."""
        self._model = model
        self._stats = stats
        self._learn = learn
        self._identify = identify
        self.btf = btf
        self._comms: dict[bytes, str] = {}
        self._next_prune = 0

    def decode(self, record: bytes) -> Event | None:
        """One raw perf-buffer record as the kernel wrote it -> Event, or None for a kind
        this version does not know. Raises DecodeError for a record that cannot be one."""
        if len(record) < _HDR_SIZE:
            raise DecodeError(f"record of {len(record)} bytes, shorter than the header")
        return self._decode(_HDR.unpack_from(record), record)

    def prune(self) -> None:
        """Forget processes whose exit was missed, at most every _PRUNE_EVERY_NS."""
        now = time.monotonic_ns()
        if now > self._next_prune:
            self._model.prune(now - _PRUNE_EVERY_NS)
            self._next_prune = now + _PRUNE_EVERY_NS

    def _decode(self, hdr: tuple, r: bytes) -> Event | None:
        (ts, cgid, start, ret, pid, tgid, ppid, uid, code, flags, fd, sc_flags, child, plen,
         comm_b) = hdr  # fmt: skip
        if plen > PATH_LEN:
            raise DecodeError(f"path_len {plen} is over {PATH_LEN}")
        comm = self._comms.get(comm_b)
        if comm is None:
            if len(self._comms) >= 4096:  # a process can rename itself at will: bound it
                self._comms.clear()
            comm = self._comms[comm_b] = _text(comm_b)
        model = self._model
        if code == _OPEN and not flags & (F_NO_PROC | F_PATH_TRUNC | F_REAL_CUT):
            # Fast path for the bulk of the stream (opens of a known process): the same
            # result as the general path below, with fewer calls. ~30% more events/s.
            st = model.procs.get(tgid)
            if st is not None and st.start_ns == start:
                kdev, ino, rlen, _ = _OBJ.unpack_from(r, _OBJ_OFF)
                end = _STRS_OFF + plen
                if len(r) < end + rlen:
                    raise DecodeError(f"open record of {len(r)} bytes is shorter than its strings")
                raw_b = r[_STRS_OFF : end - 1]
                raw_path = raw_b.decode("utf-8", "backslashreplace") if plen else ""
                path = normalize(raw_path) if raw_path[:1] == "/" else None
                if path is None:
                    path = model.resolve(st, tgid, fd, raw_path)
                if path is not None:
                    st.last_seen_ns = ts
                    ev = Event(
                        Kind.OPEN, ts, pid, tgid, ppid, uid, comm, cgid, start, raw_path, path,
                        (), False, sc_flags, _access_cached(sc_flags), ret,
                    )  # fmt: skip
                    ev.exe = st.exe
                    ev.created = _created(flags, sc_flags, ret)
                    if flags & F_REAL:
                        real_b = r[end : end + rlen]
                        # Most opens name the file by its real path: one decode for both.
                        ev.real_path = raw_path if real_b == raw_b else real_b.decode("utf-8", "backslashreplace")
                        dev = _USER_DEVS.get(kdev)
                        if dev is None:
                            dev = _USER_DEVS[kdev] = user_dev(kdev)
                        ev.dev, ev.ino = dev, ino
                    if ret >= 0:
                        st.fds[ret] = ev.real_path or path
                    return ev
        kind = KIND_CODES.get(code)
        if kind is None:
            return None
        st = model.get(tgid, start)
        st.last_seen_ns = ts
        notes: list[str] = []
        if flags & F_NO_PROC:
            # Predates attach and was not seeded: /proc (read by model.get) or nothing.
            ppid, start = st.ppid, st.start_ns
            if not start:
                notes.append(NOTE_PROC_UNKNOWN)
            else:
                self._learn_proc(tgid, st)
        ev = Event(kind, ts, pid, tgid, ppid, uid, comm, cgid, start)

        if kind in _PATH_KINDS:
            self._decode_path(ev, kind, st, r, flags, fd, sc_flags, ret, plen, child, notes)
        elif kind is Kind.EXEC:
            self._decode_exec(ev, st, r, flags, fd, sc_flags, ret, plen, notes)
        elif kind is Kind.CONNECT:
            decode_dest(ev, r, flags, sc_flags)
        elif kind is Kind.FORK:
            ev.child_pid = child
            model.fork(st, child, tgid)
        elif kind is Kind.EXIT:
            model.exit(tgid)
        elif kind is Kind.PTRACE:
            ev.target_pid = child
            ev.flags = sc_flags
        elif kind is Kind.IO_URING:
            ev.ret = ret  # the ring's fd, or -errno (EPERM: refused by run's jail)
        if not ev.exe:
            ev.exe = st.exe
        if notes:
            ev.notes = tuple(notes)
        return ev

    def _decode_path(self, ev: Event, kind: Kind, st: ProcState, r: bytes, flags: int, fd: int,
                     sc_flags: int, ret: int, plen: int, fd2: int, notes: list[str]) -> None:
        """The struct ev_path kinds: requested name(s), and what the kernel resolved."""
        model, tgid = self._model, ev.tgid
        kdev, ino, rlen, r2len = _OBJ.unpack_from(r, _OBJ_OFF) if len(r) >= _STRS_OFF else (0, 0, 0, 0)
        (p2len,) = _PATH2.unpack_from(r, _PATH2_OFF) if len(r) >= _STRS_OFF else (0,)
        if p2len > PATH_LEN or rlen >= REAL_LEN or r2len >= REAL_LEN:
            raise DecodeError(f"{kind.value} record with string lengths {p2len}/{rlen}/{r2len}")
        a = _STRS_OFF + plen
        b = a + p2len
        c = b + rlen
        if len(r) < c + r2len:
            raise DecodeError(f"{kind.value} record of {len(r)} bytes is shorter than its strings")
        # path_len and path2_len count the NUL that bpf_probe_read_user_str always writes.
        raw_path = r[_STRS_OFF : a - 1].decode("utf-8", "backslashreplace") if plen > 1 else ""
        real = r[b:c].decode("utf-8", "backslashreplace") if flags & F_REAL else ""
        if flags & F_REAL_CUT and real:
            real = _CUT + real
        ev.raw_path = raw_path
        ev.flags = sc_flags
        ev.ret = ret
        if flags & F_PATH_TRUNC:
            notes.append(NOTE_PATH_TRUNCATED)
        ev.path_cut = bool(flags & (F_REAL_CUT | F_REAL2_CUT))
        if flags & F_KILLED:
            notes.append(NOTE_KILLED)
            ev.ret = None
        elif flags & F_HELD:
            notes.append(NOTE_HELD)
        if flags & F_RATE_HELD:
            notes.append(NOTE_RATE_HELD)
        named = plen > 0 and kind is not Kind.SYMLINK  # symlink: raw_path is the target text
        if kind is Kind.SYMLINK:
            path = raw_path  # never resolved: what the link will say
        elif not named:
            path = model.dir_of(st, tgid, fd)  # fchdir(fd), ftruncate(fd), mmap(fd)
        elif kind in _DIR_KINDS and flags & F_REAL and not flags & F_REAL_CUT:
            path = base_walked(st, fd, real, raw_path)
        else:
            path = model.resolve(st, tgid, fd, raw_path)
        self._set_path(ev, path, notes)
        if kind in _DIR_KINDS and named:
            ev.real_path = self._entry_real(raw_path, real, flags & F_REAL, tgid, st)
        elif kind is not Kind.SYMLINK:
            ev.real_path = real
            if flags & F_REAL and kdev | ino:
                ev.dev, ev.ino = user_dev(kdev), ino
        if kind in (Kind.RENAME, Kind.LINK, Kind.SYMLINK):
            raw2 = r[a : b - 1].decode("utf-8", "backslashreplace") if p2len > 1 else ""
            real2 = r[c : c + r2len].decode("utf-8", "backslashreplace") if flags & F_REAL2 else ""
            if flags & F_REAL2_CUT and real2:
                real2 = _CUT + real2
            ev.dest_raw_path = raw2
            dfd = fd2 - (1 << 32) if fd2 >= 1 << 31 else fd2  # child_pid carries the 2nd dirfd
            if flags & F_REAL2 and not flags & F_REAL2_CUT:
                ev.dest_path = base_walked(st, dfd, real2, raw2)
            else:
                ev.dest_path = model.resolve(st, tgid, dfd, raw2) or ""
            ev.dest_real_path = self._entry_real(raw2, real2, flags & F_REAL2, tgid, st)
        if kind is Kind.OPEN:
            ev.access = _access_cached(sc_flags)
            ev.created = _created(flags, sc_flags, ret)
            if ret >= 0:
                known = ev.real_path if ev.real_path and not ev.path_cut else path
                if known is not None:
                    st.fds[ret] = known
        elif kind is Kind.UNLINK:
            ev.is_dir = bool(sc_flags & AT_REMOVEDIR)
        elif kind is Kind.TRUNCATE:
            ev.access = frozenset({WRITE, TRUNCATE})
            if flags & F_NOTHING_CUT:
                notes.append(NOTE_NOTHING_CUT)
        elif kind is Kind.CHDIR and ret == 0:
            st.cwd = ev.real_path if ev.real_path and not ev.path_cut else path

    def _set_path(self, ev: Event, path: str | None, notes: list[str]) -> None:
        """The requested path's absolute form, or the note that its base was unknown."""
        if path is None:
            notes.append(NOTE_UNRESOLVED)
            self._stats.unresolved += 1
        else:
            ev.path = path

    def _entry_real(self, raw: str, base_real: str, walked: int, tgid: int, st: ProcState) -> str:
        """The real path of a directory entry: its base directory as the kernel walked it,
        joined with the name. An absolute name needs no base (only /proc aliases are read)."""
        if raw.startswith("/"):
            return proc_alias(normalize(raw), tgid, st) if self.btf else ""
        if not walked or not base_real:
            return ""
        if base_real.startswith(_CUT):
            return _CUT + normalize(raw, base_real[len(_CUT):])
        return normalize(raw, base_real)

    def _decode_exec(self, ev: Event, st: ProcState, r: bytes, flags: int, fd: int, sc_flags: int,
                     ret: int, plen: int, notes: list[str]) -> None:
        if len(r) < _EXEC_ARGV_OFF:
            raise DecodeError(f"exec record of {len(r)} bytes")
        raw_path = (r[_EXEC_PATH_OFF : _EXEC_PATH_OFF + plen - 1].decode("utf-8", "backslashreplace")
                    if plen > 1 else "")
        ev.raw_path = raw_path
        ev.flags = sc_flags
        if flags & F_PATH_TRUNC:
            notes.append(NOTE_PATH_TRUNCATED)
        if raw_path == "" and sc_flags & AT_EMPTY_PATH:
            path = self._model.dir_of(st, ev.tgid, fd)  # execveat(fd, "", AT_EMPTY_PATH)
        else:
            path = self._model.resolve(st, ev.tgid, fd, raw_path)
        self._set_path(ev, path, notes)
        if flags & F_REAL2 and not flags & F_REAL2_CUT:
            # The cwd the kernel holds: exact even for a process born before attach.
            _, _, _, clen = _OBJ.unpack_from(r, _OBJ_OFF)
            if clen >= REAL_LEN:
                raise DecodeError(f"exec record with cwd length {clen}")
            st.cwd = r[_EXEC_CWD_OFF : _EXEC_CWD_OFF + clen].decode("utf-8", "backslashreplace")
        ev.cwd = st.cwd or ""
        decode_argv(ev, r)
        if flags & F_ARGV_TRUNC:
            ev.argv_truncated = True
        if flags & F_REAL:
            kdev, ino, rlen, _ = _OBJ.unpack_from(r, _OBJ_OFF)
            if rlen >= REAL_LEN:
                raise DecodeError(f"exec record with real_len {rlen}")
            real = r[_EXEC_REAL_OFF : _EXEC_REAL_OFF + rlen].decode("utf-8", "backslashreplace")
            ev.path_cut = bool(flags & F_REAL_CUT)
            ev.real_path = _CUT + real if ev.path_cut else real
            ev.dev, ev.ino = user_dev(kdev), ino
            ev.exe = ev.real_path
            if ret == 0:
                st.exe = ev.real_path
        if flags & F_KILLED and not flags & F_BY_INODE:
            notes.append(NOTE_KILLED)  # emitted at entry: no result
        else:
            ev.ret = ret  # emitted at exit: 0, or -errno for a failed attempt
            if flags & F_KILLED:
                notes.append(NOTE_KILLED)  # killed at exit, before its first instruction
            elif flags & F_HELD:
                notes.append(NOTE_HELD)
        if ev.ret == 0 and self._identify is not None:
            self._identify(ev)

    def _learn_proc(self, tgid: int, st: ProcState) -> None:
        """Pass what /proc told us on (the kernel learns ppid/start_ns for later events)."""
        if self._learn is not None:
            self._learn(tgid, st)


def base_walked(st: ProcState, dfd: int, base: str, raw: str) -> str:
    """A relative name whose base directory the kernel walked (the fd table as it is: a
    dup2'ed or inherited dirfd included): the name against that base, and the model
    corrected, so later fallbacks start from the truth."""
    if dfd == AT_FDCWD:
        st.cwd = base
    else:
        st.fds[dfd] = base
    return normalize(raw, base)


def decode_dest(ev: Event, r: bytes, flags: int, sc_flags: int) -> None:
    """struct ev_connect: a destination given to connect, sendto or sendmsg."""
    if len(r) < _CONN_UNIX_OFF:
        raise DecodeError(f"connect record of {len(r)} bytes")
    family, port, addrlen, addr = _CONN.unpack_from(r, _CONN_OFF)
    ev.family = _FAMILIES.get(family, str(family))
    ev.port = socket.ntohs(port)
    ev.via = "sendto" if flags & F_SENDTO else "sendmsg" if flags & F_SENDMSG else "connect"
    ev.flags = sc_flags
    if len(r) >= _SOCK_OFF + _SOCK.size:
        ev.protocol = socket_protocol(*_SOCK.unpack_from(r, _SOCK_OFF))
    if family == socket.AF_INET:
        ev.addr = socket.inet_ntop(socket.AF_INET, addr[:4])
    elif family == socket.AF_INET6:
        ev.addr = socket.inet_ntop(socket.AF_INET6, addr)
    else:
        n = min(max(addrlen - 2, 0), len(r) - _CONN_UNIX_OFF)
        sun = r[_CONN_UNIX_OFF : _CONN_UNIX_OFF + n]
        # Abstract sockets start with NUL; shown as "@name" like ss(8) does.
        if sun[:1] == b"\0":
            ev.addr = "@" + _text(sun[1:].replace(b"\0", b"@"))
        else:
            ev.addr = _text(sun)


def decode_argv(ev: Event, r: bytes) -> None:
    """The argv slots of a struct ev_exec, bounded by the record's own length."""
    if len(r) < _EXEC_ARGV_OFF:
        raise DecodeError(f"exec record of {len(r)} bytes")
    (argc,) = _EXEC_ARGC.unpack_from(r, _EXEC_ARGC_OFF)
    if argc > MAX_ARGS or len(r) < _EXEC_ARGV_OFF + argc * ARG_LEN:
        # Unchecked, a corrupt argc of 2**32-1 would build billions of empty arguments.
        raise DecodeError(f"exec record of {len(r)} bytes with argc {argc}")
    args = []
    for i in range(argc):
        off = _EXEC_ARGV_OFF + i * ARG_LEN
        args.append(_text(r[off : off + ARG_LEN]))
    ev.argv = tuple(args)
