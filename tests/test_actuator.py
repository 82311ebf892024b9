"""Actuator against the real kernel: decisions become real freezes and real kills."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from ebpf_guard.enforce import cgroups
from ebpf_guard.enforce.actuator import Actuator, ActuatorError, kill_all, process_start_ns, resume
from ebpf_guard.events import Event, Kind
from ebpf_guard.verdicts import Decision, Mode, Scope, Verdict
from tests.helpers import WRITER, grows, scaled

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def decision(
    verdict: Verdict,
    pid: int,
    *,
    comm: str = "sleep",
    scope: Scope = Scope.PROCESS,
    start_ns: int | None = None,
    in_kernel: bool = False,
) -> Decision:
    if start_ns is None:
        start_ns = process_start_ns(pid) or 0
    ev = Event(
        kind=Kind.EXEC, ts_ns=time.monotonic_ns(), pid=pid, tgid=pid, ppid=os.getpid(), uid=0,
        comm=comm, cgroup_id=0, start_ns=start_ns, path="/usr/bin/" + comm,
    )
    return Decision(verdict, "test-rule", "because", ev, scope=scope, enforced_in_kernel=in_kernel)


def test_start_ns_matches_monotonic_clock(spawn) -> None:
    before = time.monotonic_ns()
    p = spawn(None, ["sleep", "100"])
    start = process_start_ns(p.pid)
    assert start is not None
    tick = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
    assert before - 2 * tick <= start <= time.monotonic_ns()


def test_halt_freezes_and_resume_thaws(tmp_cgroup: Path, tmp_path: Path, spawn) -> None:
    out = tmp_path / "progress"
    out.touch()
    p = spawn(tmp_cgroup, ["sh", "-c", WRITER.format(f=out)])
    assert grows(out, 2.0)
    act = Actuator(tmp_cgroup, mode=Mode.ENFORCE, freeze_timeout=scaled(1.0))
    d = decision(Verdict.HALT, p.pid, comm="sh")
    assert act.plan(d) == f"freeze {tmp_cgroup}"
    done = act.apply(d)
    assert done == (
        f"froze {tmp_cgroup}; resume: ebpf-guard resume --cgroup {tmp_cgroup}; "
        f"kill: ebpf-guard kill --cgroup {tmp_cgroup}"
    )
    assert cgroups.is_frozen(tmp_cgroup)
    assert not grows(out, 0.2)
    assert resume(str(tmp_cgroup), force=True) == f"thawed {tmp_cgroup}"
    assert grows(out, 2.0)


def test_ask_freezes(tmp_cgroup: Path, spawn) -> None:
    p = spawn(tmp_cgroup, ["sleep", "100"])
    done = Actuator(tmp_cgroup, freeze_timeout=scaled(1.0)).apply(decision(Verdict.ASK, p.pid))
    assert done.startswith("froze ")
    assert cgroups.is_frozen(tmp_cgroup)


def test_kill_process_kills_only_the_offender(tmp_cgroup: Path, spawn) -> None:
    offender = spawn(tmp_cgroup, ["sleep", "100"])
    sibling = spawn(tmp_cgroup, ["sleep", "100"])
    act = Actuator(tmp_cgroup)
    d = decision(Verdict.KILL, offender.pid)
    assert act.plan(d) == f"SIGKILL pid {offender.pid} (sleep)"
    assert act.apply(d) == f"killed pid {offender.pid} (sleep)"
    assert offender.wait(scaled(2)) == -9
    assert sibling.poll() is None
    # Idempotent: the second time it is already dead.
    assert act.apply(d) == f"pid {offender.pid} (sleep) had already exited"


def test_kill_process_refuses_a_different_process_on_the_pid(tmp_cgroup: Path, spawn) -> None:
    p = spawn(tmp_cgroup, ["sleep", "100"])
    real = process_start_ns(p.pid)
    assert real is not None
    # The event describes a process that started a second earlier: same pid, someone else now.
    done = Actuator(tmp_cgroup).apply(decision(Verdict.KILL, p.pid, start_ns=real - 10**9))
    assert "now belongs to another process" in done
    assert p.poll() is None


def test_kill_without_start_time_stays_inside_the_cgroup(tmp_cgroup: Path, spawn) -> None:
    outsider = spawn(None, ["sleep", "100"])
    done = Actuator(tmp_cgroup).apply(decision(Verdict.KILL, outsider.pid, start_ns=0))
    assert "no longer in" in done
    assert outsider.poll() is None
    insider = spawn(tmp_cgroup, ["sleep", "100"])
    assert Actuator(tmp_cgroup).apply(decision(Verdict.KILL, insider.pid, start_ns=0)).startswith(
        "killed pid"
    )
    assert insider.wait(scaled(2)) == -9


def test_kill_cgroup_kills_everything(tmp_cgroup: Path, spawn) -> None:
    procs = [spawn(tmp_cgroup, ["sleep", "100"]) for _ in range(3)]
    act = Actuator(tmp_cgroup)
    d = decision(Verdict.KILL, procs[0].pid, scope=Scope.CGROUP)
    assert act.plan(d) == f"kill cgroup {tmp_cgroup}"
    assert act.apply(d) == f"killed cgroup {tmp_cgroup} (3 processes)"
    assert all(p.wait(scaled(2)) == -9 for p in procs)
    assert cgroups.wait_empty(tmp_cgroup, scaled(2.0))


def test_enforced_in_kernel_is_reported_and_backed_up(tmp_cgroup: Path, spawn) -> None:
    # Pretend the kernel's kill was missed: the actuator still makes sure the process dies.
    p = spawn(tmp_cgroup, ["sleep", "100"])
    done = Actuator(tmp_cgroup).apply(decision(Verdict.KILL, p.pid, in_kernel=True))
    assert done.startswith("killed in kernel at exec entry")
    assert p.wait(scaled(2)) == -9
    # The usual case: already dead, nothing more to say.
    done = Actuator(tmp_cgroup).apply(decision(Verdict.KILL, p.pid, in_kernel=True, start_ns=1))
    assert done == "killed in kernel at exec entry"


def test_audit_mode_does_nothing(tmp_cgroup: Path, tmp_path: Path, spawn) -> None:
    out = tmp_path / "progress"
    out.touch()
    p = spawn(tmp_cgroup, ["sh", "-c", WRITER.format(f=out)])
    act = Actuator(tmp_cgroup, mode=Mode.AUDIT)
    for verdict, scope in [(Verdict.HALT, Scope.PROCESS), (Verdict.KILL, Scope.CGROUP)]:
        d = decision(verdict, p.pid, comm="sh", scope=scope)
        assert act.plan(d) == act.apply(d) == "none (audit mode)"
    assert not cgroups.is_frozen(tmp_cgroup)
    assert p.poll() is None
    assert grows(out, 2.0)


def test_safe_and_flag_do_nothing(tmp_cgroup: Path, spawn) -> None:
    p = spawn(tmp_cgroup, ["sleep", "100"])
    for verdict in (Verdict.SAFE, Verdict.FLAG):
        assert Actuator(tmp_cgroup).apply(decision(verdict, p.pid)) == "none"
    assert p.poll() is None and not cgroups.is_frozen(tmp_cgroup)


def test_halt_without_a_cgroup_is_an_error(spawn) -> None:
    p = spawn(None, ["sleep", "100"])
    with pytest.raises(ActuatorError, match="cannot freeze"):
        Actuator(None).apply(decision(Verdict.HALT, p.pid))
    with pytest.raises(ActuatorError, match="cannot freeze"):
        Actuator(None).freeze_now()


def test_kill_all_empties_a_frozen_cgroup(tmp_cgroup: Path, spawn) -> None:
    procs = [spawn(tmp_cgroup, ["sleep", "100"]) for _ in range(2)]
    Actuator(tmp_cgroup, freeze_timeout=scaled(1.0)).freeze_now()
    assert kill_all(str(tmp_cgroup), force=True, timeout=scaled(2.0)) == f"killed 2 processes in {tmp_cgroup}"
    assert all(p.wait(scaled(2)) == -9 for p in procs)


def test_v1_freezer_halt_resume_kill(tmp_path: Path, spawn) -> None:
    if cgroups.find_v1_mount("freezer") is None:
        pytest.skip("no v1 freezer on this host")
    out = tmp_path / "progress"
    out.touch()
    p = spawn(None, ["sh", "-c", WRITER.format(f=out)])
    fz = cgroups.freezer_for(None, p.pid)
    try:
        act = Actuator(None, freezer=fz, freeze_timeout=scaled(1.0))
        assert act.apply(decision(Verdict.HALT, p.pid, comm="sh")).startswith(f"froze {fz.path};")
        assert not grows(out, 0.2)
        assert resume(fz.path) == f"thawed {fz.path}"
        assert grows(out, 2.0)
        act.freeze_now()
        done = kill_all(str(fz.path), timeout=scaled(2.0))
        assert done == f"killed 1 processes in {fz.path}; removed it (ebpf-guard created it)"
        assert p.wait(scaled(2)) == -9
    finally:
        fz.remove()  # type: ignore[attr-defined]


def test_v1_freezer_kill_cgroup_scope(spawn) -> None:
    if cgroups.find_v1_mount("freezer") is None:
        pytest.skip("no v1 freezer on this host")
    p = spawn(None, ["sleep", "100"])
    fz = cgroups.freezer_for(None, p.pid)
    try:
        done = Actuator(None, freezer=fz).apply(decision(Verdict.KILL, p.pid, scope=Scope.CGROUP))
        assert done == f"killed cgroup {fz.path} (1 processes)"
        assert p.wait(scaled(2)) == -9
    finally:
        fz.remove()  # type: ignore[attr-defined]
