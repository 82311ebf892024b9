"""The two perf buffers (urgent, bulk): draining them into a time-ordered batch of events.
The rings are read directly (perfring) where the architecture allows, else by bcc's reader."""

from __future__ import annotations

import ctypes
import os
import select
import time
from dataclasses import dataclass
from typing import Any

from ebpf_guard.events import Event

from . import perfring
from .decode import _HDR, _HDR_SIZE, DecodeError, Decoder
from .loader import SensorError


@dataclass
class SensorStats:
    """Counts of what the sensor delivered, lost and could not decode, for the summary and the
    loss decision (Session)."""

    events: int = 0  # events decoded and returned
    lost_urgent: int = 0  # samples the kernel dropped: urgent buffer full
    lost_bulk: int = 0  # samples the kernel dropped: bulk buffer full
    unresolved: int = 0  # events whose relative path could not be made absolute
    pending: int = 0  # read from the kernel, held back by the time cut (see poll)
    bad: int = 0  # records that could not be decoded (DecodeError): dropped

    @property
    def lost(self) -> int:
        return self.lost_urgent + self.lost_bulk


def _by_ts(item: tuple[tuple, bytes]) -> int:
    return item[0][0]


class Transport:
    """Owns the perf buffers' userspace side: the records read and not yet decoded (`raw`),
    those held back by the time cut (`pending`), and the loss and bad-record counts."""

    def __init__(
        self, decoder: Decoder, stats: SensorStats, *,
        page_cnt: int, wakeup_events: int, urgent_page_cnt: int,
    ) -> None:
        self._decoder = decoder
        self._stats = stats
        self._page_cnt = page_cnt
        self._wakeup_events = wakeup_events
        self._urgent_page_cnt = urgent_page_cnt
        self.raw: list[bytes] = []
        self.pending: list[tuple[tuple, bytes]] = []
        self._lost_reported = [0, 0]  # by the perf buffers themselves: urgent, bulk
        self._urgent: perfring.PerfBuffer | None = None
        self._bulk: perfring.PerfBuffer | None = None
        self._epoll: select.epoll | None = None
        self._lost_lookup: tuple | None = None  # see read_lost

    def open(self, b: Any) -> None:
        """Open both buffers of the loaded object `b`, or raise SensorError."""
        try:
            if perfring.supported():
                self._open_rings(b)
            else:
                self._open_callbacks(b)
        except Exception as e:
            self.close()
            raise SensorError(f"cannot open the perf buffers: {e}") from e

    def _open_rings(self, b: Any) -> None:
        cpus = perfring.online_cpus()
        self._urgent = perfring.PerfBuffer(b[b"urgent"], cpus, self._urgent_page_cnt, 1)
        self._bulk = perfring.PerfBuffer(b[b"bulk"], cpus, self._page_cnt, self._wakeup_events)
        self._epoll = select.epoll()
        self._urgent.register(self._epoll)
        self._bulk.register(self._epoll)

    def _open_callbacks(self, b: Any) -> None:
        # bcc's reader (architectures perfring cannot serve). The urgent buffer is opened
        # first: perf_buffer_consume() drains readers in this order (see poll).
        b[b"urgent"].open_perf_buffer(
            self._on_event, page_cnt=self._urgent_page_cnt, lost_cb=self._on_lost_urgent
        )
        b[b"bulk"].open_perf_buffer(
            self._on_event, page_cnt=self._page_cnt, lost_cb=self._on_lost_bulk,
            wakeup_events=self._wakeup_events,
        )

    def close(self) -> None:
        """Unmap and close the rings (bcc's own readers go with the object)."""
        for buf in (self._urgent, self._bulk):
            if buf is not None:
                buf.close()
        self._urgent = self._bulk = None
        self._lost_lookup = None
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None

    def _on_event(self, _cpu: int, data: int, size: int) -> None:
        self.raw.append(ctypes.string_at(data, size))

    def _on_lost_urgent(self, count: int) -> None:
        self._lost_reported[0] += count

    def _on_lost_bulk(self, count: int) -> None:
        self._lost_reported[1] += count

    def _drain(self, b: Any) -> None:
        """Read everything written so far: urgent, then bulk (see poll)."""
        if self._urgent is not None and self._bulk is not None:
            self._urgent.read(self.raw)
            self._bulk.read(self.raw)
            self._lost_reported = [self._urgent.lost, self._bulk.lost]
        else:
            b.perf_buffer_consume()
        self.read_lost(b)

    def read_lost(self, b: Any) -> None:
        """The kernel's own count of samples perf_submit could not write (map `lost`): a loss
        is seen on this poll, not when the perf buffer reports it with the next sample on
        that CPU. The larger of the kernel's count and the buffers' (PERF_RECORD_LOST) is
        the loss: they count the same samples. Two bpf(2) lookups into buffers made once:
        bcc's table indexing costs ~100 µs per poll, as much as decoding 40 events."""
        if self._lost_lookup is None:
            from bcc import lib  # loaded with the object `b`

            table = b[b"lost"]
            keys = (table.Key(0), table.Key(1))
            self._lost_lookup = (lib.bpf_lookup_elem, table.map_fd, keys, table.Leaf())
        lookup, fd, keys, leaf = self._lost_lookup
        counts = []
        for key in keys:
            if lookup(fd, ctypes.byref(key), ctypes.byref(leaf)) < 0:
                raise SensorError(f"cannot read the kernel's loss counter: {os.strerror(ctypes.get_errno())}")
            counts.append(sum(leaf))
        self._stats.lost_urgent = max(self._stats.lost_urgent, counts[0], self._lost_reported[0])
        self._stats.lost_bulk = max(self._stats.lost_bulk, counts[1], self._lost_reported[1])

    def poll(self, b: Any, timeout_ms: int = 2) -> list[Event]:
        """Events up to now, in timestamp order. Blocks up to timeout_ms for the first one.

        Ordering. Each event is stamped (bpf_ktime_get_ns) just before it is written, and
        a process's events are written in program order, so if event A caused B (fork ->
        child's open, open -> fchdir on that fd, chdir -> relative open), A was in its
        buffer before B was stamped. We take `cut` = now, and only then drain: urgent first
        (exec/fork/exit/chdir, which the policy wants soonest), then bulk. Every event
        stamped <= cut therefore has all its causes in this batch, whichever buffer
        they went through, and returning exactly the events stamped <= cut, sorted, gives a
        consistent prefix of the stream. Events stamped after `cut` (they raced the drain)
        are held for the next call, which then does not block. Draining alone, in either
        order, is not enough: a bulk event can have an urgent cause written after the
        urgent drain finished, and vice versa.
        """
        wait = 0 if self.pending else timeout_ms
        if self._epoll is not None:
            if not self.raw:
                self._epoll.poll(wait / 1000)
        else:
            b.perf_buffer_poll(wait)
        cut = time.monotonic_ns()
        self._drain(b)
        return self.take(cut)

    def drain(self, b: Any) -> list[Event]:
        """Every event still in the buffers, nothing held back (for close)."""
        self._drain(b)
        return self.take(None)

    def take(self, cut: int | None) -> list[Event]:
        """Decode the records read so far that are stamped <= cut (all if cut is None)."""
        raw, self.raw = self.raw, []
        unpack = _HDR.unpack_from
        batch = [(unpack(r), r) for r in raw if len(r) >= _HDR_SIZE]
        self._stats.bad += len(raw) - len(batch)
        if self.pending:
            batch = self.pending + batch
            self.pending = []
        if cut is not None and batch and max(h[0] for h, _ in batch) > cut:
            self.pending = [x for x in batch if x[0][0] > cut]
            batch = [x for x in batch if x[0][0] <= cut]
        # Each per-CPU buffer is already in order: timsort merges those runs cheaply.
        batch.sort(key=_by_ts)
        decode = self._decoder._decode
        out = []
        for h, r in batch:
            try:
                ev = decode(h, r)
            except DecodeError:
                self._stats.bad += 1  # one bad record must not stop the loop
                continue
            if ev is not None:
                out.append(ev)
        self._stats.events += len(out)
        self._decoder.prune()
        return out
