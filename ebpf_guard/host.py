"""Host prerequisites: root, tracefs, securityfs, kernel headers, BTF, bcc, and what bcc says
when a program does not load. Shared by the sensor and `doctor`."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

TRACEFS = Path("/sys/kernel/tracing")
SECURITYFS = Path("/sys/kernel/security")
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


def ensure_securityfs() -> str | None:
    """Mount securityfs (it lists the active LSMs) if it is not mounted. Returns what was done."""
    if (SECURITYFS / "lsm").exists():
        return None
    result = subprocess.run(
        ["mount", "-t", "securityfs", "none", str(SECURITYFS)], capture_output=True, text=True
    )
    if result.returncode != 0:
        raise HostError(f"cannot mount securityfs at {SECURITYFS}: {result.stderr.strip()}")
    return f"mounted securityfs at {SECURITYFS}"


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


class StderrCapture:
    """File descriptor 2 redirected to a temporary file for the `with` block.

    bcc is C: the verifier's log, clang's errors and attach failures go to fd 2, while the
    Python exception says only "Permission denied". The file (mode 0600) is removed at exit
    unless `keep()` was called, so a failure can point at the full log.
    """

    def __init__(self) -> None:
        self.text = ""
        self.path: Path | None = None
        self._keep = False
        self._fd = -1
        self._saved = -1

    def __enter__(self) -> StderrCapture:
        fd, name = tempfile.mkstemp(prefix="ebpf-guard-bpf-", suffix=".log")
        self._fd, self.path = fd, Path(name)
        sys.stderr.flush()
        self._saved = os.dup(2)
        os.dup2(fd, 2)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        os.lseek(self._fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(self._fd, 1 << 20):
            chunks.append(chunk)
        os.close(self._fd)
        self.text = b"".join(chunks).decode("utf-8", "replace")
        if not self._keep and self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None

    def keep(self) -> Path | None:
        """Keep the file after the block (call inside it); returns its path."""
        self._keep = True
        return self.path


@dataclass
class BccLoad:
    """The outcome of building a bcc object (which compiles, loads and attaches its probes)."""

    bpf: Any  # the bcc.BPF object: attached when `error` is None, half-built otherwise
    error: Exception | None
    output: str  # what bcc printed on fd 2 meanwhile
    log: Path | None  # the file holding `output`, kept on failure when asked for


def bcc_load(*, keep_log: bool = False, **kwargs: Any) -> BccLoad:
    """bcc.BPF(**kwargs) with fd 2 captured. Built in two steps so that a failure half-way can be
    undone (`discard`): bcc attaches probes one by one inside its constructor, and an exception
    there would leave the earlier ones attached until the process exits."""
    bcc = import_bcc()
    b = bcc.BPF.__new__(bcc.BPF)
    error: Exception | None = None
    with StderrCapture() as out:
        try:
            b.__init__(**kwargs)
        except Exception as e:  # noqa: BLE001 - bcc raises bare Exception; the reason is on fd 2
            error = e
            if keep_log:
                out.keep()
    return BccLoad(b, error, out.text, out.path)


def discard(b: Any) -> None:
    """Detach and unload whatever a (possibly half-built) bcc object holds."""
    try:
        b.cleanup()
    except Exception:  # noqa: BLE001 - failed before bcc set itself up: nothing to undo
        pass


def bpf_prog_fds() -> int:
    """BPF programs this process holds open (each fd keeps a program loaded)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:bpf-prog"
        except OSError:
            pass  # the fd of the listing itself, gone by now
    return count


# Lines of bcc's output that are statistics, notes the verifier prints for every program (6.1:
# "reg type unsupported for arg#0 function ..."), or bcc's own advice: not the finding.
_NOT_A_REASON = re.compile(
    r"^(processed \d+ insns|verification time|stack depth|reg type unsupported for arg#|HINT: |\s*$)")
_LOAD_FAILED = "bpf: Failed to load program: "


def bpf_failure_reason(output: str, error: BaseException | None = None, lines: int = 3) -> str:
    """Why bcc failed, from what it printed on fd 2: clang's errors; else the verifier's last
    words (its final lines, without the statistics); else the last line printed; else the
    exception. One line, parts joined by " | "."""
    text = output.splitlines()
    errors = [line.strip() for line in text if ": error: " in line]
    if errors:
        # "/abs/path/sensor.c:70:5: error: ..." -> "sensor.c:70:5: error: ...": the dir is known.
        return " | ".join(re.sub(r"^\S*/", "", e) for e in errors[:lines])
    starts = [i for i, line in enumerate(text) if line.startswith(_LOAD_FAILED)]
    if starts:
        errno_text = text[starts[-1]][len(_LOAD_FAILED):].strip()
        log = [line.strip() for line in text[starts[-1] + 1:] if not _NOT_A_REASON.match(line)]
        return " | ".join([*log[-lines:]] or [errno_text])
    said = [line.strip() for line in text if line.strip()]
    if said:
        return said[-1]
    first = str(error).strip().splitlines()[:1] if error is not None else []
    return first[0] if first else "no reason given"
