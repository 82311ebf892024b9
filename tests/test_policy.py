"""Policy parsing and validation: every error names file, line and key; all are reported."""

from __future__ import annotations

from pathlib import Path

import pytest

from ebpf_guard.events import Kind
from ebpf_guard.paths import POLICY_DIR
from ebpf_guard.policy import PolicyError, PolicyIssue, load_policy, parse_duration, parse_policy
from ebpf_guard.policy.engine import Engine
from ebpf_guard.verdicts import Mode, Scope, Verdict


def errors_of(tmp_path: Path, text: str, name: str = "p.yaml") -> list[str]:
    f = tmp_path / name
    f.write_text(text)
    with pytest.raises(PolicyError) as e:
        load_policy(f)
    assert str(e.value) == "\n".join(str(i) for i in e.value.errors)
    prefix = f"{f}:"
    return [s[len(prefix) :] if s.startswith(prefix) else s for s in str(e.value).splitlines()]


# ---------------------------------------------------------------- bundled policies


@pytest.mark.parametrize("name", ["default", "audit-only", "strict"])
def test_bundled_policies_load(name: str) -> None:
    p = load_policy(POLICY_DIR / f"{name}.yaml")
    assert p.version == 1 and p.rules
    Engine(p, workspace="/w", home_of=lambda uid: "/home/u")  # compiles for a real home


def test_bundled_modes_and_extends() -> None:
    default = load_policy(POLICY_DIR / "default.yaml")
    audit = load_policy(POLICY_DIR / "audit-only.yaml")
    strict = load_policy(POLICY_DIR / "strict.yaml")
    assert (default.mode, audit.mode, strict.mode) == (Mode.ENFORCE, Mode.AUDIT, Mode.ENFORCE)
    assert [r.name for r in audit.rules] == [r.name for r in default.rules]
    assert audit.sources == (str(POLICY_DIR / "default.yaml"), str(POLICY_DIR / "audit-only.yaml"))
    by_name = {r.name: r for r in strict.rules}
    # An override changes only the keys it gives.
    assert by_name["exfil-tool"].verdict is Verdict.KILL
    assert "socat" in by_name["exfil-tool"].match.names  # list redefined in strict
    assert [r.name for r in strict.rules][: len(default.rules)] == [r.name for r in default.rules]
    assert "{home}/.bashrc" in default.agent_config_files and "/etc/shadow" in default.deny_write


def test_model_fields() -> None:
    p = parse_policy(
        """
version: 1
mode: confirm
workspace: /srv/ws
default: flag
flag_threshold: 3
flag_window: 2m
ask: {timeout: 90s, default: allow}
redact: ['sk-[A-Za-z0-9]{20,}']
lists:
  tools: [curl, wget]
  more: [$tools, nc]
rules:
  - name: net
    exec: {name: $more}
    verdict: kill
    scope: cgroup
    rate: {count: 2, window: 500ms}
  - name: q
    connect: {host: [Example.COM.], port: ["8000-8100", 22], family: ipv4}
    verdict: ASK
    on_deny: KILL
"""
    )
    assert p.mode is Mode.CONFIRM and p.workspace == "/srv/ws" and p.default is Verdict.FLAG
    assert (p.flag_threshold, p.flag_window_s, p.ask.timeout_s, p.ask.default) == (
        3,
        120.0,
        90.0,
        "allow",
    )
    assert p.redact == ("sk-[A-Za-z0-9]{20,}",)
    assert p.lists["more"] == ("curl", "wget", "nc")
    net, q = p.rules
    assert (net.kind, net.verdict, net.scope) == (Kind.EXEC, Verdict.KILL, Scope.CGROUP)
    assert net.match.names == ("curl", "wget", "nc")
    assert net.rate is not None and net.rate.window_ns == 500_000_000
    assert (q.match.hosts, q.match.ports, q.on_deny) == (
        ("example.com",),
        ((8000, 8100), (22, 22)),
        Verdict.KILL,
    )


def test_parse_duration() -> None:
    assert [parse_duration(v) for v in (10, 2.5, "500ms", "10s", "2m", "1h", "3")] == [
        10.0, 2.5, 0.5, 10.0, 120.0, 3600.0, 3.0
    ]  # fmt: skip
    assert [parse_duration(v) for v in (0, -1, "10x", "", None, True, "1 day")] == [None] * 7


# ---------------------------------------------------------------- malformed policies


def test_missing_version_and_unknown_keys(tmp_path: Path) -> None:
    assert errors_of(tmp_path, "mode: audit\nflag_windw: 10s\nrulez: []\n") == [
        "1: version: missing required key 'version'",
        "2: flag_windw: unknown key 'flag_windw' (did you mean 'flag_window'?)",
        "3: rulez: unknown key 'rulez' (did you mean 'rules'?)",
    ]


def test_bad_version_and_mode(tmp_path: Path) -> None:
    assert errors_of(tmp_path, "version: 2\nmode: enforse\n") == [
        "1: version: unsupported version 2 (supported: 1)",
        "2: mode: unknown mode 'enforse' (did you mean 'enforce'?) (one of audit, confirm, "
        "enforce)",
    ]


def test_all_rule_errors_are_collected(tmp_path: Path) -> None:
    text = """\
version: 1
lists:
  secrets: ["{home}/.ssh/**", "[abc"]
rules:
  - name: a
    open: {path: $secrtes, acess: [read]}
    verdict: KIL
  - name: b
    connect: {addr: [10.0.0.1/8, "nope"], port: 70000}
    verdict: HALT
    rate: {count: 0, window: 10s}
  - name: c
    exec: {name: curl}
    verdict: FLAG
    rate: {count: 2, window: soon}
    scope: cgroup
  - name: c
    unlink: {path: "/x"}
    verdict: HALT
  - name: d
    exec: {name: x}
    open: {path: /x}
    verdict: HALT
  - exec: {name: y}
    verdict: SAFE
    reason: "bad {pth}"
  - name: e
    open:
      path:
        - /ok/**
        - $secrets
    verdict: HALT
"""
    assert errors_of(tmp_path, text) == [
        "3: lists.secrets[1]: bad glob: unterminated '[' in '[abc'",
        "6: rules[0].open.acess: unknown key 'acess' (did you mean 'access'?)",
        "6: rules[0].open.path: unknown list '$secrtes' (did you mean '$secrets'?)",
        "7: rules[0].verdict: unknown verdict 'KIL' (did you mean 'KILL'?) (one of SAFE, FLAG, "
        "ASK, HALT, KILL)",
        "9: rules[1].connect.addr[0]: bad CIDR: host bits set in '10.0.0.1/8' (did you mean "
        "10.0.0.0/8?)",
        "9: rules[1].connect.addr[1]: bad CIDR: not an IP address or CIDR: 'nope'",
        "9: rules[1].connect.port: bad port '70000': use 0-65535 or a range like 8000-8100",
        "11: rules[1].rate.count: expected a whole number >= 1, got 0",
        "15: rules[2].rate.window: bad duration 'soon': use a positive number of seconds or e.g. "
        "500ms, 10s, 2m, 1h",
        "16: rules[2].scope: scope only applies to KILL rules",
        "17: rules[3].name: duplicate rule name 'c'",
        "22: rules[4].open: a rule matches one event kind: split it into two rules",
        "24: rules[5]: missing required key 'name'",
        "26: rules[5].reason: unknown field {pth} in reason (did you mean 'path'?)",
    ]


def test_bad_globs(tmp_path: Path) -> None:
    text = """\
version: 1
rules:
  - name: g
    open:
      path:
        - foo/bar
        - "/a/x**y/b"
        - "{hom}/.ssh/**"
        - /a/../b
        - "/ok/[a-z]*.txt"
    verdict: HALT
  - name: n
    exec: {name: /usr/bin/curl}
    verdict: HALT
"""
    assert errors_of(tmp_path, text) == [
        "6: rules[0].open.path[0]: bad glob: relative pattern 'foo/bar': start it with /, ~/, "
        "{home}/, "
        "{workspace}/ or **/",
        "7: rules[0].open.path[1]: bad glob: '**' must be a whole path segment in '/a/x**y/b'",
        "8: rules[0].open.path[2]: unknown variable {hom} in '{hom}/.ssh/**' (did you mean "
        "'home'?)",
        "9: rules[0].open.path[3]: bad glob: '..' is not allowed in pattern '/a/../b'",
        "13: rules[1].exec.name: bad glob: '/usr/bin/curl' is a path, not a file name: use 'path'",
    ]


def test_value_errors(tmp_path: Path) -> None:
    text = """\
version: 1
default: MAYBE
flag_threshold: -1
flag_window: 0
workspace: relative/ws
ask: {timeout: 30s, default: perhaps, retries: 3}
redact: ["(unclosed"]
rules:
  - name: a
    open: {access: [reed], path: /x}
    verdict: ASK
    on_deny: FLAG
  - name: b
    unlink: {dir: maybe}
    verdict: SAFE
    rate: {count: 2, window: 1s}
  - name: c
    connect: {host: ["*.evil.com"], family: ipv5}
    verdict: HALT
  - name: d
    exec: {name: rm, flags: [r], args_regex: "(x"}
    verdict: KILL
    scope: everything
  - name: e
    open: /x
    verdict: HALT
  - name: f
    exec: {name: x}
"""
    assert errors_of(tmp_path, text) == [
        "2: default: unknown verdict 'MAYBE' (one of SAFE, FLAG, ASK, HALT, KILL)",
        "3: flag_threshold: expected a whole number >= 0 (0 disables), got -1",
        "4: flag_window: bad duration 0: use a positive number of seconds or e.g. 500ms, 10s, "
        "2m, 1h",
        "5: workspace: workspace must be an absolute path, got 'relative/ws'",
        "6: ask.retries: unknown key 'retries'",
        "6: ask.default: expected deny or allow, got 'perhaps'",
        "7: redact[0]: invalid regex '(unclosed': missing ), unterminated subpattern at position 0",
        "10: rules[0].open.access[0]: unknown access 'reed' (did you mean 'read'?) (one of read, "
        "write, create, "
        "truncate)",
        "12: rules[0].on_deny: unknown verdict 'FLAG' (one of HALT, KILL)",
        "14: rules[1].unlink.dir: expected true or false, got 'maybe'",
        "16: rules[1].rate: rate does not apply to SAFE rules",
        "18: rules[2].connect.host[0]: bad host name '*.evil.com' (no wildcards; IPs go in 'addr')",
        "18: rules[2].connect.family: unknown family 'ipv5' (did you mean 'ipv6'?) (one of ipv4, "
        "ipv6, unix)",
        "21: rules[3].exec.args_regex: invalid regex '(x': missing ), unterminated subpattern at "
        "position 0",
        "21: rules[3].exec.flags[0]: bad flag 'r': write -r, -rf or --recursive",
        "23: rules[3].scope: unknown scope 'everything' (one of process, cgroup)",
        "25: rules[4].open: expected a mapping of conditions (or 'any')",
        "27: rules[5]: missing required key 'verdict'",
    ]


def test_yaml_syntax_error_and_duplicate_keys(tmp_path: Path) -> None:
    assert errors_of(tmp_path, "version: 1\nrules: [\n  - name: x\n") == [
        "3: YAML syntax error: expected the node content, but found '-'"
    ]
    assert errors_of(tmp_path, "version: 1\nmode: audit\nmode: enforce\n") == [
        "3: mode: duplicate key 'mode'"
    ]
    assert errors_of(tmp_path, "- version: 1\n") == ["1: a policy must be a mapping of keys"]
    assert errors_of(tmp_path, "") == ["1: version: empty policy: missing required key 'version'"]


def test_list_cycles_and_unknown_refs(tmp_path: Path) -> None:
    text = "version: 1\nlists:\n  a: [$b]\n  b: [$a, x]\n  c: [$nope]\n"
    assert errors_of(tmp_path, text) == [
        "3: lists.a: list 'a' refers to itself (via a -> b)",
        "5: lists.c[0]: unknown list '$nope'",
    ]


def test_extends_errors_name_the_file_they_are_in(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text("version: 1\nrules:\n  - name: r\n    open: {path: /x}\n"
                                        "    verdict: HLAT\n")  # fmt: skip
    lines = errors_of(tmp_path, "version: 1\nextends: base.yaml\nmode: nope\n", name="child.yaml")
    assert lines == [
        f"{tmp_path}/base.yaml:5: rules[0].verdict: unknown verdict 'HLAT' (did you mean 'HALT'?) "
        "(one of SAFE, FLAG, ASK, HALT, KILL)",
        "3: mode: unknown mode 'nope' (one of audit, confirm, enforce)",
    ]
    assert errors_of(tmp_path, "version: 1\nextends: missing.yaml\n") == [
        "2: extends: cannot read 'missing.yaml': No such file or directory"
    ]
    (tmp_path / "loop.yaml").write_text("version: 1\nextends: loop.yaml\n")
    with pytest.raises(PolicyError, match="extends cycle"):
        load_policy(tmp_path / "loop.yaml")


def test_extends_overrides_and_disables(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text(
        "version: 1\nrules:\n"
        "  - {name: a, exec: {name: curl}, verdict: HALT}\n"
        "  - {name: b, open: {path: /x}, verdict: FLAG}\n"
        "  - {name: c, open: {path: /y}, verdict: FLAG}\n"
    )
    (tmp_path / "child.yaml").write_text(
        "version: 1\nextends: base.yaml\nrules:\n"
        "  - {name: b, enabled: false}\n"
        "  - {name: a, verdict: KILL}\n"
        "  - {name: c, unlink: {path: /y}}\n"
        "  - {name: d, open: {path: /z}, verdict: ASK}\n"
    )
    p = load_policy(tmp_path / "child.yaml")
    assert [(r.name, r.kind.value, r.verdict.value, r.order) for r in p.rules] == [
        ("a", "exec", "KILL", 0), ("c", "unlink", "FLAG", 1), ("d", "open", "ASK", 2)
    ]  # fmt: skip


def test_issue_formatting() -> None:
    issue = PolicyIssue("p.yaml", 3, "rules[0].verdict", "bad")
    assert str(issue) == "p.yaml:3: rules[0].verdict: bad"
    assert (
        str(PolicyError([issue, issue]))
        == "p.yaml:3: rules[0].verdict: bad\np.yaml:3: rules[0].verdict: bad"
    )


def test_parse_policy_source_name() -> None:
    with pytest.raises(PolicyError) as e:
        parse_policy("version: 1\nmode: x\n")
    assert str(e.value).startswith("<string>:2: mode: ")


def test_new_event_kinds_and_on_loss(tmp_path: Path) -> None:
    """Issue 9: rules for rename/link/symlink/truncate/mmap_exec/io_uring/ptrace in the style of
    the others, and the `on_loss` key; every mistake is one located line."""
    text = """\
version: 1
on_loss: Ignore
rules:
  - {name: r, rename: {path: /x/**, path_not: [/x/tmp/**]}, verdict: HALT}
  - {name: u, io_uring: any, verdict: HALT}
  - {name: p, ptrace: {name: gdb}, verdict: SAFE}
  - {name: m, mmap_exec: {name: curl}, verdict: KILL}
"""
    p = parse_policy(text)
    assert p.on_loss == "ignore"
    assert [(r.name, r.kind, r.tier) for r in p.rules] == [
        ("r", Kind.RENAME, 1), ("u", Kind.IO_URING, 3), ("p", Kind.PTRACE, 2), ("m", Kind.MMAP_EXEC, 1)
    ]  # fmt: skip
    bad = """\
version: 1
on_loss: halt
rules:
  - {name: a, truncate: {access: [write]}, verdict: HALT}
  - {name: b, io_uring: {addr: 10.0.0.0/8}, verdict: HALT}
  - {name: c, verdict: HALT}
"""
    assert errors_of(tmp_path, bad) == [
        "2: on_loss: expected freeze or ignore, got 'halt'",
        "4: rules[0].truncate.access: unknown key 'access' (did you mean 'ancestors'?)",
        "5: rules[1].io_uring.addr: unknown key 'addr'",
        "6: rules[2]: rule needs one of exec, open, unlink, connect, rename, link, symlink, "
        "truncate, mmap_exec, io_uring, ptrace, destroy",
    ]
