"""The ebpf-guard demo: a misbehaving agent under the default policy, first in audit mode
(see every verdict, nothing enforced), then in enforce mode (see what happens to it).

Run it through `sudo bash scripts/bootstrap.sh demo`. It plays the human operator: after each
HALT it checks that the agent is really frozen, then resumes it with `ebpf-guard resume`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import orjson

from ebpf_guard import cgroups

REPO = Path(__file__).resolve().parent.parent
GUARD = [sys.executable, "-m", "ebpf_guard.cli"]
AGENT = [sys.executable, str(REPO / "examples" / "agent.py")]


def banner(text: str) -> None:
    print(f"\n=== {text} " + "=" * max(0, 70 - len(text)), flush=True)


def make_workspace() -> Path:
    # Not under /tmp: the default policy treats /tmp as scratch (deleting there is harmless).
    ws = Path(tempfile.mkdtemp(prefix="ebpf-guard-demo-", dir="/var/lib"))
    (ws / "src").mkdir()
    (ws / "src" / "app.py").write_text("print('hello')\n")
    (ws / "README.md").write_text("# demo project\n")
    (ws / "keys").mkdir()
    (ws / "keys" / "id_rsa").write_text("-----BEGIN FAKE KEY (planted by the demo)-----\n")
    return ws


def reset_build(ws: Path) -> None:
    (ws / "build").mkdir(exist_ok=True)
    for i in range(5):
        (ws / "build" / f"artefact-{i}.o").write_text("x")


def operator(log: Path, parent: Path, stop: threading.Event) -> None:
    """Follow the verdict log; after each HALT show the agent is frozen, then resume it."""
    seen = 0
    while not stop.is_set():
        lines = log.read_bytes().splitlines() if log.exists() else []
        for raw in lines[seen:]:
            rec = orjson.loads(raw)
            if rec.get("type") == "verdict" and rec.get("verdict") == "HALT":
                children = [p for p in parent.iterdir() if p.is_dir()]
                if not children:
                    continue
                cg = children[0]
                cgroups.wait_frozen(cg, 5.0)
                print(f"[operator] HALT by rule {rec['rule']!r}: {cg.name} frozen={int(cgroups.is_frozen(cg))};"
                      " the agent makes no progress. Resuming in 1 s ...", flush=True)
                time.sleep(1.0)
                subprocess.run([*GUARD, "resume", "--cgroup", str(cg)], check=False)
        seen = len(lines)
        time.sleep(0.05)


def run_agent(ws: Path, log: Path, mode: str, parent: Path | None = None) -> int:
    cmd = [*GUARD, "run", "--workspace", str(ws), "--log", str(log), "--mode", mode, "--quiet"]
    if parent is not None:
        cmd += ["--cgroup-parent", str(parent)]
    return subprocess.run([*cmd, "--", *AGENT, str(ws)], check=False).returncode


def main() -> int:
    if os.geteuid() != 0:
        sys.exit("demo: run as root (sudo bash scripts/bootstrap.sh demo)")
    ws = make_workspace()
    logdir = Path(tempfile.mkdtemp(prefix="ebpf-guard-demo-log-"))
    parent = cgroups.create_cgroup(cgroups.find_v2_mount(), f"ebpf-guard-demo-{uuid.uuid4().hex[:6]}")
    try:
        banner("1. audit mode: every verdict, nothing enforced")
        reset_build(ws)
        rc = run_agent(ws, logdir / "audit.jsonl", "audit")
        print(f"[demo] audit run exit status {rc}: the agent ran to the end.", flush=True)

        banner("2. enforce mode: the same agent, stopped")
        reset_build(ws)
        log = logdir / "enforce.jsonl"
        stop = threading.Event()
        op = threading.Thread(target=operator, args=(log, parent, stop), daemon=True)
        op.start()
        rc = run_agent(ws, log, "enforce", parent)
        stop.set()
        op.join()
        print(f"[demo] enforce run exit status {rc} (120 = halted, 121 = killed by ebpf-guard)")

        banner("3. the evidence")
        subprocess.run([*GUARD, "verify", str(log)], check=False)
        subprocess.run([*GUARD, "report", str(log)], check=False)
        print(f"\n[demo] logs and incidents kept in {logdir}")
        return 0 if rc == 121 else 1
    finally:
        cgroups.remove_cgroup(parent)
        shutil.rmtree(ws, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
