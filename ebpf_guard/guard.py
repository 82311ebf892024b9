"""The policy loop: sensor events → engine → verdict log → actuator (+ incident evidence).

Ordering is the point of this module: a decision is written and flushed to the verdict log
*before* anything is done about it; if the log cannot be written, the agent is frozen
(fail-closed). Evidence (the incident file) is gathered after the response, from the frozen tree.

An open the fanotify gate holds for a human (an ASK rule) is judged like any event; the answer
becomes the kernel's: approve → the open succeeds, deny or a timeout's deny → EPERM. Other
verdicts answer it at once. The held opener sleeps in the kernel, where the v2 freezer cannot
stop it: the cgroup reports "frozen" only once the open is answered, so while an open is held
the freeze *request* is what counts as frozen.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ebpf_guard import incident
from ebpf_guard.approvals import ApprovalDesk, Resolution
from ebpf_guard.auditlog import AuditLogError, VerdictLog, record_for
from ebpf_guard.enforce import cgroups
from ebpf_guard.enforce.actuator import Actuator, ActuatorError, release_process
from ebpf_guard.enforce.cgroups import CgroupError, Freezer
from ebpf_guard.enforce.prevention import Prevention
from ebpf_guard.events import NOTE_HELD, NOTE_RATE_HELD, Event
from ebpf_guard.output import Printer
from ebpf_guard.policy.engine import Engine
from ebpf_guard.recording import Recorder
from ebpf_guard.verdicts import Decision, Mode, Verdict

RECENT_EVENTS = 200  # events kept in memory for incident files
RESPONSE_VERDICTS = (Verdict.ASK, Verdict.HALT, Verdict.KILL)


@dataclass
class Summary:
    counts: Counter = field(default_factory=Counter)
    actions: list[str] = field(default_factory=list)
    incidents: list[str] = field(default_factory=list)
    events: int = 0
    halted: bool = False
    killed: bool = False
    failed_closed: bool = False


class _AskFlow:
    """The ASK half of the guard: asks the approval desk, applies its answers (thaw, kill, or
    leave frozen), and ties the opens the gate holds to the approvals they wait for. Mixed into
    Guard, whose state it shares."""

    desk: ApprovalDesk | None
    prevention: Prevention | None
    actuator: Actuator
    engine: Engine
    printer: Printer
    summary: Summary
    _held_by_halt: bool

    @property
    def mode(self) -> Mode:
        return self.engine.mode

    def _append_quietly(self, record: dict) -> None:
        raise NotImplementedError

    def _asked(self, decision: Decision) -> bool:
        return self._approval_for(decision) is not None

    def _approval_for(self, decision: Decision) -> str | None:
        """The id of the pending approval that asks about this decision, or about the same rule
        and value (a repeat, answered with it)."""
        if self.desk is None:
            return None
        pending = self.desk.pending()
        same = [p for p in pending if p.decision is decision]
        key = (decision.rule, decision.value)
        same = same or [p for p in pending if (p.decision.rule, p.decision.value) == key]
        return same[0].id if same else None

    def _frozen(self, freezer: Freezer) -> bool:
        if freezer.is_frozen():  # read from the kernel: an external resume counts
            return True
        # A held opener keeps the cgroup from reporting "frozen" (module doc): the request counts.
        return self.prevention is not None and self.prevention.holds.opens_waiting() and _freeze_requested(freezer)

    def _asks(self, decision: Decision) -> bool:
        """Will this decision wait for a human (so a held open waits with it)?"""
        return decision.verdict is Verdict.ASK and self.mode is not Mode.AUDIT and self.desk is not None

    def _settle_held_ask(self, decision: Decision) -> None:
        """A held open judged ASK waits for its approval (a new one or the pending one it
        repeats); with none to wait for (the log could not be written), it is refused."""
        assert self.prevention is not None
        if self._asks(decision):
            self.prevention.holds.settle(decision, self._approval_for(decision))

    def _freeze_around_held_open(self, decision: Decision) -> str:
        """Freeze the agent while a held open waits for its answer, without waiting for the
        freeze to complete: it cannot while the opener sleeps in the kernel (module doc)."""
        fz = self.actuator.freezer
        if fz is None or self.mode is Mode.AUDIT:
            return self.actuator.apply(decision)  # says why it cannot freeze
        try:
            fz.freeze()
        except CgroupError as e:
            raise ActuatorError(str(e)) from e
        return (f"froze {fz.path} (the opener waits in open(2) for the answer); "
                f"resume: ebpf-guard resume --cgroup {fz.path}; kill: ebpf-guard kill --cgroup {fz.path}")

    def _ask(self, decision: Decision) -> None:
        if self.desk is None:  # nobody can answer: treat as the HALT it would be in enforce mode
            self.summary.halted = True
            self._held_by_halt = True
            return
        timeout = decision.ask_timeout_s if decision.ask_timeout_s is not None else math.inf
        pending = self.desk.add(decision, timeout_s=timeout, default_allow=decision.ask_default == "allow")
        self.printer.message(
            f"ASK [{pending.id}] {pending.what}: {decision.reason}. The agent is frozen until "
            f"`ebpf-guard approve {pending.id}` or `ebpf-guard deny {pending.id}`"
            + (f" (or {timeout:.0f} s pass: default {decision.ask_default or 'deny'})"
               if timeout != math.inf else ""))

    def tick(self) -> None:
        """Serve the approval desk: answers, timeouts, refused non-root peers."""
        if self.desk is None:
            return
        for resolution in self.desk.poll():
            self._resolve(resolution)
        for refusal in self.desk.take_refusals():
            self._append_quietly(refusal.to_record())

    def _resolve(self, r: Resolution) -> None:
        decision = r.pending.decision
        self._append_quietly(r.to_record())  # who, when, how long it waited: before acting
        # The kernel's answer to opens held for it comes first: an approved one then reads on
        # the thaw below, a refused one fails with EPERM (and a KILL follows).
        holds = self.prevention.holds if self.prevention is not None else None
        gate = holds.answer_ask(r.pending.id, r.allow, decision) if holds is not None else None
        if r.remember:
            self.engine.remember(decision, r.allow)
        if r.allow:
            done = "allowed"
            if self.prevention is not None:
                self.prevention.approved(decision)
        elif (decision.on_deny or Verdict.KILL) is Verdict.KILL:
            deny = dataclasses.replace(decision, verdict=Verdict.KILL)
            try:
                done = self.actuator.apply(deny)
            except ActuatorError as e:
                done = f"FAILED: {e}"
            self.summary.killed = True
        else:
            self._held_by_halt = True
            self.summary.halted = True
            done = "denied: left frozen (HALT)"
        if not self._held_by_halt and not self.desk.pending():
            try:
                done += "; " + self.actuator.resume_now()
                if self.prevention is not None:
                    self.prevention.thawed()
            except ActuatorError as e:
                done += f"; FAILED to thaw: {e}"
        if gate is not None:
            done = f"{gate.describe()}; {done}"
        line = f"[{r.pending.id}] {'allowed' if r.allow else 'denied'} via {r.via}: {done}"
        self.summary.actions.append(f"ASK {decision.rule}: {line}")
        outcome = {"type": "outcome", "rule": decision.rule, "verdict": "ASK", "action": done,
                   "pid": decision.event.tgid, "approval": r.pending.id}  # fmt: skip
        if gate is not None:
            answer = "timeout" if r.via == "timeout" else "approve" if r.allow else "deny"
            outcome |= {"answer": answer, "open_allowed": r.allow and gate.allowed > 0,
                        "prevented": decision.prevented}  # fmt: skip
        self._append_quietly(outcome)
        self.printer.message(line)

    def _release_held_opens(self) -> None:
        """The guard stops and nobody can answer its approvals any more: the opens held for them
        get each one's ASK default now (left to the kernel, they would all be allowed)."""
        if self.desk is None or self.prevention is None:
            return
        for p in self.desk.pending():
            gate = self.prevention.holds.answer_ask(p.id, p.default_allow, p.decision)
            if gate is None:
                continue
            done = f"guard stopping: the ASK default ({'allow' if p.default_allow else 'deny'}): {gate.describe()}"
            self._append_quietly({"type": "outcome", "rule": p.rule, "verdict": "ASK", "action": done, "pid": p.pid,
                                  "approval": p.id, "answer": "shutdown",
                                  "open_allowed": p.default_allow and gate.allowed > 0,
                                  "prevented": p.decision.prevented})  # fmt: skip


class Guard(_AskFlow):
    """The policy loop: owns the order of judging, logging and acting for each event (module doc)."""

    def __init__(
        self,
        *,
        engine: Engine,
        actuator: Actuator,
        log: VerdictLog,
        printer: Printer,
        cgroup: Path | None,
        home_of: Callable[[int], str | None],
        recorder: Recorder | None = None,
        log_all: bool = False,
        incidents_dir: Path | None = None,
        desk: ApprovalDesk | None = None,
        prevention: Prevention | None = None,
    ) -> None:
        self.engine = engine
        self.actuator = actuator
        self.log = log
        self.printer = printer
        self.cgroup = cgroup
        self.home_of = home_of
        self.recorder = recorder
        self.log_all = log_all
        self.incidents_dir = incidents_dir
        self.desk = desk
        self.prevention = prevention
        self.recent: deque[Event] = deque(maxlen=RECENT_EVENTS)
        self.summary = Summary()
        self._held_by_halt = False  # a HALT froze the agent: answering an ASK must not thaw it
        self._killed: set[tuple[int, int]] = set()  # processes a KILL already went to
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ebpf-guard-incident")
        # The writer thread shares the GIL: hand it back to the event loop within 0.5 ms, not the
        # default 5 ms, so a response is never queued behind a long incident write.
        sys.setswitchinterval(0.0005)

    def handle(self, event: Event) -> Decision:
        # Held by the kernel: a gated exec, or the deletion that reached the rate rule's count.
        rate_held = NOTE_RATE_HELD in event.notes
        held = rate_held or NOTE_HELD in event.notes
        if held and self.prevention is not None:
            self.prevention.holding(event.tgid)
        decision = self._decide_and_respond(event)
        if self.prevention is not None and self.prevention.holds.is_held(event):
            self._settle_held_ask(decision)
        if held and not (decision.verdict is Verdict.KILL and self.mode is not Mode.AUDIT):
            # Decided (and, for HALT/ASK, frozen): let the held program go on. Not reached if
            # deciding raised, so a guard that fails leaves the program stopped.
            try:
                if self.prevention is not None:
                    self.prevention.releasing(event.tgid)
                    if rate_held and decision.verdict not in (Verdict.HALT, Verdict.ASK):
                        self.prevention.thawed()  # the engine let these deletions go: count anew
                release_process(event, self.cgroup)
            except ActuatorError as e:
                self.printer.message(f"could not release held pid {event.tgid}: {e}")
        return decision

    def _decide_and_respond(self, event: Event) -> Decision:
        if self.recorder is not None:
            self.recorder.write(event, self.home_of(event.uid))
        self.recent.append(event)
        decision = self.engine.evaluate(event)
        if not decision.prevented and self.prevention is not None:
            decision.prevented = self.prevention.refused_in_kernel(event)
        if self.prevention is not None and self.prevention.holds.is_held(event) and not self._asks(decision):
            self.prevention.holds.settle(decision, None)  # answered now, before it is logged
        self.summary.events += 1
        self.summary.counts[decision.verdict] += 1
        self.printer.decision(decision)
        if decision.verdict is Verdict.SAFE and not self.log_all:
            return decision
        repeat = self._already_handled(decision)
        responding = decision.verdict in RESPONSE_VERDICTS and self.mode is not Mode.AUDIT
        incident_path = self._incident_path(decision) if responding and not repeat else None
        try:
            self.log.append(
                record_for(
                    decision,
                    mode=self.mode.value,
                    action=repeat or self.actuator.plan(decision),
                    incident=str(incident_path) if incident_path else None,
                )
            )
        except AuditLogError as e:
            self._fail_closed(str(e))
            return decision
        if decision.verdict is Verdict.SAFE or repeat:
            return decision
        self._respond(decision, incident_path)
        return decision

    def _already_handled(self, decision: Decision) -> str | None:
        """Why no new response is needed, if so. Events buffered before a freeze or a kill keep
        arriving (a rate rule fires again every N deletions, execvp retries each PATH entry):
        they are logged, but the agent is not re-frozen and no new incident is written."""
        gated = self.prevention.holds.answered_open(decision.event) if self.prevention is not None else None
        if gated is not None:
            return gated  # the sensor's event of an open the gate held: answered already
        if self.mode is Mode.AUDIT:
            return None
        if decision.verdict in (Verdict.HALT, Verdict.ASK) and self.actuator.freezer is not None:
            if self._frozen(self.actuator.freezer):  # read from the kernel: an external resume counts
                if decision.verdict is Verdict.HALT or self._asked(decision):
                    return "none (already frozen)"
            elif self._held_by_halt:
                self._held_by_halt = False  # an operator resumed since: that hold is over
                if self.prevention is not None:
                    self.prevention.thawed()
        if decision.verdict is Verdict.KILL and decision.event.proc_key in self._killed:
            return "none (already killed)"
        return None

    def _respond(self, decision: Decision, incident_path: Path | None) -> None:
        try:
            if self.prevention is not None and self.prevention.holds.is_held(decision.event):
                done = self._freeze_around_held_open(decision)
            else:
                done = self.actuator.apply(decision)
        except ActuatorError as e:
            done = f"FAILED: {e}"
        if decision.verdict is not Verdict.FLAG:
            self.summary.actions.append(f"{decision.verdict.value} {decision.rule}: {done}")
            self.printer.message(f"{decision.verdict.value} ({decision.rule}): {done}")
        if self.mode is Mode.AUDIT or decision.verdict not in RESPONSE_VERDICTS:
            return
        if decision.verdict is Verdict.KILL:
            self.summary.killed = True
            self._killed.add(decision.event.proc_key)
        elif decision.verdict is Verdict.HALT:
            self.summary.halted = True
            self._held_by_halt = True
        else:
            self._ask(decision)
        self._append_quietly({"type": "outcome", "rule": decision.rule, "verdict": decision.verdict.value,
                              "action": done, "pid": decision.event.tgid})
        if incident_path is not None:
            self._write_incident(decision, incident_path)

    def _incident_path(self, decision: Decision) -> Path | None:
        if self.incidents_dir is None:
            return None
        stamp = time.strftime("%Y%m%dT%H%M%S")
        rule = "".join(c if c.isalnum() or c in "-_." else "_" for c in decision.rule)[:60]
        return self.incidents_dir / f"incident-{stamp}-{decision.event.tgid}-{rule}.json"

    def _write_incident(self, decision: Decision, path: Path) -> None:
        # The tree is snapshotted while frozen (HALT/ASK leave it frozen; for KILL the survivors
        # are frozen just for the snapshot), so nothing changes under psutil's feet.
        thaw_after = False
        try:
            if decision.verdict is Verdict.KILL and self.cgroup is not None and cgroups.is_populated(self.cgroup):
                self.actuator.freeze_now()
                thaw_after = True
            tree = incident.snapshot_tree(self._tree_pids(decision.event))
        finally:
            if thaw_after:
                self.actuator.freezer.thaw()
        # Serialising, redacting and writing ~200 events takes tens of ms: off the loop's thread,
        # which must keep reading events. The snapshot above is what had to happen while frozen.
        self._writer.submit(self._store_incident, decision, path, list(self.recent), tree)

    def _store_incident(self, decision: Decision, path: Path, recent: list[Event], tree: list[dict]) -> None:
        record = {"verdict": decision.verdict.value, "rule": decision.rule, "reason": decision.reason,
                  "mode": self.mode.value, "event": decision.event.to_dict()}
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            written = incident.write_incident(path.parent, record=self.log.redact(record),
                                              recent_events=self.log.redact([e.to_dict() for e in recent]),
                                              tree=self.log.redact(tree), name=path.name)
            self.summary.incidents.append(str(written))
        except OSError as e:
            self.printer.message(f"could not write incident {path}: {e}")

    def close(self) -> None:
        """Answer the opens still held for an approval, and wait for incident files still being
        written."""
        self._release_held_opens()
        self._writer.shutdown(wait=True)

    def _tree_pids(self, event: Event) -> list[int]:
        if self.cgroup is not None:
            return cgroups.pids(self.cgroup)
        return [event.tgid]

    def note(self, record: dict) -> None:
        """A non-verdict record (session start/end, ...); fail-closed like every other write."""
        self._append_quietly(record)

    def events_lost(self, count: int, total: int, *, freeze: bool) -> None:
        """The sensor lost `count` events (perf buffer full): syscalls nobody judged. Logged;
        with `freeze` (enforce mode, policy on_loss: freeze) the agent is frozen as for a HALT."""
        action = "none (on_loss: ignore)"
        if freeze:
            try:
                action = f"froze: {self.actuator.freeze_now()}"
                self.summary.halted = True
                self._held_by_halt = True
            except ActuatorError as e:
                action = f"FAILED to freeze: {e}"
            self.summary.actions.append(f"HALT lost-events: {action}")
        self._append_quietly({"type": "loss", "lost": count, "lost_total": total, "action": action})
        self.printer.message(f"{count} events LOST ({total} in all): {action}")

    def _append_quietly(self, record: dict) -> None:
        try:
            self.log.append(record)
        except AuditLogError as e:
            self._fail_closed(str(e))

    def _fail_closed(self, error: str) -> None:
        self.summary.failed_closed = True
        try:
            done = self.actuator.freeze_now()
        except ActuatorError as e:
            done = f"FAILED to freeze: {e}"
        self.summary.halted = True
        action = f"fail-closed: {done}"
        if action not in self.summary.actions[-1:]:  # a full disk fails every record, not one
            self.summary.actions.append(action)
        # One line per failure, the same while the cause lasts (so nothing that varies, such as
        # how long the freeze took, goes in it): the printer prints it once and counts the
        # repeats; the verdict log counts the records themselves. What was done is in the summary.
        frozen = "the agent is frozen" if not done.startswith("FAILED") else done
        self.printer.message(f"cannot write the verdict log ({error}); fail-closed: {frozen}")


def _freeze_requested(freezer: Freezer) -> bool:
    """Has the v2 cgroup been asked to freeze (cgroup.freeze is 1), complete or not?"""
    try:
        return (freezer.path / "cgroup.freeze").read_text().strip() == "1"
    except OSError:
        return False
