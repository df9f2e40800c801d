# What scripts/bench-ingest and scripts/bench-distributed share: both drive `mcp-meter loadgen`
# at the API on 127.0.0.1:18333 (bench/serve.toml). Sourced from the repo root.

bin=${MCP_METER_BENCH_BIN:-target/release/mcp-meter}
# The load generator's binary (default: the same): a newer loadgen can drive an older server.
loadgen_bin=${MCP_METER_BENCH_LOADGEN:-$bin}
bench_url=http://127.0.0.1:18333

# wait_api: until the bench API answers /healthz.
wait_api() { until curl -sf "$bench_url/healthz" > /dev/null; do sleep 0.1; done; }

# figures JSON: the figures of one loadgen summary, on one line.
figures() {
  python3 - "$1" <<'PY'
import json, sys
s = json.loads(sys.argv[1]); l = s['latencyMs']
print(f"{s['eventsPerSecond']:.0f} events/s, {s['requestsPerSecond']:.0f} requests/s, p50 {l['p50']:.2f} ms, p99 {l['p99']:.2f} ms, max {l['max']:.2f} ms, statuses {s['statuses']}")
PY
}

# peak_mib PID: the process's peak resident memory (VmHWM), in MiB.
peak_mib() { awk '/VmHWM/ {print int($2 / 1024)}' "/proc/$1/status"; }

# stop PID: SIGTERM to a background child, and wait until it has exited.
stop() { kill "$1"; wait "$1" 2> /dev/null || true; }

# distributed_env CLICKHOUSE_URL BROKERS NAME: points `mcp-meter` at that ClickHouse and those
# brokers, with a database and topics named NAME (a database serves one topic); the caller adds
# what else its roles need (consumer group, listen address, log level).
distributed_env() {
  export MCP_METER_CLICKHOUSE_URL=$1 MCP_METER_CLICKHOUSE_DATABASE=$3 \
    MCP_METER_KAFKA_BROKERS=$2 MCP_METER_KAFKA_EVENTS_TOPIC=$3 \
    MCP_METER_KAFKA_DEAD_LETTER_TOPIC=$3.dead-letter
}

# sql SQL: runs SQL on the ClickHouse of distributed_env; its answer as TabSeparated.
sql() { curl -sf --data-binary "$1" "$MCP_METER_CLICKHOUSE_URL/"; }
