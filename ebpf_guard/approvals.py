"""Human approvals for ASK verdicts: a root-only unix socket desk in the guard, and its client.

The guard freezes the agent's cgroup on ASK, then `ApprovalDesk.add()`s the decision. A human
answers from another terminal (`ebpf-guard approvals | approve ID | deny ID`, which use the
client functions at the bottom of this module) or inline on the guard's terminal (y/n/a/b, as in
AgentGuard's approval TUI); otherwise the policy timeout applies its default. `poll()` is called
every loop iteration (~2 ms), so it does one zero-timeout select() and nothing else when idle.

Wire protocol: one JSON request line per connection, one JSON reply line, then close.
Only root may talk to the desk: the socket directory is 0700 root and every peer's SO_PEERCRED
uid is checked anyway (defence in depth, and a clear error instead of a bare EACCES).
"""

from __future__ import annotations

import json
import math
import os
import pwd
import re
import secrets
import select
import socket
import stat
import struct
import termios
import time
import tty as ttymode
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from ebpf_guard.output import describe
from ebpf_guard.verdicts import Decision

DEFAULT_SOCKET_DIR = Path("/run/ebpf-guard")
ID_ALPHABET = "23456789abcdefghjkmnpqrstuvwxyz"  # no 0/o, 1/l/i: ids are read and retyped
ID_LEN = 6
MAX_REQUEST = 64 * 1024
MAX_CONNS = 32  # root-only clients, but never let a stuck script exhaust fds
CONN_DEADLINE_S = 5.0  # a connected client that sends nothing in this long is dropped
CLIENT_TIMEOUT_S = 5.0
RESOLVED_MEMORY = 200  # recently resolved ids, so a late `approve` says "already denied"
TTY_KEYS = {"y": (True, False), "n": (False, False), "a": (True, True), "b": (False, True)}
_SESSION_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_SUN_PATH_MAX = 107


class ApprovalError(Exception):
    """A one-line, user-facing error from the approval desk or its client."""


# --- records -------------------------------------------------------------------------------------


@dataclass(slots=True)
class Pending:
    id: str
    session: str
    decision: Decision
    what: str  # "exec /usr/bin/git [git push]": kind + output.describe()
    since: float  # wall clock (time.time()) when asked
    added: float  # desk clock (monotonic) when asked
    timeout_s: float
    default_allow: bool

    @property
    def rule(self) -> str:
        return self.decision.rule

    @property
    def reason(self) -> str:
        return self.decision.reason

    @property
    def pid(self) -> int:
        return self.decision.event.tgid

    @property
    def uid(self) -> int:
        return self.decision.event.uid

    @property
    def comm(self) -> str:
        return self.decision.event.comm

    @property
    def deadline(self) -> float:
        return self.added + self.timeout_s

    def to_dict(self, now: float) -> dict:
        """The `list` reply entry; ages are computed by the desk so clients need no clock."""
        return {
            "id": self.id,
            "session": self.session,
            "rule": self.rule,
            "reason": self.reason,
            "verdict": self.decision.verdict.value,
            "kind": self.decision.event.kind.value,
            "what": self.what,
            "pid": self.pid,
            "cgroup_id": self.decision.event.cgroup_id,
            "uid": self.uid,
            "user": user_name(self.uid),
            "comm": self.comm,
            "since": self.since,
            "age_s": round(now - self.added, 3),
            # JSON has no Infinity: null means "no timeout"
            "timeout_s": None if math.isinf(self.timeout_s) else self.timeout_s,
            "expires_in_s": None if math.isinf(self.timeout_s) else round(self.deadline - now, 3),
            "default": "allow" if self.default_allow else "deny",
        }


@dataclass(slots=True)
class Resolution:
    pending: Pending
    allow: bool
    remember: bool  # "always" for the rest of this run (engine.remember)
    by_uid: int  # -1 for a timeout
    by_user: str  # user name of by_uid ("" for a timeout)
    via: str  # "socket" | "tty" | "timeout"
    waited_s: float
    login_user: str = ""  # the audit login user behind it (/proc/PID/loginuid: who sudo'd)
    by_pid: int = 0  # the client process (socket), or the guard itself (tty)
    at: float = field(default_factory=time.time)  # wall clock of the answer

    def to_record(self) -> dict:
        p = self.pending
        return {
            "type": "approval",
            "id": p.id,
            "session": p.session,
            "decision": "allow" if self.allow else "deny",
            "remember": self.remember,
            "via": self.via,
            "by_uid": self.by_uid,
            "by_user": self.by_user,
            "login_user": self.login_user,
            "by_pid": self.by_pid,
            "asked_at": _iso(p.since),
            "decided_at": _iso(self.at),
            "waited_s": round(self.waited_s, 3),
            "timeout_s": None if math.isinf(p.timeout_s) else p.timeout_s,
            "default": "allow" if p.default_allow else "deny",
            "rule": p.rule,
            "reason": p.reason,
            "pid": p.pid,
            "uid": p.uid,
            "comm": p.comm,
            "what": p.what,
        }


@dataclass(slots=True)
class Refusal:
    """A non-root peer that reached the socket (only possible if someone loosened its modes)."""

    peer_uid: int
    peer_pid: int
    peer_gid: int
    peer_comm: str
    at: float = field(default_factory=time.time)

    def to_record(self) -> dict:
        return {"type": "approval_refused", "peer_uid": self.peer_uid, "peer_pid": self.peer_pid,
                "peer_gid": self.peer_gid, "peer_comm": self.peer_comm, "at": _iso(self.at)}


@dataclass(slots=True)
class _Conn:
    sock: socket.socket
    pid: int
    uid: int
    deadline: float
    buf: bytes = b""


# --- server --------------------------------------------------------------------------------------


class ApprovalDesk:
    def __init__(
        self,
        socket_dir: Path = DEFAULT_SOCKET_DIR,
        *,
        session: str,
        tty: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not _SESSION_RE.match(session):
            raise ApprovalError(f"bad session name {session!r} (letters, digits, . _ - only)")
        self.session = session
        self.clock = clock
        self.socket_dir = Path(socket_dir)
        self.path = self.socket_dir / f"{session}.sock"
        if len(os.fsencode(self.path)) > _SUN_PATH_MAX:
            raise ApprovalError(f"socket path too long for a unix socket: {self.path}")
        self._pending: OrderedDict[str, Pending] = OrderedDict()  # insertion order = oldest first
        self._resolved: OrderedDict[str, str] = OrderedDict()  # id -> "allowed via tty"
        self._used_ids: set[str] = set()
        self._conns: list[_Conn] = []
        self._refusals: list[Refusal] = []
        self._tty = tty
        self._tty_fd = tty.fileno() if tty is not None else -1
        self._tty_is_term = tty is not None and os.isatty(self._tty_fd)
        self._tty_saved: list | None = None  # termios attrs while we hold the terminal in cbreak
        self._tty_buf = b""
        self._tty_eof = False
        self._prompted: str | None = None  # id the inline prompt is currently asking about
        self._keys = False  # whether that prompt is answered by keys (we are in the foreground)
        self._prepare_dir()
        self._listener = self._bind()
        self._ino = os.stat(self.path).st_ino

    # public API

    def add(self, decision: Decision, *, timeout_s: float, default_allow: bool) -> Pending:
        if not timeout_s > 0:
            raise ValueError("timeout_s must be > 0 (use math.inf for no timeout)")
        ev = decision.event
        pending = Pending(
            id=self._new_id(),
            session=self.session,
            decision=decision,
            what=f"{ev.kind.value} {describe(ev)}".strip(),
            since=time.time(),
            added=self.clock(),
            timeout_s=timeout_s,
            default_allow=default_allow,
        )
        self._pending[pending.id] = pending
        if self._tty is not None:
            if self._prompted is None:
                self._update_prompt()
            else:
                self._say(f"ebpf-guard: also waiting for approval [{pending.id}] {pending.rule}: "
                          f"{pending.comm} (pid {pending.pid}) {pending.what} - asked after the "
                          f"current one.\n")
        return pending

    def pending(self) -> list[Pending]:
        return list(self._pending.values())

    def poll(self) -> list[Resolution]:
        """Serve clients, read inline keys, expire timeouts. Never blocks."""
        out: list[Resolution] = []
        fds: list = [self._listener, *(c.sock for c in self._conns)]
        if self._tty_readable():
            fds.append(self._tty_fd)
        ready, _, _ = select.select(fds, [], [], 0)
        if ready:
            if self._listener in ready:
                self._accept()
            for conn in [c for c in self._conns if c.sock in ready]:
                self._serve(conn, out)
            if self._tty_fd in ready:
                self._read_tty(out)
        now = self.clock()
        for p in [p for p in self._pending.values() if now >= p.deadline]:
            out.append(self._resolve(p, allow=p.default_allow, remember=False, via="timeout",
                                     by_uid=-1, by_user="", login_user="", by_pid=0))
        for conn in [c for c in self._conns if now >= c.deadline]:
            self._drop(conn)
        if out and self._tty is not None:
            self._update_prompt()
        return out

    def take_refusals(self) -> list[Refusal]:
        """Non-root peers refused since the last call; the guard logs `r.to_record()`."""
        refused, self._refusals = self._refusals, []
        return refused

    def close(self) -> None:
        for conn in list(self._conns):
            self._drop(conn)
        self._listener.close()
        try:  # only unlink our own socket, not a successor's with the same session name
            if os.stat(self.path).st_ino == self._ino:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        self._release_tty()

    def __enter__(self) -> ApprovalDesk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # socket side

    def _prepare_dir(self) -> None:
        d = self.socket_dir
        try:
            d.mkdir(mode=0o700, parents=True)
        except FileExistsError:
            pass
        st = os.lstat(d)
        if not stat.S_ISDIR(st.st_mode):
            raise ApprovalError(f"{d} exists and is not a directory")
        if st.st_uid != os.geteuid():
            raise ApprovalError(f"{d} is owned by uid {st.st_uid}, not us: refusing to use it")
        os.chmod(d, 0o700)  # mkdir's mode is filtered by umask; an old dir may be looser

    def _bind(self) -> socket.socket:
        if self.path.exists() or self.path.is_symlink():
            if _is_live(self.path):
                raise ApprovalError(f"another ebpf-guard session {self.session!r} is running "
                                    f"({self.path})")
            self.path.unlink()  # stale: a guard that died without close()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.bind(str(self.path))
            os.chmod(self.path, 0o600)  # the 0700 dir already shields the moment before this
            s.listen(16)
            s.setblocking(False)
        except OSError:
            s.close()
            raise
        return s

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # e.g. EMFILE: try again next poll rather than crash the guard
            sock.setblocking(False)
            pid, uid, gid = struct.unpack("3i", sock.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
            if uid != 0:
                self._refusals.append(Refusal(uid, pid, gid, _proc_comm(pid)))
                _send_quietly(sock, {"ok": False, "code": "permission",
                                     "error": f"permission refused: only root may answer "
                                              f"approvals (you are uid {uid})"})
                sock.close()
                continue
            if len(self._conns) >= MAX_CONNS:
                _send_quietly(sock, {"ok": False, "code": "busy", "error": "too many clients"})
                sock.close()
                continue
            self._conns.append(_Conn(sock, pid, uid, self.clock() + CONN_DEADLINE_S))

    def _serve(self, conn: _Conn, out: list[Resolution]) -> None:
        try:
            chunk = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        if not chunk and not conn.buf:
            self._drop(conn)  # a liveness probe: connected and left without a word
            return
        conn.buf += chunk
        if b"\n" not in conn.buf and chunk and len(conn.buf) <= MAX_REQUEST:
            return  # wait for the rest of the line
        line = conn.buf.split(b"\n", 1)[0]
        try:
            request = json.loads(line) if len(line) <= MAX_REQUEST else None
        except ValueError:
            request = None
        if isinstance(request, dict):
            reply = self._handle(request, conn, out)
        else:
            reply = {"ok": False, "code": "bad_request",
                     "error": "bad request (want one JSON line)"}
        _send_quietly(conn.sock, reply)
        self._drop(conn)

    def _handle(self, req: dict, conn: _Conn, out: list[Resolution]) -> dict:
        cmd = req.get("cmd")
        if cmd == "list":
            now = self.clock()
            return {"ok": True, "session": self.session,
                    "pending": [p.to_dict(now) for p in self._pending.values()]}
        if cmd not in ("approve", "deny"):
            return {"ok": False, "code": "bad_request", "error": f"unknown command {cmd!r}"}
        pid_ = str(req.get("id", "")).strip().lower()
        p = self._pending.get(pid_)
        if p is None:
            if pid_ in self._resolved:
                return {"ok": False, "code": "resolved",
                        "error": f"approval {pid_} was already {self._resolved[pid_]}"}
            return {"ok": False, "code": "unknown_id", "error": f"unknown approval id {pid_!r}"}
        remember = req.get("remember") is True  # not bool(): "false" must not mean always
        allow = cmd == "approve"
        by_user = user_name(conn.uid)
        res = self._resolve(p, allow=allow, remember=remember, via="socket", by_uid=conn.uid,
                            by_user=by_user, login_user=_login_user(conn.pid), by_pid=conn.pid)
        out.append(res)
        return {"ok": True, "session": self.session, "message": _outcome(res)}

    def _drop(self, conn: _Conn) -> None:
        conn.sock.close()
        if conn in self._conns:
            self._conns.remove(conn)

    # resolution and ids

    def _resolve(self, p: Pending, *, allow: bool, remember: bool, via: str, by_uid: int,
                 by_user: str, login_user: str, by_pid: int) -> Resolution:
        del self._pending[p.id]
        res = Resolution(p, allow, remember, by_uid, by_user, via, self.clock() - p.added,
                         login_user=login_user, by_pid=by_pid)
        self._resolved[p.id] = f"{'allowed' if allow else 'denied'} via {via}"
        while len(self._resolved) > RESOLVED_MEMORY:
            self._resolved.popitem(last=False)
        if self._tty is not None:
            self._say(f"ebpf-guard: {_outcome(res)}\n")
        return res

    def _new_id(self) -> str:
        # Unique for the whole run, so a stale id from an old listing can never hit a new ASK.
        while True:
            new = "".join(secrets.choice(ID_ALPHABET) for _ in range(ID_LEN))
            if new not in self._used_ids:
                self._used_ids.add(new)
                return new

    # inline terminal

    def _tty_readable(self) -> bool:
        # Read the terminal only while something is pending: otherwise its keys belong to the agent.
        return self._keys and not self._tty_eof

    def _update_prompt(self) -> None:
        oldest = next(iter(self._pending.values()), None)
        if oldest is None:
            self._prompted, self._keys = None, False
            self._release_tty()
            return
        if oldest.id == self._prompted:
            return
        self._prompted = oldest.id
        # Reading the controlling terminal from a background process group would stop the whole
        # guard with SIGTTIN: then the prompt only points at `ebpf-guard approve`.
        self._keys = self._foreground()
        if self._keys:
            self._hold_tty()
            self._discard_typeahead()  # keys typed before the prompt was shown must not answer it
        self._say(_prompt_text(oldest, len(self._pending) - 1, self._tty_is_term, self._keys))

    def _read_tty(self, out: list[Resolution]) -> None:
        try:
            data = os.read(self._tty_fd, 1024)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._tty_eof = True
            return
        if self._tty_is_term:
            keys = data.decode(errors="replace")
        else:  # a pipe or file: one answer per line
            self._tty_buf += data
            *lines, self._tty_buf = self._tty_buf.split(b"\n")
            keys = "".join(ln.decode(errors="replace").strip()[:1] for ln in lines)
        for key in keys.lower():
            p = self._pending.get(self._prompted or "")
            if p is None:
                return
            if key not in TTY_KEYS:
                if key.strip():
                    self._say("ebpf-guard: press y (allow once), n (deny), a (always allow), "
                              "b (always deny)\n")
                continue
            allow, remember = TTY_KEYS[key]
            uid = os.geteuid()
            out.append(self._resolve(p, allow=allow, remember=remember, via="tty", by_uid=uid,
                                     by_user=user_name(uid), login_user=_login_user(os.getpid()),
                                     by_pid=os.getpid()))
            # One key answers one prompt; the next prompt flushes whatever was typed ahead.
            self._update_prompt()
            return

    def _foreground(self) -> bool:
        if not self._tty_is_term:
            return True
        try:
            return os.tcgetpgrp(self._tty_fd) == os.getpgrp()
        except OSError:
            return True  # not our controlling terminal (e.g. a pty we were handed): no job control

    def _hold_tty(self) -> None:
        # cbreak only while an approval is pending: the agent owns the terminal's mode otherwise.
        if not self._tty_is_term or self._tty_saved is not None:
            return
        try:
            self._tty_saved = termios.tcgetattr(self._tty_fd)
            ttymode.setcbreak(self._tty_fd, termios.TCSANOW)
        except termios.error:
            self._tty_saved = None

    def _release_tty(self) -> None:
        if self._tty_saved is None:
            return
        try:
            termios.tcsetattr(self._tty_fd, termios.TCSANOW, self._tty_saved)
        except termios.error:
            pass
        self._tty_saved = None

    def _discard_typeahead(self) -> None:
        if self._tty_is_term:
            try:
                termios.tcflush(self._tty_fd, termios.TCIFLUSH)
            except termios.error:
                pass
            return
        self._tty_buf = b""

    def _say(self, text: str) -> None:
        assert self._tty is not None
        try:
            self._tty.write(text)
            self._tty.flush()
        except (OSError, ValueError):
            try:  # e.g. sys.stdin was passed: a terminal's fd 0 is normally open read-write
                os.write(self._tty_fd, text.encode())
            except OSError:
                pass


def _prompt_text(p: Pending, others: int, single_keys: bool, keys: bool) -> str:
    if math.isinf(p.timeout_s):
        limit = "There is no timeout."
    else:
        limit = f"Without an answer it is {'allowed' if p.default_allow else 'denied'} " \
                f"in {p.timeout_s:g}s."
    how = "Press" if single_keys else "Type a line starting with"
    choices = (f"{how} y = allow once, n = deny, a = always allow (this run), b = always deny "
               f"(this run). ") if keys else ""
    more = f" ({others} more pending after this one.)" if others else ""
    return (
        f"\nebpf-guard: APPROVAL NEEDED [{p.id}] - the agent is frozen. {p.comm} (pid {p.pid}, "
        f"uid {p.uid}) wants to {p.what}. Rule {p.rule or '(default)'}: {p.reason}. "
        f"{choices}{limit} From another terminal: ebpf-guard approve {p.id} | "
        f"ebpf-guard deny {p.id}.{more}\n"
    )


def _outcome(res: Resolution) -> str:
    verb = "allowed" if res.allow else "denied"
    always = " (always, this run)" if res.remember else ""
    if res.via == "timeout":
        who = "timeout default"
    else:
        who = f"{res.by_user or res.by_uid} via {res.via}"
    return f"[{res.pending.id}] {res.pending.rule}: {verb}{always} by {who} " \
           f"after {res.waited_s:.1f}s"


# --- client --------------------------------------------------------------------------------------


def list_pending(socket_dir: Path = DEFAULT_SOCKET_DIR) -> list[dict]:
    """Pending approvals of every running guard session, oldest first."""
    found: list[dict] = []
    for reply in _ask_all(Path(socket_dir), {"cmd": "list"}):
        if not reply.get("ok"):
            raise ApprovalError(str(reply.get("error", "request failed")))
        found.extend(reply.get("pending", []))
    return sorted(found, key=lambda d: -d.get("age_s", 0))


def approve(id: str, remember: bool = False, socket_dir: Path = DEFAULT_SOCKET_DIR) -> str:
    return _answer("approve", id, remember, Path(socket_dir))


def deny(id: str, remember: bool = False, socket_dir: Path = DEFAULT_SOCKET_DIR) -> str:
    return _answer("deny", id, remember, Path(socket_dir))


def _answer(cmd: str, id: str, remember: bool, socket_dir: Path) -> str:
    # Ids are unique per session and sessions are few: ask each until one owns the id.
    not_found: dict = {}
    for reply in _ask_all(socket_dir, {"cmd": cmd, "id": id, "remember": remember}):
        if reply.get("ok"):
            return str(reply.get("message", "ok"))
        if reply.get("code") not in ("unknown_id", "resolved"):
            raise ApprovalError(str(reply.get("error", "request failed")))
        if not not_found or reply.get("code") == "resolved":
            not_found = reply
    raise ApprovalError(f"{not_found.get('error')} (see: ebpf-guard approvals)")


def _ask_all(socket_dir: Path, req: dict):
    """Send `req` to each live session in turn, yielding the replies (lazily: approve stops
    at the first session that owns the id)."""
    # os.scandir, not Path.glob: glob hides EACCES as "nothing there", which would tell a
    # non-root user that no guard runs instead of that they need root.
    try:
        with os.scandir(socket_dir) as it:
            paths = sorted(Path(e.path) for e in it if e.name.endswith(".sock"))
    except FileNotFoundError:
        raise ApprovalError(f"no running ebpf-guard ({socket_dir} does not exist)") from None
    except PermissionError:
        raise _permission(socket_dir) from None
    answered = False
    for path in paths:
        reply = _request(path, req)
        if reply is not None:
            answered = True
            yield reply
    if not answered:
        raise ApprovalError(f"no running ebpf-guard (no live socket in {socket_dir})")


def _is_live(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
        return True  # the desk sees an empty request and just drops the connection
    except OSError:
        return False  # ECONNREFUSED: a stale socket of a guard that died
    finally:
        s.close()


def _request(path: Path, req: dict) -> dict | None:
    """One request/reply; None if nobody listens there any more (stale socket)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(CLIENT_TIMEOUT_S)
    try:
        try:
            s.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return None
        try:
            s.sendall(json.dumps(req).encode() + b"\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # a guard that refuses a peer answers and hangs up before reading: read why
        buf = b""
        while b"\n" not in buf:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            buf += chunk
    except PermissionError:
        raise _permission(path) from None
    except TimeoutError:
        raise ApprovalError(f"the guard at {path} did not answer within "
                            f"{CLIENT_TIMEOUT_S:g}s") from None
    except OSError as e:
        raise ApprovalError(f"cannot talk to the guard at {path}: {e.strerror or e}") from None
    finally:
        s.close()
    try:
        return json.loads(buf.split(b"\n", 1)[0])
    except ValueError:
        raise ApprovalError(f"the guard at {path} hung up without an answer") from None


def _permission(path: Path) -> ApprovalError:
    return ApprovalError(f"permission refused: approvals are root-only ({path}); run as root, "
                         f"e.g. sudo ebpf-guard approvals")


def format_pending(items: list[dict]) -> str:
    """The `ebpf-guard approvals` table."""
    if not items:
        return "no pending approvals"
    sessions = len({d.get("session") for d in items}) > 1
    head = ["ID", "AGE", "LEFT", "RULE", "PID", "COMM", "WHAT"] + (["SESSION"] if sessions else [])
    rows = []
    for d in items:
        left = d.get("expires_in_s")
        row = [d["id"], _age(d.get("age_s", 0)),
               "-" if left is None else _age(max(left, 0)),
               _clip(d.get("rule") or "(default)", 24), str(d.get("pid", "")),
               _clip(d.get("comm", ""), 16), _clip(d.get("what", ""), 70)]
        rows.append(row + ([d.get("session", "")] if sessions else []))
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in [head, *rows]]
    return "\n".join(lines)


# --- small helpers -------------------------------------------------------------------------------


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _login_user(pid: int) -> str:
    """The audit login user of a process (survives sudo/su); "" if unset, e.g. in containers."""
    try:
        loginuid = int(Path(f"/proc/{pid}/loginuid").read_text())
    except (OSError, ValueError):
        return ""
    return "" if loginuid == 0xFFFFFFFF else user_name(loginuid)


def _proc_comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _send_quietly(sock: socket.socket, reply: dict) -> None:
    # Replies are small and root clients read them at once; a short timeout keeps one misbehaving
    # client from stalling the guard loop.
    try:
        sock.settimeout(0.2)
        sock.sendall(json.dumps(reply).encode() + b"\n")
    except OSError:
        pass


def _age(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"
