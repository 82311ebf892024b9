"""Secret redaction: masks credentials in strings before anything is written to disk.

Agents pass secrets on command lines (`curl -H "Authorization: Bearer …"`, `git clone
https://user:token@…`, `--password=…`), so argv and paths that reach the audit log must be
scrubbed first. A mask looks like `[REDACTED:github_token]`: the label says what kind of
secret was there, nothing of the secret itself is kept.

Speed matters (every logged string passes through here): all patterns are compiled once, and a
single case-insensitive pre-check skips strings that cannot contain any built-in secret.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from enum import Enum
from typing import Any


def mask(label: str) -> str:
    return f"[REDACTED:{label}]"


# Names whose value is a secret in `name=value`, `"name": "value"` and `--name value`.
# Deliberately no bare `pwd` (the shell's PWD=/cwd) and no plural `tokens` (max_tokens=100).
_SECRET_NAME = (
    r"(?:password|passwd|passphrase|token|secret|secret[_-]?key|api[_-]?key|apikey"
    r"|access[_-]?key|secret[_-]?access[_-]?key|private[_-]?key|client[_-]?secret|credentials?)"
)
# An optional prefix ending in a separator: DB_PASSWORD, --password, x-api-key, access_token.
_NAME_PREFIX = r"(?<![A-Za-z0-9])(?:[A-Za-z0-9_-]*[_-])?"
_NOT_MASKED = r"(?!\[REDACTED)"

# (label, pattern, replacement). Order matters: specific token shapes first, so a
# `GITHUB_TOKEN=ghp_…` keeps the more telling label; generic `name=value` runs last and
# does not re-mask an existing mask.
_BUILTIN: list[tuple[str, str, str]] = [
    # A PEM private key; a lone BEGIN (argv truncated by the sensor) masks to the end.
    (
        "private_key",
        r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----(?:.*?-----END [A-Z0-9 ]*PRIVATE KEY-----|.*\Z)",
        mask("private_key"),
    ),
    ("jwt", r"\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}", mask("jwt")),
    # `Authorization: <scheme> <credentials>` (headers), scheme kept for readability.
    (
        "authorization",
        r"(?i)(\bauthorization\s*[:=]\s*)(?:(bearer|basic|token|digest|negotiate)\s+)?"
        + _NOT_MASKED
        + r"[^\s\"']+",
        None,  # replaced by _auth_sub
    ),
    (
        "bearer",
        r"(?i)\b(bearer\s+)" + _NOT_MASKED + r"[A-Za-z0-9._~+/=-]{8,}",
        r"\1" + mask("bearer"),
    ),
    ("openai_key", r"\bsk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}", mask("openai_key")),
    (
        "github_token",
        r"\b(?:gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,})",
        mask("github_token"),
    ),
    ("aws_key_id", r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b", mask("aws_key_id")),
    ("slack_token", r"\bxox[abposr]-[A-Za-z0-9-]{10,}", mask("slack_token")),
    # scheme://user:password@host -> keep user and host.
    (
        "url_password",
        r"(?i)\b([a-z][a-z0-9+.-]*://[^/\s:@\[\]]*):" + _NOT_MASKED + r"[^/\s@]+@",
        r"\1:" + mask("url_password") + "@",
    ),
    # "password": "value" (JSON / Python dict text).
    (
        "secret",
        r"(?i)([\"']" + _NAME_PREFIX + _SECRET_NAME + r"[\"']\s*:\s*)([\"'])"
        + _NOT_MASKED
        + r".*?\2",
        r"\1\2" + mask("secret") + r"\2",
    ),
    # name=value in query strings, env assignments and --name=value flags.
    (
        "secret",
        r"(?i)(" + _NAME_PREFIX + _SECRET_NAME + r"\s*=\s*)" + _NOT_MASKED
        + r"(?:\"[^\"]*\"|'[^']*'|[^\s&;,'\"]+)",
        r"\1" + mask("secret"),
    ),
]

# Every built-in pattern needs one of these substrings; strings without any skip all regexes.
_QUICK = re.compile(
    r"(?i)private key|eyJ|authorization|bearer|sk-|gh[pousr]_|github_pat_|AKIA|ASIA|xox|://"
    r"|password|passwd|passphrase|token|secret|api[_-]?key|access[_-]?key|private[_-]?key|credential"
)

# argv flags whose *next* element is the secret (`--token VALUE`).
_SECRET_FLAG = re.compile(r"(?i)-{1,2}" + r"(?:[A-Za-z0-9]+[_-])*" + _SECRET_NAME)
# Per-program flags taking `user:password` or a bare password.
_USERPASS_FLAGS = {"curl": {"-u", "--user", "--proxy-user", "-U"}}
_PASSWORD_FLAGS = {"sshpass": {"-p"}}

_PEM_BEGIN = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")
_PEM_END = re.compile(r"-----END [A-Z0-9 ]*PRIVATE KEY-----")


def _auth_sub(m: re.Match[str]) -> str:
    scheme = f"{m.group(2)} " if m.group(2) else ""
    return f"{m.group(1)}{scheme}{mask('authorization')}"


class Redactor:
    """Masks secrets in strings, argv lists and nested JSON-like objects.

    `extra_patterns` are regexes from the policy's `redact:` list; each whole match is replaced
    by `[REDACTED:custom]`. They run on every string (no pre-check can know their shape).
    """

    def __init__(self, extra_patterns: Iterable[str] = ()) -> None:
        self._builtin: list[tuple[re.Pattern[str], Any]] = []
        for label, pattern, repl in _BUILTIN:
            flags = re.DOTALL if label == "private_key" else 0
            rx = re.compile(pattern, flags)
            self._builtin.append((rx, repl if repl is not None else _auth_sub))
        self._extra: list[re.Pattern[str]] = []
        for pattern in extra_patterns:
            try:
                self._extra.append(re.compile(pattern))
            except re.error as e:
                raise ValueError(f"redact pattern {pattern!r} does not compile: {e}") from None
            if self._extra[-1].search(""):
                raise ValueError(f"redact pattern {pattern!r} matches the empty string")

    def redact(self, s: str) -> str:
        if _QUICK.search(s):
            for rx, repl in self._builtin:
                s = rx.sub(repl, s)
        for rx in self._extra:
            s = rx.sub(mask("custom"), s)
        return s

    def redact_argv(self, argv: Iterable[str]) -> list[str]:
        """Redacts each element, plus secrets that live in the element *after* a flag."""
        out: list[str] = []
        prog = ""
        in_pem = False  # a PEM key split across elements: mask until its END line
        mask_next = ""
        for i, arg in enumerate(argv):
            arg = _plain(arg)
            if i == 0:
                prog = os.path.basename(arg)
            if in_pem:
                in_pem = not _PEM_END.search(arg)
                out.append(mask("private_key"))
                continue
            if mask_next:
                out.append(self._mask_value(arg, mask_next))
                mask_next = ""
                continue
            if _PEM_BEGIN.search(arg) and not _PEM_END.search(arg):
                in_pem = True
            red = self.redact(arg)
            out.append(red)
            if i > 0 and red == arg and "=" not in arg:
                if _SECRET_FLAG.fullmatch(arg) or arg in _PASSWORD_FLAGS.get(prog, ()):
                    mask_next = "secret"
                elif arg in _USERPASS_FLAGS.get(prog, ()):
                    mask_next = "userpass"
        return out

    def _mask_value(self, value: str, how: str) -> str:
        if how == "userpass":
            user, sep, _ = value.partition(":")
            return f"{user}:{mask('secret')}" if sep else value
        return mask("secret")

    def redact_obj(self, obj: Any, *, keys: bool = False) -> Any:
        """Recursively redacts every string in dicts, lists and tuples (tuples become lists).

        Dict keys are kept unless `keys=True`. A list under the key "argv" gets `redact_argv`,
        so `--token VALUE` pairs are caught inside records. Enums become their value; other
        objects are returned unchanged (the audit log refuses to serialize them, so nothing
        can bypass redaction there).
        """
        if isinstance(obj, Enum):
            obj = obj.value
        if isinstance(obj, str):
            return self.redact(_plain(obj))
        if isinstance(obj, dict):
            out = {}
            for k, v in obj.items():
                if k == "argv" and isinstance(v, list | tuple) and all(type(a) is str for a in v):
                    v2: Any = self.redact_argv(v)
                else:
                    v2 = self.redact_obj(v, keys=keys)
                out[self.redact(_plain(k)) if keys and isinstance(k, str) else k] = v2
            return out
        if isinstance(obj, list | tuple):
            return [self.redact_obj(v, keys=keys) for v in obj]
        return obj


def _plain(s: str) -> str:
    # str subclasses (str-Enums) would serialize oddly and can override methods; use the value.
    return s if type(s) is str else str.__str__(s)
