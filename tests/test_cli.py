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

from ebpf_guard.enforce import cgroups
from tests.conftest import requires_bpf, requires_root
from tests.helpers import GUARD, guard, records, scaled, wait_for

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
                          "--cgroup-parent", str(tmp_cgroup), "--", "sleep", str(scaled(60))],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        child = wait_for(lambda: [c for c in tmp_cgroup.iterdir() if c.is_dir()
                                  and cgroups.pids(c)], timeout=20)[0]
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=scaled(20)) != 0
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
        out, rest = p.communicate(timeout=scaled(60))
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


def _v2_cgroup_of(pid: int) -> list[str]:
    return [x for x in Path(f"/proc/{pid}/cgroup").read_text().splitlines() if x.startswith("0::")]


def _freezer_left(log: Path) -> bool:
    """Is the freezer the session set up still there? A v1 freezer cgroup (hybrid) or a v2 cgroup
    of its own (pure v2) for `watch --pid`: either way the session's start record names it."""
    (start,) = [r for r in records(log, "session") if r["event"] == "start"]
    return start["freezer"] is not None and Path(start["freezer"]).exists()


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
        assert not _freezer_left(tmp_path / "v.jsonl")
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
    lines = r.stdout.splitlines()
    explained = next(i for i, line in enumerate(lines) if line.startswith("enforcement of "))
    names = [line.split()[1] for line in lines[:explained]]
    assert names == ["root", "kernel", "btf", "tracefs", "headers", "cgroup-v2", "bcc", "sensor",
                     "bpf-lsm", "kprobes", "fentry", "fanotify", "landlock", "cgroup-bpf"]
    # Then, per rule of the bundled policy, what enforces it here and whether that prevents.
    assert any(line.startswith("  exfil-tool (exec, HALT): watch prevents") for line in lines[explained:])
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
    sleeper = subprocess.Popen(["sleep", str(scaled(300))])  # outlives the watch's setup on any host
    v2_cgroup = _v2_cgroup_of(sleeper.pid)
    p = subprocess.Popen([*GUARD, "watch", "--pid", str(sleeper.pid), *AUDIT, "--log", str(tmp_path / "v.jsonl")],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for line in p.stderr:
            if "attached in" in line:
                break
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=scaled(30)) == 122, p.stderr.read()  # EXIT_INTERRUPTED
        assert sleeper.poll() is None, "watch killed the process it watched"
        # Back in the freezer root where a v1 freezer exists; pure-v2 hosts have no such line.
        freezer_lines = [x for x in Path(f"/proc/{sleeper.pid}/cgroup").read_text().splitlines() if ":freezer:" in x]
        assert all(x.endswith(":freezer:/") for x in freezer_lines), freezer_lines
        # And in its own v2 cgroup again (pure v2 moves the tree into one of ebpf-guard's).
        assert _v2_cgroup_of(sleeper.pid) == v2_cgroup
        assert _freezer_dirs() == before and not _freezer_left(tmp_path / "v.jsonl")
    finally:
        for proc in (p, sleeper):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# ------------------------------------------- issue #7: evidence commands, one line and a status
EXIT_ERROR, EXIT_USAGE, EXIT_DAMAGED = 1, 2, 4


def _one_error_line(r: subprocess.CompletedProcess) -> str:
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("ebpf-guard: error: ") and "Traceback" not in r.stderr, r.stderr
    return line


def _log(tmp_path: Path, n: int = 3) -> Path:
    from ebpf_guard.auditlog import VerdictLog

    path = tmp_path / "v.jsonl"
    with VerdictLog(path) as vl:
        for i in range(n):
            vl.append({"type": "test", "n": i})
    return path


def test_verify_and_report_exit_damaged_on_garbage_directory_and_broken_chain(tmp_path: Path):
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("this is not a verdict log\n")
    broken = _log(tmp_path)
    broken.write_bytes(broken.read_bytes().replace(b'"n":1', b'"n":7'))
    for log in (garbage, tmp_path, broken):
        v = guard("verify", str(log))
        assert v.returncode == EXIT_DAMAGED, (log, v.stderr)
        _one_error_line(v)
        r = guard("report", str(log))
        assert r.returncode == EXIT_DAMAGED, (log, r.stderr)
        _one_error_line(r)
    assert "is a directory" in guard("verify", str(tmp_path)).stderr
    r = guard("report", str(broken))  # the report is still printed, and says the chain is broken
    assert "Chain:    BROKEN: v.jsonl:2: seq 2: record does not match its hash" in r.stdout
    assert "Timeline" in r.stdout and "seq 2" in r.stderr
    (tmp_path / "ok").mkdir()
    ok = guard("verify", str(_log(tmp_path / "ok")))
    assert ok.returncode == 0 and "chain intact" in ok.stdout


def test_verify_and_report_of_a_missing_log_exit_error(tmp_path: Path):
    for cmd in ("verify", "report"):
        r = guard(cmd, str(tmp_path / "none.jsonl"))
        assert r.returncode == EXIT_ERROR
        assert "no such log" in _one_error_line(r)


@requires_root
def test_verify_and_report_as_non_root_say_run_as_root(tmp_path: Path):
    root_only = tmp_path / "logs"
    root_only.mkdir(mode=0o700)
    log = _log(root_only)
    os.chmod(tmp_path, 0o755)
    # Plain uid 65534, no capabilities (as_nobody keeps CAP_DAC_READ_SEARCH, which reads anything).
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *GUARD]
    if subprocess.run([*nobody, "--help"], capture_output=True).returncode != 0:
        pytest.skip("the checkout is not readable by uid 65534")
    for cmd in ("verify", "report"):
        r = subprocess.run([*nobody, cmd, str(log)], capture_output=True, text=True, timeout=scaled(60))
        assert r.returncode == EXIT_ERROR, r.stderr
        line = _one_error_line(r)
        assert "Permission denied" in line and "(run as root)" in line and str(log) in line


def test_report_out_into_a_missing_directory_is_one_line(tmp_path: Path):
    r = guard("report", "--out", str(tmp_path / "no" / "such" / "r.html"), str(_log(tmp_path)))
    assert r.returncode == EXIT_ERROR
    assert "cannot write" in _one_error_line(r) and "No such file or directory" in r.stderr


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1", "0", "x"])
def test_bad_numbers_are_usage_errors(tmp_path: Path, value: str):
    r = guard("report", "--last-hours", value, str(_log(tmp_path)))
    assert r.returncode == EXIT_USAGE and "--last-hours" in r.stderr and "Traceback" not in r.stderr
    # Parsed before anything else happens (no root, no BPF needed to be refused).
    r = guard("run", "--log-max-mb", value, "--", "true")
    assert r.returncode == EXIT_USAGE and "--log-max-mb" in r.stderr and "Traceback" not in r.stderr


def test_report_huge_window_shows_everything(tmp_path: Path):
    r = guard("report", "--last-hours", "1e300", str(_log(tmp_path)))
    assert r.returncode == 0 and "Records:  3" in r.stdout, r.stderr


@requires_root
@pytest.mark.parametrize("option", ["--output", "--record"])
@pytest.mark.parametrize("where", ["/proc/ebpf-guard-test/x", "{tmp}/no/such/dir/f"])
def test_unwritable_output_or_record_is_one_line_before_attaching(tmp_cgroup: Path, tmp_path: Path,
                                                                  option: str, where: str):
    marker = tmp_path / "ran"
    r = guard("run", "--cgroup-parent", str(tmp_cgroup), *AUDIT, "--log", str(tmp_path / "v.jsonl"),
              option, where.format(tmp=tmp_path), "--", "touch", str(marker))
    assert r.returncode == EXIT_ERROR
    line = _one_error_line(r)
    assert f"cannot write {option}" in line and where.format(tmp=tmp_path) in line
    assert "attached" not in r.stderr and not marker.exists()
    assert [p for p in tmp_cgroup.iterdir() if p.is_dir()] == []  # its cgroup is gone again


def _recording(tmp_path: Path, n: int) -> Path:
    from ebpf_guard.events import Event, Kind
    from ebpf_guard.paths import DEFAULT_POLICY
    from ebpf_guard.recording import Recorder
    from ebpf_guard.redact import Redactor

    path = tmp_path / "s.rec"
    rec = Recorder(path, policy=Path(DEFAULT_POLICY), workspace=str(tmp_path), mode="audit",
                   redactor=Redactor())
    for i in range(n):
        rec.write(Event(kind=Kind.EXEC, ts_ns=1000 + i, pid=100 + i, tgid=100 + i, ppid=1, uid=0,
                        comm="sh", cgroup_id=1, start_ns=i, raw_path="curl", path="/usr/bin/curl",
                        argv=("curl", f"http://example.invalid/{i}")), "/root")
    rec.close()
    return path


def test_replay_of_a_torn_recording_replays_what_precedes_the_tear(tmp_path: Path):
    path = _recording(tmp_path, 6)
    whole = guard("replay", str(path))
    assert whole.returncode == 0 and "replayed 6 events" in whole.stdout, whole.stderr
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-1]) + lines[-1][:40])  # the disk filled mid-line
    torn = guard("replay", str(path))
    assert torn.returncode == EXIT_DAMAGED, torn.stderr
    assert "replayed 5 events" in torn.stdout and torn.stdout.count("exfil-tool") == 5
    assert "recording torn at line 7" in _one_error_line(torn) and "the 5 events before it" in torn.stderr
    lines[3] = b'{"kind": "exec", "pid": "garbled"\n'  # a garbled line in the middle
    path.write_bytes(b"".join(lines))
    from ebpf_guard.paths import DEFAULT_POLICY

    torn = guard("replay", str(path), "--compare", str(DEFAULT_POLICY), str(DEFAULT_POLICY.parent / "strict.yaml"))
    assert torn.returncode == EXIT_DAMAGED and "decided differently" in torn.stdout, torn.stderr
    line = _one_error_line(torn)
    assert "torn at line 4" in line and "the 2 events before it" in line and "3 lines after it" in line


def test_replay_of_garbage_is_refused_loudly(tmp_path: Path):
    events = _recording(tmp_path, 2).read_bytes().split(b"\n", 1)[1]
    for first in (b"", b"garbage\n", b"[1, 2]\n", b'{"type": "recording"}\n'):
        path = tmp_path / "g.rec"
        path.write_bytes(first + events)  # good events after a line 1 that is no header
        r = guard("replay", str(path))
        assert r.returncode == EXIT_DAMAGED, (first, r.stderr)
        assert "not an ebpf-guard recording (line 1" in _one_error_line(r) and not r.stdout


def test_printer_collapses_repeated_status_lines(capsys):
    from ebpf_guard.output import Printer
    from ebpf_guard.redact import Redactor

    p = Printer(redactor=Redactor())
    p.message("disk full")
    for _ in range(250):
        p.message("disk full")
    p.message("something else")
    p.message("something else")
    p.close()
    assert capsys.readouterr().err.splitlines() == [
        "ebpf-guard: disk full",
        "ebpf-guard: (last message repeated 10 more times so far)",
        "ebpf-guard: (last message repeated 100 more times so far)",
        "ebpf-guard: (last message repeated 250 more times)",
        "ebpf-guard: something else",
        "ebpf-guard: (last message repeated 1 more time)",
    ]
