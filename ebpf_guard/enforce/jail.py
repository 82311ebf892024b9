"""A Landlock jail for `ebpf-guard run`: prevention for writes outside the workspace.

`run` starts the agent itself, so between fork and exec it can put the agent into a Landlock
domain compiled from the policy. Inside it, writes, creates, removes, renames, truncates and
link-making succeed only beneath the workspace and the policy's harmless write places; anything
else fails in the kernel with EACCES (EXDEV for a cross-directory rename or link), before a
byte changes. The guard still judges every event after the fact; the jail only removes the
window between an event and the freeze (a `shutil.rmtree` outside the workspace lost up to
971 of 1,000 files before the freeze landed).

What is compiled, and why (`plan_jail`; every choice is also a line in `JailPlan.notes`):
- Filesystem: only when the policy denies writes outside some places (a catch-all OPEN write
  rule with a HALT/KILL verdict, `write-outside-workspace` in the default policy). Writable:
  the workspace, the rule's `path_not` patterns, and the paths of rules that let writes through
  (SAFE/FLAG/ASK write rules naming paths). A pattern `D/**` becomes a rule on D, a literal file
  a rule on that file, `D/*` a rule on D, and other globs the files that match now; patterns
  with no literal directory (`**/__pycache__/**`, `*.swp`) cannot be expressed and stay the
  guard's. Reads and EXECUTE are not handled: they are the guard's and the fanotify gate's.
- IOCTL_DEV is not handled: the policy says nothing about ioctls, and handling it breaks every
  program that opens a terminal or a pty (/dev/tty, /dev/pts/N from node-pty, script, expect).
- /proc: a rule on /proc/self binds one pid's directory when the rule is made, so the agent's
  children would not get it, and a rule on /proc would open /proc/sys to root's writes. So
  /proc/self/** gets no rule: writes such as /proc/self/oom_score_adj fail inside the jail.
  /dev/stdout and /proc/self/fd/N reopen their target, which is judged by its own rule; pipes
  and sockets are never restricted, nor are writes to descriptors already open.
- Network (ABI >= 4): TCP connect is restricted to an allow-list of ports only when the policy
  denies every other TCP connect for certain (a catch-all HALT/KILL connect rule over IPv4 and
  IPv6, every rule that lets a connect through names ports). Landlock sees ports, not
  addresses, so anything the policy allows by address or may allow (ASK) leaves TCP unhandled.
- Signals (ABI >= 6): SCOPE_SIGNAL. The agent cannot signal processes outside its jail (the
  guard, its watchdog, the user's other processes: a same-user door); signals inside the
  agent's tree, signals sent in from outside and kernel-made ones (SIGCHLD, terminal) still
  work. Abstract unix sockets are not scoped: the policy judges unix connects and allows them
  by default, and X11 and older D-Bus use them.
- no_new_privs is set (Landlock requires it): setuid programs (sudo, su) do not elevate.
- audit mode enforces nothing, so it gets no jail; confirm mode turns HALT into ASK (a human
  may allow), so only KILL rules count there. A caller overriding the mode passes
  `dataclasses.replace(policy, mode=...)`.
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ebpf_guard.enforce.seccomp import SeccompError, SyscallFilter
from ebpf_guard.events import CREATE, TRUNCATE, WRITE, Kind
from ebpf_guard.policy import Policy, Rule
from ebpf_guard.policy.matchers import GlobError, compile_glob, expand_vars, glob_kind, is_literal, literal_dir
from ebpf_guard.verdicts import Mode, Verdict

# Landlock's syscalls have these numbers on every architecture (added after the unification).
SYS_LANDLOCK_CREATE_RULESET = 444
SYS_LANDLOCK_ADD_RULE = 445
SYS_LANDLOCK_RESTRICT_SELF = 446
LANDLOCK_CREATE_RULESET_VERSION = 1 << 0
LANDLOCK_RULE_PATH_BENEATH = 1
LANDLOCK_RULE_NET_PORT = 2
PR_SET_NO_NEW_PRIVS = 38

# Filesystem access rights: (bit, name, first ABI).
FS_RIGHTS: tuple[tuple[int, str, int], ...] = (
    (1 << 0, "execute", 1), (1 << 1, "write_file", 1), (1 << 2, "read_file", 1),
    (1 << 3, "read_dir", 1), (1 << 4, "remove_dir", 1), (1 << 5, "remove_file", 1),
    (1 << 6, "make_char", 1), (1 << 7, "make_dir", 1), (1 << 8, "make_reg", 1),
    (1 << 9, "make_sock", 1), (1 << 10, "make_fifo", 1), (1 << 11, "make_block", 1),
    (1 << 12, "make_sym", 1), (1 << 13, "refer", 2), (1 << 14, "truncate", 3),
    (1 << 15, "ioctl_dev", 5),
)  # fmt: skip
FS = {name: bit for bit, name, _ in FS_RIGHTS}
NET_CONNECT_TCP = 1 << 1
NET_RIGHTS: tuple[tuple[int, str, int], ...] = ((1 << 0, "bind_tcp", 4), (NET_CONNECT_TCP, "connect_tcp", 4))
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1
SCOPES: tuple[tuple[int, str, int], ...] = (
    (SCOPE_ABSTRACT_UNIX_SOCKET, "abstract_unix_socket", 6), (SCOPE_SIGNAL, "signal", 6),
)

# What the jail handles: everything that changes the tree, nothing that reads or runs.
JAILED_FS = sum(
    FS[n] for n in ("write_file", "remove_dir", "remove_file", "make_char", "make_dir", "make_reg",
                    "make_sock", "make_fifo", "make_block", "make_sym", "refer", "truncate")
)  # fmt: skip
# The only rights a rule on a non-directory may grant (the kernel refuses others with EINVAL).
FILE_RIGHTS = FS["execute"] | FS["write_file"] | FS["read_file"] | FS["truncate"] | FS["ioctl_dev"]
WRITE_CLASSES = frozenset({WRITE, CREATE, TRUNCATE})
MAX_PORT_RULES = 4096  # a wider allow-list is left to the guard (one Landlock rule per port)
MAX_GLOB_MATCHES = 256  # files one harmless glob may turn into rules
_CAPS_SIZE = {1: 8, 2: 8, 3: 8, 4: 16, 5: 16}  # struct landlock_ruleset_attr per ABI (24 from 6)


class JailError(Exception):
    """The jail could not be planned or applied; the message is one line. Never run unjailed."""


def _names(mask: int, table: Iterable[tuple[int, str, int]]) -> list[str]:
    return [name for bit, name, _ in table if mask & bit]


def _supported(table: Iterable[tuple[int, str, int]], abi: int) -> int:
    return sum(bit for bit, _, first in table if first <= abi)


# ---------------------------------------------------------------- the kernel interface


class _RulesetAttr(ctypes.Structure):
    _fields_ = (("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64))


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # the kernel's struct is packed: 12 bytes
    _fields_ = (("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32))


class _NetPortAttr(ctypes.Structure):
    _fields_ = (("allowed_access", ctypes.c_uint64), ("port", ctypes.c_uint64))


class _Kernel:
    """The libc entry points the jail calls, resolved once (the child calls them after fork)."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.syscall = libc.syscall
        self.syscall.restype = ctypes.c_long
        self.prctl = libc.prctl
        self.prctl.restype = ctypes.c_int
        self.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)

    def call(self, what: str, number: int, *args: Any) -> int:
        ret = self.syscall(ctypes.c_long(number), *args)
        if ret < 0:
            err = ctypes.get_errno()
            raise JailError(f"jail: {what} failed: {os.strerror(err)} ({errno_mod.errorcode.get(err, err)})")
        return int(ret)


_KERNEL = _Kernel()


@dataclass(frozen=True, slots=True)
class LandlockSupport:
    """What this kernel offers: the Landlock ABI (0: none) and, if none, why."""

    abi: int
    reason: str = ""


def landlock_support() -> LandlockSupport:
    ret = _KERNEL.syscall(ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET), None, ctypes.c_size_t(0),
                          ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))
    if ret >= 0:
        return LandlockSupport(int(ret))
    err = ctypes.get_errno()
    reason = {
        errno_mod.ENOSYS: "the kernel is built without Landlock (CONFIG_SECURITY_LANDLOCK)",
        errno_mod.EOPNOTSUPP: "Landlock is built in but not enabled (add landlock to the lsm= boot option)",
    }.get(err, f"landlock_create_ruleset: {os.strerror(err)}")
    return LandlockSupport(0, reason)


def landlock_abi() -> int:
    """The Landlock ABI version of this kernel, 0 if unsupported or disabled (reason: `landlock_support`)."""
    return landlock_support().abi


# ---------------------------------------------------------------- the plan


@dataclass(frozen=True, slots=True)
class JailRule:
    """One path the jail lets the agent change: the rights granted beneath it, and which policy entry asks."""

    path: str
    access: int
    why: str
    is_dir: bool

    def as_record(self) -> dict:
        return {"path": self.path, "access": _names(self.access, FS_RIGHTS), "why": self.why, "dir": self.is_dir}


@dataclass(frozen=True)
class JailPlan:
    """The Landlock domain compiled from a policy: handled rights, the rules that grant them back,
    the TCP ports left open (None: TCP not handled), the scopes, and notes on what is not jailed."""

    abi: int
    handled_fs: int = 0
    rules: tuple[JailRule, ...] = ()
    net_ports: tuple[int, ...] | None = None
    scoped: int = 0
    notes: tuple[str, ...] = ()
    # Refused with EPERM by a seccomp filter installed with the jail (seccomp.py): io_uring,
    # whose operations bypass the sensor, when the policy denies it.
    deny_syscalls: tuple[str, ...] = ()

    @property
    def handled_net(self) -> int:
        return NET_CONNECT_TCP if self.net_ports is not None else 0

    @property
    def active(self) -> bool:
        """Does applying it restrict anything? (False: Landlock missing, audit mode, nothing to deny.)"""
        return self.abi > 0 and bool(self.handled_fs or self.handled_net or self.scoped)

    def describe(self) -> list[str]:
        if not self.active:
            return ["jail: none", *(f"jail note: {n}" for n in self.notes)]
        lines = [f"jail: Landlock ABI {self.abi}"]
        if self.handled_fs:
            lines.append(f"jail: {', '.join(_names(self.handled_fs, FS_RIGHTS))} only beneath:")
            lines += [f"jail:   {r.path}{'/' if r.is_dir and r.path != '/' else ''} ({r.why})" for r in self.rules]
        if self.net_ports is not None:
            lines.append(f"jail: TCP connect only to ports {_port_text(self.net_ports)}")
        if self.scoped:
            lines.append(f"jail: scoped to the agent's own processes: {', '.join(_names(self.scoped, SCOPES))}")
        if self.deny_syscalls:
            lines.append(f"jail: refused with EPERM (seccomp): {', '.join(self.deny_syscalls)}")
        return lines + [f"jail note: {n}" for n in self.notes]

    def as_record(self) -> dict:
        return {
            "abi": self.abi, "active": self.active,
            "handled_fs": _names(self.handled_fs, FS_RIGHTS),
            "handled_net": _names(self.handled_net, NET_RIGHTS),
            "rules": [r.as_record() for r in self.rules],
            "net_ports": list(self.net_ports) if self.net_ports is not None else None,
            "scoped": _names(self.scoped, SCOPES), "notes": list(self.notes),
            "deny_syscalls": list(self.deny_syscalls),
        }  # fmt: skip


def _port_text(ports: tuple[int, ...]) -> str:
    if not ports:
        return "none"
    runs: list[str] = []
    start = prev = ports[0]
    for p in (*ports[1:], None):
        if p is not None and p == prev + 1:
            prev = p
            continue
        runs.append(str(start) if start == prev else f"{start}-{prev}")
        if p is not None:
            start = prev = p
    return ", ".join(runs)


def _deny_verdicts(policy: Policy) -> frozenset[Verdict]:
    """Verdicts that surely stop the agent in this mode (ASK may be answered "allow")."""
    if policy.mode is Mode.CONFIRM:
        return frozenset({Verdict.KILL})
    return frozenset({Verdict.HALT, Verdict.KILL})


def _writes(rule: Rule) -> bool:
    return rule.kind is Kind.OPEN and (not rule.match.access or bool(rule.match.access & WRITE_CLASSES))


def plan_jail(policy: Policy, *, workspace: str, homes: list[str], abi: int) -> JailPlan:
    """Compile `policy` into a Landlock plan for an agent working in `workspace`, with `homes` as
    the `{home}` values. Pure apart from stat/listdir; JailError if the workspace is not a directory."""
    ws = os.path.abspath(workspace)
    try:
        if not stat.S_ISDIR(os.stat(ws).st_mode):
            raise JailError(f"jail: workspace {ws} is not a directory")
    except OSError as e:
        raise JailError(f"jail: workspace {ws}: {e.strerror}") from None
    if abi <= 0:
        return JailPlan(0, notes=("Landlock is not available on this kernel: nothing is jailed",))
    if policy.mode is Mode.AUDIT:
        return JailPlan(abi, notes=("audit mode enforces nothing: no jail",))
    notes: list[str] = []
    deny = _deny_verdicts(policy)
    handled_fs, rules = _plan_paths(policy, ws, homes, abi, deny, notes)
    ports = _plan_ports(policy, deny, notes) if abi >= 4 else None
    if abi < 4:
        notes.append(f"network: Landlock ABI {abi} cannot restrict TCP (needs 4)")
    scoped = SCOPE_SIGNAL if abi >= 6 else 0
    if not scoped:
        notes.append(f"signals: Landlock ABI {abi} cannot scope signals (needs 6)")
    io_uring = [r.name for r in policy.rules if r.kind is Kind.IO_URING and r.verdict in deny and r.rate is None]
    denied = ("io_uring_setup", "io_uring_enter", "io_uring_register") if io_uring else ()
    return JailPlan(abi, handled_fs, tuple(rules), ports, scoped, tuple(notes), denied)


# ---------------------------------------------------------------- filesystem


def _plan_paths(
    policy: Policy, ws: str, homes: list[str], abi: int, deny: frozenset[Verdict], notes: list[str]
) -> tuple[int, list[JailRule]]:
    catch_alls = [r for r in policy.rules if _writes(r) and r.catch_all and r.verdict in deny and r.rate is None]
    if not catch_alls:
        notes.append("filesystem: not restricted: no catch-all write rule with verdict "
                     f"{'/'.join(sorted(v.value for v in deny))} (the policy lets writes anywhere through)")
        return 0, []
    handled = JAILED_FS & _supported(FS_RIGHTS, abi)
    if abi < 2:
        notes.append("Landlock ABI 1: renames and links across directories fail with EXDEV even in the workspace")
    if abi < 3:
        notes.append(f"Landlock ABI {abi}: truncation is not restricted (needs 3)")
    sources: list[tuple[str, str]] = []  # (pattern, why)
    for r in catch_alls:
        sources += [(p, f"{r.name}: path_not {p}") for p in r.match.paths_not]
    # Rules that let a write through (allow rules, or deny verdicts that do not stop it): never
    # deny in the kernel what the policy allows.
    for r in policy.rules:
        if _writes(r) and r.match.paths and r.verdict not in deny:
            sources += [(p, f"{r.name}: {r.verdict.value} {p}") for p in r.match.paths]
    planner = _PathPlanner(handled)
    planner.add(ws, "workspace", is_dir=True)
    variants = [{"workspace": ws, "home": h} for h in homes] or [{"workspace": ws}]
    for pattern, why in sources:
        for values in variants:
            expanded = expand_vars(pattern, values, escape=False)
            if expanded is not None:
                planner.pattern(expanded, why)
    notes.extend(planner.notes())
    return handled, planner.rules()


class _PathPlanner:
    """Turns expanded write patterns into path-beneath rules on what exists, and keeps what cannot be."""

    def __init__(self, handled: int) -> None:
        self.handled = handled
        self._rules: dict[str, JailRule] = {}  # by real path
        self._missing: list[str] = []
        self._proc: list[str] = []
        self._inexpressible: list[str] = []
        self._dirs_only: list[str] = []

    def rules(self) -> list[JailRule]:
        return list(self._rules.values())

    def notes(self) -> list[str]:
        out: list[str] = []
        if self._inexpressible:
            out.append("no literal directory, left to the guard: " + ", ".join(dict.fromkeys(self._inexpressible)))
        if self._proc:
            out.append("/proc gets no rule (a rule binds one pid; /proc itself holds /proc/sys), writes fail "
                       "in the jail; /dev/stdout and /proc/self/fd/N are judged by their target: "
                       + ", ".join(dict.fromkeys(self._proc)))
        if self._missing:
            out.append("not present, so not creatable in the jail (a rule needs an existing file): "
                       + ", ".join(dict.fromkeys(self._missing)))
        if self._dirs_only:
            out.append("directories named by a pattern without their contents get no rule: "
                       + ", ".join(dict.fromkeys(self._dirs_only)))
        return out

    def add(self, path: str, why: str, *, is_dir: bool | None = None) -> None:
        """A rule on `path` if it exists (a directory: all handled rights beneath; otherwise the file rights)."""
        real = os.path.realpath(path)
        try:
            mode = os.stat(real).st_mode
        except OSError:
            self._missing.append(path)
            return
        if real == "/proc" or real.startswith("/proc/"):
            self._proc.append(path)
            return
        directory = stat.S_ISDIR(mode)
        if is_dir is False and directory:
            self._dirs_only.append(path)
            return
        access = self.handled if directory else self.handled & FILE_RIGHTS
        old = self._rules.get(real)
        if old is not None:
            self._rules[real] = JailRule(old.path, old.access, f"{old.why}; {why}", old.is_dir)
        else:
            self._rules[real] = JailRule(real, access, why, directory)

    def pattern(self, pattern: str, why: str) -> None:
        if pattern.endswith("/") and pattern != "/":
            pattern += "**"  # `dir/` is the directory and everything below it
        try:
            kind = glob_kind(pattern)
        except GlobError:
            kind = "base"
        if kind == "base" or pattern.startswith("**"):
            self._inexpressible.append(pattern)
            return
        if is_literal(pattern):
            self.add(pattern, why, is_dir=False)
            return
        base = literal_dir(pattern)
        rest = [s for s in pattern[len(base):].split("/") if s not in ("", ".")]
        if rest in (["**"], ["*"]):
            # `D/*` is D's entries; the rule also covers deeper ones, which only a directory
            # entry of D could hold (/dev/pts, /run/user/*).
            self.add(base, why, is_dir=True)
            return
        if "**" in rest[:-1] or any("**" in s and s != "**" for s in rest):
            self._inexpressible.append(pattern)
            return
        beneath = rest[-1] == "**"
        head = "/".join([base.rstrip("/"), *(rest[:-1] if beneath else rest)])
        matches = _existing_matches(head)
        if not matches:
            self._missing.append(pattern)
        for path in matches:
            self.add(path, why, is_dir=True if beneath else False)


def _existing_matches(pattern: str) -> list[str]:
    """Paths that exist now and match an absolute glob without `**` (bounded)."""
    base = literal_dir(pattern)
    segs = [s for s in pattern[len(base):].split("/") if s]
    found = [base]
    for depth in range(1, len(segs) + 1):
        partial = compile_glob("/".join([base.rstrip("/"), *segs[:depth]]))
        nxt: list[str] = []
        for parent in found:
            try:
                names = sorted(os.listdir(parent))
            except OSError:
                continue
            for name in names:
                child = f"{parent.rstrip('/')}/{name}"
                if partial.fullmatch(child):
                    nxt.append(child)
        found = nxt[:MAX_GLOB_MATCHES]
    return found


# ---------------------------------------------------------------- network


def _plan_ports(policy: Policy, deny: frozenset[Verdict], notes: list[str]) -> tuple[int, ...] | None:
    """TCP ports the policy may let a connect through, if it surely denies every other port; else None."""
    connects = [r for r in policy.rules if r.kind is Kind.CONNECT and _maybe_tcp(r)]
    denies_all = any(
        r.catch_all and r.verdict in deny and r.rate is None and not r.match.addrs_not
        and (not r.match.family or {"ipv4", "ipv6"} <= r.match.family)
        for r in connects
    ) or (policy.default in deny and not any(r.catch_all and r.verdict not in deny for r in connects))
    if not denies_all:
        notes.append("network: TCP not restricted: the policy does not deny every unlisted TCP connect "
                     "(no catch-all HALT/KILL connect rule over IPv4 and IPv6)")
        return None
    ports: set[int] = set()
    for r in connects:
        if r.catch_all or r.verdict in deny:
            continue  # catch-alls lose to the catch-all deny; denies allow nothing
        if not r.match.ports:
            notes.append(f"network: TCP not restricted: rule {r.name} ({r.verdict.value}) lets connects "
                         "through by address or host on any port, and Landlock sees only ports")
            return None
        for lo, hi in r.match.ports:
            ports.update(range(max(lo, 1), hi + 1))
            if len(ports) > MAX_PORT_RULES:
                notes.append(f"network: TCP not restricted: more than {MAX_PORT_RULES} allowed ports")
                return None
    notes.append("network: only TCP is restricted (Landlock sees no UDP); addresses stay the guard's")
    return tuple(sorted(ports))


def _maybe_tcp(rule: Rule) -> bool:
    """Could this connect rule match a TCP connect? (Socket-path rules are about unix sockets.)"""
    fam = rule.match.family
    return not rule.match.paths and (not fam or bool(fam & {"ipv4", "ipv6"}))


# ---------------------------------------------------------------- applying


def build_ruleset(plan: JailPlan) -> int:
    """A Landlock ruleset fd (O_CLOEXEC) holding the plan's rules; the caller closes it."""
    if not plan.active:
        raise JailError("jail: the plan restricts nothing" + (f" ({plan.notes[0]})" if plan.notes else ""))
    attr = _RulesetAttr(plan.handled_fs, plan.handled_net, plan.scoped)
    size = _CAPS_SIZE.get(plan.abi, ctypes.sizeof(_RulesetAttr))
    fd = _KERNEL.call("landlock_create_ruleset", SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr),
                      ctypes.c_size_t(size), ctypes.c_uint32(0))
    try:
        for rule in plan.rules:
            _add_path_rule(fd, rule)
        for port in plan.net_ports or ():
            net = _NetPortAttr(NET_CONNECT_TCP, port)
            _KERNEL.call(f"landlock_add_rule(tcp port {port})", SYS_LANDLOCK_ADD_RULE, ctypes.c_int(fd),
                         ctypes.c_int(LANDLOCK_RULE_NET_PORT), ctypes.byref(net), ctypes.c_uint32(0))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _add_path_rule(ruleset_fd: int, rule: JailRule) -> None:
    try:
        path_fd = os.open(rule.path, os.O_PATH | os.O_CLOEXEC)
    except OSError as e:
        raise JailError(f"jail: cannot open {rule.path}: {e.strerror}") from None
    try:
        if stat.S_ISDIR(os.fstat(path_fd).st_mode) != rule.is_dir:
            raise JailError(f"jail: {rule.path} changed kind since the plan was made")
        beneath = _PathBeneathAttr(rule.access, path_fd)
        _KERNEL.call(f"landlock_add_rule({rule.path})", SYS_LANDLOCK_ADD_RULE, ctypes.c_int(ruleset_fd),
                     ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH), ctypes.byref(beneath), ctypes.c_uint32(0))
    finally:
        os.close(path_fd)


def _restrict(ruleset_fd: int) -> None:
    if _KERNEL.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise JailError(f"jail: prctl(PR_SET_NO_NEW_PRIVS) failed: {os.strerror(ctypes.get_errno())}")
    _KERNEL.call("landlock_restrict_self", SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_int(ruleset_fd), ctypes.c_uint32(0))


def apply_jail(plan: JailPlan) -> None:
    """Put the calling process (and everything it starts) into the plan's Landlock domain, for good.

    Usable as a `preexec_fn`; `jail_preexec` does the same with less work in the child."""
    with PreparedJail(plan) as prepared:
        prepared()


class PreparedJail:
    """A ruleset built in the parent, applied in the child: call it as (or from) a `preexec_fn`.

    The parent opens every path and adds every rule, so a problem surfaces there as one line; the
    child only sets no_new_privs and calls landlock_restrict_self. subprocess reports a failing
    `preexec_fn` only as "Exception occurred in preexec_fn", so the child also writes its
    message to a pipe: `failure()` reads it back. Close it (or use `with`) once the child runs."""

    def __init__(self, plan: JailPlan) -> None:
        self.plan = plan
        try:
            self._filter = SyscallFilter(plan.deny_syscalls) if plan.deny_syscalls else None
        except SeccompError as e:
            raise JailError(str(e)) from None
        self.ruleset_fd = build_ruleset(plan)
        self._err_r, self._err_w = os.pipe()  # both O_CLOEXEC: gone from the agent at exec

    def __call__(self) -> None:
        try:
            _restrict(self.ruleset_fd)
            if self._filter is not None:
                try:
                    self._filter.install()  # after _restrict: no_new_privs is set
                except SeccompError as e:
                    raise JailError(str(e)) from None
        except JailError as e:
            os.write(self._err_w, str(e).encode(errors="replace")[:512])
            raise

    def failure(self) -> str | None:
        """The child's one-line error, if applying the jail failed there (call after Popen raised)."""
        os.set_blocking(self._err_r, False)
        try:
            data = os.read(self._err_r, 4096)
        except BlockingIOError:
            return None
        return data.decode(errors="replace") or None

    def close(self) -> None:
        for fd in (self.ruleset_fd, self._err_r, self._err_w):
            if fd >= 0:
                os.close(fd)
        self.ruleset_fd = self._err_r = self._err_w = -1

    def __enter__(self) -> PreparedJail:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def jail_preexec(plan: JailPlan) -> PreparedJail:
    """A `preexec_fn` that jails the child: everything but the final two syscalls happens now."""
    return PreparedJail(plan)
