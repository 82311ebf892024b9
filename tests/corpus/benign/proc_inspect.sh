#!/usr/bin/env bash
# Looking at the agent's own processes: ps, pgrep, a test helper reading its own and its child's
# /proc entries (environ, status, cmdline), as process-management tests and test runners do.
set -euo pipefail
WS=${1:?usage: proc_inspect.sh WORKSPACE}
cd "$WS"
export PATH="/usr/bin:/bin:$PATH"   # the distro python3, whatever version managers the host has
for t in ps pgrep python3; do command -v "$t" >/dev/null || { echo "corpus: $t is not installed" >&2; exit 3; }; done

ps aux >/dev/null
ps -o pid,ppid,comm -p $$ >/dev/null
sleep 30 &
sleeper=$!
pgrep -P $$ sleep >/dev/null
grep -qz '^HOME=' /proc/self/environ
grep -qz '^HOME=' "/proc/$sleeper/environ"        # our own child's environment
python3 - <<'PY'
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], env={**os.environ, "APP_MODE": "test"})
try:
    # Popen returns once the exec has begun; the kernel sets the new environment a moment later.
    for _ in range(200):
        environ = open(f"/proc/{child.pid}/environ", "rb").read()
        if environ:
            break
        time.sleep(0.01)
    assert b"APP_MODE=test" in environ
    open(f"/proc/{child.pid}/status").read()
    open(f"/proc/{child.pid}/cmdline", "rb").read()
    open(f"/proc/{os.getpid()}/environ", "rb").read()
finally:
    child.kill()
    child.wait()
PY
kill "$sleeper"
wait "$sleeper" 2>/dev/null || true
echo "CORPUS-OK proc-inspect"
