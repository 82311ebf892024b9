"""Issue #9: losses are decided, not only counted.

A lost event is a syscall nobody judged. The kernel counts what perf_submit could not write
(map `lost`), so the guard sees a loss on its next poll; in enforce mode a loss freezes the
agent unless the policy says `on_loss: ignore`. The floods here overrun a one-page buffer.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

from ebpf_guard.enforce import cgroups
from ebpf_guard.sensor import Sensor
from tests.conftest import requires_bpf
from tests.helpers import GuardRun, guard, policy_extending, records, scaled

pytestmark = requires_bpf
EXIT_HALTED = 120

# Opens /dev/null many times (a bulk-buffer flood), then writes a marker if it was let go on.
FLOOD = textwrap.dedent("""
    import os, sys, time
    for _ in range(30000):
        os.close(os.open("/dev/null", os.O_RDONLY))
    time.sleep(float(sys.argv[2]))
    open(sys.argv[1], "w").write("ran on")
""")


def test_a_loss_is_seen_on_the_first_poll_after_it(tmp_path: Path) -> None:
    go = tmp_path / "go"
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os, time
        while not os.path.exists({str(go)!r}): time.sleep(0.005)
        for _ in range(30000):
            os.close(os.open("/dev/null", os.O_RDONLY))
        open({str(go)!r} + ".done", "w")
        time.sleep(60)
    """)])
    sensor = Sensor(pids=[child.pid], page_cnt=1, wakeup_events=1 << 20)
    try:
        sensor.start()
        go.touch()
        deadline = scaled(60)
        t0 = time.monotonic()
        while not Path(f"{go}.done").exists():  # no poll meanwhile: the buffer overflows
            assert time.monotonic() - t0 < deadline, "the flood did not finish"
            time.sleep(0.01)
        sensor.poll(0)
        # One poll, no sample after the flood: the perf buffer's own lost record may not have
        # come yet, the kernel's counter has.
        assert sensor.stats.lost_bulk > 0, sensor.stats
    finally:
        child.kill()
        child.wait()
        sensor.close()


def test_enforce_mode_freezes_the_agent_on_loss(tmp_cgroup: Path, tmp_path: Path, ws: Path) -> None:
    marker, log = tmp_path / "ran-on", tmp_path / "v.jsonl"
    cmd = [sys.executable, "-c", FLOOD, str(marker), str(scaled(5))]
    with GuardRun(tmp_cgroup, log, cmd, mode="enforce", workspace=ws,
                  extra=("--buffer-pages", "1")) as run:
        cg = run.cgroup()
        assert cgroups.wait_frozen(cg, scaled(30)), f"{cg} was not frozen after a loss"
        assert not marker.exists()
        assert guard("kill", "--cgroup", str(cg)).returncode == 0
        assert run.wait() == EXIT_HALTED, run.err
    (loss, *_) = records(log, "loss")
    assert loss["lost"] > 0 and loss["action"].startswith("froze")
    assert not marker.exists()


def test_on_loss_ignore_lets_the_agent_run_and_logs_the_loss(tmp_cgroup: Path, tmp_path: Path,
                                                            ws: Path) -> None:
    marker, log = tmp_path / "ran-on", tmp_path / "v.jsonl"
    policy = policy_extending(tmp_path, "on_loss: ignore\n")
    cmd = [sys.executable, "-c", FLOOD, str(marker), "0"]
    with GuardRun(tmp_cgroup, log, cmd, policy=policy, mode="enforce", workspace=ws,
                  extra=("--buffer-pages", "1")) as run:
        assert run.wait() == 0, run.err
    assert marker.read_text() == "ran on"
    losses = records(log, "loss")
    assert losses and all(r["action"].startswith("none") for r in losses)
