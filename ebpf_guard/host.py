"""Host prerequisites: root, tracefs, kernel headers, BTF, bcc. Shared by the sensor and `doctor`."""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

TRACEFS = Path("/sys/kernel/tracing")
BTF = Path("/sys/kernel/btf/vmlinux")
BCC_INSTALL = "apt-get install python3-bpfcc (and run ebpf-guard from the project venv)"


class HostError(Exception):
    """A missing prerequisite, phrased as one line with its fix."""


def tracefs_mounted() -> bool:
    """Is tracefs mounted at TRACEFS? Read from the mount table: works without root, unlike
    looking inside (tracefs directories are root-only)."""
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(TRACEFS) and " - tracefs " in line for line in f)


def ensure_tracefs() -> str | None:
    """Mount tracefs if the syscall tracepoints are not visible. Returns what was done, if anything."""
    if tracefs_mounted() and (TRACEFS / "events" / "syscalls").is_dir():
        return None
    if os.geteuid() != 0:
        raise HostError(f"tracefs is not mounted at {TRACEFS} and only root can mount it")
    result = subprocess.run(
        ["mount", "-t", "tracefs", "nodev", str(TRACEFS)], capture_output=True, text=True
    )
    if result.returncode != 0 or not (TRACEFS / "events" / "syscalls").is_dir():
        raise HostError(f"cannot mount tracefs at {TRACEFS}: {result.stderr.strip() or 'no syscalls events'}")
    return f"mounted tracefs at {TRACEFS}"


@dataclass(frozen=True)
class HeadersStatus:
    state: str  # "matching" | "fallback" | "none"
    detail: str


def headers_status(release: str | None = None) -> HeadersStatus:
    """Which kernel headers bcc will compile against for the running kernel."""
    release = release or platform.release()
    mod = Path("/lib/modules") / release
    build = mod / "build"
    if not build.exists():
        return HeadersStatus(
            "none", f"no headers at {build}: run `sudo bash scripts/bootstrap.sh setup`"
        )
    marker = mod / ".ebpf-guard-fallback"
    target = os.path.realpath(build)
    if marker.exists():
        return HeadersStatus(
            "fallback",
            f"no headers package matches {release}; using generic {target} "
            "(bpf/ reads no kernel structs, so layouts do not matter)",
        )
    return HeadersStatus("matching", f"{target}")


def import_bcc():
    """Import bcc or fail with the install command."""
    try:
        import bcc
    except ImportError as e:
        raise HostError(f"bcc is not importable ({e}); install it: {BCC_INSTALL}") from e
    return bcc


def require_root(why: str = "to load BPF programs") -> None:
    if os.geteuid() != 0:
        raise HostError(f"ebpf-guard needs root {why} (try: sudo ebpf-guard ...)")
