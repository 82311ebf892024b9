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

import json
import os
import select
import signal
import time
import uuid
from pathlib import Path

V1_FREEZER_PREFIX = "ebpf-guard-"
RUN_CGROUP_PREFIX = "ebpf-guard-run-"
WATCH_CGROUP_PREFIX = "ebpf-guard-watch-"  # `watch --pid` on pure v2: the tree's own cgroup
# The mark on every cgroup ebpf-guard creates or watches. A trusted.* xattr: only CAP_SYS_ADMIN
# can set or read it, so an agent with the user's rights can neither forge nor remove it; it
# lives and dies with the cgroup, so it survives a guard crash (the operator's `kill` still works).
MARK_XATTR = "trusted.ebpf-guard"
ROLE_CREATED = "created"  # ebpf-guard made this cgroup (`run`, the v1 freezer): ours to remove
ROLE_WATCHED = "watched"  # `watch --cgroup` names it: ours to freeze and kill, not to remove


class CgroupError(Exception):
    """A cgroup problem, phrased as one line for the user."""


class ScopeError(CgroupError):
    """A cgroup or process ebpf-guard refuses to act on: outside what it may touch."""


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


def v2_cgroup_rel(pid: int) -> str | None:
    """`pid`'s v2 cgroup as /proc/PID/cgroup's "0::" line names it, relative to the v2 root
    ("" for the root itself); None if it is in no v2 hierarchy. CgroupError if the process is
    gone. Lean on purpose: the fanotify gate asks it for every unwatched opener of a marked file."""
    try:
        fd = os.open(f"/proc/{pid}/cgroup", os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError) as e:
        raise CgroupError(f"no process {pid}") from e
    try:
        data = os.read(fd, 65536)
    finally:
        os.close(fd)
    for line in data.split(b"\n"):
        if line.startswith(b"0::"):
            return os.fsdecode(line[3:].removesuffix(b" (deleted)").strip(b"/"))
    return None


def cgroup_of_pid(pid: int) -> Path:
    """The v2 cgroup directory `pid` lives in (from the "0::" line of /proc/PID/cgroup)."""
    rel = v2_cgroup_rel(pid)
    if rel is None:
        raise CgroupError(f"process {pid} is not in a cgroup v2 hierarchy")
    return find_v2_mount() / rel if rel else find_v2_mount()


def is_within(path: Path, ancestor: Path) -> bool:
    """True if cgroup `path` is `ancestor` or one of its descendants."""
    return path == ancestor or ancestor in path.parents


# --- membership ----------------------------------------------------------------------------


def create_cgroup(parent: Path, name: str, *, mark_created: bool = False) -> Path:
    """mkdir a cgroup; with `mark_created` it carries ebpf-guard's mark (see `mark`)."""
    path = parent / name
    try:
        path.mkdir()
    except FileExistsError as e:
        raise CgroupError(f"cgroup {path} already exists") from e
    except OSError as e:
        raise CgroupError(f"cannot create cgroup {path}: {e.strerror}") from e
    if mark_created:
        try:
            mark(path, ROLE_CREATED)
        except CgroupError:
            os.rmdir(path)
            raise
    return path


def create_run_cgroup(parent: Path | None = None) -> Path:
    """A fresh, uniquely named cgroup for `ebpf-guard run`, under `parent` or the v2 root.

    Why the root by default: on systemd hosts our own cgroup is usually a leaf with processes
    in it and controllers enabled below its parent, and the "no internal processes" rule then
    refuses to put processes into a child of it (EBUSY on cgroup.procs). The root cgroup is
    exempt from that rule, so a child of the root always accepts the agent.
    """
    base = parent if parent is not None else find_v2_mount()
    return create_cgroup(base, f"{RUN_CGROUP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}",
                         mark_created=True)


# --- scope: what ebpf-guard may touch --------------------------------------------------------


def mark(path: Path, role: str) -> None:
    """Mark `path` as ebpf-guard's (`ROLE_CREATED` or `ROLE_WATCHED`), with who and when."""
    value = json.dumps({"role": role, "pid": os.getpid(), "at": int(time.time())}).encode()
    try:
        os.setxattr(path, MARK_XATTR, value)
    except OSError as e:
        raise CgroupError(f"cannot mark cgroup {path} ({MARK_XATTR}): {e.strerror}") from e


def marked_role(path: Path) -> str | None:
    """The role ebpf-guard marked `path` with, or None when it is not ebpf-guard's."""
    try:
        value = json.loads(os.getxattr(path, MARK_XATTR))
    except (OSError, ValueError):
        return None
    role = value.get("role") if isinstance(value, dict) else None
    return role if role in (ROLE_CREATED, ROLE_WATCHED) else None


def unmark(path: Path) -> None:
    try:
        os.removexattr(path, MARK_XATTR)
    except OSError:
        pass  # gone already, or never marked: nothing to undo


def _hierarchy_of(path: Path) -> tuple[Path, frozenset[str] | None] | None:
    """(mount point, its super options; None for cgroup v2) of the cgroup fs `path` is in."""
    mounts = [(m, None) for m, _ in _mounts("cgroup2")]
    mounts += [(m, frozenset(o.split(","))) for m, o in _mounts("cgroup")]
    inside = [(m, o) for m, o in mounts if path == m or m in path.parents]
    return max(inside, key=lambda mo: len(str(mo[0]))) if inside else None


def _own_cgroup(mount: Path, options: frozenset[str] | None) -> Path | None:
    """The guard's own cgroup in the hierarchy mounted at `mount` ("0::" for v2; for v1 the
    line whose controllers, e.g. "freezer" or "name=systemd", are the mount's options)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        names = set(filter(None, controllers.split(",")))
        if (options is None and not names) or (options is not None and names and names <= options):
            rel = rel.removesuffix(" (deleted)").lstrip("/")
            return mount / rel if rel else mount
    return None


def refuse_outside_scope(path: Path) -> None:
    """Raise ScopeError for a cgroup no ebpf-guard command may freeze, thaw or kill, whatever
    the flags: a hierarchy's root (the whole host), any cgroup holding the guard itself (its own
    and every ancestor), and init.scope (PID 1)."""
    path = Path(os.path.normpath(path))
    found = _hierarchy_of(path)
    if found is None:
        raise ScopeError(f"refusing {path}: not in a cgroup filesystem")
    mount, options = found
    if path == mount:
        raise ScopeError(f"refusing the root cgroup {path}: that is every process on the host")
    rel = path.relative_to(mount)
    if rel.parts[0] == "init.scope":
        raise ScopeError(f"refusing {path}: init.scope holds PID 1 (init)")
    own = _own_cgroup(mount, options)
    if own is not None and is_within(own, path):
        raise ScopeError(f"refusing {path}: it contains ebpf-guard itself ({own}); "
                         "name a cgroup that holds only the agent")


def refuse_unowned(path: Path, force: bool) -> None:
    """Raise ScopeError unless ebpf-guard created or watches `path`, or `force` is given."""
    if not force and marked_role(path) is None:
        raise ScopeError(f"refusing {path}: ebpf-guard did not create or watch it "
                         f"(no {MARK_XATTR} mark); add --force to act on it anyway")


def refuse_process_outside_scope(pid: int) -> None:
    """Raise ScopeError for a process `watch --pid` must not take over: init, kernel threads,
    the guard itself and its ancestors (freezing them would freeze the guard or the host)."""
    if pid <= 1:
        raise ScopeError(f"refusing PID {pid}: only a process the agent runs in can be watched")
    chain = {os.getpid()}
    p = os.getpid()
    while p > 1:
        p = _ppid(p)
        chain.add(p)
    if pid in chain:
        raise ScopeError(f"refusing PID {pid}: it is ebpf-guard itself or one of its ancestors")
    if pid == 2 or _ppid(pid) == 2:
        raise ScopeError(f"refusing PID {pid}: a kernel thread")


def _ppid(pid: int) -> int:
    from ebpf_guard.sensor.procfs import read_stat  # the one /proc/PID/stat parser

    stat = read_stat(pid)
    return stat[0] if stat else 0


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
    except FileNotFoundError:
        return {}  # removed meanwhile (e.g. by `ebpf-guard kill`): neither populated nor frozen
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
    """SIGKILL everything in the cgroup and its descendants (does not wait for them to exit).
    Never a hierarchy's root: the fallback below would walk, and kill, the whole host."""
    _refuse_root(path)
    kill_file = path / "cgroup.kill"
    if kill_file.exists():
        try:
            kill_file.write_text("1\n")
        except OSError as e:
            raise CgroupError(f"cannot write {kill_file}: {e.strerror}") from e
        return
    _freeze_and_kill(path)


def _refuse_root(path: Path) -> None:
    found = _hierarchy_of(Path(os.path.normpath(path)))
    if found is None or found[0] == Path(os.path.normpath(path)):
        raise ScopeError(f"refusing to kill {path}: a cgroup root or not a cgroup")


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

    def remove(self) -> None:
        """Kill what is left and remove the cgroup tree."""
        raise NotImplementedError

    def pids(self) -> list[int]:
        return pids(self.path)

    def adopt(self, pid: int) -> None:
        """Put `pid` under this freezer. Safe in a preexec_fn (only writes one file)."""
        move_pid(self.path, pid)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"


class V2Freezer(Freezer):
    """A cgroup v2 directory, frozen through its cgroup.freeze file."""

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

    def remove(self) -> None:
        remove_cgroup(self.path)

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
            create_cgroup(mount, path.name, mark_created=True)
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
        _refuse_root(self.path)
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


class MovedTreeFreezer(V2Freezer):
    """A v2 cgroup ebpf-guard creates under the v2 root for `watch --pid`, and the process tree it
    moves into it, remembering where each process came from: on pure-v2 hosts there is no v1
    freezer to borrow, so freezing a bare process tree means giving it a cgroup of its own.
    `release` hands every process back (later children go where the tree's root came from)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.origin: dict[int, Path] = {}

    @classmethod
    def create(cls, name: str | None = None) -> MovedTreeFreezer:
        name = name or uuid.uuid4().hex[:10]
        return cls(create_cgroup(find_v2_mount(), f"{WATCH_CGROUP_PREFIX}{name}", mark_created=True))

    def adopt(self, pid: int) -> None:
        if pid not in self.origin:
            self.origin[pid] = cgroup_of_pid(pid)
        move_pid(self.path, pid)

    def release(self, timeout: float = 5.0) -> None:
        """Thaw, hand every process back to the cgroup it came from, and remove this cgroup."""
        self.thaw()
        fallback = next(iter(self.origin.values()), find_v2_mount())
        for pid in self.pids():
            try:
                move_pid(self.origin.get(pid, fallback), pid)
            except CgroupError:
                pass  # exited meanwhile, or its old cgroup is gone: it stays; rmdir says so
        deadline = time.monotonic() + timeout
        while not _rmdir_tree(self.path, deadline):
            pass



def can_freeze_v2(path: Path | None) -> bool:
    return path is not None and (path / "cgroup.freeze").exists()


def _tree_of(pid: int) -> list[int]:
    """`pid` and its descendants now (psutil walks /proc children lists)."""
    import psutil

    try:
        root = psutil.Process(pid)
        return [pid, *(c.pid for c in root.children(recursive=True))]
    except psutil.Error:
        return [pid]


def freezer_for(cgroup: Path | None, pid: int | None = None, *, prefer_v1: bool = True) -> Freezer:
    """The best freezer for a watched v2 cgroup, or for a bare process tree (`watch --pid`).

    A cgroup: v2 when it can freeze; otherwise a v1 freezer cgroup named after it, and
    everything in it (plus `pid`: `run` passes its child) is moved there. A process tree: a v1
    freezer cgroup where one is mounted (v1 and v2 memberships are independent, so the tree's v2
    cgroup stays as it was), else (pure v2, or `prefer_v1=False`) a v2 cgroup of its own. Either
    way the whole tree is moved, repeated until no new child shows up; its future children
    inherit the membership.
    """
    if cgroup is not None:
        refuse_outside_scope(cgroup)
        if can_freeze_v2(cgroup):
            return V2Freezer(cgroup)
        fz: Freezer = V1Freezer.create(cgroup.name)
        members = pids(cgroup)
    else:
        use_v1 = prefer_v1 and find_v1_mount("freezer") is not None
        fz = V1Freezer.create() if use_v1 else MovedTreeFreezer.create(str(pid) if pid else None)
        members = []
    moved: set[int] = set()
    for _ in range(10):  # a tree that forks while being moved: catch the latecomers
        todo = [p for p in [*members, *(_tree_of(pid) if pid is not None else [])] if p not in moved]
        if not todo:
            break
        for p in todo:
            try:
                fz.adopt(p)
            except CgroupError:
                if Path(f"/proc/{p}").exists():  # a process that exited meanwhile is no loss
                    raise
            moved.add(p)
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
