#!/usr/bin/env bash
# A test suite against a local server: a threaded HTTP server on 127.0.0.1 (ephemeral port) and
# 400 client connections to it, one request each; plus a raw TCP echo server and 100 socket clients.
set -euo pipefail
WS=${1:?usage: loopback_server.sh WORKSPACE}
cd "$WS"
export PATH="/usr/bin:/bin:$PATH"   # the distro python3, whatever version managers the host has
command -v python3 >/dev/null || { echo "corpus: python3 is not installed" >&2; exit 3; }

mkdir -p site
echo '{"ok": true}' > site/health.json
python3 - <<'PY'
import functools, http.client, http.server, socket, socketserver, threading

counts = {"http": 0, "echo": 0}
lock = threading.Lock()


class Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        with lock:
            counts["http"] += 1
        super().do_GET()


class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        with lock:
            counts["echo"] += 1
        self.request.sendall(self.request.recv(64))


handler = functools.partial(Handler, directory="site")
with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as web, \
        socketserver.ThreadingTCPServer(("127.0.0.1", 0), Echo) as echo:
    for server in (web, echo):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    for _ in range(400):
        conn = http.client.HTTPConnection("127.0.0.1", web.server_address[1], timeout=10)
        conn.request("GET", "/health.json")
        assert conn.getresponse().read() == b'{"ok": true}\n'
        conn.close()
    for i in range(100):
        with socket.create_connection(echo.server_address, timeout=10) as s:
            s.sendall(b"ping%d" % i)
            assert s.recv(64) == b"ping%d" % i
    web.shutdown()
    echo.shutdown()
print(f"CORPUS-OK loopback {counts['http'] + counts['echo']} connections")
PY
