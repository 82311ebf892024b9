"""Holds the held process cannot undo, the kernel's deletion-rate hold, and the open-flags map:
real BPF programs, real processes in a real cgroup, effects checked (files, a listener).

One Sensor is loaded for the module and re-targeted per test with set_scope().
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ebpf_guard.enforce import cgroups
from ebpf_guard.events import NOTE_HELD, NOTE_RATE_HELD, Event, Kind
from ebpf_guard.sensor import Sensor
from tests.conftest import _scratch_dir, requires_bpf
from tests.helpers import scaled, wait_for

pytestmark = requires_bpf

WINDOW_NS = 10 * 10**9
FILES = 1000

# The gated tool: dynamically linked like the real curl, so ld.so's syscalls come first. If it
# ever runs its main(), it leaves a marker and sends a byte to the listener.
CURL_C = r"""
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int fd = open(argv[2], O_CREAT | O_WRONLY, 0600);
    if (fd >= 0) { write(fd, "ran\n", 4); close(fd); }
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(s, (struct sockaddr *)&a, sizeof a) == 0) write(s, "leak", 4);
    return 0;
}
"""

# The same, where there is no C compiler (the Debian guest of vagrant/qemu.sh): a script, whose
# exec runs /bin/sh (also dynamically linked).
CURL_SH = """#!/bin/sh
echo ran > "$2"
exec python3 -c 'import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1]))).sendall(b"leak")' "$1"
"""

# Another process of the agent continuing the held one, again and again.
FLOOD = """
import os, sys, time
pid, end = int(sys.argv[1]), time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    try:
        os.kill(pid, 18)
    except ProcessLookupError:
        break
"""

# A parent that asks for no stop/continue notifications (SIGCHLD ignored): its held child does
# not pass through the CLD_CONTINUED notification on its way out of the stop.
IGNORING_PARENT = """
import os, signal, sys, time
signal.signal(signal.SIGCHLD, signal.SIG_IGN)
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
print(pid, flush=True)
while os.path.exists(f"/proc/{pid}"):
    time.sleep(0.01)
"""

# A deleter with a second thread that makes syscalls all the time: a group stop reaches that
# thread a moment after the deleting one, and it must not be killed for entering a syscall then.
THREADED_DELETER = """
import os, sys, threading
def busy():
    while True:
        os.getppid()
threading.Thread(target=busy, daemon=True).start()
d = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
for name in sorted(os.listdir(d)):
    os.unlink(name, dir_fd=d)
"""


# -- helpers ---------------------------------------------------------------------------------


def into(cg: Path) -> Callable[[], None]:
    return lambda: cgroups.move_pid(cg, os.getpid())


def proc_state(pid: int) -> str:
    """The one-letter state of /proc/PID/stat ("" once gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def stopped(pid: int) -> bool:
    return proc_state(pid) == "T"


def collect(sensor: Sensor, done: Callable[[list[Event]], bool], timeout: float = 5) -> list[Event]:
    events: list[Event] = []
    deadline = time.monotonic() + scaled(timeout)
    while time.monotonic() < deadline:
        events += sensor.poll(20)
        if done(events):
            return events
    raise AssertionError(f"timed out; got {len(events)} events")


def of(events: list[Event], kind: Kind, pid: int) -> list[Event]:
    return [e for e in events if e.kind is kind and e.tgid == pid]


def send_from_elsewhere(pid: int, sig: int) -> None:
    """Signal pid from a process that is not the guard (not this test process)."""
    subprocess.run(["kill", f"-{sig}", str(pid)], check=True, timeout=scaled(10))


def tree(root: Path, n: int = FILES) -> Path:
    """root/tree with n files in 10 subdirectories."""
    top = root / "tree"
    for i in range(n):
        sub = top / f"d{i % 10}"
        if i < 10:
            sub.mkdir(parents=True)
        (sub / f"f{i}").write_bytes(b"x")
    return top


def files_in(top: Path) -> int:
    return sum(len(names) for _, _, names in os.walk(top))


def identity(path: str | Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


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
    """A fresh cgroup, watched alone; rules off before and after."""
    sensor.set_exec_rules()
    sensor.set_rate_rules(0, 0)
    sensor.set_scope(cgroups=[tmp_cgroup])
    while sensor.poll(0):
        pass
    try:
        yield tmp_cgroup
    finally:
        sensor.set_scope()
        sensor.set_exec_rules()
        sensor.set_rate_rules(0, 0)


@pytest.fixture(scope="module")
def curl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The gated program, named curl: compiled from CURL_C, or the CURL_SH script."""
    d = tmp_path_factory.mktemp("gated")
    if shutil.which("cc") is None:
        (d / "curl").write_text(CURL_SH)
        (d / "curl").chmod(0o755)
        return d / "curl"
    (d / "curl.c").write_text(CURL_C)
    subprocess.run(["cc", "-O2", "-o", str(d / "curl"), str(d / "curl.c")], check=True, timeout=scaled(60))
    return d / "curl"


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    s.setblocking(False)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def outside() -> Iterator[Path]:
    """Not scratch: under /var/lib (the kernel's scratch dirs are /tmp and the like)."""
    yield from _scratch_dir("outside")


def received(listener: socket.socket) -> bytes:
    """Everything sent to the listener so far (b"" if nobody connected)."""
    try:
        conn, _ = listener.accept()
    except BlockingIOError:
        return b""
    with conn:
        conn.settimeout(scaled(5))
        return conn.recv(16)


def start_held(sensor: Sensor, cg: Path, curl: Path, listener: socket.socket, marker: Path) -> subprocess.Popen:
    """The gated program, stopped by the kernel at its exec and marked held."""
    sensor.set_exec_rules(hold_names=["curl"])
    p = subprocess.Popen([str(curl), str(listener.getsockname()[1]), str(marker)], preexec_fn=into(cg))
    wait_for(lambda: stopped(p.pid) and p.pid in sensor.held(), timeout=10)
    return p


# -- 1. the exec hold --------------------------------------------------------------------------


def test_a_sigcont_flood_kills_the_held_program_before_it_does_anything(
        sensor: Sensor, cg: Path, curl: Path, listener: socket.socket, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    p = start_held(sensor, cg, curl, listener, marker)
    try:
        flood = subprocess.run([sys.executable, "-c", FLOOD, str(p.pid), str(scaled(1.0))],
                               preexec_fn=into(cg), timeout=scaled(30))
        assert flood.returncode == 0
        assert p.wait(timeout=scaled(10)) == -signal.SIGKILL
    finally:
        p.kill()
        p.wait()
    assert not marker.exists(), "the held program ran its main()"
    assert received(listener) == b"", "the held program reached the listener"
    evs = collect(sensor, lambda evs: bool(of(evs, Kind.EXIT, p.pid)))
    execs = of(evs, Kind.EXEC, p.pid)
    assert execs and NOTE_HELD in execs[-1].notes
    # Not even ld.so got to map the libraries: the first syscall after the SIGCONT was its last.
    after = [e for e in of(evs, Kind.MMAP_EXEC, p.pid) + of(evs, Kind.OPEN, p.pid) if e.ts_ns > execs[-1].ts_ns]
    assert after == []
    assert p.pid not in sensor.held()


def test_a_sigcont_flood_kills_it_even_when_its_parent_ignores_sigchld(
        sensor: Sensor, cg: Path, curl: Path, listener: socket.socket, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    sensor.set_exec_rules(hold_names=["curl"])
    argv = [str(curl), str(listener.getsockname()[1]), str(marker)]
    parent = subprocess.Popen([sys.executable, "-c", IGNORING_PARENT, *argv], preexec_fn=into(cg),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
        wait_for(lambda: stopped(pid) and pid in sensor.held(), timeout=10)
        subprocess.run([sys.executable, "-c", FLOOD, str(pid), str(scaled(1.0))], preexec_fn=into(cg),
                       timeout=scaled(30), check=True)
        assert parent.wait(timeout=scaled(10)) == 0  # its child is gone
    finally:
        parent.kill()
        parent.wait()
    assert not marker.exists(), "the held program ran its main()"
    assert received(listener) == b"", "the held program reached the listener"
    assert pid not in sensor.held()


@pytest.mark.parametrize("how", ["release_held", "guard_sigcont"])
def test_a_released_program_runs_to_completion(
        sensor: Sensor, cg: Path, curl: Path, listener: socket.socket, tmp_path: Path, how: str) -> None:
    marker = tmp_path / "marker"
    p = start_held(sensor, cg, curl, listener, marker)
    try:
        time.sleep(scaled(0.2))
        assert stopped(p.pid) and not marker.exists()
        if how == "release_held":
            assert sensor.release_held(p.pid)
            assert p.pid not in sensor.held()
            assert not sensor.release_held(p.pid), "released twice"
            send_from_elsewhere(p.pid, signal.SIGCONT)  # any SIGCONT will do now
        else:
            os.kill(p.pid, signal.SIGCONT)  # the guard's own SIGCONT releases by itself
        assert p.wait(timeout=scaled(10)) == 0
    finally:
        p.kill()
        p.wait()
    assert marker.read_text() == "ran\n"
    assert received(listener) == b"leak"
    assert sensor.held() == []


def test_the_mark_goes_with_the_process(
        sensor: Sensor, cg: Path, curl: Path, listener: socket.socket, tmp_path: Path) -> None:
    p = start_held(sensor, cg, curl, listener, tmp_path / "marker")
    p.kill()
    p.wait(timeout=scaled(10))
    # Cleared at exit, not left for the next process that gets this pid.
    b = sensor._require()
    wait_for(lambda: len(b[b"held"]) == 0, timeout=5)
    assert sensor.held() == []
    assert b[b"held_count"][0].value == 0


# -- 2. the deletion-rate hold -----------------------------------------------------------------


def scratch_identities() -> list[tuple[int, int]]:
    return [identity(d) for d in ("/tmp", "/var/tmp", "/dev/shm") if os.path.isdir(d)]


def held_deleter(sensor: Sensor, cg: Path, argv: list[str], top: Path) -> subprocess.Popen:
    """Start a deleter of `top`; it is stopped by the kernel after its third deletion."""
    sensor.reset_rate()
    p = subprocess.Popen(argv, preexec_fn=into(cg), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: stopped(p.pid) and p.pid in sensor.held(), timeout=20)
    except AssertionError:
        p.kill()
        p.wait()
        raise
    return p


@pytest.mark.parametrize("deleter", ["find", "rm", "rmtree"])
def test_a_mass_delete_is_stopped_at_the_third_deletion(
        sensor: Sensor, cg: Path, outside: Path, deleter: str) -> None:
    sensor.set_rate_rules(3, WINDOW_NS, scratch_identities())
    top = tree(outside)
    argv = {
        "find": ["find", str(top), "-delete"],
        "rm": ["rm", "-r", str(top)],
        "rmtree": [sys.executable, "-c", "import shutil, sys; shutil.rmtree(sys.argv[1])", str(top)],
    }[deleter]
    p = held_deleter(sensor, cg, argv, top)
    try:
        time.sleep(scaled(0.2))
        left = files_in(top)
        assert left >= FILES - 10, f"only {left} of {FILES} files left"
        assert stopped(p.pid)
        send_from_elsewhere(p.pid, signal.SIGCONT)  # the agent continuing its own deleter
        assert p.wait(timeout=scaled(10)) == -signal.SIGKILL
    finally:
        p.kill()
        p.wait()
    assert files_in(top) == left, "deletions went on after the hold"
    evs = collect(sensor, lambda evs: any(NOTE_RATE_HELD in e.notes for e in of(evs, Kind.UNLINK, p.pid)))
    unlinks = of(evs, Kind.UNLINK, p.pid)
    assert NOTE_RATE_HELD in unlinks[-1].notes


def test_a_deletion_under_a_symlink_into_scratch_is_no_scratch_deletion(
        sensor: Sensor, cg: Path, outside: Path, tmp_path: Path) -> None:
    """Scratch is an object, not a string: /tmp/link/... deletes files of the target."""
    sensor.set_rate_rules(3, WINDOW_NS, scratch_identities())
    top = tree(outside)
    link = tmp_path / "link"
    link.symlink_to(top)
    p = held_deleter(sensor, cg, ["find", f"{link}/", "-delete"], top)
    try:
        assert files_in(top) >= FILES - 10
    finally:
        p.kill()
        p.wait()


def test_a_threaded_deleter_is_stopped_not_killed_and_can_be_released(
        sensor: Sensor, cg: Path, outside: Path) -> None:
    sensor.set_rate_rules(3, WINDOW_NS, scratch_identities())
    top = outside / "flat"
    top.mkdir()
    for i in range(FILES):
        (top / f"f{i}").write_bytes(b"x")
    p = held_deleter(sensor, cg, [sys.executable, "-c", THREADED_DELETER, str(top)], top)
    try:
        time.sleep(scaled(0.3))
        assert stopped(p.pid), f"state {proc_state(p.pid)!r}: the busy thread got it killed"
        left = len(os.listdir(top))
        assert left >= FILES - 10
        # Released with the rule still on: three more deletions, and it is held again.
        sensor.reset_rate()
        assert sensor.release_held(p.pid)
        send_from_elsewhere(p.pid, signal.SIGCONT)
        wait_for(lambda: len(os.listdir(top)) == left - 3 and stopped(p.pid) and p.pid in sensor.held(),
                 timeout=10)
        # The guard switches the rule off and lets it finish.
        sensor.set_rate_rules(0, 0)
        assert sensor.release_held(p.pid)
        send_from_elsewhere(p.pid, signal.SIGCONT)
        assert p.wait(timeout=scaled(30)) == 0
    finally:
        p.kill()
        p.wait()
    assert os.listdir(top) == []


def test_a_mass_delete_under_a_scratch_directory_completes(
        sensor: Sensor, cg: Path, outside: Path, tmp_path: Path) -> None:
    scratch = outside / "cache"
    scratch.mkdir()
    sensor.set_rate_rules(3, WINDOW_NS, [identity(scratch), *scratch_identities()])
    for root, argv in (
        (scratch, lambda top: ["rm", "-r", str(top)]),
        # tmp_path is beneath /tmp; named through /proc/self/root, which is no string prefix of it.
        (tmp_path, lambda top: ["find", f"/proc/self/root{top}", "-delete"]),
    ):
        top = tree(root)
        sensor.reset_rate()
        p = subprocess.run(argv(top), preexec_fn=into(cg), timeout=scaled(60), capture_output=True)
        assert p.returncode == 0, p.stderr
        assert not top.exists()
    assert sensor.held() == []


# -- 3. open flags ---------------------------------------------------------------------------


OPENER = """
import ctypes, os, sys
if sys.argv[2] == "creat":
    fd = ctypes.CDLL(None).creat(sys.argv[1].encode(), 0o600)
else:
    fd = os.open(sys.argv[1], os.O_WRONLY)
print("opened", flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize("call", ["open", "creat"])
def test_open_flags_of_an_open_in_progress(sensor: Sensor, cg: Path, tmp_path: Path, call: str) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    p = subprocess.Popen([sys.executable, "-c", OPENER, str(fifo), call], preexec_fn=into(cg),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        # Blocked in the open of the FIFO until a reader comes (the main thread: tid = pid).
        wait_for(lambda: (sensor.open_flags(p.pid) or 0) & os.O_ACCMODE == os.O_WRONLY
                 and proc_state(p.pid) == "S", timeout=10)
        flags = sensor.open_flags(p.pid)
        assert flags is not None and flags & os.O_ACCMODE == os.O_WRONLY
        if call == "creat":
            assert flags & (os.O_CREAT | os.O_TRUNC) == os.O_CREAT | os.O_TRUNC
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        try:
            assert p.stdout is not None and p.stdout.readline() == "opened\n"
            if call == "open":
                assert sensor.open_flags(p.pid) is None  # removed when the open returned
        finally:
            os.close(reader)
    finally:
        p.kill()
        p.communicate(timeout=scaled(10))
    assert sensor.open_flags(p.pid) is None  # and at the thread's exit
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
