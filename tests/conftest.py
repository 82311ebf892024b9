"""Shared fixtures. Kernel tests need root and a working bcc; they skip with one line otherwise."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ebpf_guard import cgroups


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
        cgroups.remove_cgroup(path)
