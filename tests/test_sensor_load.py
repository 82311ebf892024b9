"""Every program of the real sensor loads, is attached, and runs, on the kernel at hand.

A verifier accepts or rejects each program on its own, and verifiers differ (Debian 12's 6.1
rejected a loop 6.18 accepted): run this on each kernel of the matrix (vagrant/qemu.sh). The
programs are listed from the source and from the compiled object, so a new one is covered
without touching this file.
"""

from __future__ import annotations

import ctypes
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

from ebpf_guard import host
from ebpf_guard.sensor import SOURCE, Sensor
from tests.conftest import requires_bpf

pytestmark = requires_bpf

TRACEPOINT_PROBE = re.compile(r"^TRACEPOINT_PROBE\(\s*(\w+)\s*,\s*(\w+)\s*\)", re.MULTILINE)
RAW_TRACEPOINT_PROBE = re.compile(r"^RAW_TRACEPOINT_PROBE\(\s*(\w+)\s*\)", re.MULTILINE)

# x86_64 syscall numbers: the calls glibc may route elsewhere (open -> openat, ...) are made raw,
# so that each tracepoint of the sensor is hit for certain.
SYS = {"open": 2, "creat": 85, "chdir": 80, "fchdir": 81, "rmdir": 84, "unlink": 87, "openat": 257, "unlinkat": 263,
       "execveat": 322, "bpf": 321, "openat2": 437, "rename": 82, "renameat": 264, "renameat2": 316,
       "link": 86, "linkat": 265, "symlink": 88, "symlinkat": 266, "truncate": 76, "ftruncate": 77,
       "io_uring_setup": 425, "ptrace": 101, "sendmmsg": 307}  # x86_64
BPF_ENABLE_STATS, BPF_STATS_RUN_TIME = 32, 0
AT_FDCWD, AT_REMOVEDIR = -100, 0x200

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

# A child that execs through execveat (the Python stdlib has no execveat): once in vain, since a
# successful execveat leaves through sys_exit_execve (measured on 6.18: the exit tracepoint is
# picked by the syscall number the new image is set up with), then for real.
EXECVEAT = f"""
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
argv = (ctypes.c_char_p * 2)(b"/bin/true", None)
envp = (ctypes.c_char_p * 1)(None)
libc.syscall({SYS["execveat"]}, {AT_FDCWD}, b"/no/such/program", argv, envp, 0)
libc.syscall({SYS["execveat"]}, {AT_FDCWD}, b"/bin/true", argv, envp, 0)
raise SystemExit(f"execveat failed: errno {{ctypes.get_errno()}}")
"""


def _sys(name: str, *args: object) -> int:
    return libc.syscall(SYS[name], *args)


def hit_every_tracepoint(tmp: Path) -> None:
    """One syscall (or process event) of each kind the sensor traces; results do not matter."""
    path = str(tmp / "f").encode()
    opened = [_sys("open", path, os.O_CREAT | os.O_WRONLY, 0o600), _sys("openat", AT_FDCWD, path, os.O_RDONLY)]
    if "creat" in SYS:
        opened.append(_sys("creat", path, 0o600))
    for fd in opened:
        if fd >= 0:
            os.close(fd)
    how = (ctypes.c_uint64 * 3)(os.O_RDONLY, 0, 0)  # struct open_how
    fd = _sys("openat2", AT_FDCWD, path, how, ctypes.sizeof(how))
    if fd >= 0:
        os.close(fd)
    cwd = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        _sys("chdir", str(tmp).encode())
        _sys("fchdir", cwd)
    finally:
        os.fchdir(cwd)
        os.close(cwd)
    _sys("unlink", path)
    _sys("unlinkat", AT_FDCWD, str(tmp / "absent").encode(), 0)
    _sys("rmdir", str(tmp / "absent-dir").encode())
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(tmp / "no-such-socket"))
        except OSError:
            pass
    a, b = str(tmp / "a").encode(), str(tmp / "b").encode()
    _sys("rename", a, b)
    _sys("renameat", AT_FDCWD, a, AT_FDCWD, b)
    _sys("renameat2", AT_FDCWD, a, AT_FDCWD, b, 0)
    _sys("link", a, b)
    _sys("linkat", AT_FDCWD, a, AT_FDCWD, b, 0)
    _sys("symlink", a, b)
    _sys("symlinkat", a, AT_FDCWD, b)
    _sys("truncate", a, 0)
    _sys("ftruncate", -1, 0)
    _sys("io_uring_setup", 0, None)  # EINVAL: 0 entries
    _sys("ptrace", 16, 0, None, None)  # PTRACE_ATTACH to pid 0: ESRCH
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        dest = ("127.0.0.1", 9)
        s.sendto(b"x", dest)
        s.sendmsg([b"x"], [], 0, dest)
        msg = (ctypes.c_char * 64)()  # struct mmsghdr, all zero: no destination
        _sys("sendmmsg", s.fileno(), msg, 1, 0)
    subprocess.run(["/bin/true"], check=True)  # fork, execve, exit
    subprocess.run([sys.executable, "-c", EXECVEAT], check=True)  # execveat


def run_counts(sensor: Sensor) -> dict[str, int]:
    """Program -> how often it ran (fdinfo run_cnt; counted while BPF stats are enabled)."""
    counts = {}
    for name, fn in sensor._require().funcs.items():
        info = Path(f"/proc/self/fdinfo/{fn.fd}").read_text()
        match = re.search(r"^run_cnt:\s*(\d+)", info, re.MULTILINE)
        counts[name.decode()] = int(match.group(1)) if match else -1
    return counts


def test_every_program_is_attached_and_runs(tmp_path: Path) -> None:
    text = SOURCE.read_text()
    in_source = {f"{cat}:{event}" for cat, event in TRACEPOINT_PROBE.findall(text)}
    in_source |= {f"raw:{event}" for event in RAW_TRACEPOINT_PROBE.findall(text)}
    assert len(in_source) >= 20, "the TRACEPOINT_PROBE pattern no longer matches bpf/sensor.c"
    before = host.bpf_prog_fds()
    # Run counts: BPF_ENABLE_STATS counts while its fd is open, for this test only (unlike the
    # kernel.bpf_stats_enabled sysctl, which other processes may be using).
    attr = ctypes.c_uint32(BPF_STATS_RUN_TIME)
    stats = _sys("bpf", BPF_ENABLE_STATS, ctypes.byref(attr), ctypes.sizeof(attr))
    assert stats >= 0, f"BPF_ENABLE_STATS: errno {ctypes.get_errno()}"
    sensor = Sensor()
    try:
        sensor.start()
        programs = sensor.programs
        hit_every_tracepoint(tmp_path)
        counts = run_counts(sensor)
    finally:
        os.close(stats)
        sensor.close()
    unattached = sorted(p for p, point in programs.items() if not point)
    assert not unattached, f"loaded but not attached: {unattached}"
    assert set(programs.values()) == in_source, "the object's programs are not the source's TRACEPOINT_PROBEs"
    idle = sorted(p for p, n in counts.items() if n <= 0)
    assert not idle, f"attached but never ran (run_cnt 0): {idle}"
    assert host.bpf_prog_fds() == before, "programs still loaded after close()"
