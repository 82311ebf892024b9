"""cgroup v2 (and v1 freezer) plumbing: find the mount, resolve user input, create, freeze, kill.

Hosts differ: most are pure v2 at /sys/fs/cgroup, hybrid ones mount v2 at
/sys/fs/cgroup/unified. The mount is always read from /proc/self/mountinfo, never assumed.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


class CgroupError(Exception):
    """A cgroup problem, phrased as one line for the user."""


def _mounts(fstype: str) -> list[tuple[Path, str]]:
    """(mount point, super options) of every mount of `fstype`."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = right.split()
            if fields and fields[0] == fstype:
                found.append((Path(left.split()[4]), fields[2] if len(fields) > 2 else ""))
    return found


def find_v2_mount() -> Path:
    """The cgroup v2 mount point (e.g. /sys/fs/cgroup or /sys/fs/cgroup/unified)."""
    mounts = _mounts("cgroup2")
    if not mounts:
        raise CgroupError("no cgroup v2 filesystem is mounted (see `ebpf-guard doctor`)")
    # Prefer the shortest path: the host's own mount rather than a bind mount below it.
    return min((m for m, _ in mounts), key=lambda p: len(str(p)))


def create_cgroup(parent: Path, name: str) -> Path:
    path = parent / name
    try:
        path.mkdir()
    except FileExistsError as e:
        raise CgroupError(f"cgroup {path} already exists") from e
    except OSError as e:
        raise CgroupError(f"cannot create cgroup {path}: {e.strerror}") from e
    return path


def move_pid(path: Path, pid: int) -> None:
    (path / "cgroup.procs").write_text(f"{pid}\n")


def pids(path: Path, recursive: bool = True) -> list[int]:
    """Every pid in the cgroup (and, recursively, in its descendants)."""
    out: list[int] = []
    dirs = [path] if not recursive else [Path(d) for d, _, _ in os.walk(path)]
    for d in dirs:
        try:
            out.extend(int(x) for x in (d / "cgroup.procs").read_text().split())
        except FileNotFoundError:
            continue
    return out


def kill_cgroup(path: Path) -> None:
    """SIGKILL everything in the cgroup and its descendants."""
    kill_file = path / "cgroup.kill"
    if kill_file.exists():
        kill_file.write_text("1\n")
        return
    import signal

    for pid in pids(path):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def remove_cgroup(path: Path, timeout: float = 5.0) -> None:
    """Kill whatever is left in the cgroup tree, then remove it (deepest first)."""
    if not path.exists():
        return
    deadline = time.monotonic() + timeout
    while True:
        kill_cgroup(path)
        try:
            for d, _, _ in sorted(os.walk(path), key=lambda t: -len(t[0])):
                os.rmdir(d)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if time.monotonic() > deadline:
                raise CgroupError(f"cannot remove cgroup {path}: {e.strerror}") from e
            time.sleep(0.01)
