"""Pure cgroup v2 as a first-class host: `watch --pid` freezes a bare process tree by moving it
into a v2 cgroup of its own. Pure-v2 hosts (Debian 12/13 with systemd) take this path always;
here (hybrid) it is forced with prefer_v1=False, so both paths are proven on this kernel."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from helpers import WRITER, grows, scaled, wait_for

from ebpf_guard.enforce import cgroups
from ebpf_guard.enforce.actuator import Actuator

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def test_a_bare_tree_is_moved_frozen_and_given_back(tmp_cgroup: Path, spawn, tmp_path: Path) -> None:
    out = tmp_path / "progress"
    out.touch()
    # A shell (in a cgroup of its own, as a login session is) with a writer child already running.
    shell = spawn(tmp_cgroup, ["sh", "-c", f"({WRITER.format(f=out)}) & wait"])
    writer = wait_for(lambda: [c for c in _children(shell.pid)], timeout=10)[0]
    assert grows(out, 2.0)
    fz = cgroups.freezer_for(None, shell.pid, prefer_v1=False)
    try:
        assert isinstance(fz, cgroups.MovedTreeFreezer)
        assert fz.path.parent == cgroups.find_v2_mount()
        assert cgroups.marked_role(fz.path) == cgroups.ROLE_CREATED
        assert set(fz.pids()) >= {shell.pid, writer}, "the whole existing tree moved, not only its root"
        Actuator(None, freezer=fz, freeze_timeout=scaled(1.0)).freeze_now()
        assert cgroups.is_frozen(fz.path) and not grows(out, 0.3)
        fz.thaw()
        assert grows(out, 2.0)
        # A child born after the move inherits the freezer's cgroup.
        late = subprocess.Popen(["sleep", "300"], preexec_fn=lambda: cgroups.move_pid(fz.path, os.getpid()))
        try:
            fz.release(timeout=scaled(5.0))
            for pid in (shell.pid, writer):
                assert cgroups.cgroup_of_pid(pid) == tmp_cgroup, "given back where it came from"
            assert cgroups.cgroup_of_pid(late.pid) == tmp_cgroup, "a latecomer goes where the root came from"
            assert not fz.path.exists()
            assert grows(out, 2.0), "released, not killed"
        finally:
            late.kill()
            late.wait(scaled(5))
    finally:
        if fz.path.exists():
            fz.remove()


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
