"""Merging policy files: the documents of an `extends` chain folded into one layer of
top-level keys, named lists and raw rules (still YAML nodes: compiler.py checks them).

- top-level scalars: the extending file's replace the base's;
- lists (and `agent_config_files`, `deny_write`): a plain list replaces, `{append: [...]}`
  adds to the base's (or to a built-in list such as `system_resolvers`);
- rules: a same-named rule is merged into the base rule key by key, in place; with
  `override: replace` it replaces it, with `override: {exceptions: append}` (or `tags`) it
  appends to that key.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import yaml

from ebpf_guard.policy.model import RULE_KINDS
from ebpf_guard.policy.reader import MAX_DEPTH, RESOLV_CONF, Document, Item, Nodes, Problems, suggest
from ebpf_guard.policy.syntax import BUILTIN_LISTS, OVERRIDE_HOW, OVERRIDE_KEYS, RULE_KEYS, SPECIAL_LISTS

Strings = list[tuple[str, Item]]  # strings with where each was written


@dataclass
class RawRule:
    """One rule's keys as written (merged over a base rule of the same name)."""

    file: str
    prefix: str  # rules[i] in its own file
    line: int
    fields: dict[str, Item]
    # Parts appended by `override: {key: append}` in extending files, after fields[key].
    appended: dict[str, list[Item]] = field(default_factory=dict)

    def parts(self, key: str) -> list[Item]:
        return [self.fields[key], *self.appended.get(key, ())] if key in self.fields else []


@dataclass
class Layer:
    """The files of an extends chain merged: what the compiler builds the policy from."""

    top: dict[str, Item] = field(default_factory=dict)
    # Each list as its parts, in order: a plain list replaces them, `{append: [...]}` adds one.
    lists: dict[str, list[Item]] = field(default_factory=dict)
    special: dict[str, list[Item]] = field(default_factory=dict)  # SPECIAL_LISTS at top level
    rules: dict[str, RawRule] = field(default_factory=dict)  # insertion = evaluation order
    unnamed: list[RawRule] = field(default_factory=list)
    files: list[str] = field(default_factory=list)


def builtin_item(name: str, values: tuple[str, ...]) -> Item:
    """A built-in list as if it were written in the file it comes from (one line per value)."""
    mark = yaml.Mark(RESOLV_CONF, 0, 0, 0, None, None)
    nodes = [yaml.ScalarNode("tag:yaml.org,2002:str", v, mark, mark) for v in values]
    return Item(RESOLV_CONF, f"lists.{name}", yaml.SequenceNode("tag:yaml.org,2002:seq", nodes, mark, mark))


class Collector(Nodes):
    """Folds an extends chain's documents into one Layer and resolves its named lists."""

    def __init__(self, problems: Problems, builtins: dict[str, tuple[str, ...]] | None = None) -> None:
        super().__init__(problems)
        self.builtins = {name: tuple((builtins or {}).get(name, ())) for name in BUILTIN_LISTS}

    def fold(self, docs: list[Document]) -> Layer:
        layer = Layer()
        for doc in docs:
            layer.files.append(doc.source)
            for key, item in doc.top.items():
                if key == "lists":
                    if self.is_(item, yaml.MappingNode, "a mapping of list names to lists"):
                        for name, li in self.mapping(item, None).items():
                            self._put_list(layer.lists, name, li)
                elif key in SPECIAL_LISTS:
                    self._put_list(layer.special, key, item)
                elif key == "rules":
                    self._merge_rules(layer, item)
                elif key not in ("extends", "version"):
                    layer.top[key] = item
        return layer

    def _put_list(self, lists: dict[str, list[Item]], name: str, item: Item) -> None:
        """A list definition: a plain list replaces the extended file's, `{append: [...]}`
        adds to it (or to a built-in list)."""
        if not isinstance(item.node, yaml.MappingNode):
            lists[name] = [item]
            return
        m = self.mapping(item, ("append",))
        if "append" not in m:
            if not item.node.value:
                self.at(item, "expected a list, or {append: [...]} to add to the extended file's")
            return
        if name not in lists and name in self.builtins:
            lists[name] = [builtin_item(name, self.builtins[name])]
        if name not in lists:
            self.at(m["append"], f"nothing to append to: no list {name!r} in the files this extends")
            return
        lists[name] = [*lists[name], m["append"]]

    def _merge_rules(self, layer: Layer, item: Item) -> None:
        if not self.is_(item, yaml.SequenceNode, "a list of rules"):
            return
        own: set[str] = set()
        for i, node in enumerate(item.node.value):
            prefix = f"rules[{i}]"
            ritem = Item(item.file, prefix, node)
            if not self.is_(ritem, yaml.MappingNode, "a mapping"):
                continue
            fields = self.mapping(ritem, RULE_KEYS)
            raw = RawRule(item.file, prefix, ritem.line, fields)
            name = self.text(fields["name"]) if "name" in fields else None
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
            override = self._override(fields.pop("override")) if "override" in fields else None
            if base is None:
                if override is not None:
                    self.at(fields["name"], f"override: no rule {name!r} in the files this extends")
                layer.rules[name] = raw
            elif override == "replace":
                layer.rules[name] = raw  # in place: it keeps the base rule's position
            else:
                layer.rules[name] = self._merged(base, raw, override or {})

    def _override(self, item: Item) -> str | dict[str, str] | None:
        """`override: replace`, or `{exceptions: append, tags: append}`; None if malformed."""
        if isinstance(item.node, yaml.ScalarNode):
            v = self.scalar(item)
            if v == "replace":
                return "replace"
            self.at(item, f"expected replace or a mapping like {{exceptions: append}}, got {v!r}")
            return None
        if not self.is_(item, yaml.MappingNode, "replace or a mapping like {exceptions: append}"):
            return None
        out: dict[str, str] = {}
        for key, it in self.mapping(item, OVERRIDE_KEYS).items():
            v = self.scalar(it)
            if v in OVERRIDE_HOW:
                out[key] = v
            else:
                self.at(it, f"expected append or replace, got {v!r}")
        return out

    def _merged(self, base: RawRule, raw: RawRule, override: dict[str, str]) -> RawRule:
        """A rule of an extended file changed by a same-named rule: key by key, in place; a
        kind key replaces the whole match; `override: {key: append}` appends to that key."""
        fields = raw.fields
        merged = dict(base.fields)
        appended = {k: list(v) for k, v in base.appended.items()}
        if any(k in fields for k in (k.value for k in RULE_KINDS)):
            for k in RULE_KINDS:
                merged.pop(k.value, None)
        for key, how in override.items():
            if key not in fields:
                self.at(fields["name"], f"override: {{{key}: {how}}} but the rule gives no {key!r}")
            elif how == "append" and key in merged:
                appended.setdefault(key, []).append(fields[key])
                fields = {k: v for k, v in fields.items() if k != key}
        for key in fields:
            appended.pop(key, None)  # replaced, with whatever was appended to it
        merged.update(fields)
        return RawRule(raw.file, raw.prefix, raw.line, merged, appended)

    # -------------------------------------------------- node helpers

    def resolve_lists(self, layer: Layer) -> dict[str, list[tuple[str, Item]]]:
        """Named lists with `$other` references spliced in (cycles reported)."""
        defs: dict[str, list[Item]] = {n: [builtin_item(n, v)] for n, v in self.builtins.items()}
        defs.update(layer.lists)
        for name, parts in layer.special.items():
            if name in layer.lists:
                self.at(layer.lists[name][0], f"list {name!r} is also a top-level key; define it once")
            defs[name] = parts
        done: dict[str, list[tuple[str, Item]]] = {}
        active: list[str] = []

        def resolve(name: str) -> list[tuple[str, Item]]:
            if name in done:
                return done[name]
            item = defs[name][0]
            if name in active:
                self.at(item, f"list {name!r} refers to itself (via {' -> '.join(active)})")
                return []
            if len(active) >= MAX_DEPTH:  # resolve() recurses once per reference
                self.at(item, f"list references nested deeper than {MAX_DEPTH} levels")
                return []
            active.append(name)
            out: list[tuple[str, Item]] = []
            strings = [pair for part in defs[name] for pair in self.strings(part, None)]
            for s, it in strings:
                if s.startswith("$"):
                    ref = s[1:]
                    self.problems.used_lists.add(ref)
                    if ref in defs:
                        spliced = resolve(ref)
                        if not self.spend(len(spliced), it):
                            break
                        out.extend(spliced)
                    else:
                        self.at(it, f"unknown list {s!r}{suggest(s, ['$' + k for k in defs])}")
                else:
                    out.append((s, it))
            active.pop()
            done[name] = out
            return out

        for name in defs:
            resolve(name)
        return done
