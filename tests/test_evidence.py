"""Issue #4 end to end: ASK approvals on a real frozen cgroup, incidents, redaction on disk,
replay of a recording, and the report of a real run."""

from __future__ import annotations

import fcntl
import os
import select
import signal
import subprocess
import termios
import textwrap
import time
from pathlib import Path

import orjson

from ebpf_guard import approvals
from ebpf_guard.enforce import cgroups
from tests.conftest import requires_bpf
from tests.helpers import GUARD, REPO, GuardRun, eventually, guard, policy_extending, records, scaled, wait_for
from tests.test_enforce import EXIT_KILLED, agent

pytestmark = requires_bpf
DEFAULT = REPO / "policies" / "default.yaml"


def _pending_for(rule: str, timeout: float = 30) -> dict:
    def find():
        try:
            return [p for p in approvals.list_pending() if p["rule"] == rule]
        except approvals.ApprovalError:
            return []
    return wait_for(find, timeout=timeout)[0]


def _ask_policy(tmp_path: Path, *, timeout: float = 120, default: str = "deny") -> Path:
    """Confirm mode; an ASK not answered within `timeout` seconds (scaled) gets `default`."""
    return policy_extending(tmp_path, f"mode: confirm\nask: {{timeout: {scaled(timeout):g}s, default: {default}}}\n")


def _curl_agent(marker: Path) -> list[str]:
    # curl is a HALT under the default policy: in confirm mode it becomes an ASK.
    return ["sh", "-c", f"curl --version >/dev/null; echo curl=$? > {marker}"]


def test_ask_freezes_and_approve_thaws(tmp_cgroup, tmp_path, ws):
    marker, log = tmp_path / "after", tmp_path / "v.jsonl"
    with GuardRun(tmp_cgroup, log, _curl_agent(marker), policy=_ask_policy(tmp_path), workspace=ws) as run:
        pending = _pending_for("exfil-tool")
        cg = run.cgroup()
        assert cgroups.wait_frozen(cg, scaled(10)) and not marker.exists()
        listing = guard("approvals")
        assert pending["id"] in listing.stdout and "exfil-tool" in listing.stdout
        assert guard("approve", pending["id"]).returncode == 0
        assert run.wait() == 0, run.err  # approved: the command's own status
    assert marker.read_text() == "curl=0\n"
    (rec,) = records(log, "approval")
    assert rec["decision"] == "allow" and rec["by_uid"] == 0 and rec["by_user"] == "root"
    assert rec["via"] == "socket" and rec["waited_s"] >= 0
    assert [r["verdict"] for r in records(log)] == ["ASK"]


def test_ask_deny_kills_the_offender(tmp_cgroup, tmp_path, ws):
    marker, log = tmp_path / "after", tmp_path / "v.jsonl"
    with GuardRun(tmp_cgroup, log, _curl_agent(marker), policy=_ask_policy(tmp_path), workspace=ws) as run:
        pending = _pending_for("exfil-tool")
        assert guard("deny", pending["id"]).returncode == 0
        assert run.wait() == EXIT_KILLED, run.err
    # curl was killed (the shell went on and saw it die of SIGKILL: 128+9).
    assert marker.read_text() == "curl=137\n"
    assert records(log, "approval")[0]["decision"] == "deny"


def test_ask_timeout_applies_the_default(tmp_cgroup, tmp_path, ws):
    marker, log = tmp_path / "after", tmp_path / "v.jsonl"
    policy = _ask_policy(tmp_path, timeout=1, default="deny")
    with GuardRun(tmp_cgroup, log, _curl_agent(marker), policy=policy, workspace=ws) as run:
        assert run.wait() == EXIT_KILLED, run.err
    (rec,) = records(log, "approval")
    assert rec["via"] == "timeout" and rec["decision"] == "deny" and rec["waited_s"] >= scaled(1.0)
    assert marker.read_text() == "curl=137\n"


def test_non_root_cannot_approve(tmp_cgroup, tmp_path, ws):
    marker, log = tmp_path / "after", tmp_path / "v.jsonl"
    with GuardRun(tmp_cgroup, log, _curl_agent(marker), policy=_ask_policy(tmp_path), workspace=ws) as run:
        pending = _pending_for("exfil-tool")
        refused = guard("approve", pending["id"], nobody=True)
        assert refused.returncode == 1 and "root" in refused.stderr
        assert cgroups.wait_frozen(run.cgroup(), scaled(10)) and _pending_for("exfil-tool")["id"] == pending["id"]
        assert guard("deny", pending["id"]).returncode == 0
        run.wait()


def test_halt_writes_an_incident_with_the_frozen_tree(tmp_cgroup, tmp_path, ws, outside):
    log = tmp_path / "v.jsonl"
    code = f"""
        import os, time
        os.chdir({str(ws)!r})
        keep = open("notes.txt", "w")          # an open file the snapshot should show
        try:
            open({str(outside / 'x')!r}, 'w')   # HALT: write outside the workspace
        except PermissionError:                 # refused by run's jail: judged all the same
            pass
        time.sleep({scaled(30)})
    """
    script = tmp_path / "agent.py"
    script.write_text(textwrap.dedent(code))
    # "; true" keeps the shell around as the agent's parent, so the tree has two processes.
    with GuardRun(tmp_cgroup, log, ["sh", "-c", f"{agent('')[0]} {script}; true"], workspace=ws) as run:
        cg = run.cgroup()
        assert cgroups.wait_frozen(cg, scaled(20))
        rec = wait_for(lambda: [r for r in records(log) if r["verdict"] == "HALT"])[0]
        incident = Path(rec["incident"])
        wait_for(incident.exists)
        data = orjson.loads(incident.read_bytes())
        guard("kill", "--cgroup", str(cg))
        run.wait()
    assert data["record"]["rule"] == "write-outside-workspace"
    assert any(e["kind"] == "open" and e["path"].endswith("notes.txt") for e in data["recent_events"])
    tree = data.get("process_tree") or data["tree"]
    procs = {p["pid"]: p for p in tree}
    offender = procs[rec["event"]["tgid"]]
    assert offender["cwd"] == str(ws) and offender["status"] in ("stopped", "sleeping", "disk-sleep")
    assert any(f["path"] == str(ws / "notes.txt") for f in offender["open_files"])
    assert any(p["pid"] == offender["ppid"] for p in tree)  # the parent shell is in the tree too


SECRETS = {
    "openai": "sk-proj-A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6",
    "github": "ghp_abcdefghijklmnopqrstuvwxyz0123456789",
    "aws": "AKIAIOSFODNN7EXAMPLE",
    "jwt": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
}


def test_no_raw_secret_reaches_disk(tmp_cgroup, tmp_path, ws):
    logdir = tmp_path / "logs"
    log, rec = logdir / "v.jsonl", tmp_path / "session.rec"
    url = f"http://user:hunter2pass@127.0.0.1:9/?token={SECRETS['openai']}"
    cmd = ["sh", "-c", f"curl -s --max-time 1 -H 'Authorization: Bearer {SECRETS['github']}' "
           f"-H 'X-Aws: {SECRETS['aws']}' -H 'X-Jwt: {SECRETS['jwt']}' '{url}' -o /dev/null; exit 0"]
    with GuardRun(tmp_cgroup, log, cmd, workspace=ws, mode="audit", extra=("--log-all", "--record", str(rec),
                  "--output", str(tmp_path / "out.jsonl"))) as run:
        assert run.wait() == 0, run.err
    assert [r["rule"] for r in records(log) if r["verdict"] != "SAFE"] == ["exfil-tool"]
    on_disk = b"".join(p.read_bytes() for p in [*logdir.rglob("*"), rec] if p.is_file())
    for kind, secret in [*SECRETS.items(), ("password", "hunter2pass")]:
        assert secret.encode() not in on_disk, f"raw {kind} secret on disk"
    assert b"[REDACTED" in on_disk
    # --output is the user's own event stream file: it is redacted the same way.
    assert SECRETS["github"].encode() not in (tmp_path / "out.jsonl").read_bytes()


def test_replay_reproduces_the_logged_verdicts(tmp_cgroup, tmp_path, ws, outside):
    (outside / ".env").write_text("X=1\n")  # in the workspace: work, not judged
    for i in range(5):
        (outside / f"f{i}").write_text("x")
    script = (f"cat {outside}/.env >/dev/null; curl --version >/dev/null; echo x > {outside}/o; "
              f"rm {outside}/f0 {outside}/f1 {outside}/f2 {outside}/f3; chmod 777 {outside}/f4")
    log, rec = tmp_path / "v.jsonl", tmp_path / "s.rec"
    with GuardRun(tmp_cgroup, log, ["sh", "-c", script], mode="audit", workspace=ws,
                  extra=("--record", str(rec))) as run:
        assert run.wait() == 0, run.err
    logged = [(r["verdict"], r["rule"], r["event"]["tgid"], r["event"]["ts_ns"]) for r in records(log)]
    from ebpf_guard.replay import replay
    (result,) = replay(rec, [DEFAULT])
    replayed = [(d.verdict.value, d.rule, d.event.tgid, d.event.ts_ns) for d in result.decisions
                if d.verdict.value != "SAFE"]
    assert len(logged) >= 4 and replayed == logged
    # --compare shows where two policies differ.
    cmp = guard("replay", str(rec), "--compare", str(DEFAULT), str(REPO / "policies" / "strict.yaml"))
    assert cmp.returncode == 0 and "decided differently" in cmp.stdout and "exfil-tool" in cmp.stdout


def test_report_and_verify_of_a_real_run(tmp_cgroup, tmp_path, ws, outside):
    log = tmp_path / "v.jsonl"
    code = f"open({str(outside / 'x')!r}, 'w'); import time; time.sleep({scaled(30)})"
    with GuardRun(tmp_cgroup, log, agent(code), workspace=ws) as run:
        cg = run.cgroup()
        assert cgroups.wait_frozen(cg, scaled(20))
        wait_for(lambda: list((log.parent / "incidents").glob("*.json")))
        guard("kill", "--cgroup", str(cg))
        run.wait()
    assert guard("verify", str(log)).returncode == 0
    text = guard("report", str(log))
    assert text.returncode == 0
    assert "write-outside-workspace" in text.stdout and "HALT" in text.stdout
    html = guard("report", "--format", "html", "--out", str(tmp_path / "r.html"), str(log))
    assert html.returncode == 0 and "<html" in (tmp_path / "r.html").read_text().lower()
    # Tampering with the real log is caught at the edited record.
    lines = log.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b"write-outside-workspace", b"write-inside-workspace!")
    log.write_bytes(b"".join(lines))
    bad = guard("verify", str(log))
    assert bad.returncode == 4 and "seq 2" in bad.stderr  # EXIT_DAMAGED


def test_rotated_log_of_a_real_run_verifies_across_files(tmp_cgroup, tmp_path, ws):
    log = tmp_path / "v.jsonl"
    with GuardRun(tmp_cgroup, log, ["sh", "-c", "ls /etc >/dev/null; cat /etc/hostname >/dev/null"],
                  mode="audit", workspace=ws, extra=("--log-all", "--log-max-mb", "0.002")) as run:
        assert run.wait() == 0, run.err
    rotated = sorted(tmp_path.glob("v.jsonl.*[0-9]"))
    assert len(rotated) >= 2
    ok = guard("verify", str(log))
    assert ok.returncode == 0 and "chain intact" in ok.stdout
    rotated[0].unlink()  # losing the oldest file is a deletion, and is reported
    assert guard("verify", str(log)).returncode == 4  # EXIT_DAMAGED


def test_halt_and_ask_together_resume_waits_for_the_answer(tmp_cgroup, tmp_path, ws, outside):
    """A HALT and an ASK at once: resume is refused while the ASK is unanswered; approving it
    does not thaw what the HALT holds; resuming then lets the agent run on."""
    marker, log, tool = tmp_path / "after", tmp_path / "v.jsonl", tmp_path / "publish"
    tool.write_text("#!/bin/sh\nexit 0\n")
    tool.chmod(0o755)
    policy = policy_extending(tmp_path, textwrap.dedent("""\
        rules:
          - name: ask-publish
            exec: {name: publish}
            verdict: ASK
        """))
    ready, go = tmp_path / "ready", tmp_path / "go"
    script = (f"touch {ready}; while [ ! -e {go} ]; do sleep 0.01; done; "
              f"echo x > {outside}/o; {tool}; echo done > {marker}")
    with GuardRun(tmp_cgroup, log, ["sh", "-c", script], policy=policy, workspace=ws) as run:
        cg = run.cgroup()
        wait_for(ready.exists, timeout=30)  # attached, and the guard's loop has let the agent run
        # Both triggers before the guard reacts to either, however fast or slow this host is: the
        # guard is stopped while the agent writes outside the workspace (HALT) and execs publish
        # (ASK), which the kernel alone holds at exec.
        run.proc.send_signal(signal.SIGSTOP)
        try:
            go.touch()
            wait_for(lambda: _held(cg, "publish"), timeout=10)
        finally:
            run.proc.send_signal(signal.SIGCONT)
        assert cgroups.wait_frozen(cg, scaled(20))  # HALT: write outside the workspace
        pending = _pending_for("ask-publish")  # and publish is held: ASK too
        # The freeze is shared: resuming now would let `publish` run unanswered. Refused.
        refused = guard("resume", "--cgroup", str(cg))
        assert refused.returncode == 3 and pending["id"] in refused.stderr
        assert cgroups.is_frozen(cg) and not marker.exists()
        assert guard("approve", pending["id"]).returncode == 0
        # Approving the ASK does not undo the HALT (given the time the guard would take to thaw).
        assert not eventually(lambda: not cgroups.is_frozen(cg) or marker.exists(), 0.2)
        assert guard("resume", "--cgroup", str(cg)).returncode == 0  # nothing pending now
        assert run.wait() == 120, run.err  # halted once, then ran to the end
    assert marker.read_text() == "done\n"


def _held(cg: Path, comm: str) -> bool:
    """Is a process of that name in the cgroup stopped (held at exec by the kernel)?"""
    for pid in cgroups.pids(cg):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            continue
        name, state = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2]
        if name == comm and state == "T":
            return True
    return False


def test_run_on_a_terminal_asks_inline(tmp_cgroup, tmp_path, ws):
    """`run` on a terminal prompts for an ASK itself: the key 'y' allows it once."""
    marker, log = tmp_path / "after", tmp_path / "v.jsonl"
    master, slave = os.openpty()

    def controlling_tty() -> None:  # the guard leads a session whose terminal is the pty
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    args = [*GUARD, "run", "--cgroup-parent", str(tmp_cgroup), "--log", str(log), "--quiet",
            "--policy", str(_ask_policy(tmp_path)), "--workspace", str(ws), "--", *_curl_agent(marker)]
    p = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, cwd=REPO, preexec_fn=controlling_tty)
    os.close(slave)
    screen = b""
    try:
        while b"ASK [" not in screen or b"y" not in screen.split(b"ASK [")[-1]:
            assert select.select([master], [], [], scaled(30))[0], f"no prompt: {screen[-2000:]!r}"
            screen += os.read(master, 65536)
        os.write(master, b"y")
        assert p.wait(timeout=scaled(30)) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        os.close(master)
    assert marker.read_text() == "curl=0\n"
    (rec,) = records(log, "approval")
    assert rec["via"] == "tty" and rec["decision"] == "allow"


def test_full_disk_loss_is_counted_told_once_and_carried(tmp_cgroup, tmp_path, ws):
    """Issue #7: the verdict log on a small tmpfs that fills up mid-run. Every record that could
    not be written is counted: the end-of-session summary says how many, the first record written
    once there is space again carries the count, verify and report show it; stderr tells the
    error once and counts the repeats instead of printing each."""
    import re

    logdir = tmp_path / "tiny"
    logdir.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(logdir)], check=True)
    try:
        go, again, log = tmp_path / "go", tmp_path / "again", logdir / "v.jsonl"
        code = f"""
            import os, time
            while not os.path.exists({str(go)!r}): time.sleep(0.001)
            for _ in range(300):
                open("/etc/hostname").read()
            while not os.path.exists({str(again)!r}): time.sleep(0.001)
            for _ in range(20):
                open("/etc/hostname").read()
        """
        with GuardRun(tmp_cgroup, log, agent(code), mode="audit", workspace=ws, extra=("--log-all",)) as run:
            cg = run.cgroup()
            wait_for(lambda: records(log, "session"), timeout=30)
            subprocess.run(["dd", "if=/dev/zero", f"of={logdir / 'filler'}", "bs=4k"], capture_output=True)
            go.touch()
            assert cgroups.wait_frozen(cg, scaled(20)), "agent not frozen after the log failed (fail-closed)"

            def lost_so_far() -> int:  # the head file counts them as they happen
                return orjson.loads((logdir / "v.jsonl.head").read_bytes()).get("unwritten", 0)

            # The guard is still deciding what the agent did before it froze: let it finish
            # (no new loss within one pause, of a length scaled with the guard's speed).
            counts, deadline = [-1], time.monotonic() + scaled(20)
            while counts[-1] <= 0 or counts[-1] != counts[-2]:
                assert time.monotonic() < deadline, counts
                time.sleep(scaled(0.5))
                counts.append(lost_so_far())
            (logdir / "filler").unlink()
            again.touch()
            assert guard("resume", "--cgroup", str(cg)).returncode == 0
            assert run.wait() == 120, run.err  # fail-closed froze it once
        everything = [orjson.loads(line) for line in log.read_bytes().splitlines()]
        carried = [r["unwritten_before"] for r in everything if "unwritten_before" in r]
        lost = sum(carried)
        assert lost > 0 and len(carried) == 1  # one episode: told by the first record after it
        end = everything[-1]
        assert end["type"] == "session" and end["event"] == "end"
        # Nothing is unaccounted for: every event decided is a verdict record, or counted lost.
        assert len(records(log)) + lost == end["events"]
        assert f"{lost} records could NOT be written to the verdict log" in run.err
        told = [line for line in run.err.splitlines() if "cannot write the verdict log" in line]
        repeats = sum(int(n) for n in re.findall(r"\(last message repeated (\d+) more times?\)", run.err))
        assert len(told) == 1 and "No space left on device" in told[0] and "fail-closed" in told[0]
        assert len(told) + repeats == lost, run.err
        v = guard("verify", str(log))
        assert v.returncode == 0 and f"{lost} records could NOT be written" in v.stdout
        r = guard("report", str(log))
        assert r.returncode == 0 and f"Lost:     {lost} records could NOT be written" in r.stdout
    finally:
        subprocess.run(["umount", "-l", str(logdir)], check=False)
