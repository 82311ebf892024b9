"""Policy language v2 (issue 11): process conditions, exceptions, tags/severity, protocol,
/proc/self, $system_resolvers, the destroy kind, list/rule append in `extends`, tiers, the
JSON Schema, and the docs' examples. Parser and engine only: pure, no root."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from ebpf_guard.auditlog import VerdictLog, log_files, record_for
from ebpf_guard.cli import main
from ebpf_guard.events import CREATE, READ, TRUNCATE, WRITE, Event, Kind
from ebpf_guard.paths import POLICY_DIR
from ebpf_guard.policy import (
    DESTROY,
    PolicyError,
    RuleDecision,
    Tier,
    load_policy,
    parse_policy,
    system_resolvers,
)
from ebpf_guard.policy.engine import Engine
from ebpf_guard.policy.schema import policy_schema, schema_errors
from ebpf_guard.report import build_report, render_text
from ebpf_guard.verdicts import Verdict

HOME = "/home/dev"
WS = "/home/dev/project"
T0 = 7_000_000_000_000
DOCS = Path(__file__).resolve().parent.parent / "docs" / "policy.md"


def ev(kind: str, t: float = 0.0, pid: int = 100, **kw) -> Event:
    kw.setdefault("ppid", 1)
    kw.setdefault("uid", 1000)
    kw.setdefault("comm", "agent")
    kw.setdefault("start_ns", pid * 1000)
    return Event(kind=Kind(kind), ts_ns=T0 + int(t * 1e9), pid=kw.pop("tid", pid), tgid=pid,
                 cgroup_id=7, **kw)  # fmt: skip


def open_(path: str, *access: str, **kw) -> Event:
    return ev("open", path=path, raw_path=path, access=frozenset(access or {READ}), **kw)


def exec_(path: str, pid: int, ppid: int, t: float = 0.0, **kw) -> Event:
    name = path.rsplit("/", 1)[-1]
    kw.setdefault("exe", path)
    return ev("exec", t, pid, ppid=ppid, path=path, raw_path=path, argv=(name,), comm=name[:15], **kw)


def fork(parent: int, child: int, exe: str = "", t: float = 0.0) -> Event:
    return ev("fork", t, parent, child_pid=child, exe=exe)


def engine(text: str, **builtins: tuple[str, ...]) -> Engine:
    return Engine(parse_policy(text, builtin_lists=builtins), workspace=WS, home_of=lambda _uid: HOME)


def decide(eng: Engine, *events: Event) -> list[tuple[str, str]]:
    return [(d.verdict.value, d.rule) for d in map(eng.evaluate, events)]


def errors_of(tmp_path: Path, text: str, name: str = "p.yaml") -> list[str]:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(PolicyError) as e:
        load_policy(path, identities=False)
    return [str(i).removeprefix(f"{path}:") for i in e.value.errors]


# ====================================================================== 1. process conditions

PROC = """
version: 1
rules:
  - name: keys
    open: {path: "{home}/.ssh/**"}
    verdict: KILL
    exceptions:
      - {name: git-ssh, exe: [ssh], ancestors: [git]}
  - name: keys-by-git-ssh
    open: {path: "{home}/.ssh/**", exe: [ssh], ancestors: [git]}
    verdict: ASK
  - name: make-rm
    exec: {name: rm, comm: [make, "py*"]}
    verdict: FLAG
  - name: abs-exe
    connect: {port: 9, exe: [/opt/tool/bin/*]}
    verdict: HALT
"""


def test_process_conditions_parse_on_every_kind() -> None:
    kinds = [k.value for k in (*Kind, DESTROY) if k.value not in ("fork", "exit", "chdir")]
    rules = "\n".join(f"  - {{name: r{i}, {k}: {{comm: [a], exe: [b, /c/*], ancestors: [$l]}}, verdict: FLAG}}"
                      for i, k in enumerate(kinds))  # fmt: skip
    p = parse_policy(f"version: 1\nlists: {{l: [git, '/usr/bin/git*']}}\nrules:\n{rules}\n")
    assert len(p.rules) == len(kinds)
    m = p.rules[0].match
    assert (m.comms, m.exes, m.ancestors) == (("a",), ("b", "/c/*"), ("git", "/usr/bin/git*"))
    assert all(r.match.has_process() and r.userspace_only and r.tier is Tier.CATCH_ALL for r in p.rules)


def test_process_condition_errors_are_located(tmp_path: Path) -> None:
    bad = """\
version: 1
rules:
  - name: a
    open: {path: /x, comm: [a/b]}
    verdict: KILL
  - name: b
    exec: {name: x, exe: ["[", "{nope}/x"]}
    verdict: HALT
  - name: c
    unlink: {ancestors: [git], protocol: [udp]}
    verdict: HALT
"""
    assert errors_of(tmp_path, bad) == [
        "4: rules[0].open.comm[0]: bad glob: 'a/b': a comm is a process name, without '/' (paths go in 'exe')",
        "7: rules[1].exec.exe[0]: bad glob: unterminated '[' in '['",
        "7: rules[1].exec.exe[1]: unknown variable {nope} in '{nope}/x'",
        "10: rules[2].unlink.protocol: unknown key 'protocol'",
    ]


def test_comm_and_exe_decide() -> None:
    eng = engine(PROC)
    assert decide(eng,
                  ev("exec", path="/usr/bin/rm", raw_path="/usr/bin/rm", argv=("rm", "x"), comm="make"),
                  ev("exec", path="/usr/bin/rm", raw_path="/usr/bin/rm", argv=("rm", "x"), comm="python3"),
                  ev("exec", path="/usr/bin/rm", raw_path="/usr/bin/rm", argv=("rm", "x"), comm="bash"),
                  ev("connect", family="ipv4", addr="1.2.3.4", port=9, exe="/opt/tool/bin/t"),
                  ev("connect", family="ipv4", addr="1.2.3.4", port=9, exe="/usr/bin/t"),
                  ev("connect", family="ipv4", addr="1.2.3.4", port=9, exe=""),
                  ) == [("FLAG", "make-rm"), ("FLAG", "make-rm"), ("SAFE", ""),
                        ("HALT", "abs-exe"), ("SAFE", ""), ("SAFE", "")]  # fmt: skip


def test_ancestors_come_from_fork_and_exec() -> None:
    """git forks, the child execs ssh, ssh reads the key: ASK (the KILL rule's exception spares
    it). Any other reader, or ssh not under git, or ssh whose parent was never seen: KILL."""
    eng = engine(PROC)
    key = f"{HOME}/.ssh/id_ed25519"
    got = decide(eng,
                 exec_("/usr/bin/git", 200, 100),        # the agent (100) runs git
                 fork(200, 201, "/usr/bin/git"),           # git forks ...
                 exec_("/usr/bin/ssh", 201, 200),          # ... and the child runs ssh
                 open_(key, pid=201, ppid=200, exe="/usr/bin/ssh"),
                 fork(201, 202, "/usr/bin/ssh"),           # a grandchild of git, still ssh
                 open_(key, pid=202, ppid=201, exe="/usr/bin/ssh"),
                 open_(key, pid=200, ppid=100, exe="/usr/bin/git"),   # git itself: not ssh
                 exec_("/usr/bin/ssh", 300, 100),          # ssh straight from the agent
                 open_(key, pid=300, ppid=100, exe="/usr/bin/ssh"),
                 open_(key, pid=400, ppid=399, exe="/usr/bin/ssh"),   # unknown ancestry
                 )  # fmt: skip
    assert got[3] == ("ASK", "keys-by-git-ssh") and got[5] == ("ASK", "keys-by-git-ssh")
    assert got[6] == got[8] == got[9] == ("KILL", "keys")


def test_a_child_runs_its_parents_exe_until_its_own_exec() -> None:
    eng = engine("""
version: 1
rules:
  - {name: under-make, open: {path: /x, ancestors: [make]}, verdict: HALT}
  - {name: is-cc, open: {path: /x, exe: [cc]}, verdict: FLAG}
""")
    got = decide(eng,
                 exec_("/usr/bin/make", 10, 1), fork(10, 11, "/usr/bin/make"),
                 open_("/x", pid=11, ppid=10),                      # forked make, no exe field
                 exec_("/usr/bin/cc", 11, 10, ret=-2),               # failed exec: still make
                 open_("/x", pid=11, ppid=10),
                 exec_("/usr/bin/cc", 11, 10),
                 open_("/x", pid=11, ppid=10, exe="/usr/bin/cc"),
                 fork(11, 12, "/usr/bin/cc"), open_("/x", pid=12, ppid=11))  # fmt: skip
    assert [got[i] for i in (2, 4, 6, 8)] == [("HALT", "under-make")] * 4
    d = eng.evaluate(open_("/x", pid=11, ppid=10, exe="/usr/bin/cc"))
    assert d.verdict is Verdict.HALT  # both match: the most severe specific rule


# ====================================================================== 2. exceptions

def test_exceptions_parse_and_errors(tmp_path: Path) -> None:
    p = parse_policy(PROC)
    (exc,) = p.rules[0].exceptions
    assert exc.name == "git-ssh" and exc.match.exes == ("ssh",) and exc.line == 8
    bad = """\
version: 1
rules:
  - name: a
    open: {path: /x}
    verdict: KILL
    exceptions:
      - {name: e1, access: [read], port: 4}
      - {name: e1, comm: [x]}
      - {comm: [y]}
      - {name: e4}
      - just-a-string
  - name: b
    exec: {name: x}
    verdict: KILL
    exceptions: {name: e}
"""
    assert errors_of(tmp_path, bad) == [
        "7: rules[0].exceptions[0].port: unknown key 'port'",
        "8: rules[0].exceptions[1]: duplicate exception name 'e1'",
        "9: rules[0].exceptions[2]: missing required key 'name'",
        "10: rules[0].exceptions[3]: an exception needs at least one condition (it would disable the rule)",
        "11: rules[0].exceptions[4]: expected a mapping like {name: x, comm: [git]}",
        "15: rules[1].exceptions: expected a list of exceptions like [{name: x, comm: [git]}]",
    ]


def test_an_excepted_event_falls_through_to_the_next_tier() -> None:
    eng = engine("""
version: 1
default: FLAG
rules:
  - name: writes-etc
    open: {path: /etc/**, access: [write]}
    verdict: KILL
    exceptions:
      - {name: resolv, path: [/etc/resolv.conf], comm: [dhclient]}
      - {name: all-of-them-must-hold, path: [/etc/hosts], exe: [nothing-runs-this]}
  - name: any-write
    open: {access: [write]}
    verdict: HALT
    exceptions:
      - {name: tmp, path: [/tmp/**]}
""")
    w = (WRITE,)
    assert decide(eng,
                  open_("/etc/resolv.conf", *w, comm="dhclient"),   # spared: the catch-all decides
                  open_("/etc/resolv.conf", *w, comm="agent"),
                  open_("/etc/hosts", *w),                          # an exception holds only whole
                  open_("/tmp/x", *w),                              # spared by the catch-all: default
                  open_("/tmp/x", READ),
                  ) == [("HALT", "any-write"), ("KILL", "writes-etc"), ("KILL", "writes-etc"),
                        ("FLAG", ""), ("FLAG", "")]  # fmt: skip


def test_an_exception_needing_an_unknown_home_spares_nothing() -> None:
    policy = parse_policy("""
version: 1
rules:
  - name: x
    open: {path: /data/**}
    verdict: HALT
    exceptions: [{name: mine, path: ["{home}/**", /data/pub/**]}, {name: home-only, exe: ["{home}/bin/*"]}]
""")
    eng = Engine(policy, workspace=WS, home_of=lambda _uid: None)
    assert decide(eng, open_("/data/a", exe="/home/x/bin/t"), open_("/data/pub/a")) == [
        ("HALT", "x"), ("SAFE", "")]


def test_rules_with_who_conditions_stay_out_of_the_kernel_kill_set() -> None:
    eng = engine("""
version: 1
rules:
  - {name: plain, exec: {name: nc}, verdict: KILL}
  - {name: who, exec: {name: socat, ancestors: [bash]}, verdict: KILL}
  - {name: spared, exec: {name: ncat}, verdict: KILL, exceptions: [{name: e, comm: [x]}]}
""")
    assert eng.kernel_exec_kills() == (frozenset({"nc"}), frozenset())
    assert eng.kernel_exec_gates() == frozenset({"socat", "ncat"})  # held, then decided here


# ====================================================================== 3. tags and severity

def test_tags_and_severity_reach_the_log_and_the_report(tmp_path: Path) -> None:
    p = parse_policy("""
version: 1
rules:
  - {name: k, open: {path: /k}, verdict: KILL, tags: [cred, T1552, cred]}
  - {name: f, open: {path: /f}, verdict: FLAG, severity: HIGH}
  - {name: a, open: {path: /a}, verdict: ASK}
""")
    assert [(r.tags, r.severity, r.level) for r in p.rules] == [
        (("cred", "T1552"), "", "critical"), ((), "high", "high"), ((), "", "medium")]
    eng = Engine(p, workspace=WS, home_of=lambda _uid: HOME)
    d = eng.evaluate(open_("/k"))
    assert isinstance(d, RuleDecision) and (d.tags, d.severity) == (("cred", "T1552"), "critical")
    assert eng.evaluate(open_("/nothing")).severity == "low"  # the default's verdict: SAFE
    rec = record_for(d, mode="enforce", action="killed")
    assert rec["tags"] == ["cred", "T1552"] and rec["severity"] == "critical"
    log = tmp_path / "verdicts.jsonl"
    now = datetime.now(timezone.utc)
    with VerdictLog(log) as vl:
        vl.append(rec)
        vl.append(record_for(eng.evaluate(open_("/f")), mode="enforce", action="logged"))
    text = render_text(build_report(log_files(log), last_hours=None, now=now))
    assert "severity critical, tags: cred, T1552" in text and "severity high" in text


def test_bad_severity_and_tags(tmp_path: Path) -> None:
    bad = """\
version: 1
rules:
  - {name: a, open: {path: /a}, verdict: KILL, severity: severe}
  - {name: b, open: {path: /b}, verdict: KILL, tags: [{x: 1}]}
"""
    assert errors_of(tmp_path, bad) == [
        "3: rules[0].severity: unknown severity 'severe' (one of low, medium, high, critical)",
        "4: rules[1].tags[0]: expected a single value",
    ]


# ====================================================================== 4. protocol, /proc/self, resolvers

def test_protocol_condition() -> None:
    eng = engine("""
version: 1
rules:
  - {name: dns, connect: {addr: $system_resolvers, port: 53, protocol: [udp, DGRAM]}, verdict: SAFE}
  - {name: net, connect: {family: [ipv4]}, verdict: ASK}
""", system_resolvers=("10.0.0.53",))
    c = {"family": "ipv4", "addr": "10.0.0.53", "port": 53}
    assert decide(eng, ev("connect", protocol="udp", **c), ev("connect", protocol="tcp", **c),
                  ev("connect", protocol="", **c), ev("connect", protocol="udp", **{**c, "addr": "8.8.8.8"})
                  ) == [("SAFE", "dns"), ("ASK", "net"), ("ASK", "net"), ("ASK", "net")]  # fmt: skip
    assert eng.policy.rules[0].match.protocols == {"udp", "dgram"}


def test_bad_protocol(tmp_path: Path) -> None:
    assert errors_of(tmp_path, "version: 1\nrules:\n  - {name: a, connect: {protocol: quic}, verdict: HALT}\n") == [
        "3: rules[0].connect.protocol: unknown protocol 'quic' (one of tcp, udp, raw, icmp, sctp, stream, dgram, "
        "seqpacket)"]


def test_own_proc_entries_read_as_proc_self() -> None:
    eng = engine("""
version: 1
rules:
  - name: other-environ
    open: {path: [/proc/*/environ, /proc/*/task/*/environ], path_not: [/proc/self/**, /proc/thread-self/**]}
    verdict: KILL
""")
    assert decide(eng,
                  open_("/proc/100/environ", pid=100),                 # its own, by number
                  open_("/proc/100/task/101/environ", pid=100, tid=101),  # its own thread's
                  open_("/proc/self/environ", pid=100),
                  open_("/proc/555/environ", pid=100),                 # another process's
                  open_("/proc/100/task/7/environ", pid=100, tid=101), # not this thread: as /proc/self/task/7
                  open_("/proc/self/environ", real_path="/proc/555/environ", pid=100),
                  ) == [("SAFE", ""), ("SAFE", ""), ("SAFE", ""), ("KILL", "other-environ"),
                        ("SAFE", ""), ("KILL", "other-environ")]  # fmt: skip


def test_system_resolvers(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("# x\nnameserver 10.0.0.53\nnameserver fe80::1%eth0\nnameserver ::1\nsearch x\n"
                    "nameserver 10.0.0.53\nnameserver\n")
    assert system_resolvers(conf) == ("10.0.0.53", "::1")
    assert system_resolvers(tmp_path / "missing") == ()
    text = "version: 1\nrules:\n  - {name: dns, connect: {addr: $system_resolvers, port: 53}, verdict: SAFE}\n"
    assert parse_policy(text, builtin_lists={"system_resolvers": ("1.1.1.1",)}).rules[0].match.addrs == ("1.1.1.1",)
    empty = parse_policy(text)
    assert empty.rules[0].match.addrs == () and "$system_resolvers is empty" in empty.notes[0]
    own = parse_policy("version: 1\nlists: {system_resolvers: [9.9.9.9]}\n" + text.split("\n", 1)[1],
                       builtin_lists={"system_resolvers": ("1.1.1.1",)})
    assert own.rules[0].match.addrs == ("9.9.9.9",) and not own.notes
    assert parse_policy("version: 1\n").notes == ()  # not used: nothing to say


def test_check_prints_the_empty_resolvers_note(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ebpf_guard.policy as pol

    monkeypatch.setattr(pol, "system_resolvers", lambda: ())
    path = tmp_path / "p.yaml"
    path.write_text("version: 1\nrules:\n  - {name: dns, connect: {addr: $system_resolvers}, verdict: SAFE}\n")
    r = CliRunner().invoke(main, ["check", str(path)])
    assert r.exit_code == 0 and "note: $system_resolvers is empty" in r.output, r.output


# ====================================================================== 5. destroy

DESTROY_POLICY = """
version: 1
rules:
  - name: mass-destroy
    destroy: {path_not: [/tmp/**]}
    rate: {count: 3, window: 10s}
    verdict: HALT
  - name: rmdirs
    destroy: {dir: true, comm: [rmdir]}
    verdict: FLAG
"""


def test_destroy_counts_unlinks_truncations_and_o_trunc_of_existing_files_together() -> None:
    eng = engine(DESTROY_POLICY)
    wt = (WRITE, TRUNCATE)
    got = decide(eng,
                 ev("unlink", 0.1, path="/w/a", raw_path="/w/a"),
                 open_("/w/new", WRITE, CREATE, TRUNCATE, created=True, t=0.2),  # created: no
                 ev("unlink", 0.3, path="/w/d", raw_path="/w/d", is_dir=True),    # a dir: no
                 ev("unlink", 0.4, path="/w/gone", raw_path="/w/gone", ret=-2),   # failed: no
                 ev("unlink", 0.5, path="/tmp/t", raw_path="/tmp/t"),             # scratch: no
                 open_("/w/c", READ, t=0.6),                                       # a read: no
                 ev("truncate", 0.7, path="/w/b", raw_path="/w/b"),
                 open_("/w/c", *wt, t=0.8))  # fmt: skip
    assert got[:-1] == [("SAFE", "")] * 7 and got[-1] == ("HALT", "mass-destroy")
    assert decide(eng, ev("unlink", 1, path="/w/d", raw_path="/w/d", is_dir=True, comm="rmdir"),
                  ev("unlink", 1, path="/w/f", raw_path="/w/f", comm="rmdir")) == [("FLAG", "rmdirs"), ("SAFE", "")]


def test_destroy_keys(tmp_path: Path) -> None:
    (r, _) = parse_policy(DESTROY_POLICY).rules
    assert r.kind is DESTROY and r.kind.value == "destroy" and r.tier is Tier.CATCH_ALL
    bad = "version: 1\nrules:\n  - {name: a, destroy: {access: [write]}, verdict: HALT}\n"
    assert errors_of(tmp_path, bad) == ["3: rules[0].destroy.access: unknown key 'access' (did you mean 'ancestors'?)"]


# ====================================================================== 6. append and override

BASE = """\
version: 1
agent_config_files: ["{home}/.bashrc"]
lists:
  tools: [curl]
rules:
  - name: keys
    open: {path: "/k/**"}
    verdict: KILL
    tags: [a]
    exceptions:
      - {name: e1, comm: [git]}
  - name: tools
    exec: {name: $tools}
    verdict: HALT
    reason: "tool {argv}"
  - name: net
    connect: {port: 25}
    verdict: FLAG
"""


def test_append_to_lists_and_rules(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text(BASE)
    (tmp_path / "ext.yaml").write_text("""\
version: 1
extends: base.yaml
agent_config_files: {append: ["{home}/.zshrc"]}
lists:
  tools: {append: [rsync]}
  system_resolvers: {append: [9.9.9.9]}
rules:
  - name: keys
    override: {exceptions: append, tags: append}
    exceptions:
      - {name: e2, exe: [ssh]}
    tags: [b]
  - name: tools
    override: replace
    exec: {name: [wget]}
    verdict: FLAG
  - name: net
    verdict: HALT
""")
    p = load_policy(tmp_path / "ext.yaml", identities=False)
    keys, tools, net = p.rules
    assert [x.name for x in keys.exceptions] == ["e1", "e2"] and keys.tags == ("a", "b")
    assert keys.exceptions[1].file == str(tmp_path / "ext.yaml")
    assert (tools.match.names, tools.verdict, tools.reason) == (("wget",), Verdict.FLAG, "")  # replaced whole
    assert (net.match.ports, net.verdict) == (((25, 25),), Verdict.HALT)  # merged key by key, as before
    assert p.lists["tools"] == ("curl", "rsync") and p.lists["system_resolvers"][-1] == "9.9.9.9"
    assert p.agent_config_files == ("{home}/.bashrc", "{home}/.zshrc")
    # A plain list still replaces; a third file appends to what the second appended.
    (tmp_path / "third.yaml").write_text("""\
version: 1
extends: ext.yaml
lists: {tools: [nc]}
rules:
  - {name: keys, override: {exceptions: append}, exceptions: [{name: e3, comm: [x]}]}
""")
    p3 = load_policy(tmp_path / "third.yaml", identities=False)
    assert p3.lists["tools"] == ("nc",) and [x.name for x in p3.rules[0].exceptions] == ["e1", "e2", "e3"]


def test_append_and_override_errors(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text(BASE)
    bad = """\
version: 1
extends: base.yaml
deny_write: {append: [/x]}
lists:
  nope: {append: [x]}
  tools: {apend: [x]}
rules:
  - name: keys
    override: {exceptions: apend, verdict: append}
  - name: new
    override: replace
    exec: {name: x}
    verdict: FLAG
  - name: net
    override: {tags: append}
  - name: tools
    override: merge
"""
    assert errors_of(tmp_path, bad) == [
        "3: deny_write.append: nothing to append to: no list 'deny_write' in the files this extends",
        "5: lists.nope.append: nothing to append to: no list 'nope' in the files this extends",
        "6: lists.tools.apend: unknown key 'apend' (did you mean 'append'?)",
        "9: rules[0].override.verdict: unknown key 'verdict'",
        "9: rules[0].override.exceptions: expected append or replace, got 'apend'",
        "10: rules[1].name: override: no rule 'new' in the files this extends",
        "14: rules[2].name: override: {tags: append} but the rule gives no 'tags'",
        "17: rules[3].override: expected replace or a mapping like {exceptions: append}, got 'merge'",
    ]


# ====================================================================== 7. tiers

def test_tiers_are_an_ordered_enum() -> None:
    p = parse_policy("""
version: 1
rules:
  - {name: d, exec: {name: x}, verdict: HALT}
  - {name: a, exec: {name: y}, verdict: SAFE}
  - {name: c, open: {access: [write]}, verdict: HALT}
  - {name: who, open: {comm: [x]}, verdict: SAFE}
""")
    assert [r.tier for r in p.rules] == [Tier.DENY, Tier.ALLOW, Tier.CATCH_ALL, Tier.CATCH_ALL]
    assert list(Tier) == sorted(Tier) and Tier.DENY == 1 and Tier.CATCH_ALL.label == "catch-all"


# ====================================================================== 8. schema and docs

def _docs_examples() -> list[tuple[int, str]]:
    text = DOCS.read_text()
    return [(text.count("\n", 0, m.start()) + 2, m.group(1))
            for m in re.finditer(r"```yaml\n(.*?)```", text, re.S)]  # fmt: skip


def test_schema_is_draft_2020_12_from_the_tables() -> None:
    s = policy_schema()
    assert s["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    rule = s["$defs"]["rule"]["properties"]
    assert set(rule["open"]["anyOf"][0]["properties"]) == {"path", "path_not", "access", "comm", "exe", "ancestors"}
    assert "protocol" in rule["connect"]["anyOf"][0]["properties"] and "destroy" in rule
    r = CliRunner().invoke(main, ["schema"])
    assert r.exit_code == 0 and yaml.safe_load(r.output) == s


def _validators() -> list:
    out = [schema_errors]
    try:
        import jsonschema  # not a dependency: used when the environment has it
    except ImportError:
        return out
    v = jsonschema.Draft202012Validator(policy_schema())
    return [*out, lambda doc: [e.message for e in v.iter_errors(doc)]]


@pytest.mark.parametrize("path", sorted(POLICY_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_bundled_policies_validate_against_the_schema(path: Path) -> None:
    doc = yaml.safe_load(path.read_text())
    for errors in _validators():
        assert errors(doc) == []


def test_docs_examples_validate_against_the_schema_and_typos_fail() -> None:
    examples = _docs_examples()
    assert len(examples) >= 8
    for line, text in examples:
        for errors in _validators():
            assert errors(yaml.safe_load(text)) == [], f"docs/policy.md:{line}"
    typo = {"version": 1, "rules": [{"name": "x", "open": {"pth": "/x"}, "verdict": "KILL"}]}
    assert any("matches none" in e for e in schema_errors(typo))
    for doc, what in [({"version": 1, "rulez": []}, "unknown key 'rulez'"),
                      ({"version": 1, "rules": [{"name": "x", "exec": {}, "verdikt": "KILL"}]},
                       "unknown key 'verdikt'"),
                      ({"version": 1, "rules": [{"name": "x", "open": {}, "verdict": "kil"}]}, "does not match"),
                      ({"version": 1, "rules": [{"name": "x", "open": {}, "exceptions": [{"name": "e", "port": 1}]}]},
                       "unknown key 'port'"),
                      ({"version": 1, "flag_window": "10 minutes"}, "matches none")]:  # fmt: skip
        errs = schema_errors(doc)
        assert any(what in e for e in errs), (doc, errs)
        for errors in _validators()[1:]:
            assert errors(doc)


def test_check_passes_every_docs_example(tmp_path: Path) -> None:
    """Each ```yaml block of docs/policy.md is a whole policy that `ebpf-guard check` accepts
    (next to copies of the bundled policies, which examples may extend)."""
    for p in POLICY_DIR.glob("*.yaml"):
        (tmp_path / p.name).write_text(p.read_text())
    for line, text in _docs_examples():
        path = tmp_path / f"docs-{line}.yaml"
        path.write_text(text)
        r = CliRunner().invoke(main, ["check", str(path)])
        assert r.exit_code == 0, f"docs/policy.md:{line}: {r.output}"
