//! Metric primitives kept in atomics and written in Prometheus text format (`/metrics`), and the
//! families of the adapters in this crate ([`KAFKA`]).
//!
//! Each component owns its families in a static of its own (the ingestor's HTTP and ingest
//! counts, the aggregator's inserts and lag, the Kafka producer's errors here), and each process
//! renders the families of the components it runs, no others. Recording is a relaxed atomic
//! add, so the hot path pays nothing it would notice. Labels are small fixed sets (outcomes,
//! routes, status codes, levels); never a tenant, agent or session id.

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

    /// Writes the histogram's lines (buckets, sum, count) with `labels` on each.
    pub fn write(&self, out: &mut String, name: &str, labels: &str) {
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

/// Lets one log line through per interval, from any thread, and counts the lines it holds
/// back: an error that repeats in a hot loop or on every request (a broker down, Redis away)
/// writes one line per interval, not one per occurrence.
pub struct LogThrottle {
    every_ms: i64,
    /// When the last line went out, in ms; `i64::MIN` before the first.
    last_ms: AtomicI64,
    held_back: AtomicU64,
}

impl LogThrottle {
    pub const fn new(every: Duration) -> LogThrottle {
        LogThrottle {
            every_ms: every.as_millis() as i64,
            last_ms: AtomicI64::new(i64::MIN),
            held_back: AtomicU64::new(0),
        }
    }

    /// `Some(lines held back since the last one)` when a line may be written at `now_ms`.
    pub fn due(&self, now_ms: i64) -> Option<u64> {
        let last = self.last_ms.load(Ordering::Relaxed);
        let due = last == i64::MIN || now_ms - last >= self.every_ms;
        if due
            && self
                .last_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.held_back.swap(0, Ordering::Relaxed));
        }
        self.held_back.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// Writes a family's `# HELP` and `# TYPE` lines.
pub fn head(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Writes a family of one unlabelled value.
pub fn single(out: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    head(out, name, kind, help);
    let _ = writeln!(out, "{name} {value}");
}

/// The Kafka producers' families (the ingestor's sink, the aggregator's markers and dead letters).
pub struct KafkaMetrics {
    pub delivery_errors: Counter,
    pub producer_rebuilds: Counter,
}

pub static KAFKA: KafkaMetrics = KafkaMetrics {
    delivery_errors: Counter::new(),
    producer_rebuilds: Counter::new(),
};

impl KafkaMetrics {
    pub fn render(&self, out: &mut String) {
        single(
            out,
            "mcp_meter_kafka_delivery_errors_total",
            "counter",
            "Batches whose Kafka delivery failed or timed out (answered 503)",
            self.delivery_errors.get(),
        );
        self.render_rebuilds(out);
    }

    /// The one family an aggregator has too (its producer appends cut markers and dead letters).
    pub fn render_rebuilds(&self, out: &mut String) {
        single(
            out,
            "mcp_meter_kafka_producer_rebuilds_total",
            "counter",
            "Times a Kafka producer that could no longer deliver was replaced (an ingestor's, or an aggregator's for cut markers and dead letters)",
            self.producer_rebuilds.get(),
        );
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
}
