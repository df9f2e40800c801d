//! The port the aggregator consumes through: batches of published events with their places on
//! the bus, and what to do with them afterwards.

use crate::error::ErrorKind;
use crate::sink::BusPosition;
use schemas::event::BusEvent;
use std::time::Duration;

/// A failure of the bus. The Kafka adapter turns rdkafka's errors into this; `kind` says what
/// a caller can do about it.
#[derive(Debug, thiserror::Error)]
#[error("kafka {context}: {detail}")]
pub struct BusError {
    pub context: &'static str,
    pub kind: ErrorKind,
    pub detail: String,
}

impl BusError {
    /// A failure that may pass if tried again (a broker away, a timeout).
    pub fn retriable(context: &'static str, detail: impl ToString) -> BusError {
        BusError {
            context,
            kind: ErrorKind::Retriable,
            detail: detail.to_string(),
        }
    }

    /// A failure no retry can fix (a setting missing, a topic that cannot be created).
    pub fn permanent(context: &'static str, detail: impl ToString) -> BusError {
        BusError {
            context,
            kind: ErrorKind::Permanent,
            detail: detail.to_string(),
        }
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
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
    pub content: Content,
}

/// What a message of the events topic holds. Nearly every message is an event, so the enum is
/// as large as one rather than boxing each.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Content {
    /// A rated event, as the ingestor published it.
    Event(BusEvent),
    /// A cut marker: the block being read ends here ([`EventSource::cut`]).
    Cut,
    /// Something that cannot be read as an event.
    Poison(Poison),
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
    /// `fill` after the first. Says which partitions were taken away since the last poll.
    async fn poll(
        &mut self,
        max: usize,
        idle: Duration,
        fill: Duration,
    ) -> Result<Polled, BusError>;

    /// Sends a message to the dead-letter topic with its reason, and waits until it is durable.
    async fn dead_letter(&self, position: BusPosition, poison: &Poison) -> Result<(), BusError>;

    /// Appends a cut marker to each of `partitions`, all at once, and waits until they are
    /// durable: the block being read of each partition ends at its marker, for every reader
    /// alike.
    async fn cut(&self, partitions: &[i32]) -> Result<(), BusError>;

    /// Moves a partition's read position (past what the store already holds).
    async fn seek(&self, position: BusPosition) -> Result<(), BusError>;

    /// The offset the next record written to `partition` will get (its high watermark), as the
    /// broker says now: one round trip to the broker, waited for off the runtime.
    async fn end_offset(&self, partition: i32) -> Result<i64, BusError>;

    /// The name of the topic consumed.
    fn topic(&self) -> &str;

    /// Records what was consumed. A hint for restarts only: correctness rests on the floors
    /// the store keeps, so a commit that is lost costs re-reading, never a duplicate.
    fn commit(&self, next: &[BusPosition]);

    /// The partitions the group assigns to this member now.
    fn assignment(&self) -> Vec<i32>;

    /// Leaves the group and joins it again as a new member, as a restart would; answers the
    /// partitions this member held, which the caller must forget (as after `poll`'s
    /// `revoked`).
    async fn rejoin(&mut self) -> Result<Vec<i32>, BusError>;
}

/// What the lag monitor asks of the bus, outside the consumer group: where each partition ends
/// and when a record was written. Its calls block on the broker: run them off the async
/// runtime (`spawn_blocking`).
pub trait TopicProbe: Send + Sync + 'static {
    /// Every partition of the events topic with its end offset (high watermark: the offset the
    /// next record will get), in partition order.
    fn end_offsets(&self) -> Result<Vec<(i32, i64)>, BusError>;

    /// When the record at `offset` of `partition` was written, in ms since the epoch; `None`
    /// when the broker has no record there (any more).
    fn written_at_ms(&self, partition: i32, offset: i64) -> Result<Option<i64>, BusError>;
}
