"""Permission gates: fanotify marks that stop a watched process *before* it opens a protected file
or a listed tool, while every other process is let through at once.

The sensor judges an open after the syscall: a KILL for `cat ~/.ssh/id_ed25519` comes when the
key's bytes are already read. A gate answers the kernel's permission question instead: the opener
waits in open(2)/execve(2) until we reply, and a watched process gets EPERM and reads no byte.

- Planning (gate_plan.py): `plan_gates` turns a policy into marks and gate rules.
- Openers (gate_openers.py): whether the opener is watched (`watched_by_cgroup`), the flags of
  its open (`proc_open_flags`), who it is.
- `FileGate` (here) owns the fanotify group and the thread that answers it. An unwatched opener
  costs one read of /proc/TID/cgroup; a watched one is matched against the rules (inode, then
  name in its directory) and, for write-only rules, the open flags.
- Held opens (gate_holds.py): an open whose deciding rule `holds` (a human answers it: ASK, HALT
  in confirm mode; or only the engine can check it: exceptions, process conditions) is not
  answered at once. The opener stays blocked in the kernel while the guard judges and asks;
  `FileGate.answer` gives the answer (FAN_ALLOW on approval: the open succeeds). Plain KILL and
  HALT opens are refused at once. Held opens are bounded; beyond the bound they are refused at once.

When the guard process dies, the kernel destroys the group and *allows* every pending and future
open, held ones included: the gate fails open. The watchdog freezes the agent at that moment
(on_guard_exit). `close()` itself answers what is still held with the policy's ASK default.
The answering thread opens no marked file (it would wait on itself): it reads /proc and stats
directories only, and `on_decision` runs on a separate thread so a slow or file-writing callback
cannot stall an opener. It also needs the GIL, so no other thread of this process may hold the GIL
while it waits for an open the gate answers. subprocess does exactly that with vfork (Python
< 3.12, gh-104372) and posix_spawn (the parent sleeps in the kernel until the child's exec, which
opens the program): while a gate runs, subprocess is told to fork instead (`_NoVfork`).
"""

from __future__ import annotations

import os
import queue
import select
import subprocess
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass

from ebpf_guard.enforce import fanotify as fan
from ebpf_guard.enforce.gate_holds import MAX_HELD, MAX_HELD_PER_PROCESS, HeldOpens
from ebpf_guard.enforce.gate_openers import (
    WRITE_FLAGS,
    execing,
    opens_for_write,
    proc_open_flags,
    tgid_of,
    watched_by_cgroup,
    who_is,
)
from ebpf_guard.enforce.gate_plan import (
    BINARY_MASK,
    DIR_MASK,
    FILE_MASK,
    GATED_VERDICTS,
    MAX_DIRS,
    MAX_ENTRIES,
    MAX_IGNORES,
    GateError,
    GateKind,
    GateMark,
    GatePlan,
    GateRule,
    Inode,
    plan_gates,
)
from ebpf_guard.verdicts import Verdict

__all__ = [
    "BINARY_MASK", "DIR_MASK", "EVENT_F_FLAGS", "FILE_MASK", "GATED_VERDICTS", "INIT_FLAGS", "MAX_DIRS",
    "MAX_ENTRIES", "MAX_HELD", "MAX_HELD_PER_PROCESS", "MAX_IGNORES", "WRITE_FLAGS", "FileGate", "GateDecision",
    "GateError", "GateKind", "GateMark", "GatePlan", "GateRule", "GateStats", "opens_for_write", "plan_gates",
    "proc_open_flags", "watched_by_cgroup",
]  # fmt: skip

INIT_FLAGS = (fan.FAN_CLASS_CONTENT | fan.FAN_CLOEXEC | fan.FAN_NONBLOCK | fan.FAN_UNLIMITED_QUEUE
              | fan.FAN_REPORT_TID)  # fmt: skip
EVENT_F_FLAGS = os.O_RDONLY | os.O_LARGEFILE | os.O_CLOEXEC
SWEEP_S = 0.25  # while opens are held, how often the answering thread looks for openers that died

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
    held: int = 0  # opens held for an answer (ASK)
    held_refused: int = 0  # ASK opens refused at once: over the bounds (counted in `denied` too)
    held_dropped: int = 0  # held opens whose opener died before the answer

    def unwatched_wait(self, us: float) -> None:
        self.unwatched_waits += 1
        self.unwatched_wait_total_us += us
        self.unwatched_wait_max_us = max(self.unwatched_wait_max_us, us)


@dataclass(frozen=True)
class GateDecision:
    """One open the gate refused or holds, for the session's log and the engine (opens allowed
    at once are not reported)."""

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
    held: int = 0  # a held open's token for FileGate.answer; 0: refused already
    note: str = ""  # why an open the rule would hold was refused at once (a bound)


class _Matcher:
    """The plan's rules with the inodes behind its marks: says which rule judges an event."""

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

    def deciding_rule(self, event: fan.Event) -> tuple[GateRule | None, str]:
        """(the rule that refuses or holds the event, or None; the opened path). A rule that
        refuses outright wins over one that would hold the open for an answer."""
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
        found: GateRule | None = None
        for rule in self.rules:
            if rule.name not in names and not (rule.paths and any(rule.matches(c) for c in candidates)):
                continue
            if rule.kind is GateKind.EXEC and rule.verdict is not Verdict.KILL and (exec_ or execing(event.pid)):
                # HALT/ASK: the exec goes on into the kernel's exec hold (stopped before its
                # first instruction until the guard decides), so an approved ASK or a resumed
                # HALT still runs it. Reads of the binary (a copy, ld.so) are refused below.
                continue
            if rule.kind is not GateKind.WRITE or (not exec_ and opens_for_write(self.open_flags(event.pid))):
                if not rule.holds:
                    return rule, path
                found = found or rule
        return found, path


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
    """Hands refusals and holds to `on_decision` on its own thread: the answering thread never
    waits for it."""

    def __init__(self, on_decision: Callable[[GateDecision], None]) -> None:
        self.on_decision = on_decision
        self.queue: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="ebpf-guard-gate-report", daemon=True)
        self.thread.start()

    def put(self, event: fan.Event, path: str, rule: str, who: tuple[int, int, str], inode: Inode, *,
            held: int = 0, note: str = "") -> None:  # fmt: skip
        self.queue.put((event.pid, path, event.mask, rule, inode, who, held, note))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            tid, path, mask, rule, (dev, ino), (pid, uid, comm), held, note = item
            kind = "exec" if mask & fan.FAN_OPEN_EXEC_PERM else "open"
            with suppress(Exception):  # the session's callback must not end the reporting
                self.on_decision(GateDecision(tid, pid, path, kind, False, rule, dev, ino, uid, comm, held, note))


class FileGate:
    """Owns one fanotify group (its fd and marks), the thread answering its permission events,
    the opens held for an answer, and the stats. Every event is answered exactly once and its fd
    closed; `close()` answers what is held, ends the thread and drops every mark."""

    def __init__(self, plan: GatePlan, *, is_watched: Callable[[int], bool],
                 open_flags: Callable[[int], int | None] | None = None,
                 on_decision: Callable[[GateDecision], None] | None = None,
                 max_held: int = MAX_HELD, max_held_per_process: int = MAX_HELD_PER_PROCESS) -> None:  # fmt: skip
        self.plan = plan
        self.stats = GateStats()
        self.notes: list[str] = []  # marks that failed at start()
        self._is_watched = is_watched
        self._matcher = _Matcher(plan, open_flags or proc_open_flags)
        self._on_decision = on_decision
        self._reporter: _Reporter | None = None
        self._held = HeldOpens(self._respond_fd, limit=max_held, per_process=max_held_per_process)
        self._fan_fd = -1
        self._wake_fd = -1
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def held(self) -> int:
        """How many opens wait for an answer now."""
        return len(self._held)

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

    def answer(self, token: int, allow: bool) -> bool:
        """Answer a held open (GateDecision.held): allow lets the open succeed, deny makes it
        fail with EPERM. False if it is no longer held (its opener died, or the gate closed)."""
        return self._held.answer(token, allow)

    def close(self) -> None:
        """Answer the held opens with the policy's ASK default (the kernel would allow them when
        the group closes), stop answering and drop every mark; events already queued are
        answered first. Idempotent."""
        self._held.answer_all(self.plan.ask_default_allow)
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
        swept = time.monotonic()
        while not stopping:
            ready = poller.poll(SWEEP_S * 1000 if len(self._held) else None)
            stopping = any(fd == self._wake_fd for fd, _ in ready)
            self._drain()
            if len(self._held) and time.monotonic() - swept >= SWEEP_S:
                swept = time.monotonic()
                self.stats.held_dropped += len(self._held.sweep())

    def _drain(self) -> None:
        """Answer every queued event (also the last ones queued before close())."""
        while True:
            try:
                buf = os.read(self._fan_fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                self.stats.errors += 1  # e.g. EMFILE: the kernel keeps the event queued
                return
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
        kept = False
        try:
            if event.mask & fan.PERMISSION_EVENTS:
                kept = self._judge(event, read_ns)
        finally:
            if not kept:
                os.close(event.fd)

    def _judge(self, event: fan.Event, read_ns: int) -> bool:
        """Answer the event, or hold it for an answer; True when it is held (its fd kept)."""
        try:
            watched = self._is_watched(event.pid)
        except Exception:
            watched, self.stats.errors = True, self.stats.errors + 1
        if not watched:
            self._respond(event, True)
            self.stats.allowed_unwatched += 1
            self.stats.unwatched_wait((time.perf_counter_ns() - read_ns) / 1000)
            return False
        try:
            rule, path = self._matcher.deciding_rule(event)
            name = rule.name if rule is not None else None
        except Exception:
            rule, name, path = None, "(gate error)", "?"
            self.stats.errors += 1
        if name is None:
            self._respond(event, True)
            self.stats.allowed_watched += 1
            return False
        who = who_is(event.pid) if self._reporter is not None else (tgid_of(event.pid), -1, "")
        inode = _inode(event.fd)
        note = ""
        if rule is not None and rule.holds and self._reporter is not None:
            note = self._held.refusal(who[0]) or ""
            if not note:
                token = self._held.hold(event.fd, event.pid, who[0])  # the event's fd is the hold's now
                if token:  # 0: the opener is gone, and hold() answered the event
                    self.stats.held += 1
                    self._reporter.put(event, path, name, who, inode, held=token)
                return True
            self.stats.held_refused += 1
        self._respond(event, False)
        self.stats.denied += 1
        if self._reporter is not None:
            self._reporter.put(event, path, name, who, inode, note=note)
        return False

    def _respond(self, event: fan.Event, allow: bool) -> None:
        try:
            fan.respond(self._fan_fd, event.fd, allow)
        except OSError:
            self.stats.errors += 1  # the opener was killed meanwhile: nothing waits for it

    def _respond_fd(self, event_fd: int, allow: bool) -> None:
        fan.respond(self._fan_fd, event_fd, allow)


def _inode(fd: int) -> Inode:
    try:
        st = os.fstat(fd)
    except OSError:
        return (0, 0)
    return (st.st_dev, st.st_ino)
