"""Held opens: permission events a gate has not answered yet, because a human answers them.

An open whose rule is ASK is not answered when it is read: the opener stays blocked in the
kernel's fanotify wait (no byte read) while the guard asks, and the answer comes later, from the
guard's thread (`answer`). Until then the event's fd is ours, and the kernel keeps the event in
the group's access list.

- Bounded: at most `limit` held opens per gate and `per_process` per process; the gate refuses
  (denies at once) what does not fit, and says so.
- An opener that dies while it waits (SIGKILL is the one way out of that wait) leaves its event
  behind in the kernel until the group answers it: `sweep` answers it (any answer frees a
  cancelled event) and closes its fd. Death is seen through a pidfd of the process.
- `answer_all` on close: the kernel would otherwise *allow* every event left when the group fd
  closes, so the gate answers them itself first, with the policy's ASK default.
"""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass

MAX_HELD = 64  # held opens per gate
MAX_HELD_PER_PROCESS = 8  # held opens per process (one per blocked thread)


@dataclass(frozen=True)
class HeldOpen:
    """One unanswered permission event: the event's fd and the opener it belongs to."""

    token: int
    event_fd: int
    tid: int
    tgid: int
    pidfd: int  # -1 when no pidfd could be had (then only /proc says whether it lives)
    since: float  # time.monotonic() when it was held


class HeldOpens:
    """Owns the unanswered permission events of one gate (their event fds and pidfds). Each is
    answered exactly once, from any thread: by the guard (`answer`), by `sweep` when its opener
    died, or by `answer_all` when the gate closes."""

    def __init__(self, respond: Callable[[int, bool], None], *, limit: int = MAX_HELD,
                 per_process: int = MAX_HELD_PER_PROCESS) -> None:  # fmt: skip
        self._respond = respond  # (event fd, allow): writes the kernel's answer
        self._limit = limit
        self._per_process = per_process
        self._lock = threading.Lock()
        self._held: dict[int, HeldOpen] = {}
        self._next = 1
        self._closed = False

    def __len__(self) -> int:
        return len(self._held)

    def refusal(self, tgid: int) -> str | None:
        """Why an open of process `tgid` cannot be held now (then it is denied at once); None if
        it can."""
        with self._lock:
            if self._closed:
                return "the gate is closing"
            if len(self._held) >= self._limit:
                return f"{self._limit} opens are held already: refused at once"
            if sum(h.tgid == tgid for h in self._held.values()) >= self._per_process:
                return f"{self._per_process} opens of pid {tgid} are held already: refused at once"
        return None

    def hold(self, event_fd: int, tid: int, tgid: int) -> int:
        """Keep the event unanswered (its fd is now ours to close); returns its token, or 0 when
        the opener is already gone (the event is then answered and closed here)."""
        try:
            pidfd = os.pidfd_open(tgid)
        except ProcessLookupError:
            self._finish(event_fd, False)
            return 0
        except OSError:
            pidfd = -1
        with self._lock:
            token, self._next = self._next, self._next + 1
            self._held[token] = HeldOpen(token, event_fd, tid, tgid, pidfd, time.monotonic())
        return token

    def answer(self, token: int, allow: bool) -> bool:
        """Answer a held open. False when it is no longer held (its opener died, or the gate
        closed and answered it)."""
        with self._lock:
            held = self._held.pop(token, None)
            if held is None:
                return False
            self._close(held, allow)
        return True

    def sweep(self) -> list[HeldOpen]:
        """Answer and forget the held opens whose opener died; returns them."""
        with self._lock:
            pidfds = [h.pidfd for h in self._held.values() if h.pidfd >= 0]
        exited = set(select.select(pidfds, [], [], 0)[0]) if pidfds else set()
        with self._lock:
            dead = [h for h in self._held.values()
                    if h.pidfd in exited or not os.path.exists(f"/proc/{h.tgid}/task/{h.tid}")]  # fmt: skip
            for h in dead:
                del self._held[h.token]
                self._close(h, False)
        return dead

    def answer_all(self, allow: bool) -> int:
        """Answer every held open with `allow` and hold no more; returns how many."""
        with self._lock:
            self._closed = True
            held, self._held = list(self._held.values()), {}
            for h in held:
                self._close(h, allow)
        return len(held)

    def _close(self, held: HeldOpen, allow: bool) -> None:
        self._finish(held.event_fd, allow)
        if held.pidfd >= 0:
            os.close(held.pidfd)

    def _finish(self, event_fd: int, allow: bool) -> None:
        with suppress(OSError):  # the opener died meanwhile: the kernel frees its event on any answer
            self._respond(event_fd, allow)
        os.close(event_fd)
