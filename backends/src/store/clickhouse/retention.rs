//! Retention in ClickHouse: whole partitions dropped, never rows deleted. `mcp_event_keys` is
//! partitioned by the day an event arrived, `mcp_events` by the month it occurred; a partition
//! goes once all of it lies before the cutoff. The rollup tables are never touched. Dropping is
//! idempotent, so every aggregator may run it.

use super::{tsv, SqlRunner};
use crate::error::StoreError;
use crate::store::{Dropped, Retention, RetentionCutoffs};
use chrono::{DateTime, Datelike};

pub struct ClickHouseRetention<R> {
    runner: R,
}

impl<R: SqlRunner> ClickHouseRetention<R> {
    pub fn new(runner: R) -> ClickHouseRetention<R> {
        ClickHouseRetention { runner }
    }

    /// The table's active partitions and their rows, by partition id.
    async fn partitions(&self, table: &str) -> Result<Vec<(String, u64)>, StoreError> {
        let answer = self
            .runner
            .tab_separated(&format!(
                "SELECT partition_id, sum(rows) FROM system.parts \
WHERE database = currentDatabase() AND table = '{table}' AND active \
GROUP BY partition_id ORDER BY partition_id"
            ))
            .await?;
        let mut partitions = Vec::new();
        for mut row in tsv::rows(&answer, "list partitions") {
            partitions.push((row.string()?, row.int()? as u64));
        }
        Ok(partitions)
    }
}

/// A partition id's date as `YYYYMMDD` (keys) or `YYYYMM` (events), for comparing ids of one
/// table: both formats sort as their dates do.
fn id_of(ms: i64, with_day: bool) -> String {
    let t = DateTime::from_timestamp_millis(ms).unwrap_or_default();
    if with_day {
        format!("{:04}{:02}{:02}", t.year(), t.month(), t.day())
    } else {
        format!("{:04}{:02}", t.year(), t.month())
    }
}

#[async_trait::async_trait]
impl<R: SqlRunner> Retention for ClickHouseRetention<R> {
    async fn apply(
        &self,
        cutoffs: RetentionCutoffs,
        dry_run: bool,
    ) -> Result<Vec<Dropped>, StoreError> {
        // Keys: a day's partition goes when the day is before the cutoff's day. Events: a
        // month's partition goes when the month is before the cutoff's month, so that no row
        // inside the retention period is dropped with it.
        let mut plan = vec![(
            "mcp_event_keys",
            id_of(cutoffs.keys_before_ms, true),
            "dedup keys of events that arrived on",
        )];
        if let Some(raw_before_ms) = cutoffs.raw_before_ms {
            plan.push((
                "mcp_events",
                id_of(raw_before_ms, false),
                "raw events that occurred in",
            ));
        }
        let mut dropped = Vec::new();
        for (table, cutoff, what) in plan {
            for (id, rows) in self.partitions(table).await? {
                // Ids of the table's own format only (all digits, the cutoff's length).
                if id.len() != cutoff.len() || !id.bytes().all(|b| b.is_ascii_digit()) {
                    continue;
                }
                if id >= cutoff {
                    continue;
                }
                if !dry_run {
                    self.runner
                        .execute(&format!("ALTER TABLE {table} DROP PARTITION ID '{id}'"))
                        .await?;
                }
                let when = if id.len() == 8 {
                    format!("{}-{}-{}", &id[..4], &id[4..6], &id[6..])
                } else {
                    format!("{}-{}", &id[..4], &id[4..])
                };
                dropped.push(Dropped {
                    table,
                    what: format!("partition {id}: {what} {when}"),
                    rows,
                });
            }
        }
        Ok(dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_ids_sort_as_their_dates() {
        let ms = chrono::DateTime::parse_from_rfc3339("2026-10-05T13:00:00Z")
            .unwrap()
            .timestamp_millis();
        assert_eq!(id_of(ms, true), "20261005");
        assert_eq!(id_of(ms, false), "202610");
        assert!(id_of(ms, true).as_str() > "20260930");
        assert!(id_of(ms, false).as_str() > "202609");
    }
}
