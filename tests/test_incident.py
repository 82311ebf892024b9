"""Incident snapshots of a real, frozen process tree, and the incident file on disk."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import psutil
import pytest

from ebpf_guard.enforce import cgroups
from ebpf_guard.incident import snapshot_process, snapshot_tree, write_incident
from tests.helpers import scaled

# The "agent": works in a directory, holds a file open, listens on loopback, has a child.
AGENT = """
import os, socket, sys, time
os.chdir(sys.argv[1])
evidence = open("evidence.txt", "w")
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen()
child = os.fork()
if child == 0:
    time.sleep(1000)
    os._exit(0)
print(srv.getsockname()[1], child, flush=True)
time.sleep(1000)
"""


@pytest.fixture
def frozen_agent(tmp_cgroup: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen, int, int]]:
    """(agent process, listening port, child pid), running in tmp_cgroup and frozen."""
    procs = str(tmp_cgroup / "cgroup.procs")

    def join() -> None:
        with open(procs, "w") as f:
            f.write(str(os.getpid()))

    workdir = tmp_path / "work"
    workdir.mkdir()
    p = subprocess.Popen(
        [sys.executable, "-c", AGENT, str(workdir)], stdout=subprocess.PIPE, preexec_fn=join
    )
    try:
        assert p.stdout is not None
        port, child = map(int, p.stdout.readline().split())
        cgroups.freeze(tmp_cgroup)
        assert cgroups.wait_frozen(tmp_cgroup, scaled(2.0))
        yield p, port, child
    finally:
        p.kill()  # SIGKILL wakes a v2-frozen task; the fixture's cgroup removal gets the child
        p.wait(scaled(5))


def test_snapshot_of_frozen_tree(tmp_cgroup: Path, tmp_path: Path, frozen_agent) -> None:
    p, port, child = frozen_agent
    tree = snapshot_tree(cgroups.pids(tmp_cgroup))
    by_pid = {entry["pid"]: entry for entry in tree}
    assert set(by_pid) == {p.pid, child}

    agent = by_pid[p.pid]
    assert agent["errors"] == {}
    assert agent["cwd"] == str(tmp_path / "work")
    assert agent["exe"] == os.path.realpath(sys.executable)
    assert agent["cmdline"][:2] == [sys.executable, "-c"]
    assert agent["uid"] == 0 and agent["username"] == "root"
    assert agent["ppid"] == os.getpid()
    assert abs(agent["start_time"] - psutil.Process(p.pid).create_time()) < 0.01
    assert {"path": str(tmp_path / "work" / "evidence.txt"), "mode": "w"}.items() <= next(
        f for f in agent["open_files"] if f["path"].endswith("evidence.txt")
    ).items()
    listening = [s for s in agent["sockets"] if s["status"] == psutil.CONN_LISTEN]
    assert listening == [
        {
            "fd": listening[0]["fd"],
            "family": "AF_INET",
            "type": "SOCK_STREAM",
            "laddr": f"127.0.0.1:{port}",
            "raddr": "",
            "status": "LISTEN",
        }
    ]
    assert by_pid[child]["ppid"] == p.pid
    # The snapshot is serialisable as it stands.
    orjson.dumps(tree)


def test_vanished_process_is_recorded_not_fatal() -> None:
    p = subprocess.Popen(["true"])
    p.wait()
    (entry,) = snapshot_tree([p.pid])
    assert entry["pid"] == p.pid
    assert entry["errors"] == {"process": "process exited"}
    assert entry["cwd"] is None


def test_unreadable_field_is_recorded_per_field(monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(self: psutil.Process) -> str:
        raise psutil.AccessDenied(self.pid)

    monkeypatch.setattr(psutil.Process, "cwd", denied)
    entry = snapshot_process(os.getpid())
    assert entry["cwd"] is None
    assert entry["errors"] == {"cwd": "access denied"}
    assert entry["exe"] == os.path.realpath(sys.executable)


def test_write_incident(tmp_path: Path) -> None:
    directory = tmp_path / "incidents"
    record = {"seq": 42, "rule": "no ssh/keys", "verdict": "KILL", "tags": frozenset({"b", "a"})}
    tree = snapshot_tree([os.getpid()])
    path = write_incident(directory, record=record, recent_events=[{"kind": "exec"}], tree=tree)

    assert path.parent == directory
    assert path.name.startswith("incident-") and path.name.endswith("-42-no_ssh_keys.json")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    doc = orjson.loads(path.read_bytes())
    assert doc["record"]["rule"] == "no ssh/keys"
    assert doc["record"]["tags"] == ["a", "b"]
    assert doc["recent_events"] == [{"kind": "exec"}]
    assert doc["process_tree"][0]["pid"] == os.getpid()
    assert b'\n  "record"' in path.read_bytes()  # pretty-printed
    assert [q.name for q in directory.iterdir()] == [path.name]  # no temporary file left


def test_write_incident_never_overwrites(tmp_path: Path) -> None:
    a = write_incident(tmp_path, record={"rule": "r"}, recent_events=[], tree=[], name="x.json")
    b = write_incident(tmp_path, record={"rule": "r"}, recent_events=[], tree=[], name="x.json")
    assert (a.name, b.name) == ("x.json", "x-1.json")
    assert sorted(q.name for q in tmp_path.iterdir()) == ["x-1.json", "x.json"]
