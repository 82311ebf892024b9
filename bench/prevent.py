"""Prevention benchmark (issue #10): what each in-kernel layer costs, and how far an agent gets.

    sudo .venv/bin/python bench/prevent.py [--ops 20000] [--reps 3]

Prints, side by side, measured in this one run (ratios, no thresholds):
  (i)   cost per gated operation, for a watched and an unwatched process, and with the layer off:
        fanotify gate (open of a marked file), Landlock jail (open for write in the workspace),
        cgroup-BPF egress (UDP sendto);
  (ii)  cost on ungated syscalls, which should be 0 measurable: an unmarked open with the gate
        on, getppid with the sensor and its hold program attached;
  (iii) reaction: how much of the harm happened after the trigger, per mechanism (key bytes
        read, files deleted out of 1,000, datagrams received, syscalls run by a held program
        under a SIGCONT flood).
Medians of --reps runs; CPU µs/op as the worker measures it (process start excluded).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ebpf_guard.enforce import cgroups  # noqa: E402
from ebpf_guard.enforce.egress import Egress, plan_egress  # noqa: E402
from ebpf_guard.enforce.gates import FileGate, plan_gates, watched_by_cgroup  # noqa: E402
from ebpf_guard.enforce.jail import jail_preexec, landlock_abi, plan_jail  # noqa: E402
from ebpf_guard.paths import POLICY_DIR  # noqa: E402
from ebpf_guard.policy import load_policy, parse_policy  # noqa: E402
from ebpf_guard.policy.identities import compile_identities  # noqa: E402
from ebpf_guard.sensor import Sensor  # noqa: E402

# argv: op target n [port]. Prints: ops cpu_ns. Ops: open_ro, open_wr, getppid, sendto.
WORKER_C = r"""
#include <arpa/inet.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
static long long cpu(void) {
    struct timespec t; clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}
int main(int argc, char **argv) {
    const char *op = argv[1], *target = argv[2]; long n = atol(argv[3]);
    int s = -1; struct sockaddr_in a; memset(&a, 0, sizeof a);
    if (!strcmp(op, "sendto")) {
        s = socket(AF_INET, SOCK_DGRAM, 0); a.sin_family = AF_INET;
        a.sin_port = htons(atoi(argv[4])); inet_pton(AF_INET, target, &a.sin_addr);
    }
    long ok = 0; long long c0 = cpu();
    for (long i = 0; i < n; i++) {
        if (!strcmp(op, "open_ro") || !strcmp(op, "open_wr")) {
            int fd = open(target, op[5] == 'r' ? O_RDONLY : O_WRONLY);
            if (fd >= 0) { ok++; close(fd); }
        } else if (!strcmp(op, "getppid")) {
            syscall(SYS_getppid); ok++;
        } else {
            if (sendto(s, "x", 1, 0, (struct sockaddr *)&a, sizeof a) == 1) ok++;
        }
    }
    printf("%ld %lld\n", ok, cpu() - c0);
    return 0;
}
"""


def build_worker(tmp: Path) -> Path:
    src, exe = tmp / "worker.c", tmp / "worker"
    src.write_text(WORKER_C)
    subprocess.run(["cc", "-O2", "-o", str(exe), str(src)], check=True)
    return exe


def run_worker(worker: Path, args: list[str], n: int, *, cg: Path | None = None,
               preexec: Callable[[], None] | None = None) -> tuple[float, int]:
    """(CPU µs per op, ops that succeeded)."""
    def setup() -> None:
        if cg is not None:
            cgroups.move_pid(cg, os.getpid())
        if preexec is not None:
            preexec()

    argv = [str(worker), args[0], args[1], str(n), *args[2:]]
    out = subprocess.run(argv, preexec_fn=setup, capture_output=True, text=True, check=True).stdout.split()
    return int(out[1]) / n / 1e3, int(out[0])


def median_of(reps: int, f: Callable[[], tuple[float, int]]) -> tuple[float, int]:
    runs = [f() for _ in range(reps)]
    return statistics.median(r[0] for r in runs), runs[-1][1]


@contextlib.contextmanager
def watched_cgroup() -> Iterator[Path]:
    cg = cgroups.create_cgroup(cgroups.find_v2_mount(), f"ebpf-guard-bench-{uuid.uuid4().hex[:8]}")
    try:
        yield cg
    finally:
        cgroups.remove_cgroup(cg, timeout=5)


def row(label: str, cells: list[str]) -> None:
    print(f"    {label:<44}" + "".join(f"{c:>16}" for c in cells))


def us(x: tuple[float, int]) -> str:
    return f"{x[0]:.3f} ({x[1]})"


def bench_gate(worker: Path, tmp: Path, cg: Path, n: int, reps: int) -> list[str]:
    secret, plain = tmp / "secret", tmp / "plain"
    secret.write_text("key")
    plain.write_text("x")
    policy = parse_policy(f"version: 1\nrules:\n  - name: bench-secret\n    open: {{path: [{secret}]}}\n"
                          "    verdict: KILL\n")
    plan = plan_gates(policy, workspace=None, homes=[], identities=compile_identities(policy, homes=[]))
    off_marked = median_of(reps, lambda: run_worker(worker, ["open_ro", str(secret)], n))
    off_plain = median_of(reps, lambda: run_worker(worker, ["open_ro", str(plain)], n))
    with FileGate(plan, is_watched=watched_by_cgroup(cg)) as gate:
        unwatched = median_of(reps, lambda: run_worker(worker, ["open_ro", str(secret)], n))
        watched = median_of(reps, lambda: run_worker(worker, ["open_ro", str(secret)], n, cg=cg))
        on_plain = median_of(reps, lambda: run_worker(worker, ["open_ro", str(plain)], n, cg=cg))
        stats = gate.stats
    print("\n(i) fanotify gate: open+close of the marked file, CPU µs/op of the opener (ops that succeeded)")
    row("", ["gate off", "unwatched", "watched"])
    row("marked file", [us(off_marked), us(unwatched), us(watched)])
    print(f"    the answering thread: {stats.denied} denied, {stats.allowed_unwatched} allowed unwatched; "
          f"an unwatched opener waited {stats.unwatched_wait_total_us / max(stats.unwatched_waits, 1):.1f} µs "
          f"on average (max {stats.unwatched_wait_max_us:.0f} µs), wall time the CPU figure does not show")
    return [f"ungated open (unmarked file), gate on vs off: {on_plain[0] - off_plain[0]:+.3f} µs/op "
            f"({off_plain[0]:.3f} -> {on_plain[0]:.3f})"]


def bench_jail(worker: Path, tmp: Path, n: int, reps: int) -> None:
    ws = tmp / "ws"
    ws.mkdir()
    target = ws / "d1" / "d2" / "d3" / "file"
    target.parent.mkdir(parents=True)
    target.write_text("x")
    abi = landlock_abi()
    if not abi:
        print("\n(i) Landlock jail: not available here")
        return
    plan = plan_jail(load_policy(POLICY_DIR / "default.yaml"), workspace=str(ws), homes=["/root"], abi=abi)
    with jail_preexec(plan) as jail:
        jailed_w = median_of(reps, lambda: run_worker(worker, ["open_wr", str(target)], n, preexec=jail))
        jailed_r = median_of(reps, lambda: run_worker(worker, ["open_ro", str(target)], n, preexec=jail))
        outside = median_of(reps, lambda: run_worker(worker, ["open_wr", str(tmp / "secret")], n, preexec=jail))
    free_w = median_of(reps, lambda: run_worker(worker, ["open_wr", str(target)], n))
    free_r = median_of(reps, lambda: run_worker(worker, ["open_ro", str(target)], n))
    print(f"\n(i) Landlock jail (ABI {abi}): open+close in the workspace, CPU µs/op (ops that succeeded)")
    row("", ["not jailed", "jailed"])
    row("open for write (gated by the jail)", [us(free_w), us(jailed_w)])
    row("open for read (not handled: ungated)", [us(free_r), us(jailed_r)])
    row("open for write outside the workspace", ["", us(outside)])


def bench_egress(worker: Path, cg: Path, n: int, reps: int) -> None:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    port = rx.getsockname()[1]
    policy = parse_policy(f"version: 1\nrules:\n  - name: bench-deny\n    connect: {{port: [{port + 1}]}}\n"
                          "    verdict: KILL\n")
    off = median_of(reps, lambda: run_worker(worker, ["sendto", "127.0.0.1", str(port)], n, cg=cg))
    with Egress(cg, plan_egress(policy)):
        allowed = median_of(reps, lambda: run_worker(worker, ["sendto", "127.0.0.1", str(port)], n, cg=cg))
        denied = median_of(reps, lambda: run_worker(worker, ["sendto", "127.0.0.1", str(port + 1)], n, cg=cg))
        unwatched = median_of(reps, lambda: run_worker(worker, ["sendto", "127.0.0.1", str(port)], n))
    rx.close()
    print("\n(i) cgroup-BPF egress: UDP sendto of 1 byte to loopback, CPU µs/op (datagrams sent)")
    row("", ["programs off", "watched allowed", "watched denied", "unwatched"])
    row("sendto", [us(off), us(allowed), us(denied), us(unwatched)])


def bench_sensor_hold(worker: Path, cg: Path, n: int, reps: int) -> list[str]:
    before = median_of(reps, lambda: run_worker(worker, ["getppid", "-"], n))
    sensor = Sensor(cgroups=[cg])
    sensor.start()
    try:
        sensor.set_rate_rules(3, 10 * 10**9, [])
        with_sensor = median_of(reps, lambda: run_worker(worker, ["getppid", "-"], n))
    finally:
        sensor.close()
    return [f"ungated getppid of an unwatched process, sensor (with its hold check on every syscall) "
            f"attached vs not: {with_sensor[0] - before[0]:+.3f} µs/op ({before[0]:.3f} -> {with_sensor[0]:.3f})"]


def make_tree(tree: Path, files: int = 1000) -> None:
    for i in range(files):
        (tree / f"d{i % 10}").mkdir(parents=True, exist_ok=True)
        (tree / f"d{i % 10}" / f"f{i}").write_text("x")


def reaction(tmp: Path, cg: Path) -> list[str]:
    """How much harm each mechanism let through after the trigger."""
    out = []
    secret = tmp / "secret"
    policy = parse_policy(f"version: 1\nrules:\n  - name: bench-secret\n    open: {{path: [{secret}]}}\n"
                          "    verdict: KILL\n")
    plan = plan_gates(policy, workspace=None, homes=[], identities=compile_identities(policy, homes=[]))
    with FileGate(plan, is_watched=watched_by_cgroup(cg)):
        got = subprocess.run(["cat", str(secret)], capture_output=True,
                             preexec_fn=lambda: cgroups.move_pid(cg, os.getpid())).stdout
    out.append(f"fanotify gate: key bytes read by a watched cat: {len(got)}")

    tree = tmp / "outside" / "tree"
    make_tree(tree)
    ws = tmp / "ws"
    abi = landlock_abi()
    if abi:
        plan_j = plan_jail(load_policy(POLICY_DIR / "default.yaml"), workspace=str(ws), homes=["/root"], abi=abi)
        with jail_preexec(plan_j) as jail:
            subprocess.run([sys.executable, "-c", f"import shutil; shutil.rmtree({str(tree)!r}, ignore_errors=True)"],
                           preexec_fn=jail)
        left = sum(1 for p in tree.rglob("*") if p.is_file())
        out.append(f"Landlock jail: files deleted by a jailed shutil.rmtree outside the workspace: {1000 - left}/1000")

    make_tree(tree)
    sensor = Sensor(cgroups=[cg])
    sensor.start()
    try:
        sensor.set_rate_rules(3, 10 * 10**9, [])
        p = subprocess.Popen(["find", str(tree), "-type", "f", "-delete"],
                             preexec_fn=lambda: cgroups.move_pid(cg, os.getpid()))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and p.pid not in sensor.held():
            sensor.poll(5)
        time.sleep(0.2)
        left = sum(1 for p_ in tree.rglob("*") if p_.is_file())
        out.append(f"kernel rate hold (count 3): files deleted by find -delete before it was held: {1000 - left}/1000")
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        sensor.reset_rate()
    finally:
        sensor.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ops", type=int, default=20000)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/prevent.py: needs root")
    # Not under /tmp or /var/tmp: the default policy treats those as scratch (writable in the
    # jail, deletions there not counted), and "outside the workspace" must be outside them.
    tmp = Path(tempfile.mkdtemp(prefix="ebpf-guard-prevent-", dir="/var/lib"))
    t0 = time.monotonic()
    try:
        worker = build_worker(tmp)
        with watched_cgroup() as cg:
            ungated = bench_gate(worker, tmp, cg, args.ops, args.reps)
            bench_jail(worker, tmp, args.ops, args.reps)
            bench_egress(worker, cg, args.ops, args.reps)
            ungated += bench_sensor_hold(worker, cg, args.ops * 10, args.reps)
            print("\n(ii) cost on ungated syscalls")
            for line in ungated:
                print(f"    {line}")
            print("\n(iii) reaction: harm after the trigger")
            for line in reaction(tmp, cg):
                print(f"    {line}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n(one run, {time.monotonic() - t0:.0f} s)")


if __name__ == "__main__":
    main()
