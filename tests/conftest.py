"""Shared fixtures. Kernel tests need root and a working bcc; they skip with one line otherwise."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from ebpf_guard.enforce import cgroups
from tests.helpers import scaled, throwaway_user

# Hypothesis's per-example deadline (200 ms) and its too_slow health check time this host, not
# the code: a cold first call on a busy or emulated host misses them even when scaled (seen: 1.07 s
# against 3 x 200 ms). Off, as the fuzz and audit-log properties already have them; a genuinely
# slow case still shows as a slow test.
settings.register_profile("ebpf-guard", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ebpf-guard")


def _bcc_problem() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    try:
        import bcc  # noqa: F401
    except ImportError:
        return "bcc is not importable (apt-get install python3-bpfcc; use the project venv)"
    if not Path("/sys/kernel/tracing/events/syscalls").exists():
        return "tracefs is not mounted (mount -t tracefs nodev /sys/kernel/tracing)"
    return None


BCC_PROBLEM = _bcc_problem()
requires_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
requires_bpf = pytest.mark.skipif(BCC_PROBLEM is not None, reason=f"BPF: {BCC_PROBLEM}")


@pytest.fixture
def tmp_cgroup() -> Iterator[Path]:
    """A fresh cgroup v2 directory, killed and removed afterwards even if the test fails."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    path = cgroups.create_cgroup(cgroups.find_v2_mount(), f"ebpf-guard-test-{uuid.uuid4().hex[:10]}")
    try:
        yield path
    finally:
        cgroups.remove_cgroup(path, timeout=scaled(5))


def _scratch_dir(name: str) -> Iterator[Path]:
    # Not under /tmp: the default policy treats /tmp as scratch (writes, deletes, rm -r there
    # are harmless), so a realistic workspace and "outside" must live elsewhere.
    path = Path(f"/var/lib/ebpf-guard-test-{uuid.uuid4().hex[:8]}") / name
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path.parent, ignore_errors=True)


@pytest.fixture
def ws() -> Iterator[Path]:
    """The agent's workspace."""
    yield from _scratch_dir("ws")


@pytest.fixture
def outside() -> Iterator[Path]:
    """A directory outside the workspace and outside /tmp (where writes and rm -r are judged)."""
    yield from _scratch_dir("outside")


@pytest.fixture
def agent_user() -> Iterator[tuple[str, Path]]:
    """A throwaway user with its own home, so {home} rules are tested without touching root's."""
    with throwaway_user() as user:
        yield user


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen]]:
    """spawn(cgroup or None, argv or shell script, **popen_kw): a process that joins the cgroup
    before it execs; killed and reaped afterwards."""
    started: list[subprocess.Popen] = []

    def _spawn(cg: Path | None, argv: list[str] | str, **kw) -> subprocess.Popen:
        procs = str(cg / "cgroup.procs") if cg is not None else None

        def join() -> None:
            if procs:
                with open(procs, "w") as f:
                    f.write(str(os.getpid()))

        cmd = ["sh", "-c", argv] if isinstance(argv, str) else argv
        p = subprocess.Popen(cmd, preexec_fn=join, **kw)
        started.append(p)
        return p

    yield _spawn
    for p in started:
        p.kill()
        p.wait(scaled(5))
