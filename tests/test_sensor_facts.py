"""Two facts read from the kernel for the policy (issue #11): the protocol of the socket a
connect, sendto or sendmsg goes through (Event.protocol), and whether an open created its file
(Event.created); and egress in the kernel honouring a rule's `protocol:`.

Real kernel, real processes in a watched cgroup, real loopback listeners: the allowed protocol's
bytes arrive, the other's syscall fails with EPERM and its listener receives nothing.
"""

from __future__ import annotations

import socket
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from ebpf_guard.enforce.egress import DENY, Egress, plan_egress
from ebpf_guard.events import NOTE_NOTHING_CUT, Event, Kind
from ebpf_guard.policy import Policy, parse_policy
from ebpf_guard.sensor import Sensor
from tests import test_sensor
from tests.conftest import requires_bpf
from tests.helpers import scaled
from tests.test_sensor import collect, exited, of, run

pytestmark = requires_bpf
cg = test_sensor.cg  # a fresh cgroup, and the module's sensor watching exactly it


@pytest.fixture(scope="module")
def sensor() -> Iterator[Sensor]:
    s = Sensor()
    s.start()
    assert s.layouts is not None, f"this host has BTF: {s.btf_error}"
    try:
        yield s
    finally:
        s.close()


def py(cg: Path, code: str) -> int:
    return run(cg, [sys.executable, "-c", textwrap.dedent(code)])


def events(sensor: Sensor, cg: Path, code: str) -> tuple[int, list[Event]]:
    pid = py(cg, code)
    return pid, collect(sensor, exited(pid))


# ------------------------------------------------------------------------------- protocol


def test_connects_carry_the_sockets_protocol(sensor: Sensor, cg: Path, tmp_path: Path) -> None:
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    ustream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    udgram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    useq = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        udp.bind(("127.0.0.1", 0))
        for s, name in ((ustream, "s"), (udgram, "d"), (useq, "q")):
            s.bind(str(tmp_path / name))
        ustream.listen()
        useq.listen()
        pid, evs = events(sensor, cg, f"""
            import socket
            t = socket.socket(socket.AF_INET, socket.SOCK_STREAM); t.connect(("127.0.0.1", {tcp.getsockname()[1]}))
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            u.sendto(b"a", ("127.0.0.1", {udp.getsockname()[1]}))
            u.connect(("127.0.0.1", {udp.getsockname()[1]}))
            m = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            m.sendmsg([b"b"], [], 0, ("::ffff:127.0.0.1", {udp.getsockname()[1]}))
            for kind, name in ((socket.SOCK_STREAM, "s"), (socket.SOCK_DGRAM, "d"), (socket.SOCK_SEQPACKET, "q")):
                socket.socket(socket.AF_UNIX, kind).connect({str(tmp_path)!r} + "/" + name)
        """)
    finally:
        for s in (tcp, udp, ustream, udgram, useq):
            s.close()
    got = {(e.via, e.family, e.addr.rsplit("/", 1)[-1], e.protocol) for e in of(evs, Kind.CONNECT, pid)}
    assert got == {
        ("connect", "ipv4", "127.0.0.1", "tcp"), ("sendto", "ipv4", "127.0.0.1", "udp"),
        ("connect", "ipv4", "127.0.0.1", "udp"), ("sendmsg", "ipv6", "::ffff:127.0.0.1", "udp"),
        ("connect", "unix", "s", "stream"), ("connect", "unix", "d", "dgram"), ("connect", "unix", "q", "seqpacket"),
    }


def test_an_fd_that_is_no_socket_has_no_protocol(sensor: Sensor, cg: Path) -> None:
    """connect() on a file fd fails (ENOTSOCK); the event is still there, claiming nothing."""
    pid, evs = events(sensor, cg, """
        import ctypes, os, socket
        fd = os.open("/dev/null", os.O_RDONLY)
        addr = bytes([2, 0, 0, 53, 127, 0, 0, 1]) + bytes(8)  # sockaddr_in 127.0.0.1:53
        ctypes.CDLL(None).connect(fd, addr, 16)
    """)
    (ev,) = of(evs, Kind.CONNECT, pid)
    assert (ev.addr, ev.port, ev.protocol) == ("127.0.0.1", 53, "")


# ------------------------------------------------------------------------------- created


def test_created_only_by_the_open_that_made_the_file(sensor: Sensor, cg: Path, tmp_path: Path) -> None:
    old = tmp_path / "old"
    old.write_text("precious")
    new = tmp_path / "new"
    pid, evs = events(sensor, cg, f"""
        import os
        os.close(os.open({str(new)!r}, os.O_WRONLY | os.O_CREAT, 0o600))
        os.close(os.open({str(old)!r}, os.O_WRONLY | os.O_CREAT | os.O_TRUNC))
        os.close(os.open({str(old)!r}, os.O_RDONLY))
        os.close(os.open({str(tmp_path / 'exclusive')!r}, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.close(os.open({str(tmp_path)!r}, os.O_WRONLY | os.O_TMPFILE, 0o600))
    """)
    opens = [(e.raw_path.rsplit("/", 1)[-1], e.created) for e in of(evs, Kind.OPEN, pid)
             if e.raw_path.startswith(str(tmp_path))]
    name = tmp_path.name
    assert opens == [("new", True), ("old", False), ("old", False), ("exclusive", True), (name, True)], opens
    assert old.read_text() == ""  # the O_TRUNC open did empty it: created False is what says so


def test_ftruncate_says_when_nothing_was_cut(sensor: Sensor, cg: Path, tmp_path: Path) -> None:
    full, empty = tmp_path / "full", tmp_path / "empty"
    full.write_text("0123456789")
    empty.write_text("")
    pid, evs = events(sensor, cg, f"""
        import os
        for name, size in (({str(full)!r}, 4), ({str(empty)!r}, 0), ({str(full)!r}, 100)):
            fd = os.open(name, os.O_WRONLY); os.ftruncate(fd, size); os.close(fd)
    """)
    got = [(e.real_path, NOTE_NOTHING_CUT in e.notes) for e in of(evs, Kind.TRUNCATE, pid)]
    assert got == [(str(full), False), (str(empty), True), (str(full), True)]


# ------------------------------------------------------------------------------- egress

DNS_POLICY = """
version: 1
default: SAFE
rules:
  - name: dns
    connect: {addr: 127.0.0.1, port: PORT}
    verdict: SAFE
  - name: no-other-network
    connect: {family: [ipv4, ipv6]}
    verdict: HALT
"""


def dns_policy(port: int, protocols: frozenset[str] | None) -> Policy:
    """The strict policy's DNS shape on a test port: the resolver allowed (only over
    `protocols`, when given), every other IP destination denied."""
    text = DNS_POLICY.replace("PORT", str(port))
    if protocols is not None:
        text = text.replace(f"port: {port}}}", f"port: {port}, protocol: [{', '.join(sorted(protocols))}]}}")
    return parse_policy(text)


def test_the_plan_decides_per_protocol() -> None:
    plan = plan_egress(dns_policy(5353, frozenset({"udp"})))
    assert plan.decide("127.0.0.1", 5353, "udp") == 0
    assert plan.decide("127.0.0.1", 5353, "tcp") & DENY
    assert plan.decide("127.0.0.2", 5353, "udp") & DENY
    assert plan.decide("127.0.0.1", 5353, "") & DENY  # unknown protocol: a protocol rule does not match
    assert plan.decide("127.0.0.1", 5353, "icmp") & DENY
    text = "\n".join(plan.describe())
    assert "udp: allow" in text, text


def test_without_protocol_every_protocol_decides_alike() -> None:
    plan = plan_egress(dns_policy(5353, None))
    assert {plan.decide("127.0.0.1", 5353, p) for p in ("tcp", "udp", "raw", "icmp", "sctp", "")} == {0}


def _listeners() -> tuple[socket.socket, socket.socket, socket.socket]:
    """TCP and UDP on one loopback port (the resolver), and UDP on another address (a stranger)."""
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind(("127.0.0.1", 0))
    port = tcp.getsockname()[1]
    tcp.listen()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", port))
    other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    other.bind(("127.0.0.2", port))
    for s in (tcp, udp, other):
        s.settimeout(scaled(0.5))
    return tcp, udp, other


def _received(tcp: socket.socket, udp: socket.socket, other: socket.socket) -> dict[str, bytes]:
    got: dict[str, bytes] = {}
    try:
        conn, _ = tcp.accept()
        with conn:
            conn.settimeout(scaled(0.5))
            got["tcp"] = conn.recv(64)
    except TimeoutError:
        pass
    for name, s in (("udp", udp), ("other", other)):
        try:
            got[name] = s.recv(64)
        except TimeoutError:
            pass
    return got


AGENT = """
import errno, socket, sys
port = int(sys.argv[1])
out = []
def attempt(name, fn):
    try:
        fn(); out.append(name + "=ok")
    except OSError as e:
        out.append(name + "=" + errno.errorcode.get(e.errno, str(e.errno)))
def tcp():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM); s.connect(("127.0.0.1", port)); s.sendall(b"T")
def udp():
    socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"U", ("127.0.0.1", port))
def udp_connected():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.connect(("127.0.0.1", port)); s.send(b"C")
def stranger():
    socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"X", ("127.0.0.2", port))
for name, fn in (("tcp", tcp), ("udp", udp), ("udp_connected", udp_connected), ("stranger", stranger)):
    attempt(name, fn)
print(" ".join(out))
"""


def test_egress_allows_only_the_rules_protocol(tmp_cgroup: Path) -> None:
    """DNS over UDP to the resolver passes; TCP to the same port, and UDP to another host, are
    refused in the kernel (EPERM) and their listeners receive nothing."""
    tcp, udp, other = _listeners()
    port = tcp.getsockname()[1]
    try:
        with Egress(tmp_cgroup, plan_egress(dns_policy(port, frozenset({"udp"})))) as eg:
            import subprocess

            from tests.test_sensor import into
            res = subprocess.run([sys.executable, "-c", AGENT, str(port)], preexec_fn=into(tmp_cgroup),
                                 capture_output=True, text=True, timeout=scaled(30))
            counters = eg.counters()
        got = _received(tcp, udp, other)
    finally:
        for s in (tcp, udp, other):
            s.close()
    assert res.stdout.split() == ["tcp=EPERM", "udp=ok", "udp_connected=ok", "stranger=EPERM"], res.stderr
    assert "tcp" not in got and "other" not in got  # the harm did not happen
    assert got.get("udp") in (b"U", b"C")
    assert counters["denied"] >= 2


def test_egress_without_protocol_lets_both_through(tmp_cgroup: Path) -> None:
    """The control: the same rule without `protocol:` allows TCP too (the refusal above is the
    protocol condition's, not the port's)."""
    tcp, udp, other = _listeners()
    port = tcp.getsockname()[1]
    try:
        with Egress(tmp_cgroup, plan_egress(dns_policy(port, None))):
            import subprocess

            from tests.test_sensor import into
            res = subprocess.run([sys.executable, "-c", AGENT, str(port)], preexec_fn=into(tmp_cgroup),
                                 capture_output=True, text=True, timeout=scaled(30))
        got = _received(tcp, udp, other)
    finally:
        for s in (tcp, udp, other):
            s.close()
    assert res.stdout.split() == ["tcp=ok", "udp=ok", "udp_connected=ok", "stranger=EPERM"], res.stderr
    assert got.get("tcp") == b"T" and "other" not in got


def test_protocol_names_match_the_kernels_classes() -> None:
    """decode's names and egress's classes are one list."""
    from ebpf_guard.enforce.egress import PROTOCOLS
    from ebpf_guard.sensor.decode import socket_protocol

    names = {socket_protocol(f, t, p) for f in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX)
             for t in (1, 2, 3, 5) for p in (0, 1, 6, 17, 58, 132, 136, 262)}
    inet = {n for n in names if n not in ("stream", "dgram", "seqpacket")}
    assert inet == set(PROTOCOLS)
