"""Raw event recordings (`--record FILE`) and reading them back for `replay`.

A recording is JSON lines: one header line `{"type": "recording", ...}` describing the session
(policy, workspace, mode), then one `Event.to_dict()` per line, in the order the engine saw them.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import orjson

from ebpf_guard.events import Event
from ebpf_guard.redact import Redactor

FORMAT = 1


@dataclass
class RecordingHeader:
    policy: str
    policy_sha256: str
    workspace: str
    mode: str
    homes: dict[int, str]
    started: float


class Recorder:
    """Writes the event stream as the engine saw it, with secrets masked by the same redactor
    as the verdict log: no raw secret reaches disk through a recording either."""

    def __init__(self, path: Path, *, policy: Path, workspace: str, mode: str,
                 redactor: Redactor) -> None:
        self._redact = redactor.redact_obj
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
        self._file.write(orjson.dumps(line) + b"\n")

    def write_hosts(self, mapping: dict[str, list[str]]) -> None:
        """Host-name resolutions, in stream order, so replay sees the addresses the engine saw."""
        self._file.write(orjson.dumps({"type": "hosts", "mapping": mapping}) + b"\n")

    def close(self) -> None:
        self._file.close()


class RecordingError(Exception):
    pass


@dataclass
class HostUpdate:
    mapping: dict[str, list[str]]


def read_recording(path: Path) -> tuple[RecordingHeader, Iterator[Event | HostUpdate]]:
    """The header and a lazy iterator over the recorded stream (homes filled into the header)."""
    f = open(path, "rb")
    first = f.readline()
    try:
        head = orjson.loads(first)
    except orjson.JSONDecodeError as e:
        raise RecordingError(f"{path}: not an ebpf-guard recording (line 1: {e})") from e
    if head.get("type") != "recording":
        raise RecordingError(f"{path}: not an ebpf-guard recording (line 1 has no recording header)")
    header = RecordingHeader(
        policy=head["policy"], policy_sha256=head["policy_sha256"], workspace=head["workspace"],
        mode=head["mode"], homes={}, started=head["started"],
    )

    def events() -> Iterator[Event | HostUpdate]:
        with f:
            for lineno, raw in enumerate(f, start=2):
                try:
                    d = orjson.loads(raw)
                    if d.get("type") == "hosts":
                        yield HostUpdate(d["mapping"])
                        continue
                    home = d.pop("home", None)
                    ev = Event.from_dict(d)
                except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                    raise RecordingError(f"{path}:{lineno}: bad event: {e}") from e
                if home is not None:
                    header.homes[ev.uid] = home
                yield ev

    return header, events()
