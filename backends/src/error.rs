//! Errors of the ports. Each says whether retrying can help, so callers choose on purpose
//! between backing off and giving up.

/// A failure to make a batch durable. Both kinds pass: the client retries the whole batch,
/// which idempotency keys make safe.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// Too much is already waiting; the client should retry after a pause.
    #[error("ingest is overloaded ({waiting} batches waiting); retry shortly")]
    Overloaded { waiting: usize },
    /// The store or bus cannot take writes right now.
    #[error("the event store is unavailable: {0}")]
    Unavailable(String),
}

/// A failure of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sqlite {context}: {source}")]
    Sqlite {
        context: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error("clickhouse {context}: {source}")]
    ClickHouse {
        context: &'static str,
        #[source]
        source: clickhouse::error::Error,
    },
    /// The store answered something this code cannot read: a bug or a schema out of step.
    #[error("{context}: unexpected answer: {detail}")]
    BadAnswer {
        context: &'static str,
        detail: String,
    },
    /// The store is reachable but cannot serve yet (for example, not migrated).
    #[error("{0}")]
    NotReady(String),
    #[error("a store worker stopped: {0}")]
    WorkerGone(String),
}

impl StoreError {
    /// SQLite's busy and locked answers pass; anything else (a full disk, a corrupt file) needs
    /// an operator.
    pub fn is_retriable(&self) -> bool {
        match self {
            StoreError::Sqlite { source, .. } => matches!(
                source.sqlite_error_code(),
                Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
            ),
            StoreError::ClickHouse { source, .. } => clickhouse_retriable(source),
            StoreError::BadAnswer { .. } | StoreError::NotReady(_) | StoreError::WorkerGone(_) => {
                false
            }
        }
    }
}

/// ClickHouse error codes that mean the request itself is wrong (bad data, a schema out of
/// step with the code): sending it again cannot succeed, so it must not be retried forever.
const CLICKHOUSE_PERMANENT_CODES: &[u32] = &[
    6,   // CANNOT_PARSE_TEXT
    16,  // NO_SUCH_COLUMN_IN_TABLE
    26,  // CANNOT_PARSE_QUOTED_STRING
    27,  // CANNOT_PARSE_INPUT_ASSERTION_FAILED
    33,  // CANNOT_READ_ALL_DATA
    47,  // UNKNOWN_IDENTIFIER
    53,  // TYPE_MISMATCH
    60,  // UNKNOWN_TABLE
    62,  // SYNTAX_ERROR
    81,  // UNKNOWN_DATABASE
    117, // INCORRECT_DATA
    516, // AUTHENTICATION_FAILED
];

/// A connection failure or timeout passes; so does a server error other than the permanent
/// ones (too many parts, memory limit, a restarting replica).
fn clickhouse_retriable(e: &clickhouse::error::Error) -> bool {
    use clickhouse::error::Error;
    match e {
        Error::Network(_) | Error::TimedOut => true,
        Error::BadResponse(text) => match clickhouse_error_code(text) {
            Some(code) => !CLICKHOUSE_PERMANENT_CODES.contains(&code),
            None => true,
        },
        _ => false,
    }
}

/// The code of a ClickHouse error text (`Code: 60, e.displayText() = ...` on old servers,
/// `Code: 60. DB::Exception: ...` on new ones).
pub fn clickhouse_error_code(text: &str) -> Option<u32> {
    let rest = &text[text.find("Code: ")? + 6..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Adds what was being done to a clickhouse error.
pub(crate) trait ClickHouseContext<T> {
    fn context(self, context: &'static str) -> Result<T, StoreError>;
}

impl<T> ClickHouseContext<T> for Result<T, clickhouse::error::Error> {
    fn context(self, context: &'static str) -> Result<T, StoreError> {
        self.map_err(|source| StoreError::ClickHouse { context, source })
    }
}

impl<T> SqliteContext<T> for Result<T, rusqlite::Error> {
    fn context(self, context: &'static str) -> Result<T, StoreError> {
        self.map_err(|source| StoreError::Sqlite { context, source })
    }
}

/// Adds what was being done to a rusqlite error.
pub(crate) trait SqliteContext<T> {
    fn context(self, context: &'static str) -> Result<T, StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clickhouse_codes_are_read_from_old_and_new_error_texts() {
        let old = "Code: 60, e.displayText() = DB::Exception: Table t1.x doesn't exist., e.what() = DB::Exception";
        let new = "Code: 62. DB::Exception: Syntax error: failed at position 1. (SYNTAX_ERROR)";
        assert_eq!(clickhouse_error_code(old), Some(60));
        assert_eq!(clickhouse_error_code(new), Some(62));
        assert_eq!(clickhouse_error_code("connection reset"), None);
    }

    #[test]
    fn bad_data_is_permanent_and_load_is_not() {
        use clickhouse::error::Error;
        assert!(!clickhouse_retriable(&Error::BadResponse(
            "Code: 53, e.displayText() = type mismatch".into()
        )));
        assert!(clickhouse_retriable(&Error::BadResponse(
            "Code: 252, e.displayText() = Too many parts".into()
        )));
        assert!(clickhouse_retriable(&Error::TimedOut));
    }
}
