"""The policy format's tables: which keys exist where and what each holds.

One home for them: the reader, collector and compiler check policies against these tables,
and `schema.py` turns the same tables into the JSON Schema (`ebpf-guard schema`), so the two
cannot drift.
"""

from __future__ import annotations

from dataclasses import dataclass

from ebpf_guard.events import Kind
from ebpf_guard.policy.model import (
    ACCESS,
    DESTROY,
    FAMILIES,
    GUARD_EXIT_ACTIONS,
    LOSS_ACTIONS,
    PROTOCOLS,
    RULE_KINDS,
    SEVERITIES,
    RuleKind,
)

SUPPORTED_VERSIONS = (1,)
# Top-level lists that the bundled rules reference as $agent_config_files / $deny_write.
SPECIAL_LISTS = ("agent_config_files", "deny_write")
# Built-in lists load_policy() fills from the host; a policy's own list of the name wins.
BUILTIN_LISTS = ("system_resolvers",)

TOP_KEYS = (
    "version", "extends", "mode", "workspace", "lists", "rules", "default",
    "flag_threshold", "flag_window", "redact", "ask", "on_guard_exit", "on_loss", *SPECIAL_LISTS,
)  # fmt: skip
RULE_KEYS = (
    "name", "description", "reason", "verdict", "scope", "rate", "on_deny", "enabled",
    "exceptions", "tags", "severity", "override", *(k.value for k in RULE_KINDS),
)  # fmt: skip
RATE_KEYS = ("count", "window")
ASK_KEYS = ("timeout", "default")
ASK_ANSWERS = ("deny", "allow")
OVERRIDE_KEYS = ("exceptions", "tags")  # rule keys `override: {key: append}` may extend
OVERRIDE_HOW = ("append", "replace")
# Fields a `reason` may template, e.g. "read {path} ({comm}[{pid}])".
REASON_FIELDS = (
    "rule", "kind", "verdict", "path", "raw_path", "comm", "pid", "tgid", "ppid", "uid",
    "argv", "addr", "port", "host", "dest", "value", "count", "window", "home", "workspace",
    "real_path", "exe",
)  # fmt: skip
# A duration: seconds, or with a unit. Used with fullmatch on stripped text: no `\s*` on both
# sides of an optional group, which backtracked quadratically on long runs of spaces.
DURATION_PATTERN = r"([0-9]{1,12}(?:\.[0-9]{1,12})?)\s*(ms|s|m|h)?"
DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


@dataclass(frozen=True)
class Condition:
    """One condition key of a rule's match: the Match field it fills and what it holds.

    `value` is one of: "globs" (path globs), "names" (file-name globs, no "/"), "comms"
    (process-name globs, no "/"), "exes" (exe globs: absolute, or a file name), "patterns"
    (shell patterns on arguments), "regex", "flags", "choices" (of `choices`), "bool",
    "cidrs", "ports", "hosts". All but "regex" and "bool" take a string or a list of strings,
    with `$name` items splicing a named list."""

    field: str
    value: str
    choices: tuple[str, ...] = ()
    doc: str = ""


# In the order the compiler checks them (so problems on one line come in a stable order).
CONDITIONS: dict[str, Condition] = {
    "name": Condition("names", "names", doc="file name of the program (glob)"),
    "path": Condition("paths", "globs", doc="path glob"),
    "path_not": Condition("paths_not", "globs", doc="path matches none of these"),
    "operands": Condition("operands", "globs", doc="some non-option argument (as a path) matches"),
    "operands_not": Condition("operands_not", "globs", doc="some non-option argument matches none"),
    "args_any": Condition("args_any", "patterns", doc="some argument matches a shell pattern"),
    "args_regex": Condition("args_regex", "regex", doc="regex searched in the joined arguments"),
    "flags": Condition("flags", "flags", doc="any of these options is given (-r, -rf, --force)"),
    "access": Condition("access", "choices", ACCESS, doc="the open's access includes any of these"),
    "dir": Condition("dir", "bool", doc="directory removal (true) or file (false)"),
    "addr": Condition("addrs", "cidrs", doc="destination IP in one of these IPs/CIDRs"),
    "addr_not": Condition("addrs_not", "cidrs", doc="destination IP in none of these"),
    "port": Condition("ports", "ports", doc="443, \"8000-8100\", or a list"),
    "host": Condition("hosts", "hosts", doc="destination is a current DNS answer for a name"),
    "family": Condition("family", "choices", FAMILIES, doc="address family"),
    "protocol": Condition("protocols", "choices", PROTOCOLS, doc="the socket's protocol"),
    "comm": Condition("comms", "comms", doc="the process's comm (glob)"),
    "exe": Condition("exes", "exes", doc="the process's executable (glob; no '/': its file name)"),
    "ancestors": Condition("ancestors", "exes", doc="the executable of any ancestor process"),
}
# Who does it: conditions every rule kind (and every exception) accepts.
PROCESS_KEYS = ("comm", "exe", "ancestors")
_KIND_KEYS: dict[RuleKind, tuple[str, ...]] = {
    Kind.EXEC: ("name", "path", "path_not", "args_any", "args_regex", "flags", "operands",
                "operands_not"),
    Kind.OPEN: ("path", "path_not", "access"),
    Kind.UNLINK: ("path", "path_not", "dir"),
    Kind.CONNECT: ("addr", "addr_not", "port", "host", "family", "path", "protocol"),
    # rename/link: either name (source or new); symlink: the target or the link made
    Kind.RENAME: ("path", "path_not"),
    Kind.LINK: ("path", "path_not"),
    Kind.SYMLINK: ("path", "path_not"),
    Kind.TRUNCATE: ("path", "path_not"),
    Kind.MMAP_EXEC: ("name", "path", "path_not"),  # the file mapped
    Kind.IO_URING: ("name", "path", "path_not"),  # the executable of the process doing it
    Kind.PTRACE: ("name", "path", "path_not"),  # the tracer's executable
    DESTROY: ("path", "path_not", "dir"),  # the file unlinked, truncated or opened O_TRUNC
}  # fmt: skip
MATCH_KEYS: dict[RuleKind, tuple[str, ...]] = {k: (*v, *PROCESS_KEYS) for k, v in _KIND_KEYS.items()}
# Conditions that name *what* a rule is about. A rule with none of them is a catch-all.
TARGET_KEYS = frozenset(
    {"name", "path", "args_any", "args_regex", "flags", "operands", "addr", "port", "host"}
)

# Scalar top-level keys whose value is one word of a set (case-insensitive where marked).
TOP_CHOICES: dict[str, tuple[tuple[str, ...], bool]] = {
    "on_guard_exit": (GUARD_EXIT_ACTIONS, True),
    "on_loss": (LOSS_ACTIONS, True),
}
SEVERITY_CHOICES = SEVERITIES
