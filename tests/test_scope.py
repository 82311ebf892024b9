"""The scope guard: `kill`, `resume` and `watch` never act on what the operator did not ask to
guard. Every refusal is proven by its effect: a canary process outside (or inside) the refused
cgroup is still alive afterwards."""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import GUARD, NOBODY, REPO, guard, scaled, wait_for

from ebpf_guard.enforce import cgroups

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

EXIT_REFUSED = 3


@pytest.fixture
def canary(spawn) -> subprocess.Popen:
    """A process that must survive every refused command (it lives where the test runs)."""
    return spawn(None, ["sleep", "300"])


def alive(p: subprocess.Popen) -> bool:
    return p.poll() is None


@pytest.fixture
def init_scope(spawn) -> Iterator[tuple[Path, subprocess.Popen]]:
    """The v2 init.scope, with a canary inside. Hosts without systemd have none: the test makes
    one (and removes it) so the refusal is tested on its name, not on "does not exist"."""
    path = cgroups.find_v2_mount() / "init.scope"
    made = not path.exists()
    if made:
        path.mkdir()
    p = spawn(path, ["sleep", "300"])
    try:
        yield path, p
    finally:
        p.kill()
        p.wait(scaled(5))
        if made:
            cgroups.wait_empty(path, scaled(5))
            path.rmdir()


@pytest.mark.parametrize("spec", ["/", "0::/", "//", "/./..", "ROOT"])
@pytest.mark.parametrize("command", ["kill", "resume"])
def test_the_root_cgroup_is_refused_even_with_force(command, spec, canary, tmp_cgroup, spawn):
    inside = spawn(tmp_cgroup, ["sleep", "300"])
    spec = str(cgroups.find_v2_mount()) if spec == "ROOT" else spec
    for extra in ((), ("--force",)):
        r = guard(command, "--cgroup", spec, *extra)
        assert r.returncode == EXIT_REFUSED, r.stderr
        assert "refusing the root cgroup" in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    assert alive(canary) and alive(inside)
    assert not cgroups.is_frozen(tmp_cgroup)


def test_watch_refuses_the_root_cgroup(canary):
    r = guard("watch", "--cgroup", "/")
    assert r.returncode == EXIT_REFUSED, r.stderr
    assert "refusing the root cgroup" in r.stderr
    assert alive(canary)


@pytest.mark.parametrize("command", ["kill", "resume"])
def test_init_scope_is_refused(command, init_scope, canary):
    path, inside = init_scope
    for spec in ("/init.scope", str(path)):
        r = guard(command, "--cgroup", spec, "--force")
        assert r.returncode == EXIT_REFUSED, r.stderr
        assert "init.scope" in r.stderr
    assert alive(inside) and alive(canary)


def test_watch_refuses_init_scope(init_scope):
    path, inside = init_scope
    r = guard("watch", "--cgroup", "/init.scope")
    assert r.returncode == EXIT_REFUSED and "init.scope" in r.stderr, r.stderr
    assert alive(inside) and not cgroups.is_frozen(path)


def test_a_cgroup_holding_the_guard_is_refused(tmp_cgroup, canary, spawn):
    """The guard itself runs inside a child of the named cgroup: refused even with --force."""
    inner = cgroups.create_cgroup(tmp_cgroup, "inner")
    sibling = spawn(tmp_cgroup, ["sleep", "300"])
    cgroups.mark(tmp_cgroup, cgroups.ROLE_CREATED)  # even a cgroup of ours
    def join() -> None:
        with open(inner / "cgroup.procs", "w") as f:
            f.write(str(os.getpid()))

    for command in ("kill", "resume"):
        r = subprocess.run([*GUARD, command, "--cgroup", str(tmp_cgroup), "--force"], capture_output=True,
                           text=True, cwd=REPO, preexec_fn=join, timeout=scaled(60))
        assert r.returncode == EXIT_REFUSED, r.stderr
        assert "contains ebpf-guard itself" in r.stderr
    assert alive(sibling) and alive(canary)


def test_an_unmarked_cgroup_needs_force(tmp_cgroup, canary, spawn):
    inside = spawn(tmp_cgroup, ["sleep", "300"])
    r = guard("kill", "--cgroup", str(tmp_cgroup))
    assert r.returncode == EXIT_REFUSED and "--force" in r.stderr, r.stderr
    assert alive(inside)
    cgroups.freeze(tmp_cgroup)
    assert cgroups.wait_frozen(tmp_cgroup, scaled(5))
    r = guard("resume", "--cgroup", str(tmp_cgroup))
    assert r.returncode == EXIT_REFUSED and "--force" in r.stderr, r.stderr
    assert cgroups.is_frozen(tmp_cgroup)
    assert guard("resume", "--cgroup", str(tmp_cgroup), "--force").returncode == 0
    assert not cgroups.is_frozen(tmp_cgroup)
    r = guard("kill", "--cgroup", str(tmp_cgroup), "--force")
    assert r.returncode == 0, r.stderr
    assert inside.wait(scaled(5)) == -signal.SIGKILL
    assert tmp_cgroup.exists(), "a cgroup ebpf-guard did not create is never removed"
    assert alive(canary)


def test_kill_of_a_created_cgroup_kills_its_subtree_only_and_removes_it(tmp_cgroup, canary, spawn):
    ours = cgroups.create_run_cgroup(tmp_cgroup)
    assert cgroups.marked_role(ours) == cgroups.ROLE_CREATED
    deeper = cgroups.create_cgroup(ours, "deeper")
    victims = [spawn(ours, ["sleep", "300"]), spawn(deeper, ["sleep", "300"])]
    beside = spawn(tmp_cgroup, ["sleep", "300"])  # the parent's own member: not in the subtree
    r = guard("kill", "--cgroup", str(ours))
    assert r.returncode == 0, r.stderr
    assert "killed 2 processes" in r.stdout and "removed it" in r.stdout
    assert all(v.wait(scaled(5)) == -signal.SIGKILL for v in victims)
    assert not ours.exists()
    assert alive(beside) and alive(canary)


def test_kill_of_a_created_v1_freezer_removes_it(canary, spawn):
    if cgroups.find_v1_mount("freezer") is None:
        pytest.skip("no v1 freezer on this host")
    p = spawn(None, ["sleep", "300"])
    fz = cgroups.freezer_for(None, p.pid)
    try:
        assert cgroups.marked_role(fz.path) == cgroups.ROLE_CREATED
        r = guard("kill", "--cgroup", str(fz.path))
        assert r.returncode == 0, r.stderr
        assert p.wait(scaled(5)) == -signal.SIGKILL and not fz.path.exists()
        for refused in (str(fz.path.parent), f"{fz.path.parent}/"):
            r = guard("kill", "--cgroup", refused, "--force")
            assert r.returncode != 0 and alive(canary), r.stderr
    finally:
        if fz.path.exists():
            fz.remove()  # type: ignore[attr-defined]


def test_the_kill_fallback_never_goes_wider_than_the_root_check():
    """The lowest layer refuses too: no caller can hand kill_cgroup a hierarchy root."""
    for root in [cgroups.find_v2_mount(), cgroups.find_v1_mount("freezer")]:
        if root is None:
            continue
        with pytest.raises(cgroups.ScopeError):
            cgroups.kill_cgroup(root)
        with pytest.raises(cgroups.ScopeError):
            cgroups.V1Freezer(root).kill()


def test_a_mark_cannot_be_forged_by_the_agents_user(tmp_cgroup):
    """trusted.* xattrs need CAP_SYS_ADMIN: a process of the agent's user cannot mark a cgroup."""
    os.chown(tmp_cgroup, NOBODY, NOBODY)  # even a cgroup delegated to that user
    code = (f"import os; os.setxattr({str(tmp_cgroup)!r}, {cgroups.MARK_XATTR!r}, "
            "b'{\"role\": \"created\"}')")
    r = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                        "/usr/bin/python3", "-c", code], capture_output=True, text=True)
    assert r.returncode != 0 and "PermissionError" in r.stderr
    assert cgroups.marked_role(tmp_cgroup) is None


@pytest.mark.parametrize("pid", ["1", "0", "-3", "SELF", "PARENT", "KTHREAD"])
def test_watch_pid_refuses_init_kernel_threads_and_the_guards_own_line(pid, canary):
    pid = {"SELF": "$$", "PARENT": str(os.getpid()), "KTHREAD": "2"}.get(pid, pid)
    r = subprocess.run(["sh", "-c", f"exec {' '.join(map(str, [*GUARD, 'watch', '--pid', pid]))}"],
                       capture_output=True, text=True, timeout=scaled(60))
    assert r.returncode in (EXIT_REFUSED, 2), r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert alive(canary)


@pytest.mark.parametrize("command", ["kill", "resume"])
def test_non_root_is_told_root_is_needed_for_this(command, tmp_cgroup):
    r = guard(command, "--cgroup", str(tmp_cgroup), nobody=True)
    assert r.returncode == 1
    verb = "kill" if command == "kill" else "thaw"
    assert f"needs root to {verb} a cgroup" in r.stderr and "BPF" not in r.stderr


def test_watch_marks_its_cgroup_and_gives_it_back(tmp_cgroup, spawn, tmp_path):
    """While a `watch` runs the cgroup carries the watched mark (so `resume` needs no --force);
    after a clean end that did not leave it frozen, the mark is gone again."""
    spawn(tmp_cgroup, ["sleep", "300"])
    for when in ("during setup", "while watching"):
        log = tmp_path / f"v-{uuid.uuid4().hex[:6]}.jsonl"
        proc = subprocess.Popen([*GUARD, "watch", "--cgroup", str(tmp_cgroup), "--log", str(log), "--quiet"],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: cgroups.marked_role(tmp_cgroup) == cgroups.ROLE_WATCHED, timeout=30)
            if when == "while watching":
                for line in proc.stderr:
                    if "attached in" in line:
                        break
                assert guard("resume", "--cgroup", str(tmp_cgroup)).returncode == 0  # no --force
        finally:
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=scaled(30))
        assert proc.returncode == 122, (when, err[-2000:])
        assert cgroups.marked_role(tmp_cgroup) is None, when
