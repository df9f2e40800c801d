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
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteOutcome {
    pub accepted: usize,
    pub duplicates: usize,
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
