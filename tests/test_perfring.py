"""The perf rings read without bcc's per-record callback (sensor/perfring.py).

The reader copies [data_tail, data_head) out of each CPU's ring and splits it into records.
What can go wrong is the arithmetic: a record that runs round the ring's end, a lost record,
a corrupt header. The kernel test drives a one-page ring through many wraps in lockstep (so
nothing is lost) and checks every event, in order, byte for byte; it runs through bcc's
callback reader too, which other architectures use.
"""

from __future__ import annotations

import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ebpf_guard.events import Kind
from ebpf_guard.sensor import Sensor, perfring
from tests.conftest import requires_bpf
from tests.helpers import scaled

SAMPLE, LOST = 9, 2


def sample(raw: bytes) -> bytes:
    """A PERF_RECORD_SAMPLE as the kernel writes it: header, u32 size, raw bytes padded so
    the record is 8-byte aligned."""
    padded = raw + b"\0" * (-(len(raw) + 4) % 8)
    return struct.pack("<IHHI", SAMPLE, 0, 12 + len(padded), len(padded)) + padded


def lost(count: int) -> bytes:
    return struct.pack("<IHHQQ", LOST, 0, 24, 7, count)


def test_records_are_split_and_losses_counted() -> None:
    out: list[bytes] = []
    data = sample(b"first") + lost(5) + sample(b"x" * 20) + lost(2)
    assert perfring.split_records(data, out) == 7
    assert [r.rstrip(b"\0") for r in out] == [b"first", b"x" * 20]
    assert all(len(r) % 8 == 4 for r in out)  # raw size as the kernel pads it (bcc's too)


def test_a_corrupt_header_stops_the_split_and_counts_as_a_loss() -> None:
    out: list[bytes] = []
    zero_size = struct.pack("<IHH", SAMPLE, 0, 0)  # would loop forever if trusted
    assert perfring.split_records(sample(b"ok") + zero_size + sample(b"never"), out) == 1
    assert out == [sample(b"ok")[12:]]
    out.clear()
    past_end = struct.pack("<IHHI", SAMPLE, 0, 4000, 3988) + b"short"
    assert perfring.split_records(past_end, out) == 1 and out == []


def test_online_cpus_reads_the_sysfs_list() -> None:
    assert perfring.online_cpus("0-3,6\n") == [0, 1, 2, 3, 6]
    assert perfring.online_cpus("0\n") == [0]
    assert perfring.online_cpus() == sorted(perfring.online_cpus())


def test_a_ring_must_be_a_power_of_two_pages() -> None:
    with pytest.raises(ValueError, match="power of two"):
        perfring.PerfRing(0, 3, 1)


ROUNDS, PER_ROUND = 60, 8  # 8 records of 150-400 bytes: under one 4 KiB page per round


@requires_bpf
@pytest.mark.parametrize("reader", ["rings", "bcc"])
def test_a_one_page_ring_delivers_every_event_through_many_wraps(
    tmp_path: Path, reader: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if reader == "bcc":
        monkeypatch.setattr(perfring, "supported", lambda: False)
    elif not perfring.supported():
        pytest.skip("perf rings are read by bcc's reader on this architecture")
    # Names of different lengths, so record boundaries fall at ever different ring offsets.
    files = [tmp_path / ("f" * (1 + (i * 37) % 90) + str(i)) for i in range(PER_ROUND)]
    for f in files:
        f.write_text("x")
    cpu = perfring.online_cpus()[0]
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os, sys
        os.sched_setaffinity(0, {{{cpu}}})  # one CPU: one ring, one order
        files = {[str(f) for f in files]!r}
        sys.stdin.buffer.read(1)
        for _ in range({ROUNDS}):
            for f in files:
                os.close(os.open(f, os.O_RDONLY))
            sys.stdout.buffer.write(b"r"); sys.stdout.flush()
            sys.stdin.buffer.read(1)
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
    sensor = Sensor(pids=[child.pid], page_cnt=1, wakeup_events=1)
    seen: list[str] = []
    try:
        sensor.start()
        assert child.stdin and child.stdout
        child.stdin.write(b"g")
        child.stdin.flush()
        for rnd in range(ROUNDS):
            assert child.stdout.read(1) == b"r"
            want = [str(f) for f in files]
            got: list[str] = []
            deadline = time.monotonic() + scaled(10)
            while len(got) < len(want) and time.monotonic() < deadline:
                for e in sensor.poll(5):
                    if e.kind is Kind.OPEN and e.path in want:
                        got.append(e.path)
                        # The kernel's walk, at the record's end: intact too.
                        assert e.real_path == (e.path if sensor.layouts else ""), e
            assert got == want, f"round {rnd}"
            seen += got
            child.stdin.write(b"g")
            child.stdin.flush()
        assert child.wait(scaled(10)) == 0
        stats = sensor.stats
        assert stats.lost == 0 and stats.bad == 0, stats
        assert len(seen) == ROUNDS * PER_ROUND
        if reader == "rings":
            rings = sensor._transport._bulk.rings  # type: ignore[union-attr]
            assert sum(r.wraps for r in rings) >= ROUNDS // 4, "the test never read across the ring's end"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        sensor.close()
