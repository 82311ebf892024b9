"""Permission gates: fanotify marks that stop a watched process *before* it opens a protected file
or a listed tool, while every other process is let through at once.

The sensor judges an open after the syscall: a KILL for `cat ~/.ssh/id_ed25519` comes when the
key's bytes are already read. A gate answers the kernel's permission question instead: the opener
waits in open(2)/execve(2) until we reply, and a watched process gets EPERM and reads no byte.

- `plan_gates` turns a policy into marks (pure apart from stat/listdir): directories whose
  children a rule names (FAN_EVENT_ON_CHILD covers direct children only, so each existing
  subdirectory is marked too, bounded), existing protected files by inode (hard links share
  it), and the binaries of plain exec rules (FAN_OPEN_EXEC_PERM and FAN_OPEN_PERM: neither run,
  copied nor handed to ld.so). Unprotected files already in a marked directory get an ignore
  mark, so the host's own opens there (/etc/ld.so.cache) never reach Python.
- `FileGate` owns the fanotify group and the thread that answers it. An unwatched opener costs
  one read of /proc/TID/cgroup; a watched one is matched against the rules (inode, then name in
  its directory) and, for write-only rules, the open flags.
- Open flags: fanotify does not report the access mode. The default `proc_open_flags` reads
  /proc/TID/syscall, which holds the registers of the syscall the opener is blocked in while it
  waits for our answer (the flags come from registers, so another thread cannot rewrite them;
  openat2's flags live in user memory and count as unknown). Unknown flags deny a write gate.
- Who is watched: `watched_by_cgroup`. A thread whose /proc entry is gone (killed while it
  waited) counts as watched: it cannot read anything any more, so denying it is harmless.

When the guard process dies, the kernel destroys the group and *allows* every pending and future
open: the gate fails open. The watchdog freezes the agent at that moment (on_guard_exit).
The answering thread opens no marked file (it would wait on itself): it reads /proc and stats
directories only, and `on_decision` runs on a separate thread so a slow or file-writing callback
cannot stall an opener. It also needs the GIL, so no other thread of this process may hold the GIL
while it waits for an open the gate answers. subprocess does exactly that with vfork (Python
< 3.12, gh-104372) and posix_spawn (the parent sleeps in the kernel until the child's exec, which
opens the program): while a gate runs, subprocess is told to fork instead (`_NoVfork`).
"""

from __future__ import annotations

import os
import platform
import queue
import select
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import suppress
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

from ebpf_guard.enforce import cgroups
from ebpf_guard.enforce import fanotify as fan
from ebpf_guard.events import READ, Kind
from ebpf_guard.pathnames import normalize
from ebpf_guard.policy.identities import EMPTY, Identities
from ebpf_guard.policy.matchers import GlobError, GlobSet, compile_glob, expand_all, glob_kind, is_literal, literal_dir
from ebpf_guard.verdicts import Mode, Verdict

if TYPE_CHECKING:
    from ebpf_guard.policy import Policy, Rule

Inode = tuple[int, int]
GATED_VERDICTS = (Verdict.KILL, Verdict.HALT, Verdict.ASK)
NO_WALK = ("/proc", "/sys", "/dev")
MAX_DIRS = 256  # directories marked per plan
MAX_ENTRIES = 4096  # directory entries looked at per plan
MAX_IGNORES = 1024  # ignore marks per plan
FILE_MASK = fan.FAN_OPEN_PERM
DIR_MASK = fan.FAN_OPEN_PERM | fan.FAN_EVENT_ON_CHILD
BINARY_MASK = fan.FAN_OPEN_PERM | fan.FAN_OPEN_EXEC_PERM
INIT_FLAGS = (fan.FAN_CLASS_CONTENT | fan.FAN_CLOEXEC | fan.FAN_NONBLOCK | fan.FAN_UNLIMITED_QUEUE
              | fan.FAN_REPORT_TID)  # fmt: skip
EVENT_F_FLAGS = os.O_RDONLY | os.O_LARGEFILE | os.O_CLOEXEC
WRITE_FLAGS = os.O_ACCMODE | os.O_CREAT | os.O_TRUNC  # O_ACCMODE: write-only, read-write, and 3
_EXEC_CONDITIONS = ("args_any", "args_regex", "flags", "operands", "operands_not", "paths_not")


class GateError(Exception):
    """A gate that cannot be set up or asked, phrased as one line."""


class GateKind(str, Enum):
    """What a gate denies a watched process."""

    READ = "read"  # any open is denied
    WRITE = "write"  # opens for write/create/truncate (or with unknown flags) are denied
    EXEC = "exec"  # exec and any open of the binary are denied


@dataclass(frozen=True)
class GateRule:
    """One policy rule as a gate: what it denies and the (expanded) paths it is about."""

    name: str
    kind: GateKind
    verdict: Verdict
    paths: tuple[str, ...] = ()
    paths_not: tuple[str, ...] = ()
    _globs: GlobSet = field(init=False, repr=False, compare=False)
    _globs_not: GlobSet = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_globs", GlobSet(self.paths))
        object.__setattr__(self, "_globs_not", GlobSet(self.paths_not))

    def matches(self, path: str) -> bool:
        return self._globs.match(path) and not self._globs_not.match(path)


@dataclass(frozen=True)
class GateMark:
    """One fanotify mark: `path` as the policy names it, `real` what the kernel marks."""

    path: str
    real: str
    target: str  # "dir" (its children), "file", "binary", "ignore" (exempt from dir marks)
    mask: int
    rules: tuple[str, ...] = ()


@dataclass(frozen=True)
class GatePlan:
    """What a policy gates on this host: rules, marks (with the rules behind each) and notes on
    what could not be marked."""

    rules: tuple[GateRule, ...] = ()
    marks: tuple[GateMark, ...] = ()
    notes: tuple[str, ...] = ()

    def describe(self) -> list[str]:
        kinds = {r.name: r.kind.value for r in self.rules}
        lines = []
        for m in self.marks:
            if m.target == "ignore":
                continue
            what = "deny exec+open" if m.target == "binary" else f"deny {'/'.join(kinds[r] for r in m.rules)}"
            where = f"{m.path}/* (children)" if m.target == "dir" else m.path
            real = f" (-> {m.real})" if m.real != m.path else ""
            lines.append(f"gate: {what} {where}{real} [{', '.join(m.rules)}]")
        ignores = sum(m.target == "ignore" for m in self.marks)
        if ignores:
            lines.append(f"gate: {ignores} unprotected files in marked directories are exempt")
        return lines + [f"gate not set: {n}" for n in self.notes]


# ---------------------------------------------------------------- planning


def plan_gates(policy: Policy, *, workspace: str | None, homes: Iterable[str],
               identities: Identities | None = None) -> GatePlan:  # fmt: skip
    """Marks for the KILL/HALT/ASK open and exec rules of `policy` (see the module doc)."""
    if policy.mode is Mode.AUDIT:
        return GatePlan(notes=("audit mode: nothing is denied",))
    builder = _PlanBuilder(identities or policy.identities or EMPTY)
    variants = {"home": tuple(normalize(str(h)) for h in homes),
                "workspace": (normalize(workspace),) if workspace else ()}  # fmt: skip
    for rule in policy.rules:
        if rule.verdict not in GATED_VERDICTS or rule.kind not in (Kind.OPEN, Kind.EXEC):
            continue
        if rule.rate is not None:
            builder.notes.append(f"{rule.name}: a rate rule allows the first opens; not a gate")
        elif rule.kind is Kind.OPEN:
            builder.add_open_rule(rule, variants)
        else:
            builder.add_exec_rule(rule)
    return builder.plan()


class _PlanBuilder:
    """Collects marks rule by rule, merging marks on the same place, within the budgets."""

    def __init__(self, identities: Identities) -> None:
        self.identities = identities
        self.rules: list[GateRule] = []
        self.marks: dict[tuple[str, str], GateMark] = {}
        self.notes: list[str] = []
        self.entries_left = MAX_ENTRIES

    def add(self, path: str, target: str, mask: int, rule: str) -> None:
        real = os.path.realpath(path)
        old = self.marks.get((real, target))
        if old is not None:
            rules = old.rules if rule in old.rules else (*old.rules, rule)
            self.marks[(real, target)] = GateMark(old.path, real, target, old.mask | mask, rules)
        elif target == "dir" and sum(t == "dir" for _, t in self.marks) >= MAX_DIRS:
            self.notes.append(f"{path}: over {MAX_DIRS} directories; not marked")
        else:
            self.marks[(real, target)] = GateMark(path, real, target, mask, (rule,))

    def add_open_rule(self, rule: Rule, variants: dict[str, tuple[str, ...]]) -> None:
        access = rule.match.access
        kind = GateKind.READ if not access or READ in access else GateKind.WRITE
        globs = [g for p in rule.match.paths for g in _expanded(p, variants, self.notes, rule.name)]
        nots = [g for p in rule.match.paths_not for g in _expanded(p, variants, [], rule.name)]
        if not globs:
            if not rule.match.paths:
                self.notes.append(f"{rule.name}: names no path; not a gate")
            return
        gate = GateRule(rule.name, kind, rule.verdict, tuple(globs), tuple(nots))
        self.rules.append(gate)
        for glob in globs:
            self._place(glob, rule.name)
        for path in self.identities.files.values():
            if gate.matches(path):  # hard links elsewhere share the inode
                self.add(path, "file", FILE_MASK, rule.name)

    def _place(self, glob: str, rule: str) -> None:
        if glob_kind(glob) == "base":
            self.notes.append(f"{rule}: {glob!r} names no directory; only known protected files are marked")
            return
        start = literal_dir(glob)
        if start == "/" or any(start == d or start.startswith(d + "/") for d in NO_WALK):
            self.notes.append(f"{rule}: {glob!r} names no directory to mark")
            return
        if is_literal(glob) and not glob.endswith("/"):
            if os.path.isfile(glob):
                self.add(glob, "file", FILE_MASK, rule)
            elif os.path.isdir(glob):
                self.notes.append(f"{rule}: {glob} is a directory; opening a directory is not gated")
            elif os.path.isdir(os.path.dirname(glob)):
                self.add(os.path.dirname(glob), "dir", DIR_MASK, rule)
            else:
                self.notes.append(f"{rule}: {os.path.dirname(glob)} does not exist; {glob} is not gated")
            return
        found = self._dirs_for(glob)
        if not found:
            self.notes.append(f"{rule}: no directory exists for {glob}")
        for d in found:
            self.add(d, "dir", DIR_MASK, rule)

    def _dirs_for(self, glob: str) -> list[str]:
        """Existing directories whose children `glob` may name (symlinked subdirectories are not
        followed; the starting directory may be a symlink)."""
        body = glob + "**" if glob.endswith("/") else glob
        segs = [s for s in body.split("/") if s not in ("", ".")]
        free = segs.index("**") if "**" in segs else len(segs)
        try:
            seg_rx = [compile_glob(s) for s in segs[:free]]
        except GlobError:
            return []
        start = literal_dir(glob)
        out: list[str] = []
        stack = [(start, len([s for s in start.split("/") if s]))]
        while stack:
            d, k = stack.pop()  # the children of d are matched against segs[k]
            if not os.path.isdir(d):
                continue
            if k >= free or k == len(segs) - 1 or all(s == "**" for s in segs[k + 1 :]):
                out.append(d)
            if k < free and k >= len(segs) - 1:
                continue
            for name in self._subdirs(d):
                if k >= free or seg_rx[k].fullmatch(name):
                    stack.append((d.rstrip("/") + "/" + name, k + 1))
        return sorted(out)

    def _subdirs(self, d: str) -> list[str]:
        try:
            with os.scandir(d) as it:
                entries = list(it)
        except OSError:
            return []
        out = []
        for e in entries:
            self.entries_left -= 1
            if self.entries_left < 0:
                self.notes.append(f"directory scan stopped at {MAX_ENTRIES} entries (in {d})")
                return out
            if e.is_dir(follow_symlinks=False):
                out.append(e.name)
        return out

    def add_exec_rule(self, rule: Rule) -> None:
        if any(getattr(rule.match, c) for c in _EXEC_CONDITIONS):
            return  # judged on its arguments: the binary itself is not forbidden
        self.rules.append(GateRule(rule.name, GateKind.EXEC, rule.verdict))
        for tool in (*rule.match.names, *rule.match.paths):
            inodes = self.identities.tools.get(tool if not tool.startswith("/") else normalize(tool))
            if not inodes:
                self.notes.append(f"{rule.name}: {tool} is not on this host's PATH (or is multi-call)")
            for inode in sorted(inodes or ()):
                for binary in self.identities.binaries.get(inode, ())[:1]:
                    self.add(binary.path, "binary", BINARY_MASK, rule.name)

    def plan(self) -> GatePlan:
        marks = list(self.marks.values())
        ignores = self._ignores(marks)
        return GatePlan(tuple(self.rules), tuple(marks + ignores), tuple(self.notes))

    def _ignores(self, marks: list[GateMark]) -> list[GateMark]:
        """Ignore marks for the existing files in marked directories that no rule names and whose
        inode is not gated under another name: the kernel then answers their opens itself."""
        gated: set[Inode] = set()
        for m in marks:
            if m.target in ("file", "binary"):
                with suppress(OSError):
                    st = os.stat(m.real)
                    gated.add((st.st_dev, st.st_ino))
        candidates: list[tuple[str, str, Inode]] = []
        for m in (m for m in marks if m.target == "dir"):
            for name, inode in _regular_children(m.real):
                path = m.path.rstrip("/") + "/" + name
                if any(r.kind is not GateKind.EXEC and r.matches(path) for r in self.rules):
                    gated.add(inode)
                else:
                    candidates.append((path, m.real.rstrip("/") + "/" + name, inode))
        out = [GateMark(path, real, "ignore", fan.FAN_OPEN_PERM) for path, real, inode in candidates
               if inode not in gated]  # fmt: skip
        if len(out) > MAX_IGNORES:
            self.notes.append(f"{len(out)} unprotected files in marked directories: "
                              f"{len(out) - MAX_IGNORES} of them are asked about on every open")
        return out[:MAX_IGNORES]


def _regular_children(d: str) -> list[tuple[str, Inode]]:
    """(name, inode) of the regular files directly in `d`; symlinks are not followed."""
    try:
        with os.scandir(d) as it:
            entries = list(it)
    except OSError:
        return []
    out = []
    for e in entries:
        with suppress(OSError):
            if e.is_file(follow_symlinks=False):
                out.append((e.name, (e.stat(follow_symlinks=False).st_dev, e.inode())))
    return out


def _expanded(pattern: str, variants: dict[str, tuple[str, ...]], notes: list[str], rule: str) -> list[str]:
    out = expand_all(pattern, variants)
    if not out:
        notes.append(f"{rule}: {pattern!r} has no value for its variables here")
    return out


# ---------------------------------------------------------------- who is watched, open flags


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


def _syscall_of(tid: int) -> tuple[int, list[int]] | None:
    """(number, register arguments) of the syscall `tid` is blocked in, from /proc/TID/syscall;
    None when gone, "running", or a kernel thread (io_uring workers among them)."""
    try:
        fd = os.open(f"/proc/{tid}/syscall", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fields = os.read(fd, 512).split()
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        return int(fields[0]), [int(a, 16) for a in fields[1:7]]
    except (ValueError, IndexError):
        return None


def _execing(tid: int) -> bool:
    """Is `tid` inside execve/execveat (its open of the program is the exec's own)?"""
    call = _syscall_of(tid)
    return call is not None and call[0] in _EXECS.get(_ARCH, ())


def opens_for_write(flags: int | None) -> bool:
    """Write, read-write, create or truncate; unknown flags count as write (fail closed)."""
    return flags is None or bool(flags & WRITE_FLAGS)


# ---------------------------------------------------------------- the running gate


@dataclass
class GateStats:
    """Counts kept by the answering thread (read them from any thread)."""

    denied: int = 0
    allowed_watched: int = 0
    allowed_unwatched: int = 0
    errors: int = 0  # is_watched failed (judged as watched), matching failed (denied), or a response
    unwatched_waits: int = 0
    unwatched_wait_total_us: float = 0.0  # event read -> response written, unwatched openers
    unwatched_wait_max_us: float = 0.0

    def unwatched_wait(self, us: float) -> None:
        self.unwatched_waits += 1
        self.unwatched_wait_total_us += us
        self.unwatched_wait_max_us = max(self.unwatched_wait_max_us, us)


@dataclass(frozen=True)
class GateDecision:
    """One denial, for the session's log (allowed opens are not reported)."""

    tid: int
    pid: int  # the thread group (process); the tid if the thread is gone
    path: str
    mask: str  # "open" | "exec"
    allowed: bool
    rule: str
    dev: int = 0  # the file's st_dev and inode: its identity, for the engine's event
    ino: int = 0
    uid: int = -1  # the opener's, read while it waited for the answer (it may be gone after)
    comm: str = ""


class _Matcher:
    """The plan's rules with the inodes behind its marks: says which rule denies an event."""

    def __init__(self, plan: GatePlan, open_flags: Callable[[int], int | None]) -> None:
        self.rules = plan.rules
        self.open_flags = open_flags
        self.inodes: dict[Inode, list[str]] = {}  # marked file / binary -> rule names
        self.dirs: dict[Inode, list[str]] = {}  # marked directory -> the policy's names for it

    def add(self, mark: GateMark) -> None:
        """Record the inode the kernel is about to mark (a file replaced later is a new inode)."""
        if mark.target == "ignore":
            return
        st = os.stat(mark.real)
        key = (st.st_dev, st.st_ino)
        if mark.target == "dir":
            self.dirs.setdefault(key, []).append(mark.path.rstrip("/"))
        else:
            self.inodes.setdefault(key, []).extend(mark.rules)

    def denying_rule(self, event: fan.Event) -> tuple[str | None, str]:
        """(name of the rule that denies the event or None, the opened path)."""
        path = os.readlink(f"/proc/self/fd/{event.fd}").removesuffix(" (deleted)")
        st = os.fstat(event.fd)
        names = set(self.inodes.get((st.st_dev, st.st_ino), ()))
        candidates = [path]
        parent, _, base = path.rpartition("/")
        with suppress(OSError):
            # By the directory's inode, not its name: symlinks and bind mounts reach it too.
            pst = os.stat(parent or "/")
            candidates += [f"{d}/{base}" for d in self.dirs.get((pst.st_dev, pst.st_ino), ())]
        exec_ = bool(event.mask & fan.FAN_OPEN_EXEC_PERM)
        for rule in self.rules:
            if rule.name not in names and not (rule.paths and any(rule.matches(c) for c in candidates)):
                continue
            if rule.kind is GateKind.EXEC and rule.verdict is not Verdict.KILL and (exec_ or _execing(event.pid)):
                # HALT/ASK: the exec goes on into the kernel's exec hold (stopped before its
                # first instruction until the guard decides), so an approved ASK or a resumed
                # HALT still runs it. Reads of the binary (a copy, ld.so) are refused below.
                continue
            if rule.kind is not GateKind.WRITE or (not exec_ and opens_for_write(self.open_flags(event.pid))):
                return rule.name, path
        return None, path


class _NoVfork:
    """While any gate runs in this process, subprocess forks rather than vforks or posix_spawns
    (see the module doc); the settings are put back when the last gate closes."""

    _lock = threading.Lock()
    _users = 0
    _saved: tuple[object, object] = (None, None)

    @classmethod
    def enter(cls) -> None:
        with cls._lock:
            if cls._users == 0:
                cls._saved = (getattr(subprocess, "_USE_VFORK", None), getattr(subprocess, "_USE_POSIX_SPAWN", None))
                subprocess._USE_VFORK = False  # type: ignore[attr-defined]
                subprocess._USE_POSIX_SPAWN = False  # type: ignore[attr-defined]
            cls._users += 1

    @classmethod
    def leave(cls) -> None:
        with cls._lock:
            cls._users -= 1
            if cls._users == 0:
                for name, value in zip(("_USE_VFORK", "_USE_POSIX_SPAWN"), cls._saved, strict=True):
                    if value is not None:
                        setattr(subprocess, name, value)


class _Reporter:
    """Hands denials to `on_decision` on its own thread: the answering thread never waits for it."""

    def __init__(self, on_decision: Callable[[GateDecision], None]) -> None:
        self.on_decision = on_decision
        self.queue: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="ebpf-guard-gate-report", daemon=True)
        self.thread.start()

    def put(self, tid: int, path: str, mask: int, rule: str, inode: Inode = (0, 0),
            who: tuple[int, int, str] | None = None) -> None:
        self.queue.put((tid, path, mask, rule, inode, who or (_tgid(tid), -1, "")))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            tid, path, mask, rule, (dev, ino), (pid, uid, comm) = item
            kind = "exec" if mask & fan.FAN_OPEN_EXEC_PERM else "open"
            with suppress(Exception):  # the session's callback must not end the reporting
                self.on_decision(GateDecision(tid, pid, path, kind, False, rule, dev, ino, uid, comm))


def _who(tid: int) -> tuple[int, int, str]:
    """(tgid, uid, comm) of a thread waiting for our answer: read now, it may exit right after."""
    uid, comm = -1, ""
    with suppress(OSError):
        uid = os.stat(f"/proc/{tid}").st_uid
        with open(f"/proc/{tid}/comm", "rb") as f:
            comm = f.read().strip().decode(errors="replace")
    return _tgid(tid), uid, comm


def _tgid(tid: int) -> int:
    try:
        with open(f"/proc/{tid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Tgid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return tid


class FileGate:
    """Owns one fanotify group (its fd and marks), the thread answering its permission events,
    and the stats. Every event is answered exactly once and its fd closed; `close()` ends the
    thread and drops every mark (closing the group fd)."""

    def __init__(self, plan: GatePlan, *, is_watched: Callable[[int], bool],
                 open_flags: Callable[[int], int | None] | None = None,
                 on_decision: Callable[[GateDecision], None] | None = None) -> None:  # fmt: skip
        self.plan = plan
        self.stats = GateStats()
        self.notes: list[str] = []  # marks that failed at start()
        self._is_watched = is_watched
        self._matcher = _Matcher(plan, open_flags or proc_open_flags)
        self._on_decision = on_decision
        self._reporter: _Reporter | None = None
        self._fan_fd = -1
        self._wake_fd = -1
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Create the group, add the plan's marks, start answering. GateError if fanotify
        permission events are unavailable; a mark that fails is said in `notes`."""
        if self._fan_fd >= 0:
            raise GateError("gate already started")
        try:
            self._fan_fd = fan.init(INIT_FLAGS, EVENT_F_FLAGS)
        except OSError as e:
            raise GateError(f"fanotify permission events unavailable ({e.strerror}): "
                            "needs root and CONFIG_FANOTIFY_ACCESS_PERMISSIONS") from None  # fmt: skip
        self._wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        _NoVfork.enter()
        # Start answering before marking: a marked open must never wait for a thread not yet there.
        self._thread = threading.Thread(target=self._run, name="ebpf-guard-gate", daemon=True)
        self._thread.start()
        if self._on_decision is not None:
            self._reporter = _Reporter(self._on_decision)
        for mark in self.plan.marks:
            flags = fan.FAN_MARK_ADD
            if mark.target == "ignore":
                flags |= fan.FAN_MARK_IGNORED_MASK | fan.FAN_MARK_IGNORED_SURV_MODIFY
            try:
                self._matcher.add(mark)  # before the mark: its first event must find the rule
                fan.mark(self._fan_fd, flags, mark.mask, mark.real)
            except OSError as e:
                self.notes.append(f"{mark.path}: not marked ({e.strerror})")

    def close(self) -> None:
        """Stop answering and drop every mark; pending opens are answered first. Idempotent."""
        if self._thread is not None:
            os.eventfd_write(self._wake_fd, 1)
            self._thread.join()
            self._thread = None
            _NoVfork.leave()
        for fd in (self._fan_fd, self._wake_fd):
            if fd >= 0:
                os.close(fd)  # closing the group removes its marks and allows what is left
        self._fan_fd = self._wake_fd = -1
        if self._reporter is not None:
            self._reporter.close()
            self._reporter = None

    def __enter__(self) -> FileGate:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._fan_fd, select.POLLIN)
        poller.register(self._wake_fd, select.POLLIN)
        stopping = False
        while not stopping:
            ready = poller.poll()
            stopping = any(fd == self._wake_fd for fd, _ in ready)
            while True:  # drain: also the last events queued before close()
                try:
                    buf = os.read(self._fan_fd, 65536)
                except BlockingIOError:
                    break
                except OSError:
                    self.stats.errors += 1  # e.g. EMFILE: the kernel keeps the event queued
                    break
                read_ns = time.perf_counter_ns()
                try:
                    for event in fan.parse(buf):
                        self._handle(event, read_ns)
                except ValueError:
                    self.stats.errors += 1  # an event format we do not speak: cannot answer it

    def _handle(self, event: fan.Event, read_ns: int) -> None:
        if event.fd == fan.FAN_NOFD:
            self.stats.errors += 1  # queue overflow: cannot happen with FAN_UNLIMITED_QUEUE
            return
        try:
            if not event.mask & fan.PERMISSION_EVENTS:
                return
            try:
                watched = self._is_watched(event.pid)
            except Exception:
                watched, self.stats.errors = True, self.stats.errors + 1
            if not watched:
                self._respond(event, True)
                self.stats.allowed_unwatched += 1
                self.stats.unwatched_wait((time.perf_counter_ns() - read_ns) / 1000)
                return
            try:
                rule, path = self._matcher.denying_rule(event)
            except Exception:
                rule, path = "(gate error)", "?"
                self.stats.errors += 1
            who = _who(event.pid) if rule is not None and self._reporter is not None else None
            self._respond(event, rule is None)
            if rule is None:
                self.stats.allowed_watched += 1
                return
            self.stats.denied += 1
            if self._reporter is not None:
                inode = (0, 0)
                with suppress(OSError):
                    st = os.fstat(event.fd)
                    inode = (st.st_dev, st.st_ino)
                self._reporter.put(event.pid, path, event.mask, rule, inode, who)
        finally:
            os.close(event.fd)

    def _respond(self, event: fan.Event, allow: bool) -> None:
        try:
            fan.respond(self._fan_fd, event.fd, allow)
        except OSError:
            self.stats.errors += 1  # the opener was killed meanwhile: nothing waits for it
