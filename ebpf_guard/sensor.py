"""Load bpf/sensor.c, scope it to the watched processes, decode its events into `Event`s.

Scope lives in the kernel (watched cgroups as (depth, id) pairs, plus a tracked-pid set
that follows descendants), so an unwatched process costs one scope check per syscall and emits
nothing. Paths are resolved in userspace by `procmodel.ProcModel` (see its docstring).
"""

from __future__ import annotations

import ctypes
import os
import platform
import re
import socket
import struct
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import cgroups as cg
from . import host
from .events import (
    ARG_LEN,
    CREATE,
    EXEC_HOLD,
    EXEC_KILL,
    F_ARGV_TRUNC,
    F_HELD,
    F_KILLED,
    F_NO_PROC,
    F_PATH_TRUNC,
    KIND_CODES,
    MAX_ARGS,
    MAX_CGROUPS,
    NAME_LEN,
    NOTE_HELD,
    NOTE_KILLED,
    NOTE_PATH_TRUNCATED,
    NOTE_PROC_UNKNOWN,
    NOTE_UNRESOLVED,
    PATH_LEN,
    READ,
    TRUNCATE,
    WRITE,
    Event,
    Kind,
    RawConnectEvent,
    RawEvent,
    RawExecEvent,
    RawPathEvent,
)
from .paths import BPF_DIR
from .procmodel import ProcModel, ProcState, alive, normalize, read_stat

SOURCE = BPF_DIR / "sensor.c"

O_ACCMODE, O_WRONLY, O_RDWR = 0o3, 0o1, 0o2
O_CREAT, O_TRUNC, O_PATH, O_TMPFILE = 0o100, 0o1000, 0o10000000, 0o20000000
AT_REMOVEDIR, AT_EMPTY_PATH = 0x200, 0x1000
_PRUNE_EVERY_NS = 10_000_000_000


class SensorError(Exception):
    """The sensor cannot start or run; one line for the user."""


class DecodeError(ValueError):
    """A raw record that cannot be an event of bpf/events.h (too short, or a length or count
    out of range). `poll()` counts such records in `SensorStats.bad` and goes on."""


@dataclass
class SensorStats:
    events: int = 0  # events decoded and returned
    lost_urgent: int = 0  # samples the kernel dropped: urgent buffer full
    lost_bulk: int = 0  # samples the kernel dropped: bulk buffer full
    unresolved: int = 0  # events whose relative path could not be made absolute
    pending: int = 0  # read from the kernel, held back by the time cut (see poll)
    bad: int = 0  # records that could not be decoded (DecodeError): dropped

    @property
    def lost(self) -> int:
        return self.lost_urgent + self.lost_bulk


def _struct_of(cls: type[ctypes.Structure]) -> struct.Struct:
    """A struct.Struct matching a flat ctypes mirror (3x faster than ctypes field access)."""
    codes = {
        ctypes.c_uint64: "Q",
        ctypes.c_int64: "q",
        ctypes.c_uint32: "I",
        ctypes.c_int32: "i",
        ctypes.c_uint16: "H",
    }
    fmt, pos = "<", 0
    for name, ctype in cls._fields_:
        off = getattr(cls, name).offset
        fmt += "x" * (off - pos)
        size = ctypes.sizeof(ctype)
        fmt += codes.get(ctype, f"{size}s")
        pos = off + size
    fmt += "x" * (ctypes.sizeof(cls) - pos)
    s = struct.Struct(fmt)
    assert s.size == ctypes.sizeof(cls), cls
    return s


_HDR = _struct_of(RawEvent)
_HDR_SIZE = _HDR.size
_PATH_OFF = RawPathEvent.path.offset
_EXEC_ARGC = struct.Struct("<I")
_EXEC_ARGC_OFF = RawExecEvent.argc.offset
_EXEC_ARGV_OFF = RawExecEvent.argv.offset
_CONN = struct.Struct("<HHI16s")  # family, port (big-endian on the wire), addrlen, addr
_CONN_OFF = RawConnectEvent.family.offset
_CONN_UNIX_OFF = RawConnectEvent.unix_path.offset
_OPEN = next(code for code, kind in KIND_CODES.items() if kind is Kind.OPEN)
_FAMILIES = {socket.AF_INET: "ipv4", socket.AF_INET6: "ipv6", socket.AF_UNIX: "unix"}


def _by_ts(item: tuple[tuple, bytes]) -> int:
    return item[0][0]


def _text(b: bytes) -> str:
    # backslashreplace: a non-UTF-8 path stays distinguishable and JSON-safe.
    return b.split(b"\0", 1)[0].decode("utf-8", "backslashreplace")


def _access(flags: int) -> frozenset[str]:
    acc = flags & O_ACCMODE
    out = set()
    if acc in (0, O_RDWR) and not flags & O_PATH:
        out.add(READ)
    if acc in (O_WRONLY, O_RDWR):
        out.add(WRITE)
    if flags & O_CREAT or (flags & O_TMPFILE) == O_TMPFILE:
        out.add(CREATE)
    if flags & O_TRUNC:
        # Linux truncates even with O_RDONLY when the caller may write the file.
        out.add(TRUNCATE)
    return frozenset(out)


_ACCESS_CACHE: dict[int, frozenset[str]] = {}


def _access_cached(flags: int) -> frozenset[str]:
    # A program uses a handful of flag combinations; decoding runs at ~10^5 events/s.
    acc = _ACCESS_CACHE.get(flags)
    if acc is None:
        if len(_ACCESS_CACHE) > 4096:
            _ACCESS_CACHE.clear()
        acc = _ACCESS_CACHE[flags] = _access(flags)
    return acc


def _proc_table() -> dict[int, int]:
    """pid -> ppid of every process, from /proc."""
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = read_stat(int(name))
            if stat is not None:
                out[int(name)] = stat[0]
    return out


def descendants(roots: Iterable[int], table: dict[int, int] | None = None) -> set[int]:
    """The roots and every live descendant (by current ppid)."""
    table = _proc_table() if table is None else table
    children: dict[int, list[int]] = {}
    for pid, ppid in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, ()))
    return found


class Sensor:
    """The kernel side's Python half: loads bpf/sensor.c, scopes it, and turns its raw records
    into time-ordered `Event`s (see poll)."""

    def __init__(
        self,
        *,
        cgroups: Sequence[Path] = (),
        pids: Sequence[int] = (),
        page_cnt: int = 256,
        wakeup_events: int = 32,
        urgent_page_cnt: int = 64,
        source: Path = SOURCE,
    ) -> None:
        """page_cnt/wakeup_events: the bulk buffer (pages per CPU, a power of two; samples
        per wake-up). urgent_page_cnt: the urgent buffer, which wakes on every event.
        source: the BPF C file (`doctor` points it elsewhere to prove a failure is reported)."""
        self._source = Path(source)
        self._cgroups = [Path(p) for p in cgroups]
        self._pids = [int(p) for p in pids]
        self._page_cnt = page_cnt
        self._wakeup_events = wakeup_events
        self._urgent_page_cnt = urgent_page_cnt
        self._bpf = None
        self._raw: list[bytes] = []
        self._pending: list[tuple[tuple, bytes]] = []
        self._stats = SensorStats()
        self._model = ProcModel()
        self._exec_rules = False
        self._comms: dict[bytes, str] = {}
        self._next_prune = 0

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        if self._bpf is not None:
            raise SensorError("sensor already started")
        for pid in self._pids:
            if not os.path.exists(f"/proc/{pid}"):
                raise SensorError(f"no process with PID {pid}")
        b = load_programs(self._source)
        self._bpf = b
        # The urgent buffer is opened first: perf_buffer_consume() drains readers in this
        # order (see poll).
        try:
            b[b"urgent"].open_perf_buffer(
                self._on_event, page_cnt=self._urgent_page_cnt, lost_cb=self._on_lost_urgent
            )
            b[b"bulk"].open_perf_buffer(
                self._on_event,
                page_cnt=self._page_cnt,
                lost_cb=self._on_lost_bulk,
                wakeup_events=self._wakeup_events,
            )
        except Exception as e:
            self._cleanup()
            raise SensorError(f"cannot open the perf buffers: {e}") from e
        try:
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
            b.perf_buffer_consume()
            return self._take(None)
        finally:
            self._cleanup()

    def _cleanup(self) -> None:
        b, self._bpf = self._bpf, None
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
        watched: list[tuple[int, int]] = []  # (depth below the v2 root, cgroup id)
        if self._cgroups:
            try:
                root = cg.find_v2_mount()
            except cg.CgroupError as e:
                raise SensorError(str(e)) from e
            for path in self._cgroups:
                try:
                    rel = path.resolve().relative_to(root)
                    watched.append((len(rel.parts), os.stat(path).st_ino))
                except (ValueError, OSError) as e:
                    raise SensorError(f"{path} is not a cgroup under {root}") from e
        watched = sorted(set(watched))
        if len(watched) > MAX_CGROUPS:
            raise SensorError(f"at most {MAX_CGROUPS} cgroups can be watched at once")

        tracked = b[b"tracked"]
        tracked.clear()
        members: set[int] = set()
        if self._pids:
            for pid in self._pids:
                if not os.path.exists(f"/proc/{pid}"):
                    raise SensorError(f"no process with PID {pid}")
            # Insert, then look again: a child forked between the /proc scan and the map
            # update had an untracked parent when the kernel saw the fork.
            for _ in range(2):
                for pid in descendants(self._pids) - members:
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
        for path in self._cgroups:
            members.update(cg.pids(path))
        self._seed(members)
        self._write_cfg(watched)

    def set_exec_rules(
        self, *, kill_names: Iterable[str] = (), kill_paths: Iterable[str] = (),
        hold_names: Iterable[str] = (),
    ) -> list[str]:
        """Exec rules the kernel acts on at syscall entry, compiled from the policy by the
        engine; matched on the filename as passed to execve (no resolution), by exact path or
        by basename. Kill: SIGKILL, the program never runs. Hold: SIGSTOP, the program stops
        before its first instruction until the guard decides and sends SIGCONT or SIGKILL.
        Replaces the previous rules; kill wins over hold for the same name.

        Returns the entries the kernel cannot compare (a name with '/' or of 64+ bytes, a
        path of 256+ bytes): they are left to the engine, which judges every exec anyway.
        """
        b = self._require()
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
        self._exec_rules = bool(names or paths)
        self._write_cfg(None)
        return skipped

    def _write_cfg(self, watched: list[tuple[int, int]] | None) -> None:
        table = self._require()[b"scope"]
        cfg = table[ctypes.c_int(0)]
        if watched is not None:
            cfg.ncgroups = len(watched)
            for i, (level, cid) in enumerate(watched):
                cfg.levels[i], cfg.ids[i] = level, cid
            cfg.pid_mode = int(bool(self._pids))
        cfg.exec_rules = int(self._exec_rules)
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

    def tracked_count(self) -> int:
        """Live processes in the pid-tracked set (0 once everything under --pid exited)."""
        return len(self._require()[b"tracked"])

    @property
    def stats(self) -> SensorStats:
        self._stats.pending = len(self._pending)
        return self._stats

    def _require(self):
        if self._bpf is None:
            raise SensorError("sensor not started")
        return self._bpf

    # -- transport ---------------------------------------------------------------------------

    def _on_event(self, _cpu: int, data: int, size: int) -> None:
        self._raw.append(ctypes.string_at(data, size))

    def _on_lost_urgent(self, count: int) -> None:
        self._stats.lost_urgent += count

    def _on_lost_bulk(self, count: int) -> None:
        self._stats.lost_bulk += count

    def poll(self, timeout_ms: int = 2) -> list[Event]:
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
        b = self._require()
        b.perf_buffer_poll(0 if self._pending else timeout_ms)
        cut = time.monotonic_ns()
        b.perf_buffer_consume()
        return self._take(cut)

    def _take(self, cut: int | None) -> list[Event]:
        raw, self._raw = self._raw, []
        unpack = _HDR.unpack_from
        batch = [(unpack(r), r) for r in raw if len(r) >= _HDR_SIZE]
        self._stats.bad += len(raw) - len(batch)
        if self._pending:
            batch = self._pending + batch
            self._pending = []
        if cut is not None and batch and max(h[0] for h, _ in batch) > cut:
            self._pending = [x for x in batch if x[0][0] > cut]
            batch = [x for x in batch if x[0][0] <= cut]
        # Each per-CPU buffer is already in order: timsort merges those runs cheaply.
        batch.sort(key=_by_ts)
        decode = self._decode
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
        now = time.monotonic_ns()
        if now > self._next_prune:
            self._model.prune(now - _PRUNE_EVERY_NS)
            self._next_prune = now + _PRUNE_EVERY_NS
        return out

    # -- decoding ------------------------------------------------------------------------

    def decode(self, record: bytes) -> Event | None:
        """One raw perf-buffer record as the kernel wrote it -> Event, or None for a kind
        this version does not know. Raises DecodeError for a record that cannot be one.
        Needs no kernel (tests feed it bytes), but updates the process model like poll()."""
        if len(record) < _HDR_SIZE:
            raise DecodeError(f"record of {len(record)} bytes, shorter than the header")
        return self._decode(_HDR.unpack_from(record), record)

    def _decode(self, hdr: tuple, r: bytes) -> Event | None:
        (ts, cgid, start, ret, pid, tgid, ppid, uid, code, flags, fd, sc_flags, child, plen,
         comm_b) = hdr  # fmt: skip
        # Every kind has path_len <= PATH_LEN and the bytes it counts (0 for non-path kinds).
        if plen > PATH_LEN or len(r) < _PATH_OFF + plen:
            raise DecodeError(f"path_len {plen} does not fit a record of {len(r)} bytes")
        comm = self._comms.get(comm_b)
        if comm is None:
            if len(self._comms) >= 4096:  # a process can rename itself at will: bound it
                self._comms.clear()
            comm = self._comms[comm_b] = _text(comm_b)
        model = self._model
        if code == _OPEN and not flags & (F_NO_PROC | F_PATH_TRUNC):
            # Fast path for the bulk of the stream (opens of a known process): the same
            # result as the general path below, with fewer calls. ~30% more events/s.
            st = model.procs.get(tgid)
            if st is not None and st.start_ns == start:
                raw_path = r[_PATH_OFF : _PATH_OFF + plen - 1].decode("utf-8", "backslashreplace")
                path = normalize(raw_path) if raw_path[:1] == "/" else None
                if path is None:
                    path = model.resolve(st, tgid, fd, raw_path)
                if path is not None:
                    st.last_seen_ns = ts
                    if ret >= 0:
                        st.fds[ret] = path
                    return Event(
                        Kind.OPEN, ts, pid, tgid, ppid, uid, comm, cgid, start, raw_path, path,
                        (), False, sc_flags, _access_cached(sc_flags), ret,
                    )  # fmt: skip
        kind = KIND_CODES.get(code)
        if kind is None:
            return None
        st = model.get(tgid, start)
        st.last_seen_ns = ts
        notes: list[str] = []
        if flags & F_NO_PROC:
            # Predates attach and was not seeded: /proc (read by model.get) or nothing.
            ppid, start = st.ppid, st.start_ns
            if not start:
                notes.append(NOTE_PROC_UNKNOWN)
            else:
                self._learn_proc(tgid, st)
        ev = Event(kind, ts, pid, tgid, ppid, uid, comm, cgid, start)

        if kind is Kind.OPEN or kind is Kind.UNLINK or kind is Kind.CHDIR or kind is Kind.EXEC:
            # path_len counts the NUL that bpf_probe_read_user_str always writes.
            raw_path = (
                r[_PATH_OFF : _PATH_OFF + plen - 1].decode("utf-8", "backslashreplace")
                if plen > 1
                else ""
            )
            ev.raw_path = raw_path
            ev.flags = sc_flags
            if flags & F_PATH_TRUNC:
                notes.append(NOTE_PATH_TRUNCATED)
            if kind is Kind.CHDIR and not plen:
                path = model.dir_of(st, tgid, fd)  # fchdir(fd)
            elif kind is Kind.EXEC and raw_path == "" and sc_flags & AT_EMPTY_PATH:
                path = model.dir_of(st, tgid, fd)  # execveat(fd, "", AT_EMPTY_PATH)
            else:
                path = model.resolve(st, tgid, fd, raw_path)
            if path is None:
                notes.append(NOTE_UNRESOLVED)
                self._stats.unresolved += 1
            else:
                ev.path = path
            if kind is Kind.OPEN:
                ev.ret = ret
                ev.access = _access_cached(sc_flags)
                if ret >= 0 and path is not None:
                    st.fds[ret] = path
            elif kind is Kind.UNLINK:
                ev.ret = ret
                ev.is_dir = bool(sc_flags & AT_REMOVEDIR)
            elif kind is Kind.CHDIR:
                ev.ret = ret
                if ret == 0:
                    st.cwd = path
            else:
                ev.cwd = st.cwd or ""
                self._decode_argv(ev, r)
                if flags & F_ARGV_TRUNC:
                    ev.argv_truncated = True
                if flags & F_KILLED:
                    notes.append(NOTE_KILLED)  # emitted at entry: no result
                else:
                    ev.ret = ret  # emitted at exit: 0, or -errno for a failed attempt
                    if flags & F_HELD:
                        notes.append(NOTE_HELD)
        elif kind is Kind.CONNECT:
            if len(r) < _CONN_UNIX_OFF:
                raise DecodeError(f"connect record of {len(r)} bytes")
            family, port, addrlen, addr = _CONN.unpack_from(r, _CONN_OFF)
            ev.family = _FAMILIES.get(family, str(family))
            ev.port = socket.ntohs(port)
            if family == socket.AF_INET:
                ev.addr = socket.inet_ntop(socket.AF_INET, addr[:4])
            elif family == socket.AF_INET6:
                ev.addr = socket.inet_ntop(socket.AF_INET6, addr)
            else:
                n = min(max(addrlen - 2, 0), len(r) - _CONN_UNIX_OFF)
                sun = r[_CONN_UNIX_OFF : _CONN_UNIX_OFF + n]
                # Abstract sockets start with NUL; shown as "@name" like ss(8) does.
                if sun[:1] == b"\0":
                    ev.addr = "@" + _text(sun[1:].replace(b"\0", b"@"))
                else:
                    ev.addr = _text(sun)
        elif kind is Kind.FORK:
            ev.child_pid = child
            model.fork(st, child, tgid)
        elif kind is Kind.EXIT:
            model.exit(tgid)
        if notes:
            ev.notes = tuple(notes)
        return ev

    @staticmethod
    def _decode_argv(ev: Event, r: bytes) -> None:
        if len(r) < _EXEC_ARGV_OFF:
            raise DecodeError(f"exec record of {len(r)} bytes")
        (argc,) = _EXEC_ARGC.unpack_from(r, _EXEC_ARGC_OFF)
        if argc > MAX_ARGS or len(r) < _EXEC_ARGV_OFF + argc * ARG_LEN:
            # Unchecked, a corrupt argc of 2**32-1 would build billions of empty arguments.
            raise DecodeError(f"exec record of {len(r)} bytes with argc {argc}")
        args = []
        for i in range(argc):
            off = _EXEC_ARGV_OFF + i * ARG_LEN
            args.append(_text(r[off : off + ARG_LEN]))
        ev.argv = tuple(args)

    def _learn_proc(self, tgid: int, st: ProcState) -> None:
        """Tell the kernel what /proc told us, so later events carry ppid/start_ns."""
        if self._bpf is None:
            return  # decode() on recorded bytes, no kernel attached: nobody to tell
        procs = self._require()[b"procs"]
        leaf = procs.Leaf()
        leaf.ppid, leaf.start_ns = st.ppid, st.start_ns
        procs[ctypes.c_uint32(tgid)] = leaf


# -- loading ------------------------------------------------------------------------------------

_TP_PREFIX = "tracepoint__"
_FAILED_PROGRAM = re.compile(r"Failed to load BPF program b'([^']+)': (.*)")


def _cflags(bpf_dir: Path) -> list[str]:
    flags = [
        f"-I{bpf_dir}",
        f"-DPY_SIZEOF_HDR={ctypes.sizeof(RawEvent)}",
        f"-DPY_SIZEOF_PATH={ctypes.sizeof(RawPathEvent)}",
        f"-DPY_SIZEOF_EXEC={ctypes.sizeof(RawExecEvent)}",
        f"-DPY_SIZEOF_CONNECT={ctypes.sizeof(RawConnectEvent)}",
    ]
    if "group_dead" in _tracepoint_format("sched", "sched_process_exit"):
        flags.append("-DHAVE_GROUP_DEAD")
    return flags


def _attach_point(program: str) -> str:
    """bcc's name for a TRACEPOINT_PROBE function -> "category:event" (as bcc derives it)."""
    return program[len(_TP_PREFIX):].replace("__", ":")


def object_programs(b: Any) -> list[str]:
    """The name of every program (BPF function) in a compiled bcc object."""
    from bcc import lib  # only ever called with bcc loaded

    return [lib.bpf_function_name(b.module, i).decode() for i in range(lib.bpf_num_functions(b.module))]


def programs_of(b: Any) -> dict[str, str]:
    """Every program of a bcc object -> the tracepoint it is attached to ("" if none)."""
    attached = {tp.decode() for tp in b.tracepoint_fds}
    return {p: _attach_point(p) if p.startswith(_TP_PREFIX) and _attach_point(p) in attached else ""
            for p in object_programs(b)}


def load_programs(source: Path = SOURCE) -> Any:
    """Compile `source` and load and attach every program in it (bcc does both for each
    TRACEPOINT_PROBE), or raise SensorError naming the program, the verifier's own reason,
    the kernel, and the file holding bcc's full output. Returns the bcc object."""
    try:
        host.require_root()
        host.ensure_tracefs()
        host.import_bcc()
    except host.HostError as e:
        raise SensorError(str(e)) from e
    source = Path(source)
    loaded = host.bcc_load(keep_log=True, src_file=str(source).encode(),
                           cflags=_cflags(source.resolve().parent))
    b = loaded.bpf
    if loaded.error is not None:
        raise SensorError(_load_failure(b, source, loaded.error, loaded.output, loaded.log))
    if loaded.output:
        sys.stderr.write(loaded.output)  # warnings: nothing bcc says is hidden on success
    missing = [p for p, point in programs_of(b).items() if not point]
    if missing:
        host.discard(b)
        raise SensorError(f"{source}: not attached on kernel {platform.release()}: {', '.join(missing)} "
                          "(the sensor uses syscall and task tracepoints only)")
    return b


_EPERM_MESSAGE = "Need super-user privileges to run"  # what bcc says for any EPERM, even to root


def _load_failure(b: Any, source: Path, error: Exception, output: str, log: Path | None) -> str:
    """One line for a failed load; undoes whatever bcc attached before it failed."""
    message = (str(error).strip().splitlines() or [type(error).__name__])[0]
    failed = _FAILED_PROGRAM.search(message)
    errno_text = failed.group(2) if failed else "Operation not permitted" if message == _EPERM_MESSAGE else message
    what = message
    if getattr(b, "module", None) is None:
        what = "compile error"
    else:
        # bcc loads and attaches in object order: the first program not attached is the one.
        loaded = {name.decode() for name in getattr(b, "funcs", {})}
        bad = next((p for p, point in programs_of(b).items() if not point), None)
        if bad is not None:
            point = _attach_point(bad) if bad.startswith(_TP_PREFIX) else bad
            what = (f"program {point} refused by the kernel ({errno_text})" if bad not in loaded
                    else f"program {point} loaded but not attached ({message})")
    host.discard(b)
    # bcc compiles the file as /virtual/main.c: name the real one in clang's errors.
    reason = re.sub(r"\bmain\.c:", f"{source.name}:", host.bpf_failure_reason(output, error))
    return (f"cannot load {source} on kernel {platform.release()}: {what}: {reason}"
            f" (full bcc output: {log})")


def _tracepoint_format(category: str, name: str) -> str:
    try:
        return (host.TRACEFS / "events" / category / name / "format").read_text()
    except OSError:
        return ""
