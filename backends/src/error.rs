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
            StoreError::WorkerGone(_) => false,
        }
    }
}

/// Adds what was being done to a rusqlite error.
pub(crate) trait SqliteContext<T> {
    fn context(self, context: &'static str) -> Result<T, StoreError>;
}

impl<T> SqliteContext<T> for Result<T, rusqlite::Error> {
    fn context(self, context: &'static str) -> Result<T, StoreError> {
        self.map_err(|source| StoreError::Sqlite { context, source })
    }
}
