"""The prevention layers of one session, set up from the policy and torn down with it.

Where the sensor and engine judge a syscall after it happened, these layers refuse it before:

  - BPF-LSM, where the kernel accepts LSM programs (Debian's stock kernels): protected files,
    listed tools and the deletion rate in the security hooks; SIGCONT to a held task refused
    (lsm.py). Where it runs, the fanotify gate is not set up: the hooks judge the same files;
  - file gates (fanotify permission events): protected files and listed tools, any process
    in the watched cgroup gets EPERM (gates.py);
  - egress (cgroup-BPF connect/sendmsg hooks on the watched cgroup v2): EPERM for
    destinations the policy denies, and the network-burst rate counted in the kernel
    (egress.py);
  - the kernel's exec and rate holds live in the sensor (bpf/sensor.c); the guard releases
    them here when it lets a held program go, and resets the rate counters on a thaw;
  - the Landlock jail is `run`'s alone (jail.py; session.prepare_jail).

An open the gate holds for a human (an ASK rule) is handed to the guard like a refused one; the
guard's answer (`GateHolds.settle` at once, or `answer_ask` when the approval is answered) is the
kernel's answer to the opener. The sensor's own event for that open comes after the answer, when
the syscall returns: `answered_open` tells the guard it was decided already.

A layer that this host or session cannot have is said once, at start, in one line each; it
never fails the session silently or half set up. The guard keeps judging every event, so a
refused syscall is still logged (`prevented`), with the rule that judged it.
"""

from __future__ import annotations

import errno
import os
import queue
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ebpf_guard.enforce import cgroups
from ebpf_guard.events import READ, WRITE, Event, Kind
from ebpf_guard.policy.identities import local_homes
from ebpf_guard.sensor import procfs
from ebpf_guard.verdicts import Decision, Mode, Verdict

if TYPE_CHECKING:
    from ebpf_guard.enforce.egress import Egress
    from ebpf_guard.enforce.gates import FileGate, GateDecision
    from ebpf_guard.enforce.lsm import LsmEnforcer
    from ebpf_guard.policy import Policy
    from ebpf_guard.sensor import Sensor

NOTE_GATE_HELD = "held_by_gate"  # an open the gate holds until the guard answers it
ANSWER_MEMORY_NS = 30 * 1_000_000_000  # how long an answered open waits for the sensor's event of it
MAX_ANSWERED = 256


@dataclass
class _Hold:
    """An open the gate holds: its token, what the gate saw, and the event the guard judges."""

    token: int
    denial: GateDecision
    event: Event


@dataclass(frozen=True)
class _Answered:
    """An open the gate held and the guard answered; its sensor event is still to come."""

    tid: int
    ino: int
    path: str
    allowed: bool
    ask: str
    until_ns: int


@dataclass(frozen=True)
class GateAnswers:
    """What became of the opens held for one approval."""

    allowed: int = 0
    refused: int = 0
    gone: int = 0  # the opener died (or the gate closed) before the answer

    def describe(self) -> str:
        parts = [f"{n} {what}" for n, what in ((self.allowed, "allowed"), (self.refused, "refused (EPERM)"),
                                                (self.gone, "gone before the answer")) if n]  # fmt: skip
        return f"held open{'s' if sum((self.allowed, self.refused, self.gone)) > 1 else ''}: {', '.join(parts)}"


class GateHolds:
    """Owns the guard's side of the opens the gate holds for an answer: the ones not judged yet,
    which approval each waits for, and the answered ones whose sensor event is still to come."""

    def __init__(self) -> None:
        self.gate: FileGate | None = None
        self._unsettled: dict[int, _Hold] = {}  # id(event) -> held open not yet judged
        self._waiting: dict[str, list[_Hold]] = {}  # approval id -> held opens
        self._answered: list[_Answered] = []

    def add(self, ev: Event, d: GateDecision) -> None:
        """`ev` is the gate's event of held open `d`, about to be judged."""
        self._unsettled[id(ev)] = _Hold(d.held, d, ev)

    def is_held(self, ev: Event) -> bool:
        """Is this the gate's event of an open that waits for the guard's answer?"""
        hold = self._unsettled.get(id(ev))
        return hold is not None and hold.event is ev

    def settle(self, decision: Decision, ask: str | None) -> str:
        """The guard judged a held open: it waits for approval `ask`, or (no ask) is answered
        now, allowed only when the verdict lets it pass (SAFE, FLAG: e.g. an operator's
        remembered "allow"). Sets `decision.prevented` when refused; says what was done."""
        hold = self._unsettled.pop(id(decision.event))
        if ask:
            self._waiting.setdefault(ask, []).append(hold)
            return f"held until [{ask}] is answered"
        allow = decision.verdict in (Verdict.SAFE, Verdict.FLAG)
        result = self._answer(hold, allow, "")
        decision.prevented = result == "refused"
        if decision.prevented:
            decision.event.ret = -errno.EPERM  # what the opener got, for the record written next
        return f"held open {result}"

    def answer_ask(self, ask: str, allow: bool, decision: Decision | None = None) -> GateAnswers | None:
        """An approval was answered (or timed out): the opens held for it get the same answer.
        None when no open waits for it. Sets `decision.prevented` when they were refused."""
        holds = self._waiting.pop(ask, [])
        if not holds:
            return None
        results = [self._answer(h, allow, ask) for h in holds]
        if decision is not None:
            decision.prevented = not allow
        return GateAnswers(results.count("allowed"), results.count("refused"), results.count("gone"))

    def opens_waiting(self) -> bool:
        """Does any open wait for an approval?"""
        return bool(self._waiting)

    def answered_open(self, ev: Event) -> str | None:
        """If `ev` is the sensor's event of an open the gate held and the guard answered (it is
        reported when the syscall returns, after the answer), what was done; else None."""
        if ev.kind is not Kind.OPEN or NOTE_GATE_HELD in ev.notes or not self._answered:
            return None
        now = time.monotonic_ns()
        self._answered = [a for a in self._answered if a.until_ns > now]
        for a in self._answered:
            if a.tid != ev.pid or (ev.ret is not None and (ev.ret >= 0) != a.allowed):
                continue
            names = {p for p in (ev.real_path, ev.path, ev.raw_path) if p}
            base = os.path.basename(a.path)
            if (ev.ino and ev.ino == a.ino) or a.path in names or any(os.path.basename(p) == base for p in names):
                self._answered.remove(a)
                by = f" by [{a.ask}]" if a.ask else ""
                return f"none (held at the gate and {'allowed' if a.allowed else 'refused'}{by})"
        return None

    def _answer(self, hold: _Hold, allow: bool, ask: str) -> str:
        if self.gate is None or not self.gate.answer(hold.token, allow):
            return "gone"
        d = hold.denial
        self._answered.append(_Answered(d.tid, d.ino, d.path, allow, ask, time.monotonic_ns() + ANSWER_MEMORY_NS))
        del self._answered[:-MAX_ANSWERED]
        return "allowed" if allow else "refused"

    def clear(self) -> None:
        self.gate = None
        self._unsettled.clear()
        self._waiting.clear()


@dataclass
class Prevention:
    """Owns the running prevention layers of one session (file gate, egress) and what the guard
    tells them: a held program let go, an operator's approval of a destination, a thaw."""

    lsm: LsmEnforcer | None = None
    gate: FileGate | None = None
    egress: Egress | None = None
    sensor: Sensor | None = None
    lines: list[str] = field(default_factory=list)  # what was set up, and what could not be
    record: dict[str, Any] = field(default_factory=dict)  # the same, for the session record
    _denials: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    _approved: set[tuple[str, int]] = field(default_factory=set)  # destinations an operator allowed
    holds: GateHolds = field(default_factory=GateHolds)  # opens the gate holds for the guard's answer

    # -- set-up --------------------------------------------------------------------------

    @classmethod
    def start(cls, policy: Policy, *, mode: Mode, cgroup: Path | None, workspace: str,
              hosts: dict[str, list[str]], sensor: Sensor) -> Prevention:
        """Every layer this host and session allow. Raises nothing a layer can cause: what
        fails is in `lines` (a failure to *stop* a layer later is not possible to hide either:
        see close)."""
        self = cls(sensor=sensor)
        policy = replace(policy, mode=mode)
        try:
            self._start_lsm(policy, cgroup, workspace)
            if self.lsm is None:
                self._start_gate(policy, cgroup, workspace)
            else:
                # BPF-LSM judges the plain file rules earlier, in the kernel. An LSM hook cannot
                # wait for a human or ask the engine who the opener is: ASK file rules and rules
                # with exceptions or process conditions stay with the gate, which can.
                rest = tuple(r for r in policy.rules if r.userspace_only or r.verdict is Verdict.ASK)
                if rest:
                    self._start_gate(replace(policy, rules=rest), cgroup, workspace)
            self._start_egress(policy, mode, cgroup, hosts)
        except BaseException:
            self.close()
            raise
        return self

    def _start_lsm(self, policy: Policy, cgroup: Path | None, workspace: str) -> None:
        from ebpf_guard.enforce.lsm import LsmEnforcer, LsmError, lsm_status, plan_lsm

        usable, why = lsm_status()
        if not usable:
            self._say("lsm", {"error": why}, f"BPF-LSM: not here: {why}")
            return
        if cgroup is None or policy.mode is Mode.AUDIT:
            self._say("lsm", None, "BPF-LSM: not used: " + ("audit mode" if cgroup is not None else
                                                             "--pid sessions have no cgroup to scope it to"))
            return
        try:
            plan = plan_lsm(policy, policy.identities, workspace=workspace, homes=local_homes())
            lsm = LsmEnforcer([cgroup], plan)
            lsm.start()
        except LsmError as e:
            self._say("lsm", {"error": str(e)}, f"BPF-LSM: not used: {e}")
            return
        self.lsm = lsm
        self._say("lsm", {"rules": plan.describe()}, "BPF-LSM: file, exec and delete rules in the kernel's hooks",
                  *(f"  lsm: {x}" for x in plan.describe()))

    def _start_gate(self, policy: Policy, cgroup: Path | None, workspace: str) -> None:
        from ebpf_guard.enforce.gates import FileGate, GateError, plan_gates, watched_by_cgroup

        if cgroup is None:
            self._say("gate", None, "file gates: none: --pid sessions have no cgroup to tell the "
                                    "agent's opens from the host's (watch a cgroup to gate them)")
            return
        plan = plan_gates(policy, workspace=workspace, homes=local_homes(), identities=policy.identities)
        if not any(m.target != "ignore" for m in plan.marks):
            self._say("gate", {"marks": 0, "notes": list(plan.notes)},
                      "file gates: none: the policy names no protected file or tool to gate", *plan.notes)
            return
        gate = FileGate(plan, is_watched=watched_by_cgroup(cgroup), on_decision=self._denials.put)
        try:
            gate.start()
        except GateError as e:
            self._say("gate", {"error": str(e)}, f"file gates: none: {e}")
            return
        self.gate = self.holds.gate = gate
        lines = [f"file gates (fanotify): {len(plan.marks)} marks", *(f"  {x}" for x in plan.describe()),
                 *(f"  not marked: {n}" for n in gate.notes)]
        self._say("gate", {"marks": [m.path for m in plan.marks if m.target != "ignore"],
                           "notes": list(plan.notes) + gate.notes}, *lines)

    def _start_egress(self, policy: Policy, mode: Mode, cgroup: Path | None,
                      hosts: dict[str, list[str]]) -> None:
        from ebpf_guard.enforce.egress import Egress, EgressError, plan_egress

        if cgroup is None or cgroups.find_v2_mount() not in (cgroup, *cgroup.parents):
            self._say("egress", None, "egress: not in the kernel: cgroup-BPF needs a cgroup v2 "
                                      "(connects are judged after the fact)")
            return
        try:
            plan = plan_egress(policy, hosts=hosts, mode=mode)
            egress = Egress(cgroup, plan)
            egress.start()
        except EgressError as e:
            self._say("egress", {"error": str(e)}, f"egress: not in the kernel: {e}")
            return
        self.egress = egress
        self._say("egress", plan.as_record(), *(f"egress: {x}" for x in plan.describe()))

    def _say(self, layer: str, record: Any, *lines: str) -> None:
        self.lines.extend(lines)
        self.record[layer] = record

    # -- what the guard tells the layers ----------------------------------------------------

    def hosts_changed(self, mapping: dict[str, list[str]]) -> None:
        if self.egress is not None:
            self.egress.update_hosts(mapping)

    def approved(self, decision: Decision) -> None:
        """An operator allowed this decision: a connect the kernel refused may now pass."""
        ev = decision.event
        if self.egress is not None and ev.kind is Kind.CONNECT and ev.family in ("ipv4", "ipv6") and ev.port:
            self.egress.allow(ev.addr, ev.port)
            self._approved.add((ev.addr, ev.port))

    def refused_in_kernel(self, ev: Event) -> bool:
        """Did the egress programs refuse this connect/sendto? The sensor reads those at syscall
        entry, before any result, so the answer comes from the plan the programs were loaded
        with (operator approvals aside; the burst's own refusals are not known here)."""
        from ebpf_guard.enforce.egress import DENY, EgressError

        if self.egress is None or ev.kind is not Kind.CONNECT or ev.family not in ("ipv4", "ipv6"):
            return False
        if not ev.addr or (ev.addr, ev.port) in self._approved or not self.egress.plan.enforce:
            return False
        try:
            return bool(self.egress.plan.decide(ev.addr, ev.port, ev.protocol) & DENY)
        except EgressError:
            return False

    def holding(self, tgid: int) -> None:
        """The kernel held this program (exec gate or rate hold): where BPF-LSM runs, SIGCONT
        from the agent's other processes is refused outright, not only fatal to the program."""
        if self.lsm is not None:
            self.lsm.hold(tgid)

    def releasing(self, tgid: int) -> None:
        """The guard is about to SIGCONT a program the kernel held: lift the kernel's mark
        first, or the program dies at its first syscall (that mark is what makes a SIGCONT
        from anyone else fatal)."""
        if self.sensor is not None:
            self.sensor.release_held(tgid)
        if self.lsm is not None:
            self.lsm.release(tgid)

    def thawed(self) -> None:
        """The agent runs again after a HALT: the kernel's rate counters start over."""
        if self.egress is not None:
            self.egress.reset_burst()
        if self.sensor is not None:
            self.sensor.reset_rate()
        if self.lsm is not None:
            self.lsm.reset_rate()

    def gate_event(self, d: GateDecision) -> Event:
        """The syscall a gate refused or holds, as the sensor would report it had it seen the
        file: the sensor's own event for a refused open names only the text asked for (no file
        was opened, so nothing to walk), so a symlink or hard link to a key would go unjudged.
        The gate saw the file itself: its path and inode, and the rule that named it. A held
        open has no result yet (ret None); the guard's answer to it is `settle`d."""
        from ebpf_guard.enforce.gates import GateKind

        st = self.sensor.process(d.pid) if self.sensor is not None else None
        uid, comm = d.uid, d.comm
        kinds = {r.name: r.kind for r in self.gate.plan.rules} if self.gate is not None else {}
        ev = Event(Kind.EXEC if d.mask == "exec" else Kind.OPEN, time.monotonic_ns(), d.tid, d.pid,
                   st.ppid if st else 0, uid, comm, 0, st.start_ns if st else 0,
                   raw_path=d.path, path=d.path, ret=None if d.held else -errno.EPERM)
        ev.real_path, ev.dev, ev.ino, ev.exe = d.path, d.dev, d.ino, st.exe if st else ""
        if st is None:
            # The gate's answer outruns the sensor's events (perf buffers, the loop): a process
            # just started (ssh under git) is not in its model yet. Who it is and who started
            # it decide rules with process conditions, so read them while it waits for us.
            stat = procfs.read_stat(d.pid)
            ev.ppid = stat[0] if stat else 0
            ev.exe = procfs.read_exe(d.pid).removesuffix(" (deleted)")
        ev.notes = (NOTE_GATE_HELD,) if d.held else ("refused_by_gate",)
        if ev.kind is Kind.EXEC:
            ev.argv = (d.path,)
        else:
            ev.access = frozenset({WRITE} if kinds.get(d.rule) is GateKind.WRITE else {READ})
        if d.held:
            self.holds.add(ev, d)
        return ev

    def denials(self) -> list[GateDecision]:
        """Gate refusals and holds since the last call (reported by the gate's thread)."""
        out = []
        while True:
            try:
                out.append(self._denials.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        """Stop every layer. The gate answers the opens it still holds with the policy's ASK
        default (the kernel would allow them when its group closes)."""
        for layer in (self.gate, self.egress, self.lsm):
            if layer is not None:
                layer.close()
        self.gate = self.egress = self.lsm = None
        self.holds.clear()


def gate_record(d: GateDecision) -> dict[str, Any]:
    """The log record of one gate refusal or hold (the event for the same syscall carries the
    verdict; this says which layer refused or holds it, and why a held rule refused at once)."""
    rec = {"type": "held" if d.held else "prevented", "layer": "fanotify", "pid": d.pid, "tid": d.tid,
           "path": d.path, "access": d.mask, "rule": d.rule}  # fmt: skip
    if d.note:
        rec["why"] = d.note
    return rec
