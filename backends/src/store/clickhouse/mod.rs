//! The distributed store: ClickHouse, through its HTTP interface (the `clickhouse` crate).
//!
//! Runs on ClickHouse 18.16 and on current servers alike: the DDL in `clickhouse-sql/` and the
//! queries in [`queries`] keep to a portable subset (ARCHITECTURE.md, `clickhouse-sql/`: no DateTime64, TTL,
//! CODEC, Map, Bool, CTEs; `DateTime('UTC')` plus an integer milliseconds column).
//!
//! - [`SqlRunner`]: where SQL text goes; [`HttpRunner`] sends it to a server.
//! - [`migrations`]: the numbered DDL files and `mcp-meter migrate`.
//! - [`queries`]: the SQL text of every query, pure.
//! - [`tsv`]: reading answers.
//! - [`ClickHouseWriter`]: dedup against `mcp_event_keys`, then one INSERT.
//! - [`ClickHouseAnalytics`]: the analytics queries.
//! - [`ClickHouseRetention`]: expired partitions of the key and raw tables dropped.
//! - [`ClickHouseLedger`]: prepaid grants, and the usage a rebuilt wallet counts.

mod ledger;
pub mod migrations;
pub mod queries;
mod reader;
mod retention;
pub mod tsv;
mod writer;

pub use ledger::ClickHouseLedger;
pub use reader::ClickHouseAnalytics;
pub use retention::ClickHouseRetention;
pub use writer::ClickHouseWriter;

use crate::error::{ErrorKind, StoreError};
use schemas::config::ClickHouseConfig;
use std::time::Duration;

/// Where SQL text runs. One trait so that the same statements and queries run on a server and,
/// in the tests, on chDB (current ClickHouse in-process).
#[async_trait::async_trait]
pub trait SqlRunner: Send + Sync {
    /// Runs a statement that answers no rows (DDL, INSERT).
    async fn execute(&self, sql: &str) -> Result<(), StoreError>;
    /// Runs a query and answers its rows in TabSeparated.
    async fn tab_separated(&self, sql: &str) -> Result<String, StoreError>;
    /// Runs statements in order in one session of their own, so that a temporary table made
    /// by the first is there for the next; stops at the first that fails. A runner whose
    /// connection is one session already (chDB) runs them as they come.
    async fn execute_in_session(&self, statements: &[&str]) -> Result<(), StoreError> {
        for sql in statements {
            self.execute(sql).await?;
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl<R: SqlRunner + ?Sized> SqlRunner for &R {
    async fn execute(&self, sql: &str) -> Result<(), StoreError> {
        (**self).execute(sql).await
    }
    async fn tab_separated(&self, sql: &str) -> Result<String, StoreError> {
        (**self).tab_separated(sql).await
    }
    async fn execute_in_session(&self, statements: &[&str]) -> Result<(), StoreError> {
        (**self).execute_in_session(statements).await
    }
}

/// A ClickHouse server over HTTP.
#[derive(Clone)]
pub struct HttpRunner {
    client: clickhouse::Client,
    timeout: Duration,
    /// Statements whose caller stopped waiting before they were answered (its timeout passed,
    /// or the caller was cancelled), each with the outcome its task will publish. Every call of
    /// any clone waits for them, and one leaves the list only once answered: no caller can take
    /// it from another. Such a request is not dropped: it goes on in its task until the server
    /// answers or the connection breaks, for that is the only way to know its outcome (a
    /// paused server reads a request from its socket when it resumes, which may be after a
    /// dedup lookup that a dropped request could not have waited for).
    outstanding: std::sync::Arc<std::sync::Mutex<Vec<Outstanding>>>,
    /// Statements whose request failed but which the server may still be running, by query id.
    unsettled: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

/// A statement on its way, by query id, with where its outcome appears.
#[derive(Clone)]
struct Outstanding {
    id: String,
    outcome: tokio::sync::watch::Receiver<Option<Result<(), StoreError>>>,
}

/// A statement its caller waits for. Dropped unanswered (a timeout, or the caller's future
/// dropped), it lists the statement as orphaned.
struct Attended {
    statement: Option<Outstanding>,
    orphans: std::sync::Arc<std::sync::Mutex<Vec<Outstanding>>>,
}

impl Attended {
    fn answered(mut self) {
        self.statement = None;
    }
}

impl Drop for Attended {
    fn drop(&mut self) {
        if let Some(statement) = self.statement.take() {
            self.orphans
                .lock()
                .expect("outstanding lock")
                .push(statement);
        }
    }
}

/// Queries carry their values inline (a dedup lookup lists thousands of keys), so they may be
/// longer than the server's default 256 KiB limit on query text.
const MAX_QUERY_BYTES: &str = "67108864";

impl HttpRunner {
    /// A runner for the configured database.
    pub fn new(config: &ClickHouseConfig) -> HttpRunner {
        HttpRunner::with_client(client(config).with_database(&config.database), config)
    }

    /// A runner with no database selected, to create the database itself.
    pub fn server(config: &ClickHouseConfig) -> HttpRunner {
        HttpRunner::with_client(client(config), config)
    }

    fn with_client(client: clickhouse::Client, config: &ClickHouseConfig) -> HttpRunner {
        HttpRunner {
            client: client.with_setting("max_query_size", MAX_QUERY_BYTES),
            timeout: Duration::from_millis(config.request_timeout_ms),
            outstanding: Default::default(),
            unsettled: Default::default(),
        }
    }
}

fn client(config: &ClickHouseConfig) -> clickhouse::Client {
    clickhouse::Client::default()
        .with_url(&config.url)
        .with_user(&config.user)
        .with_password(&config.password)
}

impl HttpRunner {
    /// Waits until no statement of unknown outcome is still on its way or running. An INSERT
    /// whose request timed out (a paused or slow server) may land later; a dedup lookup made
    /// before it does would miss its rows and the retry would store them twice. So every
    /// statement and query first waits for the orphaned requests (whose caller timed out or was
    /// cancelled) to be answered (for one `timeout`; then it fails as retriable and the next
    /// call waits again), then for the failed ones to be gone from `system.processes`: after
    /// that their rows are visible or were never written.
    async fn await_unsettled(&self) -> Result<(), StoreError> {
        let orphans = self.outstanding.lock().expect("outstanding lock").clone();
        let deadline = tokio::time::Instant::now() + self.timeout;
        for orphan in orphans {
            match answer(orphan.outcome, deadline).await {
                // Its error is not returned (that call has already failed), only noted.
                Some(answered) => {
                    let _ = self.answered(orphan.id, answered);
                }
                None => {
                    let left = self.outstanding.lock().expect("outstanding lock").len();
                    return Err(StoreError::Failed {
                        store: "clickhouse",
                        context: "wait for an earlier statement",
                        kind: ErrorKind::Retriable,
                        detail: format!(
                            "{left} statement(s) sent earlier are still unanswered after {} ms",
                            self.timeout.as_millis()
                        ),
                    });
                }
            }
        }
        let ids = self.unsettled.lock().expect("unsettled lock").clone();
        if ids.is_empty() {
            return Ok(());
        }
        let list: Vec<String> = ids.iter().map(|id| queries::quote(id)).collect();
        let sql = format!(
            "SELECT count() FROM system.processes WHERE query_id IN ({})",
            list.join(", ")
        );
        loop {
            let running = self.fetch(&sql).await?;
            if running.trim() == "0" {
                self.unsettled
                    .lock()
                    .expect("unsettled lock")
                    .retain(|id| !ids.contains(id));
                return Ok(());
            }
            tracing::info!(
                running = running.trim(),
                "waiting for a statement of unknown outcome to end"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Takes an answered statement off the orphans, keeping its id if it failed but may still be
    /// running on the server (any failure but a refusal: a refused statement ran and failed).
    fn answered(&self, id: String, result: Result<(), StoreError>) -> Result<(), StoreError> {
        self.outstanding
            .lock()
            .expect("outstanding lock")
            .retain(|listed| listed.id != id);
        if let Err(e) = &result {
            if e.kind() != ErrorKind::Permanent {
                self.unsettled.lock().expect("unsettled lock").push(id);
            }
        }
        result
    }

    async fn fetch(&self, sql: &str) -> Result<String, StoreError> {
        let mut cursor = self
            .client
            .query_raw(sql)
            .fetch_bytes("TabSeparated")
            .context("query")?;
        let bytes = within(self.timeout, cursor.collect())
            .await
            .context("query")?;
        String::from_utf8(bytes.to_vec()).map_err(|e| StoreError::BadAnswer {
            context: "read an answer",
            detail: e.to_string(),
        })
    }
}

/// A statement's outcome once its task publishes it, or `None` at `deadline`. A task that
/// ended without publishing one (it panicked, or the runtime stopped) counts as failed.
async fn answer(
    mut outcome: tokio::sync::watch::Receiver<Option<Result<(), StoreError>>>,
    deadline: tokio::time::Instant,
) -> Option<Result<(), StoreError>> {
    match tokio::time::timeout_at(deadline, outcome.wait_for(Option::is_some)).await {
        Ok(Ok(published)) => published.clone(),
        Ok(Err(_)) => Some(Err(StoreError::Failed {
            store: "clickhouse",
            context: "execute",
            kind: ErrorKind::Retriable,
            detail: "the request's task ended without an answer".into(),
        })),
        Err(_) => None,
    }
}

/// A query id no other statement of this process has.
fn new_query_id() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "mcp-meter-{}-{nanos}-{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

#[async_trait::async_trait]
impl SqlRunner for HttpRunner {
    async fn execute(&self, sql: &str) -> Result<(), StoreError> {
        self.await_unsettled().await?;
        let id = new_query_id();
        let statement = self.client.query_raw(sql).with_setting("query_id", &id);
        let (publish, outcome) = tokio::sync::watch::channel(None);
        // From here a caller cancelled (or timed out) leaves the statement orphaned.
        let attended = Attended {
            statement: Some(Outstanding {
                id: id.clone(),
                outcome: outcome.clone(),
            }),
            orphans: self.outstanding.clone(),
        };
        tokio::spawn(async move {
            let _ = publish.send(Some(statement.execute().await.context("execute")));
        });
        match answer(outcome, tokio::time::Instant::now() + self.timeout).await {
            Some(answered) => {
                attended.answered();
                self.answered(id, answered)
            }
            // Its outcome is decided when the server answers: it goes on to that, orphaned.
            None => Err(clickhouse::error::Error::TimedOut).context("execute"),
        }
    }

    async fn tab_separated(&self, sql: &str) -> Result<String, StoreError> {
        self.await_unsettled().await?;
        self.fetch(sql).await
    }

    /// A fresh session each time, so that no earlier call's temporary table or lock is in
    /// the way. These statements are not listed when their caller stops waiting: they are the
    /// aggregator's block inserts, which the server itself refuses to apply late or twice.
    async fn execute_in_session(&self, statements: &[&str]) -> Result<(), StoreError> {
        let session = new_query_id();
        for sql in statements {
            let statement = self
                .client
                .query_raw(sql)
                .with_setting("session_id", &session)
                .with_setting("query_id", new_query_id());
            within(self.timeout, statement.execute())
                .await
                .context("execute in a session")?;
        }
        Ok(())
    }
}

/// Runs `request`, giving up after `timeout` as a timed-out request (which is retriable).
pub(crate) async fn within<T>(
    timeout: Duration,
    request: impl std::future::Future<Output = clickhouse::error::Result<T>>,
) -> clickhouse::error::Result<T> {
    tokio::time::timeout(timeout, request)
        .await
        .unwrap_or(Err(clickhouse::error::Error::TimedOut))
}

/// Checks that the server answers and that its database holds every migration this build
/// knows, so that a process refuses to start rather than fail on its first request.
pub async fn check_ready(
    runner: &dyn SqlRunner,
    config: &ClickHouseConfig,
) -> Result<(), StoreError> {
    let latest = migrations::MIGRATIONS
        .last()
        .map(|m| m.version)
        .unwrap_or(0);
    let answer = runner
        .tab_separated(&format!(
            "SELECT max(version) FROM {}",
            migrations::MIGRATIONS_TABLE
        ))
        .await;
    let applied = match answer {
        Ok(text) => text.trim().parse::<u32>().unwrap_or(0),
        Err(StoreError::Failed { detail: text, .. }) => {
            return Err(StoreError::NotReady(match error_code(&text) {
                Some(60) | Some(81) => format!(
                    "ClickHouse database `{}` at {} is not migrated: run `mcp-meter migrate`",
                    config.database, config.url
                ),
                _ => format!("ClickHouse at {} is unreachable: {text}", config.url),
            }));
        }
        Err(other) => return Err(other),
    };
    if applied < latest {
        return Err(StoreError::NotReady(format!(
            "ClickHouse database `{}` is at migration {applied} of {latest}: run `mcp-meter migrate`",
            config.database
        )));
    }
    Ok(())
}

/// ClickHouse error codes that mean the data is refused: sending the same rows again cannot
/// succeed, and the rows are to blame (the aggregator sets them apart and stores the rest).
/// ClickHouse answers 500 for a type mismatch or a violated check too; the code, not the
/// status, says which errors are the data's.
const PERMANENT_CODES: &[u32] = &[
    6,   // CANNOT_PARSE_TEXT
    26,  // CANNOT_PARSE_QUOTED_STRING
    27,  // CANNOT_PARSE_INPUT_ASSERTION_FAILED
    33,  // CANNOT_READ_ALL_DATA
    53,  // TYPE_MISMATCH
    62,  // SYNTAX_ERROR
    69,  // ARGUMENT_OUT_OF_BOUND
    70,  // CANNOT_CONVERT_TYPE
    117, // INCORRECT_DATA
    395, // FUNCTION_THROW_IF_VALUE_IS_NON_ZERO: a check of the table's own refused the row
    469, // VIOLATED_CONSTRAINT
];

/// ClickHouse error codes that mean the database is not what the code expects (not migrated,
/// a table detached, a user without rights): no row is to blame, and the same request passes
/// once an operator fixes the database.
const NOT_READY_CODES: &[u32] = &[
    16,  // NO_SUCH_COLUMN_IN_TABLE
    47,  // UNKNOWN_IDENTIFIER
    60,  // UNKNOWN_TABLE
    81,  // UNKNOWN_DATABASE
    516, // AUTHENTICATION_FAILED
];

/// A connection failure or timeout passes; so does a server error other than the permanent
/// ones (too many parts, memory limit, a restarting replica).
fn kind_of(e: &clickhouse::error::Error) -> ErrorKind {
    use clickhouse::error::Error;
    match e {
        Error::Network(_) | Error::TimedOut => ErrorKind::Retriable,
        Error::BadResponse(text) => match error_code(text) {
            Some(code) if PERMANENT_CODES.contains(&code) => ErrorKind::Permanent,
            Some(code) if NOT_READY_CODES.contains(&code) => ErrorKind::NotReady,
            _ => ErrorKind::Retriable,
        },
        _ => ErrorKind::Permanent,
    }
}

/// The code of a ClickHouse error text (`Code: 60, e.displayText() = ...` on old servers,
/// `Code: 60. DB::Exception: ...` on new ones).
pub fn error_code(text: &str) -> Option<u32> {
    let rest = &text[text.find("Code: ")? + 6..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// A clickhouse driver error as the store port's error, classified here.
pub(crate) fn store_error(context: &'static str, e: &clickhouse::error::Error) -> StoreError {
    StoreError::Failed {
        store: "clickhouse",
        context,
        kind: kind_of(e),
        detail: e.to_string(),
    }
}

/// Adds what was being done to a clickhouse error.
pub(crate) trait ClickHouseContext<T> {
    fn context(self, context: &'static str) -> Result<T, StoreError>;
}

impl<T> ClickHouseContext<T> for Result<T, clickhouse::error::Error> {
    fn context(self, context: &'static str) -> Result<T, StoreError> {
        self.map_err(|e| store_error(context, &e))
    }
}

#[cfg(test)]
mod error_tests {
    use super::*;

    #[test]
    fn clickhouse_codes_are_read_from_old_and_new_error_texts() {
        let old = "Code: 60, e.displayText() = DB::Exception: Table t1.x doesn't exist., e.what() = DB::Exception";
        let new = "Code: 62. DB::Exception: Syntax error: failed at position 1. (SYNTAX_ERROR)";
        assert_eq!(error_code(old), Some(60));
        assert_eq!(error_code(new), Some(62));
        assert_eq!(error_code("connection reset"), None);
    }

    #[test]
    fn bad_data_is_permanent_and_load_is_not() {
        use clickhouse::error::Error;
        let kind = |text: &str| kind_of(&Error::BadResponse(text.into()));
        assert_eq!(
            kind("Code: 53, e.displayText() = type mismatch"),
            ErrorKind::Permanent
        );
        assert_eq!(
            kind("Code: 469. DB::Exception: Constraint `c` is violated"),
            ErrorKind::Permanent
        );
        assert_eq!(
            kind("Code: 252, e.displayText() = Too many parts"),
            ErrorKind::Retriable
        );
        assert_eq!(kind_of(&Error::TimedOut), ErrorKind::Retriable);
    }
}
