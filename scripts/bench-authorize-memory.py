# bench-authorize-memory: N authorizations for invented customers against a running serve; prints its RSS before
# and after (VmRSS of the pid given).
import http.client, json, sys, time
port, pid, key, n = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
def rss():
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1])
c = http.client.HTTPConnection("127.0.0.1", port)
def post(path, body):
    c.request("POST", path, body=json.dumps(body), headers={"X-API-Key": key, "Content-Type": "application/json"})
    r = c.getresponse(); r.read(); return r.status
for i in range(2000):  # warm up: allocator and caches
    post("/v1/authorize", {"nonce": f"w{i}", "customerId": "warm", "toolName": "search"})
before = rss(); t = time.time()
statuses = {}
for i in range(n):
    s = post("/v1/authorize", {"nonce": f"n{i}", "customerId": f"invented-{i}", "toolName": "search"})
    statuses[s] = statuses.get(s, 0) + 1
after = rss()
print(f"{n} authorizations in {time.time()-t:.1f} s, statuses {statuses}; RSS {before/1024:.1f} MB -> {after/1024:.1f} MB (+{(after-before)/1024:.1f} MB)")
