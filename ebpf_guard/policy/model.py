"""The policy model: what a parsed policy is (dataclasses only; parsing lives in reader.py,
collector.py and compiler.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, IntEnum

from ebpf_guard.events import CREATE, READ, TRUNCATE, WRITE, Kind
from ebpf_guard.policy.identities import Identities
from ebpf_guard.verdicts import Decision, Mode, Scope, Verdict


class PolicyKind(str, Enum):
    """Rule kinds that are no event kind of their own: judged from events of several kinds."""

    # unlink of a file, truncate, and an O_TRUNC open that did not create the file
    DESTROY = "destroy"


DESTROY = PolicyKind.DESTROY
RuleKind = Kind | PolicyKind
RULE_KINDS: tuple[RuleKind, ...] = (
    Kind.EXEC, Kind.OPEN, Kind.UNLINK, Kind.CONNECT, Kind.RENAME, Kind.LINK, Kind.SYMLINK,
    Kind.TRUNCATE, Kind.MMAP_EXEC, Kind.IO_URING, Kind.PTRACE, DESTROY,
)  # fmt: skip
ACCESS = (READ, WRITE, CREATE, TRUNCATE)
FAMILIES = ("ipv4", "ipv6", "unix")
PROTOCOLS = ("tcp", "udp", "raw", "icmp", "sctp", "stream", "dgram", "seqpacket")  # Event.protocol values
SEVERITIES = ("low", "medium", "high", "critical")
GUARD_EXIT_ACTIONS = ("freeze", "kill")  # on_guard_exit: what the watchdog does if the guard dies
LOSS_ACTIONS = ("freeze", "ignore")  # on_loss: what a lost sensor event does in enforce mode


# ---------------------------------------------------------------- errors


@dataclass(frozen=True, slots=True)
class PolicyIssue:
    """One problem found in a policy: where (file, line, dotted key) and what."""

    file: str
    line: int
    key: str
    message: str

    def __str__(self) -> str:
        # One issue, one line: keys and messages can carry line breaks from the YAML.
        key = f" {self.key}:" if self.key else ""  # a whole-file problem names no key
        return _one_line(f"{self.file}:{self.line}:{key} {self.message}")


# Every character str.splitlines() breaks on, and the other C0 controls (a NUL in a file name).
_LINE_BREAKS = {
    c: repr(chr(c))[1:-1] for c in (*range(0x20), 0x7F, 0x85, 0x2028, 0x2029) if c != 0x09
}


def _one_line(text: str) -> str:
    # Lone surrogates (a non-UTF-8 file name, a "\ud800" escape in the YAML) would make a
    # strict UTF-8 stream raise: write them as escapes too.
    return text.translate(_LINE_BREAKS).encode("utf-8", "backslashreplace").decode("utf-8")


class PolicyError(Exception):
    """Every problem found in a policy (and the files it extends), one line each."""

    def __init__(self, errors: list[PolicyIssue]):
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))



# ---------------------------------------------------------------- model



@dataclass(frozen=True, slots=True)
class Rate:
    """`rate: {count, window}`: the rule fires on the count-th match within the window."""

    count: int
    window_s: float

    @property
    def window_ns(self) -> int:
        return int(self.window_s * 1e9)


@dataclass(frozen=True, slots=True)
class Match:
    """Conditions of one rule; all given conditions must hold, a list means any-of.
    Patterns keep their `{home}`/`{workspace}`/`~` variables: the engine expands them."""

    # exec/mmap_exec: glob on the program's file name; io_uring/ptrace: on the file name of
    # the executable of the process doing it
    names: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()  # path glob (per kind: docs/policy.md); connect: socket path
    paths_not: tuple[str, ...] = ()
    args_any: tuple[str, ...] = ()  # exec: some argument matches one of these globs
    args_regex: str | None = None  # exec: regex searched in the arguments joined by " "
    flags: tuple[str, ...] = ()  # exec: any of these options is given ("-r", "-rf", "--force")
    operands: tuple[str, ...] = ()  # exec: some non-option argument (as a path) matches
    operands_not: tuple[str, ...] = ()  # exec: some non-option argument matches none of these
    access: frozenset[str] = frozenset()  # open: any of these access classes
    dir: bool | None = None  # unlink: directory removal (True) or file (False)
    addrs: tuple[str, ...] = ()  # connect: IPs / CIDRs
    addrs_not: tuple[str, ...] = ()
    ports: tuple[tuple[int, int], ...] = ()  # connect: inclusive ranges
    hosts: tuple[str, ...] = ()  # connect: DNS names, resolved by the caller
    family: frozenset[str] = frozenset()  # connect
    protocols: frozenset[str] = frozenset()  # connect: Event.protocol is one of these ("" never)
    # Who does it (every kind): globs on the process's comm, its exe (a glob without "/"
    # matches the file name), and the exe of any ancestor (parent, grandparent, ...).
    comms: tuple[str, ...] = ()
    exes: tuple[str, ...] = ()
    ancestors: tuple[str, ...] = ()

    def has_target(self) -> bool:
        return bool(
            self.names or self.paths or self.args_any or self.args_regex or self.flags
            or self.operands or self.addrs or self.ports or self.hosts
        )  # fmt: skip

    def has_process(self) -> bool:
        """Conditions on who does it, which only the engine's process model can judge."""
        return bool(self.comms or self.exes or self.ancestors)


@dataclass(frozen=True, slots=True)
class RuleException:
    """One entry of a rule's `exceptions:` (not a Python exception): when all its conditions
    hold for an event, the rule does not fire for it."""

    name: str
    match: Match
    file: str = ""
    line: int = 0


class Tier(IntEnum):
    """Where a rule lands in the evaluation order (docs/policy.md), in the order the engine
    tries them; an IntEnum so that 1/2/3 keep comparing equal."""

    DENY = 1  # FLAG..KILL naming a target: the most severe match wins
    ALLOW = 2  # SAFE naming a target: the first match wins
    CATCH_ALL = 3  # names no target: the most severe match wins

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")


# What `severity` defaults to when a rule does not say.
DEFAULT_SEVERITY = {Verdict.SAFE: "low", Verdict.FLAG: "low", Verdict.ASK: "medium",
                    Verdict.HALT: "high", Verdict.KILL: "critical"}  # fmt: skip


@dataclass(slots=True)
class RuleDecision(Decision):
    """A Decision with the deciding rule's `tags` and `severity` (the verdict's when no rule
    gives one), for the verdict log and the report."""

    tags: tuple[str, ...] = ()
    severity: str = ""


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule: its kind and conditions, verdict and what goes with it."""

    name: str
    kind: RuleKind
    match: Match
    verdict: Verdict
    reason: str = ""  # str.format template over REASON_FIELDS
    description: str = ""
    scope: Scope = Scope.PROCESS
    rate: Rate | None = None
    on_deny: Verdict = Verdict.KILL  # ASK rules: what a "deny" answer turns into
    order: int = 0  # position in the (merged) rule list: ties go to the earlier rule
    file: str = ""
    line: int = 0
    exceptions: tuple[RuleException, ...] = ()
    tags: tuple[str, ...] = ()
    severity: str = ""  # SEVERITIES; "" = derived from the verdict (see `level`)

    @property
    def catch_all(self) -> bool:
        """Names no target (binary, path, argv, address, port, host): see the evaluation order."""
        return not self.match.has_target()

    @property
    def tier(self) -> Tier:
        """The evaluation tier (docs/policy.md, evaluation order)."""
        if self.catch_all:
            return Tier.CATCH_ALL
        return Tier.ALLOW if self.verdict is Verdict.SAFE else Tier.DENY

    @property
    def level(self) -> str:
        """The severity given, else the verdict's (SAFE/FLAG low ... KILL critical)."""
        return self.severity or DEFAULT_SEVERITY[self.verdict]

    @property
    def userspace_only(self) -> bool:
        """Has conditions no kernel plan can evaluate (who does it, exceptions, protocol): a
        kernel mechanism enforcing it unconditionally would refuse what the rule spares."""
        return bool(self.match.has_process() or self.exceptions or self.match.protocols)


@dataclass(frozen=True, slots=True)
class AskDefaults:
    """`ask:`: how long an ASK waits and what silence means."""

    timeout_s: float = 60.0
    default: str = "deny"  # what an unanswered ASK becomes: "deny" | "allow"


@dataclass(frozen=True)
class Policy:
    """A parsed, validated policy (merged over the files it extends)."""

    version: int
    rules: tuple[Rule, ...]
    mode: Mode = Mode.ENFORCE
    workspace: str | None = None
    default: Verdict = Verdict.SAFE
    flag_threshold: int = 5  # 0 disables escalation
    flag_window_s: float = 60.0
    ask: AskDefaults = AskDefaults()
    redact: tuple[str, ...] = ()  # extra regexes for the redactor (validated here only)
    on_guard_exit: str = "freeze"  # GUARD_EXIT_ACTIONS: the watchdog's answer to a dead guard
    on_loss: str = "freeze"  # LOSS_ACTIONS: enforce mode, a lost sensor event freezes the cgroup
    lists: dict[str, tuple[str, ...]] = field(default_factory=dict)
    agent_config_files: tuple[str, ...] = ()
    deny_write: tuple[str, ...] = ()
    source: str = "<string>"
    sources: tuple[str, ...] = ()  # this file and every file it extends
    notes: tuple[str, ...] = ()  # worth saying but no error (`check` prints them)
    # Host identities (protected inodes, listed programs): load_policy() computes them; the
    # engine only looks them up. None: names and paths only.
    identities: Identities | None = field(default=None, compare=False, repr=False)

    @property
    def flag_window_ns(self) -> int:
        return int(self.flag_window_s * 1e9)

