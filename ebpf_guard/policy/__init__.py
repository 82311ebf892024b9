"""The policy model, and the one place a policy file is parsed and validated.

A policy is YAML (see docs/policy.md). Parsing works on PyYAML's node tree (yaml.compose)
rather than plain data so that every problem can name its file, line and key; all
problems are collected and raised together as one PolicyError.
"""

from __future__ import annotations

import difflib
import fnmatch
import math
import os
import re
import string
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from ebpf_guard.events import CREATE, READ, TRUNCATE, WRITE, Kind
from ebpf_guard.files import read_regular
from ebpf_guard.policy.identities import Identities, compile_identities
from ebpf_guard.policy.matchers import (
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
RULE_KINDS = (
    Kind.EXEC, Kind.OPEN, Kind.UNLINK, Kind.CONNECT, Kind.RENAME, Kind.LINK, Kind.SYMLINK,
    Kind.TRUNCATE, Kind.MMAP_EXEC, Kind.IO_URING, Kind.PTRACE,
)  # fmt: skip
ACCESS = (READ, WRITE, CREATE, TRUNCATE)
FAMILIES = ("ipv4", "ipv6", "unix")
# Top-level lists that the bundled rules reference as $agent_config_files / $deny_write.
SPECIAL_LISTS = ("agent_config_files", "deny_write")

TOP_KEYS = (
    "version", "extends", "mode", "workspace", "lists", "rules", "default",
    "flag_threshold", "flag_window", "redact", "ask", "on_guard_exit", "on_loss", *SPECIAL_LISTS,
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
    # rename/link: either name (source or new); symlink: the target or the link made
    Kind.RENAME: ("path", "path_not"),
    Kind.LINK: ("path", "path_not"),
    Kind.SYMLINK: ("path", "path_not"),
    Kind.TRUNCATE: ("path", "path_not"),
    Kind.MMAP_EXEC: ("name", "path", "path_not"),  # the file mapped
    Kind.IO_URING: ("name", "path", "path_not"),  # the executable of the process doing it
    Kind.PTRACE: ("name", "path", "path_not"),  # the tracer's executable
}  # fmt: skip
# Conditions that name *what* a rule is about. A rule with none of them is a catch-all.
TARGET_KEYS = frozenset(
    {"name", "path", "args_any", "args_regex", "flags", "operands", "addr", "port", "host"}
)
RATE_KEYS = ("count", "window")
GUARD_EXIT_ACTIONS = ("freeze", "kill")  # on_guard_exit: what the watchdog does if the guard dies
LOSS_ACTIONS = ("freeze", "ignore")  # on_loss: what a lost sensor event does in enforce mode
ASK_KEYS = ("timeout", "default")
# Fields a `reason` may template, e.g. "read {path} ({comm}[{pid}])".
REASON_FIELDS = (
    "rule", "kind", "verdict", "path", "raw_path", "comm", "pid", "tgid", "ppid", "uid",
    "argv", "addr", "port", "host", "dest", "value", "count", "window", "home", "workspace",
    "real_path", "exe",
)  # fmt: skip

# Used with fullmatch on stripped text: no `\s*` on both sides of an optional group, which
# backtracked quadratically on long runs of spaces.
_DURATION_RE = re.compile(r"([0-9]{1,12}(?:\.[0-9]{1,12})?)\s*(ms|s|m|h)?")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
MAX_DURATION_S = 365 * 86400.0  # windows become int ns; an unbounded float would overflow
# One DNS label; names are split on "." first (a single regex over the whole name with an
# optional dot between labels backtracked exponentially on e.g. "aaaa...a!").
_LABEL_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?")

# Bounds on what a policy file may cost to parse (a policy is small: default.yaml is 6 KiB).
MAX_POLICY_BYTES = 1 << 20
MAX_DEPTH = 32  # YAML nesting; PyYAML's composer recurses, deeper input hit RecursionError
MAX_NODES = 250_000  # nodes with every alias expanded at each use ("billion laughs")
MAX_STRINGS = 250_000  # strings after splicing $lists into lists and rules
MAX_EXTENDS = 8  # files in one extends chain
MAX_ISSUES = 200  # problems reported; the rest are counted
_SAFE_TAGS = frozenset(
    f"tag:yaml.org,2002:{t}"
    for t in ("null", "bool", "int", "float", "str", "timestamp", "seq", "map")
)


# ---------------------------------------------------------------- errors


@dataclass(frozen=True, slots=True)
class PolicyIssue:
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
    on_guard_exit: str = "freeze"  # GUARD_EXIT_ACTIONS: the watchdog's answer to a dead guard
    on_loss: str = "freeze"  # LOSS_ACTIONS: enforce mode, a lost sensor event freezes the cgroup
    lists: dict[str, tuple[str, ...]] = field(default_factory=dict)
    agent_config_files: tuple[str, ...] = ()
    deny_write: tuple[str, ...] = ()
    source: str = "<string>"
    sources: tuple[str, ...] = ()  # this file and every file it extends
    # Host identities (protected inodes, listed programs): load_policy() computes them; the
    # engine only looks them up. None: names and paths only.
    identities: Identities | None = field(default=None, compare=False, repr=False)

    @property
    def flag_window_ns(self) -> int:
        return int(self.flag_window_s * 1e9)


# ---------------------------------------------------------------- entry points


def load_policy(path: str | Path, *, identities: bool = True) -> Policy:
    """Parse and validate a policy file and (unless `identities=False`) compute its host
    identities for the policy's workspace and the local users' homes: see policy/identities.py. A
    caller with another workspace recomputes them with `compile_identities()`."""
    path = Path(path)
    try:
        text = _read_text(path)
    except _Unreadable as e:
        msg = f"cannot read policy: {e.message}" if e.io else e.message
        raise PolicyError([PolicyIssue(str(path), e.line, "", msg)]) from None
    policy = _Parser().parse(text, str(path), base_dir=path.parent)
    return replace(policy, identities=compile_identities(policy)) if identities else policy


def parse_policy(text: str, source: str = "<string>") -> Policy:
    base_dir = Path(source).parent if source != "<string>" else Path.cwd()
    return _Parser().parse(text, source, base_dir=base_dir)


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
        return float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    return None


class _Unreadable(Exception):
    def __init__(self, message: str, line: int = 0, *, io: bool = False) -> None:
        super().__init__(message)
        self.message, self.line = message, line
        self.io = io  # could not read it at all, vs. read it and it is not a policy


def _read_text(path: Path) -> str:
    """A policy file's text; `_Unreadable` (with the line, where there is one) otherwise.

    Only regular files are opened (`files.read_regular`); size is bounded before reading."""
    try:
        with read_regular(path) as f:
            if os.fstat(f.fileno()).st_size > MAX_POLICY_BYTES:
                raise _Unreadable(f"policy larger than {MAX_POLICY_BYTES >> 20} MiB")
            data = f.read(MAX_POLICY_BYTES + 1)
    except OSError as e:
        raise _Unreadable(e.strerror or str(e), io=True) from None
    except ValueError:  # a path with a NUL byte
        raise _Unreadable("the path contains a NUL byte", io=True) from None
    if len(data) > MAX_POLICY_BYTES:
        raise _Unreadable(f"policy larger than {MAX_POLICY_BYTES >> 20} MiB")
    nul = data.find(b"\0")
    if nul >= 0:
        line = data.count(b"\n", 0, nul) + 1
        raise _Unreadable("binary data (NUL byte): not a YAML policy", line)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise _Unreadable(f"not UTF-8 text (byte 0x{data[e.start]:02x})", line) from None


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
    """Plain Python value of a scalar node, with YAML's own typing (ints, bools, null).
    Only called on nodes `_Parser._check_tree` accepted, so it does not raise."""
    try:
        return _constructor.construct_object(node, deep=True)
    finally:
        # The constructor caches every node it built, and each node's marks hold the whole
        # document: without this, every policy ever parsed stayed in memory.
        _constructor.constructed_objects.clear()
        _constructor.recursive_objects.clear()


def _tag_name(node: yaml.Node) -> str:
    """What a scalar was read as, for messages: "date", "int", ..."""
    tag = _short_tag(node.tag).lstrip("!")
    return {"timestamp": "date", "str": "string"}.get(tag, tag)


def _clip(text: str, limit: int = 40) -> str:
    """repr() of a scalar's text for a message, cut short: it may be a megabyte."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


def _short_tag(tag: str) -> str:
    return "!!" + tag[len("tag:yaml.org,2002:") :] if tag.startswith("tag:yaml.org,2002:") else tag


class _Loader(yaml.SafeLoader):
    """SafeLoader (no Python object tags) that refuses nesting deeper than MAX_DEPTH.

    The composer recurses once per level: without the bound, a few thousand `[` raise
    RecursionError instead of a located error."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        if self._depth >= MAX_DEPTH:
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(
                None, None, f"nested deeper than {MAX_DEPTH} levels", mark
            )
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _valid_host(name: str) -> bool:
    """A DNS name (labels of letters, digits, '-', '_'; one trailing dot allowed), not an IP."""
    if not 1 <= len(name) <= 253 or name.replace(".", "").isdigit():
        return False
    labels = name[:-1].split(".") if name.endswith(".") else name.split(".")
    return all(_LABEL_RE.fullmatch(label) for label in labels)


def _regex_problem(pattern: str) -> str | None:
    """Why `pattern` does not compile, or None. re.compile raises more than re.error:
    OverflowError for `a{99999999999}`, RecursionError for thousands of nested groups."""
    try:
        re.compile(pattern)
    except (re.error, OverflowError, RecursionError, ValueError) as e:
        return str(e) or type(e).__name__
    return None


def _suggest(word: str, options: Any) -> str:
    options = [str(o) for o in options]
    if len(str(word)) > 100 or len(options) > 500:
        return ""  # difflib is quadratic; a suggestion is not worth that
    close = difflib.get_close_matches(str(word), options, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class _Parser:
    def __init__(self) -> None:
        self.issues: list[PolicyIssue] = []
        self.dropped = 0  # issues beyond MAX_ISSUES: counted, not kept
        self.budget = MAX_STRINGS  # strings left to produce (see _spend)

    def err(self, file: str, line: int, key: str, message: str) -> None:
        if len(self.issues) >= MAX_ISSUES:
            self.dropped += 1
            return
        self.issues.append(PolicyIssue(file, line, key, message))

    def _spend(self, n: int, item: _Item) -> bool:
        """Charge n strings; False (reported once) past MAX_STRINGS: `$list` splicing is
        another way to a billion laughs (lists of lists of lists ...)."""
        self.budget -= n
        if self.budget >= 0:
            return True
        if self.budget + n >= 0:
            self.at(item, f"lists expand to more than {MAX_STRINGS} strings")
        return False

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
            if self.dropped:
                self.issues.append(
                    PolicyIssue(source, 0, "", f"{self.dropped} more problems not shown")
                )
            raise PolicyError(self.issues)
        return policy

    def _layer(
        self, text: str, source: str, base_dir: Path, seen: tuple[str, ...]
    ) -> _Layer | None:
        nul = text.find("\0")
        if nul >= 0:
            self.err(source, text.count("\n", 0, nul) + 1, "",
                     "binary data (NUL byte): not a YAML policy")  # fmt: skip
            return None
        try:
            root = yaml.compose(text, Loader=_Loader)
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            problem = e.problem or e.context or "malformed YAML"
            self.err(source, mark.line + 1 if mark else 0, "", f"YAML syntax error: {problem}")
            return None
        except yaml.reader.ReaderError as e:  # a character YAML does not allow
            line = text.count("\n", 0, e.position) + 1
            self.err(source, line, "", f"YAML syntax error: {e.reason} ({e.character!r})")
            return None
        except yaml.YAMLError as e:
            self.err(source, 0, "", f"YAML syntax error: {e}")
            return None
        if root is not None and not self._check_tree(root, source):
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
            if v not in SUPPORTED_VERSIONS or type(v) is not int:  # not True, not 1.0
                self.at(top["version"], f"unsupported version {v!r} (supported: 1)")

        layer = None
        if "extends" in top:
            layer = self._extends(top["extends"], source, base_dir, seen)
        layer = layer or _Layer()
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

    def _check_tree(self, root: yaml.Node, source: str) -> bool:
        """Refuse what the parser must not walk into; False if anything was reported.

        - tags outside YAML's core schema (`!!python/object`, `!!binary`, `!foo`, merge keys);
        - scalars the safe constructor rejects (`!!int x`, `2001-13-45`, 5000-digit ints);
        - recursive aliases (`&a [*a]`), and more than MAX_NODES nodes counting each alias
          at every use: the parser walks every use, so aliases must not multiply its work.
        Iterative (aliases can chain far deeper than the nesting bound).
        """
        size: dict[int, int] = {}  # expanded size of each finished node
        on_path: set[int] = set()  # ancestors of the node being visited: a revisit is a cycle
        todo: list[tuple[yaml.Node, str, bool]] = [(root, "", False)]
        ok = True
        while todo:
            node, key, finished = todo.pop()
            nid = id(node)
            if finished:
                on_path.discard(nid)
                kids = [k for pair in node.value for k in pair] if isinstance(
                    node, yaml.MappingNode) else node.value  # fmt: skip
                size[nid] = 1 + sum(size.get(id(k), 1) for k in kids)
                if size[nid] > MAX_NODES:
                    self.err(source, node.start_mark.line + 1, key,
                             f"more than {MAX_NODES} values with aliases expanded")  # fmt: skip
                    return False
                continue
            if nid in size:
                continue
            if nid in on_path:
                line = node.start_mark.line + 1
                self.err(source, line, key, "an alias refers to a node containing it (recursive)")
                return False
            line = node.start_mark.line + 1
            if node.tag not in _SAFE_TAGS:
                tag = _short_tag(node.tag)
                if node.tag == "tag:yaml.org,2002:merge":
                    self.err(source, line, key, "merge keys ('<<') are not supported")
                elif isinstance(node, yaml.ScalarNode):
                    self.err(source, line, key,
                             f"unsupported YAML tag {tag} (quote {_clip(node.value)} if a string "
                             "was meant)")  # fmt: skip
                else:
                    self.err(source, line, key, f"unsupported YAML tag {tag}")
                ok = False
                size[nid] = 1
                continue
            if isinstance(node, yaml.ScalarNode):
                try:
                    _value(node)
                except Exception as e:  # ValueError, OverflowError, ConstructorError, ...
                    msg = str(getattr(e, "problem", None) or e).splitlines()[0]
                    self.err(source, line, key, f"bad {_tag_name(node)} {_clip(node.value)}: {msg}")
                    ok = False
                size[nid] = 1
                continue
            on_path.add(nid)
            todo.append((node, key, True))
            if isinstance(node, yaml.SequenceNode):
                todo.extend((n, f"{key}[{i}]", False) for i, n in enumerate(node.value))
            else:
                for k, v in node.value:
                    name = k.value if isinstance(k, yaml.ScalarNode) else "?"
                    path = f"{key}.{name}" if key else name
                    todo.extend(((k, path, False), (v, path, False)))
        return ok

    def _extends(
        self, item: _Item, source: str, base_dir: Path, seen: tuple[str, ...]
    ) -> _Layer | None:
        """The layer of the file `item` names, or None (with the problem reported)."""
        name = self._str(item)
        if name is None:
            return None
        if "\0" in name:
            self.at(item, f"bad file name {name!r} (NUL byte)")
            return None
        if len(seen) + 1 >= MAX_EXTENDS:  # each level is a recursion of _layer
            self.at(item, f"extends chain longer than {MAX_EXTENDS} files")
            return None
        try:
            base_path = (base_dir / name).resolve()
            this = Path(source).resolve()
        except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop (Python 3.11)
            self.at(item, f"cannot read {name!r}: {e}")
            return None
        if str(base_path) in seen or base_path == this:
            self.at(item, f"extends cycle through {name!r}")
            return None
        try:
            base_text = _read_text(base_path)
        except _Unreadable as e:
            if e.io:
                self.at(item, f"cannot read {name!r}: {e.message}")
            else:  # its content: reported in that file, like its other errors
                self.err(str(base_dir / name), e.line, "", e.message)
            return None
        return self._layer(base_text, str(base_dir / name), base_path.parent, (*seen, str(this)))

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
                if not self._spend(len(lists[name]), sub):
                    break
                out.extend(lists[name])
            else:
                if not self._spend(1, sub):
                    break
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
                problem = _regex_problem(s)
                if problem:
                    self.at(it, f"invalid regex {s!r}: {problem}")
                else:
                    redact.append(s)

        on_guard_exit = "freeze"
        if "on_guard_exit" in top:
            v = self._scalar(top["on_guard_exit"])
            if str(v).lower() in GUARD_EXIT_ACTIONS:
                on_guard_exit = str(v).lower()
            elif v is not None or isinstance(top["on_guard_exit"].node, yaml.ScalarNode):
                self.at(top["on_guard_exit"], f"expected freeze or kill, got {v!r}"
                        f"{_suggest(str(v).lower(), GUARD_EXIT_ACTIONS)}")

        on_loss = "freeze"
        if "on_loss" in top:
            v = self._scalar(top["on_loss"])
            if str(v).lower() in LOSS_ACTIONS:
                on_loss = str(v).lower()
            elif v is not None or isinstance(top["on_loss"].node, yaml.ScalarNode):
                self.at(top["on_loss"], f"expected freeze or ignore, got {v!r}"
                        f"{_suggest(str(v).lower(), LOSS_ACTIONS)}")

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
            on_guard_exit=on_guard_exit, on_loss=on_loss,
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
            if len(active) >= MAX_DEPTH:  # resolve() recurses once per reference
                self.at(item, f"list references nested deeper than {MAX_DEPTH} levels")
                return []
            active.append(name)
            out: list[tuple[str, _Item]] = []
            for s, it in self._strings(item, None):
                if s.startswith("$"):
                    ref = s[1:]
                    if ref in defs:
                        spliced = resolve(ref)
                        if not self._spend(len(spliced), it):
                            break
                        out.extend(spliced)
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
        raw = _seconds(v)
        if seconds is None and raw is not None and raw > MAX_DURATION_S:
            self.at(item, f"duration {v!r} is too long (at most {MAX_DURATION_S / 86400:g} days)")
        elif seconds is None:
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
        except (re.error, OverflowError, RecursionError) as e:  # what compile_glob lets through
            self.at(item, f"bad glob {pattern!r}: {e}")
            return False
        return True

    def _rule(self, raw: _RawRule, lists: dict, order: int) -> Rule | None:
        f = raw.fields
        errors_before = len(self.issues) + self.dropped
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
                     f"rule needs one of {', '.join(k.value for k in RULE_KINDS)}")  # fmt: skip
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
        failed = len(self.issues) + self.dropped > errors_before
        if failed or name is None or verdict is None or match is None:
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
            fields = [(f, sp) for _, f, sp, _ in string.Formatter().parse(text) if f is not None]
        except ValueError as e:
            self.at(item, f"bad reason template: {e}")
            return ""
        for fld, spec in fields:
            base = re.split(r"[.\[!:]", fld, maxsplit=1)[0]
            if base not in REASON_FIELDS:
                self.at(item, f"unknown field {{{fld}}} in reason{_suggest(base, REASON_FIELDS)}")
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
            args = []
            for s, it in self._strings(m["args_any"], lists):
                problem = _regex_problem(fnmatch.translate(s))  # fnmatch accepts any string
                if problem:
                    self.at(it, f"bad pattern {s!r}: {problem}")
                else:
                    args.append(s)
            kw["args_any"] = tuple(args)
        if "args_regex" in m:
            s = self._str(m["args_regex"])
            problem = _regex_problem(s or "")
            if problem:
                self.at(m["args_regex"], f"invalid regex {s!r}: {problem}")
            else:
                kw["args_regex"] = s
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
                if _valid_host(s):
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
            # ASCII digits, at most 5: int() of thousands of digits raises ValueError.
            m = re.fullmatch(r"([0-9]{1,5})(?:-([0-9]{1,5}))?", s.strip())
            lo, hi = (int(m.group(1)), int(m.group(2) or m.group(1))) if m else (-1, -1)
            if not m or not (0 <= lo <= hi <= 65535):
                self.at(it, f"bad port {s!r}: use 0-65535 or a range like 8000-8100")
                continue
            out.append((lo, hi))
        return tuple(out)
