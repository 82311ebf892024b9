"""Where events and verdicts are shown: aligned lines on a TTY (like execsnoop), or JSON lines."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import IO

import orjson

from ebpf_guard.events import Event, Kind
from ebpf_guard.redact import Redactor
from ebpf_guard.verdicts import Decision, Verdict

HEADER = f"{'TIME(s)':<9} {'VERDICT':<7} {'PID':>7} {'PPID':>7} {'UID':>6} {'COMM':<16} {'KIND':<7} DETAIL"


def _target(event: Event) -> str:
    """The path asked for, and what the kernel reached when that differs (a symlink...)."""
    asked = event.path or event.raw_path
    real = event.real_path
    return f"{asked} -> {real}" if real and real != asked else asked


def describe(event: Event) -> str:
    """One human line of what the event did."""
    if event.kind is Kind.EXEC:
        args = " ".join(event.argv) + (" …" if event.argv_truncated else "")
        return f"{_target(event)}  [{args}]"
    if event.kind is Kind.OPEN or event.kind is Kind.TRUNCATE:
        access = ",".join(sorted(event.access)) or "-"
        return f"{_target(event)} ({access})"
    if event.kind is Kind.UNLINK:
        return f"{_target(event)}{' (dir)' if event.is_dir else ''}"
    if event.kind in (Kind.RENAME, Kind.LINK, Kind.SYMLINK):
        dest = event.dest_real_path or event.dest_path or event.dest_raw_path
        return f"{_target(event) if event.kind is not Kind.SYMLINK else event.raw_path} => {dest}"
    if event.kind is Kind.MMAP_EXEC:
        return event.real_path or event.path
    if event.kind is Kind.PTRACE:
        return f"pid {event.target_pid} (request {event.flags:#x})"
    if event.kind is Kind.IO_URING:
        return f"{event.flags} entries"
    if event.kind is Kind.CONNECT:
        if event.family == "unix":
            return f"unix:{event.addr}"
        host = f"[{event.addr}]" if event.family == "ipv6" else event.addr
        via = f" (via {event.via})" if event.via and event.via != "connect" else ""
        return f"{host}:{event.port}{via}"
    if event.kind is Kind.FORK:
        return f"child {event.child_pid}"
    if event.kind is Kind.CHDIR:
        return event.path or event.raw_path
    return ""


def event_json(decision: Decision, redact: Callable[[dict], dict]) -> bytes:
    return orjson.dumps(redact({"verdict": decision.verdict.value, "rule": decision.rule,
                                "reason": decision.reason, "event": decision.event.to_dict()}))


class Printer:
    """Prints every decided event: human lines to a TTY, JSON lines with json=True, and/or a file;
    and status lines on stderr, where a line repeated back to back is printed once, then counted
    ("(last message repeated N more times)" when another line comes, at close, and at 10, 100,
    1000… as a sign of life): a full disk fails every record, not one."""

    def __init__(self, *, redactor: Redactor, json: bool = False, stream: IO[str] | None = None,
                 file: IO[bytes] | None = None, quiet: bool = False) -> None:
        # Everything printed is redacted like the verdict log: stdout is often a file too.
        self.redact = redactor.redact_obj
        self.json = json
        self.stream = stream or sys.stdout
        self.file = file
        self.quiet = quiet
        self._t0: int | None = None
        self._header_done = False
        self._lock = threading.Lock()  # the incident writer thread reports through message()
        self._last = ""
        self._repeats = 0

    def decision(self, decision: Decision) -> None:
        if self.file is not None:
            try:
                self.file.write(event_json(decision, self.redact) + b"\n")
            except OSError as e:
                self._drop_file(e)
        if self.quiet and decision.verdict is Verdict.SAFE:
            return
        if self.json:
            self.stream.write(event_json(decision, self.redact).decode() + "\n")
            self.stream.flush()
            return
        ev = decision.event
        if self._t0 is None:
            self._t0 = ev.ts_ns
        if not self._header_done:
            self.stream.write(HEADER + "\n")
            self._header_done = True
        verdict = decision.verdict.value if decision.verdict is not Verdict.SAFE else ""
        line = (
            f"{(ev.ts_ns - self._t0) / 1e9:<9.3f} {verdict:<7} {ev.tgid:>7} {ev.ppid:>7} {ev.uid:>6} "
            f"{ev.comm[:16]:<16} {ev.kind.value:<7} {self.redact(describe(ev))}"
        )
        if decision.verdict is not Verdict.SAFE:
            line += f"  <- {decision.rule}: {self.redact(decision.reason)}"
        self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """A status line, on stderr: stdout carries only the event stream."""
        with self._lock:
            if text == self._last:
                self._repeats += 1
                if self._repeats >= 10 and str(self._repeats).strip("0") == "1":
                    self._emit(f"(last message repeated {self._repeats} more times so far)")
                return
            self._flush_repeats()
            self._last = text
            self._emit(text)

    def close(self) -> None:
        """Says how often the last status line repeated; closes the --output file."""
        with self._lock:
            self._flush_repeats()
        file, self.file = self.file, None
        if file is not None:
            self._close_file(file, None)

    def _flush_repeats(self) -> None:
        if self._repeats:
            times = "time" if self._repeats == 1 else "times"
            self._emit(f"(last message repeated {self._repeats} more {times})")
        self._last, self._repeats = "", 0

    def _drop_file(self, e: OSError) -> None:
        # The --output file is a convenience copy of the stream: stop writing it, say so once,
        # and go on watching (the verdict log is the evidence, and fails closed on its own).
        file, self.file = self.file, None
        if file is not None:
            self._close_file(file, e)

    def _close_file(self, file: IO[bytes], error: OSError | None) -> None:
        try:
            file.close()  # also after an error: else the garbage collector retries the flush
        except OSError as e:
            error = error or e
        if error is not None:
            self.message(f"cannot write --output {getattr(file, 'name', '?')} "
                         f"({error.strerror or error}): no more events are written to it")

    @staticmethod
    def _emit(text: str) -> None:
        sys.stderr.write(f"ebpf-guard: {text}\n")
        sys.stderr.flush()
