//! The process's metrics, kept in atomics and written in Prometheus text format (`/metrics`).
//!
//! One static registry, [`METRICS`], that every component records into: recording is a relaxed
//! atomic add, so the hot path pays nothing it would notice. Labels are small fixed sets
//! (outcomes, routes, status codes, levels); never a tenant, agent or session id.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

/// A monotonically increasing count.
#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub const fn new() -> Counter {
        Counter(AtomicU64::new(0))
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub const fn new() -> Gauge {
        Gauge(AtomicI64::new(0))
    }
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Upper bounds of the latency buckets, in seconds: 250 µs to 10 s.
pub const LATENCY_BUCKETS_SECONDS: [f64; 14] = [
    0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];
const BUCKETS: usize = LATENCY_BUCKETS_SECONDS.len();

/// A latency histogram over [`LATENCY_BUCKETS_SECONDS`].
pub struct Histogram {
    /// Per bucket (not cumulative), then the overflow bucket.
    counts: [AtomicU64; BUCKETS + 1],
    sum_nanos: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Histogram {
        Histogram::new()
    }
}

impl Histogram {
    pub const fn new() -> Histogram {
        Histogram {
            counts: [const { AtomicU64::new(0) }; BUCKETS + 1],
            sum_nanos: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, took: Duration) {
        let seconds = took.as_secs_f64();
        let bucket = LATENCY_BUCKETS_SECONDS
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(BUCKETS);
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos
            .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    fn write(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, bound) in LATENCY_BUCKETS_SECONDS.iter().enumerate() {
            cumulative += self.counts[i].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}"
            );
        }
        cumulative += self.counts[BUCKETS].load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cumulative}"
        );
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let braces = |s: &str| {
            if s.is_empty() {
                String::new()
            } else {
                format!("{{{s}}}")
            }
        };
        let _ = writeln!(out, "{name}_sum{} {sum}", braces(labels));
        let _ = writeln!(out, "{name}_count{} {cumulative}", braces(labels));
    }
}

/// HTTP status codes 100 to 599.
const STATUS_CODES: usize = 500;

/// The routes HTTP metrics are kept for; anything else counts as `other`.
pub const ROUTES: [&str; 11] = [
    "/v1/ingest/batch",
    "/v1/ingest/events",
    "/v1/guard/check",
    "/analytics/mcp",
    "/v1/exports/billing",
    "/healthz",
    "/readyz",
    "/metrics",
    "/openapi.json",
    "/docs",
    "other",
];

/// The route label of a request path.
pub fn route_of(path: &str) -> usize {
    ROUTES[..ROUTES.len() - 1]
        .iter()
        .position(|r| path == *r || (path.starts_with(r) && path[r.len()..].starts_with('/')))
        .unwrap_or(ROUTES.len() - 1)
}

/// Everything the process records.
pub struct Metrics {
    pub ingest_events_accepted: Counter,
    pub ingest_events_duplicate: Counter,
    pub ingest_events_failed: Counter,
    /// Per route: request latency.
    pub http_latency: [Histogram; ROUTES.len()],
    /// Per route, per status code (100 to 599, at `status - 100`): requests. A counter for
    /// every code instead of a locked map, so that recording takes no lock on the hot path.
    http_requests: [[Counter; STATUS_CODES]; ROUTES.len()],
    pub kafka_delivery_errors: Counter,
    pub kafka_producer_rebuilds: Counter,
    pub aggregator_rows_inserted: Counter,
    pub aggregator_insert_failures: Counter,
    pub aggregator_insert_latency: Histogram,
    /// Seconds between the newest event of the last insert being received and now.
    pub aggregator_lag_ms: Gauge,
    pub aggregator_dead_letters: Counter,
    pub store_commit_latency: Histogram,
    pub store_commit_failures: Counter,
    /// Subjects at each margin level after the last round (OK, L1, L2, L3).
    pub guard_subjects: [Gauge; 4],
    pub guard_rounds_failed: Counter,
    pub guard_state_errors: Counter,
}

pub static METRICS: Metrics = Metrics {
    ingest_events_accepted: Counter::new(),
    ingest_events_duplicate: Counter::new(),
    ingest_events_failed: Counter::new(),
    http_latency: [const { Histogram::new() }; ROUTES.len()],
    http_requests: [const { [const { Counter::new() }; STATUS_CODES] }; ROUTES.len()],
    kafka_delivery_errors: Counter::new(),
    kafka_producer_rebuilds: Counter::new(),
    aggregator_rows_inserted: Counter::new(),
    aggregator_insert_failures: Counter::new(),
    aggregator_insert_latency: Histogram::new(),
    aggregator_lag_ms: Gauge::new(),
    aggregator_dead_letters: Counter::new(),
    store_commit_latency: Histogram::new(),
    store_commit_failures: Counter::new(),
    guard_subjects: [const { Gauge::new() }; 4],
    guard_rounds_failed: Counter::new(),
    guard_state_errors: Counter::new(),
};

impl Metrics {
    /// Records one answered HTTP request.
    pub fn http_request(&self, route: usize, status: u16, took: Duration) {
        self.http_latency[route].observe(took);
        if let Some(counter) = (status as usize)
            .checked_sub(100)
            .and_then(|i| self.http_requests[route].get(i))
        {
            counter.add(1);
        }
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        let head = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        let gauge = |out: &mut String, name: &str, help: &str, v: f64| {
            head(out, name, "gauge", help);
            let _ = writeln!(out, "{name} {v}");
        };

        head(
            &mut out,
            "mcp_meter_ingest_events_total",
            "counter",
            "Events received by ingest, by outcome: accepted (stored), duplicate (key already stored), failed (refused)",
        );
        for (outcome, c) in [
            ("accepted", &self.ingest_events_accepted),
            ("duplicate", &self.ingest_events_duplicate),
            ("failed", &self.ingest_events_failed),
        ] {
            let _ = writeln!(
                out,
                "mcp_meter_ingest_events_total{{outcome=\"{outcome}\"}} {}",
                c.get()
            );
        }

        head(
            &mut out,
            "mcp_meter_http_requests_total",
            "counter",
            "HTTP requests answered, by route and status (ingest batches: 202 accepted, 429 overloaded, 503 unavailable)",
        );
        let answered = self
            .http_requests
            .iter()
            .enumerate()
            .flat_map(|(route, codes)| {
                codes
                    .iter()
                    .enumerate()
                    .map(move |(i, c)| ((route, i + 100), c.get()))
                    .filter(|(_, n)| *n > 0)
            });
        for ((route, status), n) in answered {
            let _ = writeln!(
                out,
                "mcp_meter_http_requests_total{{route=\"{}\",status=\"{status}\"}} {n}",
                ROUTES[route]
            );
        }
        head(
            &mut out,
            "mcp_meter_http_request_duration_seconds",
            "histogram",
            "Time from request to answer (the body of a streamed export excluded), by route",
        );
        for (route, h) in ROUTES.iter().zip(&self.http_latency) {
            if h.count() > 0 {
                h.write(
                    &mut out,
                    "mcp_meter_http_request_duration_seconds",
                    &format!("route=\"{route}\""),
                );
            }
        }

        head(
            &mut out,
            "mcp_meter_aggregator_insert_duration_seconds",
            "histogram",
            "Time of one successful ClickHouse insert",
        );
        self.aggregator_insert_latency.write(
            &mut out,
            "mcp_meter_aggregator_insert_duration_seconds",
            "",
        );
        gauge(
            &mut out,
            "mcp_meter_aggregator_lag_seconds",
            "Age, when it was stored, of the newest event of the last insert (receipt to stored)",
            self.aggregator_lag_ms.get() as f64 / 1000.0,
        );
        head(
            &mut out,
            "mcp_meter_store_commit_duration_seconds",
            "histogram",
            "Time of one group commit of the embedded store (SQLite, or ClickHouse with store = clickhouse)",
        );
        self.store_commit_latency
            .write(&mut out, "mcp_meter_store_commit_duration_seconds", "");
        head(
            &mut out,
            "mcp_meter_guard_subjects",
            "gauge",
            "Agents and tools at each margin level after the margin guard's last round",
        );
        for (level, g) in ["OK", "L1_WARN", "L2_THROTTLE", "L3_BLOCK"]
            .iter()
            .zip(&self.guard_subjects)
        {
            let _ = writeln!(
                out,
                "mcp_meter_guard_subjects{{level=\"{level}\"}} {}",
                g.get()
            );
        }
        // Plain counters, one line each.
        let counters = [
            (
                "mcp_meter_kafka_delivery_errors_total",
                "Batches whose Kafka delivery failed or timed out (answered 503)",
                self.kafka_delivery_errors.get(),
            ),
            (
                "mcp_meter_kafka_producer_rebuilds_total",
                "Times the ingestor replaced a Kafka producer that could no longer deliver",
                self.kafka_producer_rebuilds.get(),
            ),
            (
                "mcp_meter_aggregator_rows_inserted_total",
                "Rows the aggregator inserted into ClickHouse",
                self.aggregator_rows_inserted.get(),
            ),
            (
                "mcp_meter_aggregator_insert_failures_total",
                "ClickHouse inserts that failed and were retried",
                self.aggregator_insert_failures.get(),
            ),
            (
                "mcp_meter_aggregator_dead_letters_total",
                "Messages the aggregator could not read, sent to the dead-letter topic",
                self.aggregator_dead_letters.get(),
            ),
            (
                "mcp_meter_store_commit_failures_total",
                "Group commits that failed (their requests were answered 503)",
                self.store_commit_failures.get(),
            ),
            (
                "mcp_meter_guard_rounds_failed_total",
                "Margin guard rounds in which some tenant's levels could not be computed or written",
                self.guard_rounds_failed.get(),
            ),
            (
                "mcp_meter_guard_state_errors_total",
                "Requests that could not reach the guard state (limits not enforced, checks failed open)",
                self.guard_state_errors.get(),
            ),
        ];
        for (name, help, value) in counters {
            head(&mut out, name, "counter", help);
            let _ = writeln!(out, "{name} {value}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_with_sum_and_count() {
        let h = Histogram::new();
        h.observe(Duration::from_micros(100));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(20));
        let mut out = String::new();
        h.write(&mut out, "x", "route=\"r\"");
        assert!(
            out.contains("x_bucket{route=\"r\",le=\"0.00025\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("x_bucket{route=\"r\",le=\"0.005\"} 2\n"),
            "{out}"
        );
        assert!(out.contains("x_bucket{route=\"r\",le=\"10\"} 2\n"), "{out}");
        assert!(
            out.contains("x_bucket{route=\"r\",le=\"+Inf\"} 3\n"),
            "{out}"
        );
        assert!(out.contains("x_count{route=\"r\"} 3\n"), "{out}");
        assert!(out.contains("x_sum{route=\"r\"} 20.0031\n"), "{out}");
    }

    #[test]
    fn paths_map_to_a_bounded_set_of_routes() {
        assert_eq!(ROUTES[route_of("/v1/ingest/batch")], "/v1/ingest/batch");
        assert_eq!(
            ROUTES[route_of("/analytics/mcp/sessions/s-1")],
            "/analytics/mcp"
        );
        assert_eq!(ROUTES[route_of("/docs/swagger-ui.css")], "/docs");
        assert_eq!(ROUTES[route_of("/v1/ingest/batchx")], "other");
        assert_eq!(ROUTES[route_of("/secret/tenant-id")], "other");
    }
}
