"""The ebpf-guard demo: a misbehaving agent under the default policy, first in audit mode
(see every verdict, nothing enforced), then in enforce mode (see what happens to it).

Run it through `sudo bash scripts/bootstrap.sh demo`. It plays the human operator: after each
HALT it checks that the agent is really frozen, then resumes it with `ebpf-guard resume`.

Every sentence of its summary comes from what happened: the guard's exit status, the records of
the verdict log (did the session start and end, which rules fired, what was done) and the
agent's own "[agent] step N" lines. If the guard never attached, or anything in the setup fails,
it says so and exits 1.

    demo.py [--policy FILE]   # FILE is passed to `ebpf-guard run` (default: the guard's own)
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from ebpf_guard.enforce import cgroups

REPO = Path(__file__).resolve().parent.parent
GUARD = [sys.executable, "-m", "ebpf_guard.cli"]
AGENT = [sys.executable, str(REPO / "examples" / "agent.py")]
LAST_STEP = 6  # examples/agent.py's last step
STEP = re.compile(r"^\[agent\] step (\d+):")
EXIT_HALTED, EXIT_KILLED = 120, 121  # `ebpf-guard run` (README, "Exit status")


class DemoError(Exception):
    """The demo cannot show what it is meant to show; one line for the user."""


def banner(text: str) -> None:
    print(f"\n=== {text} " + "=" * max(0, 70 - len(text)), flush=True)


def say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def make_workspace() -> Path:
    # Not under /tmp: the default policy treats /tmp as scratch (deleting there is harmless).
    ws = Path(tempfile.mkdtemp(prefix="ebpf-guard-demo-", dir="/var/lib"))
    (ws / "src").mkdir()
    (ws / "src" / "app.py").write_text("print('hello')\n")
    (ws / "README.md").write_text("# demo project\n")
    (ws / "keys").mkdir()
    (ws / "keys" / "id_rsa").write_text("-----BEGIN FAKE KEY (planted by the demo)-----\n")
    return ws


def data_dir(ws: Path) -> Path:
    """The user's files beside the workspace: deleting inside the workspace is work, not these."""
    return ws.with_name(ws.name + "-data")


def reset_build(ws: Path) -> None:
    data_dir(ws).mkdir(exist_ok=True)
    for i in range(5):
        (data_dir(ws) / f"report-{i}.txt").write_text("x")


def read_log(log: Path) -> list[dict]:
    if not log.exists():
        return []
    return [orjson.loads(line) for line in log.read_bytes().splitlines() if line.strip()]


def operator(log: Path, parent: Path, stop: threading.Event, resumed: list[str]) -> None:
    """Follow the verdict log; after each HALT show the agent is frozen, then resume it."""
    seen = 0
    while not stop.is_set():
        records = read_log(log)
        for rec in records[seen:]:
            if rec.get("type") == "verdict" and rec.get("verdict") == "HALT":
                children = [p for p in parent.iterdir() if p.is_dir()]
                if not children:
                    continue
                cg = children[0]
                try:
                    frozen = cgroups.wait_frozen(cg, 5.0)
                except (OSError, cgroups.CgroupError):
                    # The agent was killed meanwhile (a KILL right after the HALT) and its
                    # cgroup removed: nothing left to look at or resume.
                    resumed.append(f"{rec['rule']}: not checked, the agent's cgroup was already gone")
                    continue
                print(f"[operator] HALT by rule {rec['rule']!r}: {cg.name} frozen={int(frozen)}"
                      + ("; the agent makes no progress. Resuming in 1 s ..." if frozen
                         else ": NOT frozen within 5 s. Resuming anyway ..."), flush=True)
                time.sleep(1.0)
                r = subprocess.run([*GUARD, "resume", "--cgroup", str(cg)], check=False)
                resumed.append(f"{rec['rule']}: frozen={int(frozen)}, resume exit {r.returncode}")
        seen = len(records)
        time.sleep(0.05)


@dataclass
class Outcome:
    """What one guarded run of the agent did, as the guard, its log and the agent tell it."""

    status: int  # the guard's exit status
    records: list[dict]
    last_step: int = 0  # the highest "[agent] step N" line the agent printed
    said: list[str] = field(default_factory=list)  # the guard's own lines (not the agent's)

    def session(self, event: str) -> dict | None:
        return next((r for r in self.records if r.get("type") == "session" and r.get("event") == event), None)

    def of_type(self, type_: str) -> list[dict]:
        return [r for r in self.records if r.get("type") == type_]

    def counts(self) -> str:
        c = Counter(r.get("verdict") for r in self.of_type("verdict"))
        return ", ".join(f"{n} {v}" for v, n in sorted(c.items())) or "none"


def run_agent(ws: Path, log: Path, mode: str, policy: Path | None, parent: Path | None = None) -> Outcome:
    """`ebpf-guard run` the agent; its output (and the agent's) is shown as it comes and kept."""
    cmd = [*GUARD, "run", "--workspace", str(ws), "--log", str(log), "--mode", mode, "--quiet"]
    if policy is not None:
        cmd += ["--policy", str(policy)]
    if parent is not None:
        cmd += ["--cgroup-parent", str(parent)]
    proc = subprocess.Popen([*cmd, "--", *AGENT, str(ws), str(data_dir(ws))], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace")
    last_step, said = 0, []
    assert proc.stdout is not None
    for line in proc.stdout:
        print(line, end="", flush=True)
        if m := STEP.match(line):
            last_step = max(last_step, int(m.group(1)))
        elif line.strip():
            said.append(line.strip())
    status = proc.wait()
    return Outcome(status, read_log(log), last_step, said)


def require_session(name: str, out: Outcome) -> None:
    """The guard attached (start record) and finished (end record), or the demo stops here."""
    if out.session("start") is None:
        why = out.said[-1] if out.said else "it printed nothing"
        raise DemoError(f"{name}: ebpf-guard never started watching (exit {out.status}; {why}): "
                        "the agent did not run under the guard")
    if out.session("end") is None:
        raise DemoError(f"{name}: ebpf-guard started but wrote no end record (exit {out.status}): "
                        "its verdicts may be incomplete")


def agent_progress(out: Outcome) -> str:
    if out.last_step == 0:
        return "the agent printed no step"
    if out.last_step == LAST_STEP:
        return f"the agent reached its last step ({LAST_STEP})"
    return f"the agent stopped after step {out.last_step} of {LAST_STEP}"


def summarize_audit(out: Outcome) -> None:
    require_session("audit run", out)
    say(f"audit run: ebpf-guard exit status {out.status}; verdicts logged: {out.counts()}; "
        f"{agent_progress(out)}.")
    for r in out.of_type("outcome"):  # audit mode must not act: say so if it did
        say(f"  acted on in audit mode: {r.get('verdict')} {r.get('rule')}: {r.get('action')}")


def summarize_enforce(out: Outcome, resumed: list[str]) -> None:
    require_session("enforce run", out)
    outcomes = out.of_type("outcome")
    say(f"enforce run: ebpf-guard exit status {out.status}; verdicts logged: {out.counts()}; "
        f"{agent_progress(out)}.")
    for r in outcomes:
        say(f"  {r.get('verdict')} {r.get('rule')}: {r.get('action')}")
    for line in resumed:
        say(f"  operator after HALT {line}")
    killed = [r for r in outcomes if r.get("verdict") == "KILL"]
    if out.status == EXIT_KILLED and killed:
        say(f"  exit {EXIT_KILLED}: the agent was killed by ebpf-guard (rule {killed[-1].get('rule')}).")
    elif out.status == EXIT_HALTED:
        say(f"  exit {EXIT_HALTED}: ebpf-guard halted the agent.")
    else:
        say(f"  exit {out.status}: ebpf-guard did not kill the agent.")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", type=Path, default=None, help="policy for `ebpf-guard run`")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("demo: run as root (sudo bash scripts/bootstrap.sh demo)", file=sys.stderr)
        return 1
    ws: Path | None = None
    parent: Path | None = None
    logdir: Path | None = None
    try:
        ws = make_workspace()
        logdir = Path(tempfile.mkdtemp(prefix="ebpf-guard-demo-log-"))
        parent = cgroups.create_cgroup(cgroups.find_v2_mount(), f"ebpf-guard-demo-{uuid.uuid4().hex[:6]}")

        banner("1. audit mode: every verdict, nothing enforced")
        reset_build(ws)
        summarize_audit(run_agent(ws, logdir / "audit.jsonl", "audit", args.policy))

        banner("2. enforce mode: the same agent, stopped")
        reset_build(ws)
        log = logdir / "enforce.jsonl"
        stop, resumed = threading.Event(), []
        op = threading.Thread(target=operator, args=(log, parent, stop, resumed), daemon=True)
        op.start()
        try:
            out = run_agent(ws, log, "enforce", args.policy, parent)
        finally:
            stop.set()
            op.join()
        summarize_enforce(out, resumed)

        banner("3. the evidence")
        verify = subprocess.run([*GUARD, "verify", str(log)], check=False)
        subprocess.run([*GUARD, "report", str(log)], check=False)
        say(f"logs and incidents kept in {logdir}")
        if verify.returncode != 0:
            raise DemoError(f"`ebpf-guard verify` exited {verify.returncode}: the verdict log is not intact")
        return 0 if out.status == EXIT_KILLED else 1
    except (DemoError, OSError, cgroups.CgroupError) as e:
        say(f"FAILED: {e}")
        if logdir is not None and not any(logdir.iterdir()):
            logdir.rmdir()  # nothing was logged: leave nothing behind
        return 1
    finally:
        if parent is not None:
            cgroups.remove_cgroup(parent)
        if ws is not None:
            shutil.rmtree(ws, ignore_errors=True)
            shutil.rmtree(data_dir(ws), ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
