"""`Sensor`: the handle on the loaded bpf/sensor.c object and its maps."""

from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ebpf_guard.enforce import cgroups as cg
from ebpf_guard.events import EXEC_HOLD, EXEC_KILL, MAX_CGROUPS, NAME_LEN, PATH_LEN, RATE_SLOTS, Event

from .btf import VMLINUX_BTF, BtfError, Layouts, kernel_layouts
from .decode import Decoder, kernel_dev
from .identity import ExecIdentifier
from .loader import SOURCE, SensorError, load_programs, programs_of
from .procfs import ProcModel, ProcState, alive, descendants
from .transport import SensorStats, Transport


class Sensor:
    """The kernel side's Python half: owns the loaded object and its maps (scope, tracked
    pids, procs; the in-kernel responses through a `KernelResponse`), loads it, scopes it, and
    turns its raw records into time-ordered `Event`s through a `Transport` (the perf buffers)
    and a `Decoder`."""

    def __init__(
        self,
        *,
        cgroups: Sequence[Path] = (),
        pids: Sequence[int] = (),
        page_cnt: int = 256,
        wakeup_events: int = 128,
        urgent_page_cnt: int = 64,
        source: Path = SOURCE,
        btf: Path | None = VMLINUX_BTF,
    ) -> None:
        """page_cnt/wakeup_events: the bulk buffer (pages per CPU, a power of two; samples
        per wake-up). urgent_page_cnt: the urgent buffer, which wakes on every event.
        source: the BPF C file (`doctor` points it elsewhere to prove a failure is reported).
        btf: the kernel's BTF, for struct layouts; None loads without (the strings-only
        fallback of hosts without BTF: tests and bench/sensor.py compare the two)."""
        self._btf = btf
        self._source = Path(source)
        self._cgroups = [Path(p) for p in cgroups]
        self._pids = [int(p) for p in pids]
        self._bpf = None
        self._response: KernelResponse | None = None
        self._stats = SensorStats()
        self._model = ProcModel()
        self._decoder = Decoder(self._model, self._stats, learn=self._learn_proc,
                                identify=ExecIdentifier())
        self.layouts: Layouts | None = None  # the kernel's struct offsets (BTF); None without
        self.btf_error = ""  # why there are none
        self._transport = Transport(
            self._decoder, self._stats, page_cnt=page_cnt, wakeup_events=wakeup_events,
            urgent_page_cnt=urgent_page_cnt,
        )

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        if self._bpf is not None:
            raise SensorError("sensor already started")
        for pid in self._pids:
            if not os.path.exists(f"/proc/{pid}"):
                raise SensorError(f"no process with PID {pid}")
        try:
            if self._btf is None:
                raise BtfError("BTF not used (Sensor(btf=None))")
            self.layouts = kernel_layouts(self._btf)
            self.btf_error = ""
        except BtfError as e:
            self.layouts, self.btf_error = None, str(e)
        self._decoder.btf = self.layouts is not None
        b = load_programs(self._source, [*(self.layouts.cflags() if self.layouts else ()), *_arch_cflags()])
        self._bpf = b
        self._response = KernelResponse(b)
        try:
            self._transport.open(b)
            self.set_scope(cgroups=self._cgroups, pids=self._pids)
        except BaseException:
            self._cleanup()
            raise

    @property
    def programs(self) -> dict[str, str]:
        """Every program of the loaded object -> the tracepoint it is attached to ("" if none)."""
        return programs_of(self._require())

    def close(self) -> list[Event]:
        """Detach, then return every event still in the buffers (nothing is held back)."""
        b = self._bpf
        if b is None:
            return []
        try:
            for tp in list(b.tracepoint_fds):
                b.detach_tracepoint(tp)
            for tp in list(b.raw_tracepoint_fds):
                b.detach_raw_tracepoint(tp)
            return self._transport.drain(b)
        finally:
            self._cleanup()

    def _cleanup(self) -> None:
        b, self._bpf = self._bpf, None
        self._response = None
        self._transport.close()
        if b is not None:
            b.cleanup()

    def __enter__(self) -> Sensor:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- scope and kill maps ---------------------------------------------------------------

    def set_scope(self, *, cgroups: Sequence[Path] = (), pids: Sequence[int] = ()) -> None:
        """(Re)target the sensor: watched cgroups (with descendants) and/or pids (with
        descendants). Replaces the previous scope. Usable before and after start()."""
        self._cgroups = [Path(p) for p in cgroups]
        self._pids = [int(p) for p in pids]
        b = self._bpf
        if b is None:
            return
        watched = _watched_cgroups(self._cgroups)

        members = _track_pids(b[b"tracked"], self._pids)
        for path in self._cgroups:
            members.update(cg.pids(path))
        self._seed(members)
        self._write_cfg(watched)

    def set_exec_rules(
        self, *, kill_names: Iterable[str] = (), kill_paths: Iterable[str] = (),
        hold_names: Iterable[str] = (), kill_inodes: Iterable[tuple[int, int]] = (),
        hold_inodes: Iterable[tuple[int, int]] = (),
    ) -> list[str]:
        """Exec rules the kernel acts on at syscall entry, compiled from the policy by the
        engine; matched on the filename as passed to execve (no resolution), by exact path or
        by basename. Kill: SIGKILL, the program never runs. Hold: SIGSTOP, the program stops
        before its first instruction until the guard decides and sends SIGCONT or SIGKILL.
        Replaces the previous rules; kill wins over hold for the same name.

        kill_inodes/hold_inodes: (st_dev, st_ino) of listed programs, acted on whatever name
        reaches them: at exec exit, before the first instruction (a symlink or hard link to
        curl), and at mmap(PROT_EXEC) of the file (`ld.so /usr/bin/curl`). Needs BTF.

        Returns the entries the kernel cannot compare (a name with '/' or of 64+ bytes, a
        path of 256+ bytes): they are left to the engine, which judges every exec anyway.
        """
        skipped = self._maps().set_exec_rules(
            kill_names=kill_names, kill_paths=kill_paths, hold_names=hold_names, kill_inodes=kill_inodes,
            hold_inodes=hold_inodes,
        )
        self._write_cfg(None)
        return skipped

    def set_rate_rules(self, unlink_count: int, window_ns: int,
                       scratch_dirs: Iterable[tuple[int, int]] = ()) -> list[str]:
        """The deletion rate rule as a first response in the kernel: the watched process whose
        unlink/unlinkat/rmdir is the `unlink_count`th within `window_ns` (attempts at syscall
        entry, all watched scopes together) is stopped and held at that deletion, and the
        event notes `rate_held_in_kernel`; the guard decides, then reset_rate() and
        release_held(), or kills. 0 disables; at most RATE_SLOTS. scratch_dirs: (st_dev, st_ino)
        of directories beneath which deletions do not count, recognised by identity in the walk
        of the name's base directory (BTF; an absolute name always counts). Replaces the
        previous rule; returns what the kernel cannot do here, one line each."""
        notes = self._maps().set_rate_rules(unlink_count, window_ns, scratch_dirs,
                                            no_btf=self.btf_error if self.layouts is None else None)
        self._write_cfg(None)
        return notes

    def reset_rate(self) -> None:
        """Forget the deletions counted so far (after the guard decided on a rate hold)."""
        self._maps().reset_rate()

    def process(self, tgid: int) -> ProcState | None:
        """What the sensor knows of a watched process (start time, parent, exe), if anything."""
        return self._model.procs.get(tgid)

    def held(self) -> list[int]:
        """The tgids the kernel holds: stopped, and killed if anyone but the guard continues them."""
        return self._maps().held()

    def release_held(self, tgid: int) -> bool:
        """Clear a held mark, so that the SIGCONT sent next does not get the process killed (a
        SIGCONT from this process releases by itself too). False if it was not held."""
        return self._maps().release_held(tgid)

    def open_flags(self, tid: int) -> int | None:
        """The open(2) flags (O_*) of the open, openat, openat2 or creat the watched thread
        `tid` is executing now, or None."""
        return self._maps().open_flags(tid)

    def _write_cfg(self, watched: list[tuple[int, int]] | None) -> None:
        table = self._require()[b"scope"]
        cfg = table[ctypes.c_int(0)]
        if watched is not None:
            cfg.ncgroups = len(watched)
            for i, (level, cid) in enumerate(watched):
                cfg.levels[i], cfg.ids[i] = level, cid
            cfg.pid_mode = int(bool(self._pids))
        maps = self._maps()
        cfg.exec_rules = int(maps.exec_rules)
        cfg.rate_count, cfg.rate_window_ns = maps.rate_count, maps.rate_window_ns
        cfg.owner_tgid = os.getpid()  # the guard: its SIGCONT releases a held process
        table[ctypes.c_int(0)] = cfg

    def _seed(self, tgids: Iterable[int]) -> None:
        """Processes that predate attach: ppid/start_ns into the kernel, cwd into the model."""
        procs = self._require()[b"procs"]
        for tgid in tgids:
            st = self._model.seed(tgid)
            if st is None:
                continue
            key = ctypes.c_uint32(tgid)
            known = procs.get(key)
            if known is not None:
                # Forked since attach: the kernel's fork-time values are exact.
                st.ppid, st.start_ns = known.ppid, known.start_ns
            else:
                leaf = procs.Leaf()
                leaf.ppid, leaf.start_ns = st.ppid, st.start_ns
                procs[key] = leaf

    def _learn_proc(self, tgid: int, st: ProcState) -> None:
        """Tell the kernel what /proc told us, so later events carry ppid/start_ns."""
        if self._bpf is None:
            return  # decode() on recorded bytes, no kernel attached: nobody to tell
        procs = self._require()[b"procs"]
        leaf = procs.Leaf()
        leaf.ppid, leaf.start_ns = st.ppid, st.start_ns
        procs[ctypes.c_uint32(tgid)] = leaf

    def tracked_count(self) -> int:
        """Live processes in the pid-tracked set (0 once everything under --pid exited)."""
        return len(self._require()[b"tracked"])

    @property
    def stats(self) -> SensorStats:
        self._stats.pending = len(self._transport.pending)
        return self._stats

    def _require(self):
        if self._bpf is None:
            raise SensorError("sensor not started")
        return self._bpf

    def _maps(self) -> KernelResponse:
        self._require()
        assert self._response is not None
        return self._response

    # -- events ------------------------------------------------------------------------------

    def poll(self, timeout_ms: int = 2) -> list[Event]:
        """Events up to now, in timestamp order; blocks up to timeout_ms for the first one.
        The ordering argument (a time cut, then urgent before bulk): `Transport.poll`."""
        return self._transport.poll(self._require(), timeout_ms)

    def decode(self, record: bytes) -> Event | None:
        """One raw perf-buffer record as the kernel wrote it -> Event, or None for a kind
        this version does not know. Raises DecodeError for a record that cannot be one.
        Needs no kernel (tests feed it bytes), but updates the process model like poll()."""
        return self._decoder.decode(record)

    # The transport's unread records and batch step, for tests that feed records by hand.
    @property
    def _raw(self) -> list[bytes]:
        return self._transport.raw

    @_raw.setter
    def _raw(self, records: list[bytes]) -> None:
        self._transport.raw = records

    def _take(self, cut: int | None) -> list[Event]:
        return self._transport.take(cut)


_HOLD_RELEASED = 4  # EG_HOLD_RELEASED (bpf/events.h)
_BPF_EXIST = 2  # bpf_map_update_elem: only replace an existing entry


def _arch_cflags() -> list[str]:
    """Syscalls only some architectures have: creat(2) (x86_64; arm64 has no such syscall)."""
    return ["-DEG_HAVE_CREAT=1"] if platform.machine() == "x86_64" else []


class KernelResponse:
    """The maps through which the kernel acts on its own, and their Python side: exec rules
    (exec_names, exec_paths, exec_inodes), holds (held), the deletion rate rule (rate,
    scratch_dirs) and the flags of opens in progress (open_flags). The scope_cfg flags that
    switch them on are written by the Sensor from `exec_rules` and `rate_*`."""

    def __init__(self, bpf: Any) -> None:
        self._b = bpf
        self.exec_rules = False  # the exec maps are non-empty
        self.rate_count = 0
        self.rate_window_ns = 0

    def set_exec_rules(
        self, *, kill_names: Iterable[str], kill_paths: Iterable[str], hold_names: Iterable[str],
        kill_inodes: Iterable[tuple[int, int]], hold_inodes: Iterable[tuple[int, int]],
    ) -> list[str]:
        """Fill the exec maps (see Sensor.set_exec_rules); returns the entries left out."""
        b = self._b
        skipped: list[str] = []
        names: dict[bytes, int] = {}
        paths: dict[bytes, int] = {}
        for action, entries in ((EXEC_HOLD, hold_names), (EXEC_KILL, kill_names)):
            for n in entries:
                raw = os.fsencode(n)
                if 0 < len(raw) < NAME_LEN and b"/" not in raw:
                    names[raw] = action
                else:
                    skipped.append(n)
        for p in kill_paths:
            raw = os.fsencode(p)
            if 0 < len(raw) < PATH_LEN:
                paths[raw] = EXEC_KILL
            else:
                skipped.append(p)
        for table, entries in ((b[b"exec_names"], names), (b[b"exec_paths"], paths)):
            table.clear()
            for k, action in entries.items():
                key = table.Key()
                key.s = k
                table[key] = ctypes.c_uint8(action)
        inodes: dict[tuple[int, int], int] = {}
        for action, pairs in ((EXEC_HOLD, hold_inodes), (EXEC_KILL, kill_inodes)):
            for dev, ino in pairs:
                inodes[(kernel_dev(dev), ino)] = action
        table = b[b"exec_inodes"]
        table.clear()
        for (dev, ino), action in inodes.items():
            key = table.Key()
            key.dev, key.ino = dev, ino
            table[key] = ctypes.c_uint8(action)
        self.exec_rules = bool(names or paths or inodes)
        return skipped

    def set_rate_rules(self, count: int, window_ns: int, scratch_dirs: Iterable[tuple[int, int]],
                       no_btf: str | None) -> list[str]:
        """Check the rule, fill scratch_dirs, reset the ring; the caller writes count/window
        into scope_cfg. no_btf: why there are no BTF walks (None: there are)."""
        if not 0 <= count <= RATE_SLOTS:
            raise SensorError(f"rate rule count {count} is outside 0..{RATE_SLOTS}")
        if count and window_ns <= 0:
            raise SensorError(f"rate rule window {window_ns} ns is not positive")
        table = self._b[b"scratch_dirs"]
        table.clear()
        for dev, ino in scratch_dirs:
            key = table.Key()
            key.dev, key.ino = kernel_dev(dev), ino
            table[key] = ctypes.c_uint8(1)
        self.reset_rate()
        self.rate_count, self.rate_window_ns = count, (window_ns if count else 0)
        if count and no_btf is not None:
            return [f"scratch directories are not recognised without BTF ({no_btf}): every deletion counts"]
        return []

    def reset_rate(self) -> None:
        table = self._b[b"rate"]
        table[ctypes.c_int(0)] = table.Leaf()  # all zero: no deletion seen

    def held(self) -> list[int]:
        return sorted(k.value for k, mark in self._b[b"held"].items() if mark.state != _HOLD_RELEASED)

    def release_held(self, tgid: int) -> bool:
        from bcc import lib  # only reached with bcc loaded

        table = self._b[b"held"]
        key = ctypes.c_uint32(tgid)
        mark = table.get(key)
        if mark is None or mark.state == _HOLD_RELEASED:
            return False
        mark.state = _HOLD_RELEASED
        # Replace only: if the process exited meanwhile, its mark is not brought back.
        return lib.bpf_update_elem(table.map_fd, ctypes.byref(key), ctypes.byref(mark), _BPF_EXIST) == 0

    def open_flags(self, tid: int) -> int | None:
        flags = self._b[b"open_flags"].get(ctypes.c_uint32(tid))
        return None if flags is None else flags.value


def _watched_cgroups(paths: Sequence[Path]) -> list[tuple[int, int]]:
    """(depth below the v2 root, cgroup id) of each watched cgroup: what the scope map holds."""
    if not paths:
        return []
    try:
        root = cg.find_v2_mount()
    except cg.CgroupError as e:
        raise SensorError(str(e)) from e
    watched = []
    for path in paths:
        try:
            rel = path.resolve().relative_to(root)
            watched.append((len(rel.parts), os.stat(path).st_ino))
        except (ValueError, OSError) as e:
            raise SensorError(f"{path} is not a cgroup under {root}") from e
    watched = sorted(set(watched))
    if len(watched) > MAX_CGROUPS:
        raise SensorError(f"at most {MAX_CGROUPS} cgroups can be watched at once")
    return watched


def _track_pids(tracked: Any, pids: Sequence[int]) -> set[int]:
    """Fill the kernel's tracked-pid map with pids and their live descendants; returns them."""
    tracked.clear()
    members: set[int] = set()
    if not pids:
        return members
    for pid in pids:
        if not os.path.exists(f"/proc/{pid}"):
            raise SensorError(f"no process with PID {pid}")
    # Insert, then look again: a child forked between the /proc scan and the map
    # update had an untracked parent when the kernel saw the fork.
    for _ in range(2):
        for pid in descendants(pids) - members:
            tracked[ctypes.c_uint32(pid)] = ctypes.c_uint8(1)
            members.add(pid)
    # The kernel drops an entry at exit. A process that exited before its entry
    # went in (a zombie, or gone) would keep it forever: check after inserting, so
    # an exit racing with us is seen by one side or the other.
    for pid in list(members):
        if not alive(pid):
            try:
                del tracked[ctypes.c_uint32(pid)]
            except KeyError:
                pass  # the kernel saw the exit after all
            members.discard(pid)
    return members
