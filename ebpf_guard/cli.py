"""The `ebpf-guard` command line. Every user-facing error is one line, never a traceback."""

from __future__ import annotations

import math
import os
import signal
import sys
from contextlib import ExitStack
from pathlib import Path

import click

from ebpf_guard import host
from ebpf_guard.enforce import cgroups
from ebpf_guard.files import open_regular
from ebpf_guard.paths import DEFAULT_POLICY
from ebpf_guard.runtime.watchdog import Watchdog
from ebpf_guard.session import (
    Interrupts,
    Session,
    SessionError,
    SessionOptions,
    prepare_jail,
    reap,
    set_child_subreaper,
    spawn_when_watched,
)
from ebpf_guard.verdicts import Mode, Verdict

# Exit statuses: one table for every command (README "Exit status", and each command's --help).
# `run` otherwise exits with the command's own status, or 128+N when it died of signal N.
EXIT_OK = 0
EXIT_ERROR = 1  # ebpf-guard could not do its job: not root, no bcc, I/O error, setup failed
EXIT_USAGE = 2  # bad command line or invalid policy
EXIT_REFUSED = 3  # refused for safety: a cgroup ebpf-guard must not touch (or not without --force)
EXIT_DAMAGED = 4  # verify / report / replay: the evidence is broken, unreadable or torn
EXIT_HALTED = 120  # run / watch: a HALT or ASK froze the agent at least once
EXIT_KILLED = 121  # run / watch: a KILL verdict killed (part of) the agent
EXIT_INTERRUPTED = 122  # run / watch: ended by SIGINT, SIGTERM or SIGHUP (120 and 121 take precedence)

DEFAULT_INCIDENTS = Path("/var/log/ebpf-guard/incidents")


class UserError(click.ClickException):
    """One line to stderr, exit 1."""

    exit_code = EXIT_ERROR

    def show(self, file=None) -> None:
        click.echo(f"ebpf-guard: error: {self.message}", err=True)


def _load_policy(path: Path):
    from ebpf_guard.policy import PolicyError, load_policy

    try:
        return load_policy(path)  # unreadable, binary, huge, ...: all PolicyError (file:line)
    except PolicyError as e:
        click.echo(str(e), err=True)
        raise SystemExit(EXIT_USAGE) from None


def _need_root_and_bcc() -> None:
    try:
        host.require_root()
        host.import_bcc()
    except host.HostError as e:
        raise UserError(str(e)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ebpf-guard")
def main() -> None:
    """Watch AI agents from the kernel and stop them when they cross a line."""
    # File names are bytes: one that is not UTF-8 is printed as the bytes it is, never a
    # UnicodeEncodeError traceback on a UTF-8 terminal.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="surrogateescape")


class PositiveNumber(click.ParamType):
    """A finite number above 0 (and at least `minimum`): nan, inf, 0 and negatives are usage
    errors, not a report window of nothing or a log that rotates on every record."""

    name = "number"

    def __init__(self, minimum: float = 0.0) -> None:
        self.minimum = minimum

    def convert(self, value, param, ctx) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number) or number <= 0 or number < self.minimum:
            least = f"of at least {self.minimum:g}" if self.minimum > 0 else "above 0"
            self.fail(f"{value!r}: must be a finite number {least}", param, ctx)
        return number


# ----------------------------------------------------------------------------- watch / run
def _session_options(f):
    opts = [
        # readable=False: _load_policy reports an unreadable policy itself, after the root check.
        click.option("--policy", "policy_path", type=click.Path(path_type=Path, readable=False),
                     default=DEFAULT_POLICY,
                     show_default=True, help="Policy file."),
        click.option("--mode", type=click.Choice([m.value for m in Mode]), default=None,
                     help="Override the policy's mode."),
        click.option("--log", "log_path", type=click.Path(path_type=Path), default=None,
                     help="Verdict log (JSON lines). [default: /var/log/ebpf-guard/verdicts.jsonl]"),
        click.option("--log-all", is_flag=True, help="Log SAFE events too."),
        click.option("--log-max-mb", type=PositiveNumber(minimum=0.001), default=None,
                     help="Rotate the verdict log at this size, at least 0.001 (the hash chain "
                          "continues across files)."),
        click.option("--incidents", "incidents_dir", type=click.Path(path_type=Path), default=None,
                     help="Directory for incident files. [default: beside the log]"),
        click.option("--record", "record_path", type=click.Path(path_type=Path, dir_okay=False),
                     default=None, help="Save the raw event stream for `ebpf-guard replay`."),
        click.option("--json", "json_out", is_flag=True, help="JSON lines on stdout."),
        click.option("--output", "output_path", type=click.Path(path_type=Path, dir_okay=False),
                     default=None, help="Also write JSON lines to FILE."),
        click.option("--quiet", is_flag=True, help="Print only verdicts other than SAFE and status."),
        click.option("--buffer-pages", type=click.Choice([str(1 << i) for i in range(0, 13)]),
                     default="256", show_default=True,
                     help="Pages per CPU of the bulk event buffer (open, unlink, connect...). "
                          "Smaller loses events sooner under load; see the policy's on_loss."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _start_session(opts: SessionOptions, stack: ExitStack, interrupts: Interrupts, **kw) -> Session:
    """The session, set up; an interrupt meanwhile undoes the setup and exits EXIT_INTERRUPTED."""
    try:
        policy = _load_policy(opts.policy_path)
        session = Session(opts, stack, policy=policy, **kw)
        interrupts.setup_done()  # from here on signals only end the loop, at its next step
        return session
    except SessionError as e:
        raise UserError(str(e)) from None
    except KeyboardInterrupt:
        interrupts.finishing()
        stack.close()  # undo what setup did (cgroup, freezer, socket, watchdog) before saying so
        click.echo("ebpf-guard: interrupted during setup", err=True)
        sys.exit(EXIT_INTERRUPTED)


def _signals_raise() -> Interrupts:
    """SIGINT/SIGTERM/SIGHUP: raise KeyboardInterrupt during setup only (to undo it); after
    that they are counted and end the loop at its next step (see session.Interrupts)."""
    return Interrupts().install()


@main.command()
@click.option("--cgroup", "cgroup_spec", default=None,
              help="cgroup v2 path (/sys/fs/cgroup/...) or as /proc/PID/cgroup prints it.")
@click.option("--pid", "pid", type=int, default=None, help="Follow this process and its descendants.")
@click.option("--workspace", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="The agent's workspace ({workspace} in policies). [default: current directory]")
@_session_options
def watch(cgroup_spec, pid, workspace, **kw) -> None:
    """Watch an existing cgroup or process tree until Ctrl-C or until it is empty.

    \b
    Exit status:
      0    it ended (the cgroup or process tree is empty) and ebpf-guard did not intervene
      1    ebpf-guard could not do its job (not root, no bcc, bad cgroup, ...)
      2    bad command line or invalid policy
      3    refused: the root cgroup, init.scope, a cgroup or process tree holding ebpf-guard
      120  a HALT froze the agent at least once (or an ASK was denied with on_deny: HALT)
      121  a KILL verdict killed the agent or part of it
      122  ended by SIGINT, SIGTERM or SIGHUP (120 and 121 take precedence)
    """
    if (cgroup_spec is None) == (pid is None):
        raise click.UsageError("give exactly one of --cgroup PATH or --pid PID")
    _need_root_and_bcc()
    cgroup = None
    try:
        if cgroup_spec is not None:
            cgroup = cgroups.resolve_cgroup(cgroup_spec)
            cgroups.refuse_outside_scope(cgroup)
        else:
            cgroups.refuse_process_outside_scope(pid)
    except cgroups.ScopeError as e:
        raise RefusedError(str(e)) from None
    except cgroups.CgroupError as e:
        raise UserError(str(e)) from None
    if pid is not None and not Path(f"/proc/{pid}").exists():
        raise UserError(f"no process with PID {pid}")
    # The mark lets `resume`/`kill` act on it without --force while (and, if left frozen, after)
    # it is watched; a clean end that leaves it running gives it back unmarked.
    marked_here = cgroup is not None and cgroups.marked_role(cgroup) is None
    if marked_here:
        try:
            cgroups.mark(cgroup, cgroups.ROLE_WATCHED)
        except cgroups.CgroupError as e:
            raise UserError(str(e)) from None
    opts = SessionOptions(workspace=str((workspace or Path.cwd()).resolve()), **kw)
    interrupts = _signals_raise()
    with ExitStack() as stack:
        # First in, last out: the watchdog hears "done" only after every other cleanup.
        clean = (SystemExit, KeyboardInterrupt, click.ClickException)
        watchdog = stack.enter_context(Watchdog(clean=clean))
        if marked_here:
            stack.push(lambda exc_type, *_: _unmark_unless_held(cgroup, exc_type, clean))
        session = _start_session(opts, stack, interrupts, cgroup=cgroup, pids=(pid,) if pid else (),
                                 watchdog=watchdog)
        session.printer.message("jail: none: watch cannot jail processes it did not start "
                                "(`ebpf-guard run` jails the command it starts)")
        while not interrupts.count:
            session.step()
            if cgroup is not None and not cgroups.is_populated(cgroup):
                session.printer.message(f"cgroup {cgroup} is empty")
                break
            if pid is not None and session.sensor.tracked_count() == 0:
                session.printer.message(f"process {pid} and its descendants are gone")
                break
        interrupted = interrupts.finishing()
        if interrupted:
            session.printer.message("interrupted")
        session.finish()
        summary = session.guard.summary
        status = (EXIT_KILLED if summary.killed else EXIT_HALTED if summary.halted
                  else EXIT_INTERRUPTED if interrupted else EXIT_OK)
        session.report(f"watch ended (exit {status}):")
    sys.exit(status)


def _unmark_unless_held(cgroup: Path, exc_type: type | None, clean: tuple[type, ...]) -> None:
    """Give a watched cgroup back unmarked, unless it stays frozen (the operator resumes or
    kills it next) or the guard crashed (its watchdog freezes it next)."""
    if (exc_type is None or issubclass(exc_type, clean)) and not cgroups.is_frozen(cgroup):
        cgroups.unmark(cgroup)


@main.command(context_settings={"ignore_unknown_options": True})
@click.option("--cgroup-parent", default=None,
              help="Create the agent's cgroup under this cgroup. [default: the cgroup v2 root]")
@click.option("--workspace", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="The agent's workspace. [default: current directory]")
@click.option("--no-jail", is_flag=True,
              help="Do not put COMMAND in the Landlock jail (writes outside the workspace and the "
                   "policy's harmless places are then only contained, not prevented).")
@_session_options
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def run(cgroup_parent, workspace, no_jail, command, **kw) -> None:
    """Run COMMAND in a fresh cgroup and watch it until it and all its descendants are gone.

    \b
    Exit status:
      N    the command's own (128+N if it died of signal N): ebpf-guard did not intervene
      1    ebpf-guard could not do its job (not root, no bcc, bad cgroup, ...)
      2    bad command line or invalid policy
      120  a HALT froze the agent at least once (or an ASK was denied with on_deny: HALT)
      121  a KILL verdict killed the agent or part of it
      122  ended by SIGINT, SIGTERM or SIGHUP, which kill the agent (120 and 121 take precedence)
    """
    _need_root_and_bcc()
    opts = SessionOptions(workspace=str((workspace or Path.cwd()).resolve()), **kw)
    interrupts = _signals_raise()
    with ExitStack() as stack:
        # First in, last out: the watchdog hears "done" only after every other cleanup.
        watchdog = stack.enter_context(Watchdog(clean=(SystemExit, KeyboardInterrupt, click.ClickException)))
        try:
            parent = cgroups.resolve_cgroup(cgroup_parent) if cgroup_parent else None
            cgroup = cgroups.create_run_cgroup(parent)
        except cgroups.CgroupError as e:
            raise UserError(str(e)) from None
        stack.callback(cgroups.remove_cgroup, cgroup)
        set_child_subreaper()
        session = _start_session(opts, stack, interrupts, cgroup=cgroup, prompt_tty=True, watchdog=watchdog)
        try:
            jail = prepare_jail(session, session.policy, enabled=not no_jail)
            if jail is not None:
                stack.callback(jail.close)
            child = spawn_when_watched(list(command), cgroup, session, jail)
        except SessionError as e:
            raise UserError(str(e)) from None
        except OSError as e:
            raise UserError(f"cannot run {command[0]}: {e.strerror}") from None
        session.printer.message(f"running {' '.join(command)} (pid {child.pid}) in cgroup {cgroup}")
        while not interrupts.count:
            session.step()
            reap(child)
            if child.returncode is not None and not cgroups.is_populated(cgroup):
                break
        interrupted = interrupts.finishing()
        if interrupted:
            session.printer.message(f"interrupted: killing everything in {cgroup}")
            cgroups.kill_cgroup(cgroup)
            cgroups.wait_empty(cgroup, 5.0)
            reap(child)
        session.finish()
        rc = child.returncode if child.returncode is not None else -signal.SIGKILL
        status = 128 - rc if rc < 0 else rc
        summary = session.guard.summary
        if summary.killed:
            status, how = EXIT_KILLED, "killed by ebpf-guard"
        elif summary.halted:
            status, how = EXIT_HALTED, "halted by ebpf-guard"
        elif interrupted:
            status, how = EXIT_INTERRUPTED, "interrupted"
        else:
            how = "exited"
        session.report(f"{command[0]} {how} (status {rc if rc >= 0 else f'signal {-rc}'}), exit {status}.")
    sys.exit(status)


# ----------------------------------------------------------------------------- other commands
@main.command()
@click.option("--explain", is_flag=True,
              help="Also say, per rule, which mechanism enforces it on this host under `watch` and "
                   "`run`, and whether it prevents the syscall or only contains the agent after it "
                   "(probes the host: needs root).")
@click.option("--markdown", is_flag=True, help="With --explain: a Markdown table.")
@click.option("--workspace", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="With --explain: the workspace to plan for. [default: current directory]")
@click.option("--mode", type=click.Choice([m.value for m in Mode]), default=None,
              help="With --explain: override the policy's mode.")
@click.argument("policies", nargs=-1, required=True, type=click.Path(path_type=Path))
def check(policies, explain, markdown, workspace, mode) -> None:
    """Validate policy files; every error names file, line and key.

    Exit status: 0 every policy is valid; 2 any is invalid or cannot be read.
    """
    from ebpf_guard.policy import PolicyError, load_policy

    host_layers = None
    if explain:
        host_layers = _probe_layers()

    bad = 0
    for path in policies:
        try:
            policy = load_policy(path)  # raises nothing but PolicyError, whatever the file holds
        except PolicyError as e:
            click.echo(str(e), err=True)
            bad += 1
        else:
            # format_filename: a non-UTF-8 name must not make a strict UTF-8 stdout raise.
            click.echo(f"{click.format_filename(path)}: ok ({len(policy.rules)} rules, "
                       f"mode {policy.mode.value})")
            ids = policy.identities
            if ids is not None:
                # What this host gives the rules beyond names: protected inodes, known programs.
                tools = ", ".join(f"{t} ({len(inodes)})" for t, inodes in sorted(ids.tools.items()))
                click.echo(f"  identities here: {len(ids.files)} protected files by inode; "
                           f"programs by inode and hash: {tools or 'none'}")
                for note in ids.notes:
                    click.echo(f"  note: {note}")
            for note in policy.notes:
                click.echo(f"  note: {note}")
            if host_layers is not None:
                _explain(policy, host_layers, workspace, mode, markdown)
    sys.exit(EXIT_USAGE if bad else EXIT_OK)


@main.command()
def schema() -> None:
    """Print the JSON Schema (draft 2020-12) of the policy format, for editors.

    Generated from the tables `check` validates against; `check` also validates what needs
    the whole extends chain (list names, globs, rules that only override a base rule).
    """
    import json

    from ebpf_guard.policy.schema import policy_schema

    click.echo(json.dumps(policy_schema(), indent=2))


def _probe_layers():
    from ebpf_guard.enforce.explain import HostLayers

    try:
        host.require_root("to probe this host's prevention mechanisms (--explain)")
        host.import_bcc()
    except host.HostError as e:
        raise UserError(str(e)) from None
    return HostLayers.probe()


def _explain(policy, layers, workspace: Path | None, mode: str | None, markdown: bool) -> None:
    from ebpf_guard.enforce.explain import explain, render
    from ebpf_guard.policy.identities import local_homes

    ws = str((workspace or Path.cwd()).resolve())
    rows = explain(policy, layers, workspace=ws, homes=local_homes(), mode=Mode(mode) if mode else None)
    have = (f"fanotify {'yes' if layers.fanotify else 'no'}, Landlock ABI {layers.landlock_abi or 'none'}, "
            f"cgroup-BPF {'yes' if layers.cgroup_bpf else 'no'}, BPF-LSM {'yes' if layers.bpf_lsm else 'no'}, "
            f"BTF {'yes' if layers.btf else 'no'}")
    click.echo(f"  enforcement here ({have}):")
    for line in render(rows, markdown=markdown):
        click.echo(line)
    for why in layers.why_not:
        click.echo(f"  not here: {why}")


class RefusedError(UserError):
    """The scope guard said no: one line to stderr, exit EXIT_REFUSED."""

    exit_code = EXIT_REFUSED


_FORCE_HELP = ("Act even on a cgroup ebpf-guard did not create or watch (never the root, init.scope "
               "or a cgroup holding ebpf-guard itself)")


def _act_on_cgroup(verb: str, act) -> None:
    """Run `act()` as root, mapping refusals to EXIT_REFUSED and other failures to EXIT_ERROR."""
    from ebpf_guard.enforce.actuator import ActuatorError

    try:
        host.require_root(f"to {verb} a cgroup")
        click.echo(act())
    except cgroups.ScopeError as e:
        raise RefusedError(str(e)) from None
    except (ActuatorError, host.HostError) as e:
        raise UserError(str(e)) from None


@main.command()
@click.option("--cgroup", "cgroup_spec", required=True, help="The halted agent's cgroup.")
@click.option("--force", is_flag=True,
              help=f"{_FORCE_HELP}; also thaw while approvals are pending in it.")
def resume(cgroup_spec, force) -> None:
    """Thaw a halted agent's cgroup.

    Exit status: 0 thawed; 1 no such cgroup, not root, or the thaw failed; 2 bad command line;
    3 refused (the root, init.scope, a cgroup holding ebpf-guard, one it did not create or
    watch without --force, or approvals pending in it without --force).
    """
    from ebpf_guard.enforce.actuator import resume as thaw

    def act() -> str:
        from ebpf_guard.enforce.actuator import operator_freezer

        fz = operator_freezer(cgroup_spec, force=force)  # refusals first, pending approvals next
        if not force:
            _refuse_if_asking(fz.path)
        return thaw(fz.path, force=force)

    _act_on_cgroup("thaw", act)


def _refuse_if_asking(path: Path) -> None:
    """HALT and ASK share the freeze: thawing would let an unanswered ASK's action go ahead."""
    from ebpf_guard.approvals import ApprovalError, list_pending

    try:
        ids = {cgroups.cgroup_id(Path(d)) for d, _, _ in os.walk(path)}
        asking = [p["id"] for p in list_pending() if p.get("cgroup_id") in ids]
    except (cgroups.CgroupError, ApprovalError):
        return  # a v1 freezer path, or no running guard: nothing can be pending in it
    if asking:
        raise cgroups.ScopeError(
            f"approvals pending in this cgroup ({', '.join(asking)}): answer them with "
            "`ebpf-guard approve|deny ID` first, or `resume --force` to let them run unanswered")


@main.command(name="kill")
@click.option("--cgroup", "cgroup_spec", required=True, help="The agent's cgroup.")
@click.option("--force", is_flag=True, help=f"{_FORCE_HELP}.")
def kill_cmd(cgroup_spec, force) -> None:
    """Kill everything in a (halted) agent's cgroup and its descendants; remove the cgroup
    once empty if ebpf-guard created it.

    Exit status: 0 killed; 1 no such cgroup, not root, or the kill failed; 2 bad command line;
    3 refused (the root, init.scope, a cgroup holding ebpf-guard, or one it did not create or
    watch without --force).
    """
    from ebpf_guard.enforce.actuator import kill_all

    _act_on_cgroup("kill", lambda: kill_all(cgroup_spec, force=force))


class DamagedError(UserError):
    """The evidence is broken, torn or not what it claims to be: one line, exit EXIT_DAMAGED."""

    exit_code = EXIT_DAMAGED


@main.command()
@click.argument("log", type=click.Path(path_type=Path), default=None, required=False)
def verify(log) -> None:
    """Check the verdict log's hash chain; report the first bad record.

    Exit status: 0 chain intact (records the writer could not write are reported, they are no
    damage); 4 chain broken or LOG is not a verdict log; 1 LOG cannot be read (missing, not root).
    """
    from ebpf_guard.auditlog import DEFAULT_LOG, verify_log

    path = Path(log or DEFAULT_LOG)
    result = verify_log(path)
    if result.unreadable:
        raise UserError(result.problem)
    for note in result.notes:
        click.echo(f"note: {note}")
    if not result.ok:
        raise DamagedError(result.problem)
    lost = (f"; {result.unwritten} records could NOT be written, see the notes"
            if result.unwritten else "")
    click.echo(f"{path}: ok ({result.records} records, chain intact){lost}")


@main.command()
def doctor() -> None:
    """Check that this host can run ebpf-guard; one line per check, with the fix.

    Exit status: 0 it can (warnings allowed); 1 a check failed.
    """
    from ebpf_guard.doctor import run_checks

    sys.exit(run_checks(click.echo))


@main.command()
@click.argument("recording", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--policy", "policy_path", type=click.Path(path_type=Path), default=None,
              help="Policy to replay under. [default: the recording's own policy]")
@click.option("--compare", "compare", type=click.Path(path_type=Path), multiple=True,
              help="Compare several policies side by side (repeat, or list after --compare).")
@click.option("--mode", type=click.Choice([m.value for m in Mode]), default=None)
@click.option("--all", "show_all", is_flag=True, help="Print SAFE decisions too.")
@click.argument("more_policies", nargs=-1, type=click.Path(path_type=Path))
def replay(recording, policy_path, compare, mode, show_all, more_policies) -> None:
    """Run a recorded event stream (from --record) through the engine; nothing is enforced.

    Exit status: 0; 4 when the recording is torn (what precedes the tear is replayed, and where
    it stopped is said) or is not a recording; 2 bad policy; 1 a file cannot be read.
    """
    from ebpf_guard.auditlog import read_error
    from ebpf_guard.output import describe
    from ebpf_guard.policy import PolicyError
    from ebpf_guard.recording import RecordingError, read_recording
    from ebpf_guard.replay import format_comparison
    from ebpf_guard.replay import replay as do_replay

    policies = [*compare, *more_policies]
    if policies and len(policies) < 2:
        raise click.UsageError("--compare needs at least two policies")
    try:
        if not policies:
            policies = [policy_path or Path(read_recording(recording)[0].policy)]
        results = do_replay(recording, policies, Mode(mode) if mode else None)
    except PolicyError as e:
        click.echo(str(e), err=True)
        sys.exit(EXIT_USAGE)
    except RecordingError as e:
        raise DamagedError(str(e)) from None
    except OSError as e:
        raise UserError(read_error(e.filename or recording, e)) from None
    if len(results) > 1:
        click.echo(format_comparison(results))
    else:
        (result,) = results
        for d in result.decisions:
            if show_all or d.verdict is not Verdict.SAFE:
                ev = d.event
                click.echo(f"{d.verdict.value:<5} {d.rule or 'default':<24} pid {ev.tgid:<7} "
                           f"{ev.comm:<16} {ev.kind.value:<7} {describe(ev)}")
        counts = ", ".join(f"{result.counts.get(v, 0)} {v.value}" for v in Verdict)
        click.echo(f"replayed {len(result.decisions)} events under {result.policy}: {counts} "
                   "(nothing enforced)")
    if results[0].torn:
        raise DamagedError(results[0].torn)


@main.command()
@click.argument("log", type=click.Path(path_type=Path), default=None, required=False)
@click.option("--last-hours", type=PositiveNumber(), default=None, help="Only the last N hours.")
@click.option("--format", "fmt", type=click.Choice(["text", "json", "html"]), default="text")
@click.option("--out", "out_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Write to FILE.")
def report(log, last_hours, fmt, out_path) -> None:
    """Forensic report from a verdict log: timeline, counts, incidents, actions.

    Exit status: 0; 4 when the hash chain is broken or LOG is not a verdict log (the report is
    still written when there is anything to report, and says so at the top); 1 when LOG cannot
    be read or --out cannot be written.
    """
    from ebpf_guard.auditlog import DEFAULT_LOG
    from ebpf_guard.report import ReportError, main_report

    path = Path(log or DEFAULT_LOG)
    try:
        out = main_report(path, last_hours, fmt)
    except ReportError as e:
        raise (DamagedError if e.damaged else UserError)(str(e)) from None
    if out_path:
        try:
            with os.fdopen(open_regular(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), "w",
                           encoding="utf-8") as f:  # a FIFO as --out would block forever
                f.write(out.text)
        except OSError as e:
            raise UserError(f"cannot write {out_path}: {e.strerror or e}") from None
        click.echo(f"wrote {out_path}")
    else:
        click.echo(out.text)
    if not out.check.ok:
        raise DamagedError(f"hash chain BROKEN: {out.check.problem}")


@main.command()
def approvals() -> None:
    """List pending ASK approvals of every running guard.

    Exit status: 0 listed (possibly none); 1 not root, or no running guard.
    """
    from ebpf_guard.approvals import ApprovalError, format_pending, list_pending

    try:
        click.echo(format_pending(list_pending()))
    except ApprovalError as e:
        raise UserError(str(e)) from None


def _answer(verb: str, approval_id: str, remember: bool) -> None:
    from ebpf_guard import approvals

    try:
        click.echo(getattr(approvals, verb)(approval_id, remember=remember))
    except approvals.ApprovalError as e:
        raise UserError(str(e)) from None


@main.command()
@click.argument("approval_id")
@click.option("--remember", is_flag=True, help="Allow the same action for the rest of this run.")
def approve(approval_id, remember) -> None:
    """Allow a pending ASK: thaw the agent.

    Exit status: 0 answered; 1 not root, no running guard, or no pending ASK with that id.
    """
    _answer("approve", approval_id, remember)


@main.command()
@click.argument("approval_id")
@click.option("--remember", is_flag=True, help="Deny the same action for the rest of this run.")
def deny(approval_id, remember) -> None:
    """Deny a pending ASK: apply the rule's deny action (kill by default).

    Exit status: 0 answered; 1 not root, no running guard, or no pending ASK with that id.
    """
    _answer("deny", approval_id, remember)


if __name__ == "__main__":
    main()
