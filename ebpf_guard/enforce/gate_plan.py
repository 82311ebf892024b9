"""Planning the permission gates: which fanotify marks a policy needs on this host.

`plan_gates` turns a policy into marks (pure apart from stat/listdir): directories whose
children a rule names (FAN_EVENT_ON_CHILD covers direct children only, so each existing
subdirectory is marked too, bounded), existing protected files by inode (hard links share it),
and the binaries of plain exec rules (FAN_OPEN_EXEC_PERM and FAN_OPEN_PERM: neither run, copied
nor handed to ld.so). Unprotected files already in a marked directory get an ignore mark, so the
host's own opens there (/etc/ld.so.cache) never reach Python.

An open rule the gate cannot answer alone is marked `holds`: the running gate holds such an open
(the opener waits in the kernel) until the guard's verdict answers it (gates.py). That is a rule
a human answers (ASK, and HALT in confirm mode, which the engine turns into ASK), and a rule with
conditions on the process or exceptions, which only the engine checks (an exception's allowed
open is then let through, the rest refused before a byte is read). Exec rules never hold at the
gate: their exec goes on into the sensor's exec hold.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from contextlib import suppress
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import TYPE_CHECKING

from ebpf_guard.enforce import fanotify as fan
from ebpf_guard.events import READ, Kind
from ebpf_guard.pathnames import normalize
from ebpf_guard.policy.identities import EMPTY, Identities
from ebpf_guard.policy.matchers import GlobError, GlobSet, compile_glob, expand_all, glob_kind, is_literal, literal_dir
from ebpf_guard.verdicts import Mode, Verdict

if TYPE_CHECKING:
    from ebpf_guard.policy import Policy, Rule

Inode = tuple[int, int]
GATED_VERDICTS = (Verdict.KILL, Verdict.HALT, Verdict.ASK)
NO_WALK = ("/proc", "/sys", "/dev")
MAX_DIRS = 256  # directories marked per plan
MAX_ENTRIES = 4096  # directory entries looked at per plan
MAX_IGNORES = 1024  # ignore marks per plan
FILE_MASK = fan.FAN_OPEN_PERM
DIR_MASK = fan.FAN_OPEN_PERM | fan.FAN_EVENT_ON_CHILD
BINARY_MASK = fan.FAN_OPEN_PERM | fan.FAN_OPEN_EXEC_PERM
_PROCESS_CONDITIONS = ("comms", "exes", "ancestors")
_EXEC_CONDITIONS = ("args_any", "args_regex", "flags", "operands", "operands_not", "paths_not")


class GateError(Exception):
    """A gate that cannot be set up or asked, phrased as one line."""


class GateKind(str, Enum):
    """What a gate denies a watched process."""

    READ = "read"  # any open is denied
    WRITE = "write"  # opens for write/create/truncate (or with unknown flags) are denied
    EXEC = "exec"  # exec and any open of the binary are denied


@dataclass(frozen=True)
class GateRule:
    """One policy rule as a gate: what it denies and the (expanded) paths it is about."""

    name: str
    kind: GateKind
    verdict: Verdict
    paths: tuple[str, ...] = ()
    paths_not: tuple[str, ...] = ()
    holds: bool = False  # the open waits for the guard's verdict (a human's, or the engine's)
    _globs: GlobSet = field(init=False, repr=False, compare=False)
    _globs_not: GlobSet = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_globs", GlobSet(self.paths))
        object.__setattr__(self, "_globs_not", GlobSet(self.paths_not))

    def matches(self, path: str) -> bool:
        return self._globs.match(path) and not self._globs_not.match(path)


@dataclass(frozen=True)
class GateMark:
    """One fanotify mark: `path` as the policy names it, `real` what the kernel marks."""

    path: str
    real: str
    target: str  # "dir" (its children), "file", "binary", "ignore" (exempt from dir marks)
    mask: int
    rules: tuple[str, ...] = ()


@dataclass(frozen=True)
class GatePlan:
    """What a policy gates on this host: rules, marks (with the rules behind each) and notes on
    what could not be marked."""

    rules: tuple[GateRule, ...] = ()
    marks: tuple[GateMark, ...] = ()
    notes: tuple[str, ...] = ()
    ask_default_allow: bool = False  # what the gate answers held opens with when it closes

    def describe(self) -> list[str]:
        kinds = {r.name: r.kind.value for r in self.rules}
        holding = {r.name for r in self.rules if r.holds}
        lines = []
        for m in self.marks:
            if m.target == "ignore":
                continue
            deny = "/".join(dict.fromkeys(kinds[r] for r in m.rules if r not in holding))
            hold = "/".join(dict.fromkeys(kinds[r] for r in m.rules if r in holding))
            verbs = ", ".join(([f"deny {deny}"] if deny else []) + ([f"hold {hold} for the verdict"] if hold else []))
            what = "deny exec+open" if m.target == "binary" else verbs
            where = f"{m.path}/* (children)" if m.target == "dir" else m.path
            real = f" (-> {m.real})" if m.real != m.path else ""
            lines.append(f"gate: {what} {where}{real} [{', '.join(m.rules)}]")
        ignores = sum(m.target == "ignore" for m in self.marks)
        if ignores:
            lines.append(f"gate: {ignores} unprotected files in marked directories are exempt")
        return lines + [f"gate not set: {n}" for n in self.notes]


# ---------------------------------------------------------------- planning


def plan_gates(policy: Policy, *, workspace: str | None, homes: Iterable[str],
               identities: Identities | None = None) -> GatePlan:  # fmt: skip
    """Marks for the KILL/HALT/ASK open and exec rules of `policy` (see the module doc)."""
    if policy.mode is Mode.AUDIT:
        return GatePlan(notes=("audit mode: nothing is denied",))
    builder = _PlanBuilder(identities or policy.identities or EMPTY, confirm=policy.mode is Mode.CONFIRM)
    variants = {"home": tuple(normalize(str(h)) for h in homes),
                "workspace": (normalize(workspace),) if workspace else ()}  # fmt: skip
    for rule in policy.rules:
        if rule.verdict not in GATED_VERDICTS or rule.kind not in (Kind.OPEN, Kind.EXEC):
            continue
        if rule.rate is not None:
            builder.notes.append(f"{rule.name}: a rate rule allows the first opens; not a gate")
        elif rule.kind is Kind.OPEN:
            builder.add_open_rule(rule, variants)
        else:
            builder.add_exec_rule(rule)
    return replace(builder.plan(), ask_default_allow=policy.ask.default == "allow")


class _PlanBuilder:
    """Collects marks rule by rule, merging marks on the same place, within the budgets."""

    def __init__(self, identities: Identities, *, confirm: bool) -> None:
        self.identities = identities
        self.confirm = confirm  # confirm mode: the engine turns every HALT into an ASK
        self.rules: list[GateRule] = []
        self.marks: dict[tuple[str, str], GateMark] = {}
        self.notes: list[str] = []
        self.entries_left = MAX_ENTRIES

    def add(self, path: str, target: str, mask: int, rule: str) -> None:
        real = os.path.realpath(path)
        old = self.marks.get((real, target))
        if old is not None:
            rules = old.rules if rule in old.rules else (*old.rules, rule)
            self.marks[(real, target)] = GateMark(old.path, real, target, old.mask | mask, rules)
        elif target == "dir" and sum(t == "dir" for _, t in self.marks) >= MAX_DIRS:
            self.notes.append(f"{path}: over {MAX_DIRS} directories; not marked")
        else:
            self.marks[(real, target)] = GateMark(path, real, target, mask, (rule,))

    def add_open_rule(self, rule: Rule, variants: dict[str, tuple[str, ...]]) -> None:
        access = rule.match.access
        kind = GateKind.READ if not access or READ in access else GateKind.WRITE
        globs = [g for p in rule.match.paths for g in _expanded(p, variants, self.notes, rule.name)]
        nots = [g for p in rule.match.paths_not for g in _expanded(p, variants, [], rule.name)]
        if not globs:
            if not rule.match.paths:
                self.notes.append(f"{rule.name}: names no path; not a gate")
            return
        asks = rule.verdict is Verdict.ASK or (rule.verdict is Verdict.HALT and self.confirm)
        gate = GateRule(rule.name, kind, rule.verdict, tuple(globs), tuple(nots), asks or _engine_judged(rule))
        self.rules.append(gate)
        for glob in globs:
            self._place(glob, rule.name)
        for path in self.identities.files.values():
            if gate.matches(path):  # hard links elsewhere share the inode
                self.add(path, "file", FILE_MASK, rule.name)

    def _place(self, glob: str, rule: str) -> None:
        if glob_kind(glob) == "base":
            self.notes.append(f"{rule}: {glob!r} names no directory; only known protected files are marked")
            return
        start = literal_dir(glob)
        if start == "/" or any(start == d or start.startswith(d + "/") for d in NO_WALK):
            self.notes.append(f"{rule}: {glob!r} names no directory to mark")
            return
        if is_literal(glob) and not glob.endswith("/"):
            if os.path.isfile(glob):
                self.add(glob, "file", FILE_MASK, rule)
            elif os.path.isdir(glob):
                self.notes.append(f"{rule}: {glob} is a directory; opening a directory is not gated")
            elif os.path.isdir(os.path.dirname(glob)):
                self.add(os.path.dirname(glob), "dir", DIR_MASK, rule)
            else:
                self.notes.append(f"{rule}: {os.path.dirname(glob)} does not exist; {glob} is not gated")
            return
        found = self._dirs_for(glob)
        if not found:
            self.notes.append(f"{rule}: no directory exists for {glob}")
        for d in found:
            self.add(d, "dir", DIR_MASK, rule)

    def _dirs_for(self, glob: str) -> list[str]:
        """Existing directories whose children `glob` may name (symlinked subdirectories are not
        followed; the starting directory may be a symlink)."""
        body = glob + "**" if glob.endswith("/") else glob
        segs = [s for s in body.split("/") if s not in ("", ".")]
        free = segs.index("**") if "**" in segs else len(segs)
        try:
            seg_rx = [compile_glob(s) for s in segs[:free]]
        except GlobError:
            return []
        start = literal_dir(glob)
        out: list[str] = []
        stack = [(start, len([s for s in start.split("/") if s]))]
        while stack:
            d, k = stack.pop()  # the children of d are matched against segs[k]
            if not os.path.isdir(d):
                continue
            if k >= free or k == len(segs) - 1 or all(s == "**" for s in segs[k + 1 :]):
                out.append(d)
            if k < free and k >= len(segs) - 1:
                continue
            for name in self._subdirs(d):
                if k >= free or seg_rx[k].fullmatch(name):
                    stack.append((d.rstrip("/") + "/" + name, k + 1))
        return sorted(out)

    def _subdirs(self, d: str) -> list[str]:
        try:
            with os.scandir(d) as it:
                entries = list(it)
        except OSError:
            return []
        out = []
        for e in entries:
            self.entries_left -= 1
            if self.entries_left < 0:
                self.notes.append(f"directory scan stopped at {MAX_ENTRIES} entries (in {d})")
                return out
            if e.is_dir(follow_symlinks=False):
                out.append(e.name)
        return out

    def add_exec_rule(self, rule: Rule) -> None:
        if any(getattr(rule.match, c) for c in _EXEC_CONDITIONS):
            return  # judged on its arguments: the binary itself is not forbidden
        self.rules.append(GateRule(rule.name, GateKind.EXEC, rule.verdict))
        for tool in (*rule.match.names, *rule.match.paths):
            inodes = self.identities.tools.get(tool if not tool.startswith("/") else normalize(tool))
            if not inodes:
                self.notes.append(f"{rule.name}: {tool} is not on this host's PATH (or is multi-call)")
            for inode in sorted(inodes or ()):
                for binary in self.identities.binaries.get(inode, ())[:1]:
                    self.add(binary.path, "binary", BINARY_MASK, rule.name)

    def plan(self) -> GatePlan:
        marks = list(self.marks.values())
        ignores = self._ignores(marks)
        return GatePlan(tuple(self.rules), tuple(marks + ignores), tuple(self.notes))

    def _ignores(self, marks: list[GateMark]) -> list[GateMark]:
        """Ignore marks for the existing files in marked directories that no rule names and whose
        inode is not gated under another name: the kernel then answers their opens itself."""
        gated: set[Inode] = set()
        for m in marks:
            if m.target in ("file", "binary"):
                with suppress(OSError):
                    st = os.stat(m.real)
                    gated.add((st.st_dev, st.st_ino))
        candidates: list[tuple[str, str, Inode]] = []
        for m in (m for m in marks if m.target == "dir"):
            for name, inode in _regular_children(m.real):
                path = m.path.rstrip("/") + "/" + name
                if any(r.kind is not GateKind.EXEC and r.matches(path) for r in self.rules):
                    gated.add(inode)
                else:
                    candidates.append((path, m.real.rstrip("/") + "/" + name, inode))
        out = [GateMark(path, real, "ignore", fan.FAN_OPEN_PERM) for path, real, inode in candidates
               if inode not in gated]  # fmt: skip
        if len(out) > MAX_IGNORES:
            self.notes.append(f"{len(out)} unprotected files in marked directories: "
                              f"{len(out) - MAX_IGNORES} of them are asked about on every open")
        return out[:MAX_IGNORES]


def _engine_judged(rule: Rule) -> bool:
    """Does the rule depend on what only the engine knows (the process, exceptions)?"""
    return bool(getattr(rule, "exceptions", ())) or any(getattr(rule.match, c, None) for c in _PROCESS_CONDITIONS)


def _regular_children(d: str) -> list[tuple[str, Inode]]:
    """(name, inode) of the regular files directly in `d`; symlinks are not followed."""
    try:
        with os.scandir(d) as it:
            entries = list(it)
    except OSError:
        return []
    out = []
    for e in entries:
        with suppress(OSError):
            if e.is_file(follow_symlinks=False):
                out.append((e.name, (e.stat(follow_symlinks=False).st_dev, e.inode())))
    return out


def _expanded(pattern: str, variants: dict[str, tuple[str, ...]], notes: list[str], rule: str) -> list[str]:
    out = expand_all(pattern, variants)
    if not out:
        notes.append(f"{rule}: {pattern!r} has no value for its variables here")
    return out
