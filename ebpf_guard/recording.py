"""Raw event recordings (`--record FILE`) and reading them back for `replay`.

A recording is JSON lines: one header line `{"type": "recording", ...}` describing the session
(policy, workspace, mode), then one `Event.to_dict()` per line, in the order the engine saw them.

A recording can be torn (the disk filled, the guard was killed mid-write): reading stops at the
first line that is not a whole event, and says where (`RecordingHeader.torn`); what precedes it
is replayed. A file whose first line is not a recording header is refused outright.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import IO

import orjson

from ebpf_guard.events import Event
from ebpf_guard.files import read_regular
from ebpf_guard.redact import Redactor

FORMAT = 1


@dataclass
class RecordingHeader:
    """The session a recording was made in; `homes` and `torn` are filled in while reading."""

    policy: str
    policy_sha256: str
    workspace: str
    mode: str
    homes: dict[int, str]
    started: float
    torn: str = ""  # where and why reading stopped before the end; "" for a whole recording


class Recorder:
    """Writes the event stream as the engine saw it, with secrets masked by the same redactor
    as the verdict log: no raw secret reaches disk through a recording either."""

    def __init__(self, path: Path, *, policy: Path, workspace: str, mode: str,
                 redactor: Redactor, warn: Callable[[str], None] | None = None) -> None:
        self._redact = redactor.redact_obj
        self._warn = warn or (lambda text: None)
        self._path = path
        self._events = 0
        self._failed = False
        self._file: IO[bytes] = open(path, "wb")
        header = {
            "type": "recording",
            "format": FORMAT,
            "policy": str(policy),
            "policy_sha256": hashlib.sha256(policy.read_bytes()).hexdigest(),
            "workspace": workspace,
            "mode": mode,
            "homes": {},
            "started": time.time(),
        }
        self._file.write(orjson.dumps(header) + b"\n")
        self._homes_seen: set[int] = set()

    def write(self, event: Event, home: str | None = None) -> None:
        line = self._redact(event.to_dict())
        # The {home} of each uid is recorded on its first event, so replay needs no passwd db.
        if event.uid not in self._homes_seen:
            self._homes_seen.add(event.uid)
            line["home"] = home
        if self._put(orjson.dumps(line) + b"\n"):
            self._events += 1

    def write_hosts(self, mapping: dict[str, list[str]]) -> None:
        """Host-name resolutions, in stream order, so replay sees the addresses the engine saw."""
        self._put(orjson.dumps({"type": "hosts", "mapping": mapping}) + b"\n")

    def _put(self, line: bytes) -> bool:
        if self._failed:
            return False
        try:
            self._file.write(line)
        except OSError as e:
            self._stop(e)
            return False
        return True

    def _stop(self, e: OSError) -> None:
        # A recording is a copy for replay, not the evidence: a failing one stops (replay then
        # stops at its tear and says so) and the guard goes on watching.
        self._failed = True
        try:
            self._file.close()
        except OSError:
            pass  # closed all the same; the buffered tail is what is lost
        self._warn(f"cannot write the recording {self._path} ({e.strerror or e}): recording "
                   f"stopped after at most {self._events} events")

    def close(self) -> None:
        if self._failed:
            return
        try:
            self._file.close()
        except OSError as e:
            self._stop(e)


class RecordingError(Exception):
    """Not a recording (or not readable as one); one line for the user."""


@dataclass
class HostUpdate:
    """Host-name resolutions that took effect at this point of the stream."""

    mapping: dict[str, list[str]]


def read_recording(path: Path) -> tuple[RecordingHeader, Iterator[Event | HostUpdate]]:
    """The header and a lazy iterator over the recorded stream (homes filled into the header).

    Raises RecordingError when line 1 is not a recording header, OSError when the file cannot
    be read. The iterator stops at the first line that is not a whole event or host update and
    sets `header.torn` to say where; it raises nothing for bad lines."""
    with read_regular(path) as f:
        first = f.readline()
    try:
        head = orjson.loads(first)
        if not isinstance(head, dict) or head.get("type") != "recording":
            raise ValueError("no recording header")
        header = RecordingHeader(
            policy=str(head["policy"]), policy_sha256=str(head["policy_sha256"]),
            workspace=str(head["workspace"]), mode=str(head["mode"]), homes={},
            started=float(head["started"]),
        )
    except (ValueError, KeyError, TypeError) as e:  # orjson.JSONDecodeError is a ValueError
        raise RecordingError(f"{path}: not an ebpf-guard recording (line 1: {_why(e)})") from None

    def events() -> Iterator[Event | HostUpdate]:
        events_read = 0
        with read_regular(path) as f:
            f.readline()
            for lineno, raw in enumerate(f, start=2):
                try:
                    item = _item(raw)
                except (ValueError, KeyError, TypeError, AttributeError) as e:
                    rest = sum(1 for _ in f)
                    header.torn = (f"{path}: recording torn at line {lineno} ({_why(e)}): "
                                   f"replayed the {events_read} events before it"
                                   + (f"; {rest} lines after it not replayed" if rest else ""))
                    return
                if isinstance(item, HostUpdate):
                    yield item
                    continue
                ev, home = item
                events_read += 1
                if home is not None:
                    header.homes[ev.uid] = home
                yield ev

    return header, events()


# Plain field types of Event, checked so that a garbled-but-valid-JSON line is a tear, not a
# crash deep in the engine.
_PLAIN = {"int": (int,), "str": (str,), "bool": (bool,), "int | None": (int, type(None))}


def _item(raw: bytes) -> HostUpdate | tuple[Event, str | None]:
    """One recorded line: a host update, or an event and the home recorded with it."""
    d = orjson.loads(raw)
    if not isinstance(d, dict):
        raise ValueError("not a JSON object")
    if d.get("type") == "hosts":
        mapping = d["mapping"]
        if not (isinstance(mapping, dict) and all(
                isinstance(v, list) and all(isinstance(a, str) for a in v)
                for v in mapping.values())):
            raise ValueError("malformed host update")
        return HostUpdate(mapping)
    home = d.pop("home", None)
    if home is not None and not isinstance(home, str):
        raise ValueError("home is not a string")
    ev = Event.from_dict(d)
    for f in fields(Event):
        want = _PLAIN.get(str(f.type))
        if want is not None and not isinstance(getattr(ev, f.name), want):
            raise ValueError(f"{f.name} is not {f.type}")
    if not all(isinstance(x, str) for x in (*ev.argv, *ev.notes, *ev.access)):
        raise ValueError("argv, notes and access must be strings")
    return ev, home


def _why(e: Exception) -> str:
    return str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
