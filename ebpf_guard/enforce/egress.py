"""Network egress decided in the kernel: cgroup-BPF connect4/6 and sendmsg4/6 (bpf/egress.c).

The sensor sees a connect after the fact; these programs judge it before any packet leaves. A
destination the policy denies fails with EPERM in the caller: TCP connect, TCP Fast Open
(sendto with MSG_FASTOPEN passes the same pre_connect hook), UDP connect, and UDP
sendto/sendmsg with a destination. IPv4-mapped IPv6 destinations are judged as the IPv4 address.
A rule's `protocol:` (Match.protocols) is judged in the kernel too: each decision holds one
action per protocol class of the socket (PROTOCOLS; bpf_sock_addr.type and .protocol), so
`connect: {addr: $system_resolvers, port: 53, protocol: [udp]}` lets DNS over UDP through and
leaves TCP to port 53 to the rules below it. Rules on who connects (comm, exe, ancestors,
exceptions) are left to userspace: the hook cannot tell.

Two halves:
  plan_egress(policy, hosts=...)  pure: compiles the policy's connect rules into one decision
                                  per address prefix and port range (EgressPlan), mirroring the
                                  engine's evaluation order (docs/policy.md)
  Egress(cgroup, plan)            the kernel side: loads, fills the maps, attaches to a cgroup v2

What the kernel does with each verdict: SAFE and FLAG pass (FLAG is counted in userspace); ASK,
HALT and KILL fail with EPERM. An ASK cannot wait in the kernel, so it is denied there and still
asked in userspace; when a human approves, `Egress.allow(addr, port)` admits that destination
and the agent's retry works. One rate rule (the default policy's `network-burst`) becomes an
in-kernel sliding-window counter: the first `count` connects within the window pass (so the
engine sees them and fires), later ones fail until `Egress.reset_burst()`.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ebpf_guard import host
from ebpf_guard.enforce import cgroups
from ebpf_guard.events import Kind
from ebpf_guard.paths import BPF_DIR
from ebpf_guard.policy import Policy, Rule
from ebpf_guard.policy.matchers import canonical_ip, parse_network
from ebpf_guard.verdicts import Mode, Verdict

SOURCE = BPF_DIR / "egress.c"

# Action bits per port range (bpf/egress.c: EG_DENY, EG_COUNT, EG_TRIP), one nibble per
# protocol class: the kernel shifts the action word by 4 * class (bpf/egress.c, eg_class()).
DENY, COUNT, TRIP = 1, 2, 4
# Event.protocol names in class order (sensor/decode.socket_protocol names the same sockets);
# "" is every other inet socket: a rule with `protocol:` never matches it.
PROTOCOLS = ("tcp", "udp", "raw", "icmp", "sctp", "")
CLASS_BITS = 4
_NIBBLE = (1 << CLASS_BITS) - 1
MAX_SEGS = 16  # EG_MAX_SEGS: port ranges per prefix that differ from its base action
MAX_BURST = 4096  # EG_MAX_BURST
MAX_PREFIXES = 16384  # EG_MAX_PREFIXES, per trie
COUNTERS = ("seen", "denied", "burst_denied", "counted", "operator_allowed")  # EG_C_* order
BPF_F_ALLOW_MULTI = 1 << 1
_DENIES = frozenset({Verdict.ASK, Verdict.HALT, Verdict.KILL})
_IP_FAMILIES = ("ipv4", "ipv6")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
IP = ipaddress.IPv4Address | ipaddress.IPv6Address


class EgressError(Exception):
    """Egress enforcement cannot be planned, started or changed; one line for the user."""


# ---------------------------------------------------------------- the plan (pure)


@dataclass(frozen=True, slots=True)
class Destination:
    """What the kernel does for one address prefix: `base` for every port, except the
    (lo, hi, action) ranges in `ports`. Action bits: DENY, COUNT, TRIP."""

    prefix: str
    base: int
    ports: tuple[tuple[int, int, int], ...] = ()

    def describe(self) -> str:
        parts = [f"{lo}-{hi}: {_act(a)}" if lo != hi else f"{lo}: {_act(a)}" for lo, hi, a in self.ports]
        return f"{self.prefix} {_act(self.base)}" + (f" (ports {', '.join(parts)})" if parts else "")


@dataclass(frozen=True, slots=True)
class RuleUse:
    """What the kernel does with one connect rule."""

    rule: str
    verdict: str
    kernel: str  # "deny", "allow", "burst", "userspace"
    detail: str


@dataclass(frozen=True, slots=True)
class Burst:
    """The rate rule counted in the kernel."""

    rule: str
    count: int
    window_s: float


@dataclass(frozen=True)
class EgressPlan:
    """The policy's connect rules compiled for the kernel: one decision per address prefix and
    port range, for IPv4 (`v4`), IPv6 (`v6`) and IPv4 reached through IPv6 sockets (`mapped4`:
    the same IPv4 prefixes, judged with the rules of family ipv6, as the engine reads them).
    `enforce` False (audit mode): the kernel judges and counts, and denies nothing."""

    enforce: bool
    v4: tuple[Destination, ...]
    v6: tuple[Destination, ...]
    mapped4: tuple[Destination, ...]
    burst: Burst | None
    rules: tuple[RuleUse, ...]
    notes: tuple[str, ...]
    hosts: dict[str, tuple[str, ...]] = field(default_factory=dict)
    policy: Policy | None = field(default=None, compare=False, repr=False)
    mode: Mode = Mode.ENFORCE

    def with_hosts(self, mapping: dict[str, list[str]]) -> EgressPlan:
        """The same policy planned again with new DNS answers."""
        if self.policy is None:
            raise EgressError("this plan has no policy to re-plan host names with")
        return plan_egress(self.policy, hosts=mapping, mode=self.mode)

    def decide(self, addr: str, port: int, protocol: str = "") -> int:
        """The action bits the kernel applies to `addr`:`port` over `protocol` (Event.protocol;
        "" or a name the kernel has no class for: the unknown class), as bpf/egress.c looks
        them up (longest prefix; an IPv4-mapped address as its IPv4 address), pins aside."""
        try:
            ip: IP = ipaddress.ip_address(addr)
        except ValueError:
            raise EgressError(f"not an IP address: {addr!r}") from None
        table = self.v4 if ip.version == 4 else self.v6
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            table, ip = self.mapped4, ip.ipv4_mapped
        dest = max((d for d in table if ip in ipaddress.ip_network(d.prefix)),
                   key=lambda d: ipaddress.ip_network(d.prefix).prefixlen)
        word = next((a for lo, hi, a in dest.ports if lo <= port <= hi), dest.base)
        return _of_class(word, protocol)

    def describe(self) -> list[str]:
        out = [f"egress in the kernel: {'enforcing' if self.enforce else 'audit (nothing denied)'}"]
        if self.policy is not None:
            out.append(f"  connects no rule matches: {self.policy.default.value} "
                       f"({'deny' if self.policy.default in _DENIES else 'allow'})")
        out += [f"  rule {u.rule} ({u.verdict}): {u.kernel}: {u.detail}" for u in self.rules]
        for label, dests in (("ipv4", self.v4), ("ipv6", self.v6), ("ipv4 via ipv6", self.mapped4)):
            out += [f"  {label} {d.describe()}" for d in dests]
        out += [f"  note: {n}" for n in self.notes]
        return out

    def as_record(self) -> dict[str, Any]:
        def dests(ds: tuple[Destination, ...]) -> list[dict[str, Any]]:
            return [{"prefix": d.prefix, "base": _act(d.base),
                     "ports": [{"lo": lo, "hi": hi, "action": _act(a)} for lo, hi, a in d.ports]} for d in ds]

        return {
            "type": "egress_plan", "enforce": self.enforce, "mode": self.mode.value,
            "rules": [{"rule": u.rule, "verdict": u.verdict, "kernel": u.kernel, "detail": u.detail}
                      for u in self.rules],
            "burst": None if self.burst is None else {"rule": self.burst.rule, "count": self.burst.count,
                                                      "window_s": self.burst.window_s},
            "ipv4": dests(self.v4), "ipv6": dests(self.v6), "ipv4_via_ipv6": dests(self.mapped4),
            "hosts": {h: list(a) for h, a in self.hosts.items()}, "notes": list(self.notes),
        }  # fmt: skip


def _of_class(word: int, protocol: str) -> int:
    """One protocol's action bits out of an action word."""
    cls = PROTOCOLS.index(protocol) if protocol in PROTOCOLS else PROTOCOLS.index("")
    return (word >> (CLASS_BITS * cls)) & _NIBBLE


def _act(word: int) -> str:
    """An action word in words: one phrase if every protocol is treated alike, else per protocol
    ("udp: allow; tcp/raw/icmp/sctp/other: deny")."""
    groups: dict[int, list[str]] = {}
    for proto in PROTOCOLS:
        groups.setdefault(_of_class(word, proto), []).append(proto or "other")
    if len(groups) == 1:
        return _bits(next(iter(groups)))
    return "; ".join(f"{'/'.join(names)}: {_bits(a)}" for a, names in groups.items())


def _bits(action: int) -> str:
    words = ["deny" if action & DENY else "allow"]
    if action & COUNT:
        words.append("count")
    if action & TRIP:
        words.append("deny-after-burst")
    return "+".join(words)


def plan_egress(
    policy: Policy, *, hosts: dict[str, list[str]] | None = None, mode: Mode | None = None
) -> EgressPlan:
    """Compile `policy`'s connect rules for families ipv4/ipv6 into kernel decisions.

    `hosts`: DNS answers for the names `host` conditions use (HostResolver), as for
    `Engine.set_host_addresses`; `mode`: the CLI's --mode, else the policy's."""
    mode = mode or policy.mode
    host_ips = _host_ips(hosts or {})
    judged, burst_rule, uses, notes = _classify(policy)
    burst = None
    if burst_rule is not None and burst_rule.rate is not None:
        burst = Burst(burst_rule.name, burst_rule.rate.count, burst_rule.rate.window_s)
    space = _Space(policy, judged, burst_rule, host_ips, mode)
    nets4, nets6 = space.prefixes()
    v4 = tuple(space.destination(n, "ipv4") for n in nets4)
    v6 = tuple(space.destination(n, "ipv6") for n in nets6)
    mapped4 = tuple(space.destination(n, "ipv6") for n in nets4)
    for label, dests in (("ipv4", v4), ("ipv6", v6)):
        if len(dests) > MAX_PREFIXES:
            raise EgressError(f"{len(dests)} {label} prefixes in the policy and host answers (at most {MAX_PREFIXES})")
    if mode is Mode.AUDIT:
        notes.append("audit mode: the kernel judges and counts, and denies nothing")
    if any(r.match.hosts for r in judged) and not hosts:
        notes.append("host rules match nothing until host names are resolved (Egress.update_hosts)")
    return EgressPlan(
        enforce=mode is not Mode.AUDIT, v4=v4, v6=v6, mapped4=mapped4, burst=burst, rules=tuple(uses),
        notes=tuple(notes), hosts={h: tuple(str(ip) for ip in ips) for h, ips in sorted(host_ips.items())},
        policy=policy, mode=mode,
    )


def _host_ips(mapping: dict[str, list[str]]) -> dict[str, frozenset[IP]]:
    out: dict[str, frozenset[IP]] = {}
    for name, addrs in mapping.items():
        ips = {ip for a in addrs if (ip := canonical_ip(a)) is not None}
        out[name.lower().rstrip(".")] = frozenset(ips)
    return out


def _classify(policy: Policy) -> tuple[list[Rule], Rule | None, list[RuleUse], list[str]]:
    """(rules the kernel judges, the rate rule it counts, what happens to each rule, notes)."""
    judged: list[Rule] = []
    burst: Rule | None = None
    uses: list[RuleUse] = []
    notes: list[str] = []
    for r in policy.rules:
        if r.kind is not Kind.CONNECT:
            continue
        m, verdict = r.match, r.verdict.value
        why = None
        if m.family and not (m.family & set(_IP_FAMILIES)):
            why = "unix sockets only (issue #12)"
        elif m.paths:
            why = "a socket path condition (unix sockets, issue #12): never an IP destination"
        elif _protocols(r) and not _protocols(r) & set(PROTOCOLS):
            why = "unix socket protocols only: never an IP destination"
        elif m.has_process() or r.exceptions:
            # The kernel hook cannot tell who connects: a deny enforced for everyone would refuse
            # what the rule spares. Left out, a connect it would allow meets the catch-all here.
            why = "conditions on who connects (comm, exe, ancestors, exceptions): only the engine judges them"
        elif r.rate is not None and burst is not None:
            why = f"the kernel counts one rate rule ({burst.name})"
        elif r.rate is not None and r.rate.count > MAX_BURST:
            why = f"rate count {r.rate.count} is over the kernel's {MAX_BURST}"
        if why is not None:
            uses.append(RuleUse(r.name, verdict, "userspace", why))
            notes.append(f"rule {r.name}: left to userspace: {why}")
        elif r.rate is not None:
            burst = r
            uses.append(RuleUse(r.name, verdict, "burst",
                                f"counted in the kernel: after {r.rate.count} within {r.rate.window_s:g}s, "
                                "EPERM until reset_burst()"))
        else:
            judged.append(r)
            uses.append(RuleUse(r.name, verdict, *_use_of(r)))
    return judged, burst, uses, notes


def _use_of(rule: Rule) -> tuple[str, str]:
    hosts = " (host names: by their resolved addresses)" if rule.match.hosts else ""
    protocols = _protocols(rule)
    if protocols:
        hosts += f" (protocol {', '.join(sorted(protocols))} only: the socket's, read in the kernel)"
    if rule.verdict is Verdict.ASK:
        return "deny", "EPERM in the kernel, asked in userspace; Egress.allow() admits an approved destination" + hosts
    if rule.verdict in _DENIES:
        return "deny", "EPERM in the kernel, and the verdict in userspace" + hosts
    if rule.verdict is Verdict.FLAG:
        return "allow", "passes; FLAG is counted in userspace" + hosts
    return "allow", "passes" + hosts


class _Space:
    """Decides every address prefix the policy names, for a family, as the engine would."""

    def __init__(self, policy: Policy, judged: list[Rule], burst: Rule | None,
                 host_ips: dict[str, frozenset[IP]], mode: Mode) -> None:
        self.policy, self.judged, self.burst, self.host_ips, self.mode = policy, judged, burst, host_ips, mode
        every = [*judged, *([burst] if burst else [])]
        self.nets = {id(r): [parse_network(a) for a in r.match.addrs] for r in every}
        self.nets_not = {id(r): [parse_network(a) for a in r.match.addrs_not] for r in every}

    def prefixes(self) -> tuple[list[ipaddress.IPv4Network], list[ipaddress.IPv6Network]]:
        """Every prefix whose longest match can decide differently: the rules' networks, every
        address a host name resolves to, and /0."""
        found: set[Network] = {ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")}
        for nets in (*self.nets.values(), *self.nets_not.values()):
            found.update(nets)
        for ips in self.host_ips.values():
            found.update(ipaddress.ip_network(ip) for ip in ips)
        v4 = sorted(n for n in found if isinstance(n, ipaddress.IPv4Network))
        v6 = sorted(n for n in found if isinstance(n, ipaddress.IPv6Network))
        return v4, v6

    def _matches(self, rule: Rule, prefix: Network, family: str) -> bool:
        """Does `rule` hold for every address whose longest match is `prefix` (ports aside)?"""
        m = rule.match
        if m.family and family not in m.family:
            return False
        nets = self.nets[id(rule)]
        if nets and not any(_within(prefix, n) for n in nets):
            return False
        if any(_within(prefix, n) for n in self.nets_not[id(rule)]):
            return False
        if m.hosts:
            if prefix.prefixlen != prefix.max_prefixlen:
                return False
            ip = prefix.network_address
            if not any(ip in self.host_ips.get(h, ()) for h in m.hosts):
                return False
        return True

    def destination(self, prefix: Network, family: str) -> Destination:
        rules = [r for r in self.judged if self._matches(r, prefix, family)]
        burst = self.burst if self.burst is not None and self._matches(self.burst, prefix, family) else None
        cuts = {0, 65536}
        for r in [*rules, *([burst] if burst else [])]:
            for lo, hi in r.match.ports:
                cuts.update((lo, hi + 1))
        edges = sorted(cuts)
        runs: list[list[int]] = []
        for lo, nxt in zip(edges, edges[1:], strict=False):
            action = self._action(rules, burst, lo)
            if runs and runs[-1][2] == action:
                runs[-1][1] = nxt - 1
            else:
                runs.append([lo, nxt - 1, action])
        counts: dict[int, int] = {}
        for run in runs:
            counts[run[2]] = counts.get(run[2], 0) + 1
        base = max(counts, key=lambda a: (counts[a], -a))
        ports = tuple((lo, hi, a) for lo, hi, a in runs if a != base)
        if len(ports) > MAX_SEGS:
            raise EgressError(f"{prefix}: {len(ports)} port ranges decide differently (the kernel holds {MAX_SEGS})")
        return Destination(str(prefix), base, ports)

    def _action(self, rules: list[Rule], burst: Rule | None, port: int) -> int:
        """The action word of a port: each protocol class's bits, from the rules that hold
        for that protocol."""
        word = 0
        for cls, proto in enumerate(PROTOCOLS):
            these = [r for r in rules if _protocol_in(r, proto)]
            counted = burst if burst is not None and _protocol_in(burst, proto) else None
            word |= self._class_action(these, counted, port) << (CLASS_BITS * cls)
        return word

    def _class_action(self, rules: list[Rule], burst: Rule | None, port: int) -> int:
        hits = [r for r in rules if _port_in(r, port)]
        action = DENY if self._verdict(hits) in _DENIES else 0
        if burst is not None and _port_in(burst, port):
            action |= COUNT
            if self._verdict([*hits, burst]) in _DENIES:
                action |= TRIP
        return action

    def _verdict(self, hits: list[Rule]) -> Verdict:
        """The engine's evaluation order (docs/policy.md) without remembered answers."""
        verdict = self.policy.default
        for tier in (1, 2, 3):
            in_tier = [r for r in hits if r.tier == tier]
            if in_tier:
                verdict = Verdict.SAFE if tier == 2 else max(in_tier, key=lambda r: r.verdict.severity).verdict
                break
        if verdict is Verdict.HALT and self.mode is Mode.CONFIRM:
            return Verdict.ASK
        return verdict


def _within(inner: Network, outer: Network) -> bool:
    return inner.version == outer.version and inner.subnet_of(outer)  # type: ignore[arg-type]


def _port_in(rule: Rule, port: int) -> bool:
    return not rule.match.ports or any(lo <= port <= hi for lo, hi in rule.match.ports)


def _protocols(rule: Rule) -> frozenset[str]:
    """The rule's `protocol:` condition (Match.protocols; empty: any protocol)."""
    return frozenset(getattr(rule.match, "protocols", None) or ())


def _protocol_in(rule: Rule, protocol: str) -> bool:
    """Does the rule hold for sockets of `protocol`? The unknown class ("") matches only rules
    without a protocol condition, as Event.protocol "" does in the engine."""
    protocols = _protocols(rule)
    return not protocols or (protocol != "" and protocol in protocols)


# ---------------------------------------------------------------- the kernel side

_HOOKS = (  # program in bpf/egress.c, bcc's BPFAttachType name
    ("egress_connect4", "CGROUP_INET4_CONNECT"),
    ("egress_connect6", "CGROUP_INET6_CONNECT"),
    ("egress_sendmsg4", "CGROUP_UDP4_SENDMSG"),
    ("egress_sendmsg6", "CGROUP_UDP6_SENDMSG"),
)
_TRIES = ((b"eg_v4", "v4"), (b"eg_v6", "v6"), (b"eg_m4", "mapped4"))


def _words(ip: IP) -> list[int]:
    """An address as the u32 words the kernel keeps it in (network byte order in memory)."""
    raw = ip.packed
    return [int.from_bytes(raw[i : i + 4], "little") for i in range(0, len(raw), 4)]


class _Maps:
    """The loaded object's maps: writes plans into the LPM tries (only what changed) and reads
    the counters. Keys are written before stale ones are deleted, so an address is never left
    without its prefix's decision."""

    def __init__(self, bpf: Any) -> None:
        self.bpf = bpf
        self.written: dict[bytes, dict[tuple[int, ...], Destination]] = {name: {} for name, _ in _TRIES}

    def _key(self, table: Any, net: Network) -> Any:
        key = table.Key()
        key.prefixlen = net.prefixlen
        words = _words(net.network_address)
        if isinstance(net, ipaddress.IPv4Network):
            key.addr = words[0]
        else:
            for i, w in enumerate(words):
                key.addr[i] = w
        return key

    def _leaf(self, table: Any, dest: Destination) -> Any:
        leaf = table.Leaf()
        leaf.base, leaf.nseg = dest.base, len(dest.ports)
        for i, (lo, hi, action) in enumerate(dest.ports):
            leaf.seg[i].lo, leaf.seg[i].hi, leaf.seg[i].action = lo, hi, action
        return leaf

    def write_plan(self, plan: EgressPlan) -> None:
        config = self.bpf[b"eg_config"]
        leaf = config.Leaf()
        leaf.enforce = int(plan.enforce)
        leaf.burst_count = plan.burst.count if plan.burst else 0
        leaf.burst_window_ns = int(plan.burst.window_s * 1e9) if plan.burst else 0
        for name, attr in _TRIES:
            self._sync(name, getattr(plan, attr))
        config[config.Key(0)] = leaf

    def _sync(self, name: bytes, dests: Iterable[Destination]) -> None:
        table, old = self.bpf[name], self.written[name]
        new: dict[tuple[int, ...], Destination] = {}
        for d in dests:
            net = ipaddress.ip_network(d.prefix)
            ident = (net.prefixlen, int(net.network_address))
            new[ident] = d
            if old.get(ident) != d:
                table[self._key(table, net)] = self._leaf(table, d)
        for ident, d in old.items():
            if ident not in new:
                del table[self._key(table, ipaddress.ip_network(d.prefix))]
        self.written[name] = new

    def pin(self, ip: IP, port: int) -> None:
        table = self.bpf[b"eg_pins"]
        key = table.Key()
        key.family, key.port = ip.version, port
        for i, w in enumerate(_words(ip)):
            key.addr[i] = w
        table[key] = table.Leaf(1)

    def reset_burst(self, count: int) -> None:
        """Forget the counted connects (the ring first: a connect between the writes then sees an
        emptier window, never a fuller one) and clear the trip."""
        ring = self.bpf[b"eg_burst_ring"]
        for i in range(min(count, MAX_BURST)):
            ring[ring.Key(i)] = ring.Leaf(0)
        state = self.bpf[b"eg_burst_state"]
        state[state.Key(0)] = state.Leaf()

    def counters(self) -> dict[str, int]:
        table = self.bpf[b"eg_counters"]
        out = {name: int(sum(table[table.Key(i)])) for i, name in enumerate(COUNTERS)}
        state = self.bpf[b"eg_burst_state"][self.bpf[b"eg_burst_state"].Key(0)]
        out["burst_tripped"] = int(state.tripped)
        return out


class Egress:
    """The egress programs of one watched cgroup v2: owns the bcc object (programs and maps),
    the open cgroup fd and the attachments. Attached with BPF_F_ALLOW_MULTI, so programs others
    attached to the cgroup stay and run too (every one must allow). Attachments made with
    BPF_PROG_ATTACH outlive this process: `close()` detaches them; a guard that dies leaves
    them enforcing (fail closed) until the cgroup is removed."""

    def __init__(self, cgroup_v2_path: str | Path, plan: EgressPlan, *, source: Path = SOURCE) -> None:
        self.cgroup = Path(os.path.normpath(str(cgroup_v2_path)))
        self.plan = plan
        self.source = Path(source)
        self._bpf: Any = None
        self._maps: _Maps | None = None
        self._cg_fd: int | None = None
        self._attached: list[tuple[Any, int]] = []  # (program, attach type)

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Compile, load, fill the maps and attach; EgressError (one line) if any step fails,
        with whatever was done undone."""
        if self._bpf is not None:
            raise EgressError("egress enforcement is already started")
        self._check_cgroup()
        try:
            host.require_root("to attach cgroup-BPF programs")
            bcc = host.import_bcc()
        except host.HostError as e:
            raise EgressError(str(e)) from e
        try:
            self._load(bcc)
            assert self._maps is not None
            self._maps.write_plan(self.plan)
            self._attach(bcc)
        except BaseException:
            self.close()
            raise

    def _check_cgroup(self) -> None:
        try:
            root = cgroups.find_v2_mount()
        except cgroups.CgroupError as e:
            raise EgressError(str(e)) from e
        if not cgroups.is_within(self.cgroup, root) or not (self.cgroup / "cgroup.controllers").is_file():
            raise EgressError(f"{self.cgroup} is not a cgroup v2 directory (cgroup v2 is mounted at {root})")
        try:
            cgroups.refuse_outside_scope(self.cgroup)
        except cgroups.ScopeError as e:
            raise EgressError(str(e)) from e

    def _load(self, bcc: Any) -> None:
        loaded = host.bcc_load(src_file=str(self.source).encode(), cflags=[f"-I{self.source.resolve().parent}"])
        self._bpf = loaded.bpf
        if loaded.error is not None:
            reason = host.bpf_failure_reason(loaded.output, loaded.error)
            raise EgressError(f"{self.source}: cannot compile the egress programs: {reason}")
        self._maps = _Maps(self._bpf)
        for name, attach in _HOOKS:
            with host.StderrCapture() as out:
                try:
                    self._bpf.load_func(name.encode(), bcc.BPF.CGROUP_SOCK_ADDR,
                                        attach_type=getattr(bcc.BPFAttachType, attach))
                except Exception as e:  # noqa: BLE001 - bcc raises bare Exception; the verifier's reason is on fd 2
                    reason = host.bpf_failure_reason(out.text, e)
                    raise EgressError(f"{self.source}: {name} not loaded: {reason}") from e

    def _attach(self, bcc: Any) -> None:
        try:
            self._cg_fd = os.open(self.cgroup, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            raise EgressError(f"cannot open cgroup {self.cgroup}: {e.strerror}") from e
        for name, attach in _HOOKS:
            fn, kind = self._bpf.funcs[name.encode()], getattr(bcc.BPFAttachType, attach)
            try:
                bcc.BPF.attach_func(fn, self._cg_fd, kind, BPF_F_ALLOW_MULTI)
            except Exception as e:  # noqa: BLE001 - bcc raises bare Exception with strerror in it
                raise EgressError(f"cannot attach {name} to {self.cgroup}: {str(e).split(': ')[-1]} "
                                  "(another program attached without BPF_F_ALLOW_MULTI?)") from e
            self._attached.append((fn, kind))

    def close(self) -> None:
        """Detach from the cgroup and unload. Safe to call twice, and after a failed start."""
        if self._attached:
            bcc = host.import_bcc()
            for fn, kind in self._attached:
                try:
                    bcc.BPF.detach_func(fn, self._cg_fd, kind)
                except Exception:  # noqa: BLE001, S110 - the cgroup is gone: nothing is attached any more
                    pass
            self._attached = []
        if self._cg_fd is not None:
            os.close(self._cg_fd)
            self._cg_fd = None
        if self._bpf is not None:
            host.discard(self._bpf)
            self._bpf, self._maps = None, None

    def __enter__(self) -> Egress:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- while running ---------------------------------------------------------------------

    def _running(self) -> _Maps:
        if self._maps is None:
            raise EgressError("egress enforcement is not started")
        return self._maps

    def update_hosts(self, mapping: dict[str, list[str]]) -> None:
        """New DNS answers (host name -> IPs) for the policy's `host` rules: the plan is made
        again and the tries changed where it differs; a name missing from `mapping` (or with no
        addresses) matches nothing any more."""
        maps = self._running()
        plan = self.plan.with_hosts(mapping)
        maps.write_plan(plan)
        self.plan = plan

    def allow(self, addr: str, port: int) -> None:
        """Admit one destination the policy denies (a human approved the ASK), for as long as
        this object runs. An IPv4-mapped address is its IPv4 address. The burst still counts."""
        ip = canonical_ip(addr)
        if ip is None:
            raise EgressError(f"not an IP address: {addr!r}")
        if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
            raise EgressError(f"not a port: {port!r}")
        self._running().pin(ip, port)

    def reset_burst(self) -> None:
        """Start counting the burst again (the guard decided about the burst it saw)."""
        self._running().reset_burst(self.plan.burst.count if self.plan.burst else 0)

    def counters(self) -> dict[str, int]:
        """seen, denied, burst_denied, counted, operator_allowed, burst_tripped (0/1)."""
        return self._running().counters()
