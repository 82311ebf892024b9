"""`ebpf-guard run`, `watch`, `doctor` and the one-line errors, driven as a user would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from ebpf_guard import cgroups
from tests.conftest import requires_bpf, requires_root
from tests.helpers import GUARD, guard, wait_for

AUDIT = ["--mode", "audit"]


def _run(tmp_path: Path, *cmd: str, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return guard("run", *AUDIT, "--log", str(tmp_path / "v.jsonl"), "--json", *extra, "--", *cmd)


@requires_bpf
def test_run_exits_with_child_status_and_removes_its_cgroup(tmp_cgroup: Path, tmp_path: Path):
    r = _run(tmp_path, "sh", "-c", "exit 7", extra=("--cgroup-parent", str(tmp_cgroup)))
    assert r.returncode == 7, r.stderr
    assert list(p for p in tmp_cgroup.iterdir() if p.is_dir()) == []


@requires_bpf
def test_run_child_killed_by_signal_and_no_cgroup_left(tmp_cgroup: Path, tmp_path: Path):
    r = _run(tmp_path, "sh", "-c", "kill -TERM $$", extra=("--cgroup-parent", str(tmp_cgroup)))
    assert r.returncode == 128 + signal.SIGTERM, r.stderr
    assert [p for p in tmp_cgroup.iterdir() if p.is_dir()] == []


@requires_bpf
def test_run_streams_events_of_the_whole_tree_as_json(tmp_path: Path):
    r = _run(tmp_path, "sh", "-c", "cat /etc/hostname >/dev/null; (sleep 0.2; /bin/true) & wait")
    assert r.returncode == 0, r.stderr
    events = [orjson.loads(line)["event"] for line in r.stdout.splitlines()]
    execs = [e for e in events if e["kind"] == "exec"]
    assert [e["argv"][0] for e in execs][:1] == ["sh"]
    assert any(e["path"] == "/bin/true" or e["path"].endswith("/true") for e in execs)
    assert any(e["kind"] == "open" and e["path"] == "/etc/hostname" for e in events)
    # The child joined the watched cgroup before exec: its very first event is its exec.
    assert events[0]["kind"] == "exec" and events[0]["argv"][0] == "sh"


@requires_bpf
def test_run_waits_for_daemonised_grandchildren(tmp_path: Path):
    marker = tmp_path / "grandchild-done"
    script = f"setsid sh -c 'sleep 0.5; cat /etc/hostname >/dev/null; touch {marker}' </dev/null >/dev/null 2>&1 &"
    t0 = time.monotonic()
    r = _run(tmp_path, "sh", "-c", script)
    assert r.returncode == 0, r.stderr
    assert marker.exists(), "run returned before the daemonised grandchild finished"
    assert time.monotonic() - t0 >= 0.5
    events = [orjson.loads(line)["event"] for line in r.stdout.splitlines()]
    assert any(e["kind"] == "open" and e["path"] == str(marker) for e in events)


@requires_bpf
def test_run_interrupted_kills_tree_and_removes_cgroup(tmp_cgroup: Path, tmp_path: Path):
    p = subprocess.Popen([*GUARD, "run", *AUDIT, "--log", str(tmp_path / "v.jsonl"),
                          "--cgroup-parent", str(tmp_cgroup), "--", "sleep", "60"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        child = wait_for(lambda: [c for c in tmp_cgroup.iterdir() if c.is_dir()
                                  and cgroups.pids(c)], timeout=20)[0]
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=20) != 0
        assert not child.exists()
    finally:
        if p.poll() is None:
            p.kill()


def _watch(args: list[str], tmp_path: Path, go: Path) -> tuple[int, list[dict], str]:
    """Run `watch ARGS`, start the workload (touch `go`) once attached; (status, events, stderr)."""
    p = subprocess.Popen([*GUARD, "watch", *args, *AUDIT, "--log", str(tmp_path / "v.jsonl"),
                          "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err = []
    try:
        for line in p.stderr:
            err.append(line)
            if "attached in" in line:
                go.touch()
                break
        out, rest = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    events = [orjson.loads(line)["event"] for line in out.splitlines()]
    return p.returncode, events, "".join(err) + rest


def _after(go: Path, cmd: str) -> list[str]:
    return ["sh", "-c", f"while [ ! -e {go} ]; do sleep 0.01; done; {cmd}"]


@requires_bpf
def test_watch_cgroup_until_empty(tmp_cgroup: Path, tmp_path: Path):
    go = tmp_path / "go"
    worker = subprocess.Popen(_after(go, "cat /etc/hostname >/dev/null"),
                              preexec_fn=lambda: cgroups.move_pid(tmp_cgroup, os.getpid()))
    try:
        # The cgroup as /proc/PID/cgroup prints it, relative to the v2 root.
        rel = "/" + str(tmp_cgroup.relative_to(cgroups.find_v2_mount()))
        rc, events, err = _watch(["--cgroup", rel], tmp_path, go)
        assert rc == 0, err
        assert any(e["kind"] == "open" and e["path"] == "/etc/hostname" for e in events)
        assert "is empty" in err
    finally:
        worker.kill()
        worker.wait()


def _freezer_dirs() -> set[Path]:
    root = cgroups.find_v1_mount("freezer")
    return set(root.glob("ebpf-guard-*")) if root else set()


@requires_bpf
def test_watch_pid_follows_descendants_until_gone(tmp_path: Path):
    go = tmp_path / "go"
    before = _freezer_dirs()
    worker = subprocess.Popen(_after(go, "sh -c 'cat /etc/hostname >/dev/null'"))
    try:
        rc, events, err = _watch(["--pid", str(worker.pid)], tmp_path, go)
        assert rc == 0, err
        opens = [e for e in events if e["kind"] == "open" and e["path"] == "/etc/hostname"]
        assert opens and opens[0]["tgid"] != worker.pid  # a descendant's open was followed
        assert "are gone" in err
        assert _freezer_dirs() == before  # the freezer it set up for --pid is gone too
    finally:
        worker.kill()
        worker.wait()


def test_human_output_is_aligned_lines(tmp_path: Path):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    r = _run(tmp_path, "true")
    assert r.returncode == 0
    human = guard("run", *AUDIT, "--log", str(tmp_path / "h.jsonl"), "--", "true")
    lines = human.stdout.splitlines()
    assert lines[0].split()[:4] == ["TIME(s)", "VERDICT", "PID", "PPID"]
    assert any(" exec " in line and "/true" in line for line in lines[1:])


# ------------------------------------------------------------------ doctor and clear errors
@requires_root
def test_doctor_passes_here_and_names_each_check():
    r = guard("doctor")
    assert r.returncode == 0, r.stdout
    names = [line.split()[1] for line in r.stdout.splitlines()[:-1]]
    assert names == ["root", "kernel", "btf", "tracefs", "headers", "cgroup-v2", "bcc", "bpf-load"]
    assert "fallback" in r.stdout or "matching" in r.stdout


@requires_root
def test_doctor_as_non_root_fails_with_fix():
    r = guard("doctor", nobody=True)
    assert r.returncode == 1
    assert "FAIL  root" in r.stdout and "fix: run with sudo" in r.stdout


@requires_root
def test_not_root_is_one_clear_line():
    r = guard("watch", "--pid", "1", nobody=True)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "ebpf-guard: error: ebpf-guard needs root to load BPF programs (try: sudo ebpf-guard ...)"]


@requires_root
def test_missing_cgroup_is_one_clear_line():
    r = guard("watch", "--cgroup", "/no/such/cgroup-xyz")
    assert r.returncode == 1
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("ebpf-guard: error:") and "/no/such/cgroup-xyz" in line and "does not exist" in line


@requires_root
def test_missing_pid_is_one_clear_line():
    r = guard("watch", "--pid", "4194303")
    assert r.returncode == 1
    assert r.stderr.strip() == "ebpf-guard: error: no process with PID 4194303"


@requires_root
def test_bcc_missing_names_the_install_command():
    # Make `import bcc` fail in a real interpreter, the way a host without python3-bpfcc does.
    code = "import sys; sys.modules['bcc'] = None; from ebpf_guard.cli import main; main()"
    r = subprocess.run([sys.executable, "-c", code, "watch", "--pid", "1"], capture_output=True,
                       text=True)
    assert r.returncode == 1
    (line,) = r.stderr.strip().splitlines()
    assert "bcc is not importable" in line and "apt-get install python3-bpfcc" in line


@requires_bpf
def test_watch_interrupted_leaves_the_watched_process_as_it_was(tmp_path: Path):
    before = _freezer_dirs()
    sleeper = subprocess.Popen(["sleep", "60"])
    p = subprocess.Popen([*GUARD, "watch", "--pid", str(sleeper.pid), *AUDIT, "--log", str(tmp_path / "v.jsonl")],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for line in p.stderr:
            if "attached in" in line:
                break
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=30) == 0, p.stderr.read()
        assert sleeper.poll() is None, "watch killed the process it watched"
        freezer_line = [x for x in Path(f"/proc/{sleeper.pid}/cgroup").read_text().splitlines() if ":freezer:" in x]
        assert freezer_line in ([], [f"{freezer_line[0].split(':')[0]}:freezer:/"])
        assert _freezer_dirs() == before
    finally:
        for proc in (p, sleeper):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
