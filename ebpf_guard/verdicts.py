"""Verdicts and decisions: what the engine says about one event."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from ebpf_guard.events import Event


class Verdict(str, Enum):
    SAFE = "SAFE"  # allow, log only with --log-all
    FLAG = "FLAG"  # allow and log; enough FLAGs in a window escalate to HALT
    ASK = "ASK"  # freeze the cgroup and wait for a human
    HALT = "HALT"  # freeze the cgroup and leave it frozen
    KILL = "KILL"  # SIGKILL the process (scope=process) or the cgroup (scope=cgroup)

    @property
    def severity(self) -> int:
        return _SEVERITY[self]


_SEVERITY = {Verdict.SAFE: 0, Verdict.FLAG: 1, Verdict.ASK: 2, Verdict.HALT: 3, Verdict.KILL: 4}


class Mode(str, Enum):
    AUDIT = "audit"  # decide and log, enforce nothing
    CONFIRM = "confirm"  # every HALT becomes an ASK
    ENFORCE = "enforce"


class Scope(str, Enum):
    PROCESS = "process"
    CGROUP = "cgroup"


@dataclass(slots=True)
class Decision:
    verdict: Verdict
    rule: str  # rule name ("" for the policy default)
    reason: str  # human sentence: why
    event: Event
    scope: Scope = Scope.PROCESS  # for KILL: the offender or the whole cgroup
    enforced_in_kernel: bool = False  # the kernel fast path already acted (exec kill)
    # The syscall was refused (EPERM/EACCES: a gate, the jail, egress, BPF-LSM or plain
    # permissions) or killed before it ran: the harm did not happen. The verdict still applies.
    prevented: bool = False
    # What the rule matched on: exec path, open/unlink path, connect "ip:port" (or "*" for
    # rate and escalation rules). `Engine.remember()` keys the operator's answer on it.
    value: str = ""
    # ASK only: how long to wait, what silence means ("allow" | "deny"), and the verdict a
    # "deny" answer stands for (HALT: stay frozen, or KILL).
    ask_timeout_s: float | None = None
    ask_default: str | None = None
    on_deny: Verdict | None = None
