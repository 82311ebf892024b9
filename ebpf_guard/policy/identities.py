"""What a policy's names mean on this host: computed once, when the policy loads (with I/O).

The engine judges what the kernel reached, not the text a process passed; for that it needs to
know, without touching the filesystem itself:

  - protected files by identity: the (st_dev, st_ino) of every existing file that a HALT or KILL
    path rule names, so a hard link to ~/.ssh/id_rsa under any name is still the key;
  - listed programs by identity: for every tool an exec rule names (`curl`), the binaries that
    name resolves to in the standard PATH, with (st_dev, st_ino) and sha256, so a renamed copy
    (hash), a hard link (inode) or `ld.so /usr/bin/curl` (mmap of curl's inode) is still curl;
  - the real paths of the workspace and home directories (a symlinked home must not make every
    real path "outside the workspace").

Everything is bounded (stats, homes, hash sizes) and nothing here raises: what cannot be read
is skipped and said in `Identities.notes`. Binaries are hashed by `files.sha256_of` (the one
hash, cached in-process, also used for each exec by the sensor).
"""

from __future__ import annotations

import os
import pwd
import stat
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ebpf_guard.events import Kind
from ebpf_guard.files import sha256_of
from ebpf_guard.pathnames import normalize
from ebpf_guard.policy.matchers import (
    GlobError,
    compile_glob,
    expand_all,
    expand_vars,
    glob_kind,
    is_literal,
    literal_dir,
    variables_in,
)
from ebpf_guard.verdicts import Verdict

if TYPE_CHECKING:
    from ebpf_guard.policy import Policy

Inode = tuple[int, int]  # (st_dev, st_ino) as os.stat reports them

PATH_DIRS = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
# Rule kinds whose `path` names files (rather than programs).
FILE_KINDS = frozenset({Kind.OPEN, Kind.UNLINK, Kind.RENAME, Kind.LINK, Kind.SYMLINK,
                        Kind.TRUNCATE})  # fmt: skip
PROGRAM_KINDS = frozenset({Kind.EXEC, Kind.MMAP_EXEC})
MAX_ENTRIES = 4096  # directory entries looked at while expanding protected globs, per compile
MAX_HOMES = 64
MAX_TOOL_MATCHES = 64  # binaries a tool-name glob may stand for
# One file reached by many names in PATH is a multi-call binary (busybox: `ls`, `wget`, ... are
# all one inode, told apart by argv[0]): its identity says nothing about which tool runs.
MULTI_CALL = frozenset({"busybox", "toybox", "coreutils"})
MULTI_CALL_NAMES = 16
NO_WALK = ("/proc", "/sys", "/dev")  # never expanded: pseudo-files, endless trees

_SKIPPED = (OSError, ValueError, RecursionError, GlobError)  # GlobError, re.error: ValueErrors
_names_cache: dict[tuple[tuple[str, int], ...], Counter[Inode]] = {}


@dataclass(frozen=True, slots=True)
class Binary:
    """One program file a tool named by an exec rule resolves to on this host."""

    tool: str  # the rule's name (`curl`) or literal path, as written (variables expanded)
    path: str  # the file's real path
    dev: int
    ino: int
    sha256: str

    @property
    def view_name(self) -> str:
        """The program name this binary is judged under: the tool, not the file's own name."""
        return self.tool.rsplit("/", 1)[-1]

    @property
    def view_path(self) -> str:
        return self.tool if self.tool.startswith("/") else self.path


@dataclass(frozen=True)
class Identities:
    """The host identities one policy names (see the module doc). Read-only lookups only."""

    files: Mapping[Inode, str] = field(default_factory=dict)  # protected file -> a path of it
    binaries: Mapping[Inode, tuple[Binary, ...]] = field(default_factory=dict)
    hashes: Mapping[str, tuple[Binary, ...]] = field(default_factory=dict)
    tools: Mapping[str, frozenset[Inode]] = field(default_factory=dict)  # tool -> its inodes
    aliases: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # path -> real path
    workspace: str | None = None  # the workspace these were computed for
    notes: tuple[str, ...] = ()  # what was skipped (budget, unreadable), for `check`/doctor

    def file(self, dev: int, ino: int) -> str | None:
        """A protected file's path, if (dev, ino) is one; None when unknown (ino 0)."""
        if not ino or not self.files:
            return None
        return self.files.get((dev, ino))

    def programs(self, dev: int, ino: int, sha256: str) -> tuple[Binary, ...]:
        """Listed programs this file is, by inode, else by content hash."""
        if ino and self.binaries:
            found = self.binaries.get((dev, ino))
            if found:
                return found
        if sha256 and self.hashes:
            return self.hashes.get(sha256.lower(), ())
        return ()


EMPTY = Identities()


# ---------------------------------------------------------------- compile


class _Budget:
    """Directory entries left to look at; one note when it runs out."""

    def __init__(self, n: int) -> None:
        self.left = n
        self.exhausted = False

    def spend(self) -> bool:
        self.left -= 1
        if self.left < 0:
            self.exhausted = True
            return False
        return True


def compile_identities(
    policy: Policy,
    *,
    workspace: str | None = None,
    homes: Iterable[str] | None = None,
    path_dirs: Iterable[str] = PATH_DIRS,
    max_entries: int = MAX_ENTRIES,
) -> Identities:
    """Identities of `policy` on this host. `homes` defaults to the home directories of the
    local users (root and uids 1000-65533) that exist; `workspace` to the policy's."""
    notes: list[str] = []
    ws = normalize(workspace or policy.workspace) if (workspace or policy.workspace) else None
    home_list = list(dict.fromkeys(normalize(h) for h in homes)) if homes is not None else (
        _passwd_homes()
    )  # fmt: skip
    aliases: dict[str, tuple[str, ...]] = {}
    for p in ([ws] if ws else []) + home_list:
        real = _realpath(p)
        if real and real != p:
            aliases[p] = (real,)
    variants = {
        "home": tuple(x for h in home_list for x in (h, *aliases.get(h, ()))),
        "workspace": (ws, *aliases.get(ws, ())) if ws else (),
    }

    files: dict[Inode, str] = {}
    budget = _Budget(max_entries)
    for rule in policy.rules:
        if rule.kind not in FILE_KINDS or rule.verdict not in (Verdict.HALT, Verdict.KILL):
            continue
        for pattern in rule.match.paths:
            for glob in expand_all(pattern, variants):
                try:
                    for path, st in _expand(glob, budget):
                        files.setdefault((st.st_dev, st.st_ino), path)
                except _SKIPPED as e:  # a policy must load even if a pattern cannot be walked
                    notes.append(f"{glob}: not expanded ({e})")
    if budget.exhausted:
        notes.append(f"protected-file scan stopped after {max_entries} directory entries: "
                     "hard links to files beyond it are matched by path only")  # fmt: skip

    binaries: dict[Inode, list[Binary]] = {}
    hashes: dict[str, list[Binary]] = {}
    tools: dict[str, set[Inode]] = {}
    dirs = _path_dirs(path_dirs)
    tool_names = _tool_patterns(policy, ws)
    counts = _name_counts(dirs) if tool_names else Counter()
    for tool in tool_names:
        try:
            found = list(_binaries(tool, dirs, counts, notes))
        except _SKIPPED as e:
            notes.append(f"{tool}: not resolved ({e})")
            continue
        for b in found:
            inode = (b.dev, b.ino)
            tools.setdefault(tool, set()).add(inode)
            if b not in binaries.setdefault(inode, []):
                binaries[inode].append(b)
            if b.sha256 and b not in hashes.setdefault(b.sha256, []):
                hashes[b.sha256].append(b)
    return Identities(
        files=files,
        binaries={k: tuple(v) for k, v in binaries.items()},
        hashes={k: tuple(v) for k, v in hashes.items()},
        tools={k: frozenset(v) for k, v in tools.items()},
        aliases=aliases,
        workspace=ws,
        notes=tuple(notes),
    )


def _realpath(path: str) -> str | None:
    try:
        return os.path.realpath(path, strict=True)
    except (OSError, ValueError, RuntimeError):
        return None


def _passwd_homes() -> list[str]:
    """Home directories of root and of regular users that exist (the uids an agent runs as)."""
    out: list[str] = []
    try:
        entries = pwd.getpwall()
    except OSError:
        return out
    for pw in entries:
        if pw.pw_uid != 0 and not 1000 <= pw.pw_uid < 65534:
            continue
        home = pw.pw_dir
        if not home.startswith("/") or home == "/" or "\0" in home:
            continue
        home = normalize(home)
        if home not in out and os.path.isdir(home):
            out.append(home)
            if len(out) >= MAX_HOMES:
                break
    return out


local_homes = _passwd_homes  # public name: the homes a policy's {home} protects on this host


def _expand(glob: str, budget: _Budget) -> Iterator[tuple[str, os.stat_result]]:
    """Existing regular files an absolute glob names, walking as little as it can: from the
    glob's literal directory, not following symlinked directories, never into /proc, /sys,
    /dev or from `/` itself (a `**/x` or last-component pattern names no place to look)."""
    try:
        if glob_kind(glob) != "abs":
            return
        rx = compile_glob(glob)
    except GlobError:
        return
    start = literal_dir(glob)
    if start == "/" or any(start == d or start.startswith(d + "/") for d in NO_WALK):
        return
    if is_literal(glob) and not glob.endswith("/"):
        st = _stat(start, budget)
        if st is not None and stat.S_ISREG(st.st_mode):
            yield start, st
        return
    body = glob + "**" if glob.endswith("/") else glob
    segs = [s for s in body.split("/") if s not in ("", ".")]
    # Above the first `**`, a directory k levels down must match segment k: no blind descent.
    free = segs.index("**") if "**" in segs else len(segs)
    seg_rx = [compile_glob(s) for s in segs[:free]]
    st = _stat(start, budget)
    if st is None:
        return
    if stat.S_ISREG(st.st_mode):
        if rx.fullmatch(start):
            yield start, st
        return
    depth0 = len([s for s in start.split("/") if s])
    stack = [(start, depth0)]
    while stack:
        d, depth = stack.pop()
        try:
            with os.scandir(d) as it:
                entries = list(it)
        except OSError:
            continue
        for e in entries:
            if not budget.spend():
                return
            path = d.rstrip("/") + "/" + e.name
            try:
                is_dir = e.is_dir(follow_symlinks=False)
            except OSError:
                continue
            if is_dir:  # never itself a protected file: only a place to look
                if depth < free and (depth >= len(segs) - 1 or not seg_rx[depth].fullmatch(e.name)):
                    continue
                if not any(path == n or path.startswith(n + "/") for n in NO_WALK):
                    stack.append((path, depth + 1))
                continue
            if rx.fullmatch(path):
                try:
                    est = os.stat(path)  # a symlink protects what it points to
                except (OSError, ValueError):
                    continue
                if stat.S_ISREG(est.st_mode):
                    yield path, est


def _stat(path: str, budget: _Budget) -> os.stat_result | None:
    if not budget.spend():
        return None
    try:
        return os.stat(path)
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------- programs


def _tool_patterns(policy: Policy, workspace: str | None) -> list[str]:
    """Tool names and literal program paths of exec / mmap_exec rules that are not SAFE."""
    out: list[str] = []
    for rule in policy.rules:
        if rule.kind not in PROGRAM_KINDS or rule.verdict is Verdict.SAFE:
            continue
        for name in rule.match.names:
            if name not in out:
                out.append(name)
        for p in rule.match.paths:
            if "home" in variables_in(p) or not is_literal(p):
                continue
            value = expand_vars(p, {"workspace": workspace}, escape=False)
            if value and value.startswith("/") and normalize(value) not in out:
                out.append(normalize(value))
    return out


def _path_dirs(dirs: Iterable[str]) -> list[str]:
    """PATH directories in order, each real directory once (/bin is /usr/bin on merged /usr)."""
    out: list[str] = []
    seen: set[str] = set()
    for d in dirs:
        real = _realpath(d)
        if real and real not in seen and os.path.isdir(real):
            seen.add(real)
            out.append(d)
    return out


def _name_counts(dirs: list[str]) -> Counter[Inode]:
    """How many PATH names reach each file (symlinks followed, hard links counted by name)."""
    key: list[tuple[str, int]] = []
    for d in dirs:
        try:
            key.append((d, os.stat(d).st_mtime_ns))
        except OSError:
            continue
    cached = _names_cache.get(tuple(key))
    if cached is not None:
        return cached
    counts: Counter[Inode] = Counter()
    for d, _ in key:
        try:
            names = os.listdir(d)
        except OSError:
            continue
        for n in names:
            try:
                st = os.stat(os.path.join(d, n))
            except (OSError, ValueError):
                continue
            if stat.S_ISREG(st.st_mode):
                counts[(st.st_dev, st.st_ino)] += 1
    _names_cache.clear()  # one host, one PATH: keep only the latest scan
    _names_cache[tuple(key)] = counts
    return counts


def _binaries(tool: str, dirs: list[str], counts: Counter[Inode], notes: list[str]
              ) -> Iterator[Binary]:  # fmt: skip
    """The program files `tool` (a name, a name glob, or a literal path) stands for."""
    if tool.startswith("/"):
        candidates = [tool]
    else:
        candidates = []
        for d in dirs:
            if is_literal(tool):
                candidates.append(os.path.join(d, tool))
                continue
            try:
                listing = sorted(os.listdir(d))
            except OSError:
                continue
            try:
                rx = compile_glob(tool)
            except GlobError:
                return
            candidates += [os.path.join(d, n) for n in listing if rx.fullmatch(n)]
        candidates = candidates[:MAX_TOOL_MATCHES]
    for c in candidates:
        real = _realpath(c)
        if real is None:
            continue
        try:
            st = os.stat(real)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        base = real.rsplit("/", 1)[-1]
        if base in MULTI_CALL or counts[(st.st_dev, st.st_ino)] > MULTI_CALL_NAMES:
            notes.append(f"{tool}: {real} is a multi-call binary; matched by name only")
            continue
        yield Binary(tool, real, st.st_dev, st.st_ino, sha256_of(real))
