"""Perf buffers read straight from their mmap'd rings: every record since the last read in
one copy, with no per-record callback.

bcc's reader calls back into Python through ctypes once per record; at 10^5 records/s that
trampoline alone cost ~2 µs per event, as much as decoding it. Here a drain copies each
CPU's unread bytes [data_tail, data_head) out of the ring, advances data_tail, and splits the
copy into records in Python. The BPF side is unchanged: `perf_submit` into a
BPF_PERF_OUTPUT map whose slot for each CPU holds one of our perf event fds, exactly what
bcc's `open_perf_buffer` sets up (perf_event_open of PERF_COUNT_SW_BPF_OUTPUT with
PERF_SAMPLE_RAW).

Memory ordering: the kernel publishes a record by writing its bytes, then data_head after
a write barrier. A reader must not read the bytes before data_head; x86-64 keeps loads in
order, which makes a plain read of data_head then of the bytes correct. Other architectures
need a load-acquire that Python cannot issue, so `supported()` is x86-64 only and the
transport uses bcc's callback reader elsewhere (slower, same records).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import select
import struct
from collections.abc import Iterable

_PERF_EVENT_OPEN = {"x86_64": 298}  # syscall number, for the architectures supported()
_PERF_TYPE_SOFTWARE = 1
_PERF_COUNT_SW_BPF_OUTPUT = 10
_PERF_SAMPLE_RAW = 1 << 10
_PERF_FLAG_FD_CLOEXEC = 1 << 3
_PERF_RECORD_LOST = 2
_PERF_RECORD_SAMPLE = 9
_ATTR_SIZE = 112  # PERF_ATTR_SIZE_VER5 (Linux 4.1): every field used here
# struct perf_event_attr: type, size, config, sample_period, sample_type, read_format,
# flag bits, wakeup_events (the rest stays zero).
_ATTR = struct.Struct("<IIQQQQQI")
_DATA_HEAD = 1024  # offsetof(struct perf_event_mmap_page, data_head)
_DATA_TAIL = 1032
_U64 = struct.Struct("<Q")
_REC = struct.Struct("<IHH")  # perf_event_header: type, misc, size
_RAW_SIZE = struct.Struct("<I")  # a sample's raw size, after its header
_LOST = struct.Struct("<IHHQQ")  # header + id + lost
_PAGE = mmap.PAGESIZE

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def supported() -> bool:
    """Whether this architecture's memory order lets Python read the rings (module doc)."""
    return platform.machine() in _PERF_EVENT_OPEN


def split_records(data: bytes, out: list[bytes]) -> int:
    """Perf records, back to back as the ring holds them -> each sample's raw bytes appended
    to `out`; returns the samples the kernel reported lost (PERF_RECORD_LOST)."""
    lost = off = 0
    n = len(data)
    rec = _REC.unpack_from
    while off + 8 <= n:
        typ, _misc, rsize = rec(data, off)
        if rsize < 8 or off + rsize > n:  # a corrupt header: count it, never loop on it
            lost += 1
            break
        if typ == _PERF_RECORD_SAMPLE:
            (raw,) = _RAW_SIZE.unpack_from(data, off + 8)
            out.append(data[off + 12 : off + 12 + raw])
        elif typ == _PERF_RECORD_LOST:
            lost += _LOST.unpack_from(data, off)[4]
        off += rsize
    return lost


def online_cpus(text: str | None = None) -> list[int]:
    """The CPUs in /sys/devices/system/cpu/online ("0-3,6"): one ring each."""
    if text is None:
        with open("/sys/devices/system/cpu/online") as f:
            text = f.read()
    cpus: list[int] = []
    for part in text.strip().split(","):
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def _perf_event_open(cpu: int, wakeup_events: int) -> int:
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    # No flag bits: not `disabled`, so the event is live from the open. sample_period 1.
    _ATTR.pack_into(attr, 0, _PERF_TYPE_SOFTWARE, _ATTR_SIZE, _PERF_COUNT_SW_BPF_OUTPUT, 1,
                    _PERF_SAMPLE_RAW, 0, 0, max(1, wakeup_events))
    fd = _libc.syscall(_PERF_EVENT_OPEN[platform.machine()], attr, -1, cpu, -1,
                       _PERF_FLAG_FD_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"perf_event_open on CPU {cpu}: {os.strerror(err)}")
    return int(fd)


class PerfRing:
    """One CPU's perf event: owns its fd and its mmap'd ring (a header page, then
    `pages` pages of records)."""

    def __init__(self, cpu: int, pages: int, wakeup_events: int) -> None:
        if pages <= 0 or pages & (pages - 1):
            raise ValueError(f"perf buffer pages must be a power of two, not {pages}")
        self.cpu = cpu
        self.fd = _perf_event_open(cpu, wakeup_events)
        try:
            self._mm = mmap.mmap(self.fd, (pages + 1) * _PAGE, mmap.MAP_SHARED,
                                 mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError:
            os.close(self.fd)
            raise
        self._size = pages * _PAGE
        self.wraps = 0  # reads whose bytes ran round the ring's end (tests check both cases)

    def read(self, out: list[bytes]) -> int:
        """Append each sample's raw bytes (padded to 8 bytes, as bcc's reader hands them)
        to `out`; return the samples the kernel reported lost (PERF_RECORD_LOST)."""
        mm = self._mm
        (head,) = _U64.unpack_from(mm, _DATA_HEAD)
        (tail,) = _U64.unpack_from(mm, _DATA_TAIL)
        if head == tail:
            return 0
        size = self._size
        start = _PAGE + tail % size
        n = head - tail
        if start + n <= _PAGE + size:
            data = mm[start : start + n]
        else:  # the unread bytes wrap round the ring's end
            self.wraps += 1
            data = mm[start : _PAGE + size] + mm[_PAGE : _PAGE + n - (_PAGE + size - start)]
        # The bytes are copied: the kernel may now overwrite them.
        _U64.pack_into(mm, _DATA_TAIL, head)
        return split_records(data, out)

    def close(self) -> None:
        self._mm.close()
        os.close(self.fd)


class PerfBuffer:
    """The rings of one BPF_PERF_OUTPUT map, one per online CPU: owns them, puts their fds
    into the map's slots, and counts the losses they report."""

    def __init__(self, table: object, cpus: Iterable[int], pages: int, wakeup_events: int) -> None:
        self.rings: list[PerfRing] = []
        self.lost = 0
        try:
            for cpu in cpus:
                ring = PerfRing(cpu, pages, wakeup_events)
                self.rings.append(ring)
                table[table.Key(cpu)] = table.Leaf(ring.fd)  # type: ignore[attr-defined]
        except Exception:
            self.close()
            raise

    def register(self, ep: select.epoll) -> None:
        for ring in self.rings:
            ep.register(ring.fd, select.EPOLLIN)

    def read(self, out: list[bytes]) -> None:
        for ring in self.rings:
            self.lost += ring.read(out)

    def close(self) -> None:
        for ring in self.rings:
            ring.close()
        self.rings = []
