"""Fail closed on guard death: a tiny supervisor process that outlives the guard.

`run` and `watch` start it (`python -m ebpf_guard.runtime.watchdog`) once the freezer is known.
It holds none of the guard's fds (BPF programs, perf buffers, the log's flock) but one: a memfd
on which the guard holds a POSIX write lock. It ignores SIGINT/SIGTERM/SIGHUP, sets its
oom_score_adj to -1000, checks that it is outside the agent's group, and blocks on that lock.
The guard writes "arm" into the memfd once the session is set up, and "done" after its own
cleanup, then lets go. Getting the lock with "arm" but not "done" written means the guard died
(SIGKILL, OOM kill, crash): nothing watches the agent any more, so the watchdog freezes or kills
it (policy key `on_guard_exit`), appends one `guard_exit` record to the verdict log, and exits.

Why a lock, not a pipe's EOF or a pidfd: the kernel drops a dead process's POSIX locks while it
closes the fd table, but releases the files only afterwards, newest first, and detaching each
BPF program waits for an RCU grace period. Measured here after a SIGKILL of an attached sensor:
the lock was free after 11 ms, a pipe's EOF and the pidfd came after 1.9 s. The log's flock
also goes only then, so the record is written once the pidfd says the guard is fully gone.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ebpf_guard.auditlog import AuditLogError, VerdictLog
from ebpf_guard.enforce import cgroups

READY_TIMEOUT_S = 30.0  # interpreter start and imports (slow on emulated hosts); overlaps the attach
STOP_TIMEOUT_S = 2.0
TEARDOWN_TIMEOUT_S = 30.0  # for the dead guard's files (the log's flock) to be released
FREEZE_CONFIRM_S = 0.5
FALLBACK_DIR = Path("/run/ebpf-guard")
_IMPORT_ROOT = Path(__file__).resolve().parents[2]  # -m finds the very code the guard runs


class WatchdogError(Exception):
    """The watchdog could not be started; the session must not start unguarded."""


@dataclass
class Watchdog:
    """The guard's side: owns the watchdog process and the locked memfd it waits on.

    Entered first on the session's ExitStack, so it exits last, after every other cleanup. An
    exit that is clean (no exception, or one of `clean`: interrupts, user errors) says "done";
    any other exception is a crash, so it lets go without "done" and the watchdog acts.
    """

    clean: tuple[type[BaseException], ...] = (SystemExit, KeyboardInterrupt)
    proc: subprocess.Popen | None = None
    _lock: int = -1
    _ready: int = -1

    def start(self, *, action: str, log: Path, freezer: cgroups.Freezer | None,
              cgroup: Path | None, session: str) -> None:
        # Absolute: the watchdog runs in another directory (a relative --log means ours).
        cmd = [sys.executable, "-m", __name__, "--guard-pid", str(os.getpid()), "--action", action,
               "--log", str(log.absolute()), "--session", session]
        if freezer is not None:
            kind = "v1" if isinstance(freezer, cgroups.V1Freezer) else "v2"
            cmd += ["--freezer", str(freezer.path), "--freezer-kind", kind]
        if cgroup is not None:
            cmd += ["--cgroup", str(cgroup)]
        # Both fds are close-on-exec: the agent never holds them. The lock is this process's
        # (locks are not inherited), held until it lets go or its fd table is torn down.
        self._lock = os.memfd_create("ebpf-guard-watchdog")
        fcntl.lockf(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._ready, w = os.pipe()
        try:
            self.proc = subprocess.Popen(cmd, stdin=self._lock, stdout=w, close_fds=True,
                                         start_new_session=True, cwd=_IMPORT_ROOT)
        except OSError as e:
            raise WatchdogError(f"cannot start the watchdog: {e.strerror}") from e
        finally:
            os.close(w)

    def arm(self, timeout: float = READY_TIMEOUT_S) -> str:
        """Wait for its "ready", then arm it: from now on the guard's death is acted on.
        Returns what it noted on the way ("" or one line for the user)."""
        line, deadline = b"", time.monotonic() + timeout
        while not line.endswith(b"\n"):
            if not select.select([self._ready], [], [], max(0.0, deadline - time.monotonic()))[0]:
                break
            chunk = os.read(self._ready, 512)
            if not chunk:
                break
            line += chunk
        text = line.decode(errors="replace").strip() or f"no answer within {timeout:g}s"
        if text.partition(":")[0] != "ready":
            raise WatchdogError(f"the watchdog did not start: {text}")
        os.pwrite(self._lock, b"arm ", 0)
        return text.partition(":")[2].strip()

    def stop(self, clean: bool = True) -> None:
        """Say "done" and wait for it to exit; or, after a crash, just let go (it then acts)."""
        if self._ready >= 0:
            os.close(self._ready)
            self._ready = -1
        if self._lock >= 0:
            if clean:
                os.pwrite(self._lock, b"done", 0)
            os.close(self._lock)  # lets go of the lock: the watchdog wakes and reads what we said
            self._lock = -1
        if clean and self.proc is not None:
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # it must not outlive a clean session
                self.proc.wait()

    def __enter__(self) -> Watchdog:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self.stop(clean=exc_type is None or issubclass(exc_type, self.clean))


# ------------------------------------------------------------------------- the watchdog process
def _prepare(args: argparse.Namespace) -> tuple[int, str]:
    """What must hold before the guard relies on us: (a pidfd of the guard, a note or "")."""
    note = ""
    try:
        Path("/proc/self/oom_score_adj").write_text("-1000\n")  # the OOM kill that took the guard
    except OSError as e:  # needs CAP_SYS_RESOURCE, which some containers drop: say so, go on
        note = f"watchdog: cannot set its oom_score_adj to -1000 ({e.strerror}); the OOM killer may take it"
    for group in filter(None, (args.cgroup, args.freezer)):
        if os.getpid() in cgroups.pids(group):
            raise cgroups.CgroupError(f"the watchdog is inside {group}: it would freeze itself")
    pidfd = os.pidfd_open(args.guard_pid)
    try:
        fcntl.lockf(0, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        if os.getppid() == args.guard_pid:  # only our parent is surely the guard (no pid reuse)
            return pidfd, note  # and it holds the lock, as it must
    raise ProcessLookupError(f"the guard (pid {args.guard_pid}) is gone already")


def _guard_died() -> bool:
    """Block until the guard lets go of the lock; True if it died armed, without "done"."""
    fcntl.lockf(0, fcntl.LOCK_EX)
    return os.pread(0, 4, 0) == b"arm "


def _act(args: argparse.Namespace) -> tuple[str, str]:
    """Freeze or kill the agent's group(s) with cgroups' helpers: (what was done, how to recover)."""
    groups: list[cgroups.Freezer] = []
    if args.freezer is not None:
        groups.append(cgroups.V1Freezer(args.freezer) if args.freezer_kind == "v1"
                      else cgroups.V2Freezer(args.freezer))
    if args.cgroup is not None and args.cgroup != args.freezer:
        groups.append(cgroups.V2Freezer(args.cgroup))  # kill only: it cannot freeze, or has a v1 twin
    groups = [g for g in groups if g.path.exists()]
    if args.action == "none":
        return "nothing (audit mode): the agent runs on, unwatched", ""
    if args.action == "freeze" and args.freezer is None:
        return "cannot freeze: no freezer was set up; the agent runs on, unwatched", ""
    if not groups or (args.action == "freeze" and groups[0].path != args.freezer):
        return f"nothing: {args.freezer or args.cgroup} is gone", ""
    path = groups[0].path
    try:
        if args.action == "freeze":
            groups[0].freeze()
            done = (f"froze {path}" if groups[0].wait_frozen(FREEZE_CONFIRM_S)
                    else f"freeze of {path} requested, not complete after {FREEZE_CONFIRM_S:g}s")
            return done, f"ebpf-guard resume --cgroup {path} (thaw) or ebpf-guard kill --cgroup {path}"
        n, removed = sum(len(g.pids()) for g in groups), []
        for g in groups:
            # As `ebpf-guard kill` does: what ebpf-guard created goes; a watched cgroup stays.
            if cgroups.marked_role(g.path) == cgroups.ROLE_CREATED:
                g.remove()
                removed.append(str(g.path))
            else:
                g.kill()
        return (f"killed {n} processes in {', '.join(str(g.path) for g in groups)}"
                + (f"; removed {', '.join(removed)}" if removed else "")), "nothing to recover: all killed"
    except (cgroups.CgroupError, OSError) as e:
        return f"FAILED to {args.action} {path}: {e}", f"ebpf-guard kill --cgroup {path}"


def _append(log: Path, record: dict) -> str | None:
    """Append `record` to the verdict log; None once written, else why it could not be."""
    problem = ""
    for repair in (False, True):  # e.g. a line torn by the SIGKILL: go on in a new, marked segment
        try:
            with VerdictLog(log, repair=repair) as vlog:
                vlog.append(record)
            return None
        except (AuditLogError, OSError) as e:
            problem = str(e)
    return problem


def main(argv: list[str] | None = None) -> int:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # only the guard's end decides when we go
    p = argparse.ArgumentParser(prog="ebpf-guard-watchdog")
    p.add_argument("--guard-pid", type=int, required=True)
    p.add_argument("--action", choices=("freeze", "kill", "none"), required=True)
    p.add_argument("--log", type=Path, required=True)
    p.add_argument("--session", default="")
    p.add_argument("--freezer", type=Path)
    p.add_argument("--freezer-kind", choices=("v1", "v2"), default="v2")
    p.add_argument("--cgroup", type=Path)
    args = p.parse_args(argv)
    try:
        pidfd, note = _prepare(args)
        answer = f"ready: {note}"
    except (OSError, cgroups.CgroupError) as e:
        pidfd, answer = -1, str(e)
    try:
        os.write(1, answer.encode() + b"\n")
    except OSError:
        pass  # the guard stopped listening: its setup failed meanwhile
    if pidfd < 0:
        return 1
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)  # the guard reads one line, then closes its end
    os.close(null)
    if not _guard_died():
        return 0
    done, recover = _act(args)
    select.select([pidfd], [], [], TEARDOWN_TIMEOUT_S)  # readable once the guard's flock is gone too
    record = {"type": "guard_exit", "guard_pid": args.guard_pid, "session": args.session,
              "on_guard_exit": args.action, "group": str(args.freezer or args.cgroup or "") or None,
              "action": done, "recover": recover}
    problem = _append(args.log, record)
    text = (f"ebpf-guard: watchdog: the guard (pid {args.guard_pid}) died without ending its session; "
            f"{done}" + (f"; recover: {recover}" if recover else ""))
    if problem is not None:
        text += f" (not in the verdict log {args.log}: {problem})"
        try:
            FALLBACK_DIR.mkdir(parents=True, exist_ok=True)
            (FALLBACK_DIR / f"guard-exit-{args.guard_pid}.txt").write_text(text + "\n")
        except OSError:
            pass  # stderr below is all that is left
    try:
        print(text, file=sys.stderr, flush=True)
    except OSError:
        pass  # no one is reading the guard's stderr anymore
    return 0


if __name__ == "__main__":
    sys.exit(main())
