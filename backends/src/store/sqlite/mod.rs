//! The embedded store: SQLite through rusqlite (bundled), one writer and a few readers.
//!
//! WAL mode lets analytics read while the writer commits; `synchronous = FULL` makes a commit
//! durable before it returns, which is what lets the ingestor answer 202 after it. The writer
//! checkpoints every 16,384 WAL pages (64 MiB) rather than SQLite's 1,000: with the default, a
//! checkpoint copied pages back into the database after nearly every group commit, and the
//! same rollup and index pages were written again and again (1.55x the events/s when raised,
//! with a 64 MiB page cache; docs/BENCHMARKS.md).
//!
//! - [`writer`]: [`SqliteWriter`], raw rows and rollups in one transaction.
//! - [`reader`]: [`SqliteAnalytics`], the analytics queries over the rollups.
//! - [`retention`]: [`SqliteRetention`], raw rows past `retention.raw_days` deleted in chunks.
//! - [`ledger`]: [`SqliteLedger`], prepaid grants and the usage a rebuilt wallet counts.

mod ledger;
mod reader;
mod retention;
mod writer;

pub use ledger::SqliteLedger;
pub use reader::SqliteAnalytics;
pub use retention::SqliteRetention;
pub use writer::SqliteWriter;

use crate::error::{ErrorKind, StoreError};
use rusqlite::Connection;
use schemas::config::SqliteConfig;
use std::path::{Path, PathBuf};

/// The database file inside the data directory.
pub const DB_FILE: &str = "mcp-meter.sqlite";

const SCHEMA: &str = include_str!("schema.sql");

/// Opens (creating if needed) the store in `data_dir`: its one writer and its readers.
pub fn open(
    data_dir: &Path,
    config: &SqliteConfig,
) -> Result<(SqliteWriter, SqliteAnalytics), StoreError> {
    std::fs::create_dir_all(data_dir).map_err(|e| {
        StoreError::WorkerGone(format!(
            "cannot create data directory {}: {e}",
            data_dir.display()
        ))
    })?;
    let path: PathBuf = data_dir.join(DB_FILE);
    let mut conn = open_connection(&path)?;
    conn.execute_batch(
        "PRAGMA wal_autocheckpoint = 16384;
         PRAGMA cache_size = -65536;",
    )
    .context("set pragmas")?;
    let had_hourly = table_exists(&conn, "mcp_hourly_stats")?;
    conn.execute_batch(SCHEMA).context("create the schema")?;
    if !had_hourly {
        writer::fill_hourly(&mut conn)?;
    }
    Ok((
        SqliteWriter::new(conn),
        SqliteAnalytics::new(path, config.read_connections),
    ))
}

/// Retention over the store in `data_dir`, on a connection of its own (see [`open`]).
/// The grants ledger of the store in `data_dir` (opened by [`open`] first, which creates it).
pub fn ledger(data_dir: &Path) -> SqliteLedger {
    SqliteLedger::new(data_dir.join(DB_FILE))
}

pub fn retention(data_dir: &Path) -> SqliteRetention {
    SqliteRetention::new(data_dir.join(DB_FILE))
}

fn table_exists(conn: &Connection, table: &str) -> Result<bool, StoreError> {
    conn.prepare("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1")
        .and_then(|mut s| s.exists([table]))
        .context("look the schema up")
}

/// A read-write connection in WAL mode that waits for the writer's lock rather than failing.
fn open_connection(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).context("open the database")?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = FULL;
         PRAGMA busy_timeout = 5000;",
    )
    .context("set pragmas")?;
    Ok(conn)
}

/// A rusqlite error as the store port's error. SQLite's busy and locked answers pass; anything
/// else (a full disk, a corrupt file, a constraint) needs another request or an operator.
pub(crate) fn store_error(context: &'static str, e: rusqlite::Error) -> StoreError {
    let kind = match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
            ErrorKind::Retriable
        }
        _ => ErrorKind::Permanent,
    };
    StoreError::Failed {
        store: "sqlite",
        context,
        kind,
        detail: e.to_string(),
    }
}

/// Adds what was being done to a rusqlite error.
pub(crate) trait SqliteContext<T> {
    fn context(self, context: &'static str) -> Result<T, StoreError>;
}

impl<T> SqliteContext<T> for Result<T, rusqlite::Error> {
    fn context(self, context: &'static str) -> Result<T, StoreError> {
        self.map_err(|e| store_error(context, e))
    }
}
