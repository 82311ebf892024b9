"""What an exec really started, read by the sensor in userspace right after the kernel
reports it: the binary's content hash and the argv operands as real paths.

Both need the filesystem, so they are the sensor's job, not the engine's (which is pure and
replays recordings). The hash is read through /proc/PID/exe: the file the kernel runs, even
when it was deleted, renamed or is a memfd (`fexecve`). Operands are resolved against the
process's cwd (from the kernel's walk, see procfs.ProcModel) with os.path.realpath, so
`rm -r /tmp/x` where /tmp/x is a symlink to $HOME is judged as $HOME.

Limits, by design: binaries over files.MAX_HASH_BYTES (16 MiB) are not hashed (a copy of such
a program is known only by its name, path or inode); operands are resolved at the moment the event is
decoded: a process that swaps a symlink after its exec and before the unlink is judged on
the earlier target (its unlinks are judged one by one anyway).
"""

from __future__ import annotations

import os

from ebpf_guard.events import Event
from ebpf_guard.files import sha256_of
from ebpf_guard.pathnames import normalize

_MAX_ARG = 4096


class ExecIdentifier:
    """Fills `exe_sha256` (through `files.sha256_of`, the one cached hash) and `real_args` of
    successful exec events."""

    def __call__(self, ev: Event) -> None:
        ev.exe_sha256 = self._hash(ev)
        ev.real_args = self._real_args(ev.argv, ev.cwd)

    @staticmethod
    def _hash(ev: Event) -> str:
        exe = f"/proc/{ev.tgid}/exe"
        if not os.path.exists(exe):
            # Already gone (a 1 ms program): the file the kernel named, if it is still the
            # same inode. A deleted or memfd binary of a finished process stays unknown.
            if not ev.real_path.startswith("/") or not ev.ino:
                return ""
            try:
                st = os.stat(ev.real_path)
            except OSError:
                return ""
            if (st.st_dev, st.st_ino) != (ev.dev, ev.ino):
                return ""
            exe = ev.real_path
        return sha256_of(exe)

    @staticmethod
    def _real_args(argv: tuple[str, ...], cwd: str) -> tuple[str, ...]:
        if len(argv) < 2:
            return ()
        out = [""]
        operands_only = False
        for arg in argv[1:]:
            if not operands_only and arg == "--":
                operands_only = True
                out.append("")
            elif (arg.startswith("-") and not operands_only) or not arg or len(arg) > _MAX_ARG:
                out.append("")
            elif ":" in arg.split("/", 1)[0]:
                # A URL, host:port or scp's host:path, not a local file: as a "path" it would
                # be mangled past the redactor's patterns (`https://user:pw@` -> `https:/user:pw@`).
                out.append("")
            elif not arg.startswith("/") and not cwd:
                out.append("")  # relative, and the cwd is unknown: never guess
            else:
                out.append(_resolve_operand(arg, cwd or "/"))
        return tuple(out)


def _resolve_operand(arg: str, cwd: str) -> str:
    """What an operand names as rm/mv/cp see it: every directory on the way resolved, the last
    component not followed (`rm -r link` removes the link), unless a trailing slash asks for
    the directory it points to (`rm -r link/`)."""
    if arg.endswith("/") or arg.endswith("/.") or arg in (".", ".."):
        return os.path.realpath(os.path.join(cwd, arg))
    head, tail = os.path.split(arg)
    base = os.path.realpath(os.path.join(cwd, head) if head else cwd)
    return normalize(tail, base) if tail not in ("", ".", "..") else os.path.realpath(os.path.join(base, tail))
