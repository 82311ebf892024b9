"""What the kernel may decide alone, computed from the policy for the sensor and BPF-LSM:
exec names, paths and inodes to kill or hold at exec entry, and the deletion rate to hold
at. Mixed into Engine (the sets change with the operator's remembered answers)."""

from __future__ import annotations

from collections.abc import Iterable

from ebpf_guard.events import Kind
from ebpf_guard.pathnames import normalize
from ebpf_guard.policy.identities import Identities, Inode
from ebpf_guard.policy.matchers import expand_all, expand_vars, is_literal, literal_dir, variables_in
from ebpf_guard.policy.memory import OperatorMemory
from ebpf_guard.policy.model import Rule, Tier
from ebpf_guard.verdicts import Mode, Verdict


class KernelSets:
    """The kernel fast path's sets (docs/policy.md, *Kernel fast path*), from the engine's
    rules, mode, workspace, identities and remembered answers."""

    _rules: tuple[Rule, ...]
    _mode: Mode
    _ids: Identities
    _memory: OperatorMemory
    workspace: str

    def kernel_kill_rules(self) -> list[Rule]:
        """Exec rules the kernel may apply alone (SIGKILL at exec): KILL in enforce mode, no
        argv/rate/path_not condition, no process condition or exception, not allowed by a
        remembered answer."""
        if self._mode is not Mode.ENFORCE:
            return []
        allowed = self._memory.allowed_rules()
        out = []
        for r in self._rules:
            m = r.match
            if (
                r.kind is not Kind.EXEC or r.verdict is not Verdict.KILL or r.tier is not Tier.DENY
                or r.rate is not None or r.userspace_only or r.name in allowed or (m.names and m.paths)
                or m.paths_not or m.args_any or m.args_regex or m.flags or m.operands
                or m.operands_not
            ):  # fmt: skip
                continue
            out.append(r)
        return out

    def kernel_gate_rules(self) -> list[Rule]:
        """Exec rules that can HALT, ASK or KILL (without a rate): held in the kernel until
        decided, unless the kernel can kill alone."""
        if self._mode is Mode.AUDIT:
            return []
        return [
            r for r in self._rules
            if r.kind is Kind.EXEC and r.verdict.severity >= Verdict.ASK.severity and not r.rate
        ]  # fmt: skip

    def _literal(self, pattern: str) -> str | None:
        """A name or path pattern as the kernel can compare it, or None (glob, `{home}`)."""
        if "home" in variables_in(pattern) or not is_literal(pattern):
            return None
        return expand_vars(pattern, {"workspace": self.workspace}, escape=False) or None

    def kernel_exec_kills(self) -> tuple[frozenset[str], frozenset[str]]:
        """(file names, exact paths) whose exec the kernel may SIGKILL at syscall entry.

        Only patterns the kernel can compare exactly: KILL exec rules in enforce mode without
        argv/rate/path_not conditions, literal names or paths, no `{home}` (per-user). A
        KILL is the most severe verdict and specific deny rules are evaluated before allow
        rules, so no allow rule can override these; an operator's remembered "allow" can,
        which is why this is recomputed on each call.
        """
        names: set[str] = set()
        paths: set[str] = set()
        for r in self.kernel_kill_rules():
            for p in r.match.names or r.match.paths:
                value = self._literal(p)
                if value is None:
                    continue
                if "/" in value:
                    paths.add(normalize(value))
                else:
                    names.add(value)
        return frozenset(names), frozenset(paths)

    def kernel_exec_gates(self) -> frozenset[str]:
        """File names whose exec the kernel holds (SIGSTOP at syscall entry) until this engine
        has decided: exec rules that can HALT, ASK or KILL but that the kernel cannot decide
        alone (argv conditions such as `rm -r` outside /tmp, or a freeze, which only userspace
        can do). The held program runs no instruction before the decision; the guard then
        kills it or lets it go (SIGCONT). Only a literal name or path's last component can be
        compared in the kernel; anything else is decided after the fact, as before.
        """
        killed, _ = self.kernel_exec_kills()
        names: set[str] = set()
        for r in self.kernel_gate_rules():
            for p in r.match.names or r.match.paths:
                value = self._literal(p)
                if value:
                    names.add(value.rsplit("/", 1)[-1])
        return frozenset(names - killed)

    def kernel_exec_inodes(self) -> tuple[frozenset[Inode], frozenset[Inode]]:
        """(kill, hold): the (st_dev, st_ino) of the binaries the same rules as
        `kernel_exec_kills()` (kill) and `kernel_exec_gates()` (hold) name, as found when the
        policy loaded (policy/identities.py: PATH lookup, symlinks resolved; multi-call binaries such
        as busybox left out). The kernel checks them at exec (the file that runs, whatever its
        name: a hard link, a renamed path) and at mmap(PROT_EXEC) (`ld.so /usr/bin/curl`).
        Name globs count too: identities expanded them on the host. Recompute after
        `remember()`, like kernel_exec_kills()."""
        tools = self._ids.tools

        def inodes(rules: list[Rule]) -> set[Inode]:
            out: set[Inode] = set()
            for r in rules:
                for p in r.match.names:
                    out |= tools.get(p, frozenset())
                for p in r.match.paths:
                    value = self._literal(p)
                    if value and value.startswith("/"):
                        out |= tools.get(normalize(value), frozenset())
            return out

        kill = inodes(self.kernel_kill_rules())
        hold = inodes(self.kernel_gate_rules()) - kill
        return frozenset(kill), frozenset(hold)

    def kernel_unlink_rate(self, homes: Iterable[str]) -> tuple[int, int, tuple[str, ...]]:
        """(count, window_ns, scratch directories) for the kernel's first response to mass
        deletes: the most sensitive unlink rule with a rate that can stop the agent (HALT,
        ASK, KILL) and only `path_not` conditions; (0, 0, ()) if there is none or in audit
        mode. The kernel counts every deletion except those beneath the scratch directories:
        the literal directories of the rule's `path_not` patterns that end in `/**` (with
        `{home}` for each of `homes`). Other exclusions (`*.swp`, `**/__pycache__/**`) are
        counted in the kernel, so it stops a deleter no later than this engine would; the
        guard lets it go again when the engine disagrees."""
        if self._mode is Mode.AUDIT:
            return 0, 0, ()
        rules = [
            r for r in self._rules
            if r.kind is Kind.UNLINK and r.rate is not None and r.verdict.severity >= Verdict.ASK.severity
            and not r.match.has_target() and r.match.dir is None and not r.match.has_process()
        ]  # fmt: skip
        if not rules:
            return 0, 0, ()
        rule = min(rules, key=lambda r: (r.rate.count, -r.rate.window_s))  # type: ignore[union-attr]
        variants = {"home": tuple(homes), "workspace": (self.workspace,) if self.workspace else ()}
        dirs: list[str] = []
        for pattern in rule.match.paths_not:
            for glob in expand_all(pattern, variants):
                if glob.endswith("/**") and glob.startswith("/") and literal_dir(glob) == glob[:-3]:
                    d = normalize(glob[:-3])
                    if d != "/" and d not in dirs:
                        dirs.append(d)
        assert rule.rate is not None
        return rule.rate.count, rule.rate.window_ns, tuple(dirs)
