"""Kernel struct layouts read from the running kernel's BTF, for BPF programs compiled by bcc.

Why: bcc compiles the BPF C against whatever kernel headers the distro has. On custom, cloud or
hypervisor kernels none match (here a 6.18 kernel runs with Debian's 6.1 headers linked in), so
`task->real_parent` would compile to the 6.1 offset and read garbage. The kernel itself publishes
the true layouts as BTF at /sys/kernel/btf/vmlinux; we read the few offsets the BPF programs need
and pass them in as macros (`Layouts.cflags()`), so the C reads at `(char *)task + EG_OFF_...`.

The format (include/uapi/linux/btf.h), all in the host's byte order:
  struct btf_header  {u16 magic 0xeB9F; u8 version 1; u8 flags; u32 hdr_len;
                      u32 type_off, type_len, str_off, str_len}   offsets relative to hdr_len
  type section       back-to-back records, type ids counting from 1 (0 is void):
                     struct btf_type {u32 name_off; u32 info; u32 size_or_type}
                     info: vlen bits 0-15, kind bits 24-28, kind_flag bit 31; then kind-specific
                     data, e.g. STRUCT/UNION: vlen * btf_member {u32 name_off, type, offset}
                     (offset in bits; with kind_flag: low 24 bits offset, high 8 bitfield size)
  string section     NUL-terminated names, name_off indexes into it.
Members of anonymous structs and unions have no name of their own in the parent, so a member is
found by a recursive walk through the nameless members, adding up their offsets.

Pure Python, no bpftool or libbpf at run time. Only what is needed is indexed: one pass records
where each type record starts (for lookup by id) and the ids of the structs we want (matched by
the offsets of their names in the string section); members and names are decoded lazily.
Measured on this 6.18 kernel (5.5 MB BTF, 126,585 types) on a loaded 2-CPU VM: 0.07-0.34 s cold
(read, hash, scan, resolve, write the cache; the scan alone ~0.05 s), 0.007-0.014 s from the cache
(which still reads and hashes the BTF file, to key it).

The result is cached as one small JSON file per kernel build, keyed by a hash of the uname
release and version and the size and sha256 of the BTF file; a cache file that does not parse,
does not match, or fails the size checks is ignored and rewritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

BTF_MAGIC = 0xEB9F
CACHE_FORMAT = 1
POINTER_SIZE = 8  # the BPF programs read pointers as u64: 64-bit kernels only

# What the BPF programs read and what they rely on: "*" a pointer, an int an integer of that many
# bytes, "struct X" a struct X embedded by value (its address is taken, not loaded). The order is
# that of FIELDS and of the -D flags.
_EXPECT: dict[str, str | int] = {
    "task_struct.real_parent": "*", "task_struct.tgid": 4, "task_struct.files": "*",
    "task_struct.fs": "*", "task_struct.mm": "*",
    "files_struct.fdt": "*",
    "fdtable.max_fds": 4, "fdtable.fd": "*",
    "file.f_path": "struct path", "file.f_inode": "*",
    "path.mnt": "*", "path.dentry": "*",
    "dentry.d_parent": "*", "dentry.d_name": "struct qstr", "dentry.d_inode": "*",
    "qstr.len": 4, "qstr.name": "*",
    "inode.i_ino": 8, "inode.i_sb": "*",
    "super_block.s_dev": 4,
    "vfsmount.mnt_root": "*",
    "mount.mnt": "struct vfsmount", "mount.mnt_parent": "*", "mount.mnt_mountpoint": "*",
    "fs_struct.root": "struct path", "fs_struct.pwd": "struct path",
    "mm_struct.exe_file": "*",
    # BPF-LSM (bpf/lsm.c): a file opened for writing or by exec, and the program an exec checks.
    "file.f_mode": 4, "file.f_flags": 4, "linux_binprm.file": "*",
    # The socket behind a connect's fd (its protocol) and the size an ftruncate cuts from.
    "file.private_data": "*", "inode.i_mode": 2, "inode.i_size": 8,
    "socket.type": 2, "socket.file": "*", "socket.sk": "*",
    "sock.__sk_common": "struct sock_common", "sock.sk_protocol": 2, "sock_common.skc_family": 2,
}
# (struct, member) pairs the BPF programs need.
FIELDS: tuple[tuple[str, str], ...] = tuple((k.split(".")[0], k.split(".")[1]) for k in _EXPECT)

# BTF kinds, and the bytes each kind's record carries after its 12-byte btf_type:
# (fixed bytes, bytes per vlen entry).
INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT = range(1, 12)
FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = range(12, 20)
_EXTRA: dict[int, tuple[int, int]] = {
    INT: (4, 0), PTR: (0, 0), ARRAY: (12, 0), STRUCT: (0, 12), UNION: (0, 12), ENUM: (0, 8),
    FWD: (0, 0), TYPEDEF: (0, 0), VOLATILE: (0, 0), CONST: (0, 0), RESTRICT: (0, 0), FUNC: (0, 0),
    FUNC_PROTO: (0, 8), VAR: (4, 0), DATASEC: (0, 12), FLOAT: (0, 0), DECL_TAG: (4, 0),
    TYPE_TAG: (0, 0), ENUM64: (0, 12),
}
_MODIFIERS = frozenset({TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG})  # no layout of their own
_SIZED = frozenset({INT, STRUCT, UNION, ENUM, ENUM64, FLOAT})  # size_or_type is a size
_MAX_DEPTH = 32  # modifier chains and anonymous nesting are a few levels; more is a corrupt file


class BtfError(Exception):
    """One line for the user: why the kernel's struct layouts could not be had."""


@dataclass(frozen=True)
class Layouts:
    """The byte offsets and sizes of FIELDS in one kernel build, and where they came from."""

    offsets: dict[str, int]  # "task_struct.real_parent" -> byte offset in the struct
    sizes: dict[str, int]  # the same keys -> the member's size in bytes
    kernel: str  # uname release and version of the kernel they were read for
    cached: bool  # read from the cache file rather than parsed

    def cflags(self) -> list[str]:
        """bcc cflags: EG_HAVE_BTF, then EG_OFF_<struct>__<member>=<offset> for each field."""
        return ["-DEG_HAVE_BTF=1"] + [f"-DEG_OFF_{key.replace('.', '__')}={off}"
                                      for key, off in self.offsets.items()]


@dataclass(frozen=True)
class _Member:
    """Where one member was found: byte offset in the outer struct and its (unmodified) type."""

    offset: int
    type_id: int
    bitfield: bool


class _Btf:
    """One parsed BTF blob: the type records' positions and the structs wanted by name.

    Owns the raw bytes; everything else is decoded on demand from them."""

    def __init__(self, data: bytes, wanted: set[str], where: str) -> None:
        self.where = where
        if len(data) < 24:
            raise BtfError(f"{where}: not BTF: {len(data)} bytes, shorter than a BTF header")
        # Byte order: the file is in the host's order, but decode either (a foreign dump).
        order = "<" if struct.unpack_from("<H", data)[0] == BTF_MAGIC else ">"
        magic, version, _flags, hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from(
            order + "HBBIIIII", data)
        if magic != BTF_MAGIC:
            raise BtfError(f"{where}: not BTF: magic {magic:#06x}, expected {BTF_MAGIC:#06x}")
        if version != 1:
            raise BtfError(f"{where}: BTF version {version}, only version 1 is understood")
        type_start, str_start = hdr_len + type_off, hdr_len + str_off
        if hdr_len < 24 or type_start + type_len > len(data) or str_start + str_len > len(data):
            raise BtfError(f"{where}: corrupt or truncated BTF: its sections run past the end of its "
                           f"{len(data)} bytes")
        self.data = data
        self.strings = data[str_start:str_start + str_len]
        if not self.strings.endswith(b"\0"):
            raise BtfError(f"{where}: corrupt BTF: the string section does not end with a NUL")
        self._head = struct.Struct(order + "III")
        self._word = struct.Struct(order + "I")
        self.positions, self.structs = self._scan(type_start, type_start + type_len, wanted)

    def _scan(self, pos: int, end: int, wanted: set[str]) -> tuple[list[int], dict[str, list[int]]]:
        """One pass over the type records: where each starts (index = id - 1), and the ids of the
        STRUCTs named in `wanted`, in id order. Names are compared by string offset, found once."""
        by_off: dict[int, str] = {}
        for name in wanted:
            needle = b"\0" + name.encode() + b"\0"
            at = self.strings.find(needle)
            while at >= 0:  # deduplicated in practice, but nothing forbids repeats
                by_off[at + 1] = name
                at = self.strings.find(needle, at + 1)
        positions: list[int] = []
        structs: dict[str, list[int]] = {name: [] for name in wanted}
        unpack, extra, data = self._head.unpack_from, _EXTRA, self.data
        try:
            while pos < end:
                name_off, info, _ = unpack(data, pos)
                kind = (info >> 24) & 0x1F
                fixed, per = extra[kind]
                positions.append(pos)
                if kind == STRUCT and name_off in by_off:
                    structs[by_off[name_off]].append(len(positions))
                pos += 12 + fixed + per * (info & 0xFFFF)
        except KeyError:
            raise BtfError(f"{self.where}: corrupt BTF: unknown kind {kind} at type id "
                           f"{len(positions) + 1}") from None
        except struct.error:
            raise BtfError(f"{self.where}: corrupt or truncated BTF: type id {len(positions) + 1} "
                           "runs past the end of the file") from None
        if pos != end:
            raise BtfError(f"{self.where}: corrupt BTF: the last type record runs past the type section")
        return positions, structs

    def record(self, type_id: int) -> tuple[int, int, int, int, int]:
        """(kind, vlen, kind_flag, size_or_type, position of the kind-specific data) of a type."""
        if not 1 <= type_id <= len(self.positions):
            raise BtfError(f"{self.where}: corrupt BTF: a reference to type id {type_id}, which "
                           f"does not exist (there are {len(self.positions)})")
        pos = self.positions[type_id - 1]
        _, info, size_or_type = self._head.unpack_from(self.data, pos)
        return (info >> 24) & 0x1F, info & 0xFFFF, info >> 31, size_or_type, pos + 12

    def name(self, type_id: int) -> str:
        return self._string(self._word.unpack_from(self.data, self.positions[type_id - 1])[0])

    def _string(self, off: int) -> str:
        end = self.strings.find(b"\0", off)
        if off >= len(self.strings) or end < 0:
            raise BtfError(f"{self.where}: corrupt BTF: a name offset {off} past the string section")
        return self.strings[off:end].decode(errors="replace")

    def strip(self, type_id: int) -> int:
        """The type under typedefs, const, volatile, restrict and type tags."""
        for _ in range(_MAX_DEPTH):
            kind, _, _, size_or_type, _ = self.record(type_id)
            if kind not in _MODIFIERS:
                return type_id
            type_id = size_or_type
        raise BtfError(f"{self.where}: corrupt BTF: a typedef/modifier chain deeper than {_MAX_DEPTH}")

    def size(self, type_id: int) -> int | None:
        """Bytes a value of the type takes; None for types without one (void, functions)."""
        if type_id == 0:
            return None
        type_id = self.strip(type_id)
        kind, _, _, size_or_type, extra = self.record(type_id)
        if kind in _SIZED:
            return size_or_type
        if kind == PTR:
            return POINTER_SIZE
        if kind == ARRAY:
            elem, _index, count = struct.unpack_from(self._head.format, self.data, extra)
            elem_size = self.size(elem)
            return None if elem_size is None else elem_size * count
        return None

    def members(self, struct_id: int) -> dict[str, _Member]:
        """A struct's members by name, those of anonymous struct/union members included (at their
        offset within the outer struct): what C lets you write as `s.member`."""
        found: dict[str, _Member] = {}
        self._walk(struct_id, 0, found, 0)
        return found

    def _walk(self, type_id: int, base_bits: int, found: dict[str, _Member], depth: int) -> None:
        if depth > _MAX_DEPTH:
            raise BtfError(f"{self.where}: corrupt BTF: anonymous members nested deeper than {_MAX_DEPTH}")
        _kind, vlen, kind_flag, _size, pos = self.record(type_id)
        for i in range(vlen):
            name_off, m_type, m_off = self._head.unpack_from(self.data, pos + 12 * i)
            bits, bitfield = (m_off & 0xFFFFFF, m_off >> 24 != 0) if kind_flag else (m_off, False)
            if name_off:
                name = self._string(name_off)
                # C forbids duplicate names across anonymous members; keep the first regardless.
                found.setdefault(name, _Member((base_bits + bits) // 8, m_type, bitfield or bits % 8 != 0))
                continue
            inner = self.strip(m_type) if m_type else 0
            if inner and self.record(inner)[0] in (STRUCT, UNION):
                self._walk(inner, base_bits + bits, found, depth + 1)


def _check(btf: _Btf, key: str, member: _Member) -> int:
    """The member's size, after checking it is what the BPF programs read it as."""
    expect = _EXPECT[key]
    if member.bitfield:
        raise BtfError(f"{btf.where}: {key} is a bitfield here; the BPF programs read it as whole bytes")
    stripped = btf.strip(member.type_id) if member.type_id else 0
    kind = btf.record(stripped)[0] if stripped else 0
    size = btf.size(member.type_id)
    if expect == "*":
        if kind != PTR:
            raise BtfError(f"{btf.where}: {key} is not a pointer in this kernel; the BPF programs "
                           "load it as one")
        return POINTER_SIZE
    if isinstance(expect, str):  # "struct X", embedded by value
        want = expect.split()[1]
        if kind != STRUCT or btf.name(stripped) != want:
            what = "a pointer" if kind == PTR else "another type"
            raise BtfError(f"{btf.where}: {key} is {what} in this kernel, not an embedded {expect}")
        return size or 0
    if size != expect:
        raise BtfError(f"{btf.where}: {key} is {size} bytes in this kernel; the BPF programs read "
                       f"{expect}")
    return size


def _resolve(data: bytes, where: str) -> tuple[dict[str, int], dict[str, int]]:
    """Offsets and sizes of every FIELD, from a BTF blob."""
    wanted: dict[str, list[str]] = {}
    for s, m in FIELDS:
        wanted.setdefault(s, []).append(m)
    btf = _Btf(data, set(wanted), where)
    chosen: dict[str, dict[str, _Member]] = {}
    for s, needed in wanted.items():
        candidates = btf.structs[s]
        if not candidates:
            raise BtfError(f"{where}: no struct {s} in the kernel's BTF")
        # Several structs may share a name (rare in vmlinux); the first with all we need wins.
        best: tuple[list[str], dict[str, _Member]] | None = None
        for type_id in candidates:
            members = btf.members(type_id)
            missing = [m for m in needed if m not in members]
            if best is None or len(missing) < len(best[0]):
                best = (missing, members)
            if not missing:
                break
        assert best is not None
        if best[0]:
            raise BtfError(f"{where}: struct {s} has no member {best[0][0]} in this kernel "
                           f"({s}.{best[0][0]} is needed by the BPF programs)")
        chosen[s] = best[1]
    offsets: dict[str, int] = {}
    sizes: dict[str, int] = {}
    for s, m in FIELDS:
        key, member = f"{s}.{m}", chosen[s][m]
        sizes[key] = _check(btf, key, member)
        offsets[key] = member.offset
    return offsets, sizes


# ----------------------------------------------------------------------------------------- cache
def _cache_key(kernel: str, size: int, sha256: str) -> str:
    fields = ",".join(f"{k}={v}" for k, v in _EXPECT.items())  # a changed FIELDS gets a new file
    material = f"{CACHE_FORMAT}\0{kernel}\0{size}\0{sha256}\0{fields}"
    return hashlib.sha256(material.encode()).hexdigest()[:32]


def _sizes_ok(sizes: dict[str, int]) -> bool:
    """The size checks again, for a cache file: an entry that would not pass parsing is not used."""
    for key, expect in _EXPECT.items():
        size = sizes[key]
        if (expect == "*" and size != POINTER_SIZE) or (isinstance(expect, int) and size != expect) \
                or size <= 0:
            return False
    return True


def _read_cache(path: Path, key: str, kernel: str) -> Layouts | None:
    """The cached layouts if the file is ours, well formed and for this very kernel; else None."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            # Someone else's or a writable-by-others file could feed the BPF programs wrong offsets.
            if not stat.S_ISREG(st.st_mode) or st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
                return None
            doc = json.loads(f.read(1 << 20))
        keys = [f"{s}.{m}" for s, m in FIELDS]
        offsets, sizes = doc["offsets"], doc["sizes"]
        if doc.get("format") != CACHE_FORMAT or doc.get("key") != key or doc.get("kernel") != kernel \
                or sorted(offsets) != sorted(keys) or sorted(sizes) != sorted(keys):
            return None
        if not all(type(v) is int and v >= 0 for v in (*offsets.values(), *sizes.values())):
            return None
        if not _sizes_ok(sizes):
            return None
        return Layouts({k: offsets[k] for k in keys}, {k: sizes[k] for k in keys}, kernel, cached=True)
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def _write_cache(cache_dir: Path, path: Path, doc: dict[str, object]) -> bool:
    """Write atomically (temp file, then rename), mode 0644, in a 0755 directory. False if the
    directory cannot be written: the layouts are still good, only not cached."""
    tmp: str | None = None
    try:
        if not cache_dir.is_dir():
            cache_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
            os.chmod(cache_dir, 0o755)  # mkdir's mode is masked by the umask
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=cache_dir)
        with os.fdopen(fd, "w") as f:
            os.fchmod(fd, 0o644)  # mkstemp makes it 0600
            json.dump(doc, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
        return True
    except OSError:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        return False


VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")


def kernel_layouts(btf: Path = VMLINUX_BTF,
                   cache_dir: Path = Path("/var/cache/ebpf-guard/btf")) -> Layouts:
    """The byte offsets and sizes of FIELDS in the running kernel, from the cache when it holds
    this very kernel build, else parsed from `btf` and cached. Raises BtfError (one line)."""
    try:
        data = btf.read_bytes()
    except FileNotFoundError:
        raise BtfError(f"{btf}: no such file: this kernel publishes no BTF "
                       "(built without CONFIG_DEBUG_INFO_BTF)") from None
    except OSError as e:
        raise BtfError(f"{btf}: cannot read: {e.strerror or e}") from None
    uname = os.uname()
    kernel = f"{uname.release} {uname.version}"
    sha256 = hashlib.sha256(data).hexdigest()
    key = _cache_key(kernel, len(data), sha256)
    path = cache_dir / f"{re.sub(r'[^A-Za-z0-9._+-]', '_', uname.release)}-{key}.json"  # the name tells a human
    cached = _read_cache(path, key, kernel)
    if cached is not None:
        return cached
    offsets, sizes = _resolve(data, str(btf))
    _write_cache(cache_dir, path, {"format": CACHE_FORMAT, "key": key, "kernel": kernel,
                                   "btf": str(btf), "btf_size": len(data),
                                   "btf_sha256": sha256,
                                   "offsets": offsets, "sizes": sizes})
    return Layouts(offsets, sizes, kernel, cached=False)
