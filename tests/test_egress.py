"""Egress decided in the kernel (enforce/egress.py, bpf/egress.c).

The plan is checked against the engine itself (pure). The kernel tests send real traffic from a
process in a test cgroup to a receiver in a network namespace (tests/netns.py) and assert on
what arrived there: a denied destination receives nothing, an allowed one the bytes.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ebpf_guard.enforce.egress import COUNT, DENY, TRIP, Egress, EgressError, plan_egress
from ebpf_guard.events import Event, Kind
from ebpf_guard.paths import POLICY_DIR
from ebpf_guard.policy import Policy, load_policy, parse_policy
from ebpf_guard.policy.engine import Engine
from ebpf_guard.verdicts import Mode, Verdict
from tests.conftest import requires_bpf
from tests.netns import NetnsHost

DENIED_TCP, CIDR_TCP, HOST_TCP, BURST_TCP = 9090, 8080, 443, 7000
DENIED_UDP, DNS_UDP = 9999, 53

# The lab: 10.203.0.0/16 and fd00:203::/32 on port 8080 by address, api.lab.test:443 by name,
# loopback; everything else needs a human (ASK), as strict.yaml's unknown-network.
LAB_POLICY = """
version: 1
default: SAFE
rules:
  - name: lab-web
    connect: {addr: [10.203.0.0/16, "fd00:203::/32"], port: 8080}
    verdict: SAFE
  - name: lab-api
    connect: {host: api.lab.test, port: 443}
    verdict: SAFE
  - name: loopback
    connect: {addr: [127.0.0.0/8, "::1"]}
    verdict: SAFE
  - name: docker
    connect: {path: /run/docker.sock}
    verdict: KILL
  - name: unknown
    connect: {family: [ipv4, ipv6]}
    verdict: ASK
"""

BURST_POLICY = """
version: 1
default: SAFE
rules:
  - name: burst
    connect: {family: [ipv4, ipv6], addr_not: [127.0.0.0/8, "::1"]}
    rate: {count: 5, window: 60s}
    verdict: HALT
"""

# A process that makes the network calls it is told to (one JSON line in, one out) and answers
# with the errno of each (0: it went through).
_AGENT = r"""
import json, socket, sys

def family(addr):
    return socket.AF_INET6 if ":" in addr else socket.AF_INET

def tcp(addr, port, data, fastopen=False):
    s = socket.socket(family(addr), socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        if fastopen:
            s.sendto(data.encode(), socket.MSG_FASTOPEN, (addr, port))
        else:
            s.connect((addr, port))
            s.sendall(data.encode())
        return 0
    except OSError as e:
        return e.errno
    finally:
        s.close()

def udp(addr, port, data, how="sendto"):
    s = socket.socket(family(addr), socket.SOCK_DGRAM)
    try:
        if how == "sendto":
            s.sendto(data.encode(), (addr, port))
        elif how == "sendmsg":
            s.sendmsg([data.encode()], [], 0, (addr, port))
        else:
            s.connect((addr, port))
            s.send(data.encode())
        return 0
    except OSError as e:
        return e.errno
    finally:
        s.close()

for line in sys.stdin:
    cmd = json.loads(line)
    op = cmd.pop("op")
    if op == "burst":
        out = [tcp(cmd["addr"], cmd["port"], "") for _ in range(cmd["n"])]
    else:
        out = (tcp if op == "tcp" else udp)(**cmd)
    print(json.dumps(out), flush=True)
"""


class Agent:
    """A long-lived process (in a cgroup or not) making network calls on request."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc

    def call(self, op: str, **kw: object) -> object:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def tcp(self, addr: str, port: int, data: str, fastopen: bool = False) -> int:
        return int(self.call("tcp", addr=addr, port=port, data=data, fastopen=fastopen))  # type: ignore[arg-type]

    def udp(self, addr: str, port: int, data: str, how: str = "sendto") -> int:
        return int(self.call("udp", addr=addr, port=port, data=data, how=how))  # type: ignore[arg-type]


# ---------------------------------------------------------------- the plan is the engine's


def _engine(policy: Policy, hosts: dict[str, list[str]]) -> Engine:
    eng = Engine(policy, workspace="/w", home_of=lambda uid: None)
    eng.set_host_addresses(hosts)
    return eng


def _connect(addr: str, port: int, t: int = 0, pid: int = 100) -> Event:
    fam = "ipv6" if ":" in addr else "ipv4"
    return Event(kind=Kind.CONNECT, ts_ns=10**12 + t, pid=pid, tgid=pid, ppid=1, uid=1000, comm="agent",
                 start_ns=pid, cgroup_id=7, family=fam, addr=addr, port=port)


DESTINATIONS = [
    "10.203.9.2", "10.204.0.1", "127.0.0.1", "127.9.9.9", "140.82.121.4", "192.0.2.7", "8.8.8.8",
    "fd00:203::2", "fd00:204::2", "::1", "2001:db8::1", "::ffff:10.203.9.2", "::ffff:127.0.0.1",
    "::ffff:140.82.121.4", "::ffff:192.0.2.7",
]
PORTS = [0, 22, 53, 443, 444, 8080, 8081, 65535]
HOSTS = {"api.lab.test": ["192.0.2.7", "2001:db8::1"], "api.github.com": ["140.82.121.4"]}


@pytest.mark.parametrize("source", ["default", "strict", "lab", "burst"])
def test_plan_denies_exactly_what_the_engine_denies(source: str) -> None:
    """For every sample destination: DENY iff the engine's verdict is ASK/HALT/KILL; COUNT iff
    the rate rule counts it; TRIP iff the engine's verdict once the rate rule fires denies."""
    text = {"lab": LAB_POLICY, "burst": BURST_POLICY}.get(source)
    policy = parse_policy(text) if text else load_policy(POLICY_DIR / f"{source}.yaml", identities=False)
    plan = plan_egress(policy, hosts=HOSTS)
    rate = next((r for r in policy.rules if r.kind is Kind.CONNECT and r.rate), None)
    denies = {Verdict.ASK, Verdict.HALT, Verdict.KILL}
    for addr in DESTINATIONS:
        for port in PORTS:
            action = plan.decide(addr, port)
            once = _engine(policy, HOSTS).evaluate(_connect(addr, port))
            assert bool(action & DENY) == (once.verdict in denies), (addr, port, once)
            if rate is None:
                assert not action & (COUNT | TRIP)
                continue
            eng = _engine(policy, HOSTS)
            eng.evaluate(_connect(addr, port))
            counted = _rate_counted(eng)
            assert bool(action & COUNT) == counted, (addr, port)
            fired = [eng.evaluate(_connect(addr, port, t=i)) for i in range(1, rate.rate.count)][-1]  # type: ignore[union-attr]
            assert bool(action & TRIP) == (counted and fired.verdict in denies), (addr, port, fired)


def _rate_counted(eng: Engine) -> bool:
    """The engine's own rate bookkeeping (internals): did a rate rule count the event? Rate rules
    count by rule index; FLAG escalation counts under a string key."""
    hits = getattr(eng, "_rate_hits", None)
    if hits is not None:
        return bool(hits)
    return any(isinstance(key, int) for key, _tree in eng._counters._hits)


def test_plan_says_what_the_kernel_does_with_each_rule() -> None:
    plan = plan_egress(load_policy(POLICY_DIR / "strict.yaml", identities=False))
    kernel = {u.rule: u.kernel for u in plan.rules}
    assert kernel == {"network-burst": "burst", "container-socket": "userspace", "loopback": "allow",
                      "dns": "allow", "known-apis": "allow", "unknown-network": "deny"}
    assert any("container-socket" in n for n in plan.notes)
    assert any("update_hosts" in n for n in plan.notes)  # host rules need answers first
    record = plan.as_record()
    assert record["burst"] == {"rule": "network-burst", "count": 50, "window_s": 60.0}
    assert json.loads(json.dumps(record)) == record
    text = "\n".join(plan.describe())
    assert "unknown-network (ASK): deny" in text and "ipv4 0.0.0.0/0 deny" in text


def test_audit_mode_denies_nothing() -> None:
    plan = plan_egress(load_policy(POLICY_DIR / "strict.yaml", identities=False), mode=Mode.AUDIT)
    assert not plan.enforce and any("audit" in n for n in plan.notes)


def test_host_answers_become_host_prefixes() -> None:
    policy = parse_policy(LAB_POLICY)
    plan = plan_egress(policy, hosts={"api.lab.test": ["192.0.2.7", "::ffff:192.0.2.8"]})
    assert plan.decide("192.0.2.7", 443) == 0 and plan.decide("192.0.2.8", 443) == 0
    assert plan.decide("::ffff:192.0.2.8", 443) == 0 and plan.decide("192.0.2.7", 444) == DENY
    gone = plan.with_hosts({"api.lab.test": ["192.0.2.8"]})
    assert gone.decide("192.0.2.7", 443) == DENY and gone.decide("192.0.2.8", 443) == 0


# ---------------------------------------------------------------- the kernel


@pytest.fixture(scope="module")
def lab() -> Iterator[NetnsHost]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    with NetnsHost(tcp_ports=(DENIED_TCP, CIDR_TCP, HOST_TCP, BURST_TCP), udp_ports=(DENIED_UDP, DNS_UDP),
                   index=100 + secrets.randbelow(150)) as host:
        yield host


@pytest.fixture
def agent(tmp_cgroup: Path, spawn: Callable[..., subprocess.Popen]) -> Agent:
    """The watched process: in tmp_cgroup, where the egress programs attach."""
    return Agent(spawn(tmp_cgroup, [sys.executable, "-c", _AGENT], stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE, text=True))


@pytest.fixture
def outsider(spawn: Callable[..., subprocess.Popen]) -> Agent:
    """A process in no test cgroup: the programs must not touch it."""
    return Agent(spawn(None, [sys.executable, "-c", _AGENT], stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE, text=True))


@pytest.fixture
def egress(tmp_cgroup: Path) -> Iterator[Callable[..., Egress]]:
    """egress(policy text or bundled name, hosts=None): an Egress started on tmp_cgroup."""
    started: list[Egress] = []

    def start(source: str | Policy, hosts: dict[str, list[str]] | None = None) -> Egress:
        if isinstance(source, Policy):
            policy = source
        else:
            policy = parse_policy(source) if "\n" in source else load_policy(POLICY_DIR / source, identities=False)
        eg = Egress(tmp_cgroup, plan_egress(policy, hosts=hosts))
        started.append(eg)
        eg.start()
        return eg

    yield start
    for eg in started:
        eg.close()


def _tag(what: str) -> str:
    return f"{what}-{secrets.token_hex(4)}"


@requires_bpf
def test_strict_denies_before_any_packet(lab: NetnsHost, agent: Agent, egress: Callable[..., Egress]) -> None:
    eg = egress("strict.yaml")
    accepted = lab.accepted(DENIED_TCP)
    tags = {what: _tag(what) for what in (
        "tcp4", "tcp6", "tcp-mapped", "fastopen", "fastopen6",
        "udp-sendto", "udp-sendmsg", "udp-connect", "udp6-sendto", "udp6-sendmsg", "udp-mapped")}
    sent = {
        "tcp4": agent.tcp(lab.addr4, DENIED_TCP, tags["tcp4"]),
        "tcp6": agent.tcp(lab.addr6, DENIED_TCP, tags["tcp6"]),
        "tcp-mapped": agent.tcp(lab.mapped4, DENIED_TCP, tags["tcp-mapped"]),
        "fastopen": agent.tcp(lab.addr4, DENIED_TCP, tags["fastopen"], fastopen=True),
        "fastopen6": agent.tcp(lab.addr6, DENIED_TCP, tags["fastopen6"], fastopen=True),
        "udp-sendto": agent.udp(lab.addr4, DENIED_UDP, tags["udp-sendto"]),
        "udp-sendmsg": agent.udp(lab.addr4, DENIED_UDP, tags["udp-sendmsg"], how="sendmsg"),
        "udp-connect": agent.udp(lab.addr4, DENIED_UDP, tags["udp-connect"], how="connect"),
        "udp6-sendto": agent.udp(lab.addr6, DENIED_UDP, tags["udp6-sendto"]),
        "udp6-sendmsg": agent.udp(lab.addr6, DENIED_UDP, tags["udp6-sendmsg"], how="sendmsg"),
        "udp-mapped": agent.udp(lab.mapped4, DENIED_UDP, tags["udp-mapped"]),
    }
    lab.settle()
    arrived = set(lab.received("tcp", DENIED_TCP)) | set(lab.received("udp", DENIED_UDP))
    assert not arrived & set(tags.values())  # the harm: nothing reached the destination
    assert lab.accepted(DENIED_TCP) == accepted  # not even a handshake
    assert sent == dict.fromkeys(sent, errno.EPERM)
    counters = eg.counters()
    assert counters["denied"] == len(sent) and counters["seen"] == len(sent)


@requires_bpf
def test_unwatched_process_is_not_judged(lab: NetnsHost, agent: Agent, outsider: Agent,
                                         egress: Callable[..., Egress]) -> None:
    egress("strict.yaml")
    assert agent.tcp(lab.addr4, DENIED_TCP, _tag("in")) == errno.EPERM
    tcp, udp = _tag("out"), _tag("out-udp")
    assert outsider.tcp(lab.addr4, DENIED_TCP, tcp) == 0
    assert outsider.udp(lab.addr6, DENIED_UDP, udp) == 0
    assert lab.wait_received("tcp", DENIED_TCP, tcp) and lab.wait_received("udp", DENIED_UDP, udp)


@requires_bpf
def test_allowed_by_cidr_and_port(lab: NetnsHost, agent: Agent, egress: Callable[..., Egress]) -> None:
    egress(LAB_POLICY)
    for addr in (lab.addr4, lab.addr6, lab.mapped4):
        payload = _tag("cidr")
        assert agent.tcp(addr, CIDR_TCP, payload) == 0
        assert lab.wait_received("tcp", CIDR_TCP, payload)
        assert agent.tcp(addr, DENIED_TCP, _tag("other-port")) == errno.EPERM


@requires_bpf
def test_allowed_by_host_name(lab: NetnsHost, agent: Agent, egress: Callable[..., Egress]) -> None:
    """strict.yaml's known-apis (host: api.github.com, port 443), the name resolving to the lab;
    strict's dns rule lets UDP to port 53 through to this host's resolvers only, not the lab."""
    eg = egress("strict.yaml")
    assert agent.tcp(lab.addr4, HOST_TCP, _tag("before")) == errno.EPERM
    eg.update_hosts({"api.github.com": [lab.addr4, lab.addr6]})
    for addr in (lab.addr4, lab.addr6):
        payload = _tag("host")
        assert agent.tcp(addr, HOST_TCP, payload) == 0
        assert lab.wait_received("tcp", HOST_TCP, payload)
    assert agent.tcp(lab.addr4, DENIED_TCP, _tag("not-443")) == errno.EPERM
    eg.update_hosts({"api.github.com": [lab.addr6]})  # the IPv4 answer is gone: so is its entry
    assert agent.tcp(lab.addr4, HOST_TCP, _tag("after")) == errno.EPERM
    assert agent.udp(lab.addr4, DNS_UDP, _tag("dns")) == errno.EPERM  # the lab is no resolver here


@requires_bpf
def test_dns_only_to_the_resolvers_over_udp(lab: NetnsHost, agent: Agent, egress: Callable[..., Egress]) -> None:
    """strict.yaml with the lab as the system's resolver: UDP to its port 53 passes, TCP to it does
    not (DNS over TCP is no exemption), nor UDP port 53 anywhere else."""
    text = (POLICY_DIR / "strict.yaml").read_text()
    policy = parse_policy(text, str(POLICY_DIR / "strict.yaml"), builtin_lists={"system_resolvers": (lab.addr4,)})
    egress(policy)
    dns = _tag("dns")
    assert agent.udp(lab.addr4, DNS_UDP, dns) == 0 and lab.wait_received("udp", DNS_UDP, dns)
    assert agent.udp(lab.addr6, DNS_UDP, _tag("dns6")) == errno.EPERM
    assert agent.tcp(lab.addr4, DNS_UDP, _tag("dns-tcp")) == errno.EPERM


@requires_bpf
def test_burst_delivers_at_most_the_count(lab: NetnsHost, agent: Agent, egress: Callable[..., Egress]) -> None:
    eg = egress(BURST_POLICY)
    before = lab.accepted(BURST_TCP)
    results = agent.call("burst", addr=lab.addr4, port=BURST_TCP, n=50)
    lab.settle()
    assert lab.accepted(BURST_TCP) - before == 5  # a burst of 50 delivered the count, no more
    assert isinstance(results, list)
    assert results[:5] == [0] * 5 and results[5:] == [errno.EPERM] * 45
    assert agent.tcp(lab.addr4, 9, "") == errno.EPERM  # tripped: any counted destination
    assert agent.tcp("127.0.0.1", 9, "") == errno.ECONNREFUSED  # loopback is not counted
    assert eg.counters()["burst_tripped"] == 1
    eg.reset_burst()
    payload = _tag("after-reset")
    assert agent.tcp(lab.addr4, BURST_TCP, payload) == 0 and lab.wait_received("tcp", BURST_TCP, payload)


@requires_bpf
def test_allow_admits_an_approved_destination(lab: NetnsHost, agent: Agent, egress: Callable[..., Egress]) -> None:
    eg = egress("strict.yaml")
    assert agent.tcp(lab.addr4, DENIED_TCP, _tag("asked")) == errno.EPERM
    eg.allow(lab.addr4, DENIED_TCP)
    for addr in (lab.addr4, lab.mapped4):  # the mapped spelling is the same destination
        payload = _tag("approved")
        assert agent.tcp(addr, DENIED_TCP, payload) == 0 and lab.wait_received("tcp", DENIED_TCP, payload)
    assert agent.udp(lab.addr4, DENIED_UDP, _tag("other-port")) == errno.EPERM
    assert eg.counters()["operator_allowed"] == 2
    with pytest.raises(EgressError, match="not an IP address"):
        eg.allow("lab.example", 1)


@requires_bpf
def test_close_detaches(lab: NetnsHost, agent: Agent, egress: Callable[..., Egress]) -> None:
    eg = egress("strict.yaml")
    assert agent.tcp(lab.addr4, DENIED_TCP, _tag("attached")) == errno.EPERM
    eg.close()
    payload = _tag("detached")
    assert agent.tcp(lab.addr4, DENIED_TCP, payload) == 0 and lab.wait_received("tcp", DENIED_TCP, payload)
    eg.close()  # twice is fine


@requires_bpf
def test_start_refuses_what_is_not_a_v2_cgroup(tmp_path: Path) -> None:
    plan = plan_egress(parse_policy(LAB_POLICY))
    with pytest.raises(EgressError, match="is not a cgroup v2 directory") as e:
        Egress(tmp_path, plan).start()
    assert "\n" not in str(e.value)
    from ebpf_guard.enforce.cgroups import find_v2_mount

    with pytest.raises(EgressError, match="root cgroup"):
        Egress(find_v2_mount(), plan).start()


def test_operations_need_a_started_egress() -> None:
    eg = Egress("/nonexistent", plan_egress(parse_policy(LAB_POLICY)))
    with pytest.raises(EgressError, match="not started"):
        eg.allow("10.0.0.1", 1)
    eg.close()



def test_rules_the_kernel_cannot_judge_are_left_to_userspace() -> None:
    """Who connects is not known to the hook: a deny for `comm: git` enforced for everyone would
    refuse what the rule spares. A protocol of unix sockets only never names an IP destination."""
    plan = plan_egress(parse_policy("""
version: 1
default: SAFE
rules:
  - name: git-only
    connect: {addr: 192.0.2.7, comm: [git]}
    verdict: KILL
  - name: unix-only
    connect: {protocol: [stream, dgram]}
    verdict: KILL
  - name: udp-53
    connect: {port: 53, protocol: [udp]}
    verdict: KILL
"""))
    assert {u.rule: u.kernel for u in plan.rules} == {"git-only": "userspace", "unix-only": "userspace",
                                                      "udp-53": "deny"}
    assert plan.decide("192.0.2.7", 443, "tcp") == 0 and plan.decide("192.0.2.7", 53, "tcp") == 0
    assert plan.decide("192.0.2.7", 53, "udp") == DENY
