"""Compile bpf/sensor.c with bcc, load and attach its programs, or say in one line why not."""

from __future__ import annotations

import ctypes
import platform
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ebpf_guard import host
from ebpf_guard.events import RawConnectEvent, RawEvent, RawExecEvent, RawPathEvent
from ebpf_guard.paths import BPF_DIR

SOURCE = BPF_DIR / "sensor.c"

_TP_PREFIX = "tracepoint__"
_RAW_TP_PREFIX = "raw_tracepoint__"  # RAW_TRACEPOINT_PROBE: attached to "raw:<event>"
_FAILED_PROGRAM = re.compile(r"Failed to load BPF program b'([^']+)': (.*)")
_EPERM_MESSAGE = "Need super-user privileges to run"  # what bcc says for any EPERM, even to root


class SensorError(Exception):
    """The sensor cannot start or run; one line for the user."""


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
    """bcc's name for a TRACEPOINT_PROBE function -> "category:event" (as bcc derives it); for
    a RAW_TRACEPOINT_PROBE -> "raw:event"."""
    if program.startswith(_RAW_TP_PREFIX):
        return "raw:" + program[len(_RAW_TP_PREFIX):]
    return program[len(_TP_PREFIX):].replace("__", ":")


def object_programs(b: Any) -> list[str]:
    """The name of every program (BPF function) in a compiled bcc object."""
    from bcc import lib  # only ever called with bcc loaded

    return [lib.bpf_function_name(b.module, i).decode() for i in range(lib.bpf_num_functions(b.module))]


def programs_of(b: Any) -> dict[str, str]:
    """Every program of a bcc object -> the tracepoint it is attached to ("" if none)."""
    attached = {tp.decode() for tp in b.tracepoint_fds}
    attached |= {"raw:" + tp.decode() for tp in getattr(b, "raw_tracepoint_fds", {})}
    return {p: _attach_point(p) if p.startswith((_TP_PREFIX, _RAW_TP_PREFIX)) and _attach_point(p) in attached
            else "" for p in object_programs(b)}


def load_programs(source: Path = SOURCE, extra_cflags: Sequence[str] = ()) -> Any:
    """Compile `source` and load and attach every program in it (bcc does both for each
    TRACEPOINT_PROBE), or raise SensorError naming the program, the verifier's own reason,
    the kernel, and the file holding bcc's full output. Returns the bcc object.
    extra_cflags: the BTF layouts (btf.Layouts.cflags), when the host has them."""
    try:
        host.require_root()
        host.ensure_tracefs()
        host.import_bcc()
    except host.HostError as e:
        raise SensorError(str(e)) from e
    source = Path(source)
    loaded = host.bcc_load(keep_log=True, src_file=str(source).encode(),
                           cflags=[*_cflags(source.resolve().parent), *extra_cflags])
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
            point = _attach_point(bad) if bad.startswith((_TP_PREFIX, _RAW_TP_PREFIX)) else bad
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
