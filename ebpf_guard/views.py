"""How the engine reads one event: its views. Pure (no I/O), like the engine.

A process names things with text; the kernel reaches objects. One event can therefore mean
several things, and each is judged (the most severe verdict wins, docs/policy.md):

  - the path as requested (`path`), and what the kernel reached (`real_path`): a symlink,
    `/proc/self/root/...` or a path padded past the kernel buffer reads differently in each;
  - the same file by identity: an inode a HALT/KILL path rule protects (a hard link), a binary
    an exec rule names (a renamed copy, a hard link, `ld.so /usr/bin/curl`);
  - what a file operation amounts to: rename = the source deleted and the destination written,
    link = the source read and the new name created, symlink = the target read and the link
    created, truncate = a write that truncates, mmap(PROT_EXEC) = an exec of the file mapped;
  - destruction (`destroy:` rules): an unlink of a file, a truncate, an O_TRUNC open of a file
    that existed.

A process's own /proc entries read as /proc/self (its threads' as /proc/thread-self), whether
requested by number or resolved by the kernel: rules say "itself" and "the others".

Events from old recordings carry none of the new fields: they have exactly one view, the one
the engine always judged, so they are decided as before.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ebpf_guard.events import (
    ARG_LEN,
    CREATE,
    NOTE_PATH_TRUNCATED,
    READ,
    TRUNCATE,
    WRITE,
    Event,
    Kind,
)
from ebpf_guard.options import ParsedArgs, parse_argv
from ebpf_guard.pathnames import normalize
from ebpf_guard.policy import DESTROY, RuleKind
from ebpf_guard.policy.identities import Identities
from ebpf_guard.policy.matchers import basename, canonical_ip

CUT_MARK = "…"  # the sensor's prefix of a path whose kernel walk hit a bound
# Kinds the policy `default` applies to when judged as themselves; the new kinds are judged by
# their rules and by what they amount to (e.g. a rename's destination as an open for write).
DEFAULT_KINDS = frozenset({Kind.EXEC, Kind.OPEN, Kind.UNLINK, Kind.CONNECT})
_REPLACED = frozenset({WRITE, CREATE, TRUNCATE})
_TRUNCATED = frozenset({WRITE, TRUNCATE})
RENAME_EXCHANGE = 0x2  # renameat2 flag (rename events carry the renameat2 flags in `flags`)
_PROC_ROOT = re.compile(r"/proc/(?:self|thread-self|[0-9]+)(?:/task/[0-9]+)?/root(/.*)?")

Name = tuple[str | None, bool, str]  # (path, cut, why) of one reading of one object


@dataclass(slots=True)
class View:
    """One reading of an event: the rule kind it is judged as and the one path, program or
    destination it names. Owns what the matchers need about that reading, computed once."""

    ev: Event
    kind: RuleKind  # the rule kind this view is judged by
    path: str | None  # normalised; a tail ("…/a/b") when cut; unix socket path (connect)
    cwd: str | None = None
    access: frozenset[str] = frozenset()  # open-kind views
    name: str | None = None  # program name for `name` conditions (exec-like views)
    # Only the last component is known (a kernel walk cut short, a truncated or unresolved
    # path): no absolute glob can match it and it is never harmless (path_not never excludes).
    cut: bool = False
    native: bool = True  # a reading as the event's own kind: rate rules count here
    default: bool = True  # the policy default applies if no rule matches this view
    specific: bool = False  # only specific deny rules apply (a mapped file read as an exec)
    why: str = ""  # how this reading follows from the event, for the reason ("": as requested)
    argv_from: int = 0  # where this program's argv starts in the event's (a loader's: 1 or more)
    ip: Any = None
    hosts: frozenset[str] = frozenset()
    ancestors: tuple[str, ...] = ()  # exes above the process, parent first (the engine's tree)
    _opts: ParsedArgs | None = None

    @property
    def opts(self) -> ParsedArgs:
        """argv read with the option table of the program this view says is running."""
        if self._opts is None:
            self._opts = parse_argv(self.name or "", self.ev.argv[self.argv_from:])
        return self._opts

    @property
    def args(self) -> tuple[str, ...]:
        """The arguments after the program's own name."""
        return self.ev.argv[self.argv_from + 1:]

    def operand_readings(self) -> list[list[str | None]]:
        """Each operand of an exec, as absolute paths: lexically against the cwd and, when the
        sensor resolved it (`real_args`), as the kernel would reach it. None = unknown (a
        relative operand with no cwd, a cut or unresolvable one): never harmless."""
        ev = self.ev
        real = ev.real_args if len(ev.real_args) == len(ev.argv) else ()
        out: list[list[str | None]] = []
        for i, text in self.opts.operands:
            cut = ev.argv_truncated and len(text.encode("utf-8", "surrogatepass")) >= ARG_LEN - 1
            lexical = None
            if not cut and (text.startswith("/") or self.cwd):
                lexical = normalize(text, self.cwd or "/")
            readings = [lexical]
            if real:
                r = real[i + self.argv_from]
                readings.append(normalize(r) if r.startswith("/") else None)
            out.append(readings)
        return out


def read_event(
    ev: Event, ids: Identities, ip_hosts: dict[Any, frozenset[str]], *, destroy: bool = False,
    same_tree: Callable[[int], bool] | None = None,
) -> list[View]:
    """Every view of `ev` (never empty); the first is the plain reading of the event. With
    `destroy`, an event that destroys a file's content is also read as a `destroy:` event: an
    unlink, a truncate, or an O_TRUNC open that did not create the file. `same_tree(pid)`: is
    that process in the event's own process tree (its /proc entries then read as /proc/self)."""
    views = _read(ev, ids, ip_hosts, same_tree)
    k = ev.kind
    if destroy and (k is Kind.UNLINK or k is Kind.TRUNCATE
                    or (k is Kind.OPEN and TRUNCATE in views[0].access and not ev.created)):
        # Native: destroy rate rules count it (once, however many readings of the file).
        views += [View(ev, DESTROY, v.path, v.cwd, cut=v.cut, default=False, why=v.why)
                  for v in views if v.kind is ev.kind and v.native]  # fmt: skip
    return views


def _read(ev: Event, ids: Identities, ip_hosts: dict[Any, frozenset[str]],
          same_tree: Callable[[int], bool] | None = None) -> list[View]:
    k = ev.kind
    cwd = ev.cwd or None
    if k is Kind.CONNECT:  # sendto/sendmsg with a destination: judged exactly like a connect
        if ev.family == "unix":
            path = ev.addr if ev.addr.startswith("/") else None
            return [View(ev, k, normalize(path) if path else None, cwd)]
        ip = canonical_ip(ev.addr)
        return [View(ev, k, None, cwd, ip=ip, hosts=ip_hosts.get(ip, frozenset()))]
    if k in (Kind.IO_URING, Kind.PTRACE):  # judged by who does it: the kernel-resolved exe
        exe = normalize(ev.exe) if ev.exe.startswith("/") else None
        return [View(ev, k, exe, cwd, name=basename(exe) if exe else None, default=False)]
    if k is Kind.EXEC:
        return _exec(ev, ids, cwd)
    obj = _object(ev, ev.raw_path, ev.path, ev.real_path, ev.path_cut, same_tree)
    if k in (Kind.OPEN, Kind.UNLINK):
        acc = (ev.access or _access_from_flags(ev.flags)) if k is Kind.OPEN else frozenset()
        views = [View(ev, k, p, cwd, acc, cut=cut, why=why) for p, cut, why in obj]
        _same_inode(views, ev, ids, k, acc, native=True)
        return views
    if k is Kind.TRUNCATE:
        views = [_native(ev, p, cut, why, cwd) for p, cut, why in obj]
        views += [_as(ev, Kind.OPEN, p, cut, why or "truncated", cwd, _TRUNCATED) for p, cut, why in obj]
        _same_inode(views, ev, ids, Kind.OPEN, _TRUNCATED, native=False)
        return views
    if k is Kind.MMAP_EXEC:
        return _mmap(ev, ids, obj, cwd)
    dest = _object(ev, ev.dest_raw_path, ev.dest_path, ev.dest_real_path, False, same_tree)
    if k is Kind.RENAME:
        # renameat2(RENAME_EXCHANGE) swaps the two names: each is moved away and replaced.
        gone, replaced = (obj + dest, obj + dest) if ev.flags & RENAME_EXCHANGE else (obj, dest)
        views = [_native(ev, p, cut, why, cwd) for p, cut, why in obj + dest]
        views += [_as(ev, Kind.UNLINK, p, cut, "moved away by rename", cwd) for p, cut, _ in gone]
        views += [_as(ev, Kind.OPEN, p, cut, "replaced by rename", cwd, _REPLACED)
                  for p, cut, _ in replaced]  # fmt: skip
        return views
    if k is Kind.LINK:
        views = [_native(ev, p, cut, why, cwd) for p, cut, why in obj + dest]
        views += [_as(ev, Kind.OPEN, p, cut, "hard link made to it", cwd, frozenset({READ}))
                  for p, cut, _ in obj]  # fmt: skip
        _same_inode(views, ev, ids, Kind.OPEN, frozenset({READ}), native=False)
        views += [_as(ev, Kind.OPEN, p, cut, "created by link", cwd, frozenset({CREATE}))
                  for p, cut, _ in dest]  # fmt: skip
        return views
    if k is Kind.SYMLINK:
        targets = _symlink_targets(ev, dest, same_tree)
        views = [_native(ev, p, cut, why, cwd) for p, cut, why in targets + dest]
        views += [_as(ev, Kind.OPEN, p, cut, "symlink made to it", cwd, frozenset({READ}))
                  for p, cut, _ in targets]  # fmt: skip
        views += [_as(ev, Kind.OPEN, p, cut, "created as a symlink", cwd, frozenset({CREATE}))
                  for p, cut, _ in dest]  # fmt: skip
        return views
    return [View(ev, k, None, cwd, default=False)]  # a kind no rule can name


def _native(ev: Event, path: str | None, cut: bool, why: str, cwd: str | None) -> View:
    return View(ev, ev.kind, path, cwd, cut=cut, why=why, default=ev.kind in DEFAULT_KINDS)


def _as(
    ev: Event, kind: Kind, path: str | None, cut: bool, why: str, cwd: str | None,
    access: frozenset[str] = frozenset(),
) -> View:  # fmt: skip
    """A reading of `ev` as another kind (what it amounts to): judged like that kind's events,
    with the policy default, but rate rules do not count it (a mv is no deletion burst)."""
    return View(ev, kind, path, cwd, access, cut=cut, native=False, why=why)


def _exec(ev: Event, ids: Identities, cwd: str | None) -> list[View]:
    path = None
    if ev.path:
        path = normalize(ev.path)
    elif ev.raw_path.startswith("/"):
        path = normalize(ev.raw_path)
    views = [View(ev, Kind.EXEC, path, cwd, name=basename(path or ev.raw_path) or None)]
    arg0 = basename(ev.argv[0]) if ev.argv else ""
    if arg0 and arg0 != views[0].name:
        # A multi-call binary (busybox) runs the tool argv[0] names: `exec -a wget busybox`.
        views.append(View(ev, Kind.EXEC, path, cwd, name=arg0, why=f"argv[0] {ev.argv[0]}"))
    loaded = _loaded_program(ev, views[0].name, ev.real_path)
    if loaded is not None:
        # `ld.so PROGRAM ARGS`: the loader runs PROGRAM with ARGS; judged as that exec too
        # (its code arrives by mmap, which the kernel side also checks by inode).
        k, prog = loaded
        p = normalize(prog, cwd or "/") if prog.startswith("/") or cwd else None
        views.append(View(ev, Kind.EXEC, p, cwd, name=basename(prog), argv_from=k,
                          cut=p is None, why=f"run by the dynamic loader {path or ev.raw_path}"))
    real = _real(ev, ev.real_path, ev.path_cut)
    if real is not None and real[0] != path:
        p, cut = real
        views.append(View(ev, Kind.EXEC, p, cwd, name=basename(p), cut=cut,
                          why=f"the binary that runs; requested {path or ev.raw_path}"))  # fmt: skip
    for b in ids.programs(ev.dev, ev.ino, ev.exe_sha256):
        if any(v.path == b.view_path and v.name == b.view_name for v in views):
            continue  # curl run as curl: nothing new to judge
        how = "inode" if (b.dev, b.ino) == (ev.dev, ev.ino) else "sha256"
        views.append(View(ev, Kind.EXEC, b.view_path, cwd, name=b.view_name,
                          why=f"same program as {b.tool} ({how}); requested "
                              f"{path or ev.raw_path}"))  # fmt: skip
    return views


# ld.so's own options that take a value (glibc's rtld --help).
_LOADER_VALUE_OPTIONS = frozenset({"--library-path", "--preload", "--audit", "--argv0",
                                   "--inhibit-rpath", "--glibc-hwcaps-prepend",
                                   "--glibc-hwcaps-mask"})


def _is_loader(name: str | None) -> bool:
    return bool(name) and (name.startswith("ld-linux") or name.startswith("ld.so")
                           or name.startswith("ld64.so") or name.startswith("ld-musl"))


def _loaded_program(ev: Event, name: str | None, real_path: str) -> tuple[int, str] | None:
    """(argv index, path) of the program a dynamic loader was asked to run, if this exec is
    the loader run as a command."""
    if not (_is_loader(name) or _is_loader(basename(real_path) if real_path else None)):
        return None
    i, argv = 1, ev.argv
    while i < len(argv):
        a = argv[i]
        if a == "--":
            i += 1
            break
        if not a.startswith("--"):
            break
        i += 1 if "=" in a or a not in _LOADER_VALUE_OPTIONS else 2
    return (i, argv[i]) if i < len(argv) else None


def _mmap(ev: Event, ids: Identities, obj: list[Name], cwd: str | None) -> list[View]:
    """mmap(PROT_EXEC) of a file: its own rules, and an exec of that program (code loaded
    without an exec: `ld.so /usr/bin/curl`) as far as specific deny rules name it."""
    views = [View(ev, Kind.MMAP_EXEC, p, cwd, name=basename(p) if p else None, cut=cut, why=why,
                  default=False) for p, cut, why in obj]  # fmt: skip
    for p, cut, _ in obj:
        if p:
            views.append(View(ev, Kind.EXEC, p, cwd, name=basename(p), cut=cut, native=False,
                              default=False, specific=True, why="mapped executable"))  # fmt: skip
    for b in ids.programs(ev.dev, ev.ino, ""):
        if any(v.kind is Kind.EXEC and v.path == b.view_path and v.name == b.view_name
               for v in views):  # fmt: skip
            continue
        views.append(View(ev, Kind.EXEC, b.view_path, cwd, name=b.view_name, native=False,
                          default=False, specific=True,
                          why=f"mapped executable, same inode as {b.tool}"))  # fmt: skip
    _same_inode(views, ev, ids, Kind.OPEN, frozenset({READ}), native=False)
    return views


def _same_inode(
    views: list[View], ev: Event, ids: Identities, kind: Kind, access: frozenset[str],
    *, native: bool,
) -> None:  # fmt: skip
    """Add the protected file `ev` reached by inode, under the path it is protected as."""
    protected = ids.file(ev.dev, ev.ino) if ev.ino else None
    if protected is None or any(v.path == protected for v in views):
        return
    views.append(View(ev, kind, protected, ev.cwd or None, access, native=native,
                      why=f"same file (inode) as {ev.path or ev.real_path or ev.raw_path}"))  # fmt: skip


def _object(ev: Event, raw: str, path: str, real: str, real_cut: bool,
            same_tree: Callable[[int], bool] | None) -> list[Name]:
    """The readings of one object an event names: as requested (unless truncated), through
    /proc/PID/root, and as the kernel reached it. At least one; (None, True, ...) when
    nothing about it can be trusted."""
    out: list[Name] = []
    req = normalize(path) if path.startswith("/") else normalize(raw) if raw.startswith("/") else None
    if req is not None:
        req = _proc_self(req, ev, same_tree)
    if req is not None and NOTE_PATH_TRUNCATED not in ev.notes:
        out.append((req, False, ""))
        m = _PROC_ROOT.fullmatch(req)
        if m:  # the same tree if that process shares our root: judge it as that path too
            out.append((normalize(m.group(1) or "/"), False, f"requested {req}"))
    r = _real(ev, real, real_cut, same_tree)
    if r is not None and not any(p == r[0] for p, _, _ in out):
        out.append((r[0], r[1], f"kernel-resolved; requested {req or raw or '(fd)'}"))
    if not out:  # the reason's {path} then shows the text as passed
        out.append((None, True, ""))
    return out


def _real(ev: Event, real: str, cut: bool, same_tree: Callable[[int], bool] | None = None) -> tuple[str, bool] | None:
    """A kernel-resolved path: (normalised path, False), (tail, True) when cut, or None
    ("" or not a file path, e.g. "pipe:[123]")."""
    if not real:
        return None
    if cut or real.startswith(CUT_MARK):
        return real, True
    if not real.startswith("/"):
        return None
    return _proc_self(normalize(real), ev, same_tree), False


def _proc_self(path: str, ev: Event, same_tree: Callable[[int], bool] | None = None) -> str:
    """/proc/<own pid>/... as /proc/self/... (and the thread's as /proc/thread-self/...): the
    kernel names the process, the policy names "itself". A process of the same tree (the
    agent's own child reading its environ back) is "itself" too: what it holds, the tree gave it."""
    if not path.startswith("/proc/"):
        return path
    parts = path.split("/", 5)  # "", "proc", pid, rest...
    if parts[2] != str(ev.tgid) and not (
            same_tree is not None and parts[2].isdigit() and same_tree(int(parts[2]))):
        return path
    if len(parts) > 4 and parts[3] == "task" and parts[4] == str(ev.pid):
        return "/proc/thread-self" + ("/" + parts[5] if len(parts) > 5 else "")
    return "/proc/self" + path[len("/proc/" + parts[2]) :]


def _symlink_targets(ev: Event, links: list[Name], same_tree: Callable[[int], bool] | None) -> list[Name]:
    """What a new symlink points to: its text, relative to the directory of the link."""
    text = ev.raw_path
    out: list[Name] = []
    if text.startswith("/"):
        t = _proc_self(normalize(text), ev, same_tree)
        out.append((t, False, ""))
        m = _PROC_ROOT.fullmatch(t)
        if m:
            out.append((normalize(m.group(1) or "/"), False, f"symlink text {text}"))
    elif text:
        for link, cut, _ in links:
            if link and not cut:
                t = normalize(text, link.rsplit("/", 1)[0] or "/")
                if not any(p == t for p, _, _ in out):
                    out.append((t, False, ""))
    return out or [(None, True, f"symlink target unknown: {text!r}")]


def _access_from_flags(flags: int) -> frozenset[str]:
    # Only used when the sensor left `access` empty (older recordings).
    acc = {0: {READ}, 1: {WRITE}, 2: {READ, WRITE}}.get(flags & 0o3, {READ})
    if flags & 0o100:
        acc.add(CREATE)
    if flags & 0o1000:
        acc.add(TRUNCATE)
    return frozenset(acc)
