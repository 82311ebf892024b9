"""Which mechanism enforces each rule of a policy on this host, and whether it prevents or
only contains: `ebpf-guard check --explain` and `doctor` print it; the README's verdict
table is its Markdown form.

The answer comes from the same plans the session builds (gates, egress, jail, the engine's
kernel exec and rate sets), so it cannot drift from what a session really does. Host
capabilities are probed once (`HostLayers.probe`); the rest is pure.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from ebpf_guard.events import Kind
from ebpf_guard.pathnames import normalize
from ebpf_guard.policy.matchers import expand_all, literal_dir
from ebpf_guard.verdicts import Mode, Verdict

if TYPE_CHECKING:
    from ebpf_guard.enforce.jail import JailPlan
    from ebpf_guard.policy import Policy, Rule

PREVENTS, CONTAINS, LOGS, ALLOWS = "prevents", "contains", "logs", "allows"
# Rule kinds that change files: the Landlock jail refuses them outside its writable places.
_WRITE_KINDS = frozenset({Kind.UNLINK, Kind.RENAME, Kind.LINK, Kind.SYMLINK, Kind.TRUNCATE})


@dataclass(frozen=True)
class HostLayers:
    """What this host offers for prevention (doctor's probes): each flag, and why not."""

    fanotify: bool
    landlock_abi: int
    cgroup_bpf: bool
    btf: bool
    bpf_lsm: bool
    why_not: tuple[str, ...] = ()

    @classmethod
    def probe(cls) -> HostLayers:
        from ebpf_guard import doctor
        from ebpf_guard.enforce.jail import landlock_support

        checks = {"fanotify": doctor.probe_fanotify(), "cgroup_bpf": doctor.probe_cgroup_bpf(),
                  "btf": doctor.check_btf(), "bpf_lsm": doctor.probe_bpf_lsm()}  # fmt: skip
        land = landlock_support()
        ok = {k: c.status in (doctor.OK, doctor.AVAIL) for k, c in checks.items()}
        why = [f"{c.name}: {c.detail}" for k, c in checks.items() if not ok[k]]
        if not land.abi:
            why.append(f"landlock: {land.reason}")
        return cls(**ok, landlock_abi=land.abi, why_not=tuple(why))


@dataclass(frozen=True)
class RuleEnforcement:
    """One rule: how `watch` and `run` enforce it here, and the effect of each."""

    rule: str
    kind: str
    verdict: str
    watch: str
    watch_effect: str
    run: str
    run_effect: str
    tier: str = ""  # the rule's evaluation tier (policy Tier): deny, allow, catch-all


def explain(policy: Policy, host: HostLayers, *, workspace: str, homes: list[str],
            mode: Mode | None = None) -> list[RuleEnforcement]:
    """Per rule of `policy` (in `mode`, default its own), the mechanisms of a session on
    this host. Plans are built as the session builds them (no marks, nothing attached)."""
    from ebpf_guard.enforce.egress import EgressError, plan_egress
    from ebpf_guard.enforce.gates import plan_gates
    from ebpf_guard.enforce.jail import plan_jail
    from ebpf_guard.policy.engine import Engine

    policy = replace(policy, mode=mode or policy.mode)
    engine = Engine(policy, workspace=workspace, home_of=lambda _uid: homes[0] if homes else None)
    gated = {}
    holding: set[str] = set()
    if host.fanotify:
        gate_plan = plan_gates(policy, workspace=workspace, homes=homes, identities=policy.identities)
        holding = {r.name for r in gate_plan.rules if r.holds}
        for mark in gate_plan.marks:
            for name in mark.rules:
                gated.setdefault(name, []).append(mark.target)
    egress = {}
    if host.cgroup_bpf:
        try:
            egress = {u.rule: u for u in plan_egress(policy).rules}
        except EgressError:
            egress = {}
    jail = plan_jail(policy, workspace=workspace, homes=homes, abi=host.landlock_abi)
    killed_names, killed_paths = engine.kernel_exec_kills()
    held = engine.kernel_exec_gates()
    rate_count, _, _ = engine.kernel_unlink_rate(homes)
    kill_rules = {r.name for r in engine.kernel_kill_rules()}  # the sets above, by rule
    hold_rules = {r.name for r in engine.kernel_gate_rules()}
    rate_rule = _unlink_rate_rule(policy, rate_count)
    rows = []
    for rule in policy.rules:
        watch: list[tuple[str, str]] = []
        if policy.mode is Mode.AUDIT or rule.verdict in (Verdict.SAFE, Verdict.FLAG):
            effect = ALLOWS if rule.verdict is Verdict.SAFE else LOGS
            what = "audit mode: logged only" if policy.mode is Mode.AUDIT else (
                "allowed" if rule.verdict is Verdict.SAFE else "logged (FLAGs escalate to HALT)")
            rows.append(RuleEnforcement(rule.name, rule.kind.value, rule.verdict.value, what, effect, what, effect,
                                        rule.tier.label))
            continue
        if host.bpf_lsm:
            watch += _lsm_use(rule, rate_rule)
        if rule.kind is Kind.EXEC and rule.name in kill_rules and (killed_names or killed_paths):
            watch.append(("kernel: SIGKILL at execve entry (literal names, and binaries by inode)", PREVENTS))
        elif rule.kind is Kind.EXEC and rule.name in hold_rules and held:
            watch.append(("kernel: exec hold until decided (SIGSTOP; a SIGCONT from anyone else is fatal)",
                          PREVENTS))
        # With BPF-LSM the gate keeps only what an LSM hook cannot decide (prevention.py).
        if rule.name in gated and (not host.bpf_lsm or rule.userspace_only or rule.verdict is Verdict.ASK):
            targets = set(gated[rule.name])
            if rule.name in holding:
                who = "a human's answer" if rule.verdict is Verdict.ASK else "the engine's verdict on who opens it"
                watch.append((f"fanotify gate: the open waits for {who}; EPERM if refused", PREVENTS))
            else:
                what = "exec and read of the binaries" if "binary" in targets else "opens of the files"
                watch.append((f"fanotify gate: EPERM for {what}", PREVENTS))
        if rule.name in egress:
            use = egress[rule.name]
            if use.kernel == "deny":
                watch.append(("cgroup-BPF egress: EPERM before any packet", PREVENTS))
            elif use.kernel == "burst":
                watch.append((f"cgroup-BPF egress: EPERM after {rule.rate.count if rule.rate else 0} "
                              "connections in the window", PREVENTS))
        if rule is rate_rule:
            watch.append((f"kernel rate hold: the deleter is stopped at deletion {rate_count}", PREVENTS))
        if not watch:
            watch.append(("userspace: " + _after_the_fact(rule), CONTAINS))
        run = list(watch)
        if rule.kind is Kind.IO_URING and jail.active and jail.deny_syscalls:
            run.insert(0, ("seccomp in the jail: EPERM for io_uring_setup", PREVENTS))
        elif _jail_covers(rule, jail, workspace, homes):
            run.insert(0, ("Landlock jail: EACCES outside the workspace and harmless places", PREVENTS))
        elif jail.active and _other_processes_only(rule):
            run.insert(0, ("Landlock jail: no ptrace-mode access (environ, mem) to processes outside it", PREVENTS))
        rows.append(RuleEnforcement(rule.name, rule.kind.value, rule.verdict.value,
                                    "; ".join(w for w, _ in watch), _effect(watch),
                                    "; ".join(w for w, _ in run), _effect(run), rule.tier.label))
    return rows


def _lsm_use(rule: Rule, rate_rule: Rule | None) -> list[tuple[str, str]]:
    """What bpf/lsm.c does with the rule (the selection of enforce/lsm.py's plan_lsm)."""
    if rule.userspace_only and rule is not rate_rule:
        return []  # who does it decides: the gate asks the engine (prevention.py)
    m, deny = rule.match, rule.verdict in (Verdict.KILL, Verdict.HALT)
    if rule is rate_rule:
        return [(f"BPF-LSM: EPERM for deletions after {rule.rate.count if rule.rate else 0}", PREVENTS)]
    conditions = m.args_any or m.args_regex or m.flags or m.operands or m.operands_not or m.paths_not
    if rule.kind in (Kind.EXEC, Kind.MMAP_EXEC) and not conditions and rule.rate is None:
        if rule.verdict is Verdict.KILL:
            return [("BPF-LSM: EPERM for exec, mmap and open of the binaries", PREVENTS)]
        if rule.verdict in (Verdict.HALT, Verdict.ASK):
            return [("BPF-LSM: EPERM for opens of the binaries other than exec (copy, ld.so)", PREVENTS)]
    if not deny or rule.rate is not None:
        return []
    if rule.kind is Kind.OPEN and m.paths:
        what = "any open" if not m.access or "read" in m.access else "opens for writing, writes, truncation"
        return [(f"BPF-LSM: EPERM for {what} of the files existing at start", PREVENTS)]
    if rule.kind in _WRITE_KINDS and m.paths:
        return [("BPF-LSM: EPERM for changes to the files existing at start", PREVENTS)]
    return []


def _effect(mechanisms: list[tuple[str, str]]) -> str:
    return PREVENTS if any(e == PREVENTS for _, e in mechanisms) else CONTAINS


def _after_the_fact(rule: Rule) -> str:
    if rule.verdict is Verdict.KILL:
        return "SIGKILL after the syscall"
    return "freeze after the syscall" + (" (ASK waits frozen)" if rule.verdict is Verdict.ASK else "")


def _unlink_rate_rule(policy: Policy, count: int) -> Rule | None:
    if not count:
        return None
    for r in policy.rules:
        if r.kind is Kind.UNLINK and r.rate is not None and r.rate.count == count and not r.match.has_target():
            return r
    return None


def _other_processes_only(rule: Rule) -> bool:
    """An open rule about other processes' /proc/PID/{environ,mem}: a Landlock domain denies
    its members ptrace-mode access to every process outside it, which these opens need."""
    paths = rule.match.paths
    return rule.kind is Kind.OPEN and bool(paths) and all(
        p.startswith("/proc/") and p.rsplit("/", 1)[-1] in ("environ", "mem") for p in paths)


def _jail_covers(rule: Rule, jail: JailPlan, workspace: str, homes: list[str]) -> bool:
    """Does the jail refuse everything this rule is about? Its catch-all write rules, and write
    rules whose places all lie outside every writable directory."""
    if not jail.active or not jail.handled_fs:
        return False
    writes = rule.kind in _WRITE_KINDS or (
        rule.kind is Kind.OPEN and rule.match.access and rule.match.access <= {"write", "create", "truncate"})
    if not writes or rule.rate is not None:
        return False
    if not rule.match.paths:
        return rule.catch_all
    writable = [r.path for r in jail.rules]
    variants = {"home": tuple(homes), "workspace": (workspace,)}
    for pattern in rule.match.paths:
        globs = expand_all(pattern, variants)
        if not globs or any(not g.startswith("/") for g in globs):
            return False  # `*id_rsa*`: anywhere, the workspace included
        for g in globs:
            base = normalize(literal_dir(g))
            if any(base == w or base.startswith(w.rstrip("/") + "/") or w.startswith(base + "/") for w in writable):
                return False
    return True


def render(rows: list[RuleEnforcement], *, markdown: bool = False) -> list[str]:
    if markdown:
        out = ["| rule | verdict | tier | `watch` here | effect | `run` here (adds the jail) | effect |",
               "|---|---|---|---|---|---|---|"]
        out += [f"| {r.rule} | {r.verdict} | {r.tier} | {r.watch} | **{r.watch_effect}** | {r.run} | "
                f"**{r.run_effect}** |" for r in rows]
        return out
    out = []
    for r in rows:
        tier = f" [tier {r.tier}]" if r.tier else ""
        out.append(f"  {r.rule} ({r.kind}, {r.verdict}): watch {r.watch_effect}: {r.watch}{tier}")
        if r.run != r.watch:
            out.append(f"    run {r.run_effect}: {r.run}")
    return out
