"""Compiling a merged policy (collector.py's Layer) into the model (model.py).

Conditions are table-driven: syntax.CONDITIONS says, per key, which Match field it fills and
what kind of value it holds; `Values.VALIDATORS` maps each kind of value to its check. The
JSON Schema (schema.py) is generated from the same table.
"""

from __future__ import annotations

import fnmatch
import math
import re
import string
from collections.abc import Callable
from typing import Any

import yaml

from ebpf_guard.policy.collector import Layer, RawRule, Strings
from ebpf_guard.policy.matchers import (
    VARIABLES,
    GlobError,
    compile_glob,
    expand_vars,
    glob_kind,
    parse_network,
    variables_in,
)
from ebpf_guard.policy.model import (
    GUARD_EXIT_ACTIONS,
    LOSS_ACTIONS,
    RULE_KINDS,
    SEVERITIES,
    AskDefaults,
    Match,
    Policy,
    Rate,
    Rule,
    RuleException,
    RuleKind,
)
from ebpf_guard.policy.reader import RESOLV_CONF, Item, Nodes, Problems, suggest, value
from ebpf_guard.policy.syntax import (
    ASK_ANSWERS,
    ASK_KEYS,
    CONDITIONS,
    DURATION_PATTERN,
    DURATION_UNITS,
    MATCH_KEYS,
    RATE_KEYS,
    REASON_FIELDS,
    SPECIAL_LISTS,
    Condition,
)
from ebpf_guard.verdicts import Mode, Scope, Verdict

Lists = dict[str, Strings]  # resolved named lists
_DURATION_RE = re.compile(DURATION_PATTERN)
MAX_DURATION_S = 365 * 86400.0  # windows become int ns; an unbounded float would overflow
# One DNS label; names are split on "." first (a single regex over the whole name with an
# optional dot between labels backtracked exponentially on e.g. "aaaa...a!").
_LABEL_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?")
_FLAG_RE = re.compile(r"-[A-Za-z0-9]+|--[A-Za-z0-9][\w-]*")
_PORT_RE = re.compile(r"([0-9]{1,5})(?:-([0-9]{1,5}))?")  # ASCII digits, at most 5


def parse_duration(value: Any) -> float | None:
    """Seconds from 10, 2.5, "500ms", "10s", "2m", "1h"; None if malformed, not positive,
    or longer than MAX_DURATION_S."""
    seconds = _seconds(value)
    return seconds if seconds is not None and 0 < seconds <= MAX_DURATION_S else None


def _seconds(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        # float() of a huge int raises OverflowError; anything this big is too long anyway.
        return float(value) if abs(value) < 10**18 else math.copysign(math.inf, value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str) and (m := _DURATION_RE.fullmatch(value.strip())):
        return float(m.group(1)) * DURATION_UNITS[m.group(2)]
    return None


def valid_host(name: str) -> bool:
    """A DNS name (labels of letters, digits, '-', '_'; one trailing dot allowed), not an IP."""
    if not 1 <= len(name) <= 253 or name.replace(".", "").isdigit():
        return False
    labels = name[:-1].split(".") if name.endswith(".") else name.split(".")
    return all(_LABEL_RE.fullmatch(label) for label in labels)


def regex_problem(pattern: str) -> str | None:
    """Why `pattern` does not compile, or None. re.compile raises more than re.error:
    OverflowError for `a{99999999999}`, RecursionError for thousands of nested groups."""
    try:
        re.compile(pattern)
    except (re.error, OverflowError, RecursionError, ValueError) as e:
        return str(e) or type(e).__name__
    return None


class Values(Nodes):
    """Checks single values (verdicts, durations, globs, CIDRs, ports ...) and the condition
    keys of a match, per syntax.CONDITIONS."""

    def verdict(self, item: Item, allowed: tuple[Verdict, ...] = tuple(Verdict)) -> Verdict | None:
        v = self.scalar(item)
        names = [a.value for a in allowed]
        if isinstance(v, str) and v.upper() in names:
            return Verdict(v.upper())
        self.at(item, f"unknown verdict {v!r}{suggest(str(v).upper(), names)} (one of {', '.join(names)})")
        return None

    def duration(self, item: Item) -> float | None:
        v = self.scalar(item)
        seconds = parse_duration(v)
        raw = _seconds(v)
        if seconds is None and raw is not None and raw > MAX_DURATION_S:
            self.at(item, f"duration {v!r} is too long (at most {MAX_DURATION_S / 86400:g} days)")
        elif seconds is None:
            self.at(item, f"bad duration {v!r}: use a positive number of seconds or e.g. 500ms, 10s, 2m, 1h")
        return seconds

    def word(self, item: Item, allowed: tuple[str, ...], what: str) -> str | None:
        """One of `allowed`, case-insensitive."""
        v = self.scalar(item)
        if isinstance(v, str) and v.lower() in allowed:
            return v.lower()
        if v is not None or isinstance(item.node, yaml.ScalarNode):
            self.at(item, f"unknown {what} {v!r}{suggest(str(v).lower(), allowed)} (one of {', '.join(allowed)})")
        return None

    def match_fields(self, kind: RuleKind, m: dict[str, Item], lists: Lists) -> Match:
        """A Match from condition keys (already checked against MATCH_KEYS[kind])."""
        kw: dict[str, Any] = {}
        for key, cond in CONDITIONS.items():
            if key not in m:
                continue
            got = self.VALIDATORS[cond.value](self, m[key], lists, cond)
            if got is not None:
                kw[cond.field] = got
        return Match(**kw)

    # ------------------------------------------------ one validator per kind of value

    def _globs(self, item: Item, lists: Lists, cond: Condition) -> tuple[str, ...]:
        return tuple(s for s, it in self.strings(item, lists) if self._check_glob(s, it, cond.value))

    def _check_glob(self, pattern: str, item: Item, what: str) -> bool:
        unknown = [v for v in variables_in(pattern) if v not in VARIABLES]
        if unknown:
            self.at(item, f"unknown variable {{{unknown[0]}}} in {pattern!r}{suggest(unknown[0], VARIABLES)}")
            return False
        # Compile with stand-in values: the real ones are only known to the engine.
        probe = expand_vars(pattern, {"home": "/home/u", "workspace": "/work/w"})
        try:
            if what == "names" and "/" in pattern:
                raise GlobError(f"{pattern!r} is a path, not a file name: use 'path'")
            if what == "comms" and "/" in pattern:
                raise GlobError(f"{pattern!r}: a comm is a process name, without '/' (paths go in 'exe')")
            glob_kind(probe or pattern)
            compile_glob(probe or pattern)
        except GlobError as e:
            self.at(item, f"bad glob: {e}")
            return False
        except (re.error, OverflowError, RecursionError) as e:  # what compile_glob lets through
            self.at(item, f"bad glob {pattern!r}: {e}")
            return False
        return True

    def _patterns(self, item: Item, lists: Lists, cond: Condition) -> tuple[str, ...]:
        out = []
        for s, it in self.strings(item, lists):
            problem = regex_problem(fnmatch.translate(s))  # fnmatch accepts any string
            if problem:
                self.at(it, f"bad pattern {s!r}: {problem}")
            else:
                out.append(s)
        return tuple(out)

    def _regex(self, item: Item, lists: Lists, cond: Condition) -> str | None:
        s = self.text(item)
        problem = regex_problem(s or "")
        if problem:
            self.at(item, f"invalid regex {s!r}: {problem}")
            return None
        return s

    def _flags(self, item: Item, lists: Lists, cond: Condition) -> tuple[str, ...]:
        out = []
        for s, it in self.strings(item, lists):
            if _FLAG_RE.fullmatch(s):
                out.append(s)
            else:
                self.at(it, f"bad flag {s!r}: write -r, -rf or --recursive")
        return tuple(out)

    def _choices(self, item: Item, lists: Lists, cond: Condition) -> frozenset[str]:
        out = []
        allowed = cond.choices
        what = {"access": "access", "family": "family", "protocols": "protocol"}.get(cond.field, cond.field)
        for s, it in self.strings(item, lists):
            # access and family are exact (as before); protocol names are case-insensitive.
            got = s.lower() if cond.field == "protocols" else s
            if got in allowed:
                out.append(got)
            else:
                self.at(it, f"unknown {what} {s!r}{suggest(got, allowed)} (one of {', '.join(allowed)})")
        return frozenset(out)

    def _bool(self, item: Item, lists: Lists, cond: Condition) -> bool | None:
        v = self.scalar(item)
        if isinstance(v, bool):
            return v
        self.at(item, f"expected true or false, got {v!r}")
        return None

    def _cidrs(self, item: Item, lists: Lists, cond: Condition) -> tuple[str, ...]:
        nets = []
        for s, it in self.strings(item, lists):
            try:
                parse_network(s)
                nets.append(s)
            except ValueError as e:
                self.at(it, f"bad CIDR: {e}")
        return tuple(nets)

    def _ports(self, item: Item, lists: Lists, cond: Condition) -> tuple[tuple[int, int], ...]:
        out = []
        for s, it in self.strings(item, lists):
            # ASCII digits, at most 5: int() of thousands of digits raises ValueError.
            m = _PORT_RE.fullmatch(s.strip())
            lo, hi = (int(m.group(1)), int(m.group(2) or m.group(1))) if m else (-1, -1)
            if not m or not (0 <= lo <= hi <= 65535):
                self.at(it, f"bad port {s!r}: use 0-65535 or a range like 8000-8100")
                continue
            out.append((lo, hi))
        return tuple(out)

    def _hosts(self, item: Item, lists: Lists, cond: Condition) -> tuple[str, ...]:
        hosts = []
        for s, it in self.strings(item, lists):
            if valid_host(s):
                hosts.append(s.lower().rstrip("."))
            else:
                self.at(it, f"bad host name {s!r} (no wildcards; IPs go in 'addr')")
        return tuple(hosts)

    VALIDATORS: dict[str, Callable[[Values, Item, Lists, Condition], Any]] = {
        "globs": _globs, "names": _globs, "comms": _globs, "exes": _globs, "patterns": _patterns,
        "regex": _regex, "flags": _flags, "choices": _choices, "bool": _bool, "cidrs": _cidrs,
        "ports": _ports, "hosts": _hosts,
    }  # fmt: skip


class RuleCompiler(Values):
    """Raw rules (collector.RawRule) into model Rules: kind, conditions, verdict, rate,
    reason, exceptions, tags and severity."""

    def rule(self, raw: RawRule, lists: Lists, order: int) -> Rule | None:
        f = raw.fields
        before = self.failures()
        name = self.text(f["name"]) if "name" in f else None
        if "enabled" in f:
            enabled = self.scalar(f["enabled"])
            if not isinstance(enabled, bool):
                self.at(f["enabled"], f"expected true or false, got {enabled!r}")
            elif not enabled:
                return None
        kind = self._kind(raw)
        if kind is None:
            return None
        match = self.match(kind, f[kind.value], lists)
        verdict = None
        if "verdict" not in f:
            self.err(raw.file, raw.line, raw.prefix, "missing required key 'verdict'")
        else:
            verdict = self.verdict(f["verdict"])
        scope, on_deny = self._response(f, verdict)
        rate = self._rate(f["rate"]) if "rate" in f else None
        if rate is not None and verdict is Verdict.SAFE:
            self.at(f["rate"], "rate does not apply to SAFE rules")
        reason = self._template(f["reason"]) if "reason" in f else ""
        desc = (self.text(f["description"]) or "") if "description" in f else ""
        exceptions = self._exceptions(kind, raw.parts("exceptions"), lists)
        tags = tuple(dict.fromkeys(s for part in raw.parts("tags") for s, _ in self.strings(part, lists)))
        severity = (self.word(f["severity"], SEVERITIES, "severity") or "") if "severity" in f else ""
        if self.failures() > before or name is None or verdict is None or match is None:
            return None
        return Rule(
            name=name, kind=kind, match=match, verdict=verdict, reason=reason or desc,
            description=desc, scope=scope, rate=rate, on_deny=on_deny, order=order,
            file=raw.file, line=raw.line, exceptions=exceptions, tags=tags, severity=severity,
        )  # fmt: skip

    def _kind(self, raw: RawRule) -> RuleKind | None:
        kinds = [k for k in RULE_KINDS if k.value in raw.fields]
        if not kinds:
            self.err(raw.file, raw.line, raw.prefix,
                     f"rule needs one of {', '.join(k.value for k in RULE_KINDS)}")  # fmt: skip
            return None
        if len(kinds) > 1:
            self.at(raw.fields[kinds[1].value], "a rule matches one event kind: split it into two rules",
                    key_line=True)  # fmt: skip
            return None
        return kinds[0]

    def _response(self, f: dict[str, Item], verdict: Verdict | None) -> tuple[Scope, Verdict]:
        """`scope` (KILL rules) and `on_deny` (ASK rules)."""
        scope = Scope.PROCESS
        if "scope" in f:
            v = self.scalar(f["scope"])
            if v not in [s.value for s in Scope]:
                self.at(f["scope"], f"unknown scope {v!r} (one of process, cgroup)")
            elif verdict is not None and verdict is not Verdict.KILL:
                self.at(f["scope"], "scope only applies to KILL rules")
            else:
                scope = Scope(v)
        on_deny = Verdict.KILL
        if "on_deny" in f:
            if verdict is not None and verdict is not Verdict.ASK:
                self.at(f["on_deny"], "on_deny only applies to ASK rules")
            else:
                on_deny = self.verdict(f["on_deny"], (Verdict.HALT, Verdict.KILL)) or on_deny
        return scope, on_deny

    def match(self, kind: RuleKind, item: Item, lists: Lists) -> Match | None:
        if item.node.tag == "tag:yaml.org,2002:null" or (
            isinstance(item.node, yaml.ScalarNode) and value(item.node) in ("any", "*")
        ):
            return Match()  # `connect: any` / `connect: {}`: every event of the kind
        if not self.is_(item, yaml.MappingNode, "a mapping of conditions (or 'any')"):
            return None
        return self.match_fields(kind, self.mapping(item, MATCH_KEYS[kind]), lists)

    def _exceptions(self, kind: RuleKind, parts: list[Item], lists: Lists) -> tuple[RuleException, ...]:
        """`exceptions: [{name: ..., <conditions of this kind>}, ...]` (and what extending
        files appended to it)."""
        out: list[RuleException] = []
        seen: set[str] = set()
        for item in parts:
            if not self.is_(item, yaml.SequenceNode, "a list of exceptions like [{name: x, comm: [git]}]"):
                continue
            for i, node in enumerate(item.node.value):
                exc = self._exception(kind, Item(item.file, f"{item.key}[{i}]", node), lists, seen)
                if exc is not None:
                    seen.add(exc.name)
                    out.append(exc)
        return tuple(out)

    def _exception(self, kind: RuleKind, sub: Item, lists: Lists, seen: set[str]) -> RuleException | None:
        if not self.is_(sub, yaml.MappingNode, "a mapping like {name: x, comm: [git]}"):
            return None
        m = self.mapping(sub, ("name", *MATCH_KEYS[kind]))
        name = self.text(m.pop("name")) if "name" in m else None
        if name is None and not any(isinstance(k, yaml.ScalarNode) and k.value == "name"
                                    for k, _ in sub.node.value):  # a bad name is reported
            self.at(sub, "missing required key 'name'")
        if not m:
            self.at(sub, "an exception needs at least one condition (it would disable the rule)")
            return None
        if name is not None and name in seen:
            self.at(sub, f"duplicate exception name {name!r}")
            return None
        match = self.match_fields(kind, m, lists)
        return RuleException(name, match, sub.file, sub.line) if name is not None else None

    def _rate(self, item: Item) -> Rate | None:
        if not self.is_(item, yaml.MappingNode, "a mapping like {count: 3, window: 10s}"):
            return None
        m = self.mapping(item, RATE_KEYS)
        missing = [k for k in RATE_KEYS if k not in m]
        if missing:
            self.at(item, f"missing required key {missing[0]!r}")
            return None
        count = self.scalar(m["count"])
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            self.at(m["count"], f"expected a whole number >= 1, got {count!r}")
            return None
        window = self.duration(m["window"])
        return Rate(count, window) if window else None

    def _template(self, item: Item) -> str:
        text = self.text(item) or ""
        try:
            fields = [(f, sp) for _, f, sp, _ in string.Formatter().parse(text) if f is not None]
        except ValueError as e:
            self.at(item, f"bad reason template: {e}")
            return ""
        for fld, spec in fields:
            base = re.split(r"[.\[!:]", fld, maxsplit=1)[0]
            if base not in REASON_FIELDS:
                self.at(item, f"unknown field {{{fld}}} in reason{suggest(base, REASON_FIELDS)}")
                return ""
            if fld != base:
                # `{pid[0]}` raises TypeError in the engine at decision time; attributes
                # reach Python internals. Plain names are all a reason needs.
                self.at(item, f"field {{{fld}}} in reason: only plain names like {{{base}}}")
                return ""
            if spec and ("{" in spec or re.search(r"[0-9]{4}", spec)):
                # `{path:>999999999}` would build a 1 GB string for every decision.
                self.at(item, f"format {spec!r} of {{{fld}}} in reason: nested or too wide")
                return ""
        return text


class Compiler(RuleCompiler):
    """A merged Layer (with its resolved lists) into a Policy."""

    def __init__(self, problems: Problems, builtins: dict[str, tuple[str, ...]]) -> None:
        super().__init__(problems)
        self.builtins = builtins

    def build(self, layer: Layer, lists: Lists, source: str) -> Policy | None:
        top = layer.top
        settings = self._settings(top)
        rules: list[Rule] = []
        for raw in [*layer.rules.values(), *layer.unnamed]:
            rule = self.rule(raw, lists, order=len(rules))
            if rule is not None:
                rules.append(rule)
        if self.problems.issues:
            return None
        notes = []
        if "system_resolvers" in self.problems.used_lists and "system_resolvers" not in layer.lists \
                and not self.builtins.get("system_resolvers"):  # fmt: skip
            notes.append(f"$system_resolvers is empty: no nameserver in {RESOLV_CONF} (rules using it "
                         "match no address)")
        plain = {name: tuple(s for s, _ in vals) for name, vals in lists.items()}
        return Policy(
            version=1, rules=tuple(rules), **settings,
            lists={k: v for k, v in plain.items() if k not in SPECIAL_LISTS},
            agent_config_files=plain.get("agent_config_files", ()),
            deny_write=plain.get("deny_write", ()), source=source, sources=tuple(layer.files),
            notes=tuple(notes),
        )  # fmt: skip

    def _settings(self, top: dict[str, Item]) -> dict[str, Any]:
        """The policy-wide keys, as Policy keyword arguments."""
        out: dict[str, Any] = {}
        if "mode" in top:
            v = self.scalar(top["mode"])
            modes = [m.value for m in Mode]
            if v in modes:
                out["mode"] = Mode(v)
            else:
                self.at(top["mode"], f"unknown mode {v!r}{suggest(v, modes)} (one of {', '.join(modes)})")
        if "workspace" in top and top["workspace"].node.tag != "tag:yaml.org,2002:null":
            workspace = self.text(top["workspace"])
            if workspace and not workspace.startswith("/"):
                self.at(top["workspace"], f"workspace must be an absolute path, got {workspace!r}")
            elif workspace:
                out["workspace"] = workspace
        if "default" in top and (default := self.verdict(top["default"])):
            out["default"] = default
        if "flag_threshold" in top:
            v = self.scalar(top["flag_threshold"])
            if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
                out["flag_threshold"] = v
            else:
                self.at(top["flag_threshold"], f"expected a whole number >= 0 (0 disables), got {v!r}")
        if "flag_window" in top and (window := self.duration(top["flag_window"])):
            out["flag_window_s"] = window
        if "ask" in top and self.is_(top["ask"], yaml.MappingNode, "a mapping"):
            out["ask"] = self._ask(top["ask"])
        if "redact" in top:
            out["redact"] = self._redact(top["redact"])
        for key, allowed, default in (("on_guard_exit", GUARD_EXIT_ACTIONS, "freeze"),
                                      ("on_loss", LOSS_ACTIONS, "freeze")):  # fmt: skip
            if key in top:
                out[key] = self._action(top[key], allowed) or default
        return out

    def _ask(self, item: Item) -> AskDefaults:
        ask = AskDefaults()
        a = self.mapping(item, ASK_KEYS)
        timeout = self.duration(a["timeout"]) if "timeout" in a else ask.timeout_s
        answer = ask.default
        if "default" in a:
            v = self.scalar(a["default"])
            if v in ASK_ANSWERS:
                answer = v
            else:
                self.at(a["default"], f"expected deny or allow, got {v!r}")
        return AskDefaults(timeout or ask.timeout_s, answer)

    def _redact(self, item: Item) -> tuple[str, ...]:
        out: list[str] = []
        for s, it in self.strings(item, None):
            problem = regex_problem(s)
            if problem:
                self.at(it, f"invalid regex {s!r}: {problem}")
            else:
                out.append(s)
        return tuple(out)

    def _action(self, item: Item, allowed: tuple[str, ...]) -> str | None:
        v = self.scalar(item)
        if str(v).lower() in allowed:
            return str(v).lower()
        if v is not None or isinstance(item.node, yaml.ScalarNode):
            self.at(item, f"expected {' or '.join(allowed)}, got {v!r}{suggest(str(v).lower(), allowed)}")
        return None
