"""Pure matching primitives for the policy engine: globs and address sets.

Nothing here touches the filesystem or the network: paths are normalised lexically (by
`pathnames.normalize`, the one normaliser) and globs are compiled to regular expressions once,
when the engine is built.

Glob syntax (see docs/policy.md):
  /abs/path/**   `**` is a whole path segment and spans any number of directories (also
                 zero, so `/a/**` matches `/a` itself and `/a/**/b` matches `/a/b`)
  *  ?  [a-z]    never cross a `/`
  **/name        `name` at any depth
  name           a pattern without `/` matches the last path component (like .gitignore)
  dir/           a trailing slash means the directory and everything below it (`dir/**`)
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Iterator
from itertools import product
from typing import Generic, TypeVar

from ebpf_guard.pathnames import normalize

P = TypeVar("P")

GLOB_META = frozenset("*?[")
VARIABLES = ("home", "workspace")
_VAR_RE = re.compile(r"\{([^{}]*)\}")


class GlobError(ValueError):
    """A pattern that cannot be compiled; the message is one short sentence."""


# ---------------------------------------------------------------- paths


def basename(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def ancestors(path: str) -> Iterator[str]:
    """`/`, then every proper prefix directory, then the path itself (normalised input)."""
    yield "/"
    i = path.find("/", 1)
    while i != -1:
        yield path[:i]
        i = path.find("/", i + 1)
    if path != "/":
        yield path


# ---------------------------------------------------------------- variables


def variables_in(pattern: str) -> list[str]:
    """Names of `{...}` variables used in a pattern (`~` counts as `home`)."""
    names = _VAR_RE.findall(pattern)
    if pattern == "~" or pattern.startswith("~/"):
        names.append("home")
    return names


def escape_glob(text: str) -> str:
    """`text` as a glob matching itself: metacharacters become one-character classes."""
    return re.sub(r"([*?\[])", r"[\1]", text)


def expand_vars(pattern: str, values: dict[str, str | None], *, escape: bool = True) -> str | None:
    """Substitute `{home}`, `{workspace}` and a leading `~`. None if a value is unknown:
    a pattern about a home directory cannot match for a user without one. Values are
    glob-escaped (a home like /home/a[1] must not turn into a character class)."""
    if pattern == "~" or pattern.startswith("~/"):
        pattern = "{home}" + pattern[1:]
    if "{" not in pattern:
        return pattern
    missing = False

    def sub(m: re.Match[str]) -> str:
        nonlocal missing
        value = values.get(m.group(1))
        if not value:
            missing = True
            return ""
        value = value.rstrip("/")  # "{home}/x" with home "/" must give "/x"
        return escape_glob(value) if escape else value

    out = _VAR_RE.sub(sub, pattern)
    return None if missing else (out or "/")


def expand_all(pattern: str, variants: dict[str, tuple[str, ...]]) -> list[str]:
    """`pattern` expanded with every combination of the values each variable may take (a home
    and its real path when that is reached through a symlink); [] if a variable has none."""
    names = sorted(set(variables_in(pattern)))
    if not names:
        return [pattern]
    out: list[str] = []
    for combo in product(*(variants.get(n, ()) for n in names)):
        value = expand_vars(pattern, dict(zip(names, combo, strict=True)))
        if value is not None and value not in out:
            out.append(value)
    return out


# ---------------------------------------------------------------- globs


def is_literal(pattern: str) -> bool:
    return not any(c in GLOB_META for c in pattern)


def _segment_regex(seg: str, pattern: str) -> str:
    if "**" in seg:
        raise GlobError(f"'**' must be a whole path segment in {pattern!r}")
    out: list[str] = []
    i, n = 0, len(seg)
    while i < n:
        c = seg[i]
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = i + 1
            if j < n and seg[j] in "!^":
                j += 1
            if j < n and seg[j] == "]":
                j += 1
            while j < n and seg[j] != "]":
                j += 1
            if j >= n:
                raise GlobError(f"unterminated '[' in {pattern!r}")
            body = seg[i + 1 : j]
            negate = body[:1] in ("!", "^")
            if negate:
                body = body[1:]
            body = body.replace("\\", "\\\\").replace("[", "\\[").replace("]", "\\]")
            out.append(f"[^/{body}]" if negate else f"(?!/)[{body}]")
            i = j
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def glob_kind(pattern: str) -> str:
    """'abs' for absolute patterns, 'base' for last-component patterns; raises otherwise."""
    if pattern.startswith("/") or pattern.startswith("**/") or pattern == "**":
        return "abs"
    if "/" in pattern.rstrip("/"):
        raise GlobError(
            f"relative pattern {pattern!r}: start it with /, ~/, {{home}}/, {{workspace}}/ or **/"
        )
    return "base"


def glob_to_regex(pattern: str) -> str:
    """Regex source (full match) for an expanded glob. See the module doc for semantics."""
    if not pattern:
        raise GlobError("empty pattern")
    kind = glob_kind(pattern)
    if kind == "base":
        seg = pattern.rstrip("/")
        if seg in (".", ".."):
            raise GlobError(f"{pattern!r} is not a file name")
        return _segment_regex(seg, pattern)
    body = pattern
    if body.endswith("/") and body != "/":
        body += "**"  # `dir/` means the directory and everything below it
    if body.startswith("**"):
        body = "/" + body  # `**/x`: x at any depth
    segs = [s for s in body.split("/") if s not in ("", ".")]
    if any(s == ".." for s in segs):
        raise GlobError(f"'..' is not allowed in pattern {pattern!r}")
    if not segs:
        return "/"
    out: list[str] = []
    for k, seg in enumerate(segs):
        if seg == "**":
            # Zero or more whole segments; each iteration starts at a '/', so the
            # expression cannot backtrack catastrophically.
            out.append("(?:/[^/]+)*")
            if k == len(segs) - 1 and len(segs) == 1:
                out.insert(0, "/?")  # `/**` matches `/` too
        else:
            out.append("/" + _segment_regex(seg, pattern))
    return "".join(out)


def compile_glob(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(glob_to_regex(pattern))
    except re.error as e:  # e.g. a reversed range [z-a]
        raise GlobError(f"invalid pattern {pattern!r}: {e}") from None


def literal_dir(pattern: str) -> str:
    """The longest directory prefix of an absolute glob without metacharacters: the index key.
    `/home/u/.ssh/**` -> `/home/u/.ssh`, `/proc/*/environ` -> `/proc`, `**/x` -> `/`."""
    segs = [s for s in pattern.split("/") if s not in ("", ".")]
    lit: list[str] = []
    for seg in segs:
        if any(c in GLOB_META for c in seg):
            break
        lit.append(seg)
    return "/" + "/".join(lit)


def glob_match(pattern: str, path: str) -> bool:
    """One-off match of a normalised path (tests, tools); the engine uses PathIndex."""
    rx = compile_glob(pattern)
    target = basename(path) if glob_kind(pattern) == "base" else path
    return rx.fullmatch(target) is not None


class GlobSet:
    """Any-of a list of globs, compiled into at most two regexes (full path / last component)."""

    __slots__ = ("_abs", "_base", "patterns")

    def __init__(self, patterns: Iterable[str]):
        self.patterns = tuple(patterns)
        absolute = [glob_to_regex(p) for p in self.patterns if glob_kind(p) == "abs"]
        base = [glob_to_regex(p) for p in self.patterns if glob_kind(p) == "base"]
        self._abs = re.compile("|".join(f"(?:{r})" for r in absolute)) if absolute else None
        self._base = re.compile("|".join(f"(?:{r})" for r in base)) if base else None

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def match(self, path: str) -> bool:
        if self._abs is not None and self._abs.fullmatch(path):
            return True
        return self._base is not None and self._base.fullmatch(basename(path)) is not None

    def match_name(self, name: str) -> bool:
        """Last-component patterns only: all a path known only by its tail can be held to."""
        return self._base is not None and self._base.fullmatch(name) is not None


class PathIndex(Generic[P]):
    """Maps many globs to payloads; `lookup(path)` returns the payloads of every glob that
    matches, touching only globs that can match: literal paths and names go in dicts,
    other absolute globs are bucketed by their literal directory prefix, so a lookup costs
    about one dict probe per path component plus the few regexes in those buckets."""

    def __init__(self) -> None:
        self._exact: dict[str, list[P]] = {}
        self._by_dir: dict[str, list[tuple[re.Pattern[str], P]]] = {}
        self._base_exact: dict[str, list[P]] = {}
        self._base_globs: list[tuple[re.Pattern[str], P]] = []
        self._base_any: re.Pattern[str] | None = None

    def add(self, pattern: str, payload: P) -> None:
        if glob_kind(pattern) == "base":
            name = pattern.rstrip("/")
            if is_literal(name):
                self._base_exact.setdefault(name, []).append(payload)
            else:
                self._base_globs.append((compile_glob(name), payload))
                self._base_any = None
            return
        rx = compile_glob(pattern)
        if is_literal(pattern) and not pattern.endswith("/"):
            self._exact.setdefault(normalize(pattern), []).append(payload)
        else:
            self._by_dir.setdefault(literal_dir(pattern), []).append((rx, payload))

    def lookup(self, path: str) -> list[P]:
        hits: list[P] = list(self._exact.get(path, ()))
        by_dir = self._by_dir
        if by_dir:
            for prefix in ancestors(path):
                bucket = by_dir.get(prefix)
                if bucket:
                    hits.extend(p for rx, p in bucket if rx.fullmatch(path))
        hits.extend(self.lookup_name(basename(path)))
        return hits

    def lookup_name(self, name: str) -> list[P]:
        """Payloads of the last-component patterns matching `name` (a path known by its tail,
        a program known by name)."""
        hits: list[P] = []
        if self._base_exact:
            hits.extend(self._base_exact.get(name, ()))
        if self._base_globs:
            if self._base_any is None:
                self._base_any = re.compile(
                    "|".join(f"(?:{rx.pattern})" for rx, _ in self._base_globs)
                )
            if self._base_any.fullmatch(name):
                hits.extend(p for rx, p in self._base_globs if rx.fullmatch(name))
        return hits


# ---------------------------------------------------------------- addresses


def parse_network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """An IP address or CIDR. Host bits must be clear (10.0.0.1/8 is almost always a typo)."""
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as e:
        try:
            fixed = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ValueError(f"not an IP address or CIDR: {text!r}") from e
        raise ValueError(f"host bits set in {text!r} (did you mean {fixed}?)") from e


def canonical_ip(addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """Parse an event address; IPv4-mapped IPv6 (::ffff:1.2.3.4) counts as the IPv4 address."""
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class AddrIndex(Generic[P]):
    """Networks -> payloads; a lookup costs one dict probe per distinct prefix length."""

    def __init__(self) -> None:
        self._by_len: dict[tuple[int, int], dict[int, list[P]]] = {}

    def add(self, network: str, payload: P) -> None:
        net = parse_network(network)
        key = (net.version, net.prefixlen)
        self._by_len.setdefault(key, {}).setdefault(int(net.network_address), []).append(payload)

    def __bool__(self) -> bool:
        return bool(self._by_len)

    def lookup(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> list[P]:
        if ip is None:
            return []
        hits: list[P] = []
        value, bits = int(ip), ip.max_prefixlen
        for (version, plen), table in self._by_len.items():
            if version != ip.version:
                continue
            masked = (value >> (bits - plen)) << (bits - plen) if plen else 0
            found = table.get(masked)
            if found:
                hits.extend(found)
        return hits
