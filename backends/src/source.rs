//! The port the aggregator consumes through: batches of published events with their places on
//! the bus, and what to do with them afterwards.

use crate::sink::BusPosition;
use schemas::event::BusEvent;
use std::time::Duration;

/// A failure of the bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("kafka {context}: {source}")]
    Kafka {
        context: &'static str,
        #[source]
        source: rdkafka::error::KafkaError,
    },
    #[error("kafka {context}: {detail}")]
    Failed {
        context: &'static str,
        detail: String,
    },
}

/// A message that cannot be read as an event, kept whole for the dead-letter topic.
#[derive(Clone, Debug)]
pub struct Poison {
    pub reason: String,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
}

/// One consumed message.
#[derive(Debug)]
pub struct BusMessage {
    pub position: BusPosition,
    pub content: Result<BusEvent, Poison>,
}

/// What one poll gave: messages, and the partitions this consumer lost since the last poll
/// (messages of those are already left out).
#[derive(Debug, Default)]
pub struct Polled {
    pub messages: Vec<BusMessage>,
    pub revoked: Vec<i32>,
}

#[async_trait::async_trait]
pub trait EventSource: Send {
    /// Waits up to `idle` for a first message, then collects more until `max` messages or
    /// `fill` after the first. Rebalance callbacks run only in here, so partitions change
    /// hands only between two batches of the caller.
    async fn poll(
        &mut self,
        max: usize,
        idle: Duration,
        fill: Duration,
    ) -> Result<Polled, BusError>;

    /// Sends a message to the dead-letter topic with its reason, and waits until it is durable.
    async fn dead_letter(&self, position: BusPosition, poison: &Poison) -> Result<(), BusError>;

    /// Moves a partition's read position (past what the store already holds).
    fn seek(&self, position: BusPosition) -> Result<(), BusError>;

    /// The offset the next record written to `partition` will get (its high watermark), as the
    /// broker says now. Blocks for one round trip to the broker.
    fn end_offset(&self, partition: i32) -> Result<i64, BusError>;

    /// Records what was consumed. A hint for restarts only: correctness rests on the positions
    /// stored with the rows, so a commit that is lost costs re-reading, never a duplicate.
    fn commit(&self, next: &[BusPosition]);
}
