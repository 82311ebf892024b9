"""Incident snapshots: what the agent's processes looked like at the moment we stopped them.

Take the snapshot while the cgroup is frozen (the caller freezes first): the tree then cannot
fork, exit, close files or move sockets under us. A frozen process's /proc stays readable —
/proc/PID/{stat,cmdline,cwd,fd,...} and /proc/net/* are served by the kernel without running
the process — so freezing costs the snapshot nothing.

Every field is collected on its own: a process that vanishes or a field we may not read
records an error for that field instead of losing the whole process (or the incident).
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson
import psutil


def _addr(a: Any) -> str:
    """psutil address → text: "127.0.0.1:8080", "[::1]:22", a unix path, or ""."""
    if not a:
        return ""
    if isinstance(a, str):
        return a
    ip, port = a[0], a[1]
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _enum_name(v: Any) -> str:
    return v.name if hasattr(v, "name") else str(v)


def _open_files(p: psutil.Process) -> list[dict]:
    return [{"path": f.path, "fd": f.fd, "mode": getattr(f, "mode", "")} for f in p.open_files()]


def _sockets(p: psutil.Process) -> list[dict]:
    # psutil >= 6 renamed connections() to net_connections().
    conns = p.net_connections(kind="all") if hasattr(p, "net_connections") else p.connections("all")
    return [
        {
            "fd": c.fd,
            "family": _enum_name(c.family),
            "type": _enum_name(c.type),
            "laddr": _addr(c.laddr),
            "raddr": _addr(c.raddr),
            "status": c.status,
        }
        for c in conns
    ]


_FIELDS: dict[str, Callable[[psutil.Process], Any]] = {
    "ppid": lambda p: p.ppid(),
    "exe": lambda p: p.exe(),
    "cmdline": lambda p: p.cmdline(),
    "cwd": lambda p: p.cwd(),
    "uid": lambda p: p.uids().real,
    "username": lambda p: p.username(),
    "start_time": lambda p: p.create_time(),  # epoch seconds
    "status": lambda p: p.status(),
    "open_files": _open_files,
    "sockets": _sockets,
}


def _error_text(e: Exception) -> str:
    if isinstance(e, psutil.NoSuchProcess):
        return "process exited"
    if isinstance(e, psutil.AccessDenied):
        return "access denied"
    return f"{type(e).__name__}: {e}"


def snapshot_process(pid: int) -> dict:
    """One process as a dict; unreadable fields are None with the reason under "errors"."""
    out: dict[str, Any] = {"pid": pid}
    errors: dict[str, str] = {}
    try:
        p = psutil.Process(pid)
    except Exception as e:  # noqa: BLE001 - a snapshot must never take the agent down
        return {**out, **dict.fromkeys(_FIELDS), "errors": {"process": _error_text(e)}}
    with p.oneshot():
        for name, get in _FIELDS.items():
            try:
                out[name] = get(p)
            except Exception as e:  # noqa: BLE001 - record per field, keep going
                out[name] = None
                errors[name] = _error_text(e)
    out["errors"] = errors
    return out


def snapshot_tree(pids: Iterable[int]) -> list[dict]:
    """Snapshot every pid (typically cgroups.pids(watched) while frozen), sorted by pid."""
    return [snapshot_process(pid) for pid in sorted(set(pids))]


# --- writing -------------------------------------------------------------------------------


def _json_default(o: Any) -> Any:
    if isinstance(o, (set, frozenset)):
        return sorted(o, key=str)
    if isinstance(o, (Path, socket.AddressFamily, socket.SocketKind)):
        return str(o)
    if hasattr(o, "to_dict"):
        return o.to_dict()
    return repr(o)


def _slug(value: Any, limit: int = 60) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(value)).strip("_.")[:limit]


def write_incident(
    directory: Path,
    *,
    record: dict,
    recent_events: list[dict],
    tree: list[dict],
    name: str | None = None,
) -> Path:
    """Write one incident as pretty JSON, atomically and readable by root only (0600).

    Named `name` when given (e.g. the name already announced in the log), else
    incident-<UTC time>-<seq>-<rule>.json from record["seq"] / record["rule"] when present.
    Written to a temporary file, then hard-linked into place: readers never see a partial
    file and an existing incident is never overwritten (a "-N" suffix is added instead).
    """
    now = datetime.now(timezone.utc)
    doc = {
        "written_at": now.isoformat(),
        "record": record,
        "recent_events": recent_events,
        "process_tree": tree,
    }
    data = orjson.dumps(
        doc, default=_json_default, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS
    )
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    parts = ["incident", now.strftime("%Y%m%dT%H%M%S.%fZ")]
    parts += [_slug(record[k]) for k in ("seq", "rule") if record.get(k) not in (None, "")]
    stem = "-".join(p for p in parts if p)
    if name:
        stem = _slug(Path(name).name.removesuffix(".json"), 200) or stem

    tmp = directory / f".{stem}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data + b"\n")
            f.flush()
            os.fsync(f.fileno())
        for n in range(1000):
            final = directory / (f"{stem}.json" if n == 0 else f"{stem}-{n}.json")
            try:
                os.link(tmp, final)
                break
            except FileExistsError:
                continue
            except OSError:
                if final.exists():
                    continue
                os.rename(tmp, final)  # filesystems without hard links: plain atomic rename
                break
        else:
            raise FileExistsError(f"cannot find a free incident name for {stem} in {directory}")
    finally:
        tmp.unlink(missing_ok=True)
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)  # make the new name durable, not just the data
    finally:
        os.close(dfd)
    return final
