"""Issue #11 item 1: the benign corpus. A coding agent's normal day, run under the bundled default policy.

Each script in tests/corpus/benign/ does one ordinary activity (git, make, venv + pip, npm, a C
build, editor saves, a local test server) with the real tools, offline, in the workspace it is
given. Under `ebpf-guard run` in enforce mode it must end with exit 0, the verdict log must hold
a session start and end, no verdict may be HALT, KILL or ASK, and no prevention layer may have
refused one of its syscalls (a "prevented" record). The script's own last line, `CORPUS-OK <what>`,
shows it really did its work (and was not quietly refused half way).

The agent runs as root with root's HOME, as `sudo ebpf-guard run -- agent` starts it: the
policy's {home} is the home of the event's uid, so $HOME and {home} name the same directory,
and the tools' caches ($HOME/.npm, $HOME/.cache/pip) land where the policy expects them (npm
leaves its cache entry for the corpus's tiny tarball and a debug log in root's ~/.npm).
The workspace is not under /tmp: the default policy treats /tmp as scratch, which would hide
false positives (the `ws` fixture puts it under /var/lib).
"""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import requires_bpf
from tests.helpers import GUARD, REPO, children_of, guard, records, scaled

BENIGN = Path(__file__).resolve().parent / "corpus" / "benign"
SCRIPTS = sorted(BENIGN.glob("*.sh"))
STOPPING = frozenset({"HALT", "KILL", "ASK"})  # FLAGs are allowed; five of them escalate to a HALT
OK_PREFIX = "CORPUS-OK "
EXIT_MISSING_TOOL = 3  # a script's exit status when a tool it needs is not installed here


def agent_env() -> dict[str, str]:
    """The environment the scripts run in: the caller's, with root's HOME (see the module doc),
    bytecode writing on as on a developer's machine, and the interpreter the pytest entry may
    fall back to when Debian's python3-pytest is not installed."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["HOME"] = pwd.getpwuid(os.geteuid()).pw_dir
    env["CORPUS_PYTHON"] = sys.executable
    return env


def describe(record: dict) -> str:
    """One offending record as a line: verdict (or the refusing layer), rule, kind, what, who."""
    if record.get("type") == "prevented":
        return (f"REFUSED({record.get('layer')}) {record.get('rule')} {record.get('access')} {record.get('path')} "
                f"pid={record.get('pid')}")
    event = record.get("event") or {}
    what = event.get("path") or event.get("argv") or event.get("dest") or event.get("addr") or ""
    if isinstance(what, list):
        what = " ".join(map(str, what))
    return (f"{record.get('verdict')} {record.get('rule')} {event.get('kind')} {what!s:.200} "
            f"comm={event.get('comm')} exe={event.get('exe')}")


def summarize(offending: list[dict], per_group: int = 3) -> str:
    """The offending records, grouped by everything but the path: a `ps` reading 200 environ files
    is one group with its first few paths, not 200 lines."""
    groups: dict[str, list[str]] = {}
    for record in offending:
        line = describe(record)
        event = record.get("event") or {}
        key = line.replace(str(record.get("path") or event.get("path") or ""), "<path>")
        groups.setdefault(key, []).append(line)
    out = []
    for lines in groups.values():
        out += lines[:per_group]
        if len(lines) > per_group:
            out.append(f"  ... and {len(lines) - per_group} more like it")
    return "\n".join(out)


@dataclass
class CorpusRun:
    """One corpus script's run under `ebpf-guard run`: its exit status, output and verdict log."""

    script: Path
    returncode: int
    out: str
    err: str
    log: Path
    stopped: bool  # the test ended the run itself, at a stopping verdict

    def verdicts(self) -> list[dict]:
        return records(self.log)

    def offending(self) -> list[dict]:
        """Stopping verdicts, and refusals by a prevention layer (a gate that refuses a benign open
        breaks the tool just the same, even when no verdict record follows)."""
        verdicts = [r for r in self.verdicts() if r.get("verdict") in STOPPING]
        return verdicts + records(self.log, "prevented")

    def session_events(self) -> list[str]:
        return [r.get("event") for r in records(self.log, "session")]

    def ok_line(self) -> str | None:
        lines = [line for line in self.out.splitlines() if line.startswith(OK_PREFIX)]
        return lines[-1] if lines else None


def _stop_at_first_offence(proc: subprocess.Popen, parent: Path, log: Path, timeout: float) -> bool:
    """Wait for the guard to end. A HALT freezes the agent and an ASK waits for an answer: either
    would hold the run until its timeout, so at the first stopping verdict the agent is killed
    (after a moment, so the records that follow it land too). True if that happened."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if any(r.get("verdict") in STOPPING for r in records(log)) or time.monotonic() > deadline:
            time.sleep(scaled(1))
            for child in children_of(parent):
                guard("kill", "--cgroup", str(child))
            return True
        time.sleep(0.2)
    return False


def run_script(script: Path, ws: Path, parent: Path, log: Path, *, mode: str | None = None,
               policy: Path | None = None, timeout: float = 180) -> CorpusRun:
    """`ebpf-guard run --workspace WS -- bash SCRIPT WS` with the bundled default policy (or `policy`), in
    `ws`. Output goes to files beside the log (a pipe could fill and block the guard while we poll)."""
    args = [*GUARD, "run", "--cgroup-parent", str(parent), "--workspace", str(ws), "--log", str(log), "--quiet"]
    if mode is not None:
        args += ["--mode", mode]
    if policy is not None:
        args += ["--policy", str(policy)]
    out_path, err_path = log.with_suffix(".out"), log.with_suffix(".err")
    with out_path.open("w") as out, err_path.open("w") as err:
        proc = subprocess.Popen([*args, "--", "env", "-C", str(ws), "bash", str(script), str(ws)],
                                stdout=out, stderr=err, cwd=REPO, env=agent_env())
        try:
            # In audit mode nothing is frozen or killed: let the script finish, every verdict logged.
            stopped = False if mode == "audit" else _stop_at_first_offence(proc, parent, log, scaled(timeout))
            proc.wait(timeout=scaled(timeout) if mode == "audit" else scaled(30))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return CorpusRun(script, proc.returncode, out_path.read_text(), err_path.read_text(), log, stopped)


def test_every_script_is_a_self_contained_entry():
    """The checks `run_script` relies on: strict bash, the workspace argument, the OK line."""
    assert len(SCRIPTS) >= 10, SCRIPTS
    for script in SCRIPTS:
        text = script.read_text()
        assert text.startswith("#!/usr/bin/env bash\n"), script.name
        assert "set -euo pipefail" in text, script.name
        assert 'WS=${1:?' in text and 'cd "$WS"' in text, script.name
        assert OK_PREFIX.strip() in text, script.name


@requires_bpf
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_benign_activity_runs_clean(script: Path, tmp_cgroup: Path, tmp_path: Path, ws: Path):
    result = run_script(script, ws, tmp_cgroup, tmp_path / "verdicts.jsonl")
    missing = [line for line in result.err.splitlines() if line.startswith("corpus: ")]
    if result.returncode == EXIT_MISSING_TOOL and missing:
        pytest.skip(missing[-1])
    offending = result.offending()
    assert not offending, (f"{script.name}: {len(offending)} stopping verdict(s) under the default policy:\n"
                           + summarize(offending))
    assert not result.stopped, f"{script.name}: did not finish in time\n{result.err[-2000:]}"
    assert result.returncode == 0, (f"{script.name}: exit {result.returncode}\n"
                                    f"stdout: {result.out[-1500:]}\nstderr: {result.err[-1500:]}")
    events = result.session_events()
    assert "start" in events and "end" in events, events
    assert result.ok_line(), f"{script.name}: no {OK_PREFIX!r} line: it did not finish its work\n{result.out[-1500:]}"
