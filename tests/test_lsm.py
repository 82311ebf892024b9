"""BPF-LSM enforcement (ebpf_guard/enforce/lsm.py, bpf/lsm.c).

Planning and the refusal message run everywhere. The prevention tests need a kernel that loads
BPF-LSM programs (the Debian 12 guest of vagrant/qemu.sh; this project's 6.18 VM refuses them)
and skip with lsm_status()'s one-line reason otherwise. They prove effects: no key byte on
stdout, a config file byte-identical, a tool's marker never written, files still there, a held
process still stopped. One enforcer serves the module (a bcc compile costs 15-40 s emulated).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from ebpf_guard.enforce import cgroups
from ebpf_guard.enforce.lsm import (
    DENY_WRITE,
    HOOKS,
    LsmEnforcer,
    LsmError,
    LsmPlan,
    lsm_status,
    plan_lsm,
)
from ebpf_guard.paths import DEFAULT_POLICY
from ebpf_guard.policy import load_policy
from ebpf_guard.policy.identities import compile_identities
from tests.conftest import BCC_PROBLEM
from tests.helpers import scaled, wait_for

LSM_OK, LSM_WHY = lsm_status() if os.geteuid() == 0 else (False, "BPF-LSM: needs root")
requires_lsm = pytest.mark.skipif(not LSM_OK or BCC_PROBLEM is not None, reason=BCC_PROBLEM or LSM_WHY)
LDSO = "/lib64/ld-linux-x86-64.so.2"
KEY_BYTES = b"-----BEGIN OPENSSH PRIVATE KEY-----\nsecret-key-material\n"
CONFIG_BYTES = b"export PATH=/usr/bin\n"


def _inode(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


@pytest.fixture
def fake_home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_bytes(KEY_BYTES)
    (home / ".bashrc").write_bytes(CONFIG_BYTES)
    (home / ".aws").mkdir()
    (home / ".aws" / "credentials").write_bytes(b"[default]\naws_secret_access_key = x\n")
    return home


# ---------------------------------------------------------------------------- everywhere


def test_status_is_one_line() -> None:
    ok, why = LSM_OK, LSM_WHY
    assert why.startswith("BPF-LSM: ") and "\n" not in why
    if not ok:
        assert any(w in why for w in ("refuses", "not active", "needs root", "no bpf_lsm", "cannot"))


def test_plan_from_default_policy(fake_home: Path, tmp_path: Path) -> None:
    policy = load_policy(DEFAULT_POLICY, identities=False)
    ws = tmp_path / "ws"
    ws.mkdir()
    identities = compile_identities(policy, workspace=str(ws), homes=[str(fake_home)])
    plan = plan_lsm(policy, identities, workspace=str(ws), homes=[str(fake_home)])
    key, config = _inode(fake_home / ".ssh" / "id_ed25519"), _inode(fake_home / ".bashrc")
    # ssh-keys has an exception (git's ssh: an ASK): who opens it decides, so the gate holds the
    # open for the engine; the LSM only refuses its deletion (ssh-keys-delete).
    assert key not in plan.deny_open_inodes
    assert key in plan.deny_write_inodes  # ssh-keys-delete
    assert _inode(fake_home / ".aws" / "credentials") in plan.deny_open_inodes  # credentials: any open
    assert config in plan.deny_write_inodes and config not in plan.deny_open_inodes  # write only
    assert plan.unlink_rate == (3, 10_000_000_000)  # mass-delete
    assert _inode(Path("/tmp")) in plan.rate_exempt_dirs
    assert _inode(Path("/etc/passwd")) in plan.deny_write_inodes
    for tool in ("curl", "wget"):  # exfil-tool (HALT, names only): exec held, not denied
        if shutil.which(tool):
            inode = _inode(Path(os.path.realpath(shutil.which(tool))))
            assert inode in plan.hold_exec_inodes and inode not in plan.deny_exec_inodes
    rm = shutil.which("rm")  # recursive-rm judges flags: not the kernel's
    assert rm is None or _inode(Path(os.path.realpath(rm))) not in plan.deny_exec_inodes | plan.hold_exec_inodes
    flags = plan.inode_flags()
    assert flags[key] == DENY_WRITE and flags[config] == DENY_WRITE
    assert any(line.startswith("deny open: ") and "credentials" in line for line in plan.describe())


def test_plan_rejects_bad_rate() -> None:
    with pytest.raises(LsmError, match="unlink_rate"):
        LsmPlan(unlink_rate=(0, 10))
    with pytest.raises(LsmError, match="unlink_rate"):
        LsmPlan(unlink_rate=(5000, 10))


@pytest.mark.skipif(LSM_OK or BCC_PROBLEM is not None or os.geteuid() != 0,
                    reason="the host runs BPF-LSM (or cannot run bcc): nothing refused to report")
def test_refused_host_says_so_in_one_line(tmp_cgroup: Path) -> None:
    enforcer = LsmEnforcer([tmp_cgroup], LsmPlan())
    with pytest.raises(LsmError) as info:
        enforcer.start()
    assert "\n" not in str(info.value) and "BPF-LSM" in str(info.value)
    with pytest.raises(LsmError, match="not started"):
        enforcer.counters()


# ---------------------------------------------------------------- the kernel (BPF-LSM hosts)


@dataclass
class Setup:
    """The module's watched cgroup, fake home, files and running enforcer."""

    cgroup: Path
    home: Path
    key: Path
    config: Path
    tool: Path  # in the plan's deny_exec (a KILL tool)
    held_tool: Path  # in its hold_exec (a HALT/ASK tool)
    base: Path
    enforcer: LsmEnforcer

    def run(self, argv: list[str] | str, *, watched: bool = True, **kw) -> subprocess.CompletedProcess:
        cmd = ["sh", "-c", argv] if isinstance(argv, str) else argv
        join = (lambda: cgroups.move_pid(self.cgroup, os.getpid())) if watched else None
        return subprocess.run(cmd, preexec_fn=join, capture_output=True, timeout=scaled(30), **kw)


@pytest.fixture(scope="module")
def lsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    if not LSM_OK or BCC_PROBLEM is not None:
        pytest.skip(BCC_PROBLEM or LSM_WHY)
    base = Path(f"/var/lib/ebpf-guard-test-{uuid.uuid4().hex[:8]}")  # not /tmp: exempt from the limit
    home = base / "home"
    # A credential store: a rule the LSM takes whole (ssh keys have an exception, git's ssh,
    # which only the engine can judge: the gate holds those opens, test_prevent.py).
    (home / ".aws").mkdir(parents=True)
    key, config = home / ".aws" / "credentials", home / ".bashrc"
    key.write_bytes(KEY_BYTES)
    config.write_bytes(CONFIG_BYTES)
    tool = base / "tool"
    shutil.copy2("/usr/bin/touch", tool)  # a program whose running leaves a marker file
    held_tool = base / "held-tool"
    shutil.copy2("/usr/bin/touch", held_tool)
    cg = cgroups.create_cgroup(cgroups.find_v2_mount(), f"ebpf-guard-test-{uuid.uuid4().hex[:10]}")
    policy = load_policy(DEFAULT_POLICY, identities=False)
    plan = plan_lsm(policy, workspace=str(base / "ws"), homes=[str(home)])
    plan = replace(plan, deny_exec_inodes=plan.deny_exec_inodes | {_inode(tool)},
                   hold_exec_inodes=plan.hold_exec_inodes | {_inode(held_tool)})
    enforcer = LsmEnforcer([cg], plan)
    try:
        enforcer.start()
        yield Setup(cg, home, key, config, tool, held_tool, base, enforcer)
    finally:
        enforcer.close()
        cgroups.remove_cgroup(cg, timeout=scaled(5))
        shutil.rmtree(base, ignore_errors=True)


@requires_lsm
def test_key_read_denied_by_any_name(lsm: Setup) -> None:
    symlink, hardlink = lsm.base / "innocent", lsm.base / "hard"
    symlink.symlink_to(lsm.key)
    os.link(lsm.key, hardlink)  # made by this unwatched process: the watched one could not
    try:
        for name in (lsm.key, symlink, hardlink):
            r = lsm.run(["cat", str(name)])
            assert r.returncode != 0 and r.stdout == b"", name
            assert b"Operation not permitted" in r.stderr
        r = lsm.run(f"cd {lsm.key.parent} && cat ./{lsm.key.name}")
        assert r.stdout == b""
        assert lsm.run(["cat", str(lsm.key)], watched=False).stdout == KEY_BYTES  # unwatched: works
        r = lsm.run(["ln", str(lsm.key), str(lsm.base / "another")])  # a new name for it: refused
        assert r.returncode != 0 and not (lsm.base / "another").exists()
    finally:
        symlink.unlink()
        hardlink.unlink()
    assert lsm.enforcer.counters()["file_open"] >= 4


@requires_lsm
def test_config_modifications_denied(lsm: Setup) -> None:
    other = lsm.base / "x"
    other.write_bytes(b"replacement\n")
    attempts = [
        f"echo evil >> {lsm.config}",
        f"echo evil > {lsm.config}",
        f"mv {other} {lsm.config}",
        f"truncate -s0 {lsm.config}",
        f"rm -f {lsm.config}",
        f"mv {lsm.config} {lsm.base / 'moved'}",
    ]
    for script in attempts:
        lsm.run(script)
        assert lsm.config.read_bytes() == CONFIG_BYTES, script
    assert other.exists() and not (lsm.base / "moved").exists()
    assert lsm.run(["cat", str(lsm.config)]).stdout == CONFIG_BYTES  # reading it is fine
    counts = lsm.enforcer.counters()
    assert counts["path_rename"] >= 2 and counts["path_unlink"] >= 1


@requires_lsm
def test_listed_tool_never_runs(lsm: Setup, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    with pytest.raises(PermissionError):  # exec fails in the child: subprocess reports EPERM
        lsm.run([str(lsm.tool), str(marker)])
    r = lsm.run([LDSO, str(lsm.tool), str(marker)])
    assert r.returncode != 0
    r = lsm.run(["cp", str(lsm.tool), str(tmp_path / "copy")])
    assert r.returncode != 0 and not (tmp_path / "copy").exists()
    assert not marker.exists()
    assert lsm.run([str(lsm.tool), str(marker)], watched=False).returncode == 0  # unwatched: runs
    assert marker.exists()


@requires_lsm
def test_held_tool_execs_but_is_not_copied(lsm: Setup, tmp_path: Path) -> None:
    # A HALT/ASK tool's exec passes into the sensor's exec hold (not loaded here, so it runs);
    # the ways around a hold by identity (a copy under another name, ld.so TOOL) are refused.
    marker = tmp_path / "ran"
    r = lsm.run([LDSO, str(lsm.held_tool), str(marker)])
    assert r.returncode != 0 and not marker.exists()
    r = lsm.run(["cp", str(lsm.held_tool), str(tmp_path / "copy")])
    assert r.returncode != 0 and not (tmp_path / "copy").exists()
    r = lsm.run(["ln", str(lsm.held_tool), str(tmp_path / "link")])
    assert r.returncode != 0 and not (tmp_path / "link").exists()
    assert lsm.run([str(lsm.held_tool), str(marker)]).returncode == 0  # the exec itself
    assert marker.exists()


@requires_lsm
def test_mass_delete_stops_at_the_limit(lsm: Setup, tmp_path: Path) -> None:
    lsm.enforcer.reset_rate()
    scratch = Path("/tmp") / f"ebpf-guard-lsm-{uuid.uuid4().hex[:8]}"  # exempt: not counted
    scratch.mkdir()
    victims = lsm.base / "victims"
    victims.mkdir()
    try:
        for i in range(5):
            (scratch / f"s{i}").write_bytes(b"")
        for i in range(1000):
            (victims / f"f{i:04d}").write_bytes(b"x")
        lsm.run(["find", str(scratch), "-type", "f", "-delete"])
        assert list(scratch.iterdir()) == []  # scratch deletions are neither refused nor counted
        lsm.run(["find", str(victims), "-type", "f", "-delete"])
        survivors = len(list(victims.iterdir()))
        assert survivors >= 990, survivors  # expect 997: three deletions within 10 s, then EPERM
        assert lsm.enforcer.rate_tripped
        lsm.enforcer.reset_rate()
        assert not lsm.enforcer.rate_tripped
        assert lsm.run(["rm", str(victims / "f0999")]).returncode == 0  # counting afresh
    finally:
        lsm.enforcer.reset_rate()
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(victims, ignore_errors=True)


@requires_lsm
def test_held_process_not_resumed_by_watched(lsm: Setup) -> None:
    held = subprocess.Popen(["sleep", "600"])
    try:
        os.kill(held.pid, signal.SIGSTOP)
        lsm.enforcer.hold(held.pid)
        r = lsm.run(["kill", "-CONT", str(held.pid)])
        assert r.returncode != 0 and b"not permitted" in r.stderr
        assert _state(held.pid) == "T"  # still stopped
        lsm.enforcer.release(held.pid)
        assert lsm.run(["kill", "-CONT", str(held.pid)]).returncode == 0
        wait_for(lambda: _state(held.pid) in ("S", "R"), timeout=5)
        assert lsm.enforcer.counters()["task_kill"] >= 1
    finally:
        held.kill()
        held.wait(scaled(5))


@requires_lsm
def test_counters_and_programs(lsm: Setup) -> None:
    assert set(lsm.enforcer.counters()) == set(HOOKS)
    assert {"file_open", "file_permission", "mmap_file", "path_unlink", "task_kill"} <= set(lsm.enforcer.programs)


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
