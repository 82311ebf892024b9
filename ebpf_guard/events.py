"""The decoded event: what the sensor hands to the engine, the log, and `replay`.

The kernel-side layout is defined once in bpf/events.h; its ctypes mirror lives in this
module too (see `RawEvent`, added with the sensor). `Event` is the kernel-independent form:
plain fields, JSON round-trippable, so recorded streams replay through the engine unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum


class Kind(str, Enum):
    EXEC = "exec"
    OPEN = "open"
    UNLINK = "unlink"
    CONNECT = "connect"
    FORK = "fork"
    EXIT = "exit"
    CHDIR = "chdir"


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

    @property
    def proc_key(self) -> tuple[int, int]:
        """Identity of the process that survives PID reuse."""
        return (self.tgid, self.start_ns)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["kind"] = self.kind.value
        d["access"] = sorted(self.access)
        d["argv"] = list(self.argv)
        d["notes"] = list(self.notes)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Event:
        d = dict(d)
        d["kind"] = Kind(d["kind"])
        d["access"] = frozenset(d.get("access", ()))
        d["argv"] = tuple(d.get("argv", ()))
        d["notes"] = tuple(d.get("notes", ()))
        return cls(**d)
