"""The policy format as a JSON Schema (draft 2020-12), for editors: `ebpf-guard schema`.

Generated from syntax.py's tables (the ones the compiler checks against), so it cannot
drift from what `check` accepts. It checks one file on its own: keys, value shapes, verdicts,
durations, condition keys per rule kind. What needs the whole extends chain (a rule that only
overrides a base rule's verdict, `$list` names, glob syntax) is left to `ebpf-guard check`.
"""

from __future__ import annotations

import re
from typing import Any

from ebpf_guard.policy.model import RULE_KINDS, RuleKind
from ebpf_guard.policy.syntax import (
    ASK_ANSWERS,
    ASK_KEYS,
    CONDITIONS,
    DURATION_PATTERN,
    MATCH_KEYS,
    OVERRIDE_HOW,
    OVERRIDE_KEYS,
    RATE_KEYS,
    RULE_KEYS,
    SEVERITY_CHOICES,
    SPECIAL_LISTS,
    SUPPORTED_VERSIONS,
    TOP_CHOICES,
    TOP_KEYS,
)
from ebpf_guard.verdicts import Mode, Scope, Verdict

SCHEMA_ID = "https://ebpf-guard.dev/schema/policy-v1.json"
_STR = {"type": "string"}
_STRINGS = {"anyOf": [_STR, {"type": "array", "items": _STR}]}
_LIST_REF = {"type": "string", "pattern": r"^\$"}  # a `$name` item, spliced by the compiler


def _ci(words: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """A string equal to one of `words`, case-insensitive (ECMA regexes have no (?i))."""
    alts = ["".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in w) for w in words]
    return {"type": "string", "pattern": f"^({'|'.join(alts)})$"}


def _one_or_many(item: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [item, {"type": "array", "items": item}]}


_DURATION = {"anyOf": [{"type": "number", "exclusiveMinimum": 0},
                       {"type": "string", "pattern": rf"^\s*{DURATION_PATTERN}\s*$"}]}  # fmt: skip
_VERDICT = _ci([v.value for v in Verdict])
_PORT = {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 65535},
                   {"type": "string", "pattern": r"^\s*[0-9]{1,5}(-[0-9]{1,5})?\s*$"}, _LIST_REF]}  # fmt: skip


def _condition(key: str) -> dict[str, Any]:
    cond = CONDITIONS[key]
    if cond.value == "bool":
        return {"type": "boolean", "description": cond.doc}
    if cond.value == "regex":
        return {"type": "string", "description": cond.doc}
    if cond.value == "ports":
        return {**_one_or_many(_PORT), "description": cond.doc}
    if cond.value == "choices":
        # protocol names are read case-insensitively, access and family exactly
        word = _ci(cond.choices) if cond.field == "protocols" else {"enum": list(cond.choices)}
        return {**_one_or_many({"anyOf": [word, _LIST_REF]}), "description": cond.doc}
    return {**_STRINGS, "description": cond.doc}


def _match(kind: RuleKind, *, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    keys = MATCH_KEYS[kind]
    return {"type": "object", "additionalProperties": False,
            "properties": {**{k: _condition(k) for k in keys}, **{k: _STR for k in extra}}}  # fmt: skip


def _kind_value(kind: RuleKind) -> dict[str, Any]:
    """`open: {...}`, or `open: any` / `open: "*"` / `open:` (every event of the kind)."""
    return {"anyOf": [_match(kind), {"enum": ["any", "*", None]}]}


def _exceptions(kind: RuleKind) -> dict[str, Any]:
    item = _match(kind, extra=("name",))
    return {"type": "array", "items": {**item, "required": ["name"], "minProperties": 2}}


def _rule() -> dict[str, Any]:
    kinds = [k.value for k in RULE_KINDS]
    props: dict[str, Any] = {
        "name": {"type": "string", "minLength": 1},
        "description": _STR, "reason": _STR, "verdict": _VERDICT,
        "scope": {"enum": [s.value for s in Scope]},
        "rate": {"type": "object", "additionalProperties": False, "required": list(RATE_KEYS),
                 "properties": {"count": {"type": "integer", "minimum": 1}, "window": _DURATION}},
        "on_deny": _ci([Verdict.HALT.value, Verdict.KILL.value]),
        "enabled": {"type": "boolean"},
        "exceptions": {"type": "array", "items": {"type": "object", "required": ["name"]}},
        "tags": _STRINGS,
        "severity": _ci(SEVERITY_CHOICES),
        "override": {"anyOf": [{"const": "replace"}, {
            "type": "object", "additionalProperties": False,
            "properties": {k: {"enum": list(OVERRIDE_HOW)} for k in OVERRIDE_KEYS}}]},
        **{k.value: _kind_value(k) for k in RULE_KINDS},
    }  # fmt: skip
    assert set(props) == set(RULE_KEYS), set(props) ^ set(RULE_KEYS)
    # At most one kind key; with one, its exceptions take that kind's conditions.
    only_one = {k: {"not": {"anyOf": [{"required": [o]} for o in kinds if o != k]}} for k in kinds}
    per_kind = [{"if": {"required": [k.value]},
                 "then": {"properties": {"exceptions": _exceptions(k)}}} for k in RULE_KINDS]  # fmt: skip
    return {"type": "object", "additionalProperties": False, "required": ["name"],
            "properties": props, "dependentSchemas": only_one, "allOf": per_kind}  # fmt: skip


def _list_value() -> dict[str, Any]:
    """A list: a string, a list of strings, or `{append: [...]}` in an extending file."""
    append = {"type": "object", "additionalProperties": False, "required": ["append"],
              "properties": {"append": _STRINGS}}  # fmt: skip
    return {"anyOf": [_STR, {"type": "array", "items": _STR}, append]}


def policy_schema() -> dict[str, Any]:
    """The JSON Schema of one policy file."""
    props: dict[str, Any] = {
        "version": {"enum": list(SUPPORTED_VERSIONS)},
        "extends": {"type": "string", "minLength": 1},
        "mode": {"enum": [m.value for m in Mode]},
        "workspace": {"anyOf": [{"type": "string", "pattern": "^/"}, {"type": "null"}]},
        "lists": {"type": "object", "additionalProperties": _list_value()},
        "rules": {"type": "array", "items": {"$ref": "#/$defs/rule"}},
        "default": _VERDICT,
        "flag_threshold": {"type": "integer", "minimum": 0},
        "flag_window": _DURATION,
        "redact": _STRINGS,
        "ask": {"type": "object", "additionalProperties": False,
                "properties": {"timeout": _DURATION, "default": {"enum": list(ASK_ANSWERS)}}},
        **{k: _ci(choices) if ci else {"enum": list(choices)} for k, (choices, ci) in TOP_CHOICES.items()},
        **{k: _list_value() for k in SPECIAL_LISTS},
    }  # fmt: skip
    assert set(props) == set(TOP_KEYS), set(props) ^ set(TOP_KEYS)
    assert set(props["ask"]["properties"]) == set(ASK_KEYS)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "ebpf-guard policy",
        "description": "One ebpf-guard policy file (docs/policy.md). `ebpf-guard check` validates "
                       "what needs the whole extends chain.",
        "type": "object",
        "additionalProperties": False,
        "required": ["version"],
        "properties": props,
        "$defs": {"rule": _rule()},
    }


# ---------------------------------------------------------------- a validator for this subset

_TYPES: dict[str, Any] = {
    "object": dict, "array": list, "string": str, "boolean": bool, "null": type(None),
    "integer": int, "number": (int, float),
}  # fmt: skip


def schema_errors(doc: Any, schema: dict[str, Any] | None = None) -> list[str]:
    """What is wrong with `doc` (a policy file's YAML data) under `schema` (default:
    policy_schema()), as "path: message" lines; [] if valid. Implements only the keywords
    policy_schema() uses (type, properties, additionalProperties, required, items, anyOf,
    allOf, not, if/then, enum, const, pattern, minimum, maximum, exclusiveMinimum, minLength,
    minProperties, dependentSchemas, local $ref), so tests need no jsonschema package."""
    root = schema or policy_schema()
    out: list[str] = []
    _check(doc, root, root, "$", out)
    return out


def _check(doc: Any, s: dict[str, Any], root: dict[str, Any], at: str, out: list[str]) -> None:
    if "$ref" in s:
        target: Any = root
        for part in s["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        _check(doc, target, root, at, out)
    if "type" in s and not _is_type(doc, s["type"]):
        out.append(f"{at}: expected {s['type']}, got {type(doc).__name__}")
        return
    _check_value(doc, s, at, out)
    for sub in s.get("allOf", ()):
        _check(doc, sub, root, at, out)
    if "anyOf" in s and not any(not _errors(doc, sub, root, at) for sub in s["anyOf"]):
        out.append(f"{at}: {_short(doc)} matches none of the allowed forms")
    if "not" in s and not _errors(doc, s["not"], root, at):
        out.append(f"{at}: not allowed here")
    if "if" in s and not _errors(doc, s["if"], root, at) and "then" in s:
        _check(doc, s["then"], root, at, out)
    if isinstance(doc, dict):
        _check_object(doc, s, root, at, out)
    elif isinstance(doc, list) and "items" in s:
        for i, item in enumerate(doc):
            _check(item, s["items"], root, f"{at}[{i}]", out)


def _check_value(doc: Any, s: dict[str, Any], at: str, out: list[str]) -> None:
    if "enum" in s and not any(doc == e and type(doc) is type(e) for e in s["enum"]):
        out.append(f"{at}: {_short(doc)} is not one of {s['enum']}")
    if "const" in s and doc != s["const"]:
        out.append(f"{at}: expected {s['const']!r}")
    if isinstance(doc, str):
        if "pattern" in s and re.search(s["pattern"], doc) is None:
            out.append(f"{at}: {_short(doc)} does not match {s['pattern']}")
        if len(doc) < s.get("minLength", 0):
            out.append(f"{at}: too short")
    if isinstance(doc, (int, float)) and not isinstance(doc, bool):
        if "minimum" in s and doc < s["minimum"]:
            out.append(f"{at}: below {s['minimum']}")
        if "maximum" in s and doc > s["maximum"]:
            out.append(f"{at}: above {s['maximum']}")
        if "exclusiveMinimum" in s and doc <= s["exclusiveMinimum"]:
            out.append(f"{at}: not above {s['exclusiveMinimum']}")


def _check_object(doc: dict, s: dict[str, Any], root: dict[str, Any], at: str, out: list[str]) -> None:
    props = s.get("properties", {})
    out.extend(f"{at}: missing required key {k!r}" for k in s.get("required", ()) if k not in doc)
    if len(doc) < s.get("minProperties", 0):
        out.append(f"{at}: needs at least {s['minProperties']} keys")
    extra = s.get("additionalProperties", True)
    for key, val in doc.items():
        where = f"{at}.{key}"
        if key in props:
            _check(val, props[key], root, where, out)
        elif extra is False:
            out.append(f"{where}: unknown key {key!r}")
        elif isinstance(extra, dict):
            _check(val, extra, root, where, out)
    for key, sub in s.get("dependentSchemas", {}).items():
        if key in doc:
            _check(doc, sub, root, at, out)


def _errors(doc: Any, s: dict[str, Any], root: dict[str, Any], at: str) -> list[str]:
    out: list[str] = []
    _check(doc, s, root, at, out)
    return out


def _is_type(doc: Any, name: str) -> bool:
    if name in ("integer", "number") and isinstance(doc, bool):
        return False
    return isinstance(doc, _TYPES[name])


def _short(doc: Any) -> str:
    text = repr(doc)
    return text if len(text) <= 60 else text[:60] + "..."
