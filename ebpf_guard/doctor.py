"""`ebpf-guard doctor`: can this host run ebpf-guard? One line per check, each with its fix.

The required checks (ok / warn / FAIL) end with the proof: the real sensor, compiled, every
program loaded and attached, then detached. Then, for information, the prevention mechanisms
this kernel offers, each probed by doing it (avail / absent, with the reason): a version number
says little, since distributions and hypervisors build kernels with different options.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ebpf_guard import host
from ebpf_guard.enforce import cgroups
from ebpf_guard.sensor import SOURCE, Sensor, SensorError

MIN_KERNEL = (5, 8)  # bpf_get_current_ancestor_cgroup_id, cgroup.freeze, bpf_send_signal

OK, WARN, FAIL, AVAIL, ABSENT = "ok", "warn", "FAIL", "avail", "absent"


@dataclass
class Check:
    """One line of output: a check's name, its status, what was found, and the fix."""

    name: str
    status: str  # OK | WARN | FAIL (required checks); AVAIL | ABSENT (informational)
    detail: str
    fix: str = ""


def _kernel_version(release: str) -> tuple[int, int]:
    parts = release.split("-")[0].split(".")
    return int(parts[0]), int(parts[1])


def check_root() -> Check:
    if os.geteuid() == 0:
        return Check("root", OK, "running as root")
    return Check("root", FAIL, f"running as uid {os.geteuid()}", "run with sudo")


def check_kernel() -> Check:
    release = platform.release()
    if _kernel_version(release) >= MIN_KERNEL:
        return Check("kernel", OK, release)
    return Check("kernel", FAIL, f"{release} is older than {MIN_KERNEL[0]}.{MIN_KERNEL[1]}",
                 "upgrade the kernel")


def check_btf() -> Check:
    """The kernel struct offsets the BPF programs read, from the running kernel's BTF. A warning
    only: without them the sensor still runs, judging the path strings processes pass."""
    from ebpf_guard.sensor.btf import FIELDS, BtfError, kernel_layouts  # only this check needs it

    fallback = "without BTF layouts ebpf-guard falls back to judging the strings processes pass"
    if not host.BTF.exists():
        return Check("btf", WARN, f"no {host.BTF}: {fallback}", "a kernel built with CONFIG_DEBUG_INFO_BTF=y")
    t0 = time.monotonic()
    try:
        layouts = kernel_layouts(host.BTF)
    except BtfError as e:
        return Check("btf", WARN, f"{e}; {fallback}", "report this line with `uname -rv`")
    how = "cached" if layouts.cached else f"parsed in {time.monotonic() - t0:.1f} s"
    return Check("btf", OK, f"BTF at {host.BTF}: {len(FIELDS)} kernel struct offsets resolved ({how})")


def check_tracefs() -> Check:
    if host.tracefs_mounted():
        return Check("tracefs", OK, f"mounted at {host.TRACEFS}")
    return Check("tracefs", WARN, f"not mounted at {host.TRACEFS}; watch/run mount it themselves",
                 f"mount -t tracefs nodev {host.TRACEFS}")


def check_headers() -> Check:
    status = host.headers_status()
    if status.state == "matching":
        return Check("headers", OK, f"matching: {status.detail}")
    if status.state == "fallback":
        return Check("headers", WARN, f"fallback: {status.detail}")
    return Check("headers", FAIL, status.detail, "sudo bash scripts/bootstrap.sh setup")


def check_cgroup() -> Check:
    try:
        root = cgroups.find_v2_mount()
    except cgroups.CgroupError as e:
        return Check("cgroup-v2", FAIL, str(e), "mount -t cgroup2 none /sys/fs/cgroup (or boot with "
                     "systemd.unified_cgroup_hierarchy=1)")
    if os.geteuid() != 0:
        return Check("cgroup-v2", WARN, f"mounted at {root}; freeze support not checked (needs root)")
    try:
        probe = cgroups.create_cgroup(root, f"ebpf-guard-doctor-{uuid.uuid4().hex[:8]}")
    except cgroups.CgroupError as e:
        return Check("cgroup-v2", FAIL, f"mounted at {root} but {e}")
    try:
        missing = [f for f in ("cgroup.freeze", "cgroup.kill") if not (probe / f).exists()]
    finally:
        cgroups.remove_cgroup(probe)
    if "cgroup.freeze" in missing:
        return Check("cgroup-v2", FAIL, f"mounted at {root} without cgroup.freeze", "kernel >= 5.2")
    if missing:
        return Check("cgroup-v2", WARN, f"mounted at {root}; no cgroup.kill (KILL signals each pid)")
    return Check("cgroup-v2", OK, f"mounted at {root}; cgroup.freeze and cgroup.kill supported")


def check_bcc() -> Check:
    try:
        bcc = host.import_bcc()
    except host.HostError as e:
        return Check("bcc", FAIL, str(e), host.BCC_INSTALL)
    return Check("bcc", OK, f"bcc {getattr(bcc, '__version__', '?')} importable")


def check_sensor(source: Path = SOURCE) -> Check:
    """The end-to-end proof: the real sensor, every program loaded and attached, then closed;
    ok only if each program of the object was attached and none is left loaded after."""
    kernel = platform.release()
    before = host.bpf_prog_fds()
    t0 = time.monotonic()
    sensor = Sensor(source=source)
    try:
        sensor.start()
    except SensorError as e:
        return Check("sensor", FAIL, str(e), "a compile error: see the headers line; a program refused: "
                     "this kernel's verifier or config, report it with the full bcc output")
    elapsed = time.monotonic() - t0
    try:
        programs = sensor.programs
    finally:
        sensor.close()
    unattached = sorted(p for p, point in programs.items() if not point)
    left = host.bpf_prog_fds() - before
    if not programs or unattached:
        return Check("sensor", FAIL, f"{source} on kernel {kernel}: "
                     f"{len(unattached)} of {len(programs)} programs not attached: {', '.join(unattached)}")
    if left > 0:
        return Check("sensor", FAIL, f"{source} on kernel {kernel}: {left} programs still loaded after close")
    return Check("sensor", OK, f"{source}: all {len(programs)} programs loaded and attached on kernel "
                 f"{kernel} in {elapsed:.1f} s, then detached")


# ----------------------------------------------------------------------------- prevention mechanisms
def _bpf_probe(text: str, then: Callable[[Any], object] | None = None) -> str | None:
    """Build a tiny bcc program (bcc loads and attaches its probes), run `then` on it, undo it
    all at once. None if everything worked, else the kernel's or bcc's reason."""
    loaded = host.bcc_load(text=text.encode())  # bcc warns about str
    try:
        if loaded.error is not None:
            return host.bpf_failure_reason(loaded.output, loaded.error)
        if then is None:
            return None
        error: Exception | None = None
        with host.StderrCapture() as out:
            try:
                then(loaded.bpf)
            except Exception as e:  # noqa: BLE001 - bcc raises bare Exception; the finding
                error = e
        return None if error is None else host.bpf_failure_reason(out.text, error)
    finally:
        host.discard(loaded.bpf)


def _attached(table: str) -> Callable[[Any], None]:
    """A `then` for _bpf_probe: bcc really attached something (kept in its `table` of fds), so
    that a program bcc did not recognise cannot pass for one that loaded."""

    def check(b: Any) -> None:
        if not getattr(b, table):
            raise RuntimeError(f"bcc attached nothing ({table} is empty)")

    return check


def probe_bpf_lsm() -> Check:
    """BPF-LSM needs "bpf" among the active LSMs and an LSM program that loads: hypervisor
    kernels may list it and still refuse the program."""
    try:
        mounted = host.ensure_securityfs()
        active = (host.SECURITYFS / "lsm").read_text().strip()
    except (host.HostError, OSError) as e:
        return Check("bpf-lsm", ABSENT, f"active LSMs unknown: {e}")
    said = f"active LSMs {active}" + (f"; {mounted}" if mounted else "")
    if "bpf" not in active.split(","):
        return Check("bpf-lsm", ABSENT, f"bpf is not among the {said}", "boot with lsm=...,bpf")
    # file_open, returning 0 (allow), detached at once.
    refused = _bpf_probe("LSM_PROBE(file_open, struct file *file) { return 0; }", _attached("lsm_fds"))
    if refused:
        return Check("bpf-lsm", ABSENT, f"{said}, but an LSM program is refused: {refused}")
    return Check("bpf-lsm", AVAIL, f"{said}; an LSM program on file_open loaded, attached and detached")


def probe_kprobes() -> Check:
    names: list[str] = []

    def attach(b: Any) -> None:
        event = b.get_syscall_fnname(b"getppid")
        names.append(event.decode())
        b.attach_kprobe(event=event, fn_name=b"probe")

    refused = _bpf_probe("int probe(void *ctx) { return 0; }", attach)
    target = names[0] if names else "getppid"
    if refused:
        return Check("kprobes", ABSENT, f"a kprobe on {target} cannot attach: {refused}")
    return Check("kprobes", AVAIL, f"a kprobe on {target} attached and detached")


def probe_fentry() -> Check:
    refused = _bpf_probe("KFUNC_PROBE(vfs_read) { return 0; }", _attached("kfunc_entry_fds"))
    if refused:
        return Check("fentry", ABSENT, f"an fentry program on vfs_read is refused: {refused}")
    return Check("fentry", AVAIL, "an fentry program on vfs_read loaded, attached and detached")


_libc = ctypes.CDLL(None, use_errno=True)
FAN_CLOEXEC, FAN_CLASS_CONTENT, FAN_MARK_ADD, FAN_OPEN_PERM = 0x1, 0x4, 0x1, 0x10000
AT_FDCWD = -100
SYS_LANDLOCK_CREATE_RULESET, LANDLOCK_CREATE_RULESET_VERSION = 444, 1  # same number on every arch


def _errno_text(err: int) -> str:
    return f"{errno.errorcode.get(err, err)} ({os.strerror(err)})"


def probe_fanotify() -> Check:
    """A permission-class group (the kernel refuses it without FANOTIFY_ACCESS_PERMISSIONS), and
    an open-permission mark on a file of our own, then closed (which drops the mark)."""
    fd = _libc.fanotify_init(FAN_CLASS_CONTENT | FAN_CLOEXEC, os.O_RDONLY)
    if fd < 0:
        err = ctypes.get_errno()
        why = " (no CONFIG_FANOTIFY_ACCESS_PERMISSIONS)" if err == errno.EINVAL else ""
        return Check("fanotify", ABSENT, f"fanotify_init(FAN_CLASS_CONTENT): {_errno_text(err)}{why}")
    try:
        with tempfile.NamedTemporaryFile(prefix="ebpf-guard-doctor-") as f:
            _libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int,
                                            ctypes.c_char_p]
            if _libc.fanotify_mark(fd, FAN_MARK_ADD, FAN_OPEN_PERM, AT_FDCWD, f.name.encode()) < 0:
                return Check("fanotify", ABSENT,
                             f"fanotify_mark(FAN_OPEN_PERM): {_errno_text(ctypes.get_errno())}")
    finally:
        os.close(fd)
    return Check("fanotify", AVAIL, "permission events: a FAN_CLASS_CONTENT group marked a file "
                 "with FAN_OPEN_PERM, then closed")


def probe_landlock() -> Check:
    _libc.syscall.restype = ctypes.c_long
    abi = _libc.syscall(SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0),
                        ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))
    if abi < 0:
        err = ctypes.get_errno()
        why = {errno.ENOSYS: " (not built in)", errno.EOPNOTSUPP: " (built in, disabled at boot: add "
               "landlock to lsm=)"}.get(err, "")
        return Check("landlock", ABSENT, f"landlock_create_ruleset: {_errno_text(err)}{why}")
    return Check("landlock", AVAIL, f"ABI version {abi}")


def probe_cgroup_bpf() -> Check:
    """A cgroup/connect4 program (return 1: allow) attached to a throwaway cgroup and detached."""
    try:
        root = cgroups.find_v2_mount()
        cg = cgroups.create_cgroup(root, f"ebpf-guard-doctor-{uuid.uuid4().hex[:8]}")
    except cgroups.CgroupError as e:
        return Check("cgroup-bpf", ABSENT, f"no cgroup v2 to attach to: {e}")

    def attach(b: Any) -> None:
        import bcc

        connect4 = bcc.BPFAttachType.CGROUP_INET4_CONNECT
        fn = b.load_func(b"connect4", bcc.BPF.CGROUP_SOCK_ADDR, attach_type=connect4)
        fd = os.open(cg, os.O_RDONLY | os.O_DIRECTORY)
        try:
            bcc.BPF.attach_func(fn, fd, connect4)
            bcc.BPF.detach_func(fn, fd, connect4)
        finally:
            os.close(fd)

    try:
        refused = _bpf_probe("int connect4(struct bpf_sock_addr *ctx) { return 1; }", attach)
    finally:
        cgroups.remove_cgroup(cg)
    if refused:
        return Check("cgroup-bpf", ABSENT, f"a cgroup/connect4 program cannot attach: {refused}")
    return Check("cgroup-bpf", AVAIL, f"a cgroup/connect4 program attached to a cgroup under {root} "
                 "and detached")


MECHANISMS: list[Callable[[], Check]] = [
    probe_bpf_lsm, probe_kprobes, probe_fentry, probe_fanotify, probe_landlock, probe_cgroup_bpf,
]


def run_checks(echo: Callable[[str], None], source: Path = SOURCE) -> int:
    """Print one line per check; 1 if a required check failed, else 0. `source`: the sensor's
    C file (tests point it at a broken copy)."""
    checks = [check_root(), check_kernel(), check_btf(), check_tracefs(), check_headers(),
              check_cgroup(), check_bcc()]
    if all(c.status != FAIL for c in checks):
        checks.append(check_sensor(source))
        checks += [probe() for probe in MECHANISMS]
    else:
        checks.append(Check("probes", "skip", "sensor and prevention mechanisms not probed: "
                            "fix the failures above first"))
    width = max(5, *(len(c.status) for c in checks))  # "absent" widens the column
    for c in checks:
        line = f"{c.status:<{width}} {c.name:<10} {c.detail}"
        if c.fix and c.status != OK:
            line += f"  (fix: {c.fix})"
        echo(line)
    failed = [c.name for c in checks if c.status == FAIL]
    if not failed:
        _explain_default_policy(echo, {c.name: c for c in checks})
    echo(f"{'FAIL' if failed else 'ok'}: " + (f"required checks failed: {', '.join(failed)}" if failed
                                              else "this host can run ebpf-guard"))
    return 1 if failed else 0


def _explain_default_policy(echo: Callable[[str], None], checks: dict[str, Check]) -> None:
    """Per rule of the bundled policy: what enforces it here and whether that prevents or
    contains (`ebpf-guard check --explain POLICY` for another policy or workspace)."""
    from ebpf_guard.enforce.explain import HostLayers, explain, render
    from ebpf_guard.enforce.jail import landlock_support
    from ebpf_guard.paths import POLICY_DIR
    from ebpf_guard.policy import PolicyError, load_policy
    from ebpf_guard.policy.identities import local_homes

    def ok(name: str) -> bool:
        return name in checks and checks[name].status in (OK, AVAIL)

    try:
        policy = load_policy(POLICY_DIR / "default.yaml")
    except PolicyError as e:
        echo(f"{WARN:<5} policy     bundled default policy: {e}")
        return
    land = landlock_support()
    layers = HostLayers(fanotify=ok("fanotify"), landlock_abi=land.abi, cgroup_bpf=ok("cgroup-bpf"),
                        btf=ok("btf"), bpf_lsm=ok("bpf-lsm"))
    echo(f"enforcement of {POLICY_DIR / 'default.yaml'} here (workspace: the current directory):")
    for line in render(explain(policy, layers, workspace=os.getcwd(), homes=local_homes())):
        echo(line)
