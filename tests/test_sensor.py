"""The sensor against the real kernel: real BPF programs, real processes in a real cgroup.

One Sensor is loaded for the module (a compile costs ~1.5 s) and re-targeted per test with
set_scope(); only the overload test loads its own (it needs a tiny buffer).
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import stat
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ebpf_guard.enforce import cgroups
from ebpf_guard.events import NOTE_HELD, NOTE_KILLED, Event, Kind
from ebpf_guard.sensor import Sensor, SensorError, descendants
from tests.conftest import requires_bpf
from tests.helpers import scaled, wait_for

pytestmark = requires_bpf

SYS_EXECVEAT = 322  # x86_64
SYS_OPENAT2 = 437
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


# -- helpers ---------------------------------------------------------------------------------


def into(cg: Path) -> Callable[[], None]:
    """preexec_fn: join the cgroup before exec, so the exec itself is watched."""
    return lambda: cgroups.move_pid(cg, os.getpid())


def run(cg: Path | None, argv: list[str], **kw) -> int:
    """Run argv to completion (in the cgroup if given); returns its pid."""
    with subprocess.Popen(
        argv, preexec_fn=into(cg) if cg else None, stdout=subprocess.DEVNULL, **kw
    ) as p:
        p.wait(timeout=scaled(10))
    return p.pid


def fork_run(cg: Path, fn: Callable[[], None]) -> int:
    """Run fn in a forked child inside the cgroup; returns the child's pid once it exited."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            cgroups.move_pid(cg, os.getpid())
            fn()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "child failed"
    return pid


def collect(sensor: Sensor, done: Callable[[list[Event]], bool], timeout: float = 5) -> list[Event]:
    events: list[Event] = []
    deadline = time.monotonic() + scaled(timeout)
    while time.monotonic() < deadline:
        events += sensor.poll(20)
        if done(events):
            return events
    raise AssertionError(f"timed out; got {len(events)} events")


def exited(*pids: int) -> Callable[[list[Event]], bool]:
    want = set(pids)
    return lambda evs: want <= {e.tgid for e in evs if e.kind is Kind.EXIT}


def of(events: list[Event], kind: Kind, pid: int | None = None) -> list[Event]:
    return [e for e in events if e.kind is kind and (pid is None or e.tgid == pid)]


def drain(sensor: Sensor) -> None:
    while sensor.poll(0):
        pass


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sensor() -> Iterator[Sensor]:
    s = Sensor()
    s.start()
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def cg(sensor: Sensor, tmp_cgroup: Path) -> Iterator[Path]:
    """A fresh cgroup, and the module sensor watching exactly it."""
    sensor.set_exec_rules()
    sensor.set_scope(cgroups=[tmp_cgroup])
    drain(sensor)
    try:
        yield tmp_cgroup
    finally:
        sensor.set_scope()
        sensor.set_exec_rules()


# -- exec ------------------------------------------------------------------------------------


def test_exec_event_fields(sensor: Sensor, cg: Path) -> None:
    pid = run(cg, ["/bin/echo", "a", "b c"])
    evs = collect(sensor, exited(pid))
    (ex,) = of(evs, Kind.EXEC, pid)
    assert ex.raw_path == ex.path == "/bin/echo"
    assert ex.argv == ("/bin/echo", "a", "b c") and not ex.argv_truncated
    assert ex.cgroup_id == os.stat(cg).st_ino
    assert ex.ppid == os.getpid() and ex.uid == 0 and ex.start_ns > 0
    assert ex.pid == ex.tgid == pid
    # Every event of the process carries the same identity.
    assert {(e.tgid, e.start_ns) for e in evs if e.tgid == pid} == {(pid, ex.start_ns)}


def test_exec_carries_the_cwd_of_a_short_lived_shell(sensor: Sensor, cg: Path, tmp_path: Path) -> None:
    """`cd DIR && cmd`: the exec event says where cmd runs (what `rm -r build` means)."""
    (tmp_path / "sub").mkdir()
    sh = run(cg, ["/bin/sh", "-c", f"cd {tmp_path}/sub && /bin/true relative-operand"])
    evs = collect(sensor, exited(sh))
    (ex,) = [e for e in of(evs, Kind.EXEC) if e.argv[:2] == ("/bin/true", "relative-operand")]
    assert ex.cwd == f"{tmp_path}/sub"


def test_exec_argv_truncation(sensor: Sensor, cg: Path) -> None:
    many = run(cg, ["/bin/true", *map(str, range(20))])
    long = run(cg, ["/bin/true", "x" * 300])
    evs = collect(sensor, exited(many, long))
    (a,) = of(evs, Kind.EXEC, many)
    assert a.argv == ("/bin/true", *map(str, range(15))) and a.argv_truncated
    (b,) = of(evs, Kind.EXEC, long)
    assert b.argv_truncated and b.argv[1].startswith("x" * 200)


def test_execveat_with_dirfd(sensor: Sensor, cg: Path) -> None:
    def child() -> None:
        fd = os.open("/usr/bin", os.O_RDONLY | os.O_DIRECTORY)
        argv = (ctypes.c_char_p * 3)(b"true", b"--viaexecveat", None)
        envp = (ctypes.c_char_p * 1)(None)
        libc.syscall(SYS_EXECVEAT, fd, b"true", argv, envp, 0)
        raise OSError(ctypes.get_errno(), "execveat")

    pid = fork_run(cg, child)
    evs = collect(sensor, exited(pid))
    (ex,) = of(evs, Kind.EXEC, pid)
    assert ex.raw_path == "true" and ex.path == "/usr/bin/true"
    assert ex.argv == ("true", "--viaexecveat")


# -- open ----------------------------------------------------------------------------------


def opens(evs: list[Event], pid: int, needle: str) -> dict[str, Event]:
    return {e.raw_path: e for e in of(evs, Kind.OPEN, pid) if needle in e.path}


def test_open_flags_dirfd_and_chdir(sensor: Sensor, cg: Path, tmp_path: Path) -> None:
    ssh = tmp_path / ".ssh"
    ssh.mkdir()
    (ssh / "id_rsa").write_text("k")
    (tmp_path / "r").write_text("r")
    sub = tmp_path / "sub"
    sub.mkdir()

    def child() -> None:
        for name, flags in (
            (f"{tmp_path}/r", os.O_RDONLY),
            (f"{tmp_path}/w", os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
            (f"{tmp_path}/rw", os.O_RDWR | os.O_CREAT),
        ):
            os.close(os.open(name, flags, 0o600))
        dfd = os.open(ssh, os.O_RDONLY | os.O_DIRECTORY)
        os.close(os.open("id_rsa", os.O_RDONLY, dir_fd=dfd))
        os.chdir(sub)
        os.close(os.open(".././/r", os.O_RDONLY))

    pid = fork_run(cg, child)
    got = opens(collect(sensor, exited(pid)), pid, str(tmp_path))
    assert got[f"{tmp_path}/r"].access == {"read"}
    assert got[f"{tmp_path}/w"].access == {"write", "create", "truncate"}
    assert got[f"{tmp_path}/rw"].access == {"read", "write", "create"}
    assert got[f"{tmp_path}/rw"].ret >= 0
    assert got[f"{tmp_path}/r"].flags == os.O_RDONLY | os.O_CLOEXEC
    assert got["id_rsa"].path == f"{ssh}/id_rsa"
    assert got[".././/r"].path == f"{tmp_path}/r"
    assert not any(e.notes for e in got.values())


def test_short_lived_cd_then_cat(sensor: Sensor, cg: Path, tmp_path: Path) -> None:
    """The 1 ms case: cat is gone long before decode, its cwd comes from the model."""
    (tmp_path / "id_rsa").write_text("k")
    sh = run(cg, ["/bin/sh", "-c", f"cd {tmp_path} && /bin/cat id_rsa"])
    evs = collect(sensor, exited(sh))
    (fork,) = of(evs, Kind.FORK, sh)
    (chdir,) = of(evs, Kind.CHDIR, sh)
    assert chdir.path == str(tmp_path) and chdir.ret == 0
    (cat,) = [e for e in of(evs, Kind.OPEN, fork.child_pid) if e.raw_path == "id_rsa"]
    assert cat.path == f"{tmp_path}/id_rsa" and cat.comm == "cat" and cat.ppid == sh


def test_openat2(sensor: Sensor, cg: Path, tmp_path: Path) -> None:
    (tmp_path / "f2").write_text("x")

    class OpenHow(ctypes.Structure):
        _fields_ = [(n, ctypes.c_uint64) for n in ("flags", "mode", "resolve")]

    def child() -> None:
        dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
        how = OpenHow(os.O_WRONLY | os.O_APPEND, 0, 0)
        fd = libc.syscall(SYS_OPENAT2, dfd, b"f2", ctypes.byref(how), ctypes.sizeof(how))
        if fd < 0:
            raise OSError(ctypes.get_errno(), "openat2")

    pid = fork_run(cg, child)
    got = opens(collect(sensor, exited(pid)), pid, str(tmp_path))
    assert got["f2"].path == f"{tmp_path}/f2" and got["f2"].access == {"write"}
    assert got["f2"].flags & os.O_APPEND


# -- unlink / connect ------------------------------------------------------------------------


def test_unlink_variants(sensor: Sensor, cg: Path, tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / name).write_text("x")
    for name in ("d1", "d2"):
        (tmp_path / name).mkdir()

    def child() -> None:
        dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
        os.unlink(tmp_path / "a")  # unlink(2)
        os.unlink("b", dir_fd=dfd)  # unlinkat(dfd, "b", 0)
        os.rmdir("d1", dir_fd=dfd)  # unlinkat(dfd, "d1", AT_REMOVEDIR)
        os.rmdir(tmp_path / "d2")  # rmdir(2)

    pid = fork_run(cg, child)
    got = {e.path: e for e in of(collect(sensor, exited(pid)), Kind.UNLINK, pid)}
    assert {p: e.is_dir for p, e in got.items()} == {
        f"{tmp_path}/a": False,
        f"{tmp_path}/b": False,
        f"{tmp_path}/d1": True,
        f"{tmp_path}/d2": True,
    }
    assert got[f"{tmp_path}/b"].raw_path == "b"


def test_connect_loopback_and_unix(sensor: Sensor, cg: Path, tmp_path: Path) -> None:
    listeners = []
    v4 = socket.socket(socket.AF_INET)
    v4.bind(("127.0.0.1", 0))
    listeners.append(v4)
    try:
        v6 = socket.socket(socket.AF_INET6)
        v6.bind(("::1", 0))
        listeners.append(v6)
    except OSError:
        v6 = None
    ux = socket.socket(socket.AF_UNIX)
    upath = str(tmp_path / "sock")
    ux.bind(upath)
    listeners.append(ux)
    for s in listeners:
        s.listen()
    v4_addr = v4.getsockname()
    v6_addr = v6.getsockname()[:2] if v6 else None
    targets = [(socket.AF_INET, v4_addr), (socket.AF_UNIX, upath)]
    if v6:
        targets.append((socket.AF_INET6, v6_addr))

    def child() -> None:
        for fam, addr in targets:
            with socket.socket(fam) as c:
                c.connect(addr)

    try:
        pid = fork_run(cg, child)
    finally:
        for s in listeners:
            s.close()
    got = {e.family: e for e in of(collect(sensor, exited(pid)), Kind.CONNECT, pid)}
    assert (got["ipv4"].addr, got["ipv4"].port) == v4_addr
    assert got["unix"].addr == upath and got["unix"].port == 0
    if v6:
        assert (got["ipv6"].addr, got["ipv6"].port) == v6_addr


# -- scope -----------------------------------------------------------------------------------


def test_outside_cgroup_is_silent(sensor: Sensor, cg: Path, tmp_path: Path) -> None:
    marker = tmp_path / f"outside-{uuid.uuid4().hex}"
    marker.write_text("x")
    outside = run(None, ["/bin/cat", str(marker)])
    inside = run(cg, ["/bin/cat", str(marker)])
    evs = collect(sensor, exited(inside))
    assert not [e for e in evs if e.tgid == outside or marker.name in e.path and e.tgid != inside]
    assert [e for e in of(evs, Kind.OPEN, inside) if e.path == str(marker)]


def test_descendant_cgroup_is_watched(sensor: Sensor, cg: Path) -> None:
    child_cg = cgroups.create_cgroup(cg, "nested")
    pid = run(child_cg, ["/bin/true"])
    (ex,) = of(collect(sensor, exited(pid)), Kind.EXEC, pid)
    assert ex.cgroup_id == os.stat(child_cg).st_ino


def test_several_cgroups_at_different_depths(sensor: Sensor, cg: Path) -> None:
    name = f"ebpf-guard-test-{uuid.uuid4().hex[:8]}"
    other = cgroups.create_cgroup(cgroups.find_v2_mount(), name)
    try:
        deep = cgroups.create_cgroup(other, "deep")
        sensor.set_scope(cgroups=[cg, deep])
        in_deep = run(deep, ["/bin/true"])
        in_parent = run(other, ["/bin/true"])  # the parent of a watched cgroup is not watched
        in_first = run(cg, ["/bin/true"])
        evs = collect(sensor, exited(in_deep, in_first))
        assert of(evs, Kind.EXEC, in_deep) and of(evs, Kind.EXEC, in_first)
        assert not [e for e in evs if e.tgid == in_parent]
    finally:
        cgroups.remove_cgroup(other)


def test_process_from_before_attach(sensor: Sensor, tmp_cgroup: Path, tmp_path: Path) -> None:
    """Already in the cgroup when the scope is set: ppid/start_ns/cwd come from /proc."""
    (tmp_path / "f").write_text("x")
    p = subprocess.Popen(
        ["/bin/sh", "-c", "read x; /bin/cat f"], cwd=tmp_path, stdin=subprocess.PIPE,
        preexec_fn=into(tmp_cgroup),
    )  # fmt: skip
    try:
        # The shell already exec'd (known from /proc only) when the scope is set.
        wait_for(lambda: Path(f"/proc/{p.pid}/comm").read_text() == "sh\n", timeout=5)
        sensor.set_scope(cgroups=[tmp_cgroup])
        drain(sensor)
        p.communicate(b"go\n", timeout=scaled(5))
        evs = collect(sensor, exited(p.pid))
        (op,) = [e for e in of(evs, Kind.OPEN) if e.raw_path == "f"]
        assert op.path == f"{tmp_path}/f" and op.ppid == p.pid
        (fork,) = of(evs, Kind.FORK, p.pid)
        assert fork.ppid == os.getpid() and fork.start_ns > 0 and not fork.notes
    finally:
        p.kill()
        sensor.set_scope()


def test_double_forked_setsid_grandchild(sensor: Sensor, cg: Path, tmp_path: Path) -> None:
    marker = tmp_path / "gc"
    marker.write_text("x")
    run(cg, ["/bin/sh", "-c", f"(setsid /bin/sh -c 'sleep 0.1; /bin/cat {marker}' &)"])
    evs = collect(
        sensor, lambda evs: any(e.path == str(marker) and e.comm == "cat" for e in evs)
    )
    (op,) = [e for e in evs if e.path == str(marker)]
    assert op.cgroup_id == os.stat(cg).st_ino


def test_pid_mode_follows_descendants(sensor: Sensor, tmp_cgroup: Path, tmp_path: Path) -> None:
    """--pid: a live child found via /proc, later forks, and a setsid grandchild."""
    m1, m2 = tmp_path / "m1", tmp_path / "m2"
    m1.write_text("1")
    m2.write_text("2")
    script = (
        "/bin/sleep 300 & C=$!; read x; /bin/cat " + str(m1)
        + f"; (setsid /bin/sh -c 'sleep 0.2; /bin/cat {m2}' &); kill $C; wait"
    )
    # The tmp cgroup is only for cleanup: the sensor watches by pid, not by cgroup.
    p = subprocess.Popen(
        ["/bin/sh", "-c", script], stdin=subprocess.PIPE, preexec_fn=into(tmp_cgroup)
    )
    try:
        deadline = time.monotonic() + scaled(5)
        while len(descendants([p.pid])) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        sleeper = (descendants([p.pid]) - {p.pid}).pop()
        sensor.set_scope(pids=[p.pid])
        drain(sensor)
        assert sensor.tracked_count() == 2
        p.communicate(b"go\n", timeout=scaled(5))
        evs = collect(
            sensor,
            lambda evs: {str(m1), str(m2)} <= {e.path for e in evs} and sleeper in {
                e.tgid for e in evs if e.kind is Kind.EXIT
            },
        )
        deadline = time.monotonic() + scaled(5)
        while sensor.tracked_count() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sensor.tracked_count() == 0
        assert all(e.notes == () for e in evs if e.path in (str(m1), str(m2)))
        assert not [e for e in evs if e.tgid == os.getpid()]
    finally:
        p.kill()
        sensor.set_scope()


def test_pid_mode_on_a_zombie_tracks_nothing(sensor: Sensor, tmp_cgroup: Path) -> None:
    """An exited, unreaped process is not live: `watch --pid` must see an empty set."""
    p = subprocess.Popen(["/bin/true"], preexec_fn=into(tmp_cgroup))
    try:
        deadline = time.monotonic() + scaled(5)
        stat = Path(f"/proc/{p.pid}/stat")
        while b") Z" not in stat.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.01)
        sensor.set_scope(pids=[p.pid])
        assert sensor.tracked_count() == 0
    finally:
        p.wait()
        sensor.set_scope()


def test_missing_pid_is_an_error() -> None:
    with pytest.raises(SensorError, match="no process with PID 999999999"):
        Sensor(pids=[999999999]).start()


# -- in-kernel exec kill ---------------------------------------------------------------------


def forbidden_script(tmp_path: Path, marker: Path) -> Path:
    script = tmp_path / f"evil-{uuid.uuid4().hex[:8]}"
    script.write_text(f"#!/bin/sh\necho ran > {marker}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def test_exec_kill_by_name_never_runs(sensor: Sensor, cg: Path, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    script = forbidden_script(tmp_path, marker)
    assert sensor.set_exec_rules(kill_names=[script.name, "x" * 64, "a/b"]) == ["x" * 64, "a/b"]
    sh = run(cg, ["/bin/sh", "-c", f"{script}; echo after $?"])
    evs = collect(sensor, exited(sh))
    (ex,) = [e for e in of(evs, Kind.EXEC) if e.path == str(script)]
    assert NOTE_KILLED in ex.notes
    assert not marker.exists()
    # Outside the watched cgroup the same program runs: the kill is scoped.
    run(None, [str(script)])
    assert marker.read_text() == "ran\n"


def test_exec_kill_by_path(sensor: Sensor, cg: Path, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    script = forbidden_script(tmp_path, marker)
    sensor.set_exec_rules(kill_paths=[str(script)])
    with subprocess.Popen([str(script)], preexec_fn=into(cg)) as p:
        p.wait(timeout=scaled(10))
    assert p.returncode == -9 and not marker.exists()
    evs = collect(sensor, exited(p.pid))
    assert NOTE_KILLED in of(evs, Kind.EXEC, p.pid)[0].notes
    # Another basename in the same directory is not affected.
    other = forbidden_script(tmp_path, tmp_path / "other")
    assert subprocess.run([str(other)], preexec_fn=into(cg), timeout=scaled(10)).returncode == 0


def test_exec_hold_stops_before_the_first_instruction(sensor: Sensor, cg: Path, tmp_path: Path) -> None:
    """A held exec completes but the program runs nothing until SIGCONT."""
    marker = tmp_path / "marker"
    script = forbidden_script(tmp_path, marker)
    sensor.set_exec_rules(hold_names=[script.name])
    with subprocess.Popen([str(script)], preexec_fn=into(cg)) as p:
        try:
            evs = collect(sensor, lambda evs: bool(of(evs, Kind.EXEC, p.pid)))
            assert NOTE_HELD in of(evs, Kind.EXEC, p.pid)[0].notes
            # Stopped (T) once the exec finished, and still nothing has run after a while.
            deadline = time.monotonic() + scaled(5)
            while Path(f"/proc/{p.pid}/stat").read_text().split(") ")[1][0] != "T":
                assert time.monotonic() < deadline, "held process never stopped"
                time.sleep(0.005)
            time.sleep(scaled(0.2))
            assert not marker.exists()
        finally:
            os.kill(p.pid, signal.SIGCONT)
        assert p.wait(timeout=scaled(10)) == 0
    assert marker.read_text() == "ran\n"
    sensor.set_exec_rules()


# -- loss accounting -------------------------------------------------------------------------


def pinned_open(cpu: int) -> None:
    os.sched_setaffinity(0, {cpu})
    os.close(os.open("/dev/null", os.O_RDONLY))


def test_overload_losses_are_counted(sensor: Sensor, tmp_cgroup: Path, tmp_path: Path) -> None:
    """A one-page bulk buffer, never read during the burst: losses > 0, and every open is
    either delivered or counted as lost."""
    sensor.set_scope()
    target = tmp_path / "hot"
    target.write_text("x")
    n = 20_000

    def burst() -> None:
        for _ in range(n):
            os.close(os.open(target, os.O_RDONLY))

    small = Sensor(cgroups=[tmp_cgroup], page_cnt=1, wakeup_events=1)
    small.start()
    try:
        pid = fork_run(tmp_cgroup, burst)
        got = collect(small, exited(pid))
        # A perf buffer reports its losses with the next sample that fits: emit one per CPU.
        for cpu in sorted(os.sched_getaffinity(0)):
            fork_run(tmp_cgroup, lambda c=cpu: pinned_open(c))

        def received() -> int:
            return len([e for e in of(got, Kind.OPEN, pid) if e.path == str(target)])

        # Until every open is accounted for (or the time is up: the assertion below says how).
        deadline = time.monotonic() + scaled(1)
        while received() + small.stats.lost_bulk < n and time.monotonic() < deadline:
            got += small.poll(20)
        got += small.close()
        lost = small.stats.lost_bulk
        assert lost > 0
        assert received() + lost == n
        assert small.stats.events == len(got)
    finally:
        small.close()
