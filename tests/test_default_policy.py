"""The bundled policies rule by rule, pure (engine only, no root): every rule of default.yaml and
strict.yaml has at least one event sequence that fires it and one near miss that does not.

A case is a short event sequence; the verdict and rule of its last event are checked. `rule`
is the rule the case is about: a firing case expects that rule, a near miss expects something
else (usually SAFE, or a milder rule). `test_every_rule_has_a_firing_case_and_a_near_miss`
keeps the table complete when a rule is added to either policy.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import pytest

from ebpf_guard.events import CREATE, READ, TRUNCATE, WRITE, Event, Kind
from ebpf_guard.paths import POLICY_DIR
from ebpf_guard.policy import parse_policy
from ebpf_guard.policy.engine import Engine

HOME = "/home/dev"
WS = "/home/dev/project"
T0 = 5_000_000_000_000
HOMES = {1000: HOME, 0: "/root"}
RESOLVER = "10.53.53.53"  # the resolver of the tests' $system_resolvers
W = (WRITE, CREATE, TRUNCATE)
POLICIES = ("default", "strict")


def ev(kind: str, t: float = 0.0, pid: int = 100, **kw) -> Event:
    kw.setdefault("ppid", 1)
    kw.setdefault("uid", 1000)
    kw.setdefault("comm", "agent")
    kw.setdefault("start_ns", pid * 1000)
    return Event(kind=Kind(kind), ts_ns=T0 + int(t * 1e9), pid=pid, tgid=pid, cgroup_id=7, **kw)


def exec_(argv: list[str], t: float = 0.0, pid: int = 100, **kw) -> Event:
    path = kw.pop("path", None) or (argv[0] if argv[0].startswith("/") else f"/usr/bin/{argv[0]}")
    kw.setdefault("exe", path)
    return ev("exec", t, pid, raw_path=path, path=path, argv=tuple(argv), comm=argv[0][-15:], **kw)


def open_(path: str, *access: str, t: float = 0.0, pid: int = 100, **kw) -> Event:
    return ev("open", t, pid, raw_path=path, path=path, access=frozenset(access or {READ}), **kw)


def unlink(path: str, t: float = 0.0, pid: int = 100, **kw) -> Event:
    return ev("unlink", t, pid, raw_path=path, path=path, **kw)


def connect(addr: str, port: int, t: float = 0.0, family: str = "ipv4", **kw) -> Event:
    return ev("connect", t, family=family, addr=addr, port=port, **kw)


def symlink(target: str, at: str) -> Event:
    return ev("symlink", raw_path=target, dest_raw_path=at, dest_path=at)


def deletes(paths: list[str], every: float = 0.01) -> list[Event]:
    return [unlink(p, i * every) for i, p in enumerate(paths)]


def empties(paths: list[str], every: float = 0.01, created: bool = False) -> list[Event]:
    """O_TRUNC opens (of files that existed unless `created`)."""
    return [open_(p, WRITE, TRUNCATE, t=i * every, created=created) for i, p in enumerate(paths)]


def under(chain: list[str], last: Event) -> list[Event]:
    """`chain` of programs, each forked and exec'd by the one before (pids 200, 201, ...),
    then `last` done by the last of them."""
    out: list[Event] = []
    for i, program in enumerate(chain):
        pid = 200 + i
        if i:
            out.append(ev("fork", pid=pid - 1, ppid=pid - 2 if i > 1 else 1, child_pid=pid))
        out.append(exec_([program.rsplit("/", 1)[-1]], pid=pid, ppid=pid - 1 if i else 1, path=program))
    pid = 200 + len(chain) - 1
    comm = chain[-1].rsplit("/", 1)[-1][:15]
    comm = last.comm if last.comm != "agent" else comm
    out.append(replace(last, pid=pid, tgid=pid, ppid=pid - 1, comm=comm, start_ns=pid * 1000, exe=chain[-1]))
    return out


@dataclass(frozen=True)
class Case:
    """One event sequence, the rule it is about, and the (verdict, rule) of its last event."""

    rule: str
    events: tuple[Event, ...]
    verdict: str
    decided_by: str
    policy: str = "default"
    note: str = field(default="", compare=False)

    @property
    def fires(self) -> bool:
        return self.decided_by == self.rule


def case(rule: str, events: Event | list[Event], verdict: str, decided_by: str | None = None, *,
         policy: str = "default", note: str = "") -> Case:
    seq = tuple(events) if isinstance(events, list) else (events,)
    return Case(rule, seq, verdict, rule if decided_by is None else decided_by, policy, note)


KEY = f"{HOME}/.ssh/id_ed25519"
WS_FILES = [f"{WS}/src/f{i}.c" for i in range(1000)]

DEFAULT = [
    # ---- KILL
    case("ssh-keys", open_(KEY), "KILL"),
    case("ssh-keys", open_(f"{HOME}/.ssh_notes"), "SAFE", "", note="not below ~/.ssh"),
    case("ssh-keys", under(["/usr/bin/bash", "/usr/bin/ssh"], open_(KEY)), "KILL", note="ssh, not under git"),
    case("ssh-keys", under(["/usr/bin/git", "/usr/bin/sh", "/usr/bin/cat"], open_(KEY)), "KILL",
         note="git -c core.sshCommand='cat KEY': the reader is cat"),
    case("ssh-keys", under(["/usr/bin/git", f"{WS}/ssh"], open_(KEY)), "KILL", note="a copy of ssh"),
    case("ssh-keys", under([f"{WS}/git", "/usr/bin/ssh"], open_(KEY)), "KILL", note="a fake git"),
    case("ssh-key-for-git", under(["/usr/bin/git", "/usr/bin/ssh"], open_(KEY)), "ASK"),
    case("ssh-key-for-git", under(["/usr/bin/git", "/usr/bin/sh", "/usr/bin/ssh"], open_(f"{HOME}/.ssh/config")),
         "ASK", note="GIT_SSH_COMMAND runs ssh through sh"),
    case("ssh-key-for-git", under(["/usr/bin/git", "/usr/bin/ssh"], unlink(KEY)), "KILL", "ssh-keys-delete"),
    case("ssh-keys-delete", unlink(f"{HOME}/.ssh/id_rsa"), "KILL"),
    case("ssh-keys-delete", unlink(f"{HOME}/.sshx"), "SAFE", ""),
    case("ssh-keys-delete", unlink("/srv/deploy/id_rsa"), "KILL"),
    case("ssh-keys-delete", unlink("/tmp/pytest-of-root/garbage-1/t0/home/.ssh/id_rsa"), "SAFE", ""),  # fixtures
    case("credentials", open_(f"{HOME}/.aws/credentials"), "KILL"),
    case("tool-credentials", open_(f"{HOME}/.git-credentials"), "KILL"),
    case("tool-credentials", under(["/usr/bin/bash", "/usr/bin/cat"], open_(f"{HOME}/.netrc")), "KILL"),
    case("tool-credentials", under(["/usr/bin/node"], open_(f"{HOME}/.npmrc")), "KILL", note="node, not npm"),
    case("tool-credentials", under(["/usr/bin/node"], open_(f"{HOME}/.npmrc", comm="npm")), "SAFE", "",
         note="npm (node, comm npm) reads its config"),
    case("git-credentials", under(["/usr/bin/git", "/usr/lib/git-core/git-credential-store"],
                                  open_(f"{HOME}/.git-credentials")), "ASK"),
    case("git-credentials", under(["/usr/bin/git", "/usr/lib/git-core/git-remote-http"], open_(f"{HOME}/.netrc")),
         "ASK"),
    case("git-credentials", under(["/usr/bin/git"], open_(f"{HOME}/.aws/credentials")), "KILL", "credentials",
         note="git reading another tool's store"),
    case("credentials", open_(f"{HOME}/.config/gh/hosts.yml"), "KILL"),
    case("credentials", open_(f"{HOME}/.docker/config.json"), "KILL"),
    case("credentials", open_(f"{HOME}/.kube/config"), "KILL"),
    case("credentials", open_(f"{HOME}/.config/gcloud/application_default_credentials.json"), "KILL"),
    case("credentials", open_(f"{HOME}/.config/gcloud/legacy_credentials/me@x/adc.json"), "KILL"),
    case("credentials", open_(f"{HOME}/.pypirc"), "KILL"),
    case("credentials", open_(f"{HOME}/.aws/config"), "SAFE", "", note="config, not the credentials"),
    case("tool-credentials", open_(f"{WS}/.npmrc"), "SAFE", "", note="the project's .npmrc"),
    case("credentials", open_(f"{HOME}/.aws/credentials", WRITE), "KILL", "agent-config-write",
         note="a write is agent-config-write's"),
    case("other-process-secrets", open_("/proc/4242/environ"), "KILL"),
    case("other-process-secrets", open_("/proc/4242/mem", READ, WRITE), "KILL"),
    case("other-process-secrets", open_("/proc/4242/task/4243/environ"), "KILL"),
    case("other-process-secrets", open_("/proc/self/environ"), "SAFE", ""),
    case("other-process-secrets", open_("/proc/100/environ", pid=100), "SAFE", "", note="its own pid"),
    case("other-process-secrets", open_("/proc/4242/cmdline"), "SAFE", ""),
    case("other-process-secrets", under(["/usr/bin/ps"], open_("/proc/4242/environ")), "SAFE", "",
         note="ps aux opens every environ and prints none"),
    case("other-process-secrets", under(["/usr/bin/ps"], open_("/proc/4242/mem")), "KILL"),
    case("other-process-secrets", under([f"{WS}/ps"], open_("/proc/4242/environ")), "KILL", note="a copy of ps"),
    case("ps-environment", exec_(["ps", "auxe"]), "KILL"),
    case("ps-environment", exec_(["ps", "eww", "1"]), "KILL"),
    case("ps-environment", exec_(["ps", "aux", "e"]), "KILL"),
    case("ps-environment", exec_(["ps", "aux"]), "SAFE", ""),
    case("ps-environment", exec_(["ps", "-ef"]), "SAFE", ""),
    case("ps-environment", exec_(["ps", "-o", "user,etime", "-C", "tee"]), "SAFE", ""),
    case("agent-config-write", open_(f"{HOME}/.bashrc", WRITE), "KILL"),
    case("agent-config-write", open_(f"{HOME}/.claude/CLAUDE.md", *W), "KILL"),
    case("agent-config-write", open_(f"{HOME}/.claude/commands/deploy.md", CREATE, WRITE), "KILL"),
    case("agent-config-write", open_(f"{HOME}/.claude/hooks/pre.sh", CREATE, WRITE), "KILL"),
    case("agent-config-write", open_(f"{HOME}/.claude/settings.local.json", WRITE), "KILL"),
    case("agent-config-write", open_(f"{HOME}/.codex/AGENTS.md", WRITE), "KILL"),
    case("agent-config-write", open_(f"{HOME}/.aider.conf.yml", WRITE), "KILL"),
    case("agent-config-write", open_(f"{HOME}/.claude/projects/p/s.jsonl", WRITE), "SAFE", "",
         note="the agent's session log"),
    case("agent-config-write", open_(f"{HOME}/.aider/caches/x", CREATE, WRITE), "SAFE", ""),
    case("agent-config-write", open_(f"{HOME}/.bashrc"), "SAFE", "", note="a read"),
    case("deny-write", open_("/etc/sudoers.d/agent", CREATE, WRITE), "KILL"),
    case("deny-write", open_("/etc/sudoers.d/agent"), "SAFE", ""),
    case("recursive-rm", exec_(["rm", "-rf", WS]), "KILL"),
    case("recursive-rm", exec_(["rm", "-rf", "."], cwd=WS), "KILL", note="the workspace from inside"),
    case("recursive-rm", exec_(["rm", "-rf", f"{WS}/.."]), "KILL"),
    case("recursive-rm", exec_(["rm", "-rf", ".."], cwd=f"{WS}/src"), "KILL", note="src/.. is the workspace"),
    case("recursive-rm", exec_(["rm", "-r", "/opt/thing"]), "KILL"),
    case("recursive-rm", exec_(["rm", "-rf", "build"]), "KILL", note="cwd unknown: fail closed"),
    case("recursive-rm", exec_(["rm", "-rf", "build", "dist", "node_modules", ".venv"], cwd=WS), "SAFE", ""),
    case("recursive-rm", exec_(["rm", "-rf", f"{WS}/build"]), "SAFE", ""),
    case("recursive-rm", exec_(["rm", "-rf", "/tmp/build"]), "SAFE", ""),
    case("recursive-rm-git-dir", exec_(["rm", "-rf", ".git"], cwd=WS), "KILL"),
    case("recursive-rm-git-dir", exec_(["rm", "-rf", ".git/HEAD", ".git/objects", ".git/refs"], cwd=WS), "KILL",
         note="rm -rf .git/* as the shell expands it"),
    case("recursive-rm-git-dir", exec_(["rm", "-rf", ".git/refs/original"], cwd=WS), "SAFE", "",
         note="filter-branch's documented cleanup"),
    case("recursive-rm-git-dir", exec_(["rm", "-rf", "sub/.git"], cwd=WS), "SAFE", "",
         note="a nested clone's history is the nested clone's business"),
    # ---- HALT
    case("exfil-tool", exec_(["curl", "https://x"]), "HALT"),
    case("exfil-tool", exec_(["curly", "x"]), "SAFE", ""),
    case("mass-delete", deletes(["/srv/a", "/srv/b", "/srv/c"]), "HALT"),
    case("mass-delete", deletes(["/tmp/a", "/tmp/b", f"{HOME}/.cache/c"]), "SAFE", ""),
    case("mass-delete", deletes([f"{HOME}/.npm/_cacache/tmp/a", f"{HOME}/.npm/_cacache/tmp/b",
                                 f"{HOME}/.npm/_cacache/tmp/c"]), "SAFE", "", note="npm cleaning its cache"),
    case("mass-delete", deletes([f"{WS}/a", f"{WS}/b", f"{WS}/c"]), "SAFE", "", note="workspace: work"),
    case("mass-delete", deletes(["/srv/a", "/srv/b", "/srv/c"], every=6), "SAFE", "", note="12 s apart"),
    case("mass-delete", deletes([f"{HOME}/p/__pycache__/a.pyc", f"{HOME}/p/__pycache__/b.pyc",
                                 f"{HOME}/p/__pycache__/c.pyc"]), "HALT",
         note="bytecode caches are scratch only in the workspace and /tmp"),
    case("mass-destroy", empties([f"{HOME}/.bash_history", f"{HOME}/.python_history", f"{HOME}/.lesshst"]),
         "HALT", note="O_TRUNC of existing files in harmless places"),
    case("mass-destroy", [ev("truncate", i * 0.1, raw_path=p, path=p) for i, p in
                          enumerate([f"{HOME}/.bash_history", f"{HOME}/.zsh_history", f"{HOME}/.lesshst"])], "HALT"),
    case("mass-destroy", [*empties([f"{HOME}/.bash_history", f"{HOME}/.lesshst"]), unlink("/srv/a", 0.1)], "HALT",
         note="emptied and deleted, counted together"),
    case("mass-destroy", empties([f"{HOME}/.bash_history", f"{HOME}/.python_history", f"{HOME}/.lesshst"],
                                 created=True), "SAFE", "", note="created, not emptied"),
    case("mass-destroy", empties([f"{HOME}/.claude/a.json", f"{HOME}/.npm/b", "/dev/null"]), "SAFE", ""),
    case("mass-destroy", empties([f"{WS}/a", f"{WS}/b", f"{WS}/c"]), "SAFE", ""),
    case("workspace-mass-destroy", deletes(WS_FILES), "HALT"),
    case("workspace-mass-destroy", empties(WS_FILES), "HALT", note="emptied, not deleted"),
    case("workspace-mass-destroy", [*deletes(WS_FILES[:500]), *empties(WS_FILES[500:], every=0.001)], "HALT"),
    case("workspace-mass-destroy", deletes(WS_FILES[:999]), "SAFE", ""),
    case("workspace-mass-destroy", [*under(["/usr/bin/git"], unlink(WS_FILES[0])),
                                    *[replace(e, pid=200, tgid=200, ppid=199, start_ns=200_000, exe="/usr/bin/git")
                                      for e in deletes(WS_FILES[1:])]], "SAFE", "",
         note="git switching branches"),
    case("workspace-mass-destroy", [*under(["/usr/bin/git", "/usr/bin/sh", "/usr/bin/rm"], unlink(WS_FILES[0])),
                                    *[replace(e, pid=202, tgid=202, ppid=201, start_ns=202_000, exe="/usr/bin/rm")
                                      for e in deletes(WS_FILES[1:])]], "HALT",
         note="rm run by a git alias or hook is not git"),
    case("workspace-mass-destroy", empties(WS_FILES, created=True), "SAFE", "", note="new files"),
    case("workspace-mass-destroy", deletes([f"{WS}/node_modules/p/f{i}.js" for i in range(1000)]), "SAFE", ""),
    case("workspace-mass-destroy", deletes([f"{WS}/.git/objects/ab/o{i}" for i in range(1000)]), "SAFE", ""),
    case("network-burst", [connect(f"10.0.0.{i % 200}", 443, i * 0.5) for i in range(50)], "HALT"),
    case("network-burst", [connect("127.0.0.1", 8000 + i, i * 0.1) for i in range(300)], "SAFE", ""),
    case("write-outside-workspace", open_("/etc/hosts", WRITE), "HALT"),
    case("write-outside-workspace", open_("/usr/lib/python3/dist-packages/x/__pycache__/y.pyc", WRITE, CREATE),
         "HALT", note="a .pyc outside the workspace runs the next time that code is imported"),
    case("write-outside-workspace", open_(f"{HOME}/other/__pycache__/y.pyc", WRITE, CREATE), "HALT"),
    case("write-outside-workspace", open_(f"{WS}/pkg/__pycache__/y.pyc", WRITE, CREATE), "SAFE", ""),
    case("write-outside-workspace", open_("/tmp/x/__pycache__/y.pyc", WRITE, CREATE), "SAFE", ""),
    case("io-uring", ev("io_uring", exe="/usr/bin/python3"), "HALT"),
    case("io-uring", ev("ptrace", target_pid=200, flags=0x4206, exe="/usr/bin/gdb"), "FLAG", "ptrace"),
    # ---- FLAG
    case("privilege-tool", exec_(["sudo", "id"]), "FLAG"),
    case("privilege-tool", exec_(["sudoku"]), "SAFE", ""),
    case("chmod-world-writable", exec_(["chmod", "777", "x"]), "FLAG"),
    case("chmod-world-writable", exec_(["chmod", "755", "x"]), "SAFE", ""),
    case("env-file-read", open_(f"{HOME}/other/.env"), "FLAG"),
    case("env-file-read", open_(f"{WS}/.env"), "SAFE", "", note="the project's own .env"),
    case("env-file-read", open_(f"{WS}/.envrc"), "SAFE", ""),
    case("ptrace", ev("ptrace", target_pid=200, flags=0x4206, exe="/usr/bin/gdb"), "FLAG"),
    case("ptrace", ev("io_uring", exe="/usr/bin/python3"), "HALT", "io-uring"),
    case("symlink-to-protected", symlink(f"{HOME}/.bashrc", f"{WS}/rc"), "FLAG"),
    case("symlink-to-protected", symlink("../pkg/cli.js", f"{WS}/node_modules/.bin/pkg"), "SAFE", ""),
    case("workspace-agent-settings", open_(f"{WS}/.claude/settings.json", WRITE), "FLAG"),
    case("workspace-agent-settings", open_(f"{WS}/.claude/settings.local.json", CREATE, WRITE), "FLAG"),
    case("workspace-agent-settings", open_(f"{WS}/CLAUDE.md", WRITE), "SAFE", "",
         note="instruction files in the workspace are project files"),
    case("workspace-agent-settings", open_(f"{WS}/.claude/settings.json"), "SAFE", ""),
]

STRICT = [
    case("exfil-tool", exec_(["rsync", "-a", "x", "h:"]), "KILL", policy="strict"),
    case("exfil-tool", exec_(["rsynk"]), "SAFE", "", policy="strict"),
    case("privilege-tool", exec_(["sudo", "id"]), "HALT", policy="strict"),
    case("privilege-tool", exec_(["id"]), "SAFE", "", policy="strict"),
    case("ptrace", ev("ptrace", target_pid=200, flags=0x4206, exe="/usr/bin/gdb"), "HALT", policy="strict"),
    case("ptrace", ev("io_uring", exe="/usr/bin/python3"), "HALT", "io-uring", policy="strict"),
    case("container-socket", connect("/run/docker.sock", 0, family="unix"), "KILL", policy="strict"),
    case("container-socket", connect("/run/user/1000/bus", 0, family="unix"), "SAFE", "", policy="strict"),
    case("loopback", connect("127.0.0.1", 8000), "SAFE", policy="strict"),
    case("loopback", connect("10.0.0.1", 8000), "ASK", "unknown-network", policy="strict"),
    case("dns", connect(RESOLVER, 53, protocol="udp"), "SAFE", policy="strict"),
    case("dns", connect(RESOLVER, 53, protocol="tcp"), "ASK", "unknown-network", policy="strict"),
    case("dns", connect("10.9.9.9", 53, protocol="udp"), "ASK", "unknown-network", policy="strict",
         note="not a configured resolver"),
    case("dns", connect(RESOLVER, 53), "ASK", "unknown-network", policy="strict", note="protocol unknown"),
    case("known-apis", connect("140.82.112.3", 443), "SAFE", policy="strict"),
    case("known-apis", connect("140.82.112.3", 22), "ASK", "unknown-network", policy="strict"),
    case("unknown-network", connect("10.0.0.1", 443), "ASK", policy="strict"),
    case("unknown-network", connect("10.0.0.1", 443, family="unix"), "SAFE", "", policy="strict"),
]

CASES = DEFAULT + STRICT
_ENGINES: dict[str, Engine] = {}


def engine(name: str) -> Engine:
    """A fresh engine per case (rates and trees are per run); the policy is parsed once."""
    if name not in _ENGINES:
        path = POLICY_DIR / f"{name}.yaml"
        policy = parse_policy(path.read_text(), str(path), builtin_lists={"system_resolvers": (RESOLVER,)})
        _ENGINES[name] = Engine(policy, workspace=WS, home_of=HOMES.get)
    policy = _ENGINES[name].policy
    eng = Engine(policy, workspace=WS, home_of=HOMES.get)
    eng.set_host_addresses({"github.com": ["140.82.112.3"], "api.github.com": ["140.82.112.3"]})
    return eng


def _id(c: Case) -> str:
    last = c.events[-1]
    return f"{c.policy}-{c.rule}-{'fires' if c.fires else 'near'}-{last.path or last.addr or last.kind.value}"


@pytest.mark.parametrize("c", CASES, ids=[_id(c) for c in CASES])
def test_case(c: Case) -> None:
    eng = engine(c.policy)
    decisions = [eng.evaluate(e) for e in c.events]
    last = decisions[-1]
    assert (last.verdict.value, last.rule) == (c.verdict, c.decided_by), f"{c.note} {last.reason}"
    if c.fires and len(c.events) > 1:  # a rate rule fires on the event that reaches its count, not before
        assert all(d.rule != c.rule for d in decisions[:-1])


@pytest.mark.parametrize("name", POLICIES)
def test_every_rule_has_a_firing_case_and_a_near_miss(name: str) -> None:
    rules = {r.name for r in engine(name).policy.rules}
    mine = [c for c in CASES if c.policy == name]
    fired = {c.rule for c in mine if c.fires}
    near = {c.rule for c in mine if not c.fires}
    # strict.yaml extends default.yaml: the default's rules are covered by the default's table.
    covered = {c.rule for c in DEFAULT} if name == "strict" else set()
    assert rules - fired - covered == set(), "rules without a firing case"
    assert rules - near - covered == set(), "rules without a near miss"
