"""The approval desk over real unix sockets, real non-root processes and a real pty."""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ebpf_guard import approvals
from ebpf_guard.approvals import ApprovalDesk, ApprovalError, Resolution
from ebpf_guard.events import Event, Kind
from ebpf_guard.verdicts import Decision, Verdict
from tests import helpers

REPO = Path(__file__).resolve().parent.parent
NOBODY = 65534

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (root-only socket)")


def decision(pid: int = 4242, argv: tuple[str, ...] = ("git", "push", "origin", "main"),
             rule: str = "ask-git-push") -> Decision:
    ev = Event(kind=Kind.EXEC, ts_ns=1, pid=pid, tgid=pid, ppid=1, uid=1000, comm="git",
               cgroup_id=7, start_ns=1, raw_path="/usr/bin/git", path="/usr/bin/git", argv=argv)
    return Decision(Verdict.ASK, rule, "pushing requires approval", ev)


@pytest.fixture
def sockdir() -> Iterator[Path]:
    # Short path (sun_path is 108 bytes); the parent is traversable so only the desk's own 0700
    # directory stands between uid 65534 and the socket.
    base = Path(tempfile.mkdtemp(prefix="egapp-"))
    os.chmod(base, 0o755)
    try:
        yield base / "run"
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def desk(sockdir: Path) -> Iterator[ApprovalDesk]:
    d = ApprovalDesk(sockdir, session="s1")
    try:
        yield d
    finally:
        d.close()


class Served:
    """Polls a desk in a background thread, as the guard loop would, collecting resolutions."""

    def __init__(self, desk: ApprovalDesk) -> None:
        self.desk = desk
        self.lock = threading.Lock()  # the desk is single-threaded: add() and poll() never overlap
        self.resolutions: list[Resolution] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with self.lock:
                self.resolutions += self.desk.poll()
            time.sleep(0.002)

    def add(self, d: Decision | None = None, *, timeout_s: float = 60, default_allow: bool = False):
        with self.lock:
            return self.desk.add(d or decision(), timeout_s=timeout_s, default_allow=default_allow)

    def __enter__(self) -> Served:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(helpers.scaled(5))


def as_nobody(code: str) -> subprocess.CompletedProcess:
    """Run Python `code` as uid/gid 65534 with no supplementary groups (see helpers.as_nobody)."""
    return subprocess.run(helpers.as_nobody([sys.executable, "-c", code]), capture_output=True, text=True,
                          timeout=helpers.scaled(15), cwd="/", env={**os.environ, "PYTHONPATH": str(REPO)})


def client_code(call: str, sockdir: Path) -> str:
    """Python that prints `approvals.CALL` (with D = the socket dir), or ERROR and the message."""
    return ("from pathlib import Path\n"
            "from ebpf_guard import approvals\n"
            f"D = Path({str(sockdir)!r})\n"
            "try:\n"
            f"    print(approvals.{call})\n"
            "except approvals.ApprovalError as e:\n"
            "    print('ERROR', e)\n")


# --- socket side ---------------------------------------------------------------------------------


def test_socket_is_root_only_and_removed_on_close(sockdir: Path) -> None:
    desk = ApprovalDesk(sockdir, session="modes")
    sock = sockdir / "modes.sock"
    try:
        d, s = os.lstat(sockdir), os.lstat(sock)
        assert stat.S_IMODE(d.st_mode) == 0o700 and d.st_uid == 0
        assert stat.S_ISSOCK(s.st_mode) and stat.S_IMODE(s.st_mode) == 0o600 and s.st_uid == 0
    finally:
        desk.close()
    assert not sock.exists()


def test_list_approve_deny_round_trip(desk: ApprovalDesk) -> None:
    with Served(desk) as served:
        p1 = served.add(decision(pid=101))
        p2 = served.add(decision(pid=102, argv=("rm", "-rf", "/"), rule="ask-rm"))
        assert len(p1.id) == 6 and p1.id != p2.id

        listed = approvals.list_pending(socket_dir=desk.socket_dir)
        assert [d["id"] for d in listed] == [p1.id, p2.id]  # oldest first
        first = listed[0]
        assert first["rule"] == "ask-git-push" and first["pid"] == 101 and first["comm"] == "git"
        assert first["what"] == "exec /usr/bin/git  [git push origin main]"
        assert first["session"] == "s1" and first["default"] == "deny" and first["age_s"] >= 0
        table = approvals.format_pending(listed)
        header = table.splitlines()[0].split()
        assert header == ["ID", "AGE", "LEFT", "RULE", "PID", "COMM", "WHAT"]
        assert p1.id in table and "ask-rm" in table and "102" in table

        msg = approvals.approve(p1.id, remember=True, socket_dir=desk.socket_dir)
        assert p1.id in msg and "allowed" in msg
        msg = approvals.deny(p2.id.upper(), socket_dir=desk.socket_dir)  # ids are case-blind
        assert "denied" in msg
        assert approvals.format_pending(approvals.list_pending(socket_dir=desk.socket_dir)) == \
            "no pending approvals"

    a, d = served.resolutions
    assert (a.pending.id, a.allow, a.remember, a.via) == (p1.id, True, True, "socket")
    assert (d.pending.id, d.allow, d.remember, d.via) == (p2.id, False, False, "socket")
    assert a.by_uid == 0 and a.by_user == "root" and a.by_pid > 0 and a.waited_s >= 0
    assert desk.pending() == []

    rec = a.to_record()
    assert rec["type"] == "approval" and rec["decision"] == "allow" and rec["remember"] is True
    assert rec["via"] == "socket" and rec["by_uid"] == 0 and rec["by_user"] == "root"
    assert rec["rule"] == "ask-git-push" and rec["pid"] == 101 and rec["uid"] == 1000
    assert rec["asked_at"].endswith("Z") and rec["decided_at"] >= rec["asked_at"]
    json.dumps(rec)  # the verdict log must be able to write it


def test_unknown_and_already_resolved_ids(desk: ApprovalDesk) -> None:
    with Served(desk) as served:
        p = served.add()
        with pytest.raises(ApprovalError, match="unknown approval id 'zzzzzz'"):
            approvals.approve("zzzzzz", socket_dir=desk.socket_dir)
        approvals.deny(p.id, socket_dir=desk.socket_dir)
        with pytest.raises(ApprovalError, match=f"{p.id} was already denied via socket"):
            approvals.approve(p.id, socket_dir=desk.socket_dir)
    assert [r.allow for r in served.resolutions] == [False]


def test_no_running_guard(sockdir: Path) -> None:
    with pytest.raises(ApprovalError, match="no running ebpf-guard"):
        approvals.list_pending(socket_dir=sockdir)  # the directory does not even exist
    sockdir.mkdir(mode=0o700)
    with pytest.raises(ApprovalError, match="no running ebpf-guard"):
        approvals.approve("abcdef", socket_dir=sockdir)
    # A guard that died without close() leaves a socket nobody listens on.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sockdir / "dead.sock"))
    stale.close()
    with pytest.raises(ApprovalError, match="no running ebpf-guard"):
        approvals.list_pending(socket_dir=sockdir)
    # ...which a new guard of the same session name takes over, while a live one is refused.
    with ApprovalDesk(sockdir, session="dead") as desk, Served(desk):
        with pytest.raises(ApprovalError, match="another ebpf-guard session 'dead' is running"):
            ApprovalDesk(sockdir, session="dead")
        assert approvals.list_pending(socket_dir=sockdir) == []


def test_several_sessions(sockdir: Path) -> None:
    with ApprovalDesk(sockdir, session="a") as da, ApprovalDesk(sockdir, session="b") as db:
        with Served(da) as sa, Served(db) as sb:
            pa = sa.add(decision(pid=1))
            pb = sb.add(decision(pid=2))
            listed = approvals.list_pending(socket_dir=sockdir)
            assert {(d["session"], d["id"]) for d in listed} == {("a", pa.id), ("b", pb.id)}
            assert "SESSION" in approvals.format_pending(listed).splitlines()[0]
            approvals.approve(pb.id, socket_dir=sockdir)
            approvals.deny(pa.id, socket_dir=sockdir)
    assert [(r.pending.id, r.allow) for r in sb.resolutions] == [(pb.id, True)]
    assert [(r.pending.id, r.allow) for r in sa.resolutions] == [(pa.id, False)]


@pytest.mark.parametrize("default_allow", [False, True])
def test_timeout_applies_the_default(sockdir: Path, default_allow: bool) -> None:
    now = [1000.0]
    with ApprovalDesk(sockdir, session="t", clock=lambda: now[0]) as desk:
        p = desk.add(decision(), timeout_s=30, default_allow=default_allow)
        now[0] += 29.9
        assert desk.poll() == [] and desk.pending() == [p]
        now[0] += 0.2
        (res,) = desk.poll()
        assert desk.pending() == [] and desk.poll() == []
    assert res.pending is p and res.allow is default_allow and res.remember is False
    assert res.via == "timeout" and res.by_uid == -1 and res.waited_s == pytest.approx(30.1)
    assert res.to_record()["default"] == ("allow" if default_allow else "deny")


# --- root only -----------------------------------------------------------------------------------


def test_non_root_client_gets_a_clear_error(desk: ApprovalDesk) -> None:
    p = desk.add(decision(), timeout_s=60, default_allow=False)
    for call in ("list_pending(socket_dir=D)", f"approve({p.id!r}, True, socket_dir=D)",
                 f"deny({p.id!r}, socket_dir=D)"):
        out = as_nobody(client_code(call, desk.socket_dir))
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("ERROR permission refused"), out.stdout
        assert "root" in out.stdout
    assert desk.poll() == [] and desk.pending() == [p]


def test_peercred_refuses_non_root_even_with_open_modes(desk: ApprovalDesk) -> None:
    # Loosen the file modes as a careless admin might: the SO_PEERCRED check must still hold.
    os.chmod(desk.socket_dir, 0o777)
    os.chmod(desk.path, 0o666)
    with Served(desk) as served:
        p = served.add()
        for call in ("list_pending(socket_dir=D)", f"approve({p.id!r}, True, socket_dir=D)"):
            out = as_nobody(client_code(call, desk.socket_dir))
            assert out.returncode == 0, out.stderr
            assert "ERROR permission refused" in out.stdout and "uid 65534" in out.stdout
        with served.lock:
            refused = desk.take_refusals()
    assert served.resolutions == [] and desk.pending() == [p]
    assert [r.peer_uid for r in refused] == [NOBODY, NOBODY]
    rec = refused[0].to_record()
    assert rec["type"] == "approval_refused" and rec["peer_pid"] > 0 and rec["peer_comm"]


# --- inline terminal -----------------------------------------------------------------------------


def read_until(fd: int, needle: str, pump: ApprovalDesk | None = None,
               timeout: float = 5.0) -> str:
    """Read the pty master until `needle` shows; `pump` is a desk to poll meanwhile (which must
    not resolve anything)."""
    seen = b""
    deadline = time.monotonic() + helpers.scaled(timeout)
    while needle.encode() not in seen:
        if time.monotonic() > deadline:
            raise AssertionError(f"no {needle!r} on the pty; got {seen!r}")
        if pump is not None:
            assert pump.poll() == []
        if select.select([fd], [], [], 0.01)[0]:
            seen += os.read(fd, 4096)
    return seen.decode()


def poll_until(desk: ApprovalDesk, timeout: float = 5.0) -> list[Resolution]:
    deadline = time.monotonic() + helpers.scaled(timeout)
    while time.monotonic() < deadline:
        got = desk.poll()
        if got:
            return got
        time.sleep(0.002)
    raise AssertionError("no resolution")


def icanon(fd: int) -> bool:
    return bool(termios.tcgetattr(fd)[3] & termios.ICANON)


@pytest.fixture
def pty() -> Iterator[tuple[int, object]]:
    master, slave = os.openpty()
    tty = os.fdopen(slave, "w")
    try:
        yield master, tty
    finally:
        tty.close()
        os.close(master)


@pytest.mark.parametrize(("key", "allow", "remember"),
                         [("y", True, False), ("n", False, False), ("a", True, True),
                          ("b", False, True)])
def test_tty_keys(sockdir: Path, pty, key: str, allow: bool, remember: bool) -> None:
    master, tty = pty
    with ApprovalDesk(sockdir, session="tty", tty=tty) as desk:
        assert icanon(tty.fileno())
        p = desk.add(decision(), timeout_s=90, default_allow=False)
        prompt = read_until(master, "deny " + p.id)
        assert "APPROVAL NEEDED" in prompt and p.id in prompt and "ask-git-push" in prompt
        assert "pushing requires approval" in prompt and "y = allow once" in prompt
        assert "denied in 90s" in prompt
        assert not icanon(tty.fileno())  # cbreak: a single key, no Enter
        os.write(master, key.encode())
        (res,) = poll_until(desk)
        assert icanon(tty.fileno())  # restored as soon as nothing is pending
    assert (res.pending.id, res.allow, res.remember, res.via) == (p.id, allow, remember, "tty")
    assert res.by_uid == 0 and res.by_user == "root"


def test_tty_oldest_first_and_typeahead_ignored(sockdir: Path, pty) -> None:
    master, tty = pty
    with ApprovalDesk(sockdir, session="tty", tty=tty) as desk:
        os.write(master, b"y")  # typed for the agent while nothing was pending
        assert desk.poll() == []  # not read: the terminal belongs to the agent then
        p1 = desk.add(decision(pid=1), timeout_s=60, default_allow=False)
        read_until(master, "deny " + p1.id)
        assert desk.poll() == []  # the early 'y' was flushed when the prompt appeared
        p2 = desk.add(decision(pid=2), timeout_s=60, default_allow=False)
        read_until(master, "also waiting for approval [" + p2.id)
        os.write(master, b"x")  # not a choice: a hint, no answer
        read_until(master, "press y", pump=desk)
        os.write(master, b"n")
        (r1,) = poll_until(desk)
        read_until(master, "deny " + p2.id)  # next prompt: the remaining one
        os.write(master, b"y")
        (r2,) = poll_until(desk)
    assert (r1.pending.id, r1.allow) == (p1.id, False)
    assert (r2.pending.id, r2.allow) == (p2.id, True)


def test_socket_answer_moves_the_tty_prompt_on(sockdir: Path, pty) -> None:
    master, tty = pty
    with ApprovalDesk(sockdir, session="tty", tty=tty) as desk:
        p1 = desk.add(decision(pid=1), timeout_s=60, default_allow=False)
        p2 = desk.add(decision(pid=2), timeout_s=60, default_allow=False)
        read_until(master, "deny " + p1.id)
        with Served(desk) as served:
            approvals.approve(p1.id, socket_dir=sockdir)
            read_until(master, "deny " + p2.id)
            os.write(master, b"b")
            deadline = time.monotonic() + helpers.scaled(5)
            while len(served.resolutions) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
    got = [(r.pending.id, r.allow, r.remember, r.via) for r in served.resolutions]
    assert got == [(p1.id, True, False, "socket"), (p2.id, False, True, "tty")]


def test_line_mode_when_not_a_terminal(sockdir: Path) -> None:
    r, w = os.pipe()
    reader = os.fdopen(r, "r")
    try:
        with ApprovalDesk(sockdir, session="pipe", tty=reader) as desk:
            p = desk.add(decision(), timeout_s=60, default_allow=False)
            os.write(w, b"a")
            assert desk.poll() == []  # no answer before the line ends
            os.write(w, b"lways\n")
            (res,) = poll_until(desk)
    finally:
        reader.close()
        os.close(w)
    assert (res.pending.id, res.allow, res.remember, res.via) == (p.id, True, True, "tty")
