"""The verdict log: an append-only, hash-chained, redacted JSON-lines audit trail.

The actuator kills or freezes only after `VerdictLog.append` returns, and a failing append
raises `AuditLogError` so the caller can fail closed (freeze the agent). Hence every append is
written to the OS (one os.write on an O_APPEND fd, optionally fsync'd) before it returns.

Chain definition (what `verify_log` checks)
-------------------------------------------
Each line is one JSON object, serialized by orjson, ending in "\\n":

    body_n = orjson.dumps({"seq": n, "prev": prev_n, **redacted_record})
    hash_n = sha256(body_n).hexdigest()
    line_n = body_n[:-1] + b',"hash":"' + hash_n + b'"}' + b"\\n"

i.e. `hash` is always the last member, and it covers the exact bytes of the line without that
member. `prev_1 = GENESIS` (64 zeros) and `prev_n = hash_{n-1}`, so every record commits to the
exact bytes of all earlier ones. `seq` starts at 1 and increases by one per record, across
restarts and rotation. An edit that keeps the stored hash fails at the edited record; one that
recomputes it fails at the next record's `prev`.

The head file (`<log>.head`, fixed 128 bytes, rewritten in place with one pwrite after every
append) holds the last seq and hash, so cutting records off the end is detected. A crash between
the log write and the head write leaves the head exactly one record behind; that state is
accepted (and healed on reopen), anything else is reported.

Rotation: when the current file would exceed `max_bytes`, it is renamed to `<log>.<N>` with N one
above the highest existing number (so ascending numbers are chronological and a rotation is one
rename), and the chain simply continues in the new file.

Loss (records that could not be written)
----------------------------------------
When `append` raises AuditLogError because the record could not be written (disk full, I/O
error), the writer counts it: `VerdictLog.unwritten_total` for the session, and a pending count
that the next record which *is* written carries as `"unwritten_before": N` (a member of that
record, so the count and the record are written together or not at all). The pending count is
also kept in the head file as `"unwritten": N` (an in-place pwrite, which still works on a full
disk), so records lost at the end of a session are carried by the first record of the next one
and reported by `verify_log` even if no record is ever written after them. `verify` and
`report` show both; the chain itself stays intact (the lost records were never in it).

A record `{"type": "chain_repair", "prev": GENESIS, ...}` (written only by
`VerdictLog(..., repair=True)`) starts a new chain segment after damage; verify accepts it and
reports it in `notes`. This keeps a damaged log usable without ever hiding the damage.

Tamper evidence, not tamper proof: whoever can write the log can also recompute the chain. Ship
lines off-host for that.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, NamedTuple

import orjson

from ebpf_guard.events import Event, Kind
from ebpf_guard.files import open_regular, read_regular
from ebpf_guard.redact import Redactor
from ebpf_guard.verdicts import Decision

log = logging.getLogger(__name__)

DEFAULT_LOG = "/var/log/ebpf-guard/verdicts.jsonl"
GENESIS = "0" * 64
HEAD_SUFFIX = ".head"
HEAD_SIZE = 128
LOSS_KEY = "unwritten_before"  # on a record: how many records before it could not be written
_RESERVED = ("seq", "prev", "hash", LOSS_KEY)
_HASH_TAIL = re.compile(rb',"hash":"([0-9a-f]{64})"}\n?\Z')
# Refuse anything orjson would otherwise serialize on its own (dataclasses, datetimes, str
# subclasses): those would bypass redaction, which only walks dicts, lists and strings.
_DUMP_OPTS = (
    orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_SUBCLASS
)


class AuditLogError(Exception):
    """The audit log could not be written or is inconsistent; the caller must fail closed."""


# ---------------------------------------------------------------------------------------------
# Records


def utc_ts(ns: int | None = None) -> str:
    """Wall-clock ISO-8601 UTC with milliseconds: 2025-11-22T04:08:00.123Z."""
    ns = time.time_ns() if ns is None else ns
    sec, rem = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)) + f".{rem // 1_000_000:03d}Z"


def _val(x: Any) -> Any:
    return x.value if isinstance(x, Enum) else x


_PATH_KINDS = frozenset({Kind.EXEC, Kind.OPEN, Kind.UNLINK, Kind.CHDIR, Kind.RENAME, Kind.LINK,
                         Kind.SYMLINK, Kind.TRUNCATE, Kind.MMAP_EXEC})


def event_record(ev: Event) -> dict:
    """The event as logged: identity fields always, the rest as fits the kind."""
    d: dict[str, Any] = {
        "kind": _val(ev.kind),
        "ts_ns": ev.ts_ns,
        "pid": ev.pid,
        "tgid": ev.tgid,
        "ppid": ev.ppid,
        "uid": ev.uid,
        "comm": ev.comm,
        "cgroup": ev.cgroup_id,
        "start_ns": ev.start_ns,
    }
    kind = Kind(ev.kind)
    if ev.exe:
        d["exe"] = ev.exe  # the program, as the kernel resolved it: not what comm claims
    if kind in _PATH_KINDS:
        # What was asked (raw_path), its lexical absolute form (path), and what the kernel
        # reached (real_path, dev:ino): they differ for a symlink, hard link or /proc alias.
        d["path"] = ev.path
        d["raw_path"] = ev.raw_path
        if ev.real_path:
            d["real_path"] = ev.real_path
        if ev.path_cut:
            d["path_cut"] = True
        if ev.ino:
            d["dev_ino"] = f"{os.major(ev.dev)}:{os.minor(ev.dev)}:{ev.ino}"
    if kind in (Kind.RENAME, Kind.LINK, Kind.SYMLINK):
        d["dest_path"] = ev.dest_path
        d["dest_raw_path"] = ev.dest_raw_path
        if ev.dest_real_path:
            d["dest_real_path"] = ev.dest_real_path
    if kind is Kind.EXEC:
        if ev.exe_sha256:
            d["exe_sha256"] = ev.exe_sha256
        if any(ev.real_args):
            d["real_args"] = list(ev.real_args)
        d["argv"] = list(ev.argv)
        if ev.cwd:
            d["cwd"] = ev.cwd  # what relative operands meant
        if ev.argv_truncated:
            d["argv_truncated"] = True
    elif kind is Kind.OPEN:
        d["access"] = sorted(ev.access)
        d["flags"] = ev.flags
    elif kind is Kind.UNLINK:
        d["is_dir"] = ev.is_dir
    elif kind is Kind.PTRACE:
        d["target_pid"] = ev.target_pid
        d["request"] = ev.flags
    elif kind is Kind.CONNECT:
        if ev.via and ev.via != "connect":
            d["via"] = ev.via  # a destination given to sendto/sendmsg, no connect(2)
        d["family"] = ev.family
        if ev.family == "unix":
            d["dest"] = ev.addr
        elif ev.family == "ipv6":
            d["dest"] = f"[{ev.addr}]:{ev.port}"
        else:
            d["dest"] = f"{ev.addr}:{ev.port}"
    elif kind is Kind.FORK:
        d["child_pid"] = ev.child_pid
    if ev.ret is not None and kind not in (Kind.EXEC, Kind.FORK, Kind.EXIT):
        d["ret"] = ev.ret
    if ev.notes:
        d["notes"] = list(ev.notes)
    return d


def record_for(
    decision: Decision,
    *,
    mode: str,
    action: str,
    incident: str | None = None,
    extra: dict | None = None,
) -> dict:
    """The `type: verdict` record for one decision. `action` is what is done about it
    ("none", "logged", "killed", "frozen", "asked", ...); `extra` keys are merged at top level."""
    rec: dict[str, Any] = {
        "type": "verdict",
        "ts": utc_ts(),
        "verdict": _val(decision.verdict),
        "rule": decision.rule,
        "reason": decision.reason,
        "mode": _val(mode),
        "action": _val(action),
        "scope": _val(decision.scope),
        "enforced_in_kernel": decision.enforced_in_kernel,
        "prevented": decision.prevented,
        "event": event_record(decision.event),
    }
    # The deciding rule's tags and severity (policy/ RuleDecision); plain Decisions have none.
    tags = getattr(decision, "tags", ())
    if tags:
        rec["tags"] = list(tags)
    severity = getattr(decision, "severity", "")
    if severity:
        rec["severity"] = severity
    if incident is not None:
        rec["incident"] = str(incident)
    for k, v in (extra or {}).items():
        if k in rec or k in _RESERVED:
            raise ValueError(f"extra key {k!r} collides with a record field")
        rec[k] = v
    return rec


# ---------------------------------------------------------------------------------------------
# Files


def read_error(path: str | os.PathLike[str], e: OSError) -> str:
    """Why a log file cannot be read, in one line; says to run as root when that would help
    (the default log directory is root-only)."""
    what = f"cannot read {e.filename or path}: {e.strerror or e}"
    if e.errno in (errno.EACCES, errno.EPERM) and os.geteuid() != 0:
        what += " (run as root)"
    return what


def head_path(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    return p.with_name(p.name + HEAD_SUFFIX)


def log_files(path: str | os.PathLike[str]) -> list[Path]:
    """The rotated set in chronological order: <log>.1, <log>.2, …, then <log> itself."""
    p = Path(path)
    rx = re.compile(re.escape(p.name) + r"\.([0-9]+)")
    numbered: list[tuple[int, Path]] = []
    try:
        names = os.listdir(p.parent)
    except (FileNotFoundError, NotADirectoryError):
        names = []  # no log there (other errors, e.g. EACCES, are the caller's to report)
    for name in names:
        m = rx.fullmatch(name)
        if m:
            numbered.append((int(m.group(1)), p.parent / name))
    files = [f for _, f in sorted(numbered)]
    if p.exists():
        files.append(p)
    return files


@dataclass(frozen=True, slots=True)
class _Parsed:
    seq: int
    prev: str
    hash: str
    type: Any
    hash_ok: bool
    unwritten: int  # records the writer could not write before this one


def _parse(line: bytes) -> _Parsed:
    """Parses one line (with or without its newline). Raises ValueError saying what is wrong."""
    m = _HASH_TAIL.search(line)
    if not m:
        raise ValueError("line does not end with a hash member (torn write or edited)")
    body = line[: m.start()] + b"}"
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        raise ValueError("line is not valid JSON (torn write or edited)") from None
    if not isinstance(obj, dict):
        raise ValueError("line is not a JSON object (edited)")
    seq, prev, h = obj.get("seq"), obj.get("prev"), m.group(1).decode()
    if obj.get("hash") != h:
        raise ValueError("hash member is duplicated or malformed")
    if type(seq) is not int or not isinstance(prev, str) or not re.fullmatch("[0-9a-f]{64}", prev):
        raise ValueError("seq or prev missing or malformed")
    lost = obj.get(LOSS_KEY)
    lost = lost if type(lost) is int and lost > 0 else 0
    return _Parsed(seq, prev, h, obj.get("type"), hashlib.sha256(body).hexdigest() == h, lost)


class _Head(NamedTuple):
    """The head file: last seq and hash, records lost after it that no record carries yet, and
    whether the file is byte for byte what the writer writes for those values."""

    seq: int
    hash: str
    unwritten: int
    exact: bool


def _head_bytes(seq: int, h: str, unwritten: int) -> bytes:
    head: dict[str, Any] = {"seq": seq, "hash": h}
    if unwritten:
        head["unwritten"] = unwritten
    return orjson.dumps(head).ljust(HEAD_SIZE - 1) + b"\n"


def _read_head(path: Path) -> _Head | None:
    """The head file; None if missing or empty; ValueError if garbled."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    if not data.strip():
        return None
    try:
        obj = orjson.loads(data)
        seq, h, lost = obj["seq"], obj["hash"], obj.get("unwritten", 0)
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise ValueError("head file is not valid") from None
    if type(seq) is not int or not isinstance(h, str) or not re.fullmatch("[0-9a-f]{64}", h):
        raise ValueError("head file is not valid")
    if type(lost) is not int or lost < 0:
        raise ValueError("head file is not valid")
    return _Head(seq, h, lost, data == _head_bytes(seq, h, lost))


def _last_line(path: Path) -> bytes | None:
    """The last line (with its newline, if any) read backwards from the end; None if empty."""
    with open(path, "rb") as f:
        end = f.seek(0, os.SEEK_END)
        if end == 0:
            return None
        buf = b""
        pos = end
        while pos > 0:
            step = min(8192, pos)
            pos -= step
            f.seek(pos)
            buf = f.read(step) + buf
            cut = buf.rfind(b"\n", 0, len(buf) - 1)
            if cut >= 0:
                return buf[cut + 1 :]
        return buf


# ---------------------------------------------------------------------------------------------
# Writer


class VerdictLog:
    """Appends records to the hash-chained JSONL log. One writer per log (enforced by flock).

    `unwritten_total` counts the records this writer could not write (see "Loss" above)."""

    def __init__(
        self,
        path: str | os.PathLike[str] = DEFAULT_LOG,
        *,
        redactor: Redactor | None = None,
        max_bytes: int | None = None,
        fsync: bool = False,
        repair: bool = False,
    ) -> None:
        self.path = Path(path)
        self.head = head_path(self.path)
        self.redactor = redactor if redactor is not None else Redactor()
        self.max_bytes = max_bytes
        self.fsync = fsync
        self._lock = threading.Lock()
        self._fd = -1
        self._head_fd = -1
        self._broken = ""
        self._unwritten = 0  # lost since the last record written; the next one carries it
        self.unwritten_total = 0
        try:
            self._open(repair)
        except OSError as e:
            self.close()
            raise AuditLogError(f"cannot open audit log {self.path}: {e.strerror or e}") from e
        except AuditLogError:
            self.close()
            raise

    # -- opening ------------------------------------------------------------------------------

    def _open(self, repair: bool) -> None:
        parent = self.path.parent
        if not parent.is_dir():
            parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(parent, 0o700)  # mkdir's mode is filtered by the umask
        flags = os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        # Regular files only: a log "written" to /dev/null or a FIFO would be evidence lost.
        self._fd = open_regular(self.path, flags | os.O_WRONLY | os.O_APPEND, 0o600)
        self._head_fd = open_regular(self.head, flags | os.O_RDWR, 0o600)
        try:
            fcntl.flock(self._head_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AuditLogError(f"audit log {self.path} is in use by another writer") from None
        self._size = os.fstat(self._fd).st_size
        self._seq, self._prev = self._recover(repair)

    def _recover(self, repair: bool) -> tuple[int, str]:
        """Continues from the last record, after checking it against the head file."""
        problem = ""
        tail: _Parsed | None = None
        torn = False
        last_file = next((f for f in reversed(log_files(self.path)) if f.stat().st_size), None)
        if last_file is not None:
            line = _last_line(last_file) or b""
            torn = not line.endswith(b"\n")
            try:
                tail = _parse(line)
                if not tail.hash_ok:
                    problem = f"last record in {last_file.name} does not match its hash (edited)"
            except ValueError as e:
                problem = f"last line of {last_file.name}: {e}"
        try:
            head = _read_head(self.head)
        except ValueError as e:
            head, problem = None, problem or f"{self.head.name}: {e}"
        if not problem:
            h_seq, h_hash, h_lost, _ = head or (0, GENESIS, 0, True)
            t_seq, t_hash = (tail.seq, tail.hash) if tail else (0, GENESIS)
            if (h_seq, h_hash) == (t_seq, t_hash):
                self._unwritten = h_lost  # lost at the end of the last session: carried on
                return t_seq, t_hash
            if tail is not None and h_seq == t_seq - 1 and h_hash == tail.prev:
                # Crashed between the log write and the head update: the head is one behind.
                log.warning("audit log %s: head file was one record behind; updated", self.path)
                self._write_head(t_seq, t_hash)
                return t_seq, t_hash
            if head is None:
                problem = f"{self.head.name} is missing but the log ends at seq {t_seq}"
            elif t_seq < h_seq:
                problem = (f"{self.head.name} says the last record is seq {h_seq} but the log ends "
                           f"at seq {t_seq} (records truncated)")
            else:
                problem = (f"{self.head.name} (seq {h_seq}) does not match the last record "
                           f"(seq {t_seq})")
        if not repair:
            raise AuditLogError(
                f"audit log {self.path} is inconsistent: {problem}; refusing to continue the chain "
                f"(run `ebpf-guard verify`, then open with repair to start a new, marked segment)"
            )
        if torn and last_file == self.path:
            self._write_all(b"\n")  # end the fragment so the repair record is a line of its own
        seq = max(head.seq if head else 0, tail.seq if tail else 0)
        self._seq, self._prev = seq, GENESIS
        self._unwritten = head.unwritten if head else 0
        log.warning("audit log %s: %s; starting a new chain segment at seq %d",
                    self.path, problem, seq + 1)
        rec = self.append({"type": "chain_repair", "problem": problem,
                           "head": {"seq": head.seq, "hash": head.hash} if head else None,
                           "tail": {"seq": tail.seq, "hash": tail.hash} if tail else None})
        return rec["seq"], rec["hash"]

    # -- appending ----------------------------------------------------------------------------

    def append(self, record: dict) -> dict:
        """Redacts, chains and writes one record; returns it as written (with seq, prev, hash).

        Adds `ts` if absent. Any `seq`/`prev`/`hash`/`unwritten_before` in `record` is replaced;
        `unwritten_before` is added when records before this one could not be written. Raises
        AuditLogError on any failure. The record is then not in the log and is counted as
        unwritten, except when only the head-file update failed (the record is written; the
        head heals on the next append).
        """
        with self._lock:
            try:
                line, out = self._line(record)
                if self.max_bytes and self._size and self._size + len(line) > self.max_bytes:
                    self._rotate()
                self._write_all(line)
            except AuditLogError:
                self._count_unwritten()
                raise
            self._seq, self._prev = out["seq"], out["hash"]
            self._unwritten = 0
            self._write_head(self._seq, self._prev)
            return out

    def _line(self, record: dict) -> tuple[bytes, dict]:
        """The chained line for `record` and the record as written (with seq, prev, hash)."""
        if self._broken:
            raise AuditLogError(f"audit log {self.path} is unusable: {self._broken}")
        if self._fd < 0:
            raise AuditLogError(f"audit log {self.path} is closed")
        rec = {k: v for k, v in record.items() if k not in _RESERVED}
        rec.setdefault("ts", utc_ts())
        if self._unwritten:
            rec[LOSS_KEY] = self._unwritten
        out = {"seq": self._seq + 1, "prev": self._prev,
               **self.redactor.redact_obj(rec, keys=True)}
        out, body = _dumps(out)
        h = hashlib.sha256(body).hexdigest()
        out["hash"] = h
        return body[:-1] + b',"hash":"' + h.encode() + b'"}\n', out

    def _count_unwritten(self) -> None:
        self._unwritten += 1
        self.unwritten_total += 1
        if self._head_fd >= 0:
            try:  # in place, so it usually works on a full disk too: the count survives us
                self._write_head(self._seq, self._prev)
            except AuditLogError:
                pass  # still carried by the next record this writer manages to write

    def _write_all(self, data: bytes) -> None:
        done = 0
        try:
            # A short write (the disk filled mid-line) is continued: the next write then fails
            # with the real reason (ENOSPC), which is what the operator needs to read.
            while done < len(data):
                n = os.write(self._fd, data[done:])
                if n <= 0:
                    raise OSError(0, f"short write ({done} of {len(data)} bytes)")
                done += n
            if self.fsync:
                os.fsync(self._fd)
        except OSError as e:
            # Cut a partial line off again so later records do not glue onto it.
            try:
                os.ftruncate(self._fd, self._size)
            except OSError:
                self._broken = f"a partial line could not be removed after: {e.strerror or e}"
            raise AuditLogError(f"cannot write audit log {self.path}: {e.strerror or e}") from e
        self._size += len(data)

    def _write_head(self, seq: int, h: str) -> None:
        data = _head_bytes(seq, h, self._unwritten)
        try:
            if os.pwrite(self._head_fd, data, 0) != HEAD_SIZE:
                raise OSError(0, "short write")
            if self.fsync:
                os.fsync(self._head_fd)
        except OSError as e:
            # The record itself is in the log; a stale head is healed by the next append.
            raise AuditLogError(f"cannot update {self.head}: {e.strerror or e}") from e

    def _rotate(self) -> None:
        try:
            files = log_files(self.path)
            nums = [int(f.name.rsplit(".", 1)[1]) for f in files if f != self.path]
            target = self.path.with_name(f"{self.path.name}.{max(nums, default=0) + 1}")
            if self.fsync:
                os.fsync(self._fd)
            os.rename(self.path, target)
        except OSError as e:
            raise AuditLogError(f"cannot rotate audit log {self.path}: {e.strerror or e}") from e
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_APPEND
                         | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as e:
            try:
                os.rename(target, self.path)  # put it back so the next append can retry
            except OSError:
                self._broken = f"rotated to {target.name} but cannot create a new file"
            raise AuditLogError(f"cannot create audit log {self.path}: {e.strerror or e}") from e
        os.close(self._fd)
        self._fd, self._size = fd, 0
        if self.fsync:
            _fsync_dir(self.path.parent)

    def redact(self, obj: Any) -> Any:
        """`obj` redacted exactly as `append` would, for files written beside the log
        (incident bundles) that must not leak what the log masks."""
        return self.redactor.redact_obj(obj, keys=True)

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def seq(self) -> int:
        """Seq of the last record written (0 for an empty log)."""
        return self._seq

    def close(self) -> None:
        with self._lock:
            for name in ("_fd", "_head_fd"):
                fd = getattr(self, name)
                if fd >= 0:
                    os.close(fd)  # also drops the flock
                    setattr(self, name, -1)

    def __enter__(self) -> VerdictLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _dumps(obj: dict) -> tuple[dict, bytes]:
    """(obj as serialized, bytes); obj changes only when undecodable text had to be escaped."""
    try:
        return obj, orjson.dumps(obj, option=_DUMP_OPTS)
    except TypeError as e:
        if "surrogates" not in str(e):
            raise AuditLogError(f"record is not plain JSON data: {e}") from e
    # Paths and argv from the kernel may hold undecodable bytes (surrogateescape); a hostile
    # file name must not turn into a logging failure, which would freeze the agent.
    obj = _fix_surrogates(obj)
    try:
        return obj, orjson.dumps(obj, option=_DUMP_OPTS)
    except TypeError as e:
        raise AuditLogError(f"record is not plain JSON data: {e}") from e


def _fix_surrogates(obj: Any) -> Any:
    if isinstance(obj, str):
        try:  # bytes smuggled in by surrogateescape come out as \xff
            return obj.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:  # other lone surrogates as \ud800
            return obj.encode("utf-8", "backslashreplace").decode()
    if isinstance(obj, dict):
        return {_fix_surrogates(k): _fix_surrogates(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_fix_surrogates(v) for v in obj]
    return obj


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Verifier


@dataclass(slots=True)
class VerifyResult:
    """What `verify_log` found. Not ok and not `unreadable`: the log is damaged or not a log."""

    ok: bool
    records: int  # records checked and found good
    first_bad_seq: int | None = None
    problem: str = ""  # one human line, "verdicts.jsonl:17: seq 17: …"; "" when ok
    file: str | None = None
    line: int | None = None
    notes: list[str] = field(default_factory=list)  # accepted oddities (repairs, head lag, loss)
    unreadable: bool = False  # could not be read at all (missing, permission, I/O error)
    unwritten: int = 0  # records the writer counted as not written (carried or in the head)
    unwritten_at_end: int = 0  # of which after the last record (only the head file says so)
    last_seq: int = field(default=0, compare=False)  # seq of the last record read


def _lines(files: list[Path]) -> Iterator[tuple[Path, int, bytes]]:
    for f in files:
        with read_regular(f) as fh:
            for i, raw in enumerate(fh, 1):
                yield f, i, raw


def verify_log(path: str | os.PathLike[str]) -> VerifyResult:
    """Checks seq continuity, every hash and prev link across the rotated set, and the head.

    Never raises: a log that cannot be read at all comes back with `unreadable` set."""
    p = Path(path)
    try:
        if p.is_dir():
            return VerifyResult(False, 0, None, f"{p}: is a directory, not a verdict log (give "
                                f"the log file, e.g. {p / Path(DEFAULT_LOG).name})", str(p))
        return _verify(p)
    except OSError as e:
        return VerifyResult(False, 0, None, read_error(p, e), str(p), unreadable=True)


def _verify(path: Path) -> VerifyResult:
    files = log_files(path)
    hp = head_path(path)
    if not files:
        return VerifyResult(False, 0, None, f"{path}: no such log", str(path), unreadable=True)
    notes: list[str] = []
    lost = 0
    seq, prev, last_prev = 0, GENESIS, GENESIS
    good = 0
    last = (files[-1], 0)
    pending_bad: tuple[Path, int, str] | None = None  # an unparsable line, OK only before a repair

    def bad(f: Path, ln: int, s: int | None, what: str) -> VerifyResult:
        where = f"{f.name}:{ln}: " + (f"seq {s}: " if s is not None else "")
        return VerifyResult(False, good, s, where + what, str(f), ln, notes, unwritten=lost)

    it = _lines(files)
    for f, ln, raw in it:
        expected = seq + 1
        try:
            rec = _parse(raw)
            if not raw.endswith(b"\n"):
                raise ValueError("last line is incomplete (torn write or truncated)")
        except ValueError as e:
            if pending_bad is not None:
                return bad(*pending_bad[:2], seq + 1, pending_bad[2])
            pending_bad = (f, ln, str(e))
            continue
        if rec.type == "chain_repair" and rec.prev == GENESIS and rec.hash_ok and rec.seq > seq:
            what = f"{f.name}:{ln}: seq {rec.seq}: chain repaired (new segment after seq {seq})"
            if pending_bad is not None:
                what += f"; damaged line {pending_bad[0].name}:{pending_bad[1]} before it"
                pending_bad = None
            notes.append(what)
        else:
            if pending_bad is not None:
                return bad(pending_bad[0], pending_bad[1], expected, pending_bad[2])
            if not rec.hash_ok:
                return bad(f, ln, expected, "record does not match its hash (edited)")
            if rec.seq != expected:
                return bad(f, ln, expected, _seq_problem(expected, rec.seq, it))
            if rec.prev != prev:
                return bad(f, ln, expected,
                           f"prev hash does not match record {seq} (edited or reordered)")
        if rec.unwritten:
            lost += rec.unwritten
            notes.append(f"{f.name}:{ln}: seq {rec.seq}: {rec.unwritten} records before it could "
                         "NOT be written (counted by the writer: disk full or I/O error)")
        seq, prev, last_prev = rec.seq, rec.hash, rec.prev
        good += 1
        last = (f, ln)
    if pending_bad is not None:
        return bad(pending_bad[0], pending_bad[1], seq + 1, pending_bad[2])
    result = _check_head(hp, seq, prev, last_prev, good, last, notes)
    result.unwritten += lost
    result.last_seq = seq
    return result


def _seq_problem(expected: int, got: int, rest: Iterator[tuple[Path, int, bytes]]) -> str:
    if got < expected:
        return f"found seq {got} again after seq {expected - 1} (duplicated or reordered)"
    # Tell a deletion from a reorder: does the missing record turn up later?
    for _, _, raw in rest:
        try:
            if _parse(raw).seq == expected:
                return f"found seq {got} where seq {expected} belongs (records reordered)"
        except ValueError:
            continue
    missing = f"seq {expected}" if got == expected + 1 else f"seqs {expected}..{got - 1}"
    return f"found seq {got} after seq {expected - 1}: {missing} missing (deleted)"


def _check_head(hp: Path, seq: int, last_hash: str, last_prev: str, good: int,
                last: tuple[Path, int], notes: list[str]) -> VerifyResult:
    f, ln = last
    try:
        head = _read_head(hp)
    except ValueError as e:
        return VerifyResult(False, good, None, f"{hp.name}: {e} (edited?)", str(hp), None, notes)
    if head is None:
        if seq <= 1:  # a crash before the first head write
            return VerifyResult(True, good, notes=notes)
        return VerifyResult(False, good, None,
                            f"{hp.name}: missing, but the log has {seq} records (deleted?)",
                            str(hp), None, notes)
    h_seq, h_hash, h_lost, exact = head
    if not exact and ((h_seq, h_hash) == (seq, last_hash) or h_seq == seq - 1):
        # The values check out, the bytes do not: edited where nothing is read (the padding).
        return VerifyResult(False, good, None, f"{hp.name}: not byte for byte as the writer "
                            "writes it (edited)", str(hp), None, notes)
    if (h_seq, h_hash) == (seq, last_hash):
        if h_lost:
            notes.append(f"{hp.name}: {h_lost} records after seq {seq} could NOT be written "
                         "(counted by the writer; no record after them was written yet)")
        return VerifyResult(True, good, notes=notes, unwritten=h_lost, unwritten_at_end=h_lost)
    if h_seq > seq:
        missing = f"seq {seq + 1}" if h_seq == seq + 1 else f"seqs {seq + 1}..{h_seq}"
        return VerifyResult(False, good, seq + 1,
                            f"{f.name}:{ln}: seq {seq + 1}: {hp.name} says the log ends at seq "
                            f"{h_seq} but it ends at seq {seq}: {missing} missing (truncated)",
                            str(f), ln, notes)
    if h_seq == seq - 1 and h_hash == last_prev:
        notes.append(f"{hp.name} is one record behind (crash between log and head write?)")
        return VerifyResult(True, good, notes=notes)
    return VerifyResult(False, good, seq if h_seq == seq else h_seq + 1,
                        f"{hp.name}: says seq {h_seq} hash {h_hash[:12]}…, but the last record is "
                        f"seq {seq} hash {last_hash[:12]}… (head file or last records edited)",
                        str(hp), None, notes)
