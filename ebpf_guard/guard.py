"""The policy loop: sensor events → engine → verdict log → actuator (+ incident evidence).

Ordering is the point of this module: a decision is written and flushed to the verdict log
*before* anything is done about it; if the log cannot be written, the agent is frozen
(fail-closed). Evidence (the incident file) is gathered after the response, from the frozen tree.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ebpf_guard import cgroups, incident
from ebpf_guard.actuator import Actuator, ActuatorError
from ebpf_guard.auditlog import AuditLogError, VerdictLog, record_for
from ebpf_guard.engine import Engine
from ebpf_guard.events import Event
from ebpf_guard.output import Printer
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


class Guard:
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
        self.recent: deque[Event] = deque(maxlen=RECENT_EVENTS)
        self.summary = Summary()

    @property
    def mode(self) -> Mode:
        return self.engine.mode

    def handle(self, event: Event) -> Decision:
        if self.recorder is not None:
            self.recorder.write(event, self.home_of(event.uid))
        self.recent.append(event)
        decision = self.engine.evaluate(event)
        self.summary.events += 1
        self.summary.counts[decision.verdict] += 1
        self.printer.decision(decision)
        if decision.verdict is Verdict.SAFE and not self.log_all:
            return decision
        responding = decision.verdict in RESPONSE_VERDICTS and self.mode is not Mode.AUDIT
        incident_path = self._incident_path(decision) if responding else None
        try:
            self.log.append(
                record_for(
                    decision,
                    mode=self.mode.value,
                    action=self.actuator.plan(decision),
                    incident=str(incident_path) if incident_path else None,
                )
            )
        except AuditLogError as e:
            self._fail_closed(str(e))
            return decision
        if decision.verdict is Verdict.SAFE:
            return decision
        self._respond(decision, incident_path)
        return decision

    def _respond(self, decision: Decision, incident_path: Path | None) -> None:
        try:
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
        else:
            self.summary.halted = True
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
        recent = [e.to_dict() for e in self.recent]
        record = {"verdict": decision.verdict.value, "rule": decision.rule, "reason": decision.reason,
                  "mode": self.mode.value, "event": decision.event.to_dict()}
        try:
            self.incidents_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            written = incident.write_incident(path.parent, record=self.log.redact(record),
                                              recent_events=self.log.redact(recent),
                                              tree=self.log.redact(tree), name=path.name)
            self.summary.incidents.append(str(written))
        except OSError as e:
            self.printer.message(f"could not write incident {path}: {e}")

    def _tree_pids(self, event: Event) -> list[int]:
        if self.cgroup is not None:
            return cgroups.pids(self.cgroup)
        return [event.tgid]

    def _append_quietly(self, record: dict) -> None:
        try:
            self.log.append(record)
        except AuditLogError as e:
            self._fail_closed(str(e))

    def _fail_closed(self, error: str) -> None:
        self.summary.failed_closed = True
        self.printer.message(f"cannot write the verdict log ({error}): freezing the agent (fail-closed)")
        try:
            done = self.actuator.freeze_now()
        except ActuatorError as e:
            done = f"FAILED to freeze: {e}"
        self.summary.halted = True
        self.summary.actions.append(f"fail-closed: {done}")
        self.printer.message(done)
