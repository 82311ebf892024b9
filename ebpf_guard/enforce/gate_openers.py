"""Who is asking a gate: whether the opener is watched, the flags of its open, and who it is.

Read from /proc while the opener waits in the kernel for the gate's answer.

- Open flags: fanotify does not report the access mode. `proc_open_flags` reads
  /proc/TID/syscall, which holds the registers of the syscall the opener is blocked in while it
  waits for our answer (the flags come from registers, so another thread cannot rewrite them;
  openat2's flags live in user memory and count as unknown). Unknown flags deny a write gate.
- Who is watched: `watched_by_cgroup`. A thread whose /proc entry is gone (killed while it
  waited) counts as watched: it cannot read anything any more, so denying it is harmless.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

from ebpf_guard.enforce import cgroups
from ebpf_guard.enforce.gate_plan import GateError

WRITE_FLAGS = os.O_ACCMODE | os.O_CREAT | os.O_TRUNC  # O_ACCMODE: write-only, read-write, and 3


def watched_by_cgroup(cgroup_path: Path) -> Callable[[int], bool]:
    """is_watched(tid): the thread's v2 cgroup is `cgroup_path` or beneath it (compared as
    /proc/TID/cgroup names it: the v2 mount is looked up once, not per opener). A thread that is
    gone, or outside our pid namespace (tid 0), counts as watched (see the module doc)."""
    root = cgroups.find_v2_mount()
    watched = Path(os.path.normpath(cgroup_path))
    if not cgroups.is_within(watched, root):
        raise GateError(f"{cgroup_path} is not in the cgroup v2 filesystem (mounted at {root})")
    rel = "" if watched == root else str(watched.relative_to(root))

    def is_watched(tid: int) -> bool:
        if tid <= 0:
            return True
        try:
            mine = cgroups.v2_cgroup_rel(tid)
        except cgroups.CgroupError:
            return True  # gone
        if mine is None:
            raise GateError(f"thread {tid} is in no cgroup v2 hierarchy")
        return not rel or mine == rel or mine.startswith(rel + "/")

    return is_watched


# syscall number -> index of the flags argument, per architecture; exec counts as read-only.
_OPEN_FLAG_ARG = {
    "x86_64": {2: 1, 257: 2, 304: 2},  # open, openat, open_by_handle_at
    "aarch64": {56: 2, 265: 2},  # openat, open_by_handle_at
}
_CREAT = {"x86_64": 85}
_EXECS = {"x86_64": (59, 322), "aarch64": (221, 281)}
_ARCH = platform.machine()


def proc_open_flags(tid: int) -> int | None:
    """The open(2) flags of the syscall thread `tid` is blocked in, from /proc/TID/syscall (its
    number and register arguments); None if unknown (not an open we know, openat2, gone).
    A 32-bit (compat) task reports its own numbers: none of them is an x86_64 open, so unknown."""
    call = _syscall_of(tid)
    if call is None:
        return None
    nr, args = call
    if nr in _EXECS.get(_ARCH, ()):
        return os.O_RDONLY
    if nr == _CREAT.get(_ARCH):
        return os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    index = _OPEN_FLAG_ARG.get(_ARCH, {}).get(nr)
    return None if index is None else args[index] & 0xFFFFFFFF


# A permission event can reach the gate before its opener has gone to sleep waiting for the
# answer; until then /proc/TID/syscall says "running". The opener blocks within microseconds.
_RUNNING_RETRIES = 400
_RUNNING_PAUSE_S = 25e-6


def _syscall_of(tid: int) -> tuple[int, list[int]] | None:
    """(number, register arguments) of the syscall `tid` is blocked in, from /proc/TID/syscall;
    None when gone, still "running" after the retries, or a kernel thread (io_uring workers)."""
    for _ in range(_RUNNING_RETRIES):
        fields = _read_syscall_file(tid)
        if fields is None:
            return None
        if fields[:1] != [b"running"]:
            break
        time.sleep(_RUNNING_PAUSE_S)
    else:
        return None
    try:
        return int(fields[0]), [int(a, 16) for a in fields[1:7]]
    except (ValueError, IndexError):
        return None


def _read_syscall_file(tid: int) -> list[bytes] | None:
    try:
        fd = os.open(f"/proc/{tid}/syscall", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, 512).split()
    except OSError:
        return None
    finally:
        os.close(fd)


def execing(tid: int) -> bool:
    """Is `tid` inside execve/execveat (its open of the program is the exec's own)?"""
    call = _syscall_of(tid)
    return call is not None and call[0] in _EXECS.get(_ARCH, ())


def opens_for_write(flags: int | None) -> bool:
    """Write, read-write, create or truncate; unknown flags count as write (fail closed)."""
    return flags is None or bool(flags & WRITE_FLAGS)


def who_is(tid: int) -> tuple[int, int, str]:
    """(tgid, uid, comm) of a thread waiting for our answer: read now, it may exit right after."""
    uid, comm = -1, ""
    with suppress(OSError):
        uid = os.stat(f"/proc/{tid}").st_uid
        with open(f"/proc/{tid}/comm", "rb") as f:
            comm = f.read().strip().decode(errors="replace")
    return tgid_of(tid), uid, comm


def tgid_of(tid: int) -> int:
    try:
        with open(f"/proc/{tid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Tgid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return tid
