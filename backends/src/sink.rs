//! The port the ingestor publishes through: a rated batch goes in, and the call returns only
//! once the batch is durable.

use crate::error::SinkError;
use schemas::event::RatedEvent;
use std::sync::Arc;

/// Rated events of one tenant, as one ingest request produced them.
#[derive(Clone, Debug)]
pub struct TenantBatch {
    pub tenant_id: Arc<str>,
    pub events: Vec<RatedEvent>,
    /// Where each event was read from the bus, one per event, in order; empty for events that
    /// did not come through a bus. Stored with the rows so that a restarted aggregator knows
    /// what it has already written.
    pub positions: Vec<BusPosition>,
}

impl TenantBatch {
    /// A batch straight from ingest, with no bus positions.
    pub fn new(tenant_id: Arc<str>, events: Vec<RatedEvent>) -> TenantBatch {
        TenantBatch {
            tenant_id,
            events,
            positions: Vec::new(),
        }
    }
}

/// A message's place on the events topic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BusPosition {
    pub partition: i32,
    pub offset: i64,
}

/// What became of a batch: events stored for the first time, and events whose
/// (tenant, idempotencyKey) was already stored.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WriteOutcome {
    pub accepted: usize,
    pub duplicates: usize,
    /// The positions in the batch of the duplicates, when the sink knows them (a store writer
    /// does; Kafka does not: there the aggregator decides later). Money is charged for the
    /// other events only.
    pub repeated: Option<Vec<usize>>,
}

impl WriteOutcome {
    /// (accepted, duplicates)
    pub fn counts(&self) -> (usize, usize) {
        (self.accepted, self.duplicates)
    }

    /// Counts one event as stored now.
    pub fn stored(&mut self) {
        self.accepted += 1;
    }

    /// Counts the event at `position` as stored before.
    pub fn repeated_at(&mut self, position: usize) {
        self.duplicates += 1;
        self.repeated.get_or_insert_with(Vec::new).push(position);
    }

    /// An outcome that will list its duplicates' positions (none yet).
    pub fn with_positions() -> WriteOutcome {
        WriteOutcome {
            repeated: Some(Vec::new()),
            ..WriteOutcome::default()
        }
    }
}

#[async_trait::async_trait]
pub trait EventSink: Send + Sync {
    /// Makes `batch` durable. On `Ok`, every event is stored or was already stored; on `Err`,
    /// none of it may be assumed stored and the client must retry the whole batch (which
    /// idempotency keys make safe).
    async fn publish(&self, batch: TenantBatch) -> Result<WriteOutcome, SinkError>;

    /// Whether the sink can take batches now (for `/readyz`); `Err` says why not.
    async fn ready(&self) -> Result<(), SinkError>;

    /// What stands behind the port, for people: `kafka`, `store-writer`.
    fn kind(&self) -> &'static str;
}
