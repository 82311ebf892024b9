"""Reaction benchmark (issue #3): how far an agent gets after a forbidden action.

    sudo .venv/bin/python bench/reaction.py [--trials 100]

One Sensor/Engine/Guard (the real pipeline: Guard.handle, a real VerdictLog and incident
directory in a temp dir, the real Actuator on a real cgroup v2) serves every trial, and the
guard loop (sensor.poll + guard.handle, 2 ms poll timeout like `Session.step`) runs in this
process, interleaved with the trials. The policy is the default one plus one exec KILL rule
for a name the kernel can match (the default policy has none the kernel enforces alone).

Scenarios, measured round-robin in the same run:
  (a)  in-kernel exec kill: the agent execs a program named by a KILL exec rule; the kernel
       SIGKILLs at execve entry.
  (a2) exec gate: the agent execs `rm -r /outside/tmp` (the default policy's recursive-rm,
       KILL) or `curl` (exfil-tool, HALT); the kernel SIGSTOPs the new image before its first
       instruction, the guard decides, then SIGKILLs / freezes + SIGCONTs.
  (b)  userspace HALT: the agent opens a file for writing outside the workspace
       (write-outside-workspace): cgroup.freeze.
  (c)  userspace KILL: the agent opens a file named *id_rsa* (ssh-keys): SIGKILL.

How "syscalls after the trigger" is counted: a small static C agent (compiled here with cc)
shares one page with us (a MAP_SHARED file mapping). It waits for a go byte plus a random
0-3 ms delay (so the trigger lands at a random phase of the guard's poll loop), stores a
CLOCK_MONOTONIC stamp, makes the trigger syscall, then loops { getppid(); count++; stamp }.
For (a)/(a2) the exec'd program is a second tiny binary, built without libc, whose first
instructions map the shared page (fd 3) and count every syscall it completes: the count is
exactly what the program ran (the mmap included). We read the page once the agent is frozen
(cgroup.events says frozen) or dead (its exit event, stamped by the kernel, has arrived).

Times are from the agent's stamp right before the trigger syscall to: the exit tracepoint
(kill rows: "dead"), or the return of Actuator.apply, i.e. cgroup.events showing frozen
(HALT rows: "frozen"). Nothing is asserted: the machine is noisy, compare rows of one run.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import mmap
import os
import platform
import pwd
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ebpf_guard.auditlog import VerdictLog, verify_log  # noqa: E402
from ebpf_guard.enforce import cgroups  # noqa: E402
from ebpf_guard.enforce.actuator import Actuator  # noqa: E402
from ebpf_guard.events import NOTE_KILLED, Kind  # noqa: E402
from ebpf_guard.guard import Guard  # noqa: E402
from ebpf_guard.output import Printer  # noqa: E402
from ebpf_guard.paths import DEFAULT_POLICY  # noqa: E402
from ebpf_guard.policy import load_policy  # noqa: E402
from ebpf_guard.policy.engine import Engine  # noqa: E402
from ebpf_guard.redact import Redactor  # noqa: E402
from ebpf_guard.sensor import Sensor  # noqa: E402
from ebpf_guard.verdicts import Decision, Verdict  # noqa: E402

# Words of the shared page (u64 each).
W_TRIGGER, W_COUNT, W_LAST, W_RAN, W_DELAY = range(5)
PAGE = 4096

AGENT_C = r"""
/* bench/reaction.py agent. argv: SHMFD GOFD MODE PATH [ARGV...]; MODE: read|write|exec */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static uint64_t now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);  /* vDSO: no syscall */
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

int main(int argc, char **argv) {
    if (argc < 5) return 100;
    int shm = atoi(argv[1]), go = atoi(argv[2]);
    volatile uint64_t *c = mmap(0, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, shm, 0);
    if (c == MAP_FAILED) return 101;
    char b;
    if (read(go, &b, 1) != 1) return 102;
    struct timespec d = {0, (long)c[4]};
    if (d.tv_nsec) nanosleep(&d, 0);
    if (strcmp(argv[3], "exec") == 0) {
        if (go == 3 || (shm != 3 && dup2(shm, 3) != 3)) return 103;  /* the counter's fd */
        c[0] = now();
        execv(argv[4], argv + 5);  /* the trigger */
        return 104;
    }
    int flags = strcmp(argv[3], "write") == 0 ? O_WRONLY | O_CREAT | O_TRUNC : O_RDONLY;
    c[0] = now();
    open(argv[4], flags, 0600);  /* the trigger */
    for (uint64_t n = 1;; n++) {
        syscall(SYS_getppid);
        c[1] = n;
        c[2] = now();
    }
}
"""

# No libc: the count starts at the program's first instruction. x86-64 only.
COUNTER_C = r"""
static long sc(long n, long a, long b, long c, long d, long e, long f) {
    register long r10 __asm__("r10") = d;
    register long r8 __asm__("r8") = e;
    register long r9 __asm__("r9") = f;
    long ret;
    __asm__ volatile("syscall" : "=a"(ret)
                     : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
                     : "rcx", "r11", "memory");
    return ret;
}

__attribute__((noreturn)) void _start(void) {
    unsigned long p = (unsigned long)sc(9 /* mmap */, 0, 4096, 3, 1 /* MAP_SHARED */, 3, 0);
    if (p > -4096UL)
        for (;;) sc(60 /* exit */, 99, 0, 0, 0, 0, 0);
    volatile unsigned long *c = (volatile unsigned long *)p;
    c[3] = 1;  /* ran */
    c[1] = 1;  /* the mmap completed */
    for (unsigned long n = 2;; n++) {
        sc(110 /* getppid */, 0, 0, 0, 0, 0, 0);
        c[1] = n;
    }
}
"""

FORBIDDEN = "ebpf-guard-bench-forbidden"

POLICY_YAML = """\
version: 1
extends: {base}
rules:
  - name: bench-forbidden-exec
    description: reaction benchmark only; a name the kernel kills at exec entry
    exec: {{name: {name}}}
    verdict: KILL
    reason: "forbidden program: {{argv}}"
"""


@lru_cache(maxsize=64)
def home_of(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_dir
    except KeyError:
        return None


class _QuietPrinter(Printer):
    """The real Printer, with status lines going to its file instead of our stderr."""

    def message(self, text: str) -> None:
        self.stream.write(f"ebpf-guard: {text}\n")


@dataclass
class Scenario:
    label: str
    mode: str  # agent MODE: read | write | exec
    args: list[str]  # PATH [ARGV...]
    verdict: Verdict  # expected
    rule: str  # expected
    stop: str  # "dead" (exit event) or "frozen" (HALT applied)


@dataclass
class Trial:
    count: int  # syscalls completed after the trigger (by the agent or the exec'd program)
    ran: bool  # exec rows: the exec'd program ran at least one instruction
    response_ns: int  # trigger -> dead / frozen
    acting_ns: int | None  # trigger -> Actuator.apply called (detected, decided, logged)
    last_ran_ns: int | None  # trigger -> the agent's last stamp (open rows)
    rule: str
    verdict: Verdict | None


@dataclass
class Row:
    sc: Scenario
    trials: list[Trial] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def build(tmp: Path) -> tuple[Path, Path]:
    if platform.machine() != "x86_64":
        raise SystemExit("bench/reaction.py: the counter program is x86-64 assembly")
    if shutil.which("cc") is None:
        raise SystemExit("bench/reaction.py: needs a C compiler (cc) for the agent")
    (tmp / "agent.c").write_text(AGENT_C)
    (tmp / "counter.c").write_text(COUNTER_C)
    agent, counter = tmp / "ebpf-guard-bench-agent", tmp / "counter"
    subprocess.run(["cc", "-O2", "-static", "-o", str(agent), str(tmp / "agent.c")], check=True)
    subprocess.run(["cc", "-O2", "-static", "-nostdlib", "-fno-stack-protector",
                    "-fcf-protection=none", "-o", str(counter), str(tmp / "counter.c")], check=True)
    return agent, counter


def pct(values: list[int | float], p: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(values)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


class Bench:
    def __init__(self, *, tmp: Path, outside: Path, cg: Path, step_ms: int) -> None:
        self.cg = cg
        self.step_ms = step_ms
        self.rnd = random.Random(3)
        self.agent, counter = build(tmp)
        bindir = tmp / "bin"
        bindir.mkdir()
        for name in (FORBIDDEN, "rm", "curl"):
            shutil.copy(counter, bindir / name)
        ws = tmp / "workspace"
        ws.mkdir()
        key = ws / "id_rsa_bench"
        key.write_text("not a key\n")
        self.scenarios = [
            Scenario("in-kernel exec kill", "exec", [str(bindir / FORBIDDEN), FORBIDDEN],
                     Verdict.KILL, "bench-forbidden-exec", "dead"),
            Scenario("exec gate -> KILL (rm -r)", "exec",
                     [str(bindir / "rm"), "rm", "-r", "/var/empty/ebpf-guard-bench"],
                     Verdict.KILL, "recursive-rm", "dead"),
            Scenario("exec gate -> HALT (curl)", "exec",
                     [str(bindir / "curl"), "curl", "https://example.invalid/"],
                     Verdict.HALT, "exfil-tool", "frozen"),
            Scenario("userspace HALT (cgroup.freeze)", "write", [str(outside / "outside.txt")],
                     Verdict.HALT, "write-outside-workspace", "frozen"),
            Scenario("userspace KILL (SIGKILL)", "read", [str(key)],
                     Verdict.KILL, "ssh-keys", "dead"),
        ]

        policy_file = tmp / "policy.yaml"
        policy_file.write_text(POLICY_YAML.format(base=DEFAULT_POLICY, name=FORBIDDEN))
        policy = load_policy(policy_file)
        redactor = Redactor(policy.redact)
        self.engine = Engine(policy, workspace=str(ws), home_of=home_of)
        self.log_path = tmp / "log" / "verdicts.jsonl"
        self.log_path.parent.mkdir()
        self.log = VerdictLog(self.log_path, redactor=redactor)
        self.out = open(tmp / "guard.out", "w")  # closed in close()
        printer = _QuietPrinter(redactor=redactor, stream=self.out, quiet=True)
        self.actuator = Actuator(cg, freezer=cgroups.freezer_for(cg), mode=self.engine.mode)
        self.sensor = Sensor(cgroups=[cg])
        t0 = time.monotonic()
        self.sensor.start()
        names, paths = self.engine.kernel_exec_kills()
        gates = self.engine.kernel_exec_gates()
        self.sensor.set_exec_rules(kill_names=names, kill_paths=paths, hold_names=gates)
        self.attach_s = time.monotonic() - t0
        self.kernel_rules = (sorted(names), sorted(gates))
        self.guard = Guard(engine=self.engine, actuator=self.actuator, log=self.log, printer=printer,
                           cgroup=cg, home_of=home_of, incidents_dir=tmp / "log" / "incidents")

        # Observation only: when the guard started and finished acting, per pid.
        self.acts: dict[int, list[tuple[Verdict, int, int]]] = {}
        real_apply = self.actuator.apply

        def timed_apply(decision: Decision) -> str:
            start = time.monotonic_ns()
            try:
                return real_apply(decision)
            finally:
                self.acts.setdefault(decision.event.tgid, []).append(
                    (decision.verdict, start, time.monotonic_ns()))

        self.actuator.apply = timed_apply  # type: ignore[method-assign]
        self.exits: dict[int, int] = {}  # tgid -> kernel timestamp of its exit
        self.execs: set[int] = set()
        self.decisions: dict[int, list[Decision]] = {}

    def close(self) -> None:
        try:
            for ev in self.sensor.close():
                self.guard.handle(ev)
        finally:
            self.log.close()
            self.out.close()

    # -- the guard loop (what Session.step does, plus bookkeeping) ---------------------------

    def step(self, timeout_ms: int) -> None:
        for ev in self.sensor.poll(timeout_ms):
            d = self.guard.handle(ev)
            if ev.kind is Kind.EXIT:
                self.exits[ev.tgid] = ev.ts_ns
            elif ev.kind is Kind.EXEC and (ev.ret == 0 or NOTE_KILLED in ev.notes):
                self.execs.add(ev.tgid)
            if d.verdict is not Verdict.SAFE:
                self.decisions.setdefault(ev.tgid, []).append(d)
        self.guard.tick()

    def _step_until(self, done: Callable[[], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not done():
            if time.monotonic() > deadline:
                return False
            self.step(self.step_ms)
        return True

    # -- one trial -----------------------------------------------------------------------

    def trial(self, sc: Scenario, shm_fd: int, page: mmap.mmap) -> Trial | str:
        words = memoryview(page).cast("Q")
        try:
            for i in range(len(words)):
                words[i] = 0
            words[W_DELAY] = self.rnd.randrange(3_000_000)
            go_r, go_w = os.pipe()
            try:
                p = subprocess.Popen(
                    [str(self.agent), str(shm_fd), str(go_r), sc.mode, *sc.args],
                    pass_fds=(shm_fd, go_r), stdin=subprocess.DEVNULL,
                    preexec_fn=lambda: cgroups.move_pid(self.cg, os.getpid()),
                )  # fmt: skip
            finally:
                os.close(go_r)
            pid = p.pid
            try:
                # Start from the loop's steady state: the agent's own exec has been handled.
                if not self._step_until(lambda: pid in self.execs, 3.0):
                    return "agent start not seen"
                os.write(go_w, b"g")
                if sc.stop == "dead":
                    ok = self._step_until(lambda: pid in self.exits, 3.0)
                else:
                    ok = self._step_until(
                        lambda: any(v is Verdict.HALT for v, _, _ in self.acts.get(pid, ())), 3.0)
                count, ran = words[W_COUNT], bool(words[W_RAN])
                t0, last = words[W_TRIGGER], words[W_LAST]
                if not ok:
                    return f"no response within 3 s (count {count})"
                decs = [d for d in self.decisions.get(pid, ()) if d.verdict is not Verdict.SAFE]
                acts = self.acts.get(pid, [])
                if sc.stop == "dead":
                    response = self.exits[pid] - t0
                else:
                    response = next(end for v, _, end in acts if v is Verdict.HALT) - t0
                return Trial(
                    count=count, ran=ran, response_ns=response,
                    acting_ns=acts[0][1] - t0 if acts else None,
                    last_ran_ns=last - t0 if last else None,
                    rule=decs[0].rule if decs else "", verdict=decs[0].verdict if decs else None,
                )  # fmt: skip
            finally:
                os.close(go_w)
                self._clean(p)
        finally:
            words.release()

    def _clean(self, p: subprocess.Popen) -> None:
        cgroups.kill_cgroup(self.cg)
        if cgroups.is_frozen(self.cg) or (self.cg / "cgroup.freeze").read_text().strip() == "1":
            cgroups.thaw(self.cg)
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        self._step_until(lambda: p.pid in self.exits, 1.0)  # drain its exit event
        cgroups.wait_empty(self.cg, 2.0)
        for table in (self.acts, self.exits, self.decisions):
            table.pop(p.pid, None)
        self.execs.discard(p.pid)


def ms(ns: float | None) -> str:
    return "-" if ns is None else f"{ns / 1e6:.2f}"


def report(rows: list[Row]) -> None:
    sizes = sorted({len(r.trials) for r in rows})
    head = f"reaction (N={sizes[0]}{'-' + str(sizes[-1]) if len(sizes) > 1 else ''} trials each)"
    print(f"\n{head:<34} {'syscalls after trigger':>24}   {'trigger->response ms':>20}")
    print(f"{'':<34} {'p50 / p99 / max':>24}   {'p50 / p99':>20}   response")
    for row in rows:
        ts = row.trials
        if not ts:
            print(f"{row.sc.label:<34} {'no successful trial':>24}")
            continue
        c = [t.count for t in ts]
        r = [t.response_ns for t in ts]
        counts = f"{pct(c, 50):,.0f} / {pct(c, 99):,.0f} / {max(c):,}"
        times = f"{ms(pct(r, 50))} / {ms(pct(r, 99))}"
        what = "process dead (exit tracepoint)" if row.sc.stop == "dead" else "cgroup frozen (cgroup.events)"
        print(f"{row.sc.label:<34} {counts:>24}   {times:>20}   {what}")

    print("\nbreakdown (ms from the trigger, p50 / p99 / max):")
    for row in rows:
        ts = row.trials
        if not ts:
            continue
        acting = [t.acting_ns for t in ts if t.acting_ns is not None]
        last = [t.last_ran_ns for t in ts if t.last_ran_ns is not None]
        parts = []
        if acting:
            parts.append(f"guard acts (detected+decided+logged) {ms(pct(acting, 50))} / "
                         f"{ms(pct(acting, 99))} / {ms(max(acting))}")
        if last:
            parts.append(f"agent's last syscall {ms(pct(last, 50))} / {ms(pct(last, 99))} / {ms(max(last))}")
        if row.sc.mode == "exec":
            parts.append(f"program ran at all: {sum(t.ran for t in ts)}/{len(ts)}")
        rules = {(t.verdict.value if t.verdict else "none", t.rule or "-") for t in ts}
        if rules != {(row.sc.verdict.value, row.sc.rule)}:
            parts.append(f"UNEXPECTED decisions {sorted(rules)}")
        if row.failures:
            parts.append(f"{len(row.failures)} failed trials: {row.failures[:3]}")
        print(f"  {row.sc.label:<32} " + "; ".join(parts))

    rates = [t.count / (t.last_ran_ns / 1e9) for row in rows for t in row.trials
             if row.sc.mode != "exec" and t.last_ran_ns and t.count]
    if rates:
        med = pct(rates, 50)
        print(f"\nagent loop (getppid + 2 stores + vDSO clock read): {med / 1e6:.2f} M syscalls/s "
              f"median ({1e9 / med:.0f} ns each); counts convert to time at that rate.")


def engine_line(events: int) -> None:
    """bench/engine.py's default-policy line, on a smaller event mix."""
    spec = importlib.util.spec_from_file_location("bench_engine", Path(__file__).with_name("engine.py"))
    if spec is None or spec.loader is None:
        return
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    engine = Engine(load_policy(DEFAULT_POLICY), workspace=mod.WS, home_of={1000: mod.HOME}.get)
    mod.run(f"engine only ({events:,} events)", engine, mod.event_mix(events))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--trials", type=int, default=100, help="trials per scenario (default 100)")
    ap.add_argument("--step-ms", type=int, default=2, help="guard poll timeout (Session.step: 2)")
    ap.add_argument("--engine-events", type=int, default=20_000,
                    help="events for the engine-only line (0: skip)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/reaction.py: run as root (bcc, cgroups)")

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)

    tmp = Path(tempfile.mkdtemp(prefix="ebpf-guard-bench-"))
    # Outside the workspace and outside every harmless-writes entry of the default policy.
    outside = Path(tempfile.mkdtemp(prefix="ebpf-guard-bench-", dir="/run"))
    cg = cgroups.create_cgroup(cgroups.find_v2_mount(), f"ebpf-guard-bench-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    bench: Bench | None = None
    shm_fd = os.open(tmp / "counter.page", os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(shm_fd, PAGE)
    page = mmap.mmap(shm_fd, PAGE, mmap.MAP_SHARED)
    rows: list[Row] = []
    try:
        bench = Bench(tmp=tmp, outside=outside, cg=cg, step_ms=args.step_ms)
        kills, gates = bench.kernel_rules
        print(f"sensor attached in {bench.attach_s * 1000:.0f} ms; kernel exec kill names {kills}; "
              f"exec gate names {gates}")
        print(f"cgroup {cg}; guard poll timeout {args.step_ms} ms; trigger 0-3 ms after go (random phase)")
        rows = [Row(sc) for sc in bench.scenarios]
        started = time.monotonic()
        for i in range(args.trials):
            for row in rows:  # round-robin: every row sees the same noise
                result = bench.trial(row.sc, shm_fd, page)
                if isinstance(result, Trial):
                    row.trials.append(result)
                else:
                    row.failures.append(result)
            if (i + 1) % 10 == 0:
                print(f"  {i + 1}/{args.trials} rounds, {time.monotonic() - started:.0f} s", file=sys.stderr)
        report(rows)
        print(f"\nwall time for {args.trials * len(rows)} trials: {time.monotonic() - started:.1f} s")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        args.engine_events = 0
        if rows and all(r.trials for r in rows):
            report(rows)
    finally:
        try:
            cgroups.kill_cgroup(cg)
            if (cg / "cgroup.freeze").read_text().strip() == "1":
                cgroups.thaw(cg)
            cgroups.wait_empty(cg, 5.0)
        finally:
            if bench is not None:
                bench.close()
            cgroups.remove_cgroup(cg)
            page.close()
            os.close(shm_fd)
            if bench is not None:
                v = verify_log(bench.log_path)
                print(f"verdict log: {v.records} records, hash chain {'ok' if v.ok else 'BROKEN: ' + str(v.problem)}")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(outside, ignore_errors=True)
    if args.engine_events:
        engine_line(args.engine_events)


if __name__ == "__main__":
    main()
