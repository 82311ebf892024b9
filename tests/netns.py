"""A throwaway network namespace to send test traffic to: nothing leaves the machine.

`NetnsHost` owns a network namespace, the veth pair into it (host side x.1, far side x.2, in
IPv4 and IPv6) and one receiver process inside it that accepts TCP on some ports and receives
UDP on others, recording everything it gets. Everything is torn down in `close()` (and on
`with` exit), whatever happened.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from pyroute2 import IPRoute, netns

from tests.helpers import scaled

IFA_F_NODAD = 0x02  # no duplicate address detection: an IPv6 address is usable at once

# The receiver, run inside the namespace. Dual-stack sockets (IPV6_V6ONLY off) take IPv4,
# IPv4-mapped and IPv6 peers alike. One JSON line per accept, per connection's bytes, per
# datagram; "ready" on stdout once every socket is bound.
_RECEIVER = r"""
import json, selectors, socket, sys
tcp_ports, udp_ports, log_path = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
log = open(log_path, "a", buffering=1)
sel = selectors.DefaultSelector()

def record(**kw):
    log.write(json.dumps(kw) + "\n")

def bound(kind, port):
    s = socket.socket(socket.AF_INET6, kind)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", port))
    s.setblocking(False)
    return s

for port in tcp_ports:
    s = bound(socket.SOCK_STREAM, port)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN, 64)
    s.listen(512)
    sel.register(s, selectors.EVENT_READ, ("listen", port, None))
for port in udp_ports:
    sel.register(bound(socket.SOCK_DGRAM, port), selectors.EVENT_READ, ("udp", port, None))
print("ready", flush=True)

while True:
    for key, _ in sel.select():
        what, port, buf = key.data
        s = key.fileobj
        if what == "listen":
            conn, peer = s.accept()
            conn.setblocking(False)
            record(proto="tcp", event="accept", port=port, peer=peer[0])
            sel.register(conn, selectors.EVENT_READ, ("conn", port, bytearray()))
        elif what == "udp":
            data, peer = s.recvfrom(65536)
            record(proto="udp", event="data", port=port, peer=peer[0], data=data.decode("latin-1"))
        else:
            try:
                data = s.recv(65536)
            except OSError:
                data = b""
            if data:
                buf += data
                continue
            sel.unregister(s)
            s.close()
            record(proto="tcp", event="data", port=port, data=bytes(buf).decode("latin-1"))
"""


def _enter(name: str) -> None:
    """preexec_fn: move the child into the namespace before it execs."""
    netns.setns(name, flags=0)


@dataclass
class NetnsHost:
    """A network namespace, its veth pair and a receiver inside; `index` picks 10.203.<index>.0/24
    and fd00:203:<index>::/64 (index 0: fd00:203::2), so parallel runs can use different ones."""

    tcp_ports: tuple[int, ...] = (8080,)
    udp_ports: tuple[int, ...] = (5353,)
    index: int = 0
    name: str = field(default_factory=lambda: f"egtest-{uuid.uuid4().hex[:8]}")
    log: Path = field(init=False)
    _proc: subprocess.Popen | None = field(default=None, init=False, repr=False)
    _created: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        self.log = Path(f"/run/{self.name}.jsonl")
        tag = self.name.split("-")[-1][:6]
        self.host_if, self.far_if = f"egh{tag}", f"egf{tag}"

    # --- addresses -------------------------------------------------------------------------

    @property
    def addr4(self) -> str:
        return f"10.203.{self.index}.2"

    @property
    def host_addr4(self) -> str:
        return f"10.203.{self.index}.1"

    @property
    def addr6(self) -> str:
        return f"fd00:203:{self.index:x}::2" if self.index else "fd00:203::2"

    @property
    def host_addr6(self) -> str:
        return f"fd00:203:{self.index:x}::1" if self.index else "fd00:203::1"

    @property
    def mapped4(self) -> str:
        """The far end's IPv4 address as an IPv4-mapped IPv6 address."""
        return f"::ffff:{self.addr4}"

    # --- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> NetnsHost:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        netns.create(self.name)
        self._created = True
        with IPRoute() as ipr:
            ipr.link("add", ifname=self.host_if, kind="veth", peer={"ifname": self.far_if, "net_ns_fd": self.name})
            idx = ipr.link_lookup(ifname=self.host_if)[0]
            ipr.addr("add", index=idx, address=self.host_addr4, prefixlen=24)
            ipr.addr("add", index=idx, address=self.host_addr6, prefixlen=64, flags=IFA_F_NODAD)
            ipr.link("set", index=idx, state="up")
        with IPRoute(netns=self.name) as ns:
            far = ns.link_lookup(ifname=self.far_if)[0]
            ns.addr("add", index=far, address=self.addr4, prefixlen=24)
            ns.addr("add", index=far, address=self.addr6, prefixlen=64, flags=IFA_F_NODAD)
            ns.link("set", index=far, state="up")
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
        self.log.touch()
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _RECEIVER, json.dumps(self.tcp_ports), json.dumps(self.udp_ports), str(self.log)],
            stdout=subprocess.PIPE, text=True, preexec_fn=lambda: _enter(self.name),
        )
        assert self._proc.stdout is not None
        if self._proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the receiver in {self.name} did not start")

    def close(self) -> None:
        """Stop the receiver, delete the veth pair (both ends go together) and the namespace."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(scaled(5))
            if self._proc.stdout is not None:
                self._proc.stdout.close()
            self._proc = None
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=self.host_if)
            if found:
                ipr.link("del", index=found[0])
        if self._created:
            netns.remove(self.name)
            self._created = False
        self.log.unlink(missing_ok=True)

    # --- what arrived ----------------------------------------------------------------------

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]

    def accepted(self, port: int) -> int:
        """TCP connections the receiver accepted on `port`."""
        return sum(1 for r in self.records() if r["proto"] == "tcp" and r["event"] == "accept" and r["port"] == port)

    def received(self, proto: str, port: int) -> list[str]:
        """Payloads that arrived on `port` (TCP: one per closed connection; UDP: per datagram)."""
        return [r["data"] for r in self.records() if r["proto"] == proto and r["event"] == "data" and r["port"] == port]

    def wait_received(self, proto: str, port: int, payload: str, timeout: float = 5.0) -> bool:
        """True once `payload` arrived on `port`; False after `timeout` (scaled)."""
        deadline = time.monotonic() + scaled(timeout)
        while time.monotonic() < deadline:
            if payload in self.received(proto, port):
                return True
            time.sleep(0.01)
        return False

    def settle(self, seconds: float = 0.3) -> None:
        """Give anything in flight time to arrive before asserting that nothing did."""
        time.sleep(scaled(seconds))

