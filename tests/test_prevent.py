"""Issue #10, end to end through `ebpf-guard run`: the harm does not happen.

Each test runs the real guard (sensor, engine, log, and the prevention layers it sets up) and
asserts the effect: files still there, bytes unchanged, nothing read. The verdict log then says
the syscall was refused (`prevented`) and which rule judged it.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ebpf_guard.enforce import cgroups
from tests.conftest import requires_bpf
from tests.helpers import GuardRun, guard, policy_extending, records, scaled, wait_for

pytestmark = requires_bpf
EXIT_HALTED, EXIT_KILLED = 120, 121


def make_tree(root: Path, files: int = 1000) -> Path:
    for i in range(files):
        d = root / f"d{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}").write_text("x")
    return root


def count_files(root: Path) -> int:
    return sum(1 for p in root.rglob("*") if p.is_file())


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_and_kill_when_frozen(run: GuardRun) -> int:
    """A HALT leaves `run`'s agent frozen for the operator: be that operator."""
    cg = run.cgroup()
    assert cgroups.wait_frozen(cg, scaled(30)), f"{cg} was not frozen: {run.proc.stderr}"
    assert guard("kill", "--cgroup", str(cg)).returncode == 0
    return run.wait()


def test_run_jails_a_mass_delete_outside_the_workspace(tmp_cgroup: Path, ws: Path, outside: Path,
                                                       tmp_path: Path) -> None:
    tree = make_tree(outside / "tree")
    log = tmp_path / "log.jsonl"
    script = f"import shutil; shutil.rmtree({str(tree)!r}, ignore_errors=True)"
    with GuardRun(tmp_cgroup, log, [sys.executable, "-c", script], workspace=ws) as run:
        assert run_and_kill_when_frozen(run) == EXIT_HALTED, run.err
    assert count_files(tree) == 1000, run.err
    jail = [s for s in records(log, "session") if s.get("event") == "jail"]
    assert jail and jail[0]["jail"]["active"], jail
    mass = [v for v in records(log) if v["rule"] == "mass-delete"]
    assert mass and mass[0]["prevented"] is True, mass[:1]
    assert mass[0]["event"]["ret"] == -13  # EACCES from Landlock: judged as the attempt it was


def test_without_the_jail_the_same_delete_is_only_contained(tmp_cgroup: Path, ws: Path, outside: Path,
                                                           tmp_path: Path) -> None:
    """The control: the jail, not the HALT, kept the files above. Without it the kernel's rate
    hold is the first response: the deleter stops at the rule's count, the rest survive."""
    tree = make_tree(outside / "tree")
    log = tmp_path / "log.jsonl"
    script = f"import shutil; shutil.rmtree({str(tree)!r}, ignore_errors=True)"
    with GuardRun(tmp_cgroup, log, [sys.executable, "-c", script], workspace=ws, extra=("--no-jail",)) as run:
        assert run_and_kill_when_frozen(run) == EXIT_HALTED, run.err
    assert "jail: off (--no-jail)" in run.err
    left = count_files(tree)
    assert 990 <= left < 1000, left  # deletions happened (no jail), then the kernel held the deleter
    mass = [v for v in records(log) if v["rule"] == "mass-delete"]
    assert mass and not mass[0]["prevented"]
    assert "rate_held_in_kernel" in mass[0]["event"]["notes"], mass[0]["event"]


def test_run_keeps_a_protected_config_file_byte_identical(ws: Path, outside: Path, tmp_path: Path) -> None:
    config = outside / "agent.conf"
    config.write_text("trusted = true\n")
    before = digest(config)
    (outside / "evil").write_text("trusted = false\n")
    policy = policy_extending(tmp_path, f"""
rules:
  - name: test-config-write
    open: {{path: [{config}], access: [write, create, truncate]}}
    verdict: KILL
""")
    attempts = {
        "append": f"echo 'hook = evil' >> {config}",
        "mv-over": f"mv -f {outside / 'evil'} {config}",
        "truncate": f"truncate -s0 {config}",
        "python-truncate": f"{sys.executable} -c 'import os; os.truncate({str(config)!r}, 0)'",
    }
    for name, attempt in attempts.items():
        log = tmp_path / f"{name}.jsonl"
        r = guard("run", "--policy", str(policy), "--log", str(log), "--workspace", str(ws), "--", "sh", "-c",
                  attempt, timeout=60)
        assert digest(config) == before, (name, r.stderr)
        assert r.returncode != 0, (name, r.stderr)
    assert (outside / "evil").exists()  # mv could not take it away either


def test_the_jail_lets_the_workspace_and_scratch_work(ws: Path, tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    script = (
        "set -e; mkdir -p build/obj; echo x > build/obj/a.o; mv build/obj/a.o build/obj/b.o; "
        "rm build/obj/b.o; rmdir build/obj; echo y > notes.txt; ln -s notes.txt link; "
        "git init -q . ; git add notes.txt; "
        "git -c user.email=a@b -c user.name=a commit -qm init; t=$(mktemp); echo z > $t; rm $t; "
        "echo hi 2>/dev/null | cat > out.txt"
    )
    r = guard("run", "--log", str(log), "--workspace", str(ws), "--", "sh", "-c", script, cwd=ws, timeout=90)
    assert r.returncode == 0, r.stderr
    assert (ws / "out.txt").read_text() == "hi\n" and not (ws / "build" / "obj").exists()
    assert not [v for v in records(log) if v["verdict"] in ("HALT", "KILL")]


def test_run_gates_a_key_no_byte_reaches_the_agent(agent_user: tuple[str, Path], ws: Path,
                                                   tmp_path: Path) -> None:
    """A user's ssh key, read by an agent run as root (so no file permission stops it): the
    fanotify gate refuses the open, the KILL still applies, and the gate says it refused it."""
    _, home = agent_user
    ssh = home / ".ssh"
    ssh.mkdir(mode=0o700)
    key = ssh / "id_ed25519"
    key.write_text("-----BEGIN OPENSSH PRIVATE KEY----- secret\n")
    log = tmp_path / "log.jsonl"
    r = guard("run", "--log", str(log), "--workspace", str(ws), "--", "sh", "-c",
              f"cat {key}; cat {ssh}/../.ssh/id_ed25519; ln -s {key} {ws}/k; cat {ws}/k", timeout=90)
    assert "----- secret" not in r.stdout and "----- secret" not in r.stderr, r.stdout
    assert "file gates (fanotify)" in r.stderr and "Operation not permitted" in r.stderr, r.stderr
    kills = [v for v in records(log) if v["rule"] == "ssh-keys"]
    assert kills and kills[0]["prevented"] is True and kills[0]["event"]["ret"] == -1, kills[:1]
    # Refused at once, or (ssh-keys has exceptions only the engine checks) held until its KILL.
    refused = records(log, "prevented") + records(log, "held")
    assert refused and refused[0]["layer"] == "fanotify" and refused[0]["path"] == str(key), refused
    assert key.read_text().endswith("secret\n")  # and the host itself reads it as before


def test_run_denies_egress_in_the_kernel_nothing_is_received(ws: Path, tmp_path: Path) -> None:
    from tests.netns import NetnsHost

    with NetnsHost(tcp_ports=(8080,), udp_ports=(5353,), index=41) as far:
        policy = policy_extending(tmp_path, f"""
rules:
  - name: test-no-lab
    connect: {{addr: [{far.addr4}/32]}}
    verdict: KILL
""")
        log = tmp_path / "log.jsonl"
        code = (f"import socket\nu = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                f"try: u.sendto(b'leak-udp', ('{far.addr4}', 5353))\nexcept OSError as e: print('udp', e.errno)\n"
                f"t = socket.socket()\n"
                f"try: t.connect(('{far.addr4}', 8080)); t.sendall(b'leak-tcp')\n"
                f"except OSError as e: print('tcp', e.errno)\n")
        r = guard("run", "--policy", str(policy), "--log", str(log), "--workspace", str(ws), "--",
                  sys.executable, "-c", code, timeout=90)
        far.settle()
        assert far.received("udp", 5353) == [] and far.accepted(8080) == 0, far.records()
        assert "udp 1" in r.stdout, r.stdout + r.stderr  # EPERM, before any packet
        verdicts = [v for v in records(log) if v["rule"] == "test-no-lab"]
        assert verdicts and verdicts[0]["prevented"] is True


def test_run_refuses_io_uring_in_the_jail(tmp_cgroup: Path, ws: Path, tmp_path: Path) -> None:
    """io_uring's operations bypass the sensor: under `run` its setup is refused (seccomp), and
    the attempt is still judged (HALT)."""
    marker = tmp_path / "ring"
    code = ("import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\nparams = ctypes.create_string_buffer(120)\n"
            "fd = libc.syscall(425, 8, params)\n"
            f"open({str(marker)!r}, 'w').write(str(fd) + ' ' + str(ctypes.get_errno()))\n")
    log = tmp_path / "log.jsonl"
    with GuardRun(tmp_cgroup, log, [sys.executable, "-c", code], workspace=ws) as run:
        status = run_and_kill_when_frozen(run)
    assert status == EXIT_HALTED, run.err
    assert "io_uring_setup" in run.err  # said at start: refused with EPERM (seccomp)
    halts = [v for v in records(log) if v["rule"] == "io-uring"]
    assert halts, records(log)
    if marker.exists():  # the agent may have been frozen before writing it
        assert marker.read_text() == "-1 1", marker.read_text()  # EPERM: no ring was made


# ---------------------------------------------------------------- ASK: the open waits for a human

ASKED = b"bytes only a human may release\n"
RULE = "test-ask-file"
# Reads argv[1] once `go` (argv[3], if given) exists; writes what it read, or EPERM, to argv[2]
# (the guard's own lines share stdout).
READER = """import os, sys, time
if len(sys.argv) > 3:
    while not os.path.exists(sys.argv[3]):
        time.sleep(0.001)
try:
    data = open(sys.argv[1], "rb").read()
except PermissionError:
    data = b"EPERM"
open(sys.argv[2], "wb").write(data)
"""


def ask_setup(tmp_path: Path, outside: Path, *, timeout: float = 120, default: str = "deny") -> tuple[Path, Path]:
    """(the asked-about file, a policy whose rule asks before anyone opens it; a "deny" leaves the
    agent frozen, so the reader's EPERM can be seen once the test resumes it)."""
    asked = outside / "asked.txt"
    asked.write_bytes(ASKED)
    policy = policy_extending(tmp_path, f"""
ask: {{timeout: {scaled(timeout):g}s, default: {default}}}
rules:
  - name: {RULE}
    open: {{path: [{asked}]}}
    verdict: ASK
    on_deny: HALT
""")
    return asked, policy


def reader_cmd(tmp_path: Path, *args: Path) -> list[str]:
    script = tmp_path / "reader.py"
    script.write_text(READER)
    return [sys.executable, str(script), *map(str, args)]


def pending_asks() -> list[dict]:
    from ebpf_guard import approvals

    try:
        return [p for p in approvals.list_pending() if p["rule"] == RULE]
    except approvals.ApprovalError:
        return []


def ask_outcomes(log: Path) -> list[dict]:
    return [r for r in records(log, "outcome") if r["rule"] == RULE and "answer" in r]


def test_ask_holds_the_open_until_approved(tmp_cgroup: Path, ws: Path, outside: Path, tmp_path: Path) -> None:
    asked, policy = ask_setup(tmp_path, outside)
    log = tmp_path / "log.jsonl"
    with GuardRun(tmp_cgroup, log, reader_cmd(tmp_path, asked, ws / "out"), policy=policy, workspace=ws) as run:
        (pending,) = wait_for(pending_asks, timeout=60)
        assert run.proc.poll() is None and not ask_outcomes(log)  # the reader waits in open(2)
        host = subprocess.run(["cat", str(asked)], capture_output=True, timeout=scaled(10))
        assert host.returncode == 0 and host.stdout == ASKED  # not the agent: let through at once
        assert guard("approve", pending["id"]).returncode == 0
        assert run.wait() == 0, run.err
    assert (ws / "out").read_bytes() == ASKED  # the reader got the file's bytes, exactly
    asks = [v for v in records(log) if v["rule"] == RULE]
    assert asks[0]["verdict"] == "ASK" and "held_by_gate" in asks[0]["event"]["notes"], asks
    assert all(v["action"].startswith("none (held at the gate and allowed") for v in asks[1:]), asks
    (done,) = ask_outcomes(log)
    assert done["answer"] == "approve" and done["open_allowed"] is True and done["prevented"] is False, done
    assert [h["path"] for h in records(log, "held")] == [str(asked)]


def resume_when_answered(run: GuardRun, log: Path) -> None:
    """The deny left the agent frozen (on_deny: HALT): be the operator who resumes it."""
    wait_for(lambda: ask_outcomes(log), timeout=60)
    assert guard("resume", "--cgroup", str(run.cgroup())).returncode == 0


def test_ask_denied_the_open_fails_with_eperm(tmp_cgroup: Path, ws: Path, outside: Path, tmp_path: Path) -> None:
    asked, policy = ask_setup(tmp_path, outside)
    log = tmp_path / "log.jsonl"
    with GuardRun(tmp_cgroup, log, reader_cmd(tmp_path, asked, ws / "out"), policy=policy, workspace=ws) as run:
        (pending,) = wait_for(pending_asks, timeout=60)
        assert guard("deny", pending["id"]).returncode == 0
        resume_when_answered(run, log)
        run.wait()
    assert (ws / "out").read_bytes() == b"EPERM", run.err  # no byte of the file
    (done,) = ask_outcomes(log)
    assert done["answer"] == "deny" and done["open_allowed"] is False and done["prevented"] is True, done


@pytest.mark.parametrize("default", ["deny", "allow"])
def test_ask_timeout_answers_the_open_with_the_default(tmp_cgroup: Path, ws: Path, outside: Path,
                                                       tmp_path: Path, default: str) -> None:
    asked, policy = ask_setup(tmp_path, outside, timeout=2, default=default)
    log = tmp_path / "log.jsonl"
    with GuardRun(tmp_cgroup, log, reader_cmd(tmp_path, asked, ws / "out"), policy=policy, workspace=ws) as run:
        if default == "deny":
            resume_when_answered(run, log)
        run.wait()
    assert (ws / "out").read_bytes() == (ASKED if default == "allow" else b"EPERM"), run.err
    (done,) = ask_outcomes(log)
    assert done["answer"] == "timeout" and done["open_allowed"] is (default == "allow"), done
    assert done["prevented"] is (default == "deny")


def test_a_second_opener_gets_no_way_around_a_held_open(tmp_cgroup: Path, ws: Path, outside: Path,
                                                        tmp_path: Path) -> None:
    """Two of the agent's processes open the file at once: neither is let through while a human is
    asked; every answer is deny, and neither reads a byte."""
    asked, policy = ask_setup(tmp_path, outside)
    log, go = tmp_path / "log.jsonl", ws / "go"
    one, two = (" ".join(reader_cmd(tmp_path, asked, ws / f"out{i}", go)) for i in (1, 2))
    with GuardRun(tmp_cgroup, log, ["sh", "-c", f"{one} & {two} & wait"], policy=policy, workspace=ws) as run:
        cg = run.cgroup()
        wait_for(lambda: len(cgroups.pids(cg)) >= 3, timeout=60)
        go.touch()
        while run.proc.poll() is None:
            for p in pending_asks():
                assert guard("deny", p["id"]).returncode == 0
            if cgroups.is_populated(cg) and (cg / "cgroup.freeze").read_text().strip() == "1":
                # Every answer so far was deny (on_deny: HALT) and none is pending: resume.
                if not pending_asks() and not wait_for_pending(scaled(0.5)):
                    guard("resume", "--cgroup", str(cg))
            time.sleep(0.05)
        run.wait()
    assert (ws / "out1").read_bytes() == (ws / "out2").read_bytes() == b"EPERM", run.err
    assert {r["answer"] for r in ask_outcomes(log)} == {"deny"}


def wait_for_pending(timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pending_asks():
            return True
        time.sleep(0.02)
    return False
