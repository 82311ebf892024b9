"""The one /proc parser, and the userspace model of watched processes built on it.

Model: cwd, exe and fd -> path, driven by kernel events. Why a model and not /proc: a
process that lives 1 ms (`cd ~/.ssh && cat id_rsa`) is gone before its events are decoded,
so /proc/PID/cwd is empty by then. With BTF the kernel reports what each fd, cwd and binary
really is (the events' real paths), and the model keeps those; without BTF it is the
fallback that gives a requested path its absolute form. The sensor replays what the kernel
reports, in timestamp order:

  fork          child inherits the parent's cwd and fd table
  chdir/fchdir  (emitted at syscall exit, only applied when ret == 0) sets cwd
  open          (emitted at syscall exit) records fd -> absolute path
  exit          drops the process

/proc is read only for processes the model has never seen being born (they existed before
attach, or entered a watched cgroup after forking outside it), and only as a fallback.
Paths are normalised lexically by `ebpf_guard.pathnames`, without touching the filesystem.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from ebpf_guard.pathnames import join, normalize

AT_FDCWD = -100
CLK_TCK = os.sysconf("SC_CLK_TCK")


def read_cwd(tgid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{tgid}/cwd")
    except OSError:
        return None


def read_exe(tgid: int) -> str:
    try:
        return os.readlink(f"/proc/{tgid}/exe")
    except OSError:
        return ""


def read_fd(tgid: int, fd: int) -> str | None:
    try:
        target = os.readlink(f"/proc/{tgid}/fd/{fd}")
    except OSError:
        return None
    # Sockets, pipes, anon inodes ("socket:[123]") are not directories to resolve against.
    return target if target.startswith("/") else None


def boot_to_monotonic_ns() -> int:
    """CLOCK_BOOTTIME - CLOCK_MONOTONIC: the time spent suspended."""
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME) - time.monotonic_ns()


def _stat_fields(pid: int) -> list[bytes] | None:
    """/proc/PID/stat from field 3 (state) on; None if the pid is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # comm may contain spaces and parentheses: split after the last ')'.
    return data[data.rfind(b")") + 2 :].split()


def state(pid: int) -> str | None:
    """The state letter of /proc/PID/stat (R, S, D, Z, X, ...); None if the pid is gone."""
    fields = _stat_fields(pid)
    return fields[0].decode() if fields else None


def start_ticks(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (start, clock ticks since boot); None if the pid is gone."""
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[19])


def ticks_to_ns(ticks: int) -> int:
    """Clock ticks (USER_HZ, the unit of /proc's times) -> ns."""
    return ticks * 1_000_000_000 // CLK_TCK


def ticks_to_monotonic_ns(ticks: int) -> int:
    """A /proc start time (clock ticks since boot, CLOCK_BOOTTIME) as CLOCK_MONOTONIC ns,
    bpf_ktime_get_ns's clock, which does not count suspend. Resolution: one tick."""
    return ticks_to_ns(ticks) - boot_to_monotonic_ns()


def read_stat(tgid: int) -> tuple[int, int] | None:
    """(ppid, start_ns) from /proc/PID/stat, start_ns on bpf_ktime_get_ns's clock.

    starttime is in clock ticks since boot (CLOCK_BOOTTIME); bpf_ktime_get_ns is
    CLOCK_MONOTONIC, which does not count suspend. Resolution: one tick (10 ms at HZ 100).
    """
    fields = _stat_fields(tgid)
    if fields is None:
        return None
    ppid = int(fields[1])
    start_ns = ticks_to_monotonic_ns(int(fields[19]))
    return ppid, max(start_ns, 0)


def alive(pid: int) -> bool:
    """Exists and has not exited (a zombie has run its exit already)."""
    st = state(pid)
    return st is not None and st not in ("Z", "X")


def _proc_table() -> dict[int, int]:
    """pid -> ppid of every process, from /proc."""
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = read_stat(int(name))
            if stat is not None:
                out[int(name)] = stat[0]
    return out


def descendants(roots: Iterable[int], table: dict[int, int] | None = None) -> set[int]:
    """The roots and every live descendant (by current ppid)."""
    table = _proc_table() if table is None else table
    children: dict[int, list[int]] = {}
    for pid, ppid in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, ()))
    return found


@dataclass(slots=True)
class ProcState:
    """What the model knows of one process: identity, cwd and open fds."""

    start_ns: int  # 0 = not yet known (a child seen only through its parent's fork)
    ppid: int
    cwd: str | None  # None = unknown
    fds: dict[int, str] = field(default_factory=dict)
    born_seen: bool = False  # fork observed: state is exact, /proc is never consulted
    last_seen_ns: int = 0
    exe: str = ""  # the program it runs: the kernel's real path at exec, else /proc/PID/exe


class ProcModel:
    """Owns the ProcState of every process seen (tgid -> state) and resolves their paths."""

    def __init__(self) -> None:
        self.procs: dict[int, ProcState] = {}

    def __len__(self) -> int:
        return len(self.procs)

    def seed(self, tgid: int) -> ProcState | None:
        """State of a running process from /proc (processes that predate attach)."""
        stat = read_stat(tgid)
        if stat is None:
            return None
        st = ProcState(start_ns=stat[1], ppid=stat[0], cwd=read_cwd(tgid), exe=read_exe(tgid))
        self.procs[tgid] = st
        return st

    def get(self, tgid: int, start_ns: int) -> ProcState:
        """The state of `tgid`, (re)built from /proc if unknown or stale (pid reused)."""
        st = self.procs.get(tgid)
        if st is not None:
            if st.start_ns == 0 and start_ns:
                st.start_ns = start_ns  # a forked child's first own event
            if not start_ns or not st.start_ns or st.start_ns == start_ns:
                return st
        st = self.seed(tgid) or ProcState(start_ns=start_ns, ppid=0, cwd=None)
        if start_ns:
            st.start_ns = start_ns
        self.procs[tgid] = st
        return st

    def fork(self, parent: ProcState, child_tgid: int, parent_tgid: int) -> None:
        self.procs[child_tgid] = ProcState(
            start_ns=0, ppid=parent_tgid, cwd=parent.cwd, fds=dict(parent.fds), born_seen=True,
            exe=parent.exe,
        )

    def exit(self, tgid: int) -> None:
        self.procs.pop(tgid, None)

    def dir_of(self, st: ProcState, tgid: int, dirfd: int) -> str | None:
        """The directory a dirfd (or AT_FDCWD) stands for."""
        if dirfd == AT_FDCWD:
            if st.cwd is None:
                st.cwd = read_cwd(tgid)  # fallback: may already be gone
            return st.cwd
        path = st.fds.get(dirfd)
        if path is None:
            # Not opened in our sight (inherited before attach, dup'ed, passed over a
            # socket): the live fd table is the best remaining source.
            path = read_fd(tgid, dirfd)
        return path

    def resolve(self, st: ProcState, tgid: int, dirfd: int, raw: str) -> str | None:
        if raw.startswith("/"):
            return normalize(raw)
        return join(self.dir_of(st, tgid, dirfd), raw)

    def prune(self, older_than_ns: int) -> int:
        """Drop processes not seen for a while that no longer exist (missed exits)."""
        stale = [
            t
            for t, st in self.procs.items()
            if st.last_seen_ns < older_than_ns and not os.path.exists(f"/proc/{t}")
        ]
        for t in stale:
            del self.procs[t]
        return len(stale)
