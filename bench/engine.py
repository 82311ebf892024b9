"""Engine throughput: events/s with the default policy and with 500 generated rules.

    .venv/bin/python bench/engine.py [--events 200000]

The event mix imitates a coding agent: mostly reads (sources, libraries), some writes in
the workspace and /tmp, execs with forks/exits, a few unlinks and connects.
"""

from __future__ import annotations

import argparse
import random
import time

from ebpf_guard.events import CREATE, READ, TRUNCATE, WRITE, Event, Kind
from ebpf_guard.paths import DEFAULT_POLICY
from ebpf_guard.policy import load_policy, parse_policy
from ebpf_guard.policy.engine import Engine

HOME = "/home/dev"
WS = "/home/dev/project"
BINS = ["git", "python3", "ls", "cat", "grep", "gcc", "make", "node", "sed", "pip"]


def event_mix(n: int, seed: int = 1) -> list[Event]:
    rnd = random.Random(seed)
    evs: list[Event] = []
    t = 1_000_000_000_000
    pids = [100]
    next_pid = 101
    for _ in range(n):
        t += rnd.randrange(50_000, 2_000_000)  # 0.05-2 ms apart
        pid = rnd.choice(pids)
        base = dict(ts_ns=t, pid=pid, tgid=pid, ppid=100, uid=1000, comm="agent", cgroup_id=1,
                    start_ns=pid)  # fmt: skip
        r = rnd.random()
        if r < 0.55:  # reads
            path = rnd.choice([
                f"{WS}/src/mod{rnd.randrange(200)}.py",
                f"/usr/lib/python3.11/{rnd.choice(['os', 're', 'json', 'typing'])}.py",
                f"/usr/lib/x86_64-linux-gnu/lib{rnd.randrange(50)}.so.6",
                f"{WS}/node_modules/pkg{rnd.randrange(100)}/index.js",
                "/etc/ld.so.cache", f"{HOME}/.gitconfig", "/proc/self/status",
            ])  # fmt: skip
            evs.append(Event(Kind.OPEN, raw_path=path, path=path, access=frozenset({READ}), **base))
        elif r < 0.75:  # writes
            path = rnd.choice([
                f"{WS}/src/mod{rnd.randrange(200)}.py", f"/tmp/cc{rnd.randrange(999)}.o",
                f"{WS}/.git/objects/{rnd.randrange(99):02d}/x", "/dev/null",
                f"{HOME}/.cache/pip/x{rnd.randrange(99)}",
            ])  # fmt: skip
            acc = frozenset({WRITE, CREATE, TRUNCATE})
            evs.append(Event(Kind.OPEN, raw_path=path, path=path, access=acc, **base))
        elif r < 0.83:  # fork + exec
            child = next_pid
            next_pid += 1
            pids.append(child)
            if len(pids) > 20:
                old = pids.pop(1)
                evs.append(Event(Kind.EXIT, **{**base, "pid": old, "tgid": old, "start_ns": old}))
            evs.append(Event(Kind.FORK, child_pid=child, **base))
            b = rnd.choice(BINS)
            cbase = {**base, "pid": child, "tgid": child, "ppid": pid, "start_ns": child}
            evs.append(Event(Kind.EXEC, raw_path=f"/usr/bin/{b}", path=f"/usr/bin/{b}",
                             argv=(b, "-q", f"{WS}/x"), **cbase))  # fmt: skip
        elif r < 0.90:  # unlinks (spread out, mostly temp files)
            path = rnd.choice([f"/tmp/cc{rnd.randrange(999)}.o", f"{WS}/build/x{rnd.randrange(9)}"])
            evs.append(Event(Kind.UNLINK, raw_path=path, path=path, **base))
        elif r < 0.97:
            addr = rnd.choice(["160.79.104.10", "140.82.112.3", "127.0.0.53", "151.101.0.223"])
            evs.append(Event(Kind.CONNECT, family="ipv4", addr=addr, port=443, **base))
        else:
            evs.append(Event(Kind.CHDIR, raw_path=WS, path=WS, **base))
    return evs


def generated_policy(n: int) -> str:
    """`n` rules across every kind and matcher, plus the default policy's lists."""
    rnd = random.Random(7)
    out = ["version: 1", "rules:"]
    for i in range(n):
        k = i % 10
        v = rnd.choice(["FLAG", "ASK", "HALT", "KILL", "SAFE"])
        if k == 0:
            m = f"exec: {{name: tool{i}}}"
        elif k == 1:
            m = f'exec: {{name: "py{i}*", args_any: ["--danger{i}"]}}'
        elif k == 2:
            m = f'open: {{path: "/opt/app{i}/**", access: [write]}}'
        elif k == 3:
            m = f'open: {{path: "{{home}}/.config/app{i}/*.json"}}'
        elif k == 4:
            m = f'open: {{path: "*.secret{i}"}}'
        elif k == 5:
            m = f'open: {{path: "/srv/data{i}/file.db"}}'
        elif k == 6:
            m = f'unlink: {{path: "/var/lib/app{i}/**"}}'
        elif k == 7:
            m = f"connect: {{addr: [10.{i % 250}.0.0/16], port: {1000 + i}}}"
        elif k == 8:
            m = f'open: {{path: "{{workspace}}/secrets{i}/**"}}'
        else:
            m = f"connect: {{port: {20000 + i}}}"
        out.append(f"  - {{name: r{i}, {m}, verdict: {v}}}")
    return "\n".join(out) + "\n"


def run(label: str, engine: Engine, events: list[Event]) -> None:
    for e in events[:2000]:  # warm the per-home compile cache
        engine.evaluate(e)
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        for e in events:
            engine.evaluate(e)
        best = max(best, len(events) / (time.perf_counter() - start))
    print(f"{label:<34} {best:>10,.0f} events/s  ({1e6 / best:.1f} us/event)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=100_000)
    args = ap.parse_args()
    events = event_mix(args.events)
    homes = {1000: HOME}.get
    default = load_policy(DEFAULT_POLICY)
    print(f"{len(events):,} events; default policy has {len(default.rules)} rules")
    run("default policy", Engine(default, workspace=WS, home_of=homes), events)
    big = parse_policy(generated_policy(500))
    run("500 generated rules", Engine(big, workspace=WS, home_of=homes), events)
    start = time.perf_counter()
    parse_policy(generated_policy(500))
    print(f"{'parse+validate 500 rules':<34} {(time.perf_counter() - start) * 1000:>10.0f} ms")


if __name__ == "__main__":
    main()
