"""The policy: its model and the one place a policy file is parsed and validated.

reader.py (YAML with line numbers, files, `extends`) -> collector.py (layers, lists,
append/override) -> compiler.py (raw rules -> Rule/Match, from the tables in syntax.py) ->
model.py (the dataclasses). Every problem names its file, line and key; all are raised
together as one PolicyError. This module only wires them and re-exports the public API.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ebpf_guard.policy.collector import Collector
from ebpf_guard.policy.compiler import MAX_DURATION_S, Compiler, parse_duration, regex_problem, valid_host
from ebpf_guard.policy.identities import compile_identities
from ebpf_guard.policy.model import (
    ACCESS,
    DEFAULT_SEVERITY,
    DESTROY,
    FAMILIES,
    GUARD_EXIT_ACTIONS,
    LOSS_ACTIONS,
    PROTOCOLS,
    RULE_KINDS,
    SEVERITIES,
    AskDefaults,
    Match,
    Policy,
    PolicyError,
    PolicyIssue,
    PolicyKind,
    Rate,
    Rule,
    RuleDecision,
    RuleException,
    RuleKind,
    Tier,
)
from ebpf_guard.policy.reader import (
    MAX_DEPTH,
    MAX_EXTENDS,
    MAX_ISSUES,
    MAX_NODES,
    MAX_POLICY_BYTES,
    MAX_STRINGS,
    RESOLV_CONF,
    Problems,
    Reader,
    Unreadable,
    read_text,
    system_resolvers,
)
from ebpf_guard.policy.syntax import (
    ASK_KEYS,
    BUILTIN_LISTS,
    CONDITIONS,
    MATCH_KEYS,
    PROCESS_KEYS,
    RATE_KEYS,
    REASON_FIELDS,
    RULE_KEYS,
    SPECIAL_LISTS,
    SUPPORTED_VERSIONS,
    TARGET_KEYS,
    TOP_KEYS,
)

_valid_host = valid_host  # the name tests and older callers use
_regex_problem = regex_problem

__all__ = [
    "ACCESS", "ASK_KEYS", "BUILTIN_LISTS", "CONDITIONS", "DEFAULT_SEVERITY", "DESTROY", "FAMILIES",
    "GUARD_EXIT_ACTIONS", "LOSS_ACTIONS", "MATCH_KEYS", "MAX_DEPTH", "MAX_DURATION_S", "MAX_EXTENDS",
    "MAX_ISSUES", "MAX_NODES", "MAX_POLICY_BYTES", "MAX_STRINGS", "PROCESS_KEYS", "PROTOCOLS",
    "RATE_KEYS", "REASON_FIELDS", "RESOLV_CONF", "RULE_KEYS", "RULE_KINDS", "SEVERITIES",
    "SPECIAL_LISTS", "SUPPORTED_VERSIONS", "TARGET_KEYS", "TOP_KEYS", "AskDefaults", "Match",
    "Policy", "PolicyError", "PolicyIssue", "PolicyKind", "Rate", "Rule", "RuleDecision",
    "RuleException", "RuleKind", "Tier", "load_policy", "parse_duration", "parse_policy",
    "system_resolvers",
]  # fmt: skip


def load_policy(path: str | Path, *, identities: bool = True) -> Policy:
    """Parse and validate a policy file and (unless `identities=False`) compute its host
    identities for the policy's workspace and the local users' homes: see policy/identities.py. A
    caller with another workspace recomputes them with `compile_identities()`. Built-in
    lists come from the host (`$system_resolvers`: /etc/resolv.conf)."""
    path = Path(path)
    try:
        text = read_text(path)
    except Unreadable as e:
        msg = f"cannot read policy: {e.message}" if e.io else e.message
        raise PolicyError([PolicyIssue(str(path), e.line, "", msg)]) from None
    builtins = {"system_resolvers": system_resolvers()}
    policy = _parse(text, str(path), path.parent, builtins)
    return replace(policy, identities=compile_identities(policy)) if identities else policy


def parse_policy(
    text: str, source: str = "<string>", *, builtin_lists: dict[str, tuple[str, ...]] | None = None
) -> Policy:
    """Parse and validate policy text. No host I/O: built-in lists such as
    `$system_resolvers` are empty unless `builtin_lists` gives them."""
    base_dir = Path(source).parent if source != "<string>" else Path.cwd()
    return _parse(text, source, base_dir, builtin_lists or {})


def _parse(text: str, source: str, base_dir: Path, builtins: dict[str, tuple[str, ...]]) -> Policy:
    problems = Problems()
    docs = Reader(problems).chain(text, source, base_dir)
    policy = None
    files: list[str] = []
    if docs is not None:
        collector = Collector(problems, builtins)
        layer = collector.fold(docs)
        files = layer.files
        lists = collector.resolve_lists(layer)
        policy = Compiler(problems, collector.builtins).build(layer, lists, source)
    problems.raise_if_any(files, source)
    assert policy is not None  # no problems, so it was built
    return policy
