"""The policy model, and the one place a policy file is parsed and validated.

A policy is YAML (see docs/policy.md). Parsing works on PyYAML's node tree (yaml.compose)
rather than plain data so that every problem can name its file, line and key; all
problems are collected and raised together as one PolicyError.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ebpf_guard.events import CREATE, READ, TRUNCATE, WRITE, Kind
from ebpf_guard.matchers import (
    VARIABLES,
    GlobError,
    compile_glob,
    expand_vars,
    glob_kind,
    parse_network,
    variables_in,
)
from ebpf_guard.verdicts import Mode, Scope, Verdict

SUPPORTED_VERSIONS = (1,)
RULE_KINDS = (Kind.EXEC, Kind.OPEN, Kind.UNLINK, Kind.CONNECT)
ACCESS = (READ, WRITE, CREATE, TRUNCATE)
FAMILIES = ("ipv4", "ipv6", "unix")
# Top-level lists that the bundled rules reference as $agent_config_files / $deny_write.
SPECIAL_LISTS = ("agent_config_files", "deny_write")

TOP_KEYS = (
    "version", "extends", "mode", "workspace", "lists", "rules", "default",
    "flag_threshold", "flag_window", "redact", "ask", *SPECIAL_LISTS,
)  # fmt: skip
RULE_KEYS = (
    "name", "description", "reason", "verdict", "scope", "rate", "on_deny", "enabled",
    *(k.value for k in RULE_KINDS),
)  # fmt: skip
MATCH_KEYS: dict[Kind, tuple[str, ...]] = {
    Kind.EXEC: ("name", "path", "path_not", "args_any", "args_regex", "flags", "operands",
                "operands_not"),
    Kind.OPEN: ("path", "path_not", "access"),
    Kind.UNLINK: ("path", "path_not", "dir"),
    Kind.CONNECT: ("addr", "addr_not", "port", "host", "family", "path"),
}  # fmt: skip
# Conditions that name *what* a rule is about. A rule with none of them is a catch-all.
TARGET_KEYS = frozenset(
    {"name", "path", "args_any", "args_regex", "flags", "operands", "addr", "port", "host"}
)
RATE_KEYS = ("count", "window")
ASK_KEYS = ("timeout", "default")
# Fields a `reason` may template, e.g. "read {path} ({comm}[{pid}])".
REASON_FIELDS = (
    "rule", "kind", "verdict", "path", "raw_path", "comm", "pid", "tgid", "ppid", "uid",
    "argv", "addr", "port", "host", "dest", "value", "count", "window", "home", "workspace",
)  # fmt: skip

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_HOST_RE = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?\.?)+$")


# ---------------------------------------------------------------- errors


@dataclass(frozen=True, slots=True)
class PolicyIssue:
    file: str
    line: int
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.key}: {self.message}"


class PolicyError(Exception):
    def __init__(self, errors: list[PolicyIssue]):
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))


# ---------------------------------------------------------------- model


@dataclass(frozen=True, slots=True)
class Rate:
    count: int
    window_s: float

    @property
    def window_ns(self) -> int:
        return int(self.window_s * 1e9)


@dataclass(frozen=True, slots=True)
class Match:
    """Conditions of one rule; all given conditions must hold, a list means any-of.
    Patterns keep their `{home}`/`{workspace}`/`~` variables: the engine expands them."""

    names: tuple[str, ...] = ()  # exec: glob on the executable's file name
    paths: tuple[str, ...] = ()  # exec/open/unlink: path glob; connect: unix socket path
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

    def has_target(self) -> bool:
        return bool(
            self.names or self.paths or self.args_any or self.args_regex or self.flags
            or self.operands or self.addrs or self.ports or self.hosts
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    kind: Kind
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

    @property
    def catch_all(self) -> bool:
        """Names no target (binary, path, argv, address, port, host): see the evaluation order."""
        return not self.match.has_target()

    @property
    def tier(self) -> int:
        """1 = specific deny, 2 = allow, 3 = catch-all (docs/policy.md, evaluation order)."""
        if self.catch_all:
            return 3
        return 2 if self.verdict is Verdict.SAFE else 1


@dataclass(frozen=True, slots=True)
class AskDefaults:
    timeout_s: float = 60.0
    default: str = "deny"  # what an unanswered ASK becomes: "deny" | "allow"


@dataclass(frozen=True)
class Policy:
    version: int
    rules: tuple[Rule, ...]
    mode: Mode = Mode.ENFORCE
    workspace: str | None = None
    default: Verdict = Verdict.SAFE
    flag_threshold: int = 5  # 0 disables escalation
    flag_window_s: float = 60.0
    ask: AskDefaults = AskDefaults()
    redact: tuple[str, ...] = ()  # extra regexes for the redactor (validated here only)
    lists: dict[str, tuple[str, ...]] = field(default_factory=dict)
    agent_config_files: tuple[str, ...] = ()
    deny_write: tuple[str, ...] = ()
    source: str = "<string>"
    sources: tuple[str, ...] = ()  # this file and every file it extends

    @property
    def flag_window_ns(self) -> int:
        return int(self.flag_window_s * 1e9)


# ---------------------------------------------------------------- entry points


def load_policy(path: str | Path) -> Policy:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise PolicyError(
            [PolicyIssue(str(path), 0, "", f"cannot read policy: {e.strerror}")]
        ) from e
    return _Parser().parse(text, str(path), base_dir=path.parent)


def parse_policy(text: str, source: str = "<string>") -> Policy:
    base_dir = Path(source).parent if source != "<string>" else Path.cwd()
    return _Parser().parse(text, source, base_dir=base_dir)


def parse_duration(value: Any) -> float | None:
    """Seconds from 10, 2.5, "500ms", "10s", "2m", "1h"; None if malformed or not positive."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION_RE.match(value)):
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        return None
    return seconds if seconds > 0 else None


# ---------------------------------------------------------------- parsing


@dataclass
class _Item:
    """One key's value with where it came from: errors cite `file:line: key`."""

    file: str
    key: str  # dotted path, e.g. rules[2].open.path
    node: yaml.Node
    key_node: yaml.Node | None = None

    @property
    def line(self) -> int:
        return self.node.start_mark.line + 1

    @property
    def key_line(self) -> int:
        return (self.key_node or self.node).start_mark.line + 1


@dataclass
class _RawRule:
    file: str
    prefix: str  # rules[i] in its own file
    line: int
    fields: dict[str, _Item]


@dataclass
class _Layer:
    """A file merged over the files it extends."""

    top: dict[str, _Item] = field(default_factory=dict)
    lists: dict[str, _Item] = field(default_factory=dict)
    rules: dict[str, _RawRule] = field(default_factory=dict)  # insertion = evaluation order
    unnamed: list[_RawRule] = field(default_factory=list)
    files: list[str] = field(default_factory=list)


_constructor = yaml.constructor.SafeConstructor()


def _value(node: yaml.Node) -> Any:
    """Plain Python value of a scalar node, with YAML's own typing (ints, bools, null)."""
    return _constructor.construct_object(node, deep=True)


def _suggest(word: str, options: Any) -> str:
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class _Parser:
    def __init__(self) -> None:
        self.issues: list[PolicyIssue] = []

    def err(self, file: str, line: int, key: str, message: str) -> None:
        self.issues.append(PolicyIssue(file, line, key, message))

    def at(self, item: _Item, message: str, *, key_line: bool = False) -> None:
        self.err(item.file, item.key_line if key_line else item.line, item.key, message)

    # -------------------------------------------------- files and extends

    def parse(self, text: str, source: str, base_dir: Path) -> Policy:
        layer = self._layer(text, source, base_dir, seen=())
        policy = self._build(layer, source) if layer is not None else None
        if self.issues or policy is None:
            # Stable order: base files before the files extending them, then by line.
            order = [*(layer.files if layer else ()), *(i.file for i in self.issues)]
            files = {f: i for i, f in reversed(list(enumerate(order)))}
            self.issues.sort(key=lambda i: (files[i.file], i.line))
            raise PolicyError(self.issues)
        return policy

    def _layer(
        self, text: str, source: str, base_dir: Path, seen: tuple[str, ...]
    ) -> _Layer | None:
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            self.err(source, mark.line + 1 if mark else 0, "", f"YAML syntax error: {e.problem}")
            return None
        if root is None:
            self.err(source, 1, "version", "empty policy: missing required key 'version'")
            return None
        if not isinstance(root, yaml.MappingNode):
            self.err(source, root.start_mark.line + 1, "", "a policy must be a mapping of keys")
            return None
        top = self._mapping(_Item(source, "", root), TOP_KEYS)
        if "version" not in top:
            self.err(source, 1, "version", "missing required key 'version'")
        else:
            v = (
                _value(top["version"].node)
                if isinstance(top["version"].node, yaml.ScalarNode)
                else None
            )
            if v not in SUPPORTED_VERSIONS or isinstance(v, bool):
                self.at(top["version"], f"unsupported version {v!r} (supported: 1)")

        layer = _Layer()
        if "extends" in top:
            item = top["extends"]
            name = self._str(item)
            if name is not None:
                base_path = (base_dir / name).resolve()
                if str(base_path) in seen or base_path == Path(source).resolve():
                    self.at(item, f"extends cycle through {name!r}")
                else:
                    try:
                        base_text = base_path.read_text()
                    except OSError as e:
                        self.at(item, f"cannot read {name!r}: {e.strerror}")
                    else:
                        base = self._layer(
                            base_text, str(base_dir / name), base_path.parent,
                            (*seen, str(Path(source).resolve())),
                        )  # fmt: skip
                        if base is not None:
                            layer = base
        layer.files.append(source)
        for key, item in top.items():
            if key == "lists":
                if self._is(item, yaml.MappingNode, "a mapping of list names to lists"):
                    for name, li in self._mapping(item, None).items():
                        layer.lists[name] = li
            elif key == "rules":
                self._merge_rules(layer, item)
            elif key not in ("extends", "version"):
                layer.top[key] = item
        return layer

    def _merge_rules(self, layer: _Layer, item: _Item) -> None:
        if not self._is(item, yaml.SequenceNode, "a list of rules"):
            return
        own: set[str] = set()
        for i, node in enumerate(item.node.value):
            prefix = f"rules[{i}]"
            ritem = _Item(item.file, prefix, node)
            if not self._is(ritem, yaml.MappingNode, "a mapping"):
                continue
            fields = self._mapping(ritem, RULE_KEYS)
            raw = _RawRule(item.file, prefix, ritem.line, fields)
            name = self._str(fields["name"]) if "name" in fields else None
            if "name" not in fields:
                self.err(item.file, ritem.line, prefix, "missing required key 'name'")
            if name is None:
                layer.unnamed.append(raw)
                continue
            if name in own:
                self.at(fields["name"], f"duplicate rule name {name!r}")
                continue
            own.add(name)
            base = layer.rules.get(name)
            if base is not None:
                # Overriding a rule of an extended file: merge key by key, in place.
                merged = dict(base.fields)
                if any(k in fields for k in (k.value for k in RULE_KINDS)):
                    for k in RULE_KINDS:
                        merged.pop(k.value, None)
                merged.update(fields)
                layer.rules[name] = _RawRule(item.file, prefix, ritem.line, merged)
            else:
                layer.rules[name] = raw

    # -------------------------------------------------- node helpers

    def _is(self, item: _Item, cls: type, what: str) -> bool:
        if isinstance(item.node, cls):
            return True
        self.at(item, f"expected {what}")
        return False

    def _mapping(self, item: _Item, allowed: tuple[str, ...] | None) -> dict[str, _Item]:
        """Keys of a mapping node; unknown keys (if `allowed`) and duplicates are reported."""
        out: dict[str, _Item] = {}
        for knode, vnode in item.node.value:
            key = str(_value(knode)) if isinstance(knode, yaml.ScalarNode) else "?"
            path = f"{item.key}.{key}" if item.key else key
            child = _Item(item.file, path, vnode, knode)
            if allowed is not None and key not in allowed:
                self.at(child, f"unknown key {key!r}{_suggest(key, allowed)}", key_line=True)
                continue
            if key in out:
                self.at(child, f"duplicate key {key!r}", key_line=True)
                continue
            out[key] = child
        return out

    def _scalar(self, item: _Item) -> Any:
        if isinstance(item.node, yaml.ScalarNode):
            return _value(item.node)
        self.at(item, "expected a single value")
        return None

    def _str(self, item: _Item) -> str | None:
        v = self._scalar(item)
        if isinstance(v, str) and v:
            return v
        if v is not None or isinstance(item.node, yaml.ScalarNode):
            self.at(item, f"expected a non-empty string, got {v!r}")
        return None

    def _strings(
        self, item: _Item, lists: dict[str, list[tuple[str, _Item]]] | None
    ) -> list[tuple[str, _Item]]:
        """A string or list of strings; `$name` items splice the named list (if `lists`)."""
        nodes = item.node.value if isinstance(item.node, yaml.SequenceNode) else [item.node]
        seq = isinstance(item.node, yaml.SequenceNode)
        out: list[tuple[str, _Item]] = []
        for i, node in enumerate(nodes):
            sub = _Item(item.file, f"{item.key}[{i}]" if seq else item.key, node)
            v = self._scalar(sub)
            if v is None or isinstance(v, (bool, dict, list)):
                if v is not None or isinstance(node, yaml.ScalarNode):
                    self.at(sub, f"expected a string, got {v!r}")
                continue
            s = str(v)
            if lists is not None and s.startswith("$"):
                name = s[1:]
                if name not in lists:
                    self.at(
                        sub, f"unknown list {s!r}{_suggest('$' + name, ['$' + k for k in lists])}"
                    )
                    continue
                out.extend(lists[name])
            else:
                out.append((s, sub))
        return out

    # -------------------------------------------------- building the model

    def _build(self, layer: _Layer, source: str) -> Policy | None:
        top = layer.top
        lists = self._resolve_lists(layer)

        mode = Mode.ENFORCE
        if "mode" in top:
            v = self._scalar(top["mode"])
            modes = [m.value for m in Mode]
            if v in modes:
                mode = Mode(v)
            else:
                self.at(
                    top["mode"],
                    f"unknown mode {v!r}{_suggest(v, modes)} (one of {', '.join(modes)})",
                )

        workspace = None
        if "workspace" in top and top["workspace"].node.tag != "tag:yaml.org,2002:null":
            workspace = self._str(top["workspace"])
            if workspace and not workspace.startswith("/"):
                self.at(top["workspace"], f"workspace must be an absolute path, got {workspace!r}")
                workspace = None

        default = Verdict.SAFE
        if "default" in top:
            default = self._verdict(top["default"]) or default

        threshold = 5
        if "flag_threshold" in top:
            v = self._scalar(top["flag_threshold"])
            if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
                threshold = v
            else:
                self.at(
                    top["flag_threshold"], f"expected a whole number >= 0 (0 disables), got {v!r}"
                )
        window = 60.0
        if "flag_window" in top:
            window = self._duration(top["flag_window"]) or window

        ask = AskDefaults()
        if "ask" in top and self._is(top["ask"], yaml.MappingNode, "a mapping"):
            a = self._mapping(top["ask"], ASK_KEYS)
            timeout = self._duration(a["timeout"]) if "timeout" in a else ask.timeout_s
            answer = ask.default
            if "default" in a:
                v = self._scalar(a["default"])
                if v in ("deny", "allow"):
                    answer = v
                else:
                    self.at(a["default"], f"expected deny or allow, got {v!r}")
            ask = AskDefaults(timeout or ask.timeout_s, answer)

        redact: list[str] = []
        if "redact" in top:
            for s, it in self._strings(top["redact"], None):
                try:
                    re.compile(s)
                    redact.append(s)
                except re.error as e:
                    self.at(it, f"invalid regex {s!r}: {e}")

        rules: list[Rule] = []
        for raw in [*layer.rules.values(), *layer.unnamed]:
            rule = self._rule(raw, lists, order=len(rules))
            if rule is not None:
                rules.append(rule)

        if self.issues:
            return None
        plain = {name: tuple(s for s, _ in vals) for name, vals in lists.items()}
        return Policy(
            version=1, rules=tuple(rules), mode=mode, workspace=workspace, default=default,
            flag_threshold=threshold, flag_window_s=window, ask=ask, redact=tuple(redact),
            lists={k: v for k, v in plain.items() if k not in SPECIAL_LISTS},
            agent_config_files=plain.get("agent_config_files", ()),
            deny_write=plain.get("deny_write", ()), source=source, sources=tuple(layer.files),
        )  # fmt: skip

    def _resolve_lists(self, layer: _Layer) -> dict[str, list[tuple[str, _Item]]]:
        """Named lists with `$other` references spliced in (cycles reported)."""
        defs: dict[str, _Item] = dict(layer.lists)
        for name in SPECIAL_LISTS:
            if name in layer.top:
                if name in defs:
                    self.at(defs[name], f"list {name!r} is also a top-level key; define it once")
                defs[name] = layer.top.pop(name)
        done: dict[str, list[tuple[str, _Item]]] = {}
        active: list[str] = []

        def resolve(name: str) -> list[tuple[str, _Item]]:
            if name in done:
                return done[name]
            item = defs[name]
            if name in active:
                self.at(item, f"list {name!r} refers to itself (via {' -> '.join(active)})")
                return []
            active.append(name)
            out: list[tuple[str, _Item]] = []
            for s, it in self._strings(item, None):
                if s.startswith("$"):
                    ref = s[1:]
                    if ref in defs:
                        out.extend(resolve(ref))
                    else:
                        self.at(it, f"unknown list {s!r}{_suggest(s, ['$' + k for k in defs])}")
                else:
                    out.append((s, it))
            active.pop()
            done[name] = out
            return out

        for name in defs:
            resolve(name)
        return done

    def _verdict(
        self, item: _Item, allowed: tuple[Verdict, ...] = tuple(Verdict)
    ) -> Verdict | None:
        v = self._scalar(item)
        names = [a.value for a in allowed]
        if isinstance(v, str) and v.upper() in names:
            return Verdict(v.upper())
        self.at(
            item,
            f"unknown verdict {v!r}{_suggest(str(v).upper(), names)} (one of {', '.join(names)})",
        )
        return None

    def _duration(self, item: _Item) -> float | None:
        v = self._scalar(item)
        seconds = parse_duration(v)
        if seconds is None:
            self.at(
                item,
                f"bad duration {v!r}: use a positive number of seconds or e.g. 500ms, 10s, 2m, 1h",
            )
        return seconds

    def _globs(self, item: _Item, lists: dict, *, what: str = "path") -> tuple[str, ...]:
        out = []
        for s, it in self._strings(item, lists):
            if self._check_glob(s, it, what):
                out.append(s)
        return tuple(out)

    def _check_glob(self, pattern: str, item: _Item, what: str) -> bool:
        unknown = [v for v in variables_in(pattern) if v not in VARIABLES]
        if unknown:
            self.at(
                item,
                f"unknown variable {{{unknown[0]}}} in {pattern!r}"
                f"{_suggest(unknown[0], VARIABLES)}",
            )
            return False
        # Compile with stand-in values: the real ones are only known to the engine.
        probe = expand_vars(pattern, {"home": "/home/u", "workspace": "/work/w"})
        try:
            if what == "name" and "/" in pattern:
                raise GlobError(f"{pattern!r} is a path, not a file name: use 'path'")
            glob_kind(probe or pattern)
            compile_glob(probe or pattern)
        except GlobError as e:
            self.at(item, f"bad glob: {e}")
            return False
        return True

    def _rule(self, raw: _RawRule, lists: dict, order: int) -> Rule | None:
        f = raw.fields
        errors_before = len(self.issues)
        name = self._str(f["name"]) if "name" in f else None
        if "enabled" in f:
            enabled = self._scalar(f["enabled"])
            if not isinstance(enabled, bool):
                self.at(f["enabled"], f"expected true or false, got {enabled!r}")
            elif not enabled:
                return None
        kinds = [k for k in RULE_KINDS if k.value in f]
        if not kinds:
            self.err(raw.file, raw.line, raw.prefix,
                     "rule needs one of exec, open, unlink, connect")  # fmt: skip
            return None
        if len(kinds) > 1:
            self.at(
                f[kinds[1].value],
                "a rule matches one event kind: split it into two rules",
                key_line=True,
            )
            return None
        kind = kinds[0]
        match = self._match(kind, f[kind.value], lists)

        verdict = None
        if "verdict" not in f:
            self.err(raw.file, raw.line, raw.prefix, "missing required key 'verdict'")
        else:
            verdict = self._verdict(f["verdict"])
        scope = Scope.PROCESS
        if "scope" in f:
            v = self._scalar(f["scope"])
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
                on_deny = self._verdict(f["on_deny"], (Verdict.HALT, Verdict.KILL)) or on_deny
        rate = self._rate(f["rate"]) if "rate" in f else None
        if rate is not None and verdict is Verdict.SAFE:
            self.at(f["rate"], "rate does not apply to SAFE rules")
        reason = self._template(f["reason"]) if "reason" in f else ""
        desc = ""
        if "description" in f:
            desc = self._str(f["description"]) or ""
        if len(self.issues) > errors_before or name is None or verdict is None or match is None:
            return None
        return Rule(
            name=name, kind=kind, match=match, verdict=verdict, reason=reason or desc,
            description=desc, scope=scope, rate=rate, on_deny=on_deny, order=order,
            file=raw.file, line=raw.line,
        )  # fmt: skip

    def _rate(self, item: _Item) -> Rate | None:
        if not self._is(item, yaml.MappingNode, "a mapping like {count: 3, window: 10s}"):
            return None
        m = self._mapping(item, RATE_KEYS)
        missing = [k for k in RATE_KEYS if k not in m]
        if missing:
            self.at(item, f"missing required key {missing[0]!r}")
            return None
        count = self._scalar(m["count"])
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            self.at(m["count"], f"expected a whole number >= 1, got {count!r}")
            return None
        window = self._duration(m["window"])
        return Rate(count, window) if window else None

    def _template(self, item: _Item) -> str:
        text = self._str(item) or ""
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(text) if f is not None]
        except ValueError as e:
            self.at(item, f"bad reason template: {e}")
            return ""
        for fld in fields:
            base = re.split(r"[.\[!:]", fld, maxsplit=1)[0]
            if base not in REASON_FIELDS:
                self.at(item, f"unknown field {{{fld}}} in reason{_suggest(base, REASON_FIELDS)}")
                return ""
        return text

    def _match(self, kind: Kind, item: _Item, lists: dict) -> Match | None:
        if item.node.tag == "tag:yaml.org,2002:null" or (
            isinstance(item.node, yaml.ScalarNode) and _value(item.node) in ("any", "*")
        ):
            return Match()  # `connect: any` / `connect: {}`: every event of the kind
        if not self._is(item, yaml.MappingNode, "a mapping of conditions (or 'any')"):
            return None
        m = self._mapping(item, MATCH_KEYS[kind])
        kw: dict[str, Any] = {}
        if "name" in m:
            kw["names"] = self._globs(m["name"], lists, what="name")
        if "path" in m:
            kw["paths"] = self._globs(m["path"], lists)
        if "path_not" in m:
            kw["paths_not"] = self._globs(m["path_not"], lists)
        if "operands" in m:
            kw["operands"] = self._globs(m["operands"], lists)
        if "operands_not" in m:
            kw["operands_not"] = self._globs(m["operands_not"], lists)
        if "args_any" in m:
            kw["args_any"] = tuple(s for s, _ in self._strings(m["args_any"], lists))
            for s in kw["args_any"]:
                re.compile(fnmatch.translate(s))  # fnmatch accepts any string
        if "args_regex" in m:
            s = self._str(m["args_regex"])
            try:
                re.compile(s or "")
                kw["args_regex"] = s
            except re.error as e:
                self.at(m["args_regex"], f"invalid regex {s!r}: {e}")
        if "flags" in m:
            flags = []
            for s, it in self._strings(m["flags"], lists):
                if re.fullmatch(r"-[A-Za-z0-9]+|--[A-Za-z0-9][\w-]*", s):
                    flags.append(s)
                else:
                    self.at(it, f"bad flag {s!r}: write -r, -rf or --recursive")
            kw["flags"] = tuple(flags)
        if "access" in m:
            acc = []
            for s, it in self._strings(m["access"], lists):
                if s in ACCESS:
                    acc.append(s)
                else:
                    self.at(
                        it,
                        f"unknown access {s!r}{_suggest(s, ACCESS)} (one of {', '.join(ACCESS)})",
                    )
            kw["access"] = frozenset(acc)
        if "dir" in m:
            v = self._scalar(m["dir"])
            if isinstance(v, bool):
                kw["dir"] = v
            else:
                self.at(m["dir"], f"expected true or false, got {v!r}")
        for key, attr in (("addr", "addrs"), ("addr_not", "addrs_not")):
            if key in m:
                nets = []
                for s, it in self._strings(m[key], lists):
                    try:
                        parse_network(s)
                        nets.append(s)
                    except ValueError as e:
                        self.at(it, f"bad CIDR: {e}")
                kw[attr] = tuple(nets)
        if "port" in m:
            kw["ports"] = self._ports(m["port"], lists)
        if "host" in m:
            hosts = []
            for s, it in self._strings(m["host"], lists):
                if _HOST_RE.match(s) and not s.replace(".", "").isdigit():
                    hosts.append(s.lower().rstrip("."))
                else:
                    self.at(it, f"bad host name {s!r} (no wildcards; IPs go in 'addr')")
            kw["hosts"] = tuple(hosts)
        if "family" in m:
            fam = []
            for s, it in self._strings(m["family"], lists):
                if s in FAMILIES:
                    fam.append(s)
                else:
                    self.at(
                        it,
                        f"unknown family {s!r}{_suggest(s, FAMILIES)} "
                        f"(one of {', '.join(FAMILIES)})",
                    )
            kw["family"] = frozenset(fam)
        return Match(**kw)

    def _ports(self, item: _Item, lists: dict) -> tuple[tuple[int, int], ...]:
        out = []
        for s, it in self._strings(item, lists):
            m = re.fullmatch(r"(\d+)(?:-(\d+))?", s.strip())
            lo, hi = (int(m.group(1)), int(m.group(2) or m.group(1))) if m else (-1, -1)
            if not m or not (0 <= lo <= hi <= 65535):
                self.at(it, f"bad port {s!r}: use 0-65535 or a range like 8000-8100")
                continue
            out.append((lo, hi))
        return tuple(out)
