"""`ebpf-guard doctor`: can this host run ebpf-guard? One line per check, each with its fix."""

from __future__ import annotations

import os
import platform
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from ebpf_guard import cgroups, host

MIN_KERNEL = (5, 8)  # bpf_get_current_ancestor_cgroup_id, cgroup.freeze, bpf_send_signal


@dataclass
class Check:
    name: str
    status: str  # "ok" | "warn" | "FAIL"
    detail: str
    fix: str = ""


def _kernel_version(release: str) -> tuple[int, int]:
    parts = release.split("-")[0].split(".")
    return int(parts[0]), int(parts[1])


def check_root() -> Check:
    if os.geteuid() == 0:
        return Check("root", "ok", "running as root")
    return Check("root", "FAIL", f"running as uid {os.geteuid()}", "run with sudo")


def check_kernel() -> Check:
    release = platform.release()
    if _kernel_version(release) >= MIN_KERNEL:
        return Check("kernel", "ok", release)
    return Check("kernel", "FAIL", f"{release} is older than {MIN_KERNEL[0]}.{MIN_KERNEL[1]}",
                 "upgrade the kernel")


def check_btf() -> Check:
    if host.BTF.exists():
        return Check("btf", "ok", str(host.BTF))
    return Check("btf", "warn", "no /sys/kernel/btf/vmlinux (not needed: bpf/ reads no kernel structs)")


def check_tracefs() -> Check:
    if host.tracefs_mounted():
        return Check("tracefs", "ok", f"mounted at {host.TRACEFS}")
    return Check("tracefs", "warn", f"not mounted at {host.TRACEFS}; watch/run mount it themselves",
                 f"mount -t tracefs nodev {host.TRACEFS}")


def check_headers() -> Check:
    status = host.headers_status()
    if status.state == "matching":
        return Check("headers", "ok", f"matching: {status.detail}")
    if status.state == "fallback":
        return Check("headers", "warn", f"fallback: {status.detail}")
    return Check("headers", "FAIL", status.detail, "sudo bash scripts/bootstrap.sh setup")


def check_cgroup() -> Check:
    try:
        root = cgroups.find_v2_mount()
    except cgroups.CgroupError as e:
        return Check("cgroup-v2", "FAIL", str(e), "mount -t cgroup2 none /sys/fs/cgroup (or boot with "
                     "systemd.unified_cgroup_hierarchy=1)")
    if os.geteuid() != 0:
        return Check("cgroup-v2", "warn", f"mounted at {root}; freeze support not checked (needs root)")
    probe = root / f"ebpf-guard-doctor-{uuid.uuid4().hex[:8]}"
    try:
        probe.mkdir()
        missing = [f for f in ("cgroup.freeze", "cgroup.kill") if not (probe / f).exists()]
    except OSError as e:
        return Check("cgroup-v2", "FAIL", f"mounted at {root} but cannot create a cgroup: {e.strerror}")
    finally:
        if probe.exists():
            probe.rmdir()
    if "cgroup.freeze" in missing:
        return Check("cgroup-v2", "FAIL", f"mounted at {root} without cgroup.freeze", "kernel >= 5.2")
    if missing:
        return Check("cgroup-v2", "warn", f"mounted at {root}; no cgroup.kill (KILL signals each pid)")
    return Check("cgroup-v2", "ok", f"mounted at {root}; cgroup.freeze and cgroup.kill supported")


def check_bcc() -> Check:
    try:
        bcc = host.import_bcc()
    except host.HostError as e:
        return Check("bcc", "FAIL", str(e), host.BCC_INSTALL)
    return Check("bcc", "ok", f"bcc {getattr(bcc, '__version__', '?')} importable")


def check_bpf_load() -> Check:
    """Compile and load a trivial tracepoint program: the end-to-end proof."""
    try:
        host.ensure_tracefs()
        bcc = host.import_bcc()
        t0 = time.monotonic()
        b = bcc.BPF(text="TRACEPOINT_PROBE(syscalls, sys_enter_getppid) { return 0; }")
        b.cleanup()
    except Exception as e:  # noqa: BLE001 - any failure here is the finding
        return Check("bpf-load", "FAIL", f"{type(e).__name__}: {str(e).strip().splitlines()[-1:]}",
                     "see the lines above (headers, root, tracefs)")
    return Check("bpf-load", "ok", f"compiled and attached a tracepoint program in "
                 f"{(time.monotonic() - t0) * 1000:.0f} ms")


def run_checks(echo: Callable[[str], None]) -> int:
    checks = [check_root(), check_kernel(), check_btf(), check_tracefs(), check_headers(),
              check_cgroup(), check_bcc()]
    if all(c.status != "FAIL" for c in checks):
        checks.append(check_bpf_load())
    for c in checks:
        line = f"{c.status:<5} {c.name:<10} {c.detail}"
        if c.fix and c.status != "ok":
            line += f"  (fix: {c.fix})"
        echo(line)
    failed = [c.name for c in checks if c.status == "FAIL"]
    echo(f"{'FAIL' if failed else 'ok'}: " + (f"required checks failed: {', '.join(failed)}" if failed
                                              else "this host can run ebpf-guard"))
    return 1 if failed else 0
