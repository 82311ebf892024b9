"""Resolve the host names that connect rules mention, off the policy loop's thread.

DNS is I/O and can block for seconds, so a background thread resolves and the loop only picks
up finished results (`take()`); the engine never resolves anything itself.
"""

from __future__ import annotations

import socket
import threading

REFRESH_S = 60.0


class HostResolver:
    def __init__(self, names: list[str], refresh_s: float = REFRESH_S) -> None:
        self.names = names
        self.refresh_s = refresh_s
        self._result: dict[str, list[str]] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ebpf-guard-dns", daemon=True)

    def start(self) -> None:
        if self.names:
            self._thread.start()

    def resolve_once(self) -> dict[str, list[str]]:
        mapping: dict[str, list[str]] = {}
        for name in self.names:
            try:
                infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
            except OSError:
                infos = []  # unresolvable now: keep no addresses, retry at the next refresh
            mapping[name] = sorted({info[4][0] for info in infos})
        return mapping

    def _loop(self) -> None:
        while not self._stop.is_set():
            mapping = self.resolve_once()
            with self._lock:
                self._result = mapping
            self._stop.wait(self.refresh_s)

    def take(self) -> dict[str, list[str]] | None:
        """The newest finished resolution, once; None if nothing new."""
        with self._lock:
            result, self._result = self._result, None
        return result

    def stop(self) -> None:
        self._stop.set()
