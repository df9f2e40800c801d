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

/// What a caller can do about a port error: the one classification every adapter maps its
/// driver's errors to, and the ingestor maps to HTTP statuses in one place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// A connection, a timeout, a busy store: the same request may pass later.
    Retriable,
    /// The request itself is refused (bad data, a schema out of step): sending it again cannot
    /// pass; it needs another request or an operator.
    Permanent,
    /// Too much is already waiting: back off, then retry.
    Overloaded,
    /// Reachable but not ready to serve (not migrated, still starting).
    NotReady,
}

/// A failure of the store. Driver errors (rusqlite, clickhouse) are turned into this inside
/// their adapter's folder; no port names a driver type.
#[derive(Clone, Debug, thiserror::Error)]
pub enum StoreError {
    /// The store failed or refused a request; `kind` says whether trying again can help, and
    /// `detail` is the driver's or the server's own words.
    #[error("{store} {context}: {detail}")]
    Failed {
        store: &'static str,
        context: &'static str,
        kind: ErrorKind,
        detail: String,
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
    pub fn kind(&self) -> ErrorKind {
        match self {
            StoreError::Failed { kind, .. } => *kind,
            StoreError::BadAnswer { .. } | StoreError::WorkerGone(_) => ErrorKind::Permanent,
            StoreError::NotReady(_) => ErrorKind::NotReady,
        }
    }

    /// Whether the same request may pass if sent again.
    pub fn is_retriable(&self) -> bool {
        self.kind() == ErrorKind::Retriable
    }
}

impl SinkError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            SinkError::Overloaded { .. } => ErrorKind::Overloaded,
            SinkError::Unavailable(_) => ErrorKind::Retriable,
        }
    }
}
