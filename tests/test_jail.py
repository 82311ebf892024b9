"""The Landlock jail for `ebpf-guard run`, on the real kernel: harm outside the workspace does not
happen (files stay, bytes stay), work inside the workspace does, and the plan says what it does."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import orjson
import pytest

from ebpf_guard.enforce import jail
from ebpf_guard.enforce.jail import JailError, JailPlan, jail_preexec, plan_jail
from ebpf_guard.policy import load_policy
from ebpf_guard.verdicts import Mode
from tests.conftest import requires_root
from tests.helpers import REPO, policy_extending, scaled

ABI = jail.landlock_abi()
requires_landlock = pytest.mark.skipif(ABI == 0, reason=f"Landlock: {jail.landlock_support().reason}")
pytestmark = [requires_root, requires_landlock]

DEFAULT = load_policy(REPO / "policies" / "default.yaml", identities=False)
TREE_FILES = 1000
CONFIG_BYTES = b"[core]\n\tsecret = keep-me\n"


def default_plan(ws: Path, homes: list[str] | None = None) -> JailPlan:
    return plan_jail(DEFAULT, workspace=str(ws), homes=homes if homes is not None else ["/root"], abi=ABI)


def run_jailed(plan: JailPlan, cmd: list[str] | str, **kw) -> subprocess.CompletedProcess:
    """`cmd` (argv, or a shell script) run to completion inside the jail; output captured as text."""
    argv = ["sh", "-c", cmd] if isinstance(cmd, str) else cmd
    with jail_preexec(plan) as prepared:
        return subprocess.run(argv, preexec_fn=prepared, capture_output=True, text=True,
                              timeout=scaled(60), **kw)


def python_jailed(plan: JailPlan, code: str, **kw) -> subprocess.CompletedProcess:
    return run_jailed(plan, [sys.executable, "-c", code], **kw)


def make_tree(root: Path, files: int = TREE_FILES) -> Path:
    tree = root / "tree"
    for i in range(files):
        d = tree / f"d{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}").write_bytes(b"x")
    return tree


def count_files(tree: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(tree))


# Prints {label: errno name or "ok"} for each attempted operation.
TRY_OPS = """
import errno, json, os, sys
out = {}
def attempt(label, fn):
    try:
        fn()
        out[label] = "ok"
    except OSError as e:
        out[label] = errno.errorcode[e.errno]
"""


# ---------------------------------------------------------------- the plan


def test_abi_is_detected():
    support = jail.landlock_support()
    assert support.abi == ABI >= 1 and support.reason == ""


def test_plan_describes_the_default_policy(ws: Path):
    plan = default_plan(ws)
    assert plan.active and plan.abi == ABI
    by_path = {r.path: r for r in plan.rules}
    assert by_path[str(ws)].is_dir and "workspace" in by_path[str(ws)].why
    assert by_path["/tmp"].is_dir and by_path["/tmp"].access == plan.handled_fs
    # A file rule grants only file rights (the kernel refuses directory rights on a file).
    assert not by_path["/dev/null"].is_dir
    assert by_path["/dev/null"].access & ~jail.FILE_RIGHTS == 0
    assert by_path["/dev/null"].access & jail.FS["write_file"]
    # Reads, exec and device ioctls are not the jail's business.
    for right in ("read_file", "read_dir", "execute", "ioctl_dev"):
        assert not plan.handled_fs & jail.FS[right]
    assert not any(p == "/proc" or p.startswith("/proc/") for p in by_path)
    lines = plan.describe()
    assert lines[0] == f"jail: Landlock ABI {ABI}"
    assert any(str(ws) in line for line in lines) and any("/dev/null" in line for line in lines)
    assert any("/run/user/*/**" in line for line in lines)  # inexpressible: left to the guard
    assert any("/proc/self" in line for line in lines)
    assert plan.net_ports is None  # the default policy lets any TCP connect through
    if ABI >= 6:
        assert plan.scoped == jail.SCOPE_SIGNAL and any("signal" in line for line in lines)
    record = orjson.loads(orjson.dumps(plan.as_record()))
    assert record["abi"] == ABI and record["net_ports"] is None
    assert {"path": "/dev/null", "access": ["write_file", "truncate"] if ABI >= 3 else ["write_file"],
            "why": by_path["/dev/null"].why, "dir": False} in record["rules"]


def test_plan_for_a_missing_workspace_is_one_line_error(ws: Path):
    with pytest.raises(JailError) as info:
        default_plan(ws / "nope")
    assert "\n" not in str(info.value) and str(ws / "nope") in str(info.value)


def test_nothing_to_jail_is_said_and_refused(ws: Path):
    for plan in (plan_jail(replace(DEFAULT, mode=Mode.AUDIT), workspace=str(ws), homes=[], abi=ABI),
                 plan_jail(DEFAULT, workspace=str(ws), homes=[], abi=0)):
        assert not plan.active and plan.describe()[0] == "jail: none" and plan.notes
        with pytest.raises(JailError) as info:
            jail.apply_jail(plan)
        assert "\n" not in str(info.value)


def test_confirm_mode_does_not_jail_writes_a_human_may_allow(ws: Path):
    plan = plan_jail(replace(DEFAULT, mode=Mode.CONFIRM), workspace=str(ws), homes=[], abi=ABI)
    assert plan.handled_fs == 0 and any("filesystem: not restricted" in n for n in plan.notes)


def test_strict_policy_leaves_tcp_alone(ws: Path):
    strict = load_policy(REPO / "policies" / "strict.yaml", identities=False)
    plan = plan_jail(strict, workspace=str(ws), homes=[], abi=ABI)
    # loopback is SAFE on any port and unknown destinations are ASK: no port can be denied.
    assert plan.net_ports is None and any("TCP not restricted" in n for n in plan.notes)


# ---------------------------------------------------------------- harm outside does not happen


@pytest.mark.parametrize("how", ["rm -rf", "find -delete", "shutil.rmtree"])
def test_mass_delete_outside_the_workspace_deletes_nothing(ws: Path, outside: Path, how: str):
    tree = make_tree(outside)
    plan = default_plan(ws)
    if how == "rm -rf":
        result = run_jailed(plan, ["rm", "-rf", str(tree)])
    elif how == "find -delete":
        result = run_jailed(plan, ["find", str(tree), "-delete"])
    else:
        result = python_jailed(plan, f"import shutil; shutil.rmtree({str(tree)!r}, ignore_errors=True)")
    assert count_files(tree) == TREE_FILES  # the issue asks >= 990; the kernel refuses every one
    if how != "shutil.rmtree":
        assert result.returncode != 0 and "Permission denied" in result.stderr


@pytest.mark.parametrize("script", [
    "echo evil >> {config}",
    "mv {other} {config}",
    "truncate -s0 {config}",
    "ln -f {other} {config}",
    "cp {other} {config}",
    "sed -i s/keep/lost/ {config}",
])
def test_config_outside_stays_byte_identical_shell(ws: Path, outside: Path, script: str):
    config, other = outside / "CONFIG", outside / "other"
    config.write_bytes(CONFIG_BYTES)
    other.write_bytes(b"replacement\n")
    result = run_jailed(default_plan(ws), script.format(config=config, other=other))
    assert result.returncode != 0
    assert config.read_bytes() == CONFIG_BYTES
    assert sorted(p.name for p in outside.iterdir()) == ["CONFIG", "other"]


def test_config_outside_refused_with_eacces_or_exdev(ws: Path, outside: Path):
    config, other, mine = outside / "CONFIG", outside / "other", ws / "mine"
    config.write_bytes(CONFIG_BYTES)
    other.write_bytes(b"replacement\n")
    mine.write_bytes(b"from the workspace\n")
    code = TRY_OPS + f"""
c, o, m = {str(config)!r}, {str(other)!r}, {str(mine)!r}
attempt("os.truncate", lambda: os.truncate(c, 0))
attempt("open O_TRUNC", lambda: os.close(os.open(c, os.O_WRONLY | os.O_TRUNC)))
attempt("open O_APPEND", lambda: os.close(os.open(c, os.O_WRONLY | os.O_APPEND)))
attempt("os.rename same dir", lambda: os.rename(o, c))
attempt("os.rename from workspace", lambda: os.rename(m, c))
attempt("os.replace from workspace", lambda: os.replace(m, c))
attempt("os.unlink", lambda: os.unlink(c))
attempt("os.link same dir", lambda: os.link(o, c + ".new"))
attempt("os.link from workspace", lambda: os.link(m, c + ".new"))
attempt("os.symlink", lambda: os.symlink(o, c + ".lnk"))
attempt("os.mkdir", lambda: os.mkdir(c + ".d"))
print(json.dumps(out))
"""
    result = python_jailed(default_plan(ws), code)
    outcome = json.loads(result.stdout)
    cross_dir = {"os.rename from workspace", "os.replace from workspace", "os.link from workspace"}
    for label, err in outcome.items():
        allowed = {"EACCES", "EXDEV"} if label in cross_dir else {"EACCES"}
        assert err in allowed, (label, err)
    assert config.read_bytes() == CONFIG_BYTES and mine.exists()
    assert sorted(p.name for p in outside.iterdir()) == ["CONFIG", "other"]


# ---------------------------------------------------------------- work inside goes on


def test_workspace_work_goes_on(ws: Path):
    tmp_name = f"/tmp/ebpf-guard-jail-{os.getpid()}"
    script = f"""set -e
cd {ws}
echo one > a.txt; echo two >> a.txt
mkdir -p sub/deep && mv a.txt sub/deep/b.txt && ln -s sub/deep/b.txt link && ln sub/deep/b.txt hard
mkdir victim && for i in 1 2 3 4 5; do echo $i > victim/$i; done && rm -rf victim
echo hi | cat | tr a-z A-Z > piped.txt
echo noise 2>/dev/null >/dev/null; ls /nonexistent 2>/dev/null || true
truncate -s 1 sub/deep/b.txt
echo t > {tmp_name} && mv {tmp_name} {tmp_name}.2 && rm {tmp_name}.2
{sys.executable} -c 'open("/dev/null", "w").write("x"); open("/dev/stdout", "w").write("stdout ok\\n")'
git init -q repo && cd repo && echo code > main.py && git add main.py
git -c user.name=t -c user.email=t@t commit -q -m first && git log --oneline | wc -l
"""
    result = run_jailed(default_plan(ws), script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["stdout", "ok", "1"]
    assert (ws / "sub/deep/b.txt").read_bytes() == b"o"
    assert (ws / "link").is_symlink() and (ws / "hard").stat().st_nlink == 2
    assert not (ws / "victim").exists()
    assert (ws / "piped.txt").read_text() == "HI\n"
    assert (ws / "repo/.git").is_dir()
    assert not Path(tmp_name + ".2").exists()


def test_non_root_agent_is_jailed_too(ws: Path, outside: Path, agent_user: tuple[str, Path]):
    name, home = agent_user
    tree = make_tree(outside, files=50)
    for path in (ws, outside, tree, *tree.rglob("*")):
        shutil.chown(path, name, name)  # the user could delete it all without the jail
    plan = default_plan(ws, homes=[str(home)])
    result = run_jailed(plan, f"rm -rf {tree}; echo done > {ws}/mine; echo cached > {home}/.cache-probe",
                        user=name, group=name, cwd=ws)
    assert count_files(tree) == 50 and "Permission denied" in result.stderr
    assert (ws / "mine").read_text() == "done\n" and (ws / "mine").stat().st_uid != 0
    assert not (home / ".cache-probe").exists()  # the home itself is not harmless


# ---------------------------------------------------------------- network and signals


def test_tcp_connect_only_to_allowed_ports(tmp_path: Path, ws: Path):
    if ABI < 4:
        pytest.skip(f"Landlock ABI {ABI} has no TCP rules")
    allowed, denied = socket.socket(), socket.socket()
    try:
        for lst in (allowed, denied):
            lst.bind(("127.0.0.1", 0))
            lst.listen(8)
            lst.setblocking(False)
        ok_port, bad_port = allowed.getsockname()[1], denied.getsockname()[1]
        policy = load_policy(policy_extending(tmp_path, f"""
rules:
  - name: dev-server
    connect: {{port: [{ok_port}]}}
    verdict: SAFE
  - name: no-other-network
    connect: {{family: [ipv4, ipv6]}}
    verdict: KILL
"""), identities=False)
        plan = plan_jail(policy, workspace=str(ws), homes=[], abi=ABI)
        assert plan.net_ports == (ok_port,)
        assert any(f"TCP connect only to ports {ok_port}" in line for line in plan.describe())
        code = TRY_OPS + f"""
import socket
def dial(port):
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass
attempt("allowed", lambda: dial({ok_port}))
attempt("denied", lambda: dial({bad_port}))
print(json.dumps(out))
"""
        result = python_jailed(plan, code)
        assert json.loads(result.stdout) == {"allowed": "ok", "denied": "EACCES"}
        allowed.accept()[0].close()  # the allowed connection did arrive
        with pytest.raises(BlockingIOError):
            denied.accept()  # and the denied one never did
    finally:
        allowed.close()
        denied.close()


def test_signals_stay_inside_the_jail(ws: Path):
    if ABI < 6:
        pytest.skip(f"Landlock ABI {ABI} cannot scope signals")
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        code = TRY_OPS + f"""
import signal, subprocess
attempt("bystander", lambda: os.kill({bystander.pid}, signal.SIGKILL))
own = subprocess.Popen(["sleep", "60"])
attempt("own child", lambda: os.kill(own.pid, signal.SIGKILL))
own.wait()
print(json.dumps(out))
"""
        result = python_jailed(default_plan(ws), code)
        assert json.loads(result.stdout) == {"bystander": "EPERM", "own child": "ok"}
        assert bystander.poll() is None  # still alive
    finally:
        bystander.send_signal(signal.SIGKILL)
        bystander.wait(scaled(5))


# ---------------------------------------------------------------- never run unjailed


def test_a_failing_jail_never_runs_the_command(ws: Path):
    marker = ws / "ran"
    prepared = jail_preexec(default_plan(ws))
    try:
        os.close(prepared.ruleset_fd)
        prepared.ruleset_fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)  # not a ruleset
        with pytest.raises(subprocess.SubprocessError):
            subprocess.run(["touch", str(marker)], preexec_fn=prepared, timeout=scaled(30))
        message = prepared.failure()
        assert message is not None and "landlock_restrict_self" in message and "\n" not in message
    finally:
        prepared.close()
    assert not marker.exists()
