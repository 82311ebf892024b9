"""cgroup v2 (and v1 freezer) plumbing: find the mount, resolve user input, create, freeze, kill.

Hosts differ: most are pure v2 at /sys/fs/cgroup, hybrid ones mount v2 at
/sys/fs/cgroup/unified and keep the v1 controllers (including `freezer`) beside it. Every mount
point is read from /proc/self/mountinfo, never assumed.

Freezing comes in two flavours behind one `Freezer` interface: v2 `cgroup.freeze` (kernel >= 5.2)
and, where the v2 hierarchy cannot freeze, a v1 `freezer` cgroup we create and move the
processes into (v1 and v2 memberships are independent, so this does not disturb the v2 cgroup
the sensor watches).
"""

from __future__ import annotations

import os
import select
import signal
import time
import uuid
from pathlib import Path

V1_FREEZER_PREFIX = "ebpf-guard-"
RUN_CGROUP_PREFIX = "ebpf-guard-run-"


class CgroupError(Exception):
    """A cgroup problem, phrased as one line for the user."""


# --- mounts --------------------------------------------------------------------------------


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


def find_v1_mount(controller: str) -> Path | None:
    """The mount point of a v1 hierarchy carrying `controller` (e.g. "freezer"), if any."""
    mounts = [m for m, opts in _mounts("cgroup") if controller in opts.split(",")]
    return min(mounts, key=lambda p: len(str(p))) if mounts else None


# --- naming and lookup ---------------------------------------------------------------------


def resolve_cgroup(spec: str) -> Path:
    """Turn user input into a v2 cgroup directory.

    Accepted: a directory in the v2 filesystem (/sys/fs/cgroup/unified/foo), a cgroup path as
    /proc/PID/cgroup prints it (/foo/bar, relative to the v2 root), or that file's whole
    line ("0::/foo/bar").
    """
    root = find_v2_mount()
    text = spec.strip()
    if text.startswith("0::"):
        text = text[3:]
    if not text:
        raise CgroupError("empty cgroup name")
    given = Path(os.path.normpath(text))
    if given == root or root in given.parents:
        path, shown = given, "/" + str(given.relative_to(root)).lstrip(".")
    else:
        for v1, _ in _mounts("cgroup"):
            if given == v1 or v1 in given.parents:
                raise CgroupError(
                    f"{given} is in a cgroup v1 hierarchy; give a cgroup v2 path (under {root})"
                )
        # A real directory under /sys is a filesystem path, just not a v2 one: say so.
        if given.parts[:2] == ("/", "sys") and given.is_dir():
            raise CgroupError(f"{given} is not in the cgroup v2 filesystem (mounted at {root})")
        # normpath above already folded "..", so "/../etc" cannot climb out of the root.
        rel = os.path.normpath("/" + text).lstrip("/")
        path, shown = (root / rel if rel else root), "/" + rel
    if not (path / "cgroup.procs").is_file():
        raise CgroupError(f"cgroup {shown} does not exist (looked in {path})")
    return path


def cgroup_id(path: Path) -> int:
    """The cgroup's id as BPF sees it (bpf_get_current_cgroup_id): the directory's inode."""
    try:
        return os.stat(path).st_ino
    except OSError as e:
        raise CgroupError(f"cannot stat cgroup {path}: {e.strerror}") from e


def cgroup_of_pid(pid: int) -> Path:
    """The v2 cgroup directory `pid` lives in (from the "0::" line of /proc/PID/cgroup)."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except (FileNotFoundError, ProcessLookupError) as e:
        raise CgroupError(f"no process {pid}") from e
    for line in lines:
        if line.startswith("0::"):
            rel = line[3:].removesuffix(" (deleted)").lstrip("/")
            return find_v2_mount() / rel if rel else find_v2_mount()
    raise CgroupError(f"process {pid} is not in a cgroup v2 hierarchy")


def is_within(path: Path, ancestor: Path) -> bool:
    """True if cgroup `path` is `ancestor` or one of its descendants."""
    return path == ancestor or ancestor in path.parents


# --- membership ----------------------------------------------------------------------------


def create_cgroup(parent: Path, name: str) -> Path:
    path = parent / name
    try:
        path.mkdir()
    except FileExistsError as e:
        raise CgroupError(f"cgroup {path} already exists") from e
    except OSError as e:
        raise CgroupError(f"cannot create cgroup {path}: {e.strerror}") from e
    return path


def create_run_cgroup(parent: Path | None = None) -> Path:
    """A fresh, uniquely named cgroup for `ebpf-guard run`, under `parent` or the v2 root.

    Why the root by default: on systemd hosts our own cgroup is usually a leaf with processes
    in it and controllers enabled below its parent, and the "no internal processes" rule then
    refuses to put processes into a child of it (EBUSY on cgroup.procs). The root cgroup is
    exempt from that rule, so a child of the root always accepts the agent.
    """
    base = parent if parent is not None else find_v2_mount()
    return create_cgroup(base, f"{RUN_CGROUP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def move_pid(path: Path, pid: int) -> None:
    try:
        (path / "cgroup.procs").write_text(f"{pid}\n")
    except OSError as e:
        raise CgroupError(f"cannot move pid {pid} into {path}: {e.strerror}") from e


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


def _events(path: Path) -> dict[str, int]:
    """cgroup.events as a dict, e.g. {"populated": 1, "frozen": 0}."""
    try:
        text = (path / "cgroup.events").read_text()
    except OSError as e:
        raise CgroupError(f"cannot read {path}/cgroup.events: {e.strerror}") from e
    return {k: int(v) for k, v in (line.split() for line in text.splitlines() if line.strip())}


def _wait_event(path: Path, key: str, want: int, timeout: float) -> bool:
    """Wait until cgroup.events shows `key want`, waking on kernfs notifications.

    poll(2) on cgroup.events reports POLLPRI when the file changes; we still re-read at least
    every 50 ms so a missed wake-up costs latency, not correctness.
    """
    deadline = time.monotonic() + timeout
    try:
        fd = os.open(path / "cgroup.events", os.O_RDONLY)
    except OSError as e:
        raise CgroupError(f"cannot open {path}/cgroup.events: {e.strerror}") from e
    try:
        poller = select.poll()
        poller.register(fd, select.POLLPRI | select.POLLERR)
        while True:
            text = os.pread(fd, 4096, 0).decode()
            if f"{key} {want}" in text.splitlines():
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            poller.poll(min(left, 0.05) * 1000)
    finally:
        os.close(fd)


def is_populated(path: Path) -> bool:
    """True while any live process is in the cgroup or its descendants."""
    return _events(path).get("populated", 0) == 1


def wait_empty(path: Path, timeout: float) -> bool:
    """Wait until nothing lives in the cgroup tree; False on timeout."""
    if not path.exists():
        return True
    return _wait_event(path, "populated", 0, timeout)


# --- v2 freeze -----------------------------------------------------------------------------


def _write_freeze(path: Path, value: str) -> None:
    f = path / "cgroup.freeze"
    if not f.exists():
        raise CgroupError(f"{path} cannot be frozen (no cgroup.freeze: kernel < 5.2 or the root)")
    try:
        f.write_text(value)
    except OSError as e:
        raise CgroupError(f"cannot write {f}: {e.strerror}") from e


def freeze(path: Path) -> None:
    """Ask the kernel to freeze the cgroup tree. Asynchronous: see wait_frozen."""
    _write_freeze(path, "1\n")


def thaw(path: Path) -> None:
    _write_freeze(path, "0\n")


def is_frozen(path: Path) -> bool:
    """True once every task in the tree has actually stopped (not merely been asked to)."""
    return _events(path).get("frozen", 0) == 1


def wait_frozen(path: Path, timeout: float) -> bool:
    """Wait until the freeze has taken effect; False on timeout."""
    return _wait_event(path, "frozen", 1, timeout)


# --- kill and remove -----------------------------------------------------------------------


def _sigkill_all(pid_list: list[int]) -> None:
    for pid in pid_list:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _freeze_and_kill(path: Path, timeout: float = 2.0) -> None:
    """Kill without cgroup.kill: freeze first so nothing forks between listing and signalling."""
    frozen = False
    if (path / "cgroup.freeze").exists():
        freeze(path)
        frozen = wait_frozen(path, timeout)
    try:
        # Frozen: one pass sees everyone. Not frozen (old kernel): repeat until nothing is left.
        deadline = time.monotonic() + timeout
        while True:
            _sigkill_all(pids(path))
            if frozen or not pids(path) or time.monotonic() > deadline:
                break
            time.sleep(0.005)
    finally:
        if (path / "cgroup.freeze").exists():
            # SIGKILL still wakes a v2-frozen task, but thaw anyway so nothing lingers frozen.
            thaw(path)


def kill_cgroup(path: Path) -> None:
    """SIGKILL everything in the cgroup and its descendants (does not wait for them to exit)."""
    kill_file = path / "cgroup.kill"
    if kill_file.exists():
        try:
            kill_file.write_text("1\n")
        except OSError as e:
            raise CgroupError(f"cannot write {kill_file}: {e.strerror}") from e
        return
    _freeze_and_kill(path)


def _rmdir_tree(path: Path, deadline: float) -> bool:
    """One attempt at removing a cgroup directory tree, deepest first. True when it is gone;
    False to retry (a dying process still holds it); raises once `deadline` has passed."""
    try:
        for d, _, _ in sorted(os.walk(path), key=lambda t: -len(t[0])):
            os.rmdir(d)
        return True
    except FileNotFoundError:
        return True
    except OSError as e:
        if time.monotonic() > deadline:
            raise CgroupError(f"cannot remove cgroup {path}: {e.strerror}") from e
        time.sleep(0.01)
        return False


def remove_cgroup(path: Path, timeout: float = 5.0) -> None:
    """Kill whatever is left in the cgroup tree, then remove it (deepest first)."""
    if not path.exists():
        return
    deadline = time.monotonic() + timeout
    while True:
        kill_cgroup(path)
        wait_empty(path, max(0.0, min(1.0, deadline - time.monotonic())))
        if _rmdir_tree(path, deadline):
            return


# --- Freezer: one interface over v2 cgroup.freeze and the v1 freezer -------------------------


class Freezer:
    """Freeze, thaw and kill one group of processes. `path` is what the user passes back to
    `ebpf-guard resume|kill --cgroup`."""

    path: Path

    def freeze(self) -> None:
        raise NotImplementedError

    def thaw(self) -> None:
        raise NotImplementedError

    def is_frozen(self) -> bool:
        raise NotImplementedError

    def wait_frozen(self, timeout: float) -> bool:
        raise NotImplementedError

    def kill(self) -> None:
        raise NotImplementedError

    def pids(self) -> list[int]:
        return pids(self.path)

    def adopt(self, pid: int) -> None:
        """Put `pid` under this freezer. Safe in a preexec_fn (only writes one file)."""
        move_pid(self.path, pid)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"


class V2Freezer(Freezer):
    def __init__(self, path: Path) -> None:
        self.path = path

    def freeze(self) -> None:
        freeze(self.path)

    def thaw(self) -> None:
        thaw(self.path)

    def is_frozen(self) -> bool:
        return is_frozen(self.path)

    def wait_frozen(self, timeout: float) -> bool:
        return wait_frozen(self.path, timeout)

    def kill(self) -> None:
        kill_cgroup(self.path)

    def adopt(self, pid: int) -> None:
        # Idempotent: `run` already wrote the child into this cgroup; a no-op then.
        if pid not in pids(self.path, recursive=False):
            move_pid(self.path, pid)


class V1Freezer(Freezer):
    """A cgroup in the v1 `freezer` hierarchy: freezer.state is THAWED, FREEZING or FROZEN."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(cls, name: str | None = None) -> V1Freezer:
        mount = find_v1_mount("freezer")
        if mount is None:
            raise CgroupError("cannot freeze: no cgroup v2 freezer and no v1 freezer mounted")
        name = name or uuid.uuid4().hex[:10]
        path = mount / f"{V1_FREEZER_PREFIX}{name}"
        if not path.is_dir():
            create_cgroup(mount, path.name)
        return cls(path)

    def _state(self) -> str:
        try:
            return (self.path / "freezer.state").read_text().strip()
        except OSError as e:
            raise CgroupError(f"cannot read {self.path}/freezer.state: {e.strerror}") from e

    def _set_state(self, state: str) -> None:
        try:
            (self.path / "freezer.state").write_text(state + "\n")
        except OSError as e:
            raise CgroupError(f"cannot write {self.path}/freezer.state: {e.strerror}") from e

    def freeze(self) -> None:
        self._set_state("FROZEN")

    def thaw(self) -> None:
        self._set_state("THAWED")

    def is_frozen(self) -> bool:
        return self._state() == "FROZEN"

    def wait_frozen(self, timeout: float) -> bool:
        # freezer.state is not pollable; it reads FREEZING until every task has stopped.
        # Re-writing FROZEN retries tasks that were busy in the kernel on the first attempt.
        deadline = time.monotonic() + timeout
        while self._state() != "FROZEN":
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
            self._set_state("FROZEN")
        return True

    def kill(self, timeout: float = 2.0) -> None:
        # Freeze so nothing forks between listing and signalling; v1-frozen tasks only die
        # once thawed, so the SIGKILLs are queued and delivered on thaw.
        self.freeze()
        self.wait_frozen(timeout)
        _sigkill_all(self.pids())
        self.thaw()

    def release(self, timeout: float = 5.0) -> None:
        """Thaw, hand the processes back to the freezer root, and remove this cgroup: what
        `watch` does on exit, leaving the watched processes as it found them."""
        self.thaw()
        for pid in self.pids():
            try:
                move_pid(self.path.parent, pid)
            except CgroupError:
                pass  # exited meanwhile
        deadline = time.monotonic() + timeout
        while not _rmdir_tree(self.path, deadline):
            pass

    def remove(self, timeout: float = 5.0) -> None:
        """Kill what is left and remove the freezer cgroup (and any children)."""
        if not self.path.exists():
            return
        deadline = time.monotonic() + timeout
        while True:
            if self.pids():
                self.kill()
            if _rmdir_tree(self.path, deadline):
                return


def can_freeze_v2(path: Path | None) -> bool:
    return path is not None and (path / "cgroup.freeze").exists()


def freezer_for(cgroup: Path | None, pid: int | None = None) -> Freezer:
    """The best freezer for a watched v2 cgroup, falling back to a v1 freezer cgroup.

    v2 when `cgroup` can freeze. Otherwise a v1 freezer cgroup named after the v2 cgroup (or a
    random name) is created, and `pid` plus everything already in `cgroup` is moved into it;
    their future children inherit the v1 membership. `run` passes its child as `pid`.
    """
    if cgroup is not None:
        root = find_v2_mount()
        if cgroup == root:
            raise CgroupError(f"refusing to freeze the root cgroup {root} (the whole host)")
        if is_within(cgroup_of_pid(os.getpid()), cgroup):
            raise CgroupError(f"cgroup {cgroup} contains ebpf-guard itself: freezing it would "
                              "freeze the guard; watch a cgroup that holds only the agent")
        if can_freeze_v2(cgroup):
            return V2Freezer(cgroup)
    fz = V1Freezer.create(cgroup.name if cgroup is not None else None)
    members = pids(cgroup) if cgroup is not None else []
    for p in [*members, *([pid] if pid is not None else [])]:
        try:
            fz.adopt(p)
        except CgroupError:
            if Path(f"/proc/{p}").exists():  # a process that exited meanwhile is no loss
                raise
    return fz


def freezer_at(spec: str | Path) -> Freezer:
    """The freezer for a path the user passes back (`ebpf-guard resume|kill --cgroup`):
    a v1 freezer directory we printed, or any v2 cgroup spec `resolve_cgroup` accepts."""
    given = Path(os.path.normpath(str(spec).strip()))
    v1 = find_v1_mount("freezer")
    if v1 is not None and v1 in given.parents:
        if not (given / "freezer.state").is_file():
            raise CgroupError(f"freezer cgroup {given} does not exist")
        return V1Freezer(given)
    return V2Freezer(resolve_cgroup(str(spec)))
