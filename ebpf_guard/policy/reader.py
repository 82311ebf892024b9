"""Reading policy files: YAML with line numbers, bounded, and the `extends` chain.

Parsing works on PyYAML's node tree (yaml.compose) rather than plain data so that every
problem can name its file, line and key. The reader hands the collector one `Document` per
file, base files first; the collector (collector.py) merges them and the compiler
(compiler.py) turns the result into the model (model.py). All three report into one
`Problems`, raised together as one PolicyError.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ebpf_guard.files import read_regular
from ebpf_guard.policy.matchers import parse_network
from ebpf_guard.policy.model import PolicyError, PolicyIssue
from ebpf_guard.policy.syntax import SUPPORTED_VERSIONS, TOP_KEYS

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
RESOLV_CONF = "/etc/resolv.conf"


# ---------------------------------------------------------------- files


class Unreadable(Exception):
    """A policy file that could not be read, or is no text."""

    def __init__(self, message: str, line: int = 0, *, io: bool = False) -> None:
        super().__init__(message)
        self.message, self.line = message, line
        self.io = io  # could not read it at all, vs. read it and it is not a policy


def read_text(path: Path) -> str:
    """A policy file's text; `Unreadable` (with the line, where there is one) otherwise.

    Only regular files are opened (`files.read_regular`); size is bounded before reading."""
    try:
        with read_regular(path) as f:
            if os.fstat(f.fileno()).st_size > MAX_POLICY_BYTES:
                raise Unreadable(f"policy larger than {MAX_POLICY_BYTES >> 20} MiB")
            data = f.read(MAX_POLICY_BYTES + 1)
    except OSError as e:
        raise Unreadable(e.strerror or str(e), io=True) from None
    except ValueError:  # a path with a NUL byte
        raise Unreadable("the path contains a NUL byte", io=True) from None
    if len(data) > MAX_POLICY_BYTES:
        raise Unreadable(f"policy larger than {MAX_POLICY_BYTES >> 20} MiB")
    nul = data.find(b"\0")
    if nul >= 0:
        line = data.count(b"\n", 0, nul) + 1
        raise Unreadable("binary data (NUL byte): not a YAML policy", line)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise Unreadable(f"not UTF-8 text (byte 0x{data[e.start]:02x})", line) from None


def system_resolvers(path: str | Path = RESOLV_CONF) -> tuple[str, ...]:
    """The `nameserver` addresses of resolv.conf that are plain IPs (a zone-scoped
    `fe80::1%eth0` cannot be a CIDR); () if there are none or the file cannot be read."""
    try:
        with read_regular(Path(path)) as f:
            text = f.read(MAX_POLICY_BYTES).decode("utf-8", "replace")
    except (OSError, ValueError):
        return ()
    out: list[str] = []
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver" and words[1] not in out and "%" not in words[1]:
            try:
                parse_network(words[1])
            except ValueError:
                continue
            out.append(words[1])
    return tuple(out)


# ---------------------------------------------------------------- nodes


@dataclass
class Item:
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
class Document:
    """One policy file's top-level keys (checked against TOP_KEYS)."""

    source: str
    top: dict[str, Item]


_constructor = yaml.constructor.SafeConstructor()


def value(node: yaml.Node) -> Any:
    """Plain Python value of a scalar node, with YAML's own typing (ints, bools, null).
    Only called on nodes `Reader.check_tree` accepted, so it does not raise."""
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


def suggest(word: str, options: Any) -> str:
    """" (did you mean 'x'?)" for the closest of `options`, or ""."""
    options = [str(o) for o in options]
    if len(str(word)) > 100 or len(options) > 500:
        return ""  # difflib is quadratic; a suggestion is not worth that
    close = difflib.get_close_matches(str(word), options, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class Loader(yaml.SafeLoader):
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


@dataclass
class Problems:
    """Everything wrong with one policy (and the files it extends), and the string budget."""

    issues: list[PolicyIssue] = field(default_factory=list)
    dropped: int = 0  # issues beyond MAX_ISSUES: counted, not kept
    budget: int = MAX_STRINGS  # strings left to produce (see Nodes.spend)
    used_lists: set[str] = field(default_factory=set)  # names referenced as $name

    def raise_if_any(self, files: list[str], source: str) -> None:
        if not self.issues:
            return
        # Stable order: base files before the files extending them, then by line.
        order = [*files, *(i.file for i in self.issues)]
        rank = {f: i for i, f in reversed(list(enumerate(order)))}
        self.issues.sort(key=lambda i: (rank[i.file], i.line))
        if self.dropped:
            self.issues.append(PolicyIssue(source, 0, "", f"{self.dropped} more problems not shown"))
        raise PolicyError(self.issues)


class Nodes:
    """Reading values out of YAML nodes, reporting every problem into `problems`."""

    def __init__(self, problems: Problems) -> None:
        self.problems = problems

    def err(self, file: str, line: int, key: str, message: str) -> None:
        p = self.problems
        if len(p.issues) >= MAX_ISSUES:
            p.dropped += 1
            return
        p.issues.append(PolicyIssue(file, line, key, message))

    def spend(self, n: int, item: Item) -> bool:
        """Charge n strings; False (reported once) past MAX_STRINGS: `$list` splicing is
        another way to a billion laughs (lists of lists of lists ...)."""
        p = self.problems
        p.budget -= n
        if p.budget >= 0:
            return True
        if p.budget + n >= 0:
            self.at(item, f"lists expand to more than {MAX_STRINGS} strings")
        return False

    def at(self, item: Item, message: str, *, key_line: bool = False) -> None:
        self.err(item.file, item.key_line if key_line else item.line, item.key, message)

    def failures(self) -> int:
        return len(self.problems.issues) + self.problems.dropped

    def is_(self, item: Item, cls: type, what: str) -> bool:
        if isinstance(item.node, cls):
            return True
        self.at(item, f"expected {what}")
        return False

    def mapping(self, item: Item, allowed: tuple[str, ...] | None) -> dict[str, Item]:
        """Keys of a mapping node; unknown keys (if `allowed`) and duplicates are reported."""
        out: dict[str, Item] = {}
        for knode, vnode in item.node.value:
            key = str(value(knode)) if isinstance(knode, yaml.ScalarNode) else "?"
            path = f"{item.key}.{key}" if item.key else key
            child = Item(item.file, path, vnode, knode)
            if allowed is not None and key not in allowed:
                self.at(child, f"unknown key {key!r}{suggest(key, allowed)}", key_line=True)
                continue
            if key in out:
                self.at(child, f"duplicate key {key!r}", key_line=True)
                continue
            out[key] = child
        return out

    def scalar(self, item: Item) -> Any:
        if isinstance(item.node, yaml.ScalarNode):
            return value(item.node)
        self.at(item, "expected a single value")
        return None

    def text(self, item: Item) -> str | None:
        v = self.scalar(item)
        if isinstance(v, str) and v:
            return v
        if v is not None or isinstance(item.node, yaml.ScalarNode):
            self.at(item, f"expected a non-empty string, got {v!r}")
        return None

    def strings(
        self, item: Item, lists: dict[str, list[tuple[str, Item]]] | None
    ) -> list[tuple[str, Item]]:
        """A string or list of strings; `$name` items splice the named list (if `lists`)."""
        nodes = item.node.value if isinstance(item.node, yaml.SequenceNode) else [item.node]
        seq = isinstance(item.node, yaml.SequenceNode)
        out: list[tuple[str, Item]] = []
        for i, node in enumerate(nodes):
            sub = Item(item.file, f"{item.key}[{i}]" if seq else item.key, node)
            v = self.scalar(sub)
            if v is None or isinstance(v, (bool, dict, list)):
                if v is not None or isinstance(node, yaml.ScalarNode):
                    self.at(sub, f"expected a string, got {v!r}")
                continue
            s = str(v)
            if lists is not None and s.startswith("$"):
                name = s[1:]
                self.problems.used_lists.add(name)
                if name not in lists:
                    self.at(
                        sub, f"unknown list {s!r}{suggest('$' + name, ['$' + k for k in lists])}"
                    )
                    continue
                if not self.spend(len(lists[name]), sub):
                    break
                out.extend(lists[name])
            else:
                if not self.spend(1, sub):
                    break
                out.append((s, sub))
        return out

    # -------------------------------------------------- building the model


class Reader(Nodes):
    """Reads a policy file and the files it extends into Documents, base first."""

    def chain(self, text: str, source: str, base_dir: Path, seen: tuple[str, ...] = ()) -> list[Document] | None:
        """The documents of `text` and of what it extends (base first); None if `text`
        itself is no policy."""
        top = self._top(text, source)
        if top is None:
            return None
        docs = self._extends(top["extends"], source, base_dir, seen) if "extends" in top else []
        return [*docs, Document(source, top)]

    def _top(self, text: str, source: str) -> dict[str, Item] | None:
        nul = text.find("\0")
        if nul >= 0:
            self.err(source, text.count("\n", 0, nul) + 1, "",
                     "binary data (NUL byte): not a YAML policy")  # fmt: skip
            return None
        root = self._compose(text, source)
        if root is None:
            return None
        if not isinstance(root, yaml.MappingNode):
            self.err(source, root.start_mark.line + 1, "", "a policy must be a mapping of keys")
            return None
        top = self.mapping(Item(source, "", root), TOP_KEYS)
        if "version" not in top:
            self.err(source, 1, "version", "missing required key 'version'")
        else:
            node = top["version"].node
            v = value(node) if isinstance(node, yaml.ScalarNode) else None
            if v not in SUPPORTED_VERSIONS or type(v) is not int:  # not True, not 1.0
                self.at(top["version"], f"unsupported version {v!r} (supported: 1)")
        return top

    def _compose(self, text: str, source: str) -> yaml.Node | None:
        try:
            root = yaml.compose(text, Loader=Loader)
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
        if root is None:
            self.err(source, 1, "version", "empty policy: missing required key 'version'")
            return None
        return root if self.check_tree(root, source) else None

    def check_tree(self, root: yaml.Node, source: str) -> bool:
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
                    value(node)
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

    def _extends(self, item: Item, source: str, base_dir: Path, seen: tuple[str, ...]) -> list[Document]:
        """The documents of the file `item` names, base first; [] (with the problem reported)
        if it cannot be read."""
        name = self.text(item)
        if name is None:
            return []
        if "\0" in name:
            self.at(item, f"bad file name {name!r} (NUL byte)")
            return []
        if len(seen) + 1 >= MAX_EXTENDS:  # each level is a recursion of chain()
            self.at(item, f"extends chain longer than {MAX_EXTENDS} files")
            return []
        try:
            base_path = (base_dir / name).resolve()
            this = Path(source).resolve()
        except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop (Python 3.11)
            self.at(item, f"cannot read {name!r}: {e}")
            return []
        if str(base_path) in seen or base_path == this:
            self.at(item, f"extends cycle through {name!r}")
            return []
        try:
            base_text = read_text(base_path)
        except Unreadable as e:
            if e.io:
                self.at(item, f"cannot read {name!r}: {e.message}")
            else:  # its content: reported in that file, like its other errors
                self.err(str(base_dir / name), e.line, "", e.message)
            return []
        return self.chain(base_text, str(base_dir / name), base_path.parent, (*seen, str(this))) or []
