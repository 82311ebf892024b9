"""The BTF reader: kernel struct offsets from /sys/kernel/btf/vmlinux, for the BPF programs.

Against the real kernel file (every FIELD resolves; on 6.18 the offsets measured there; with
Debian's bpftool installed, each offset against bpftool's own dump), and against tiny BTF blobs
built here, whose layout is known exactly: anonymous unions holding anonymous structs, modifier
chains, a forward declaration and a decoy struct sharing a name, a kind_flag struct with a
bitfield; then corrupt files, missing members, wrong sizes, and the cache.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import stat
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ebpf_guard.sensor.btf import FIELDS, BtfError, Layouts, kernel_layouts
from tests.helpers import scaled

VMLINUX = Path("/sys/kernel/btf/vmlinux")
requires_btf = pytest.mark.skipif(not VMLINUX.exists(), reason=f"no {VMLINUX}: kernel built without BTF")
KEYS = [f"{s}.{m}" for s, m in FIELDS]
POINTERS = {"task_struct.real_parent", "task_struct.files", "task_struct.fs", "task_struct.mm", "files_struct.fdt",
            "fdtable.fd", "file.f_inode", "path.mnt", "path.dentry", "dentry.d_parent", "dentry.d_inode",
            "qstr.name", "inode.i_sb", "vfsmount.mnt_root", "mount.mnt_parent", "mount.mnt_mountpoint",
            "mm_struct.exe_file", "file.private_data", "socket.file", "socket.sk", "linux_binprm.file"}
INTS = {"task_struct.tgid": 4, "fdtable.max_fds": 4, "qstr.len": 4, "inode.i_ino": 8, "super_block.s_dev": 4,
        "file.f_mode": 4, "file.f_flags": 4, "inode.i_mode": 2, "inode.i_size": 8, "socket.type": 2,
        "sock.sk_protocol": 2, "sock_common.skc_family": 2}


# ------------------------------------------------------------------------------- a BTF builder
class Blob:
    """A BTF file built type by type, in the host's byte order: owns the type records (ids in
    the order they are added, from 1) and the deduplicated string section."""

    def __init__(self) -> None:
        self.records: list[bytes] = []
        self.strings = bytearray(b"\0")
        self.offsets: dict[str, int] = {"": 0}

    def _name(self, name: str) -> int:
        if name not in self.offsets:
            self.offsets[name] = len(self.strings)
            self.strings += name.encode() + b"\0"
        return self.offsets[name]

    def add(self, kind: int, name: str = "", vlen: int = 0, size_or_type: int = 0, extra: bytes = b"",
            kind_flag: bool = False) -> int:
        info = (kind << 24) | vlen | (1 << 31 if kind_flag else 0)
        self.records.append(struct.pack("=III", self._name(name), info, size_or_type) + extra)
        return len(self.records)

    def int(self, name: str, size: int) -> int:
        return self.add(1, name, 0, size, struct.pack("=I", size * 8))

    def ptr(self, to: int = 0) -> int:
        return self.add(2, size_or_type=to)

    def typedef(self, name: str, to: int) -> int:
        return self.add(8, name, size_or_type=to)

    def struct(self, name: str, size: int, members: list[tuple[str, int, int]], union: bool = False,
               kind_flag: bool = False) -> int:
        """members: (name, type id, offset in bytes, or with kind_flag the raw offset word)."""
        extra = b"".join(struct.pack("=III", self._name(n), t, off if kind_flag else off * 8)
                         for n, t, off in members)
        return self.add(5 if union else 4, name, len(members), size, extra, kind_flag)

    def bytes(self) -> bytes:
        types = b"".join(self.records)
        header = struct.pack("=HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(self.strings))
        return header + types + bytes(self.strings)


def kernel_like(*, mm_exe_file: bool = True, tgid_size: int = 4, f_path_pointer: bool = False) -> bytes:
    """A BTF blob holding every struct of FIELDS, at the offsets of CRAFTED, with the traps of
    the real one: members inside anonymous unions and structs, typedefs and const on the way to
    a type, a FWD and a decoy struct before the real ones, and records of every variable size."""
    b = Blob()
    u32, u64, void_p = b.int("unsigned int", 4), b.int("long long unsigned int", 8), b.ptr()
    u16 = b.int("short unsigned int", 2)
    b.add(6, "state", 2, 4, struct.pack("=Ii", b._name("A"), 0) + struct.pack("=Ii", b._name("B"), 1))  # ENUM
    b.add(13, "", 1, 0, struct.pack("=II", 0, u32))  # FUNC_PROTO
    b.add(19, "big", 1, 8, struct.pack("=III", b._name("C"), 1, 0))  # ENUM64
    b.add(14, "var", 0, u32, struct.pack("=I", 1))  # VAR
    b.add(17, "tag", 0, u32, struct.pack("=i", -1))  # DECL_TAG
    tail = b.add(3, "", 0, 0, struct.pack("=III", u64, u32, 0))  # ARRAY: u64[0]
    pid_t = b.typedef("pid_t", b.int("int", 4) if tgid_size == 4 else u64)
    const_p = b.add(10, size_or_type=void_p)  # CONST pointer
    ino_t = b.typedef("ino_t", u64)

    # qstr: union { struct { u32 hash; u32 len; }; u64 hash_len; }; const unsigned char *name;
    hash_len = b.struct("", 8, [("hash", u32, 0), ("len", u32, 4)])
    hash_union = b.struct("", 8, [("", hash_len, 0), ("hash_len", u64, 0)], union=True)
    qstr = b.struct("qstr", 16, [("", hash_union, 0), ("name", const_p, 8)])
    path = b.struct("path", 16, [("mnt", void_p, 0), ("dentry", void_p, 8)])
    vfsmount = b.struct("vfsmount", 16, [("mnt_root", void_p, 0), ("mnt_sb", void_p, 8)])

    b.add(7, "task_struct")  # FWD: a declaration, no members
    parent = b.struct("", 16, [("pad", u64, 0), ("real_parent", void_p, 8)])
    either = b.struct("", 16, [("", parent, 0), ("alias", u64, 0)], union=True)
    b.struct("task_struct", 72, [("state", u32, 0), ("", either, 8), ("tgid", pid_t, 40), ("files", const_p, 48),
                                 ("fs", void_p, 56), ("mm", void_p, 64)])
    b.struct("files_struct", 40, [("count", u32, 0), ("fdt", void_p, 32)])
    b.struct("fdtable", 16, [("max_fds", u32, 0), ("fd", void_p, 8)])
    b.struct("file", 40, [("f_inode", void_p, 32)])  # decoy: same name, lacks f_path
    f_path = b.ptr(path) if f_path_pointer else b.typedef("path_t", path)
    b.struct("file", 80, [("f_mode", u32, 16), ("f_flags", u32, 20), ("private_data", void_p, 24),
                          ("f_inode", void_p, 32), ("f_path", f_path, 64)])
    b.struct("linux_binprm", 24, [("buf", u64, 0), ("file", void_p, 8)])
    b.struct("dentry", 56, [("d_parent", void_p, 24), ("d_name", qstr, 32), ("d_inode", void_p, 48)])
    b.struct("inode", 72, [("i_mode", b.typedef("umode_t", u16), 0), ("i_sb", void_p, 40), ("i_size", u64, 48),
                           ("i_ino", ino_t, 64)])
    b.struct("socket", 32, [("state", u32, 0), ("type", u16, 4), ("file", void_p, 16), ("sk", void_p, 24)])
    sock_common = b.struct("sock_common", 24, [("skc_hash", u32, 0), ("skc_family", u16, 16)])
    b.struct("sock", 48, [("__sk_common", sock_common, 0), ("sk_protocol", u16, 40), ("sk_type", u16, 42)])
    # kind_flag: each member's offset word is (bitfield size << 24) | bit offset.
    b.struct("super_block", 24, [("s_bits", u32, (3 << 24) | 0), ("s_dev", u32, 16 * 8)], kind_flag=True)
    b.struct("mount", 48, [("mnt_parent", void_p, 16), ("mnt_mountpoint", void_p, 24), ("mnt", vfsmount, 32)])
    b.struct("fs_struct", 56, [("root", path, 24), ("pwd", path, 40)])
    inner = [("mmap_base", u64, 0)] + ([("exe_file", void_p, 1312)] if mm_exe_file else [])
    mm = b.struct("", 1320, inner)
    b.struct("mm_struct", 1320, [("", mm, 0), ("cpu_bitmap", tail, 1320)])
    return b.bytes()


CRAFTED = {"task_struct.real_parent": 16, "task_struct.tgid": 40, "task_struct.files": 48, "task_struct.fs": 56,
           "task_struct.mm": 64, "files_struct.fdt": 32, "fdtable.max_fds": 0, "fdtable.fd": 8, "file.f_path": 64,
           "file.f_inode": 32, "path.mnt": 0, "path.dentry": 8, "dentry.d_parent": 24, "dentry.d_name": 32,
           "dentry.d_inode": 48, "qstr.len": 4, "qstr.name": 8, "inode.i_ino": 64, "inode.i_sb": 40,
           "super_block.s_dev": 16, "vfsmount.mnt_root": 0, "mount.mnt": 32, "mount.mnt_parent": 16,
           "mount.mnt_mountpoint": 24, "fs_struct.root": 24, "fs_struct.pwd": 40, "mm_struct.exe_file": 1312,
           "file.f_mode": 16, "file.f_flags": 20, "linux_binprm.file": 8, "file.private_data": 24,
           "inode.i_mode": 0, "inode.i_size": 48, "socket.type": 4, "socket.file": 16, "socket.sk": 24,
           "sock.__sk_common": 0, "sock.sk_protocol": 40, "sock_common.skc_family": 16}


def write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "vmlinux"
    path.write_bytes(data)
    return path


def assert_sane(layouts: Layouts) -> None:
    assert list(layouts.offsets) == KEYS and list(layouts.sizes) == KEYS
    for key in POINTERS:
        assert layouts.sizes[key] == 8, key
    for key, size in INTS.items():
        assert layouts.sizes[key] == size, key
    assert layouts.sizes["file.f_path"] == layouts.sizes["fs_struct.root"] == 16  # struct path: 2 pointers
    flags = layouts.cflags()
    assert flags[0] == "-DEG_HAVE_BTF=1" and len(flags) == len(FIELDS) + 1
    assert f"-DEG_OFF_task_struct__real_parent={layouts.offsets['task_struct.real_parent']}" in flags


# ---------------------------------------------------------------------------- the real kernel
@requires_btf
def test_the_running_kernel_resolves_every_field(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    layouts = kernel_layouts(cache_dir=tmp_path)
    elapsed = time.perf_counter() - t0
    assert_sane(layouts)
    uname = os.uname()
    assert layouts.kernel == f"{uname.release} {uname.version}" and not layouts.cached
    assert elapsed < scaled(2.0), f"parsing {VMLINUX} took {elapsed:.2f} s"


@requires_btf
@pytest.mark.skipif(not platform.release().startswith("6.18"),
                    reason=f"offsets measured on 6.18; this kernel is {platform.release()}")
def test_offsets_measured_on_6_18(tmp_path: Path) -> None:
    offsets = kernel_layouts(cache_dir=tmp_path).offsets
    assert {k: offsets[k] for k in ("task_struct.real_parent", "task_struct.files", "task_struct.fs",
                                    "files_struct.fdt", "fdtable.fd", "file.f_inode", "path.dentry",
                                    "dentry.d_parent", "inode.i_ino")} == {
        "task_struct.real_parent": 1280, "task_struct.files": 1824, "task_struct.fs": 1816, "files_struct.fdt": 32,
        "fdtable.fd": 8, "file.f_inode": 32, "path.dentry": 8, "dentry.d_parent": 24, "inode.i_ino": 64}
    # What a connect's protocol and an open's FMODE_CREATED are read through (issue #11).
    assert {k: offsets[k] for k in ("file.f_mode", "file.private_data", "inode.i_mode", "inode.i_size",
                                    "socket.type", "socket.file", "socket.sk", "sock.sk_protocol",
                                    "sock_common.skc_family")} == {
        "file.f_mode": 4, "file.private_data": 24, "inode.i_mode": 0, "inode.i_size": 80, "socket.type": 4,
        "socket.file": 16, "socket.sk": 24, "sock.sk_protocol": 532, "sock_common.skc_family": 16}


def _bpftool_offsets() -> dict[str, int]:
    """Each FIELD's byte offset per `bpftool -j btf dump`, walked independently of btf.py."""
    dump = subprocess.run(["bpftool", "-j", "btf", "dump", "file", str(VMLINUX)], capture_output=True,
                          timeout=scaled(60))
    if dump.returncode != 0:  # e.g. a bpftool older than a BTF kind this kernel uses: its limit, not ours
        pytest.skip(f"bpftool cannot dump {VMLINUX}: {dump.stderr.decode(errors='replace').strip()[:200]}")
    types = {t["id"]: t for t in json.loads(dump.stdout)["types"]}

    def strip(type_id: int) -> dict:
        t = types[type_id]
        while t["kind"] in ("TYPEDEF", "CONST", "VOLATILE", "RESTRICT", "TYPE_TAG"):
            t = types[t["type_id"]]
        return t

    def find(t: dict, member: str, bits: int) -> int | None:
        for m in t["members"]:
            if m["name"] == member:
                return bits + m["bits_offset"]
            inner = strip(m["type_id"])
            if m["name"] == "(anon)" and inner["kind"] in ("STRUCT", "UNION"):
                found = find(inner, member, bits + m["bits_offset"])
                if found is not None:
                    return found
        return None

    structs: dict[str, list[dict]] = {}
    for t in types.values():
        if t["kind"] == "STRUCT":
            structs.setdefault(t["name"], []).append(t)
    offsets = {}
    for s, m in FIELDS:
        bits = next(b for b in (find(t, m, 0) for t in structs[s]) if b is not None)
        offsets[f"{s}.{m}"] = bits // 8
    return offsets


@requires_btf
@pytest.mark.skipif(shutil.which("bpftool") is None, reason="bpftool not installed (apt-get install bpftool)")
def test_every_offset_matches_bpftool(tmp_path: Path) -> None:
    assert kernel_layouts(cache_dir=tmp_path).offsets == _bpftool_offsets()


# --------------------------------------------------------------------------- crafted BTF blobs
def test_members_in_anonymous_unions_and_structs_add_up(tmp_path: Path) -> None:
    layouts = kernel_layouts(write(tmp_path, kernel_like()), tmp_path / "cache")
    assert layouts.offsets == CRAFTED
    assert_sane(layouts)
    assert layouts.sizes["mount.mnt"] == 16 and layouts.sizes["dentry.d_name"] == 16


def test_big_endian_btf_reads_the_same(tmp_path: Path) -> None:
    """A foreign-endian dump: every u16/u32 swapped. The reader follows the magic's byte order."""
    data = kernel_like()
    words = struct.unpack_from("<HBBIIIII", data)
    header = struct.pack(">HBBIIIII", *words)
    hdr_len, types_len = words[3], words[5]
    body = data[hdr_len:hdr_len + types_len]
    swapped = struct.pack(f">{types_len // 4}I", *struct.unpack(f"<{types_len // 4}I", body))
    blob = header + swapped + data[hdr_len + types_len:]
    assert kernel_layouts(write(tmp_path, blob), tmp_path / "cache").offsets == CRAFTED


def _one_line_error(btf: Path, cache: Path) -> str:
    with pytest.raises(BtfError) as e:
        kernel_layouts(btf, cache)
    message = str(e.value)
    assert "\n" not in message and str(btf) in message, message
    return message


@requires_btf
@pytest.mark.parametrize("case", ["empty", "garbage", "truncated", "unknown kind", "record past section"])
def test_a_corrupt_btf_file_is_one_clear_line(tmp_path: Path, case: str) -> None:
    blob = kernel_like()
    data = {
        "empty": b"",
        "garbage": os.urandom(4096),
        "truncated": VMLINUX.read_bytes()[:len(VMLINUX.read_bytes()) // 2],
        "unknown kind": blob[:24] + struct.pack("=III", 0, 25 << 24, 0) + blob[36:],
        # The header's type section ends 4 bytes early: the last record overruns it.
        "record past section": blob[:12] + struct.pack("=I", struct.unpack_from("=I", blob, 12)[0] - 4) + blob[16:],
    }[case]
    message = _one_line_error(write(tmp_path, data), tmp_path / "cache")
    assert any(w in message for w in ("not BTF", "corrupt", "truncated")), message
    assert not (tmp_path / "cache").exists()


def test_a_missing_btf_file_says_so(tmp_path: Path) -> None:
    assert "no such file" in _one_line_error(tmp_path / "vmlinux", tmp_path / "cache")


def test_a_missing_member_is_named(tmp_path: Path) -> None:
    message = _one_line_error(write(tmp_path, kernel_like(mm_exe_file=False)), tmp_path / "cache")
    assert "struct mm_struct has no member exe_file" in message


def test_a_member_of_another_size_is_refused(tmp_path: Path) -> None:
    message = _one_line_error(write(tmp_path, kernel_like(tgid_size=8)), tmp_path / "cache")
    assert "task_struct.tgid is 8 bytes" in message and "read 4" in message


def test_a_pointer_where_a_struct_is_embedded_is_refused(tmp_path: Path) -> None:
    message = _one_line_error(write(tmp_path, kernel_like(f_path_pointer=True)), tmp_path / "cache")
    assert "file.f_path is a pointer" in message and "embedded struct path" in message


# ----------------------------------------------------------------------------------- the cache
@requires_btf
def test_the_cache_is_written_then_used(tmp_path: Path) -> None:
    cache = tmp_path / "var" / "cache" / "btf"
    old = os.umask(0o077)  # the modes are set, not left to the umask
    try:
        fresh = kernel_layouts(cache_dir=cache)
    finally:
        os.umask(old)
    files = list(cache.iterdir())
    assert [f.suffix for f in files] == [".json"], files  # no temp file left behind
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o644 and stat.S_IMODE(cache.stat().st_mode) == 0o755
    again = kernel_layouts(cache_dir=cache)
    assert not fresh.cached and again.cached
    assert (again.offsets, again.sizes, again.kernel) == (fresh.offsets, fresh.sizes, fresh.kernel)
    assert again.cflags() == fresh.cflags()


def _edit(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        doc = json.loads(path.read_text())
        change(doc)
        path.write_text(json.dumps(doc))
    return edit


CORRUPTIONS: dict[str, Callable[[Path], None]] = {
    "garbage": lambda p: p.write_bytes(b"\0\xffnot json"),
    "truncated": lambda p: p.write_text(p.read_text()[:40]),
    "empty": lambda p: p.write_text(""),
    "offset as text": _edit(lambda d: d["offsets"].update({"task_struct.real_parent": "16"})),
    "negative offset": _edit(lambda d: d["offsets"].update({"qstr.len": -4})),
    "wrong size": _edit(lambda d: d["sizes"].update({"task_struct.tgid": 8})),
    "field missing": _edit(lambda d: d["offsets"].pop("mm_struct.exe_file")),
    "another kernel": _edit(lambda d: d.update(kernel="5.10.0 #1")),
    "another key": _edit(lambda d: d.update(key="0" * 32)),
    "not an object": lambda p: p.write_text("[]"),
    "writable by others": lambda p: p.chmod(0o666),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_bad_cache_file_is_ignored_and_rewritten(tmp_path: Path, corruption: str) -> None:
    btf, cache = write(tmp_path, kernel_like()), tmp_path / "cache"
    kernel_layouts(btf, cache)
    [path] = cache.iterdir()
    good = path.read_text()
    CORRUPTIONS[corruption](path)
    redone = kernel_layouts(btf, cache)
    assert not redone.cached and redone.offsets == CRAFTED
    assert path.read_text() == good and stat.S_IMODE(path.stat().st_mode) == 0o644
    assert kernel_layouts(btf, cache).cached


def test_a_changed_btf_file_is_not_served_from_the_cache(tmp_path: Path) -> None:
    btf, cache = write(tmp_path, kernel_like()), tmp_path / "cache"
    kernel_layouts(btf, cache)
    write(tmp_path, kernel_like(mm_exe_file=False))
    _one_line_error(btf, cache)  # parsed again, and found wanting


def test_an_unwritable_cache_dir_still_gives_the_layouts(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")  # even root cannot make a directory under a file
    layouts = kernel_layouts(write(tmp_path, kernel_like()), tmp_path / "file" / "btf")
    assert layouts.offsets == CRAFTED and not layouts.cached
