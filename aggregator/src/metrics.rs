//! The families of this crate's components, each rendered only by the processes that run it:
//! the consumer loop's ([`AggregatorMetrics::render_consumer`], `aggregator`), the group
//! commit's ([`AggregatorMetrics::render_group_commit`], `serve`) and the margin guard's
//! ([`AggregatorMetrics::render_margin_guard`], wherever it runs).

use backends::metrics::{head, single, Counter, Gauge, Histogram};
use std::fmt::Write;

pub struct AggregatorMetrics {
    pub rows_inserted: Counter,
    pub insert_failures: Counter,
    pub insert_latency: Histogram,
    /// Milliseconds between the newest event of the last insert being received and its insert.
    pub lag_ms: Gauge,
    pub dead_letters: Counter,
    pub store_commit_latency: Histogram,
    pub store_commit_failures: Counter,
    /// Subjects at each margin level after the last round (OK, L1, L2, L3).
    pub guard_subjects: [Gauge; 4],
    pub guard_rounds_failed: Counter,
}

pub static METRICS: AggregatorMetrics = AggregatorMetrics {
    rows_inserted: Counter::new(),
    insert_failures: Counter::new(),
    insert_latency: Histogram::new(),
    lag_ms: Gauge::new(),
    dead_letters: Counter::new(),
    store_commit_latency: Histogram::new(),
    store_commit_failures: Counter::new(),
    guard_subjects: [const { Gauge::new() }; 4],
    guard_rounds_failed: Counter::new(),
};

impl AggregatorMetrics {
    /// The consumer loop's families: inserts, their latency and lag, dead letters.
    pub fn render_consumer(&self, out: &mut String) {
        head(
            out,
            "mcp_meter_aggregator_insert_duration_seconds",
            "histogram",
            "Time of one successful ClickHouse insert",
        );
        self.insert_latency
            .write(out, "mcp_meter_aggregator_insert_duration_seconds", "");
        single(
            out,
            "mcp_meter_aggregator_lag_seconds",
            "gauge",
            "Age, when it was stored, of the newest event of the last insert (receipt to stored)",
            self.lag_ms.get() as f64 / 1000.0,
        );
        single(
            out,
            "mcp_meter_aggregator_rows_inserted_total",
            "counter",
            "Rows the aggregator inserted into ClickHouse",
            self.rows_inserted.get(),
        );
        single(
            out,
            "mcp_meter_aggregator_insert_failures_total",
            "counter",
            "ClickHouse inserts that failed (retried, or halved to find rows refused for good)",
            self.insert_failures.get(),
        );
        single(
            out,
            "mcp_meter_aggregator_dead_letters_total",
            "counter",
            "Messages the aggregator could not read, and rows the store refused, sent to the dead-letter topic",
            self.dead_letters.get(),
        );
    }

    /// The embedded writer's families.
    pub fn render_group_commit(&self, out: &mut String) {
        head(
            out,
            "mcp_meter_store_commit_duration_seconds",
            "histogram",
            "Time of one group commit of the embedded store (SQLite, or ClickHouse with store = clickhouse)",
        );
        self.store_commit_latency
            .write(out, "mcp_meter_store_commit_duration_seconds", "");
        single(
            out,
            "mcp_meter_store_commit_failures_total",
            "counter",
            "Group commits that failed (their requests were answered 503)",
            self.store_commit_failures.get(),
        );
    }

    /// The margin guard's families.
    pub fn render_margin_guard(&self, out: &mut String) {
        head(
            out,
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
        single(
            out,
            "mcp_meter_guard_rounds_failed_total",
            "counter",
            "Margin guard rounds in which some tenant's levels could not be computed or written",
            self.guard_rounds_failed.get(),
        );
    }
}
