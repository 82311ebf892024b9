"""Rules compiled for matching: per home directory, with per-kind indexes. Pure.

`CompiledRules` holds every rule of a policy with `{home}`/`{workspace}` expanded for one home
directory; `matching(view)` returns the indexes of the rules whose conditions hold for one
reading of an event (views.py) and none of whose exceptions do.
"""

from __future__ import annotations

import fnmatch
import re

from ebpf_guard.events import Kind
from ebpf_guard.policy.matchers import (
    AddrIndex,
    GlobSet,
    PathIndex,
    basename,
    expand_all,
    parse_network,
)
from ebpf_guard.policy.model import DESTROY, Match, Rule, RuleKind
from ebpf_guard.views import View


class Conditions:
    """One Match compiled for one home directory (and the engine's workspace): the rule's own
    conditions, or one of its exceptions'. Absent glob conditions are None, so each check
    costs one identity test when unused (this runs for every candidate rule of every view)."""

    __slots__ = (
        "kind", "match", "names", "paths", "paths_not", "args_any", "args_regex", "flags",
        "operands", "operands_not", "nets", "nets_not", "hosts", "comms", "exes", "ancestors",
        "process", "dead", "skip", "holds",
    )  # fmt: skip

    def __init__(self, kind: RuleKind, m: Match, variants: dict[str, tuple[str, ...]], skip: str | None = None):
        self.kind = kind
        self.skip = skip  # the condition the per-kind index already matched ("name", "path", ...)
        self.match = m
        self.dead = False  # a positive condition whose every pattern needs an unknown value

        def globs(patterns: tuple[str, ...], positive: bool) -> GlobSet | None:
            if not patterns:
                return None
            # A home or workspace reached through a symlink is matched as both spellings.
            kept = [normalize_glob(x) for p in patterns for x in expand_all(p, variants)]
            if positive and not kept:
                self.dead = True
            return GlobSet(dict.fromkeys(kept)) if kept else None

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
        self.comms = globs(m.comms, True)
        self.exes = globs(m.exes, True)
        self.ancestors = globs(m.ancestors, True)
        self.process = self.comms is not None or self.exes is not None or self.ancestors is not None
        # holds(view): every condition but `skip` holds. Bound once: one call per candidate.
        self.holds = self._connect_holds if kind is Kind.CONNECT else self._object_holds

    def _process_holds(self, c: View) -> bool:
        ev = c.ev
        if self.comms is not None and not self.comms.match_name(ev.comm):
            return False
        if self.exes is not None and not (ev.exe and _exe_match(self.exes, ev.exe)):
            return False
        return self.ancestors is None or any(a and _exe_match(self.ancestors, a) for a in c.ancestors)

    def _connect_holds(self, c: View) -> bool:
        m, ev, idx = self.match, c.ev, self.skip
        if m.family and ev.family not in m.family:
            return False
        if m.protocols and ev.protocol not in m.protocols:
            return False
        if m.ports and not any(lo <= ev.port <= hi for lo, hi in m.ports):
            return False
        if self.nets and idx != "addr" and not any(c.ip in n for n in self.nets if c.ip):
            return False
        if self.nets_not and c.ip is not None and any(c.ip in n for n in self.nets_not):
            return False
        if self.hosts and idx != "host" and not (self.hosts & c.hosts):
            return False
        if self.paths is not None and idx != "path" and not (c.path and self.paths.match(c.path)):
            return False
        return not self.process or self._process_holds(c)

    def _object_holds(self, c: View) -> bool:
        m, kind, idx = self.match, self.kind, self.skip
        # The cheap conditions of the kind first: most candidates fail here.
        if kind is Kind.OPEN:
            if m.access and not (m.access & c.access):
                return False
        elif kind is Kind.UNLINK:
            if m.dir is not None and c.ev.is_dir != m.dir:
                return False
        elif kind is DESTROY:
            if c.ev.is_dir != bool(m.dir):  # files, unless `dir: true` asks for directories
                return False
        if self.names is not None and idx != "name":
            # The program's name in this view, or its file's own name (a view of a listed
            # tool found by identity is named after the tool).
            if not (c.name and self.names.match("/" + c.name)) and not (
                c.path and self.names.match("/" + basename(c.path))
            ):
                return False
        if self.paths is not None and idx != "path":
            if not c.path:
                return False
            if not (self.paths.match_name(basename(c.path)) if c.cut else self.paths.match(c.path)):
                return False
        # A cut or unknown path is never harmless: path_not cannot exclude it.
        if self.paths_not is not None and c.path and not c.cut and self.paths_not.match(c.path):
            return False
        if kind is Kind.EXEC and not self._exec_holds(c):
            return False
        return not self.process or self._process_holds(c)

    def _exec_holds(self, c: View) -> bool:
        ev = c.ev
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


def _exe_match(globs: GlobSet, exe: str) -> bool:
    """An exe (the kernel's path; a cut one is known by its file name only) against globs."""
    if exe.startswith("/"):
        return globs.match(exe)
    return globs.match_name(basename(exe))


class CompiledRule:
    """A rule compiled for one home directory: its conditions, the live exceptions, and which
    condition the per-kind index checks."""

    __slots__ = ("rule", "cond", "exceptions", "index", "dead", "check")

    def __init__(self, rule: Rule, variants: dict[str, tuple[str, ...]]):
        m = rule.match
        self.rule = rule
        # Which condition the per-kind index already checked (so check() can skip it).
        if rule.kind is Kind.CONNECT:
            self.index = "addr" if m.addrs else "host" if m.hosts else "path" if m.paths else None
        else:
            self.index = "name" if m.names else "path" if m.paths else None
        self.cond = Conditions(rule.kind, m, variants, self.index)
        self.dead = self.cond.dead
        # An exception whose patterns need an unknown value (no home) spares nothing.
        excs = (Conditions(rule.kind, x.match, variants) for x in rule.exceptions)
        self.exceptions = tuple(x for x in excs if not x.dead)
        # check(view): the rule's conditions hold and no exception does.
        self.check = self._check_with_exceptions if self.exceptions else self.cond.holds

    def _check_with_exceptions(self, c: View) -> bool:
        if not self.cond.holds(c):
            return False
        return not any(x.holds(c) for x in self.exceptions)


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


class KindIndex:
    """One event kind's rules, indexed by what can be looked up in a dict."""

    def __init__(self) -> None:
        self.paths: PathIndex[int] = PathIndex()
        self.addrs: AddrIndex[int] = AddrIndex()
        self.hosts: dict[str, list[int]] = {}
        self.always: list[int] = []
        self.indexed = False  # any rule in `paths`/`addrs`/`hosts` (lookups are skipped if not)
        # `always` narrowed to the rules an access set can match (`open: {access: [write]}`
        # never matches a read), per distinct access set seen.
        self.always_for: dict[frozenset[str], list[int]] = {}


class CompiledRules:
    """All rules compiled for one home directory, indexed by event kind."""

    def __init__(self, rules: tuple[Rule, ...], variants: dict[str, tuple[str, ...]]):
        self.crules = [CompiledRule(r, variants) for r in rules]
        self.kinds: dict[Kind, KindIndex] = {}
        for i, cr in enumerate(self.crules):
            if cr.dead:
                continue
            ki = self.kinds.setdefault(cr.rule.kind, KindIndex())
            ki.indexed = ki.indexed or cr.index is not None
            if cr.index == "name":
                for p in cr.cond.names.patterns:  # type: ignore[union-attr]
                    ki.paths.add(p, i)
            elif cr.index == "path":
                for p in cr.cond.paths.patterns:  # type: ignore[union-attr]
                    ki.paths.add(p, i)
            elif cr.index == "addr":
                for a in cr.rule.match.addrs:
                    ki.addrs.add(a, i)
            elif cr.index == "host":
                for h in cr.cond.hosts:
                    ki.hosts.setdefault(h, []).append(i)
            else:
                ki.always.append(i)

    def matching(self, c: View) -> list[int]:
        ki = self.kinds.get(c.kind)
        if ki is None:
            return []
        always = ki.always_for.get(c.access)
        if always is None:
            always = ki.always_for[c.access] = [
                i for i in ki.always if not (a := self.crules[i].rule.match.access) or a & c.access
            ]  # fmt: skip
        if not ki.indexed:
            return [i for i in always if self.crules[i].check(c)]
        cand: list[int] = list(always)
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
