"""The policy engine: events in, decisions out.

Pure by design: no I/O, no clock (event timestamps are the only time), no root. Anything
about the host arrives injected: `home_of(uid)`, the identities computed when the policy
loaded (policy/identities.py: protected inodes, listed programs) and the DNS answers in
`set_host_addresses()`. The same event sequence therefore always yields the same
decisions, which is what `replay` relies on.

An event is judged in each of its readings (views.py: as requested, as the kernel reached
it, by identity, and what a rename/link/symlink/truncate/mmap amounts to). For each reading
(docs/policy.md keeps the user-facing version of this):
  1. specific deny rules (FLAG..KILL naming a target): the most severe match wins,
     ties go to the rule written first;
  2. allow rules (SAFE naming a target): the first match wins;
  3. catch-all rules (no target: e.g. "any write", "any connect"): as in 1;
  4. the policy `default` (for the kinds it applies to).
The most severe reading wins (ties: the earlier one). Then: FLAG escalation per process
tree, then the mode (confirm: HALT -> ASK).
"""


from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ebpf_guard.events import NOTE_KILLED, Event, Kind
from ebpf_guard.pathnames import normalize
from ebpf_guard.policy.compiled import CompiledRules, normalize_glob
from ebpf_guard.policy.identities import EMPTY, Identities
from ebpf_guard.policy.kernel_sets import KernelSets
from ebpf_guard.policy.matchers import canonical_ip
from ebpf_guard.policy.memory import ALL, ESCALATION_PREFIX, OperatorMemory
from ebpf_guard.policy.model import DEFAULT_SEVERITY, DESTROY, Match, Policy, Rule, RuleDecision, Tier
from ebpf_guard.policy.tree import ProcessTrees, TreeCounters, TreeKey
from ebpf_guard.verdicts import Decision, Mode, Scope, Verdict
from ebpf_guard.views import View, read_event

__all__ = ["ESCALATION_PREFIX", "Engine", "normalize_glob"]
_TREE_KINDS = (Kind.FORK, Kind.EXIT, Kind.CHDIR)
_PROGRAM_KINDS = (Kind.EXEC, Kind.MMAP_EXEC)
_ESCALATION = "flags"  # TreeCounters key of FLAG escalation (rate rules count by rule index)
_TIERS = tuple(Tier)  # in evaluation order (iterating the Enum itself is slow)


@dataclass(frozen=True, slots=True)
class _Pick:
    """What one view of an event comes to: the rule (None: the policy default or no rule at
    all), its verdict after remembered answers, and whether an answer decided it."""

    rule: Rule | None
    verdict: Verdict
    remembered: bool = False
    defaulted: bool = True  # rule None: the policy default applied (False: nothing applied)


# A syscall that failed with one of these did not do what it asked (a gate, the jail, egress,
# BPF-LSM or plain file permissions refused it).
_REFUSED = frozenset({-errno.EPERM, -errno.EACCES})
_REFUSABLE_KINDS = frozenset({Kind.OPEN, Kind.EXEC, Kind.UNLINK, Kind.RENAME, Kind.LINK, Kind.SYMLINK,
                              Kind.TRUNCATE, Kind.MMAP_EXEC, Kind.CONNECT, Kind.PTRACE, Kind.IO_URING})


class Engine(KernelSets):
    """Judges events against one policy: rule indexes per home directory, process trees,
    rate and FLAG counters, the operator's remembered answers. No I/O: host facts come in
    through `home_of`, `identities` (computed when the policy loaded) and DNS answers."""

    def __init__(
        self,
        policy: Policy,
        *,
        workspace: str,
        home_of: Callable[[int], str | None],
        mode: Mode | None = None,
        identities: Identities | None = None,
    ):
        ws = workspace or policy.workspace
        if not ws:
            raise ValueError("no workspace: pass workspace= or set `workspace` in the policy")
        self.policy = policy
        self.workspace = normalize(ws)
        self._mode = mode or policy.mode
        self._home_of = home_of
        # Host identities: given, else what load_policy() computed, else none (names only).
        self._ids = identities or policy.identities or EMPTY
        self._homes: dict[int, str | None] = {}
        self._compiled: dict[str | None, CompiledRules] = {}
        self._rules = policy.rules
        self._by_name = {r.name: r for r in policy.rules}
        self._ip_hosts: dict[Any, frozenset[str]] = {}
        self._trees = ProcessTrees()
        self._counters = TreeCounters()
        self._memory = OperatorMemory()
        # Work only some policies need: destroy readings, ancestor lists on every view.
        self._destroy = any(r.kind is DESTROY for r in policy.rules)
        self._ancestry = any(m.ancestors for r in policy.rules for m in _matches(r))

    @property
    def mode(self) -> Mode:
        return self._mode

    # ------------------------------------------------------------ public API

    def evaluate(self, event: Event) -> Decision:
        kind = event.kind
        if kind in _TREE_KINDS:
            self._trees.track(event)
            return Decision(Verdict.SAFE, "", "", event)
        if kind in _PROGRAM_KINDS and event.ret is not None and event.ret < 0 and event.ret not in _REFUSED:
            # A failed attempt ran nothing: execvp() probes every PATH entry for `curl`, and
            # only the one that succeeds is judged (an in-kernel kill has no result: judged;
            # one a gate refused, EPERM/EACCES, is the attempt itself: judged).
            what = "exec" if kind is Kind.EXEC else "mmap"
            return Decision(Verdict.SAFE, "", f"{what} failed (errno {-event.ret})", event)
        proc = self._trees.see(event)
        tree = proc.tree
        comp = self._compiled_for(event.uid)
        views = read_event(event, self._ids, self._ip_hosts, destroy=self._destroy,
                           same_tree=lambda pid: self._trees.in_tree(pid, tree))
        if self._ancestry and proc.ancestors:
            for v in views:
                v.ancestors = proc.ancestors
        matched = [comp.matching(v) for v in views]
        # Rate rules count what happened, once per event however many views match: a failed
        # syscall (unlink of a missing file, which git and editors do constantly) is no
        # deletion. A refused one (EPERM/EACCES: the jail, a gate, BPF-LSM) counts: it is the
        # attempt the rule is about, stopped by a layer. Single-event rules judge attempts.
        failed = event.ret is not None and event.ret < 0 and event.ret not in _REFUSED
        fired: set[int] = set()
        counted: set[int] = set()
        for v, found in zip(views, matched, strict=True):
            if not v.native or not found:
                continue
            for i in found:
                rule = self._rules[i]
                if rule.rate is not None and i not in counted:
                    counted.add(i)
                    if not failed and self._count(i, rule, tree, event.ts_ns):
                        fired.add(i)
        # Each view is judged on its own; the most severe wins (ties: the earlier view, so
        # the plain reading of the event speaks first).
        best: tuple[View, _Pick] | None = None
        for v, found in zip(views, matched, strict=True):
            if not found and not v.default:
                continue  # nothing applies to this reading
            hits = [
                self._rules[i] for i in found
                if self._rules[i].rate is None or (v.native and i in fired)
            ]  # fmt: skip
            pick = self._select(v, hits)
            if pick is not None and (best is None or pick.verdict.severity > best[1].verdict.severity):
                best = (v, pick)
        if best is None:  # only kinds without a default, and no rule: nothing to say
            best = (views[0], _Pick(None, Verdict.SAFE, defaulted=False))
        chosen = best[1].rule
        if chosen is not None and chosen.rate is not None and not best[1].remembered:
            # One decision per burst: rate rules that counted the same burst to their limit
            # (mass-delete and mass-destroy both count unlinks) start afresh with the one named.
            for i in fired:
                self._counters.reset(i, tree)
        return self._decide(event, best[0], best[1], tree)

    def set_host_addresses(self, mapping: dict[str, list[str]]) -> None:
        """Replace the DNS answers for `hostnames()` (the caller refreshes them)."""
        by_ip: dict[Any, set[str]] = {}
        for host, addrs in mapping.items():
            for a in addrs:
                ip = canonical_ip(a)
                if ip is not None:
                    by_ip.setdefault(ip, set()).add(host.lower().rstrip("."))
        self._ip_hosts = {ip: frozenset(h) for ip, h in by_ip.items()}

    def hostnames(self) -> list[str]:
        return sorted({h for r in self._rules for h in r.match.hosts})

    def remember(self, decision: Decision, allow: bool) -> None:
        """The operator's answer to an ASK, for the rest of the run: the same rule with the
        same value (exec path, open path, connect destination) is then SAFE (allow) or the
        rule's deny verdict, without asking again."""
        self._memory.remember(decision.rule, decision.value, allow)

    # ------------------------------------------------------------ rules

    def _compiled_for(self, uid: int) -> CompiledRules:
        if uid in self._homes:
            home = self._homes[uid]
        else:
            home = self._home_of(uid)
            home = normalize(home) if home else None
            self._homes[uid] = home
        comp = self._compiled.get(home)
        if comp is None:
            # Compiled once per distinct home directory; `{workspace}` is fixed per engine.
            aliases = self._ids.aliases
            variants = {
                "home": (home, *aliases.get(home, ())) if home else (),
                "workspace": (self.workspace, *aliases.get(self.workspace, ())),
            }
            comp = CompiledRules(self._rules, variants)
            self._compiled[home] = comp
        return comp

    def _count(self, i: int, rule: Rule, tree: TreeKey, ts: int) -> bool:
        """Record one match of a rate rule; True when it reached `count` within `window`."""
        assert rule.rate is not None
        return self._counters.hit(i, tree, ts, rule.rate.window_ns, rule.rate.count)

    @staticmethod
    def _deny_verdict(rule: Rule) -> Verdict:
        return rule.on_deny if rule.verdict is Verdict.ASK else rule.verdict

    def _pick(
        self, rules: list[Rule], value: str
    ) -> tuple[Rule | None, Verdict, bool, Rule | None]:
        """Most severe of `rules` (earliest on ties) after remembered answers:
        (rule, verdict, from_memory, a remembered-allowed rule if any)."""
        best: Rule | None = None
        best_v, best_mem, allowed = Verdict.SAFE, False, None
        for r in rules:
            answer = self._memory.recall(r, value)
            if answer is True:
                allowed = allowed or r
                continue
            v = self._deny_verdict(r) if answer is False else r.verdict
            if best is None or v.severity > best_v.severity:
                best, best_v, best_mem = r, v, answer is False
        return best, best_v, best_mem, allowed

    def _select(self, v: View, hits: list[Rule]) -> _Pick | None:
        """The evaluation order (module doc) for one view; None if nothing applies to it."""
        if hits:
            tiers: dict[Tier, list[Rule]] = {}
            for r in hits:
                tiers.setdefault(r.tier, []).append(r)
            if v.specific:  # only specific deny rules judge this reading
                tiers = {Tier.DENY: tiers[Tier.DENY]} if Tier.DENY in tiers else {}
            for tier in _TIERS:
                in_tier = tiers.get(tier)
                if not in_tier:
                    continue
                if tier is Tier.ALLOW:
                    return _Pick(in_tier[0], Verdict.SAFE)
                best, verdict, mem, allowed = self._pick(in_tier, _value(v))
                if best is not None:
                    return _Pick(best, verdict, mem)
                if allowed is not None:
                    return _Pick(allowed, Verdict.SAFE, True)
        if not v.default:
            return None
        verdict = self.policy.default
        answer = self._memory.get("", _value(v))
        if answer is None:
            return _Pick(None, verdict)
        verdict = Verdict.SAFE if answer else (Verdict.HALT if verdict is Verdict.ASK else verdict)
        return _Pick(None, verdict, True)

    def _decide(self, ev: Event, c: View, pick: _Pick, tree: TreeKey) -> Decision:
        value = _value(c)
        rule, verdict, remembered = pick.rule, pick.verdict, pick.remembered
        note = ""
        if rule is not None and rule.rate is not None and not remembered:
            self._counters.reset(rule.order, tree)  # one decision per burst

        name = rule.name if rule else ""
        if remembered:
            note = " (allowed earlier by the operator)" if verdict is Verdict.SAFE else (
                " (denied earlier by the operator)"
            )  # fmt: skip
        reason = reason_for(rule, ev, c, value, verdict, defaulted=pick.defaulted, home=self._homes.get(ev.uid) or "",
                            workspace=self.workspace) + note
        if c.why:
            reason += f" [{c.why}]"
        dec_value = ALL if rule is not None and rule.rate is not None else value

        if verdict is Verdict.FLAG:
            escalated = self._escalate(tree, ev.ts_ns)
            if escalated:
                esc = ESCALATION_PREFIX + name
                answer = self._memory.get(esc, ALL)
                if answer is not True:
                    n, w = self.policy.flag_threshold, self.policy.flag_window_s
                    reason = f"{n} FLAGs within {w:g}s in one process tree; latest: {reason}"
                    name, verdict, dec_value, remembered = esc, Verdict.HALT, ALL, answer is False

        # Only KILL rules may name a scope (validated); everything else acts on the process.
        scope = rule.scope if rule is not None and verdict is Verdict.KILL else Scope.PROCESS
        on_deny: Verdict | None = None
        if verdict is Verdict.HALT and self._mode is Mode.CONFIRM and not remembered:
            # A human who answers "deny" wants it stopped: kill, as for ASK rules.
            verdict, on_deny = Verdict.ASK, Verdict.KILL
        elif verdict is Verdict.ASK:
            on_deny = self._deny_verdict(rule) if rule is not None else Verdict.KILL
        severity = rule.level if rule is not None and name == rule.name else DEFAULT_SEVERITY[verdict]
        d = RuleDecision(verdict, name, reason, ev, scope=scope, value=dec_value,
                         tags=rule.tags if rule is not None else (), severity=severity)
        if verdict is Verdict.ASK:
            d.ask_timeout_s = self.policy.ask.timeout_s
            d.ask_default = self.policy.ask.default
            d.on_deny = on_deny
        if ev.kind in _PROGRAM_KINDS and NOTE_KILLED in ev.notes:
            d.enforced_in_kernel = True
            if verdict is not Verdict.KILL:  # stale kernel set: say so rather than hide it
                d.reason += " [already killed in kernel]"
        d.prevented = d.enforced_in_kernel or (ev.kind in _REFUSABLE_KINDS and ev.ret in _REFUSED)
        return d

    def _escalate(self, tree: TreeKey, ts: int) -> bool:
        n = self.policy.flag_threshold
        if n <= 0:
            return False
        if self._counters.hit(_ESCALATION, tree, ts, self.policy.flag_window_ns, n):
            self._counters.reset(_ESCALATION, tree)  # one escalation per burst
            return True
        return False


def reason_for(
    rule: Rule | None, ev: Event, c: View, value: str, verdict: Verdict, *, defaulted: bool, home: str,
    workspace: str,
) -> str:  # fmt: skip
    """The decision's reason: the rule's template filled in, or a plain sentence."""
    if rule is None:
        if not defaulted:
            return f"no rule for {ev.kind.value} {value}".rstrip()
        return f"policy default {verdict.value} for {ev.kind.value} {value}".rstrip()
    if not rule.reason:
        return f"{rule.name}: {ev.kind.value} {value}".rstrip()
    rate = rule.rate
    fields = {
        "rule": rule.name, "kind": ev.kind.value, "verdict": verdict.value,
        "path": c.path or ev.path or ev.raw_path, "raw_path": ev.raw_path, "comm": ev.comm,
        "pid": ev.tgid, "tgid": ev.tgid, "ppid": ev.ppid, "uid": ev.uid,
        # A mapped program has no argv of its own: name the file (`ld.so curl` maps curl).
        "argv": " ".join(ev.argv) or (c.path or ev.real_path if ev.kind is Kind.MMAP_EXEC else ""),
        "addr": ev.addr, "port": ev.port,
        "host": ",".join(sorted(c.hosts)), "dest": value, "value": value,
        "count": rate.count if rate else "", "window": f"{rate.window_s:g}s" if rate else "",
        "home": home, "workspace": workspace,
        "real_path": ev.real_path, "exe": ev.exe,
    }  # fmt: skip
    try:
        return rule.reason.format_map(fields)
    except (ValueError, KeyError, IndexError, AttributeError):
        return rule.reason


def _matches(rule: Rule) -> tuple[Match, ...]:
    """A rule's own conditions and its exceptions'."""
    return (rule.match, *(x.match for x in rule.exceptions))


def _value(c: View) -> str:
    """What a decision is about; `remember()` keys on it."""
    ev = c.ev
    if ev.kind is Kind.CONNECT:
        if ev.family == "unix":
            return ev.addr
        return f"[{ev.addr}]:{ev.port}" if ":" in ev.addr else f"{ev.addr}:{ev.port}"
    return c.path or ev.raw_path
