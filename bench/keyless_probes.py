"""What a caller without a key can make `serve` do, measured: the two probes of the issue
"Hardening the API before authentication", each with a legitimate client ingesting beside it,
whose answers and latency are counted, and the server's peak resident memory (VmHWM).

    python3 bench/keyless_probes.py BINARY [SECONDS]

Starts `BINARY serve --config bench/serve.toml` on a fresh data directory for each probe:
  slow   256 keyless connections to /v1/ingest/batch announcing a 1 MB body and sending one
         byte every 10 s, for SECONDS (default 30)
  large  150 keyless 8 MiB uploads to /v1/authorize at once, each sent whole
The legitimate client posts a batch of 10 events every 100 ms with the bench key meanwhile.
Prints one JSON line per probe.
"""

import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

HOST, PORT, KEY = "127.0.0.1", 18333, "bench-key"


def peak_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) // 1024
    return 0


def start(binary):
    data = tempfile.mkdtemp()
    env = dict(os.environ, MCP_METER_DATA_DIR=data, MCP_METER_LOG="error")
    server = subprocess.Popen([binary, "serve", "--config", "bench/serve.toml"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            c = http.client.HTTPConnection(HOST, PORT, timeout=1)
            c.request("GET", "/healthz")
            if c.getresponse().status == 200:
                return server
        except OSError:
            time.sleep(0.1)
    raise SystemExit("serve did not start")


class Legitimate(threading.Thread):
    """Posts a batch of 10 events every 100 ms until stopped; counts statuses and latencies."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.statuses, self.latencies = {}, []

    def run(self):
        n = 0
        while not self.stop.is_set():
            events = [{"idempotencyKey": f"legit-{time.time_ns()}-{n}-{i}", "metricName": "mcp_server.tool_invocations",
                       "toolName": "search", "agentId": "a", "sessionId": "s"} for i in range(10)]
            n += 1
            started = time.monotonic()
            try:
                c = http.client.HTTPConnection(HOST, PORT, timeout=30)
                c.request("POST", "/v1/ingest/batch", json.dumps({"events": events}),
                          {"X-API-Key": KEY, "Content-Type": "application/json"})
                status = c.getresponse().status
                c.close()
            except OSError as e:
                status = type(e).__name__
            self.latencies.append((time.monotonic() - started) * 1000)
            self.statuses[status] = self.statuses.get(status, 0) + 1
            self.stop.wait(0.1)

    def report(self):
        ms = sorted(self.latencies) or [0]
        return {"statuses": self.statuses, "p50_ms": round(ms[len(ms) // 2], 1),
                "p99_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 1), "max_ms": round(ms[-1], 1)}


def head(path, length):
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def slow(seconds):
    conns = []
    for _ in range(256):
        s = socket.create_connection((HOST, PORT))
        s.sendall(head("/v1/ingest/batch", 1_000_000))
        conns.append(s)
    ends = time.monotonic() + seconds
    while time.monotonic() < ends:
        for s in conns:
            try:
                s.sendall(b"{")
            except OSError:
                pass
        time.sleep(min(10, max(0, ends - time.monotonic())))
    for s in conns:
        s.close()


def large():
    body = b"{" + b" " * ((8 << 20) - 2) + b"}"

    def upload():
        try:
            s = socket.create_connection((HOST, PORT))
            s.sendall(head("/v1/authorize", len(body)))
            s.sendall(body)
            s.recv(4096)
            s.close()
        except OSError:
            pass  # refused early: the connection was closed under the upload

    threads = [threading.Thread(target=upload) for _ in range(150)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def probe(binary, name, attack):
    server = start(binary)
    idle = peak_mib(server.pid)
    legit = Legitimate()
    legit.start()
    started = time.monotonic()
    attack()
    took = time.monotonic() - started
    time.sleep(1)
    legit.stop.set()
    legit.join()
    peak = peak_mib(server.pid)
    server.terminate()
    server.wait()
    print(json.dumps({"binary": binary, "probe": name, "attack_s": round(took, 1), "idle_peak_mib": idle,
                      "peak_mib": peak, "legitimate": legit.report()}), flush=True)


def main():
    binary = sys.argv[1]
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 30
    probe(binary, "slow", lambda: slow(seconds))
    probe(binary, "large", large)


if __name__ == "__main__":
    main()
