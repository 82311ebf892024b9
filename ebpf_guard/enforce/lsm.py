"""BPF-LSM enforcement: file, exec, delete and SIGCONT rules inside the kernel's security hooks.

Where the kernel runs the `bpf` LSM and accepts BPF-LSM programs (Debian 12's and 13's stock
kernels), bpf/lsm.c returns -EPERM from the security hooks themselves, so the harm never
happens: a watched `cat KEY` reads no byte, an append to a config file writes none, a listed
tool is never opened (exec, `ld.so TOOL`, `cp TOOL`), and mass deletion stops after `count`
files. Only tasks in the watched cgroups (or below them) are judged; every other task costs one
cgroup-ancestor check per hook call and is allowed at once.

Everything is keyed by file identity, (s_dev, i_ino) as the kernel encodes them: symlinks, hard
links, `/proc/self/root/...` and relative names all reach the same inode. Struct members are read
at offsets from the running kernel's BTF (sensor/btf.py), never from headers.

Hosts whose kernel refuses BPF-LSM programs (this project's 6.18 build VM: EPERM at load) are
told so in one line by `lsm_status()`; fanotify gates, the Landlock jail and cgroup-BPF egress
cover them instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import platform
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ebpf_guard import host
from ebpf_guard.enforce import cgroups as cg
from ebpf_guard.events import READ, Kind
from ebpf_guard.pathnames import normalize
from ebpf_guard.paths import BPF_DIR
from ebpf_guard.policy.identities import Identities, Inode, compile_identities, local_homes
from ebpf_guard.policy.matchers import GlobError, expand_all, glob_kind, literal_dir
from ebpf_guard.sensor.btf import VMLINUX_BTF, BtfError, kernel_layouts
from ebpf_guard.sensor.decode import kernel_dev
from ebpf_guard.verdicts import Verdict

if TYPE_CHECKING:
    from ebpf_guard.policy import Policy, Rule

SOURCE = BPF_DIR / "lsm.c"
MAX_CGROUPS = 8  # bpf/lsm.c EG_MAX_CGROUPS
RATE_SLOTS = 1024  # bpf/lsm.c EG_RATE_SLOTS: the largest deletion count the kernel can hold
MAX_INODES = 16384  # bpf/lsm.c: entries of the inodes map
# Flags of an entry in the kernel's inodes map (bpf/lsm.c EG_DENY_* / EG_RATE_EXEMPT).
DENY_OPEN, DENY_WRITE, DENY_EXEC, RATE_EXEMPT, HOLD_EXEC = 1, 2, 4, 8, 16
# The kernel's denial counters, by index (bpf/lsm.c H_*).
HOOKS = ("file_open", "file_permission", "bprm_check_security", "mmap_file", "path_unlink",
         "path_rmdir", "path_rename", "path_truncate", "file_truncate", "path_link", "task_kill")
# Kinds whose rules name files to protect from modification (rename/truncate/unlink/link of them).
WRITE_KINDS = frozenset({Kind.UNLINK, Kind.RENAME, Kind.TRUNCATE, Kind.LINK})
_PROGRAM_KINDS = frozenset({Kind.EXEC, Kind.MMAP_EXEC})
_DENY_VERDICTS = frozenset({Verdict.KILL, Verdict.HALT})
# KILL tools never run; HALT and ASK tools exec into the sensor's hold, so that an operator's
# resume or approval runs them (as the fanotify gate does), and only their other opens are denied.
_EXEC_DENY_VERDICTS = frozenset({Verdict.KILL})
_EXEC_HOLD_VERDICTS = frozenset({Verdict.HALT, Verdict.ASK})

_BPF_PROG_LOAD = 5
_BPF_PROG_TYPE_LSM = 29
_BPF_LSM_MAC = 27
_SYS_BPF = {"x86_64": 321, "aarch64": 280}
_PROBE_HOOK = "file_open"


class LsmError(Exception):
    """BPF-LSM enforcement cannot start or a request is invalid; one line for the user."""


# ------------------------------------------------------------------------------ host support


def lsm_status() -> tuple[bool, str]:
    """(usable, why): is the bpf LSM active here and does the kernel load BPF-LSM programs?
    Mounts securityfs if needed (and says so). The probe loads a two-instruction program for
    the file_open hook without attaching it, then closes it: nothing stays in the kernel."""
    if os.geteuid() != 0:
        return False, "BPF-LSM: needs root to probe"
    try:
        mounted = host.ensure_securityfs()
    except host.HostError as e:
        return False, f"BPF-LSM: {e}"
    said = f" ({mounted})" if mounted else ""
    try:
        active = (host.SECURITYFS / "lsm").read_text().strip()
    except OSError as e:
        return False, f"BPF-LSM: cannot read {host.SECURITYFS / 'lsm'}: {e.strerror}{said}"
    if "bpf" not in active.split(","):
        return False, (f"BPF-LSM: the bpf LSM is not active on kernel {platform.release()} (active: {active}); "
                       f"boot with lsm={active},bpf{said}")
    ok, why = _probe_load()
    return ok, f"BPF-LSM: {why}{said}"


class _ProgLoadAttr(ctypes.Structure):
    """The head of union bpf_attr for BPF_PROG_LOAD, up to attach_btf_id (kernel 5.5+)."""

    _fields_ = [
        ("prog_type", ctypes.c_uint32), ("insn_cnt", ctypes.c_uint32), ("insns", ctypes.c_uint64),
        ("license", ctypes.c_uint64), ("log_level", ctypes.c_uint32), ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_uint64), ("kern_version", ctypes.c_uint32), ("prog_flags", ctypes.c_uint32),
        ("prog_name", ctypes.c_char * 16), ("prog_ifindex", ctypes.c_uint32),
        ("expected_attach_type", ctypes.c_uint32), ("prog_btf_fd", ctypes.c_uint32),
        ("func_info_rec_size", ctypes.c_uint32), ("func_info", ctypes.c_uint64),
        ("func_info_cnt", ctypes.c_uint32), ("line_info_rec_size", ctypes.c_uint32),
        ("line_info", ctypes.c_uint64), ("line_info_cnt", ctypes.c_uint32), ("attach_btf_id", ctypes.c_uint32),
    ]


def _probe_load() -> tuple[bool, str]:
    """Load `r0 = 0; exit` as an LSM program for file_open: what the kernel says is the answer."""
    nr = _SYS_BPF.get(platform.machine())
    if nr is None:
        return False, f"no bpf() syscall number known for {platform.machine()}"
    try:
        libbpf = ctypes.CDLL(ctypes.util.find_library("bpf") or "libbpf.so.1", use_errno=True)
    except OSError as e:
        return False, f"libbpf (which bcc uses) is not loadable: {e}"
    btf_id = libbpf.libbpf_find_vmlinux_btf_id(_PROBE_HOOK.encode(), _BPF_LSM_MAC)
    if btf_id < 0:
        return False, (f"kernel {platform.release()} has no bpf_lsm_{_PROBE_HOOK} in its BTF "
                       f"({os.strerror(-btf_id)}): built without CONFIG_BPF_LSM or BTF")
    insns = (ctypes.c_uint64 * 2)(0x00000000000000B7, 0x0000000000000095)  # mov64 r0, 0; exit
    license_ = ctypes.create_string_buffer(b"GPL")
    attr = _ProgLoadAttr(prog_type=_BPF_PROG_TYPE_LSM, insn_cnt=2, insns=ctypes.addressof(insns),
                         license=ctypes.addressof(license_), prog_name=b"eg_lsm_probe",
                         expected_attach_type=_BPF_LSM_MAC, attach_btf_id=btf_id)
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(nr, _BPF_PROG_LOAD, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd >= 0:
        os.close(fd)
        return True, f"usable on kernel {platform.release()}"
    err = ctypes.get_errno()
    return False, (f"kernel {platform.release()} refuses BPF-LSM programs at load "
                   f"({errno.errorcode.get(err, err)}: {os.strerror(err)}) although the bpf LSM is active")


# ---------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class LsmPlan:
    """What the kernel denies to watched tasks, by file identity (st_dev, st_ino as os.stat
    reports them; the enforcer converts to the kernel's encoding). Pure data."""

    deny_open_inodes: frozenset[Inode] = frozenset()  # any open, and read/write through old fds
    deny_write_inodes: frozenset[Inode] = frozenset()  # write, truncate, unlink, rename, link
    deny_exec_inodes: frozenset[Inode] = frozenset()  # exec, mmap(PROT_EXEC), and any open
    hold_exec_inodes: frozenset[Inode] = frozenset()  # any open but exec's own (held by the sensor)
    unlink_rate: tuple[int, int] | None = None  # (count, window_ns) of deletions before EPERM
    rate_exempt_dirs: frozenset[Inode] = frozenset()  # deletions below these are not counted
    notes: tuple[str, ...] = ()  # what the kernel cannot enforce of the policy
    paths: dict[Inode, str] = field(default_factory=dict, compare=False)  # for describe()

    def __post_init__(self) -> None:
        if self.unlink_rate is not None:
            count, window_ns = self.unlink_rate
            if not 1 <= count <= RATE_SLOTS or window_ns <= 0:
                raise LsmError(f"unlink_rate {self.unlink_rate}: the count must be 1..{RATE_SLOTS} "
                               "and the window positive")
        entries = len(self.deny_open_inodes | self.deny_write_inodes | self.deny_exec_inodes
                      | self.hold_exec_inodes | self.rate_exempt_dirs)
        if entries > MAX_INODES:
            raise LsmError(f"{entries} inodes in the plan; the kernel map holds {MAX_INODES}")

    def inode_flags(self) -> dict[Inode, int]:
        """Each planned inode -> its DENY_*/HOLD_EXEC/RATE_EXEMPT flags (the kernel map's values)."""
        flags: dict[Inode, int] = {}
        for inodes, flag in ((self.deny_open_inodes, DENY_OPEN), (self.deny_write_inodes, DENY_WRITE),
                             (self.deny_exec_inodes, DENY_EXEC), (self.hold_exec_inodes, HOLD_EXEC),
                             (self.rate_exempt_dirs, RATE_EXEMPT)):
            for inode in inodes:
                flags[inode] = flags.get(inode, 0) | flag
        return flags

    def describe(self) -> list[str]:
        """One line per planned entry, then the notes."""
        def name(inode: Inode) -> str:
            return self.paths.get(inode, f"dev {inode[0]} ino {inode[1]}")

        lines = [f"deny open: {name(i)}" for i in sorted(self.deny_open_inodes)]
        lines += [f"deny write: {name(i)}" for i in sorted(self.deny_write_inodes)]
        lines += [f"deny exec: {name(i)}" for i in sorted(self.deny_exec_inodes)]
        lines += [f"exec held, other opens denied: {name(i)}" for i in sorted(self.hold_exec_inodes)]
        if self.unlink_rate:
            count, window_ns = self.unlink_rate
            lines.append(f"deletions: EPERM after {count} within {window_ns / 1e9:g}s until reset")
            lines += [f"deletions not counted below: {name(i)}" for i in sorted(self.rate_exempt_dirs)]
        return lines + [f"note: {n}" for n in self.notes]


def plan_lsm(policy: Policy, identities: Identities | None = None, *, workspace: str | None = None,
             homes: Iterable[str] | None = None) -> LsmPlan:
    """The LsmPlan of `policy` on this host. Protected files come from the KILL/HALT file rules
    (open rules with a read access, or none, deny every open; write-only open rules and
    unlink/rename/truncate/link rules deny modification); tools from exec rules that judge the
    program alone (KILL: exec denied; HALT/ASK: exec held, copies and ld.so denied; no rate, no
    argument conditions); the deletion limit from the
    first unlink rule with a rate. `identities` supplies the tools (computed when None);
    `workspace` and `homes` expand `{workspace}`/`{home}` as compile_identities does."""
    homes = list(homes) if homes is not None else None
    ws = workspace or (identities.workspace if identities else None)
    if identities is None:
        identities = compile_identities(policy, workspace=ws, homes=homes)
    notes: list[str] = []
    read_rules, write_rules = _file_rules(policy)
    open_files = _files_of(policy, read_rules, ws, homes, notes)
    write_files = _files_of(policy, write_rules, ws, homes, notes)
    exec_inodes, exec_paths = _tool_inodes(policy, identities, notes, _EXEC_DENY_VERDICTS)
    hold_inodes, hold_paths = _tool_inodes(policy, identities, notes, _EXEC_HOLD_VERDICTS)
    rate, exempt, exempt_paths = _unlink_rate(policy, ws, homes, notes)
    return LsmPlan(
        deny_open_inodes=frozenset(open_files), deny_write_inodes=frozenset(write_files),
        deny_exec_inodes=frozenset(exec_inodes), hold_exec_inodes=frozenset(hold_inodes - exec_inodes),
        unlink_rate=rate, rate_exempt_dirs=frozenset(exempt),
        notes=tuple(dict.fromkeys(notes)),
        paths={**exempt_paths, **hold_paths, **exec_paths, **write_files, **open_files},
    )


def _file_rules(policy: Policy) -> tuple[list[Rule], list[Rule]]:
    """KILL/HALT rules whose paths are to be protected from any open / from modification."""
    read_rules: list[Rule] = []
    write_rules: list[Rule] = []
    for rule in policy.rules:
        if rule.verdict not in _DENY_VERDICTS or not rule.match.paths or rule.rate is not None:
            continue
        if rule.userspace_only:  # who opens it, or an exception, decides: the gate asks the engine
            continue
        if rule.kind is Kind.OPEN:
            access = rule.match.access
            (read_rules if not access or READ in access else write_rules).append(rule)
        elif rule.kind in WRITE_KINDS:
            write_rules.append(rule)
    return read_rules, write_rules


def _files_of(policy: Policy, rules: list[Rule], ws: str | None, homes: list[str] | None,
              notes: list[str]) -> dict[Inode, str]:
    """Existing files the rules' paths name, by identity (compile_identities on just these rules)."""
    if not rules:
        return {}
    for rule in rules:
        if rule.match.paths_not:
            notes.append(f"rule {rule.name}: path_not is not applied in the kernel (all named files are protected)")
    found = compile_identities(replace(policy, rules=tuple(rules), identities=None), workspace=ws, homes=homes)
    notes.extend(found.notes)
    return dict(found.files)


def _tool_inodes(policy: Policy, identities: Identities, notes: list[str], verdicts: frozenset[Verdict]
                 ) -> tuple[set[Inode], dict[Inode, str]]:
    """Inodes of the programs that exec rules with one of `verdicts` judge by the program alone."""
    inodes: set[Inode] = set()
    paths: dict[Inode, str] = {}
    for rule in policy.rules:
        if rule.kind not in _PROGRAM_KINDS or rule.verdict not in verdicts or rule.rate is not None:
            continue
        if rule.userspace_only:
            continue
        m = rule.match
        if m.args_any or m.args_regex or m.flags or m.operands or m.operands_not or m.paths_not:
            continue  # judged on arguments or exceptions: the engine's, not a blanket exec deny
        tools = [*m.names, *(normalize(p) for p in m.paths if p.startswith("/"))]
        if any(not p.startswith("/") for p in m.paths):
            notes.append(f"rule {rule.name}: relative or variable program paths are left to the engine")
        for tool in tools:
            found = identities.tools.get(tool, frozenset())
            for inode in found:
                inodes.add(inode)
                binaries = identities.binaries.get(inode, ())
                paths.setdefault(inode, binaries[0].path if binaries else tool)
    return inodes, paths


def _unlink_rate(policy: Policy, ws: str | None, homes: list[str] | None, notes: list[str]
                 ) -> tuple[tuple[int, int] | None, set[Inode], dict[Inode, str]]:
    """(count, window_ns) of the first KILL/HALT unlink rule with a rate that names no path, and
    the existing directories its path_not spares (`/tmp/**`: everything below /tmp)."""
    rule = next((r for r in policy.rules if r.kind is Kind.UNLINK and r.rate is not None
                 and r.verdict in _DENY_VERDICTS and not r.match.paths), None)
    if rule is None or rule.rate is None:
        return None, set(), {}
    count, window_ns = rule.rate.count, rule.rate.window_ns
    if count > RATE_SLOTS:
        notes.append(f"rule {rule.name}: a count of {count} exceeds the kernel's {RATE_SLOTS}; not enforced")
        return None, set(), {}
    home_list = homes if homes is not None else local_homes()  # compile_identities' default
    variants = {"home": tuple(normalize(h) for h in home_list),
                "workspace": (normalize(ws),) if ws else ()}
    exempt: dict[Inode, str] = {}
    counted: list[str] = []
    for pattern in rule.match.paths_not:
        for glob in expand_all(pattern, variants) if pattern else ():
            directory = _whole_dir(glob)
            if directory is None:
                counted.append(pattern)
                continue
            try:
                st = os.stat(directory)
            except OSError:
                continue
            exempt.setdefault((st.st_dev, st.st_ino), directory)
    if counted:
        notes.append(f"rule {rule.name}: path_not {', '.join(dict.fromkeys(counted))} not applied in the "
                     "kernel (only whole existing directories are): such deletions count towards the limit")
    return (count, window_ns), set(exempt), exempt


def _whole_dir(glob: str) -> str | None:
    """The directory a glob names with everything below it (`/tmp/**`, `/tmp/`), else None."""
    try:
        if glob_kind(glob) != "abs":
            return None
    except GlobError:
        return None
    body = glob[:-1] if glob.endswith("/") else glob[:-3] if glob.endswith("/**") else None
    if not body or literal_dir(glob).rstrip("/") != normalize(body):
        return None
    return normalize(body)


# ------------------------------------------------------------------------------- the enforcer


class LsmEnforcer:
    """The loaded bpf/lsm.c object: its programs (attached to the LSM hooks), its maps (scope,
    inode rules, held tgids, the deletion limit) and their lifetime. One per watched scope."""

    def __init__(self, cgroups: Sequence[Path | str | int], plan: LsmPlan, *, source: Path = SOURCE,
                 btf: Path = VMLINUX_BTF) -> None:
        """cgroups: v2 cgroup directories, or cgroup ids (the directory's inode); each is watched
        with everything below it."""
        if not cgroups:
            raise LsmError("no cgroup to watch: BPF-LSM rules apply to watched cgroups only")
        if len(cgroups) > MAX_CGROUPS:
            raise LsmError(f"at most {MAX_CGROUPS} cgroups can be watched at once")
        self.plan = plan
        self._scope = sorted({_cgroup_level_id(c) for c in cgroups})
        self._source = Path(source)
        self._btf = btf
        self._bpf: Any = None
        self.notes: list[str] = []  # what this kernel's build leaves out (hooks, fields)

    def start(self) -> None:
        """Compile, load and attach; fill the maps. Raises LsmError (one line) if refused."""
        if self._bpf is not None:
            raise LsmError("BPF-LSM enforcer already started")
        try:
            host.require_root()
            layouts = kernel_layouts(self._btf)
        except (host.HostError, BtfError) as e:
            raise LsmError(f"BPF-LSM: {e}") from e
        cflags = [f"-I{self._source.resolve().parent}", *layouts.cflags(), *self._feature_flags(layouts.offsets)]
        loaded = host.bcc_load(keep_log=True, src_file=str(self._source).encode(), cflags=cflags)
        if loaded.error is not None:
            raise LsmError(self._load_failure(loaded))
        if loaded.log is not None:
            loaded.log.unlink(missing_ok=True)
        self._bpf = loaded.bpf
        try:
            self._fill()
        except BaseException:
            self.close()
            raise

    def _feature_flags(self, offsets: dict[str, int]) -> list[str]:
        """-D flags for hooks and members this kernel has; what is missing goes to `notes`."""
        flags: list[str] = []
        bcc = host.import_bcc()
        if bcc.BPF.ksymname(b"bpf_lsm_file_truncate") != -1:  # 6.2+: ftruncate and O_TRUNC use it
            flags.append("-DEG_HAVE_FILE_TRUNCATE=1")
        if "file.f_mode" not in offsets:
            self.notes.append("file.f_mode not in the BTF layouts: write opens of protected files succeed; "
                              "their writes, truncation, shared writable mappings are denied")
        if "linux_binprm.file" not in offsets:
            self.notes.append("linux_binprm.file not in the BTF layouts: bprm_check_security is not hooked; "
                              "the exec's open of a listed tool (file_open) is denied instead")
        return flags

    def _load_failure(self, loaded: host.BccLoad) -> str:
        message = (str(loaded.error).strip().splitlines() or [type(loaded.error).__name__])[0]
        host.discard(loaded.bpf)
        failed = re.search(r"Failed to load BPF program b'lsm__(\w+)': (.*)", message)
        if message == "Need super-user privileges to run" or (failed and "not permitted" in failed.group(2)):
            if loaded.log is not None:  # bcc said no more than the line below
                loaded.log.unlink(missing_ok=True)
            hook = f" ({failed.group(1)})" if failed else ""
            return (f"BPF-LSM: kernel {platform.release()} refused the program{hook} with EPERM: "
                    "BPF-LSM is not usable on this host")
        reason = re.sub(r"\bmain\.c:", f"{self._source.name}:", host.bpf_failure_reason(loaded.output, loaded.error))
        return (f"BPF-LSM: cannot load {self._source} on kernel {platform.release()}: {message}: {reason}"
                f" (full bcc output: {loaded.log})")

    def _fill(self) -> None:
        b = self._bpf
        table = b[b"inodes"]
        for (dev, ino), flags in self.plan.inode_flags().items():
            key = table.Key()
            key.dev, key.ino = kernel_dev(dev), ino
            table[key] = ctypes.c_uint8(flags)
        cfgs = b[b"cfg"]
        cfg = cfgs.Leaf()
        cfg.ncgroups = len(self._scope)
        for i, (level, cid) in enumerate(self._scope):
            cfg.levels[i], cfg.ids[i] = level, cid
        if self.plan.unlink_rate is not None:
            cfg.rate_count, cfg.rate_window_ns = self.plan.unlink_rate
        cfgs[ctypes.c_int(0)] = cfg

    @property
    def programs(self) -> list[str]:
        """The hooks with a program attached."""
        return sorted(name.decode()[len("lsm__"):] for name in self._require().lsm_fds)

    def close(self) -> None:
        """Detach and unload everything (the hooks allow again at once). Idempotent."""
        b, self._bpf = self._bpf, None
        if b is not None:
            host.discard(b)

    def __enter__(self) -> LsmEnforcer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _require(self) -> Any:
        if self._bpf is None:
            raise LsmError("BPF-LSM enforcer not started")
        return self._bpf

    # -- run time ---------------------------------------------------------------------------

    def reset_rate(self) -> None:
        """Forget past deletions: the limit starts counting afresh (after a human decided)."""
        b = self._require()
        ring = b[b"rate_ring"]
        used = self.plan.unlink_rate[0] if self.plan.unlink_rate else 0  # the kernel uses slots 0..count-1
        for i in range(used):
            ring[ctypes.c_int(i)] = ctypes.c_uint64(0)
        b[b"rate_state"][ctypes.c_int(0)] = b[b"rate_state"].Leaf()

    @property
    def rate_tripped(self) -> bool:
        """The deletion limit was reached; deletions are refused until reset_rate()."""
        return bool(self._require()[b"rate_state"][ctypes.c_int(0)].tripped)

    def hold(self, tgid: int) -> None:
        """Refuse SIGCONT from watched tasks to process `tgid` (held by the guard)."""
        if tgid <= 0:
            raise LsmError(f"hold: {tgid} is not a process id")
        self._require()[b"held"][ctypes.c_uint32(tgid)] = ctypes.c_uint8(1)

    def release(self, tgid: int) -> None:
        try:
            del self._require()[b"held"][ctypes.c_uint32(tgid)]
        except KeyError:
            pass  # not held: nothing to release

    def counters(self) -> dict[str, int]:
        """Denials so far per hook (summed over CPUs)."""
        table = self._require()[b"denials"]
        return {hook: int(sum(table[ctypes.c_int(i)])) for i, hook in enumerate(HOOKS)}


def _cgroup_level_id(spec: Path | str | int) -> tuple[int, int]:
    """(depth below the v2 root, id) of a watched cgroup given as a directory or an id."""
    try:
        root = cg.find_v2_mount()
    except cg.CgroupError as e:
        raise LsmError(str(e)) from e
    if isinstance(spec, int):
        path = _find_cgroup(root, spec)
    else:
        path = Path(spec)
    try:
        rel = path.resolve().relative_to(root)
        return len(rel.parts), os.stat(path).st_ino
    except (ValueError, OSError) as e:
        raise LsmError(f"{path} is not a cgroup under {root}") from e


def _find_cgroup(root: Path, cgroup_id: int) -> Path:
    """The v2 cgroup directory whose inode is `cgroup_id`."""
    for dirpath, _dirs, _files in os.walk(root):
        try:
            if os.stat(dirpath).st_ino == cgroup_id:
                return Path(dirpath)
        except OSError:
            continue
    raise LsmError(f"no cgroup with id {cgroup_id} under {root}")
