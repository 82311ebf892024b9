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
import fnmatch
import re
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ebpf_guard.events import NOTE_KILLED, Event, Kind
from ebpf_guard.pathnames import normalize
from ebpf_guard.policy import Policy, Rule
from ebpf_guard.policy.identities import EMPTY, Identities, Inode
from ebpf_guard.policy.matchers import (
    AddrIndex,
    GlobSet,
    PathIndex,
    basename,
    canonical_ip,
    expand_all,
    expand_vars,
    is_literal,
    literal_dir,
    parse_network,
    variables_in,
)
from ebpf_guard.verdicts import Decision, Mode, Scope, Verdict
from ebpf_guard.views import View, read_event

ESCALATION_PREFIX = "escalation:"
_ALL = "*"  # remember() key for rules whose decision is not about one value (rate, escalation)
_TREE_KINDS = (Kind.FORK, Kind.EXIT, Kind.CHDIR)
_PROGRAM_KINDS = (Kind.EXEC, Kind.MMAP_EXEC)

TreeKey = tuple[int, int]  # (tgid, start_ns) of the top-most known ancestor


@dataclass(frozen=True, slots=True)
class _Pick:
    """What one view of an event comes to: the rule (None: the policy default or no rule at
    all), its verdict after remembered answers, and whether an answer decided it."""

    rule: Rule | None
    verdict: Verdict
    remembered: bool = False
    defaulted: bool = True  # rule None: the policy default applied (False: nothing applied)


class _CRule:
    """A rule compiled for one home directory (and the engine's workspace)."""

    __slots__ = (
        "rule", "index", "names", "paths", "paths_not", "args_any", "args_regex", "flags",
        "operands", "operands_not", "nets", "nets_not", "hosts", "dead",
    )  # fmt: skip

    def __init__(self, rule: Rule, variants: dict[str, tuple[str, ...]]):
        m = rule.match
        self.rule = rule
        self.dead = False  # a positive condition whose every pattern needs an unknown value

        def globs(patterns: tuple[str, ...], positive: bool) -> GlobSet:
            # A home or workspace reached through a symlink is matched as both spellings.
            kept = [normalize_glob(x) for p in patterns for x in expand_all(p, variants)]
            if positive and patterns and not kept:
                self.dead = True
            return GlobSet(dict.fromkeys(kept))

        self.names = globs(m.names, True)
        self.paths = globs(m.paths, True)
        self.paths_not = globs(m.paths_not, False)
        self.operands = globs(m.operands, True)
        self.operands_not = globs(m.operands_not, False)
        self.args_any = (
            re.compile("|".join(fnmatch.translate(a) for a in m.args_any)) if m.args_any else None
        )
        self.args_regex = re.compile(m.args_regex) if m.args_regex else None
        self.flags = [
            ("long", f[2:]) if f.startswith("--") else ("short", frozenset(f[1:])) for f in m.flags
        ]
        self.nets = [parse_network(a) for a in m.addrs]
        self.nets_not = [parse_network(a) for a in m.addrs_not]
        self.hosts = frozenset(m.hosts)
        # Which condition the per-kind index already checked (so check() can skip it).
        if rule.kind is Kind.CONNECT:
            self.index = "addr" if m.addrs else "host" if m.hosts else "path" if m.paths else None
        else:
            self.index = "name" if m.names else "path" if m.paths else None

    def check(self, c: View) -> bool:
        """Every condition except the one the index already matched."""
        m, ev, idx = self.rule.match, c.ev, self.index
        kind = self.rule.kind
        if kind is Kind.CONNECT:
            if m.family and ev.family not in m.family:
                return False
            if self.nets and idx != "addr" and not any(c.ip in n for n in self.nets if c.ip):
                return False
            if self.nets_not and c.ip is not None and any(c.ip in n for n in self.nets_not):
                return False
            if m.ports and not any(lo <= ev.port <= hi for lo, hi in m.ports):
                return False
            if self.hosts and idx != "host" and not (self.hosts & c.hosts):
                return False
            if self.paths and idx != "path" and not (c.path and self.paths.match(c.path)):
                return False
            return True
        if self.names and idx != "name":
            # The program's name in this view, or its file's own name (a view of a listed
            # tool found by identity is named after the tool).
            if not (c.name and self.names.match("/" + c.name)) and not (
                c.path and self.names.match("/" + basename(c.path))
            ):
                return False
        if self.paths and idx != "path":
            if not c.path:
                return False
            if not (self.paths.match_name(basename(c.path)) if c.cut else self.paths.match(c.path)):
                return False
        # A cut or unknown path is never harmless: path_not cannot exclude it.
        if self.paths_not and c.path and not c.cut and self.paths_not.match(c.path):
            return False
        if kind is Kind.OPEN:
            if m.access and not (m.access & c.access):
                return False
        elif kind is Kind.UNLINK:
            if m.dir is not None and ev.is_dir != m.dir:
                return False
        elif kind is Kind.EXEC:
            args = c.args
            if self.args_any is not None and not any(self.args_any.match(a) for a in args):
                return False
            if self.args_regex is not None and not self.args_regex.search(" ".join(args)):
                return False
            if self.flags or self.operands or self.operands_not:
                opts = c.opts
                if self.flags and not any(
                    opts.long_given(v) if t == "long" else v <= opts.short for t, v in self.flags
                ):
                    return False
                if self.operands or self.operands_not:
                    readings = [p for per in c.operand_readings() for p in per]
                    if self.operands and not any(p and self.operands.match(p) for p in readings):
                        return False
                    # Fail closed: an operand that is unknown (relative with no cwd, cut,
                    # unresolvable) counts as outside, and so does an argv cut short by the
                    # sensor (the operands it lost are unseen, not harmless).
                    if self.operands_not and not ev.argv_truncated and not any(
                        p is None or not self.operands_not.match(p) for p in readings
                    ):
                        return False
        return True


def normalize_glob(pattern: str) -> str:
    """Collapse `//` and `/./` left by variable expansion; keep a trailing `/` (dir + below)."""
    if "/" not in pattern:
        return pattern
    trailing = pattern.endswith("/") and pattern != "/"
    lead = "**/" if pattern.startswith("**/") else ""
    body = pattern[len(lead) :]
    if body.startswith("/"):
        body = "/" + "/".join(s for s in body.split("/") if s not in ("", "."))
    return lead + body + ("/" if trailing and not body.endswith("/") else "")


class _KindIndex:
    """One event kind's rules, indexed by what can be looked up in a dict."""

    def __init__(self) -> None:
        self.paths: PathIndex[int] = PathIndex()
        self.addrs: AddrIndex[int] = AddrIndex()
        self.hosts: dict[str, list[int]] = {}
        self.always: list[int] = []


class _Compiled:
    """All rules compiled for one home directory, indexed by event kind."""

    def __init__(self, rules: tuple[Rule, ...], variants: dict[str, tuple[str, ...]]):
        self.crules = [_CRule(r, variants) for r in rules]
        self.kinds: dict[Kind, _KindIndex] = {}
        for i, cr in enumerate(self.crules):
            if cr.dead:
                continue
            ki = self.kinds.setdefault(cr.rule.kind, _KindIndex())
            if cr.index == "name":
                for p in cr.names.patterns:
                    ki.paths.add(p, i)
            elif cr.index == "path":
                for p in cr.paths.patterns:
                    ki.paths.add(p, i)
            elif cr.index == "addr":
                for a in cr.rule.match.addrs:
                    ki.addrs.add(a, i)
            elif cr.index == "host":
                for h in cr.hosts:
                    ki.hosts.setdefault(h, []).append(i)
            else:
                ki.always.append(i)

    def matching(self, c: View) -> list[int]:
        ki = self.kinds.get(c.kind)
        if ki is None:
            return []
        cand: list[int] = list(ki.always)
        if c.path:
            # A cut path is known by its last component only.
            cand.extend(ki.paths.lookup_name(basename(c.path)) if c.cut else ki.paths.lookup(c.path))
        if c.name and (not c.path or c.name != basename(c.path)):
            cand.extend(ki.paths.lookup_name(c.name))  # name rules (and last-component paths)
        if ki.addrs and c.ip is not None:
            cand.extend(ki.addrs.lookup(c.ip))
        for h in c.hosts:
            cand.extend(ki.hosts.get(h, ()))
        # Dedupe and restore policy order: the order is part of the semantics (ties).
        return sorted(i for i in set(cand) if self.crules[i].check(c))


# A syscall that failed with one of these did not do what it asked (a gate, the jail, egress,
# BPF-LSM or plain file permissions refused it).
_REFUSED = frozenset({-errno.EPERM, -errno.EACCES})
_REFUSABLE_KINDS = frozenset({Kind.OPEN, Kind.EXEC, Kind.UNLINK, Kind.RENAME, Kind.LINK, Kind.SYMLINK,
                              Kind.TRUNCATE, Kind.MMAP_EXEC, Kind.CONNECT, Kind.PTRACE, Kind.IO_URING})


class Engine:
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
        self._compiled: dict[str | None, _Compiled] = {}
        self._rules = policy.rules
        self._by_name = {r.name: r for r in policy.rules}
        self._ip_hosts: dict[Any, frozenset[str]] = {}
        self._tree_of: dict[int, TreeKey] = {}
        self._rate_hits: dict[tuple[int, TreeKey], deque[int]] = {}
        self._flags: dict[TreeKey, deque[int]] = {}
        self._memory: dict[tuple[str, str], bool] = {}

    @property
    def mode(self) -> Mode:
        return self._mode

    # ------------------------------------------------------------ public API

    def evaluate(self, event: Event) -> Decision:
        kind = event.kind
        if kind in _TREE_KINDS:
            self._track(event)
            return Decision(Verdict.SAFE, "", "", event)
        if kind in _PROGRAM_KINDS and event.ret is not None and event.ret < 0 and event.ret not in _REFUSED:
            # A failed attempt ran nothing: execvp() probes every PATH entry for `curl`, and
            # only the one that succeeds is judged (an in-kernel kill has no result: judged;
            # one a gate refused, EPERM/EACCES, is the attempt itself: judged).
            what = "exec" if kind is Kind.EXEC else "mmap"
            return Decision(Verdict.SAFE, "", f"{what} failed (errno {-event.ret})", event)
        tree = self._tree(event)
        comp = self._compiled_for(event.uid)
        views = read_event(event, self._ids, self._ip_hosts)
        matched = [comp.matching(v) for v in views]
        # Rate rules count what happened, once per event however many views match: a failed
        # syscall (unlink of a missing file, which git and editors do constantly) is no
        # deletion. A refused one (EPERM/EACCES: the jail, a gate, BPF-LSM) counts: it is the
        # attempt the rule is about, stopped by a layer. Single-event rules judge attempts.
        failed = event.ret is not None and event.ret < 0 and event.ret not in _REFUSED
        fired: set[int] = set()
        counted: set[int] = set()
        for v, found in zip(views, matched, strict=True):
            if not v.native:
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
            hits = [
                self._rules[i] for i in found
                if self._rules[i].rate is None or (v.native and i in fired)
            ]  # fmt: skip
            pick = self._select(v, hits)
            if pick is not None and (best is None or pick.verdict.severity > best[1].verdict.severity):
                best = (v, pick)
        if best is None:  # only kinds without a default, and no rule: nothing to say
            best = (views[0], _Pick(None, Verdict.SAFE, defaulted=False))
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

    def kernel_kill_rules(self) -> list[Rule]:
        """Exec rules the kernel may apply alone (SIGKILL at exec): KILL in enforce mode, no
        argv/rate/path_not condition, not allowed by a remembered answer."""
        if self._mode is not Mode.ENFORCE:
            return []
        allowed = {rule for (rule, _), allow in self._memory.items() if allow}
        out = []
        for r in self._rules:
            m = r.match
            if (
                r.kind is not Kind.EXEC or r.verdict is not Verdict.KILL or r.tier != 1
                or r.rate is not None or r.name in allowed or (m.names and m.paths)
                or m.paths_not or m.args_any or m.args_regex or m.flags or m.operands
                or m.operands_not
            ):  # fmt: skip
                continue
            out.append(r)
        return out

    def kernel_gate_rules(self) -> list[Rule]:
        """Exec rules that can HALT, ASK or KILL (without a rate): held in the kernel until
        decided, unless the kernel can kill alone."""
        if self._mode is Mode.AUDIT:
            return []
        return [
            r for r in self._rules
            if r.kind is Kind.EXEC and r.verdict.severity >= Verdict.ASK.severity and not r.rate
        ]  # fmt: skip

    def _literal(self, pattern: str) -> str | None:
        """A name or path pattern as the kernel can compare it, or None (glob, `{home}`)."""
        if "home" in variables_in(pattern) or not is_literal(pattern):
            return None
        return expand_vars(pattern, {"workspace": self.workspace}, escape=False) or None

    def kernel_exec_kills(self) -> tuple[frozenset[str], frozenset[str]]:
        """(file names, exact paths) whose exec the kernel may SIGKILL at syscall entry.

        Only patterns the kernel can compare exactly: KILL exec rules in enforce mode without
        argv/rate/path_not conditions, literal names or paths, no `{home}` (per-user). A
        KILL is the most severe verdict and specific deny rules are evaluated before allow
        rules, so no allow rule can override these; an operator's remembered "allow" can,
        which is why this is recomputed on each call.
        """
        names: set[str] = set()
        paths: set[str] = set()
        for r in self.kernel_kill_rules():
            for p in r.match.names or r.match.paths:
                value = self._literal(p)
                if value is None:
                    continue
                if "/" in value:
                    paths.add(normalize(value))
                else:
                    names.add(value)
        return frozenset(names), frozenset(paths)

    def kernel_exec_gates(self) -> frozenset[str]:
        """File names whose exec the kernel holds (SIGSTOP at syscall entry) until this engine
        has decided: exec rules that can HALT, ASK or KILL but that the kernel cannot decide
        alone (argv conditions such as `rm -r` outside /tmp, or a freeze, which only userspace
        can do). The held program runs no instruction before the decision; the guard then
        kills it or lets it go (SIGCONT). Only a literal name or path's last component can be
        compared in the kernel; anything else is decided after the fact, as before.
        """
        killed, _ = self.kernel_exec_kills()
        names: set[str] = set()
        for r in self.kernel_gate_rules():
            for p in r.match.names or r.match.paths:
                value = self._literal(p)
                if value:
                    names.add(value.rsplit("/", 1)[-1])
        return frozenset(names - killed)

    def kernel_exec_inodes(self) -> tuple[frozenset[Inode], frozenset[Inode]]:
        """(kill, hold): the (st_dev, st_ino) of the binaries the same rules as
        `kernel_exec_kills()` (kill) and `kernel_exec_gates()` (hold) name, as found when the
        policy loaded (policy/identities.py: PATH lookup, symlinks resolved; multi-call binaries such
        as busybox left out). The kernel checks them at exec (the file that runs, whatever its
        name: a hard link, a renamed path) and at mmap(PROT_EXEC) (`ld.so /usr/bin/curl`).
        Name globs count too: identities expanded them on the host. Recompute after
        `remember()`, like kernel_exec_kills()."""
        tools = self._ids.tools

        def inodes(rules: list[Rule]) -> set[Inode]:
            out: set[Inode] = set()
            for r in rules:
                for p in r.match.names:
                    out |= tools.get(p, frozenset())
                for p in r.match.paths:
                    value = self._literal(p)
                    if value and value.startswith("/"):
                        out |= tools.get(normalize(value), frozenset())
            return out

        kill = inodes(self.kernel_kill_rules())
        hold = inodes(self.kernel_gate_rules()) - kill
        return frozenset(kill), frozenset(hold)

    def kernel_unlink_rate(self, homes: Iterable[str]) -> tuple[int, int, tuple[str, ...]]:
        """(count, window_ns, scratch directories) for the kernel's first response to mass
        deletes: the most sensitive unlink rule with a rate that can stop the agent (HALT,
        ASK, KILL) and only `path_not` conditions; (0, 0, ()) if there is none or in audit
        mode. The kernel counts every deletion except those beneath the scratch directories:
        the literal directories of the rule's `path_not` patterns that end in `/**` (with
        `{home}` for each of `homes`). Other exclusions (`*.swp`, `**/__pycache__/**`) are
        counted in the kernel, so it stops a deleter no later than this engine would; the
        guard lets it go again when the engine disagrees."""
        if self._mode is Mode.AUDIT:
            return 0, 0, ()
        rules = [
            r for r in self._rules
            if r.kind is Kind.UNLINK and r.rate is not None and r.verdict.severity >= Verdict.ASK.severity
            and not r.match.has_target() and r.match.dir is None
        ]  # fmt: skip
        if not rules:
            return 0, 0, ()
        rule = min(rules, key=lambda r: (r.rate.count, -r.rate.window_s))  # type: ignore[union-attr]
        variants = {"home": tuple(homes), "workspace": (self.workspace,) if self.workspace else ()}
        dirs: list[str] = []
        for pattern in rule.match.paths_not:
            for glob in expand_all(pattern, variants):
                if glob.endswith("/**") and glob.startswith("/") and literal_dir(glob) == glob[:-3]:
                    d = normalize(glob[:-3])
                    if d != "/" and d not in dirs:
                        dirs.append(d)
        assert rule.rate is not None
        return rule.rate.count, rule.rate.window_ns, tuple(dirs)

    def remember(self, decision: Decision, allow: bool) -> None:
        """The operator's answer to an ASK, for the rest of the run: the same rule with the
        same value (exec path, open path, connect destination) is then SAFE (allow) or the
        rule's deny verdict, without asking again."""
        self._memory[(decision.rule, self._memory_value(decision.rule, decision.value))] = allow

    # ------------------------------------------------------------ process trees

    def _tree(self, ev: Event) -> TreeKey:
        t = self._tree_of.get(ev.tgid)
        if t is None:
            # First sight of a process: join its parent's tree if we know it, else root one.
            t = self._tree_of.get(ev.ppid) or (ev.tgid, ev.start_ns)
            self._tree_of[ev.tgid] = t
        return t

    def _track(self, ev: Event) -> None:
        if ev.kind is Kind.FORK:
            parent = self._tree(ev)
            if ev.child_pid and ev.child_pid != ev.tgid:
                self._tree_of[ev.child_pid] = parent
        elif ev.kind is Kind.EXIT:
            if ev.pid == ev.tgid:  # thread exits don't end the process
                self._tree_of.pop(ev.tgid, None)
        elif ev.kind is Kind.CHDIR:
            self._tree(ev)

    # ------------------------------------------------------------ rules

    def _compiled_for(self, uid: int) -> _Compiled:
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
            comp = _Compiled(self._rules, variants)
            self._compiled[home] = comp
        return comp

    def _count(self, i: int, rule: Rule, tree: TreeKey, ts: int) -> bool:
        """Record one match of a rate rule; True when it reached `count` within `window`."""
        assert rule.rate is not None
        hits = self._rate_hits.setdefault((i, tree), deque())
        hits.append(ts)
        horizon = ts - rule.rate.window_ns
        while hits and hits[0] <= horizon:
            hits.popleft()
        return len(hits) >= rule.rate.count

    @staticmethod
    def _memory_value(rule: str, value: str) -> str:
        return _ALL if rule.startswith(ESCALATION_PREFIX) else value

    def _recall(self, rule: Rule, value: str) -> bool | None:
        return self._memory.get((rule.name, _ALL if rule.rate else value))

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
            answer = self._recall(r, value)
            if answer is True:
                allowed = allowed or r
                continue
            v = self._deny_verdict(r) if answer is False else r.verdict
            if best is None or v.severity > best_v.severity:
                best, best_v, best_mem = r, v, answer is False
        return best, best_v, best_mem, allowed

    def _select(self, v: View, hits: list[Rule]) -> _Pick | None:
        """The evaluation order (module doc) for one view; None if nothing applies to it."""
        value = _value(v)
        if v.specific:
            hits = [r for r in hits if r.tier == 1]
        for tier in (1, 2, 3):
            in_tier = [r for r in hits if r.tier == tier]
            if not in_tier:
                continue
            if tier == 2:
                return _Pick(in_tier[0], Verdict.SAFE)
            best, verdict, mem, allowed = self._pick(in_tier, value)
            if best is not None:
                return _Pick(best, verdict, mem)
            if allowed is not None:
                return _Pick(allowed, Verdict.SAFE, True)
        if not v.default:
            return None
        verdict = self.policy.default
        answer = self._memory.get(("", value))
        if answer is None:
            return _Pick(None, verdict)
        verdict = Verdict.SAFE if answer else (Verdict.HALT if verdict is Verdict.ASK else verdict)
        return _Pick(None, verdict, True)

    def _decide(self, ev: Event, c: View, pick: _Pick, tree: TreeKey) -> Decision:
        value = _value(c)
        rule, verdict, remembered = pick.rule, pick.verdict, pick.remembered
        note = ""
        if rule is not None and rule.rate is not None and not remembered:
            self._rate_hits.pop((rule.order, tree), None)  # one decision per burst

        name = rule.name if rule else ""
        if remembered:
            note = " (allowed earlier by the operator)" if verdict is Verdict.SAFE else (
                " (denied earlier by the operator)"
            )  # fmt: skip
        reason = self._reason(rule, ev, c, value, verdict, pick.defaulted) + note
        if c.why:
            reason += f" [{c.why}]"
        dec_value = _ALL if rule is not None and rule.rate is not None else value

        if verdict is Verdict.FLAG:
            escalated = self._escalate(tree, ev.ts_ns)
            if escalated:
                esc = ESCALATION_PREFIX + name
                answer = self._memory.get((esc, _ALL))
                if answer is not True:
                    n, w = self.policy.flag_threshold, self.policy.flag_window_s
                    reason = f"{n} FLAGs within {w:g}s in one process tree; latest: {reason}"
                    name, verdict, dec_value, remembered = esc, Verdict.HALT, _ALL, answer is False

        # Only KILL rules may name a scope (validated); everything else acts on the process.
        scope = rule.scope if rule is not None and verdict is Verdict.KILL else Scope.PROCESS
        on_deny: Verdict | None = None
        if verdict is Verdict.HALT and self._mode is Mode.CONFIRM and not remembered:
            # A human who answers "deny" wants it stopped: kill, as for ASK rules.
            verdict, on_deny = Verdict.ASK, Verdict.KILL
        elif verdict is Verdict.ASK:
            on_deny = self._deny_verdict(rule) if rule is not None else Verdict.KILL
        d = Decision(verdict, name, reason, ev, scope=scope, value=dec_value)
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
        flags = self._flags.setdefault(tree, deque())
        flags.append(ts)
        horizon = ts - self.policy.flag_window_ns
        while flags and flags[0] <= horizon:
            flags.popleft()
        if len(flags) >= n:
            flags.clear()  # one escalation per burst
            return True
        return False

    def _reason(
        self, rule: Rule | None, ev: Event, c: View, value: str, verdict: Verdict,
        defaulted: bool = True,
    ) -> str:  # fmt: skip
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
            "home": self._homes.get(ev.uid) or "", "workspace": self.workspace,
            "real_path": ev.real_path, "exe": ev.exe,
        }  # fmt: skip
        try:
            return rule.reason.format_map(fields)
        except (ValueError, KeyError, IndexError, AttributeError):
            return rule.reason


def _value(c: View) -> str:
    """What a decision is about; `remember()` keys on it."""
    ev = c.ev
    if ev.kind is Kind.CONNECT:
        if ev.family == "unix":
            return ev.addr
        return f"[{ev.addr}]:{ev.port}" if ":" in ev.addr else f"{ev.addr}:{ev.port}"
    return c.path or ev.raw_path
