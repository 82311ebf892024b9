"""Process trees as the engine sees them: who descends from whom, what each runs, and the
counters kept per tree (rate rules, FLAG escalation). Pure: built only from events.

Every event carries tgid, ppid and exe; fork events carry child_pid. A child runs its
parent's exe until its own exec. A process first seen without its parent (the agent itself,
or a process whose fork was never seen) has unknown ancestry: no `ancestors` glob matches it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from ebpf_guard.events import Event, Kind

TreeKey = tuple[int, int]  # (tgid, start_ns) of the top-most known ancestor
MAX_ANCESTORS = 32  # exes kept per process, nearest first: deeper ones are dropped


@dataclass(slots=True)
class Proc:
    """One live process: its tree, what it runs, and the exes above it (parent first)."""

    tree: TreeKey
    exe: str
    ancestors: tuple[str, ...]


class ProcessTrees:
    """Owns the live processes (tgid -> Proc) and answers tree and ancestry questions."""

    def __init__(self) -> None:
        self._procs: dict[int, Proc] = {}

    def __len__(self) -> int:
        return len(self._procs)

    def see(self, ev: Event) -> Proc:
        """The process of `ev`, created on first sight (joining its parent's tree if known);
        its exe follows what the events say it runs."""
        p = self._procs.get(ev.tgid)
        if p is None:
            parent = self._procs.get(ev.ppid)
            if parent is not None:
                p = Proc(parent.tree, ev.exe or parent.exe, _above(parent))
            else:
                p = Proc((ev.tgid, ev.start_ns), ev.exe, ())
            self._procs[ev.tgid] = p
        elif ev.exe and ev.exe != p.exe and (ev.kind is not Kind.EXEC or ev.ret is None or ev.ret >= 0):
            p.exe = ev.exe  # a failed exec's event names a program that never ran
        return p

    def track(self, ev: Event) -> None:
        """Apply a fork, exit or chdir event."""
        if ev.kind is Kind.FORK:
            parent = self.see(ev)
            if ev.child_pid and ev.child_pid != ev.tgid:
                self._procs[ev.child_pid] = Proc(parent.tree, parent.exe, _above(parent))
        elif ev.kind is Kind.EXIT:
            if ev.pid == ev.tgid:  # thread exits don't end the process
                self._procs.pop(ev.tgid, None)
        else:
            self.see(ev)

    def in_tree(self, tgid: int, tree: TreeKey) -> bool:
        """Is live process `tgid` one of `tree`'s?"""
        p = self._procs.get(tgid)
        return p is not None and p.tree == tree

    def ancestors(self, tgid: int) -> tuple[str, ...]:
        p = self._procs.get(tgid)
        return p.ancestors if p is not None else ()


def _above(parent: Proc) -> tuple[str, ...]:
    """A child's ancestors: its parent's exe, then the parent's ancestors."""
    return ((parent.exe,) + parent.ancestors)[:MAX_ANCESTORS]


class TreeCounters:
    """Sliding-window counters per (key, tree): rate rules' matches and FLAG escalation."""

    def __init__(self) -> None:
        self._hits: dict[tuple[object, TreeKey], deque[int]] = {}

    def hit(self, key: object, tree: TreeKey, ts: int, window_ns: int, count: int) -> bool:
        """Record one hit at `ts`; True when `count` hits fall within `window_ns`."""
        hits = self._hits.get((key, tree))
        if hits is None:
            hits = self._hits[(key, tree)] = deque()
        hits.append(ts)
        horizon = ts - window_ns
        while hits and hits[0] <= horizon:
            hits.popleft()
        return len(hits) >= count

    def reset(self, key: object, tree: TreeKey) -> None:
        """Start counting again (one decision per burst)."""
        self._hits.pop((key, tree), None)
