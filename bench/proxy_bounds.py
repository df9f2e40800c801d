"""What a client can make `mcp-meter proxy` hold, measured: the proxy's CPU seconds and peak
resident memory (VmHWM) through each probe of the issue "The proxy is a security boundary",
beside the same answer fetched direct from the upstream in the same run.

    python3 bench/proxy_bounds.py PROXY_BINARY METER_URL API_KEY

Probes, in order, each on a fresh proxy:
  json    a 20 MiB JSON answer written in 16 KiB pieces
  sse     a 64 MiB SSE event that never ends (the stream then ends), in 64 KiB pieces
  bodies  4 request bodies of 300 MB each, of unknown length (chunked)
  sessions 20,000 requests, each naming a new 1 KiB Mcp-Session-Id
Prints one line per probe: proxy CPU s, wall s through the proxy and direct, peak RSS.
"""

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PIECE = 16 << 10
SSE_PIECE = 64 << 10
JSON_SIZE = 20 << 20
SSE_SIZE = 64 << 20


class Upstream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Pieces go out as written: no wait for the proxy's delayed ACK of the last one.
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass

    def do_POST(self):
        length = int(self.headers.get("content-length", 0))
        try:
            request = json.loads(self.rfile.read(length))
        except ValueError:
            # What a proxy let through unread (the bodies probe, before the bounds).
            request = {}
        tool = (request.get("params") or {}).get("name", "")
        rid = json.dumps(request.get("id"))
        if tool == "big_json":
            kind = "application/json"
            body = ('{"jsonrpc":"2.0","id":%s,"result":{"content":[{"type":"text","text":"%s"}]}}' % (rid, "x" * JSON_SIZE)).encode()
            pieces = (body[i:i + PIECE] for i in range(0, len(body), PIECE))
        elif tool == "big_sse":
            kind = "text/event-stream"
            pieces = [b'event: message\ndata: {"x":"'] + [b"y" * SSE_PIECE] * (SSE_SIZE // SSE_PIECE)
        else:
            kind = "application/json"
            pieces = [json.dumps({"jsonrpc": "2.0", "id": request.get("id"), "result": {"content": []}}).encode()]
        self.send_response(200)
        self.send_header("content-type", kind)
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for piece in pieces:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        self.wfile.write(b"0\r\n\r\n")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def call(tool, rid=1):
    return json.dumps({"jsonrpc": "2.0", "id": rid, "method": "tools/call", "params": {"name": tool, "arguments": {}}}).encode()


def fetch(port, body, headers=None):
    """POSTs `body` to /mcp on `port`; answers the answer's size and the seconds it took."""
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/mcp", body, {"content-type": "application/json", "accept": "application/json, text/event-stream", **(headers or {})})
    answer = conn.getresponse()
    size = 0
    while chunk := answer.read(1 << 16):
        size += len(chunk)
    conn.close()
    return size, time.monotonic() - started


def big_bodies(port):
    started = time.monotonic()
    for _ in range(4):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"POST /mcp HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n")
        piece = b"%x\r\n%s\r\n" % (1 << 20, b" " * (1 << 20))
        try:
            for _ in range(300):
                s.sendall(piece)
            s.sendall(b"0\r\n\r\n")
            s.recv(64)
        except OSError:
            pass
        s.close()
    return 0, time.monotonic() - started


def sessions(port):
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    ping = b'{"jsonrpc":"2.0","id":1,"method":"ping"}'
    for i in range(20_000):
        conn.request("POST", "/mcp", ping, {"content-type": "application/json", "mcp-session-id": f"{i:08}" + "s" * 1016})
        conn.getresponse().read()
    conn.close()
    return 0, time.monotonic() - started


def main():
    binary, meter, key = sys.argv[1:4]
    up_port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", up_port), Upstream)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    probes = [
        ("json", lambda p: fetch(p, call("big_json")), lambda: fetch(up_port, call("big_json"))),
        ("sse", lambda p: fetch(p, call("big_sse")), lambda: fetch(up_port, call("big_sse"))),
        ("bodies", big_bodies, None),
        ("sessions", sessions, None),
    ]
    for name, probe, direct in probes:
        port = free_port()
        proxy = subprocess.Popen(
            [binary, "proxy", "--upstream", f"http://127.0.0.1:{up_port}/mcp", "--listen", f"127.0.0.1:{port}",
             "--meter-url", meter, "--customer", "bench"],
            env={**os.environ, "MCP_METER_PROXY_API_KEY": key, "MCP_METER_LOG": "error"},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port)).close()
                break
            except OSError:
                time.sleep(0.05)
        fetch(port, call("small"))
        cpu, start_kib = cpu_seconds(proxy.pid), proc_status(proxy.pid, "VmRSS:")
        _, wall = probe(port)
        used = cpu_seconds(proxy.pid) - cpu
        peak, end = proc_status(proxy.pid, "VmHWM:"), proc_status(proxy.pid, "VmRSS:")
        line = f"{name:8} proxy CPU {used:6.2f} s  wall {wall:6.2f} s"
        if direct:
            line += f"  direct {direct()[1]:5.2f} s"
        line += f"  RSS {start_kib // 1024} MiB → peak {peak // 1024} MiB, end {end // 1024} MiB"
        print(line, flush=True)
        proxy.terminate()
        proxy.wait()
    server.shutdown()


if __name__ == "__main__":
    main()
