"""cgroups.py against the real kernel: real processes in real v2 (and v1 freezer) cgroups."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from ebpf_guard.enforce import cgroups
from ebpf_guard.enforce.cgroups import CgroupError
from tests.helpers import WRITER, eventually, grows, scaled

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def alive(pid: int) -> bool:
    """True unless the pid is gone or a zombie (a killed child not yet reaped is dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


# --- resolving -----------------------------------------------------------------------------


def test_resolve_filesystem_path(tmp_cgroup: Path) -> None:
    assert cgroups.resolve_cgroup(str(tmp_cgroup)) == tmp_cgroup
    assert cgroups.resolve_cgroup(str(tmp_cgroup) + "/") == tmp_cgroup


def test_resolve_proc_cgroup_forms(tmp_cgroup: Path) -> None:
    nested = cgroups.create_cgroup(tmp_cgroup, "inner")
    rel = "/" + str(tmp_cgroup.relative_to(cgroups.find_v2_mount()))
    assert cgroups.resolve_cgroup(rel) == tmp_cgroup
    assert cgroups.resolve_cgroup(f"0::{rel}") == tmp_cgroup
    assert cgroups.resolve_cgroup(f"0::{rel}/inner\n") == nested
    assert cgroups.resolve_cgroup("0::/") == cgroups.find_v2_mount()


def test_resolve_missing_says_where_it_looked() -> None:
    root = cgroups.find_v2_mount()
    with pytest.raises(CgroupError) as e:
        cgroups.resolve_cgroup("/no-such-ebpf-guard-cg")
    assert str(e.value) == (
        f"cgroup /no-such-ebpf-guard-cg does not exist (looked in {root}/no-such-ebpf-guard-cg)"
    )
    with pytest.raises(CgroupError, match="does not exist"):
        cgroups.resolve_cgroup(f"{root}/no-such-ebpf-guard-cg")
    with pytest.raises(CgroupError, match="does not exist"):
        cgroups.resolve_cgroup("/../../etc")  # ".." cannot climb out of the cgroup root


def test_resolve_rejects_v1_hierarchy() -> None:
    v1 = cgroups.find_v1_mount("freezer")
    if v1 is None:
        pytest.skip("no v1 freezer on this host")
    with pytest.raises(CgroupError, match="cgroup v1 hierarchy"):
        cgroups.resolve_cgroup(str(v1))


def test_cgroup_id_and_cgroup_of_pid(tmp_cgroup: Path, spawn) -> None:
    assert cgroups.cgroup_id(tmp_cgroup) == os.stat(tmp_cgroup).st_ino
    p = spawn(tmp_cgroup, "sleep 100")
    assert eventually(lambda: cgroups.is_populated(tmp_cgroup))
    assert cgroups.cgroup_of_pid(p.pid) == tmp_cgroup
    with pytest.raises(CgroupError, match="no process"):
        cgroups.cgroup_of_pid(2**22 + 1)


# --- freezing ------------------------------------------------------------------------------


def test_freeze_stops_progress_and_thaw_resumes(tmp_cgroup: Path, tmp_path: Path, spawn) -> None:
    out = tmp_path / "progress"
    out.touch()
    spawn(tmp_cgroup, WRITER.format(f=out))
    assert grows(out, 2.0)
    assert not cgroups.is_frozen(tmp_cgroup)

    cgroups.freeze(tmp_cgroup)
    assert cgroups.wait_frozen(tmp_cgroup, scaled(2.0))
    assert cgroups.is_frozen(tmp_cgroup)
    assert not grows(out, 0.2)

    cgroups.thaw(tmp_cgroup)
    assert grows(out, 2.0)
    assert not cgroups.is_frozen(tmp_cgroup)


def test_wait_empty_and_populated(tmp_cgroup: Path, spawn) -> None:
    assert not cgroups.is_populated(tmp_cgroup)
    assert cgroups.wait_empty(tmp_cgroup, scaled(0.1))
    # It ends when told to (not after a fixed sleep the test would have to outrun).
    p = spawn(tmp_cgroup, "read x", stdin=subprocess.PIPE)
    assert eventually(lambda: cgroups.is_populated(tmp_cgroup))
    assert not cgroups.wait_empty(tmp_cgroup, scaled(0.01))
    p.stdin.close()
    assert cgroups.wait_empty(tmp_cgroup, scaled(3.0))
    p.wait(scaled(1))


# --- killing -------------------------------------------------------------------------------


def _escapee_tree(tmp_cgroup: Path, tmp_path: Path, spawn) -> tuple[subprocess.Popen, int]:
    """A shell plus a double-forked, setsid'd grandchild that was reparented away from it."""
    pidfile = tmp_path / "grandchild.pid"
    p = spawn(
        tmp_cgroup,
        f"setsid sh -c 'sleep 1000 & echo $! > {pidfile}.tmp; mv {pidfile}.tmp {pidfile}'; "
        "sleep 1000",
    )
    assert eventually(pidfile.exists)
    grandchild = int(pidfile.read_text())
    assert os.getsid(grandchild) != os.getsid(p.pid)
    assert grandchild in cgroups.pids(tmp_cgroup)
    return p, grandchild


def test_kill_cgroup_kills_setsid_grandchild(tmp_cgroup: Path, tmp_path: Path, spawn) -> None:
    p, grandchild = _escapee_tree(tmp_cgroup, tmp_path, spawn)
    cgroups.kill_cgroup(tmp_cgroup)
    assert cgroups.wait_empty(tmp_cgroup, scaled(3.0))
    assert p.wait(scaled(2)) == -9
    assert not alive(grandchild)


def test_kill_fallback_without_cgroup_kill(tmp_cgroup: Path, tmp_path: Path, spawn) -> None:
    # The freeze -> SIGKILL every pid -> thaw path used where cgroup.kill is missing (< 5.14).
    p, grandchild = _escapee_tree(tmp_cgroup, tmp_path, spawn)
    cgroups._freeze_and_kill(tmp_cgroup, timeout=scaled(2.0))
    assert cgroups.wait_empty(tmp_cgroup, scaled(3.0))
    assert p.wait(scaled(2)) == -9
    assert not alive(grandchild)
    assert not cgroups.is_frozen(tmp_cgroup)


def test_kill_frozen_cgroup(tmp_cgroup: Path, spawn) -> None:
    spawn(tmp_cgroup, "sleep 1000 & sleep 1000")
    assert eventually(lambda: len(cgroups.pids(tmp_cgroup)) >= 2)
    cgroups.freeze(tmp_cgroup)
    assert cgroups.wait_frozen(tmp_cgroup, scaled(2.0))
    cgroups.kill_cgroup(tmp_cgroup)
    assert cgroups.wait_empty(tmp_cgroup, scaled(3.0))


# --- run cgroups and removal ---------------------------------------------------------------


def test_create_run_cgroup_and_remove_nested(spawn) -> None:
    run_cg = cgroups.create_run_cgroup(None)
    try:
        assert run_cg.parent == cgroups.find_v2_mount()
        assert run_cg.name.startswith(cgroups.RUN_CGROUP_PREFIX)
        deep = cgroups.create_cgroup(cgroups.create_cgroup(run_cg, "a"), "b")
        p1 = spawn(run_cg, "sleep 1000")
        p2 = spawn(deep, "sleep 1000")
        cgroups.freeze(deep)  # a frozen descendant must not block removal either
        assert eventually(lambda: len(cgroups.pids(run_cg)) >= 2)
        cgroups.remove_cgroup(run_cg, timeout=scaled(5.0))
        assert not run_cg.exists()
        assert p1.wait(scaled(2)) == -9 and p2.wait(scaled(2)) == -9
    finally:
        cgroups.remove_cgroup(run_cg, timeout=scaled(5.0))
    other = cgroups.create_run_cgroup(None)
    cgroups.remove_cgroup(other, timeout=scaled(5.0))
    assert other != run_cg


# --- Freezer abstraction -------------------------------------------------------------------


def test_freezer_for_picks_v2(tmp_cgroup: Path) -> None:
    fz = cgroups.freezer_for(tmp_cgroup)
    assert isinstance(fz, cgroups.V2Freezer) and fz.path == tmp_cgroup
    assert isinstance(cgroups.freezer_at(str(tmp_cgroup)), cgroups.V2Freezer)


def test_freezer_for_refuses_root_and_own_cgroup(tmp_cgroup: Path) -> None:
    with pytest.raises(CgroupError, match="root cgroup"):
        cgroups.freezer_for(cgroups.find_v2_mount())
    home = cgroups.cgroup_of_pid(os.getpid())
    inner = cgroups.create_cgroup(tmp_cgroup, "with-guard")
    cgroups.move_pid(inner, os.getpid())
    try:
        with pytest.raises(CgroupError, match="contains ebpf-guard itself"):
            cgroups.freezer_for(tmp_cgroup)
    finally:
        cgroups.move_pid(home, os.getpid())  # before the fixture kills the cgroup


def test_v1_freezer_freezes_thaws_and_kills(tmp_path: Path, spawn) -> None:
    if cgroups.find_v1_mount("freezer") is None:
        pytest.skip("no v1 freezer on this host")
    out = tmp_path / "progress"
    out.touch()
    # Started outside any of our cgroups, then adopted: its later children inherit the freezer.
    p = spawn(None, f"read go; sleep 1000 & {WRITER.format(f=out)}", stdin=subprocess.PIPE)
    fz = cgroups.freezer_for(None, p.pid)
    try:
        p.stdin.write(b"go\n")
        p.stdin.close()
        assert isinstance(fz, cgroups.V1Freezer)
        assert fz.path.parent == cgroups.find_v1_mount("freezer")
        assert isinstance(cgroups.freezer_at(str(fz.path)), cgroups.V1Freezer)
        assert eventually(lambda: len(fz.pids()) >= 2)  # the shell and its sleep
        assert grows(out, 2.0)

        fz.freeze()
        assert fz.wait_frozen(scaled(2.0)) and fz.is_frozen()
        assert not grows(out, 0.2)
        fz.thaw()
        assert not fz.is_frozen()
        assert grows(out, 2.0)

        members = fz.pids()
        fz.kill()
        assert p.wait(scaled(2)) == -9
        assert eventually(lambda: not any(alive(x) for x in members))
        assert eventually(lambda: not fz.pids())
    finally:
        fz.remove()  # type: ignore[attr-defined]
    assert not fz.path.exists()
