"""Issue #9 at the sensor: what the kernel reached, walked in the kernel with BTF layouts, for
each way an agent can name a file or a program other than by its own name.

Real kernel, real programs in a watched cgroup; the engine is not involved (tests/test_identity.py
runs the same tricks through `ebpf-guard run` and the default policy).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from ebpf_guard.events import NOTE_KILLED, Kind
from ebpf_guard.sensor import Sensor
from tests import test_sensor
from tests.conftest import requires_bpf
from tests.test_sensor import collect, exited, into, of, run

pytestmark = requires_bpf
cg = test_sensor.cg  # the fixture: a fresh cgroup, and the module's sensor watching exactly it
LD_SO = "/lib64/ld-linux-x86-64.so.2"


@pytest.fixture(scope="module")
def sensor() -> Iterator[Sensor]:
    s = Sensor()
    s.start()
    assert s.layouts is not None, f"this host has BTF: {s.btf_error}"
    try:
        yield s
    finally:
        s.close()


def py(cg: Path, code: str) -> int:
    return run(cg, [sys.executable, "-c", textwrap.dedent(code)])


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    d = tmp_path / "home" / ".ssh"
    d.mkdir(parents=True)
    key = d / "id_ed25519"
    key.write_text("KEY")
    return key


def opened(sensor: Sensor, pid: int, raw: str):
    evs = collect(sensor, exited(pid))
    (ev,) = [e for e in of(evs, Kind.OPEN, pid) if e.raw_path == raw]
    return ev


@pytest.mark.parametrize("how", ["symlink", "hardlink", "proc-self-root", "padded-past-255"])
def test_open_reports_the_file_reached(sensor: Sensor, cg: Path, tmp_path: Path, secret: Path,
                                      how: str) -> None:
    if how == "symlink":
        name = tmp_path / "notes.txt"
        name.symlink_to(secret)
        raw = str(name)
    elif how == "hardlink":
        name = secret.parent.parent / "notes.txt"
        os.link(secret, name)
        raw = str(name)
    elif how == "proc-self-root":
        raw = f"/proc/self/root{secret}"
    else:
        raw = str(secret.parent) + "/" + "./" * 140 + secret.name
    pid = py(cg, f"open({raw!r}).read()")
    ev = opened(sensor, pid, raw[:255])
    st = secret.stat()
    assert (ev.dev, ev.ino) == (st.st_dev, st.st_ino)
    if how == "hardlink":
        assert ev.real_path == raw  # another name of the same inode: the inode tells
    else:
        assert ev.real_path == str(secret) and not ev.path_cut
    if how == "padded-past-255":
        assert "path_truncated" in ev.notes


def test_a_reused_dirfd_is_read_from_the_fd_table(sensor: Sensor, cg: Path, tmp_path: Path) -> None:
    scratch, docs = tmp_path / "scratch", tmp_path / "docs"
    scratch.mkdir()
    docs.mkdir()
    (docs / "f1").write_text("x")
    (scratch / "f1").write_text("x")
    # fd 50 is opened as scratch (the model learns that), then dup2 (not traced) makes it docs.
    pid = py(cg, f"""
        import os
        s = os.open({str(scratch)!r}, os.O_RDONLY | os.O_DIRECTORY)
        os.dup2(s, 50); os.close(s)
        d = os.open({str(docs)!r}, os.O_RDONLY | os.O_DIRECTORY)
        os.dup2(d, 50)
        os.unlink("f1", dir_fd=50)
    """)
    evs = collect(sensor, exited(pid))
    (ev,) = of(evs, Kind.UNLINK, pid)
    assert ev.real_path == str(docs / "f1")
    assert not (docs / "f1").exists() and (scratch / "f1").exists()


def test_chdir_through_a_symlink_gives_the_real_cwd(sensor: Sensor, cg: Path, tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "alias").symlink_to(real)
    pid = py(cg, f"import os; os.chdir({str(tmp_path / 'alias')!r}); open('f', 'w')")
    evs = collect(sensor, exited(pid))
    (cd,) = of(evs, Kind.CHDIR, pid)
    assert cd.real_path == str(real)
    (op,) = [e for e in of(evs, Kind.OPEN, pid) if e.raw_path == "f"]
    assert op.real_path == str(real / "f")


def test_rename_link_symlink_truncate(sensor: Sensor, cg: Path, tmp_path: Path) -> None:
    (tmp_path / "a").write_text("data")
    pid = py(cg, f"""
        import os
        os.chdir({str(tmp_path)!r})
        os.rename("a", "b")
        os.link("b", "c")
        os.symlink("/etc/hostname", "d")
        os.truncate("c", 1)
        fd = os.open("b", os.O_WRONLY); os.ftruncate(fd, 0); os.close(fd)
    """)
    evs = collect(sensor, exited(pid))
    (rn,) = of(evs, Kind.RENAME, pid)
    assert (rn.real_path, rn.dest_real_path, rn.ret) == (str(tmp_path / "a"), str(tmp_path / "b"), 0)
    (ln,) = of(evs, Kind.LINK, pid)
    assert (ln.real_path, ln.dest_real_path) == (str(tmp_path / "b"), str(tmp_path / "c"))
    (sl,) = of(evs, Kind.SYMLINK, pid)
    assert (sl.raw_path, sl.dest_real_path) == ("/etc/hostname", str(tmp_path / "d"))
    tr = of(evs, Kind.TRUNCATE, pid)
    ino = (tmp_path / "b").stat().st_ino
    assert [t.real_path for t in tr] == [str(tmp_path / "c"), str(tmp_path / "b")]
    assert tr[1].ino == ino and {"write", "truncate"} <= tr[1].access


def tool_copy(tmp_path: Path) -> Path:
    """A private copy of touch(1): a program with its own inode that leaves a visible effect."""
    tool = tmp_path / "tool"
    shutil.copy2(shutil.which("touch") or "/usr/bin/touch", tool)
    return tool


@pytest.mark.parametrize("how", ["hardlink", "symlink", "ld.so"])
def test_a_listed_program_is_killed_by_inode_before_it_runs(sensor: Sensor, cg: Path, tmp_path: Path,
                                                            how: str) -> None:
    tool = tool_copy(tmp_path)
    st = tool.stat()
    sensor.set_exec_rules(kill_inodes=[(st.st_dev, st.st_ino)])
    marker = tmp_path / "marker"
    if how == "hardlink":
        alias = tmp_path / "innocent"
        os.link(tool, alias)
        argv = [str(alias), str(marker)]
    elif how == "symlink":
        alias = tmp_path / "innocent"
        alias.symlink_to(tool)
        argv = [str(alias), str(marker)]
    else:
        argv = [LD_SO, str(tool), str(marker)]
    with subprocess.Popen(argv, preexec_fn=into(cg)) as p:
        p.wait(timeout=30)
    assert p.returncode == -9 and not marker.exists()
    evs = collect(sensor, exited(p.pid))
    kind = Kind.MMAP_EXEC if how == "ld.so" else Kind.EXEC
    hits = [e for e in of(evs, kind, p.pid) if e.ino == st.st_ino]
    assert hits and NOTE_KILLED in hits[0].notes
    # A hard link is the same inode under another name: the walk shows that name.
    assert hits[0].real_path == str(alias if how == "hardlink" else tool)
    # Not listed, the same program runs: the kill is by identity.
    sensor.set_exec_rules()
    subprocess.run([str(tool), str(marker)], preexec_fn=into(cg), check=True, timeout=30)
    assert marker.exists()


def test_exec_reports_the_binary_its_hash_and_resolved_operands(sensor: Sensor, cg: Path,
                                                               tmp_path: Path) -> None:
    tool = tool_copy(tmp_path)
    renamed = tmp_path / "harmless"
    shutil.copy2(tool, renamed)
    (tmp_path / "outside").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "outside")
    pid = run(cg, [str(renamed), "-c", "link/", "link"], cwd=tmp_path)
    evs = collect(sensor, exited(pid))
    (ex,) = of(evs, Kind.EXEC, pid)
    import hashlib
    assert ex.exe_sha256 == hashlib.sha256(tool.read_bytes()).hexdigest()
    assert ex.real_path == ex.exe == str(renamed)
    assert ex.real_args == ("", "", str(tmp_path / "outside"), str(tmp_path / "link"))


def test_destinations_without_connect(sensor: Sensor, cg: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as srv:
        srv.bind(("127.0.0.1", 0))
        port = srv.getsockname()[1]
        pid = py(cg, f"""
            import socket
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            u.sendto(b"x", ("127.0.0.1", {port}))
            u.sendmsg([b"y"], [], 0, ("127.0.0.1", {port}))
            t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                t.sendto(b"z", 0x20000000, ("127.0.0.1", {port}))  # MSG_FASTOPEN
            except OSError:
                pass
        """)
    evs = collect(sensor, exited(pid))
    got = [(e.via, e.addr, e.port, e.flags & 0x20000000) for e in of(evs, Kind.CONNECT, pid)]
    assert ("sendto", "127.0.0.1", port, 0) in got
    assert ("sendmsg", "127.0.0.1", port, 0) in got
    assert ("sendto", "127.0.0.1", port, 0x20000000) in got


def test_io_uring_setup_and_ptrace_attach_are_events(sensor: Sensor, cg: Path) -> None:
    target = subprocess.Popen(["sleep", "30"], preexec_fn=into(cg))
    try:
        pid = py(cg, f"""
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            params = (ctypes.c_char * 120)()
            libc.syscall(425, 4, params)  # io_uring_setup
            libc.syscall(101, 0x4206, {target.pid}, 0, 0)  # PTRACE_SEIZE
        """)
        evs = collect(sensor, exited(pid))
    finally:
        target.kill()
        target.wait()
    (ring,) = of(evs, Kind.IO_URING, pid)
    assert ring.ret is not None and ring.ret >= 0  # read at exit: the ring's fd
    (trace,) = of(evs, Kind.PTRACE, pid)
    assert (trace.target_pid, trace.flags) == (target.pid, 0x4206)


def test_real_parent_is_the_parent_now(sensor: Sensor, cg: Path, tmp_path: Path) -> None:
    pid = py(cg, "import os; print(os.getppid()); open('/dev/null')")
    evs = collect(sensor, exited(pid))
    (op,) = [e for e in of(evs, Kind.OPEN, pid) if e.raw_path == "/dev/null"]
    assert op.ppid == os.getpid()


def test_without_btf_the_sensor_loads_and_reports_strings_only(tmp_cgroup: Path, tmp_path: Path) -> None:
    """The fallback of hosts without BTF: the walks compile out, nothing is claimed."""
    s = Sensor(cgroups=[tmp_cgroup], btf=None)
    s.start()
    try:
        assert s.layouts is None and "not used" in s.btf_error
        target = tmp_path / "t"
        target.write_text("x")
        (tmp_path / "l").symlink_to(target)
        pid = run(tmp_cgroup, ["cat", str(tmp_path / "l")])
        ev = opened(s, pid, str(tmp_path / "l"))
        assert ev.real_path == "" and ev.ino == 0 and ev.path == str(tmp_path / "l")
    finally:
        s.close()


libc = ctypes.CDLL(None, use_errno=True)
