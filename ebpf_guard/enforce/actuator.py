"""Turn a Decision into action (signal, freeze, cgroup kill) and say in one line what was done.

The actuator is the only module that touches processes. It never decides anything: the engine
chose the verdict, the loop chose to call us, and a failure is raised as ActuatorError for the
loop to log and handle.

PID reuse: a pid from an event may belong to a different process by the time we act. Before
signalling we pin the pid with a pidfd, then check the process behind it is the event's
process (same start time); the signal goes through the pidfd, so there is no window in which
the pid can be recycled between check and kill.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from ebpf_guard.enforce import cgroups
from ebpf_guard.enforce.cgroups import CgroupError, Freezer
from ebpf_guard.events import Event
from ebpf_guard.sensor import procfs
from ebpf_guard.verdicts import Decision, Mode, Scope, Verdict

# /proc start times are in clock ticks (10 ms at USER_HZ=100); allow a tick of rounding each way.
_START_TOLERANCE_NS = 2 * 1_000_000_000 // procfs.CLK_TCK


class ActuatorError(Exception):
    """An action that could not be carried out, phrased as one line."""


# --- process identity ----------------------------------------------------------------------


def process_start_ns(pid: int) -> int | None:
    """A process's start as CLOCK_MONOTONIC ns (the Event.start_ns convention), at tick
    resolution; None if the pid is gone. The kernel keeps it as task->start_time."""
    ticks = procfs.start_ticks(pid)
    if ticks is None:
        return None
    return procfs.ticks_to_monotonic_ns(ticks)


def _same_start(pid: int, start_ns: int) -> bool | None:
    """Does `pid` still belong to the process that started at `start_ns`? None if it is gone.

    /proc counts from boot (task->start_boottime) while Event.start_ns is monotonic
    (task->start_time); they differ by suspend time, which we add back. A sensor that stored
    boot time instead still matches the second comparison.
    """
    ticks = procfs.start_ticks(pid)
    if ticks is None:
        return None
    boot_ns = procfs.ticks_to_ns(ticks)
    candidates = (start_ns + procfs.boot_to_monotonic_ns(), start_ns)
    # /proc truncates to whole ticks, so boot_ns <= the true start < boot_ns + one tick.
    return any(abs(c - boot_ns) <= _START_TOLERANCE_NS for c in candidates)


def kill_process(event: Event, watched: Path | None = None) -> str:
    """SIGKILL the event's process (tgid) if it is still that process. Returns what happened."""
    return signal_process(event, signal.SIGKILL, watched)


def release_process(event: Event, watched: Path | None = None) -> str:
    """SIGCONT a process the kernel held at exec (the exec gate) once it has been decided."""
    return signal_process(event, signal.SIGCONT, watched)


def signal_process(event: Event, sig: int, watched: Path | None = None) -> str:
    """Send `sig` to the event's process (tgid) through a pidfd, if it is still that process."""
    pid, who = event.tgid, f"pid {event.tgid} ({event.comm})"
    verb = {signal.SIGKILL: "killed", signal.SIGCONT: "released"}.get(sig, f"sent {sig} to")
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return f"{who} had already exited"
    except OSError as e:
        raise ActuatorError(f"cannot open {who}: {e.strerror}") from e
    try:
        if event.start_ns:
            same = _same_start(pid, event.start_ns)
            if same is None:
                return f"{who} had already exited"
            if not same:
                return f"{who} had already exited; its pid now belongs to another process"
        elif watched is not None:
            # No start time to compare: at least refuse to shoot outside the watched cgroup.
            try:
                inside = cgroups.is_within(cgroups.cgroup_of_pid(pid), watched)
            except CgroupError:
                return f"{who} had already exited"
            if not inside:
                return f"{who} is no longer in {watched}; left alone (pid reused?)"
        try:
            signal.pidfd_send_signal(pidfd, sig)
        except ProcessLookupError:
            return f"{who} had already exited"
        except OSError as e:
            raise ActuatorError(f"cannot signal {who}: {e.strerror}") from e
        return f"{verb} {who}"
    finally:
        os.close(pidfd)


# --- the actuator --------------------------------------------------------------------------


class Actuator:
    """Carries out decisions against one watched cgroup (or none, when watching bare pids)."""

    def __init__(
        self,
        cgroup: Path | None,
        *,
        freezer: Freezer | None = None,
        mode: Mode = Mode.ENFORCE,
        freeze_timeout: float = 1.0,
    ) -> None:
        self.cgroup = cgroup
        if freezer is None and cgroups.can_freeze_v2(cgroup):
            assert cgroup is not None
            freezer = cgroups.V2Freezer(cgroup)
        self.freezer = freezer
        self.mode = mode
        self.freeze_timeout = freeze_timeout

    def plan(self, decision: Decision) -> str:
        """What apply() will do, in one line, without doing it (for the log record written
        before acting)."""
        if self.mode == Mode.AUDIT:
            return "none (audit mode)"
        verdict, ev = decision.verdict, decision.event
        if verdict in (Verdict.SAFE, Verdict.FLAG):
            return "none"
        if verdict in (Verdict.HALT, Verdict.ASK):
            return f"freeze {self.freezer.path}" if self.freezer else "freeze (no cgroup: cannot)"
        kernel = "killed in kernel at exec entry; " if decision.enforced_in_kernel else ""
        if decision.scope == Scope.CGROUP and self._group() is not None:
            return f"{kernel}kill cgroup {self._group()}"
        return f"{kernel}SIGKILL pid {ev.tgid} ({ev.comm})"

    def freeze_now(self) -> str:
        """Freeze regardless of mode and verdict: the loop's fail-closed response (e.g. when
        the verdict log cannot be written)."""
        try:
            return self._freeze()
        except CgroupError as e:
            raise ActuatorError(str(e)) from e

    def resume_now(self) -> str:
        """Thaw after an ASK was answered (the loop decides when nothing else holds it)."""
        if self.freezer is None:
            raise ActuatorError("cannot thaw: nothing was frozen")
        try:
            self.freezer.thaw()
        except CgroupError as e:
            raise ActuatorError(str(e)) from e
        return f"thawed {self.freezer.path}"

    def apply(self, decision: Decision) -> str:
        """Act on the decision; return a one-line description of what was done."""
        if self.mode == Mode.AUDIT:
            return "none (audit mode)"
        verdict = decision.verdict
        if verdict in (Verdict.SAFE, Verdict.FLAG):
            return "none"
        try:
            if verdict in (Verdict.HALT, Verdict.ASK):
                # ASK is frozen the same way; waiting for the human is the caller's business.
                return self._freeze()
            if verdict == Verdict.KILL:
                return self._kill(decision)
        except CgroupError as e:
            raise ActuatorError(str(e)) from e
        raise ActuatorError(f"unknown verdict {verdict!r}")

    def _freeze(self) -> str:
        if self.freezer is None:
            if self.cgroup is None:
                raise ActuatorError("cannot freeze: no cgroup is being watched")
            raise ActuatorError(f"cannot freeze: {self.cgroup} has no cgroup.freeze "
                                "and no v1 freezer was set up")
        fz = self.freezer
        fz.freeze()
        path = fz.path
        done = f"froze {path}"
        if not fz.wait_frozen(self.freeze_timeout):
            done = f"freeze of {path} requested, not complete after {self.freeze_timeout:g}s"
        return (
            f"{done}; resume: ebpf-guard resume --cgroup {path}; "
            f"kill: ebpf-guard kill --cgroup {path}"
        )

    def _kill(self, decision: Decision) -> str:
        parts = []
        if decision.enforced_in_kernel:
            parts.append("killed in kernel at exec entry")
        group = self._group()
        if decision.scope == Scope.CGROUP and group is not None:
            n = self._kill_group()
            parts.append(f"killed cgroup {group} ({n} processes)")
        elif decision.enforced_in_kernel:
            # Idempotent back-up: the kernel's SIGKILL should already have done it.
            if procfs.alive(decision.event.tgid):
                res = kill_process(decision.event, self.cgroup)
                if res.startswith("killed"):
                    parts.append(f"pid {decision.event.tgid} still alive, SIGKILL sent again")
        else:
            parts.append(kill_process(decision.event, self.cgroup))
            if decision.scope == Scope.CGROUP:
                parts.append("no cgroup watched, so only the process")
        return "; ".join(parts)

    def _group(self) -> Path | None:
        """The path that names "the whole agent": the v2 cgroup, else the v1 freezer's."""
        if self.cgroup is not None:
            return self.cgroup
        return self.freezer.path if self.freezer is not None else None

    def _kill_group(self) -> int:
        """SIGKILL the whole agent; returns how many processes were in it."""
        members: set[int] = set()
        if self.cgroup is not None:
            members.update(cgroups.pids(self.cgroup))
            cgroups.kill_cgroup(self.cgroup)  # cgroup.kill: the fastest, and fork-proof
        if self.freezer is not None and self.freezer.path != self.cgroup:
            # A v1 freezer cgroup can hold processes the v2 cgroup does not (or there is none).
            members.update(self.freezer.pids())
            self.freezer.kill()
        return len(members)


# --- `ebpf-guard resume|kill --cgroup` -----------------------------------------------------


def operator_freezer(spec: str | Path, *, force: bool = False) -> Freezer:
    """The freezer behind a cgroup the operator names, once it passed the scope guard: never a
    root, init.scope or a cgroup holding the guard; never one ebpf-guard did not create or
    watch, unless `force`. Raises ScopeError (refused) or ActuatorError (no such cgroup)."""
    try:
        fz = cgroups.freezer_at(spec)
    except CgroupError as e:
        raise ActuatorError(str(e)) from e
    cgroups.refuse_outside_scope(fz.path)
    cgroups.refuse_unowned(fz.path, force)
    return fz


def resume(spec: str | Path, *, force: bool = False) -> str:
    """Thaw a frozen cgroup (v2 spec or a v1 freezer path we printed)."""
    fz = operator_freezer(spec, force=force)
    try:
        fz.thaw()
    except CgroupError as e:
        raise ActuatorError(str(e)) from e
    return f"thawed {fz.path}"


def kill_all(spec: str | Path, *, force: bool = False, timeout: float = 2.0) -> str:
    """SIGKILL everything in a cgroup's subtree (frozen or not), wait, bounded, for it to
    empty, then remove it if ebpf-guard created it."""
    fz = operator_freezer(spec, force=force)
    try:
        n = len(fz.pids())
        fz.kill()
        deadline = time.monotonic() + timeout
        while fz.pids() and time.monotonic() < deadline:
            time.sleep(0.01)
        left = len(fz.pids())
        removed = ""
        if not left and cgroups.marked_role(fz.path) == cgroups.ROLE_CREATED:
            fz.remove()
            removed = "; removed it (ebpf-guard created it)"
    except CgroupError as e:
        raise ActuatorError(str(e)) from e
    tail = f"; {left} still exiting after {timeout:g}s" if left else removed
    return f"killed {n} processes in {fz.path}{tail}"
