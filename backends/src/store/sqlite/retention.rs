//! Retention in the embedded store: raw rows deleted in short transactions, so that the group
//! commit is never held up for long. A raw row is its own dedup key here (the table's primary
//! key), so keys leave with their rows; the config keeps `raw_days` at least `dedup_days`.

use super::open_connection;
use super::SqliteContext;
use crate::error::StoreError;
use crate::store::{Dropped, Retention, RetentionCutoffs};
use rusqlite::params;
use std::path::PathBuf;

/// Rows per delete transaction: each holds the write lock for a few milliseconds.
const ROWS_PER_DELETE: usize = 5_000;

pub struct SqliteRetention {
    path: PathBuf,
}

impl SqliteRetention {
    pub(super) fn new(path: PathBuf) -> SqliteRetention {
        SqliteRetention { path }
    }

    fn run(&self, raw_before_ms: i64, dry_run: bool) -> Result<u64, StoreError> {
        let conn = open_connection(&self.path)?;
        if dry_run {
            let rows: i64 = conn
                .query_row(
                    "SELECT count(*) FROM mcp_events WHERE occurred_at_ms < ?1",
                    params![raw_before_ms],
                    |row| row.get(0),
                )
                .context("count expired events")?;
            return Ok(rows as u64);
        }
        let mut delete = conn
            .prepare(&format!(
                "DELETE FROM mcp_events WHERE (tenant_id, idempotency_key) IN (
                     SELECT tenant_id, idempotency_key FROM mcp_events
                     WHERE occurred_at_ms < ?1 LIMIT {ROWS_PER_DELETE})"
            ))
            .context("prepare the retention delete")?;
        let mut dropped = 0u64;
        loop {
            let rows = delete
                .execute(params![raw_before_ms])
                .context("delete expired events")?;
            dropped += rows as u64;
            if rows < ROWS_PER_DELETE {
                return Ok(dropped);
            }
        }
    }
}

#[async_trait::async_trait]
impl Retention for SqliteRetention {
    async fn apply(
        &self,
        cutoffs: RetentionCutoffs,
        dry_run: bool,
    ) -> Result<Vec<Dropped>, StoreError> {
        let Some(raw_before_ms) = cutoffs.raw_before_ms else {
            return Ok(Vec::new());
        };
        let this = SqliteRetention::new(self.path.clone());
        let rows = tokio::task::spawn_blocking(move || this.run(raw_before_ms, dry_run))
            .await
            .map_err(|e| StoreError::WorkerGone(format!("the retention task failed: {e}")))??;
        if rows == 0 {
            return Ok(Vec::new());
        }
        let before = chrono::DateTime::from_timestamp_millis(raw_before_ms)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            .unwrap_or_default();
        Ok(vec![Dropped {
            table: "mcp_events",
            what: format!("events that occurred before {before}, with their dedup keys"),
            rows,
        }])
    }
}
