"""The sensor's userspace path model, without the kernel."""

from __future__ import annotations

import os

import pytest

from ebpf_guard.pathnames import join, normalize
from ebpf_guard.sensor.procfs import AT_FDCWD, ProcModel, read_stat


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("/a/b", "/a/b"),
        ("//a///b/", "/a/b"),
        ("/a/./b/../c", "/a/c"),
        ("/../../etc/passwd", "/etc/passwd"),
        ("/", "/"),
        ("//", "/"),
    ],
)
def test_normalize(raw: str, want: str) -> None:
    assert normalize(raw) == want


def test_join() -> None:
    assert join("/home/u", ".ssh/../.ssh/id_rsa") == "/home/u/.ssh/id_rsa"
    assert join(None, "rel") is None
    assert join(None, "/abs/./x") == "/abs/x"
    assert join("/d", "") == "/d"


def test_fork_inherits_cwd_and_fds() -> None:
    m = ProcModel()
    parent = m.get(1_000_001, 5)  # not in /proc: unknown cwd
    parent.cwd = "/work"
    parent.fds[7] = "/home/u/.ssh"
    m.fork(parent, 1_000_002, 1_000_001)
    child = m.get(1_000_002, 9)
    assert child.start_ns == 9 and child.ppid == 1_000_001
    assert m.resolve(child, 1_000_002, AT_FDCWD, "x/../y") == "/work/y"
    assert m.resolve(child, 1_000_002, 7, "id_rsa") == "/home/u/.ssh/id_rsa"
    assert m.resolve(child, 1_000_002, 8, "z") is None  # unknown fd, no such process
    # A different start_ns under the same pid is a new process: state is not reused.
    assert m.get(1_000_002, 10).cwd is None


def test_read_stat_self() -> None:
    ppid, start_ns = read_stat(os.getpid())
    assert ppid == os.getppid() and start_ns > 0
