"""Property tests for the pure matching layer (path normalisation, globs) and policy value checks."""

from __future__ import annotations

import fnmatch
import posixpath
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from ebpf_guard.options import TABLES, parse_argv
from ebpf_guard.pathnames import normalize
from ebpf_guard.policy import MAX_DURATION_S, _valid_host, parse_duration
from ebpf_guard.policy.matchers import PathIndex, expand_vars, glob_match

NAME = st.text(alphabet="abc.-_", min_size=1, max_size=4)
SEGMENT = st.one_of(NAME, st.sampled_from(["", ".", "..", "..."]))
RAW_PATH = st.builds(
    lambda lead, segs, trail: lead + "/".join(segs) + trail,
    st.sampled_from(["", "/", "//", "///"]),
    st.lists(SEGMENT, max_size=8),
    st.sampled_from(["", "/"]),
)
# Normalised literal paths (no glob metacharacters in NAME's alphabet).
CLEAN = st.lists(NAME.filter(lambda s: s not in (".", "..")), min_size=1, max_size=6).map(
    lambda segs: "/" + "/".join(segs)
)


@given(RAW_PATH)
def test_normalize_is_absolute_clean_and_idempotent(raw: str) -> None:
    p = normalize(raw)
    assert p.startswith("/")
    assert normalize(p) == p
    assert "//" not in p
    assert p == "/" or not p.endswith("/")
    assert all(seg not in (".", "..") for seg in p.split("/"))


@given(RAW_PATH)
def test_normalize_agrees_with_normpath_where_posix_does(raw: str) -> None:
    if not raw.startswith("/"):
        return
    expected = posixpath.normpath(raw)
    # POSIX lets an implementation treat exactly two leading slashes specially; Linux does not.
    if expected.startswith("//"):
        expected = expected[1:]
    assert normalize(raw) == expected


@given(RAW_PATH, CLEAN)
def test_relative_paths_join_the_cwd(raw: str, cwd: str) -> None:
    rel = raw.lstrip("/")
    assert normalize(rel, cwd) == normalize(cwd + "/" + rel)


@given(CLEAN)
def test_literal_path_matches_itself_and_its_name(path: str) -> None:
    assert glob_match(path, path)
    assert glob_match(posixpath.basename(path), path)
    assert glob_match("**/" + posixpath.basename(path), path)


@given(CLEAN, st.lists(NAME.filter(lambda s: s not in (".", "..")), min_size=1, max_size=4))
def test_double_star_crosses_directories_single_star_does_not(prefix: str, rest: list[str]) -> None:
    path = prefix + "/" + "/".join(rest)
    assert glob_match(prefix + "/**", path)
    assert glob_match(prefix + "/**", prefix)  # the directory itself
    assert glob_match(prefix + "/", path)  # trailing slash = dir/**
    assert glob_match(prefix + "/*", path) == (len(rest) == 1)
    assert glob_match(prefix + "/**/" + rest[-1], path)  # `**` may also be zero directories
    assert glob_match("/**", path)


@given(CLEAN, CLEAN)
def test_star_glob_is_per_segment_fnmatch(a: str, b: str) -> None:
    # Replacing every segment of `a` by `*` matches exactly the paths with as many segments.
    pattern = "/" + "/".join("*" for _ in a.strip("/").split("/"))
    assert glob_match(pattern, b) == (b.count("/") == a.count("/"))


@given(CLEAN, st.text(alphabet="abc.-_*?", min_size=1, max_size=5))
def test_name_pattern_is_fnmatch_on_the_last_component(path: str, pattern: str) -> None:
    if pattern in (".", "..") or "**" in pattern:
        return
    expected = fnmatch.fnmatchcase(posixpath.basename(path), pattern)
    assert glob_match(pattern, path) == expected


PATTERN = st.one_of(
    CLEAN,
    CLEAN.map(lambda p: p + "/**"),
    CLEAN.map(lambda p: p.rsplit("/", 1)[0] + "/*" if p.count("/") > 1 else "/*"),
    CLEAN.map(lambda p: "**/" + p.rsplit("/", 1)[1]),
    NAME.filter(lambda s: s not in (".", "..")).map(lambda s: f"*{s}*"),
    NAME.filter(lambda s: s not in (".", "..")),
)


@settings(max_examples=200)
@given(st.lists(PATTERN, min_size=1, max_size=12), st.lists(CLEAN, min_size=1, max_size=8))
def test_path_index_agrees_with_one_by_one_matching(patterns: list[str], paths: list[str]) -> None:
    index: PathIndex[int] = PathIndex()
    for i, p in enumerate(patterns):
        index.add(p, i)
    for path in paths:
        expected = sorted(i for i, p in enumerate(patterns) if glob_match(p, path))
        assert sorted(index.lookup(path)) == expected


@given(st.lists(st.text(alphabet="ab*?[]!-.", min_size=1, max_size=4), min_size=1, max_size=4))
def test_expanded_variables_are_literal(segs: list[str]) -> None:
    home = "/" + "/".join(s for s in segs if s not in (".", ".."))
    if home == "/":
        return
    pattern = expand_vars("{home}/.ssh/**", {"home": home})
    assert pattern is not None
    assert glob_match(pattern, home + "/.ssh/id")
    assert glob_match(pattern, home + "/.ssh")
    assert not glob_match(pattern, home + "x/.ssh/id")


# The host-name and duration checks were rewritten to stop catastrophic backtracking
# (issue #7); on inputs short enough for the old regexes to finish, they must agree.
_OLD_HOST_RE = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?\.?)+$")
_OLD_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")


@given(st.text(alphabet="ab1-_.!", max_size=14))
def test_host_check_agrees_with_the_old_regex(name: str) -> None:
    old = bool(_OLD_HOST_RE.match(name)) and not name.replace(".", "").isdigit()
    if _valid_host(name):
        assert old
    elif old:
        # The one difference: the old regex read "a_" as two labels "a" and "_" (and a
        # 100-character label as two); a label must now end in a letter or digit.
        labels = (name[:-1] if name.endswith(".") else name).split(".")
        assert any(len(label) > 1 and label[-1] == "_" for label in labels)


@given(st.text(alphabet="0123456789. smhx\t", max_size=14))
def test_duration_parsing_agrees_with_the_old_regex(text: str) -> None:
    m = _OLD_DURATION_RE.match(text)
    old = float(m.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}[m.group(2)] if m else None
    if old is not None and not 0 < old <= MAX_DURATION_S:
        old = None  # out of range: refused by both, the new one says why
    assert parse_duration(text) == old


_LONG = [(tool, name) for tool, table in TABLES.items() for name in table.long]


@given(st.sampled_from(_LONG), st.integers(1, 40), st.booleans())
def test_any_prefix_of_a_long_option_counts_as_it(case: tuple[str, str], n: int, eq: bool) -> None:
    """GNU getopt_long reads a unique prefix as the option; an ambiguous one is refused by the
    program and read as all candidates here: either way a rule naming the option matches,
    unless the prefix is itself another option's exact name."""
    tool, name = case
    prefix = name[:n]
    arg = f"--{prefix}=x" if eq else f"--{prefix}"
    parsed = parse_argv(tool, [tool, arg, "/some/operand"])
    if prefix in TABLES[tool].long and prefix != name:
        assert parsed.long == {prefix}
    else:
        assert parsed.long_given(name)
        unique = [o for o in TABLES[tool].long if o.startswith(prefix)] == [name]
        assert (parsed.long == {name}) is (unique or prefix == name)
