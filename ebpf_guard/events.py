"""The decoded event: what the sensor hands to the engine, the log, and `replay`.

The kernel-side layout is defined once in bpf/events.h; its ctypes mirror lives in this
module too (see `RawEvent`, added with the sensor). `Event` is the kernel-independent form:
plain fields, JSON round-trippable, so recorded streams replay through the engine unchanged.
"""

from __future__ import annotations

import ctypes as _ct
from dataclasses import dataclass, field, fields
from enum import Enum


class Kind(str, Enum):
    EXEC = "exec"
    OPEN = "open"
    UNLINK = "unlink"
    CONNECT = "connect"
    FORK = "fork"
    EXIT = "exit"
    CHDIR = "chdir"
    RENAME = "rename"  # rename/renameat/renameat2: raw_path -> dest_*
    LINK = "link"  # link/linkat: a new name (dest_*) for an existing file (raw_path)
    SYMLINK = "symlink"  # symlink/symlinkat: dest_* is the link made, raw_path its target text
    TRUNCATE = "truncate"  # truncate(path) / ftruncate(fd)
    MMAP_EXEC = "mmap_exec"  # mmap(PROT_EXEC) of a file: code loaded without an exec
    IO_URING = "io_uring"  # io_uring_setup: its opens bypass the syscall tracepoints
    PTRACE = "ptrace"  # ptrace(ATTACH | SEIZE) of target_pid; flags = the request


# Open access classes derived from the raw O_* flags.
READ, WRITE, CREATE, TRUNCATE = "read", "write", "create", "truncate"


@dataclass(slots=True)
class Event:
    kind: Kind
    ts_ns: int  # CLOCK_MONOTONIC ns (bpf_ktime_get_ns); the engine's only clock
    pid: int  # thread id
    tgid: int  # process id
    ppid: int  # parent process id, from the fork tracepoint (original parent)
    uid: int
    comm: str
    cgroup_id: int
    start_ns: int  # process start (monotonic ns): (tgid, start_ns) survives PID reuse
    # exec / open / unlink / chdir
    raw_path: str = ""  # path exactly as passed to the syscall
    path: str = ""  # absolute, resolved against dirfd / cwd ("" if unknown)
    # exec
    argv: tuple[str, ...] = ()
    argv_truncated: bool = False
    # open
    flags: int = 0  # raw O_* flags (open) or AT_* flags (unlink)
    access: frozenset[str] = frozenset()  # subset of {read, write, create, truncate}
    ret: int | None = None  # syscall result where the sensor reports it (fd or -errno)
    # unlink
    is_dir: bool = False  # unlinkat(AT_REMOVEDIR)
    # connect
    family: str = ""  # "ipv4" | "ipv6" | "unix"
    addr: str = ""  # IP address text, or unix socket path
    port: int = 0
    # fork
    child_pid: int = 0  # tgid of the new process
    # free-form annotations added by the sensor (e.g. "path_unresolved")
    notes: tuple[str, ...] = field(default_factory=tuple)
    # exec: the process's working directory, from the sensor's process model ("" if unknown);
    # what relative argv operands (`rm -r build`) mean.
    cwd: str = ""
    # What the kernel reached, walked in the kernel from the object with BTF layouts (see
    # docs/sensor.md); "" where the host has no BTF or the syscall failed before an object.
    #   open, truncate(fd), mmap_exec: the file itself; exec: the binary that runs;
    #   chdir: the new cwd; unlink/rename/link/symlink/truncate(path): the real path of the
    #   dirfd (or cwd) joined with the requested name.
    real_path: str = ""
    # The walk hit a bound (depth or buffer): real_path holds only the deepest part,
    # as "…/a/b". A cut path is never judged harmless.
    path_cut: bool = False
    dev: int = 0  # st_dev of the object (open, exec, mmap_exec, truncate(fd)); 0 = unknown
    ino: int = 0  # its inode number; 0 = unknown
    # rename/link: the new name; symlink: the link created (raw_path is the target text)
    dest_raw_path: str = ""
    dest_path: str = ""
    dest_real_path: str = ""
    # Every event: the process's executable as the kernel resolved it at its exec (or
    # /proc/PID/exe for a process seeded at attach); "" if unknown.
    exe: str = ""
    # exec: sha256 of the binary that runs (read through /proc/PID/exe by the sensor).
    exe_sha256: str = ""
    # exec: argv with every operand (not argv[0], not an option) made absolute against cwd
    # and symlink-resolved by the sensor at exec time; "" where argv has an option or argv[0].
    real_args: tuple[str, ...] = ()
    target_pid: int = 0  # ptrace: the process asked for
    via: str = ""  # connect: "connect", "sendto" or "sendmsg" (a destination without connect)
    # connect: the socket's protocol as the kernel knows it: "tcp", "udp", "raw", "icmp", "sctp" (inet), or
    # "stream", "dgram", "seqpacket" (unix); "" unknown.
    protocol: str = ""
    # open: this open created the file (FMODE_CREATED); an O_TRUNC open that did not create
    # it emptied an existing file.
    created: bool = False

    @property
    def proc_key(self) -> tuple[int, int]:
        """Identity of the process that survives PID reuse."""
        return (self.tgid, self.start_ns)

    def to_dict(self) -> dict:
        # Field by field, not dataclasses.asdict (a deep copy): this runs for every recorded
        # event and for every event in an incident file.
        d = {name: getattr(self, name) for name in _FIELDS}
        d["kind"] = self.kind.value
        d["access"] = sorted(self.access)
        d["argv"] = list(self.argv)
        d["notes"] = list(self.notes)
        d["real_args"] = list(self.real_args)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Event:
        d = dict(d)
        d["kind"] = Kind(d["kind"])
        d["access"] = frozenset(d.get("access", ()))
        d["argv"] = tuple(d.get("argv", ()))
        d["notes"] = tuple(d.get("notes", ()))
        d["real_args"] = tuple(d.get("real_args", ()))
        return cls(**d)


_FIELDS = tuple(f.name for f in fields(Event))


# --- Kernel event layout: the ctypes mirror of bpf/events.h --------------------------------
# Keep in step with bpf/events.h. The sensor passes these sizes to the compiler and
# bpf/sensor.c static-asserts them, so a mismatch fails at load time, not at decode time.

COMM_LEN = 16
PATH_LEN = 256
ARG_LEN = 256
MAX_ARGS = 16
NAME_LEN = 64
UNIX_PATH_LEN = 108
MAX_CGROUPS = 8
REAL_LEN = 512
STRS_LEN = 2048
RATE_SLOTS = 64  # EG_RATE_SLOTS: the kernel's deletion-rate ring; the highest count it can judge

# ev_hdr.kind codes, in Kind order.
KIND_CODES: dict[int, Kind] = {i + 1: k for i, k in enumerate(Kind)}

# ev_hdr.flags
F_KILLED = 0x1
F_ARGV_TRUNC = 0x2
F_PATH_TRUNC = 0x4
F_NO_PROC = 0x8
F_TRACKED = 0x10
F_HELD = 0x20
F_REAL = 0x40
F_REAL_CUT = 0x80
F_REAL2 = 0x100
F_REAL2_CUT = 0x200
F_SENDTO = 0x400
F_SENDMSG = 0x800
F_BY_INODE = 0x1000
F_RATE_HELD = 0x2000
F_CREATED = 0x4000  # open: FMODE_CREATED at exit (Event.created)
F_NOTHING_CUT = 0x8000  # ftruncate: no bytes past the new length at entry (NOTE_NOTHING_CUT)

# exec_names / exec_paths map values (EG_EXEC_*)
EXEC_KILL = 1
EXEC_HOLD = 2

# Event.notes values the sensor adds.
NOTE_KILLED = "killed_in_kernel"  # exec: SIGKILL sent at syscall entry; the program never ran
NOTE_HELD = "held_in_kernel"  # exec: SIGSTOP sent at syscall entry; stopped until decided
NOTE_RATE_HELD = "rate_held_in_kernel"  # unlink: the kernel's rate rule stopped the deleter (held)
NOTE_UNRESOLVED = "path_unresolved"  # relative path whose base (cwd/dirfd) was unknown
NOTE_PATH_TRUNCATED = "path_truncated"  # the kernel path buffer filled up (PATH_LEN)
NOTE_PROC_UNKNOWN = "proc_unknown"  # ppid/start_ns not known (process gone before /proc read)
# ftruncate: the kernel saw no bytes past the new length when the call began: nothing was cut.
# Its absence proves nothing (no BTF, truncate(path), or bytes were cut).
NOTE_NOTHING_CUT = "nothing_cut"


class RawEvent(_ct.Structure):
    """struct ev_hdr: the prefix of every kernel event."""

    _fields_ = [
        ("ts_ns", _ct.c_uint64),
        ("cgroup_id", _ct.c_uint64),
        ("start_ns", _ct.c_uint64),
        ("ret", _ct.c_int64),
        ("pid", _ct.c_uint32),
        ("tgid", _ct.c_uint32),
        ("ppid", _ct.c_uint32),
        ("uid", _ct.c_uint32),
        ("kind", _ct.c_uint32),
        ("flags", _ct.c_uint32),
        ("fd", _ct.c_int32),
        ("sc_flags", _ct.c_uint32),
        ("child_pid", _ct.c_uint32),
        ("path_len", _ct.c_uint32),
        ("comm", _ct.c_char * COMM_LEN),
    ]


class RawObject(_ct.Structure):
    """struct ev_obj: an object's identity resolved in the kernel."""

    _fields_ = [
        ("dev", _ct.c_uint64),  # kernel dev_t encoding
        ("ino", _ct.c_uint64),
        ("real_len", _ct.c_uint32),
        ("real2_len", _ct.c_uint32),
    ]


class RawPathEvent(_ct.Structure):
    """struct ev_path: the path kinds; strs packs path, path2, real, real2."""

    _fields_ = [
        ("h", RawEvent),
        ("obj", RawObject),
        ("path2_len", _ct.c_uint32),
        ("_pad", _ct.c_uint32),
        ("strs", _ct.c_char * STRS_LEN),
    ]


class RawExecEvent(_ct.Structure):
    """struct ev_exec."""

    _fields_ = [
        ("h", RawEvent),
        ("obj", RawObject),
        ("real", _ct.c_char * REAL_LEN),
        ("cwd", _ct.c_char * REAL_LEN),
        ("path", _ct.c_char * PATH_LEN),
        ("argc", _ct.c_uint32),
        ("_pad", _ct.c_uint32),
        ("argv", (_ct.c_char * ARG_LEN) * MAX_ARGS),
    ]


class RawConnectEvent(_ct.Structure):
    """struct ev_connect."""

    _fields_ = [
        ("h", RawEvent),
        ("family", _ct.c_uint16),
        ("port", _ct.c_uint16),  # network byte order
        ("addrlen", _ct.c_uint32),
        ("addr", _ct.c_uint8 * 16),
        ("unix_path", _ct.c_char * UNIX_PATH_LEN),
        ("sk_family", _ct.c_uint8),  # the socket behind fd (BTF); 0 = unknown
        ("sk_type", _ct.c_uint8),
        ("sk_protocol", _ct.c_uint16),
    ]
