"""`ebpf-guard replay`: run a recorded event stream through the same engine, enforcing nothing."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ebpf_guard.events import Event
from ebpf_guard.policy import load_policy
from ebpf_guard.policy.engine import Engine
from ebpf_guard.recording import HostUpdate, read_recording
from ebpf_guard.verdicts import Decision, Mode, Verdict


@dataclass
class ReplayResult:
    """One policy's decisions over a recording; `torn` says where a torn recording stopped."""

    policy: Path
    decisions: list[Decision] = field(default_factory=list)
    torn: str = ""

    @property
    def counts(self) -> Counter:
        return Counter(d.verdict for d in self.decisions)


def replay(recording: Path, policies: list[Path], mode: Mode | None = None) -> list[ReplayResult]:
    """Decisions of each policy over the same recording, event by event (same order).

    A torn recording is replayed up to the tear; each result's `torn` then says where."""
    header, items = read_recording(recording)
    stream: list[Event | HostUpdate] = list(items)  # homes and torn are filled in while reading
    results = []
    for path in policies:
        engine = Engine(load_policy(path), workspace=header.workspace, home_of=header.homes.get,
                        mode=mode)
        result = ReplayResult(path, torn=header.torn)
        for item in stream:
            if isinstance(item, HostUpdate):
                engine.set_host_addresses(item.mapping)
            else:
                result.decisions.append(engine.evaluate(item))
        results.append(result)
    return results


def differences(results: list[ReplayResult]) -> list[list[Decision]]:
    """Rows (one decision per policy) for the events on which the policies' verdicts differ."""
    rows = []
    for decisions in zip(*(r.decisions for r in results), strict=True):
        if len({(d.verdict, d.rule) for d in decisions}) > 1:
            rows.append(list(decisions))
    return rows


def format_comparison(results: list[ReplayResult], limit: int = 50) -> str:
    from ebpf_guard.output import describe

    names = [r.policy.name for r in results]
    width = max(12, *(len(n) for n in names)) + 2
    lines = ["VERDICT".ljust(9) + "".join(n.rjust(width) for n in names)]
    for v in Verdict:
        lines.append(v.value.ljust(9) + "".join(str(r.counts.get(v, 0)).rjust(width) for r in results))
    rows = differences(results)
    lines.append("")
    lines.append(f"{len(rows)} events decided differently" + (f" (first {limit})" if len(rows) > limit else ""))
    for row in rows[:limit]:
        ev = row[0].event
        verdicts = "  ".join(f"{n}={d.verdict.value}({d.rule or 'default'})" for n, d in zip(names, row, strict=True))
        lines.append(f"  pid {ev.tgid} {ev.comm} {ev.kind.value} {describe(ev)}: {verdicts}")
    return "\n".join(lines)
