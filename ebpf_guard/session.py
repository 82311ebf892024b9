"""A watch/run session: everything `ebpf-guard watch` and `run` share, built once.

Policy (already loaded) → engine; verdict log with redaction; printer; recorder; actuator and
freezer; sensor attached and fed the kernel's exec rules; DNS for host rules; approvals desk;
the guard loop. `step()` is one turn of the loop; `finish()` drains; `report()` summarises.
"""

from __future__ import annotations

import ctypes
import os
import pwd
import signal
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ebpf_guard import host
from ebpf_guard.enforce import cgroups
from ebpf_guard.enforce.prevention import Prevention, gate_record
from ebpf_guard.policy import Policy
from ebpf_guard.policy.identities import local_homes
from ebpf_guard.runtime.watchdog import Watchdog, WatchdogError
from ebpf_guard.verdicts import Mode, Verdict

if TYPE_CHECKING:
    from ebpf_guard.enforce.jail import PreparedJail

INTERRUPT_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
HELD_OPEN_SETTLE_NS = 50_000_000  # a held open is judged once the sensor's events of its opener are in


class SessionError(Exception):
    """A session could not be set up; one line for the user."""


@lru_cache(maxsize=256)
def home_of(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_dir
    except KeyError:
        return None


@dataclass
class SessionOptions:
    policy_path: Path
    mode: str | None
    log_path: Path | None
    log_all: bool
    log_max_mb: float | None
    incidents_dir: Path | None
    record_path: Path | None
    json_out: bool
    output_path: Path | None
    quiet: bool
    workspace: str
    buffer_pages: str = "256"  # click.Choice gives text; a power of two 1..4096


@dataclass
class Interrupts:
    """Owns SIGINT, SIGTERM and SIGHUP for a `run` or `watch` session: counts them.

    During setup the first one raises KeyboardInterrupt (raising is how setup is undone); after
    `setup_done()` they are only counted and the loop ends at its next step; after `finishing()`
    they are ignored. So nothing is ever raised inside a bcc perf-buffer callback or during
    cleanup, however many arrive.
    """

    count: int = 0
    raising: bool = True

    def install(self) -> Interrupts:
        for sig in INTERRUPT_SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        self.count += 1
        if self.raising:
            self.raising = False  # once: undoing the setup must not be interrupted in turn
            raise KeyboardInterrupt

    def setup_done(self) -> None:
        self.raising = False
        if self.count:  # one arrived, but setup swallowed the KeyboardInterrupt: still obey it
            raise KeyboardInterrupt

    def finishing(self) -> bool:
        """The loop (or setup) is over: ignore further signals, so cleanup completes even when
        they arrive during interpreter exit (Python then resets its handlers to the default,
        which kills). True if one ended the loop."""
        for sig in INTERRUPT_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        return self.count > 0


class Session:
    """Everything `watch` and `run` share: policy, engine, sensor, log, actuator, guard, and the
    watchdog that fails closed if this process dies (given by the caller, to exit last)."""

    def __init__(self, opts: SessionOptions, stack: ExitStack, *, cgroup: Path | None,
                 policy: Policy, pids: tuple[int, ...] = (), prompt_tty: bool = False,
                 watchdog: Watchdog | None = None) -> None:
        from ebpf_guard.approvals import ApprovalDesk, ApprovalError
        from ebpf_guard.auditlog import DEFAULT_LOG, AuditLogError, VerdictLog
        from ebpf_guard.enforce.actuator import Actuator
        from ebpf_guard.guard import Guard
        from ebpf_guard.hosts import HostResolver
        from ebpf_guard.output import Printer
        from ebpf_guard.policy.engine import Engine
        from ebpf_guard.policy.identities import compile_identities
        from ebpf_guard.recording import Recorder
        from ebpf_guard.redact import Redactor
        from ebpf_guard.sensor import Sensor, SensorError

        # Protected inodes and listed programs for this session's workspace (load_policy
        # computed them for the policy's own): hard links and copies are judged by identity.
        self.workspace = opts.workspace
        self.policy = policy
        self.engine = Engine(policy, workspace=opts.workspace, home_of=home_of,
                             mode=Mode(opts.mode) if opts.mode else None,
                             identities=compile_identities(policy, workspace=opts.workspace))
        log_path = opts.log_path or Path(DEFAULT_LOG)
        try:
            redactor = Redactor(policy.redact)
        except ValueError as e:
            raise SessionError(f"{opts.policy_path}: redact: {e}") from None
        try:
            self.log = VerdictLog(log_path, redactor=redactor, max_bytes=int(opts.log_max_mb * 2**20)
                                  if opts.log_max_mb else None)
        except AuditLogError as e:
            raise SessionError(f"cannot open the verdict log: {e}") from None
        stack.callback(self.log.close)
        incidents_dir = opts.incidents_dir or log_path.parent / "incidents"
        try:  # now, not at the first incident: evidence that cannot be written is said up front
            incidents_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not os.access(incidents_dir, os.W_OK | os.X_OK):
                raise PermissionError(13, "not writable")
        except OSError as e:
            raise SessionError(f"cannot use --incidents {incidents_dir}: {e.strerror or e}") from None
        try:  # before anything is attached: an unwritable path is one line, not a traceback
            out_file = open(opts.output_path, "wb") if opts.output_path else None
        except OSError as e:
            raise SessionError(f"cannot write --output {opts.output_path}: {e.strerror or e}") from None
        self.printer = Printer(redactor=redactor, json=opts.json_out, file=out_file,
                               quiet=opts.quiet)
        stack.callback(self.printer.close)  # also says how often the last status line repeated
        recorder = None
        if opts.record_path:
            try:
                recorder = Recorder(opts.record_path, policy=opts.policy_path,
                                    workspace=opts.workspace, mode=self.engine.mode.value,
                                    redactor=redactor, warn=self.printer.message)
            except OSError as e:
                raise SessionError(f"cannot write --record {opts.record_path}: "
                                   f"{e.strerror or e}") from None
            stack.callback(recorder.close)
        self.recorder = recorder
        self.cgroup = cgroup
        freeze_note = None
        try:
            freezer = cgroups.freezer_for(cgroup, pids[0] if pids else None)
        except cgroups.CgroupError as e:
            if cgroup is not None:
                raise SessionError(str(e)) from None
            # --pid where no cgroup can be made (no v1 freezer, v2 without cgroup.freeze): nothing
            # to freeze the tree with. Say so now, not at HALT.
            freezer, freeze_note = None, (f"no freezer for --pid here ({e}): HALT and ASK will be "
                                          "logged but cannot freeze; watch a cgroup to enforce them")
        if isinstance(freezer, (cgroups.V1Freezer, cgroups.MovedTreeFreezer)):
            # Ours to clean up: `run` owns its processes (remove kills what is left); `watch`
            # gives the watched ones back untouched.
            stack.callback(freezer.remove if prompt_tty else freezer.release)
        session_name = f"{'run' if prompt_tty else 'watch'}-{os.getpid()}"
        # Started now so that its start-up overlaps the attach; armed at the end of setup.
        self.watchdog = watchdog if watchdog is not None else stack.enter_context(Watchdog())
        # Audit mode enforces nothing, not even then: the watchdog only logs the guard's death.
        self.on_guard_exit = "none" if self.engine.mode is Mode.AUDIT else policy.on_guard_exit
        # A lost event is a syscall nobody judged: in enforce mode the agent is frozen.
        self.on_loss = policy.on_loss if self.engine.mode is Mode.ENFORCE else "ignore"
        self._lost_seen = 0
        self._held_denials: list[tuple[int, Any]] = []  # (when seen, held open) not judged yet
        try:
            self.watchdog.start(action=self.on_guard_exit, log=log_path, freezer=freezer,
                                cgroup=cgroup, session=session_name)
        except WatchdogError as e:
            raise SessionError(str(e)) from None
        self.actuator = Actuator(cgroup, freezer=freezer, mode=self.engine.mode)
        self.sensor = Sensor(cgroups=[cgroup] if cgroup else [], pids=pids,
                             page_cnt=int(opts.buffer_pages))
        t0 = time.monotonic()
        try:
            # Say what was done to the host, never silently: tracefs mounted, headers fallback.
            notes = [host.ensure_tracefs()]
            headers = host.headers_status()
            if headers.state != "matching":
                notes.append(f"kernel headers: {headers.state}: {headers.detail}")
            self.sensor.start()
            if self.sensor.layouts is None:
                # Loud on every start and in the start record: the guard then judges strings.
                notes.append(f"NO KERNEL IDENTITIES: {self.sensor.btf_error}; events carry only "
                             "the names processes pass (a symlink, hard link or renamed tool is "
                             "judged by its name)")
            names, paths = self.engine.kernel_exec_kills()
            kill_inodes, hold_inodes = self.engine.kernel_exec_inodes()
            for entry in self.sensor.set_exec_rules(kill_names=names, kill_paths=paths,
                                                    hold_names=self.engine.kernel_exec_gates(),
                                                    kill_inodes=kill_inodes,
                                                    hold_inodes=hold_inodes):
                notes.append(f"exec rule {entry!r} cannot be matched in the kernel; "
                             "it is decided after the exec starts")
            notes.extend(self._set_rate_rules())
        except (SensorError, host.HostError) as e:
            raise SessionError(str(e)) from None
        self.attach_s = time.monotonic() - t0
        self.resolver = HostResolver(self.engine.hostnames())
        self._hosts: dict[str, list[str]] = {}
        if self.resolver.names:
            # Resolve once before the agent starts so connect rules hold from the first event.
            self._apply_hosts(self.resolver.resolve_once())
            self.resolver.start()
            stack.callback(self.resolver.stop)
        # After the sensor (a refused syscall must still be seen and judged) and the first host
        # answers (egress allows by name from the start).
        self.prevention = Prevention.start(policy, mode=self.engine.mode, cgroup=cgroup,
                                           workspace=opts.workspace, hosts=self._hosts, sensor=self.sensor)
        stack.callback(self.prevention.close)
        notes.extend(self.prevention.lines)
        try:
            # The channel for ASK answers from `ebpf-guard approve|deny` (root-only unix socket);
            # `run` on a terminal also takes y/n/a/b keys inline.
            desk = ApprovalDesk(session=session_name,
                                tty=sys.stdin if prompt_tty and sys.stdin.isatty() else None)
        except ApprovalError as e:
            raise SessionError(f"cannot open the approvals socket: {e}") from None
        stack.callback(desk.close)
        self.guard = Guard(desk=desk, prevention=self.prevention, engine=self.engine, actuator=self.actuator,
                           log=self.log, printer=self.printer,
                           cgroup=cgroup, home_of=home_of, recorder=recorder, log_all=opts.log_all,
                           incidents_dir=incidents_dir)
        try:
            notes.append(self.watchdog.arm())  # before the start record: a started session is guarded
        except WatchdogError as e:
            raise SessionError(str(e)) from None
        for note in filter(None, [*notes, freeze_note]):
            self.printer.message(note)
        self.log_path = log_path
        self.guard.note({"type": "session", "event": "start", "policy": str(opts.policy_path),
                         "mode": self.engine.mode.value, "workspace": opts.workspace,
                         "cgroup": str(cgroup) if cgroup else None, "pids": list(pids),
                         "freezer": str(freezer.path) if freezer else None,
                         "watchdog": self.watchdog.proc.pid if self.watchdog.proc else None,
                         "on_guard_exit": self.on_guard_exit,
                         "identity": "kernel" if self.sensor.layouts else "strings",
                         "on_loss": self.on_loss,
                         "prevention": self.prevention.record,
                         "attach_ms": round(self.attach_s * 1000, 1)})
        # Last: "attached" means the loop can start now.
        self.printer.message(
            f"attached in {self.attach_s * 1000:.0f} ms; policy {opts.policy_path} "
            f"({self.engine.mode.value} mode); verdict log {log_path}"
        )

    def _set_rate_rules(self) -> list[str]:
        """The kernel's first response to mass deletes (the engine's unlink rate rule): the
        deleter is held at the threshold, before its next deletion, until the guard decides."""
        count, window_ns, dirs = self.engine.kernel_unlink_rate(local_homes())
        scratch = []
        for d in dirs:
            try:
                st = os.stat(d)
            except OSError:
                continue  # not there: nothing beneath it to exempt
            scratch.append((st.st_dev, st.st_ino))
        notes = self.sensor.set_rate_rules(count, window_ns, scratch)
        if count:
            notes.insert(0, f"deletions: the kernel holds a deleter at {count} within {window_ns / 1e9:g}s "
                            f"({len(scratch)} scratch directories exempt)")
        return notes

    def _apply_hosts(self, mapping: dict[str, list[str]]) -> None:
        self._hosts = mapping
        self.engine.set_host_addresses(mapping)
        prevention = getattr(self, "prevention", None)  # None while the first answers are applied
        if prevention is not None:
            prevention.hosts_changed(mapping)
        if self.recorder is not None:
            self.recorder.write_hosts(mapping)

    def step(self, timeout_ms: int = 1) -> int:
        mapping = self.resolver.take()
        if mapping is not None:
            self._apply_hosts(mapping)
        events = self.sensor.poll(timeout_ms)
        for event in events:
            self.guard.handle(event)
        now = time.monotonic_ns()
        for denial in self.prevention.denials():
            self.guard.note(gate_record(denial))
            if denial.held:
                # The opener waits for us, and the gate outruns the sensor: the fork and exec
                # events that say who opens it (ssh under git) are still in the sensor's buffers.
                self._held_denials.append((now, denial))
            else:
                self.guard.handle(self.prevention.gate_event(denial))  # judged: the verdict applies
        while self._held_denials and now - self._held_denials[0][0] >= HELD_OPEN_SETTLE_NS:
            self.guard.handle(self.prevention.gate_event(self._held_denials.pop(0)[1]))
        lost = self.sensor.stats.lost
        if lost > self._lost_seen:
            self.guard.events_lost(lost - self._lost_seen, lost, freeze=self.on_loss == "freeze")
            self._lost_seen = lost
        self.guard.tick()
        return len(events)

    def finish(self) -> None:
        for event in self.sensor.close():
            self.guard.handle(event)
        for _, denial in self._held_denials:  # judged and logged, not dropped, at the end too
            self.guard.handle(self.prevention.gate_event(denial))
        self._held_denials.clear()
        self.guard.close()

    def report(self, headline: str) -> None:
        s, stats = self.guard.summary, self.sensor.stats
        self.guard.note({"type": "session", "event": "end", "summary": headline,
                         "counts": {v.value: s.counts.get(v, 0) for v in Verdict},
                         "events": s.events, "lost": stats.lost, "actions": s.actions})
        # Said after the end record was tried: it may be one of the records lost.
        unwritten = self.log.unwritten_total
        counts = ", ".join(f"{s.counts.get(v, 0)} {v.value}" for v in Verdict)
        done = "; ".join(s.actions) if s.actions else "nothing was done"
        lost = (f"{stats.lost} events LOST (urgent {stats.lost_urgent}, bulk {stats.lost_bulk})"
                if stats.lost else "no events lost")
        text = (f"{headline} {s.events} events: {counts}. "
                + (f"{unwritten} records could NOT be written to the verdict log. " if unwritten
                   else "")
                + f"Actions: {done}. {lost}. Verdict log: {self.log_path}.")
        if s.incidents:
            text += f" Incidents: {', '.join(s.incidents)}."
        self.printer.message(text)


def set_child_subreaper() -> None:
    # Orphaned grandchildren are re-parented to us, not to init, so `run` can reap them and
    # the cgroup empties (and we exit) when the whole tree is gone.
    PR_SET_CHILD_SUBREAPER = 36
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def reap(child: subprocess.Popen) -> None:
    """Reap every exited child; keeps `child.returncode` for the command itself."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        if pid == child.pid:
            child.returncode = os.waitstatus_to_exitcode(status)


def prepare_jail(session: Session, policy: Policy, *, enabled: bool) -> PreparedJail | None:
    """The Landlock jail for `run`'s command, built from the policy (in the mode this session
    enforces), said on the terminal and in the log; None when it restricts nothing.

    Built here, in the guard, so that a path that cannot be opened is one line before the
    command starts; the child only applies it (spawn_when_watched)."""
    from ebpf_guard.enforce.jail import JailError, jail_preexec, landlock_support, plan_jail

    if not enabled:
        session.printer.message("jail: off (--no-jail): writes outside the workspace are only contained")
        session.guard.note({"type": "session", "event": "jail", "jail": None, "why": "--no-jail"})
        return None
    support = landlock_support()
    home = home_of(os.geteuid())
    try:
        plan = plan_jail(replace(policy, mode=session.engine.mode), workspace=session.workspace,
                         homes=[home] if home else [], abi=support.abi)
    except JailError as e:
        raise SessionError(str(e)) from None
    lines = plan.describe()
    if not support.abi:
        lines.append(f"jail: Landlock unavailable: {support.reason}")
    for line in lines:
        session.printer.message(line)
    session.guard.note({"type": "session", "event": "jail", "jail": plan.as_record()})
    if not plan.active:
        return None
    try:
        return jail_preexec(plan)
    except JailError as e:
        raise SessionError(str(e)) from None


def spawn_when_watched(command: list[str], cgroup: Path, session: Session,
                       jail: PreparedJail | None = None) -> subprocess.Popen:
    """Start COMMAND inside `cgroup`, and let it exec only once the policy loop is polling.

    The child joins the cgroup between fork and exec, so it never runs unwatched; it then
    waits for one byte on a pipe, which is written after the loop's first poll, so that the
    first instructions of the command already meet a guard that is listening (a `rm -rf` that
    starts deleting 1 ms after exec must not outrun the loop's start-up). Popen blocks until
    the exec, hence the thread.
    """
    go_read, go_write = os.pipe()
    procs_file = str(cgroup / "cgroup.procs")
    freezer = session.actuator.freezer

    def join_cgroup_and_wait() -> None:
        with open(procs_file, "w") as f:
            f.write(str(os.getpid()))
        if freezer.path != cgroup:  # a v1 freezer (hosts where v2 cannot freeze) joins too
            freezer.adopt(os.getpid())
        os.close(go_write)
        if os.read(go_read, 1) != b"g":
            os._exit(126)  # the guard went away before watching: never run unwatched
        if jail is not None:
            jail()  # last: joining the cgroup and the v1 freezer are writes outside any workspace

    result: dict = {}

    def spawn() -> None:
        try:
            result["child"] = subprocess.Popen(command, preexec_fn=join_cgroup_and_wait)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            result["error"] = e

    thread = threading.Thread(target=spawn, name="ebpf-guard-spawn")
    thread.start()
    try:
        session.step(0)
        os.write(go_write, b"g")
        while thread.is_alive():
            session.step(1)
            thread.join(0)
    finally:
        os.close(go_write)
        os.close(go_read)
        thread.join()
    if "error" in result:
        failure = jail.failure() if jail is not None else None
        if failure:
            raise SessionError(f"cannot jail {command[0]}: {failure}")
        raise result["error"]
    return result["child"]
