"""Helpers for end-to-end tests that drive the real `ebpf-guard` command."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import orjson

from ebpf_guard.enforce import cgroups

# One factor for every wait in the suite: 1 on real hardware; the VM harness (vagrant/qemu.sh)
# sets it for emulated guests, where everything, the bcc compile above all, runs ~10x slower.
# Every timeout a test waits on goes through `scaled`; the helpers below scale their own.
SLOWDOWN = max(1.0, float(os.environ.get("EBPF_GUARD_SLOWDOWN") or 1))


def scaled(seconds: float) -> float:
    """A wait sized for this host, stretched for slow (emulated) ones."""
    return seconds * SLOWDOWN


WRITER = "while :; do echo x >> {f}; done"  # a shell loop that shows whether it still runs
GUARD = [sys.executable, "-m", "ebpf_guard.cli"]
REPO = Path(__file__).resolve().parent.parent


def guard(*args: str, timeout: float = 60, nobody: bool = False, **kw) -> subprocess.CompletedProcess:
    """Run `ebpf-guard ARGS` to completion (as uid 65534 with nobody=True), capturing text output."""
    cmd = as_nobody([*GUARD, *args]) if nobody else [*GUARD, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=scaled(timeout), cwd=kw.pop("cwd", REPO),
                          **kw)


def records(log: Path, type_: str = "verdict") -> list[dict]:
    if not log.exists():
        return []
    out = [orjson.loads(line) for line in log.read_bytes().splitlines() if line.strip()]
    return [r for r in out if r.get("type") == type_]


def children_of(parent: Path) -> list[Path]:
    return [p for p in parent.iterdir() if p.is_dir()]


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.01):
    timeout = scaled(timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {predicate}")


def cgroup_leftovers(root: Path, prefix: str) -> list[Path]:
    return [p for p in root.iterdir() if p.is_dir() and p.name.startswith(prefix)]


NOBODY = 65534


def as_nobody(cmd: list[str]) -> list[str]:
    """`cmd` run as uid/gid 65534, not root in any way that matters here (no write access, no
    BPF, SO_PEERCRED says 65534), but allowed to read and traverse (CAP_DAC_READ_SEARCH): the
    checkout may sit under a 0700 directory (CI, mktemp -d), and the code must still load."""
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
            "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search", "--", *cmd]


class GuardRun:
    """`ebpf-guard run` in the background under a test-owned parent cgroup."""

    def __init__(self, parent: Path, log: Path, cmd: list[str], *, policy: Path | None = None,
                 mode: str | None = None, workspace: Path | None = None, extra: tuple[str, ...] = (),
                 env: dict | None = None) -> None:
        args = [*GUARD, "run", "--cgroup-parent", str(parent), "--log", str(log), "--quiet"]
        if policy is not None:
            args += ["--policy", str(policy)]
        if mode is not None:
            args += ["--mode", mode]
        if workspace is not None:
            args += ["--workspace", str(workspace)]
        self.parent, self.log = parent, log
        self.proc = subprocess.Popen([*args, *extra, "--", *cmd], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)

    def cgroup(self, timeout: float = 30) -> Path:
        return wait_for(lambda: children_of(self.parent), timeout=timeout)[0]

    def wait(self, timeout: float = 60) -> int:
        try:
            self.out, self.err = self.proc.communicate(timeout=scaled(timeout))
        except subprocess.TimeoutExpired as timeout_error:
            # Kill the agent first (it holds our pipes), then let the guard clean up.
            for child in children_of(self.parent):
                cgroups.kill_cgroup(child)
            self.proc.terminate()
            self.out, self.err = self.proc.communicate(timeout=scaled(30))
            raise AssertionError(f"ebpf-guard run did not finish in {timeout}s: {self.err}") from timeout_error
        return self.proc.returncode

    def verdicts(self) -> list[dict]:
        return records(self.log)

    def close(self) -> None:
        if self.proc.poll() is None:
            for child in children_of(self.parent):
                subprocess.run([*GUARD, "kill", "--cgroup", str(child)], capture_output=True)
            try:
                self.proc.wait(timeout=scaled(20))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> GuardRun:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def eventually(cond, timeout: float = 3.0) -> bool:
    """Does `cond()` become true within `timeout` seconds (scaled)?"""
    deadline = time.monotonic() + scaled(timeout)
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def grows(path: Path, window: float = 0.15) -> bool:
    """Does the file get bigger within `window` seconds? (is the writer still running?)"""
    before = path.stat().st_size
    return eventually(lambda: path.stat().st_size > before, window)


def policy_extending(directory: Path, body: str) -> Path:
    """A policy file that extends the bundled default with `body` (YAML: rules, lists, mode...)."""
    path = directory / "policy.yaml"
    path.write_text(f"version: 1\nextends: {REPO / 'policies' / 'default.yaml'}\n{body}")
    return path


@contextmanager
def throwaway_user() -> Iterator[tuple[str, Path]]:
    """A new user with its own home under /home, removed afterwards: (name, home)."""
    name = f"ebpfg{uuid.uuid4().hex[:6]}"
    home = Path("/home") / name
    subprocess.run(["useradd", "--create-home", "--home-dir", str(home), "--shell", "/bin/sh", name],
                   check=True, capture_output=True)
    try:
        yield name, home
    finally:
        subprocess.run(["userdel", "--remove", name], capture_output=True)
        shutil.rmtree(home, ignore_errors=True)
