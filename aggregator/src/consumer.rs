//! The distributed mode's store writer: consume the events topic, write ClickHouse exactly once.
//!
//! Consistency contract. The store decides, so no clock and no membership check carries it:
//! - Each partition is cut into blocks by rules that read only the log ([`blocks`]): whoever
//!   writes a partition from a block boundary cuts the same blocks.
//! - A block's events not stored yet (by key) go to the store in one atomic insert, which the
//!   store skips when the partition is already handled at or past the block's first offset
//!   (the writer is late), and which it drops as a copy when the same block is inserted at the
//!   same moment by another writer ([`BlockWriter`]).
//! - A block's rows carry its last offset, so the store's floor of a partition (where the next
//!   block starts) moves in the insert that stores the block; a block that stores no row
//!   records its end after it is handled.
//!
//! A writer paused anywhere, for any time, at worst repeats work the store then refuses. Offsets
//! committed to Kafka are only a hint of where to resume reading.

use crate::lag::ConsumerStatus;
use crate::metrics::METRICS;
use backends::error::StoreError;
use backends::sink::{BusPosition, TenantBatch};
use backends::source::{BusError, BusMessage, Content, EventSource, Poison};
use backends::store::{Block, BlockWrite, BlockWriter};
use blocks::{CutBlock, Cutter};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

pub mod blocks;

/// How the loop batches and how long it keeps trying.
#[derive(Clone, Debug)]
pub struct ConsumerConfig {
    /// Most messages per poll.
    pub max_batch_rows: usize,
    /// Longest a poll waits for more messages after the first.
    pub max_batch_wait: Duration,
    /// Longest pause between two tries of a failed insert.
    pub max_retry_backoff: Duration,
    /// Longest the loop keeps retrying one block. Past it, it gives up (the process exits, and
    /// a supervisor restarts it as a new group member): a store that refuses for that long
    /// is better reported than waited for. Sending the block again later is always safe.
    pub give_up_after: Duration,
}

/// What the loop did, for logs and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Blocks handled.
    pub blocks: u64,
    /// Rows sent to the store (a late writer's rows are sent, and the store refuses them).
    pub rows_written: u64,
    /// Events whose key was stored already (a client's retry, a redelivery).
    pub duplicates: u64,
    pub dead_letters: u64,
    /// Cut markers appended.
    pub markers: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("gave up on a block after {seconds} s of failures; last: {last}")]
    GaveUp { seconds: u64, last: StoreError },
    #[error(
        "the ClickHouse database holds offsets up to {floor} of partition {partition} of topic \
{topic}, but that topic now ends at offset {end}: it was recreated (or its records deleted) \
since, and resuming after {floor} would skip its records below it. Give the new topic a name \
of its own (kafka.events_topic, then `mcp-meter migrate`): the database keeps offsets per \
topic and follows the new one from its start"
    )]
    ForeignOffsets {
        topic: String,
        partition: i32,
        floor: i64,
        end: i64,
    },
    #[error("{0}; exiting so that a supervisor restarts this aggregator as a new group member")]
    Stalled(String),
}

/// Runs until `shutdown` turns true (then returns after the blocks in hand), until a block
/// cannot be written for `give_up_after`, or until the lag monitor gives up on a stall.
/// `status` is what the loop and the lag monitor share: the loop publishes its assignment and
/// whether it is writing, and acts on the monitor's requests between polls.
pub async fn run<S, W>(
    source: &mut S,
    writer: &mut W,
    config: &ConsumerConfig,
    status: &ConsumerStatus,
    mut shutdown: watch::Receiver<bool>,
) -> Result<Progress, ConsumerError>
where
    S: EventSource,
    W: BlockWriter,
{
    let mut progress = Progress::default();
    // Per partition held: its cutter, which starts at the store's floor and leaves out what
    // the bus delivers below it (after a seek back to the floor, or a re-read).
    let mut held: HashMap<i32, Cutter> = HashMap::new();
    let idle = Duration::from_millis(500);
    while !*shutdown.borrow() {
        // 0. The lag monitor's requests.
        if let Some(reason) = status.give_up() {
            return Err(ConsumerError::Stalled(reason));
        }
        let mut revoked = Vec::new();
        if status.take_rejoin() {
            revoked = source.rejoin().await?;
            tracing::warn!(held = ?revoked, "left and rejoined the consumer group to end a stall");
        }
        // 1. Read.
        let mut polled = tokio::select! {
            polled = source.poll(config.max_batch_rows, idle, config.max_batch_wait) => polled?,
            _ = shutdown.changed() => break,
        };
        status.set_assigned(source.assignment());
        polled.revoked.append(&mut revoked);
        // 2. Forget partitions taken away: if they come back, they start again from the floor.
        for p in &polled.revoked {
            held.remove(p);
        }
        let caught_up = polled.messages.len() < config.max_batch_rows;
        // 3. Feed each message to its partition's cutter; partitions new since their
        //    assignment start at the store's floor.
        let mut closed: Vec<CutBlock> = Vec::new();
        let mut arrived: HashMap<i32, Vec<BusMessage>> = HashMap::new();
        for message in polled.messages {
            let p = message.position.partition;
            match held.get_mut(&p) {
                None => arrived.entry(p).or_default().push(message),
                Some(cutter) => closed.extend(cutter.push(message)),
            }
        }
        if !arrived.is_empty() {
            closed.extend(start(source, writer, config, &mut held, arrived).await?);
        }
        // 4. A block still open on a partition read to its end is closed by a marker, which
        //    the next polls bring back.
        if caught_up {
            let open: Vec<i32> = held
                .iter()
                .filter(|(_, cutter)| cutter.wants_marker())
                .map(|(p, _)| *p)
                .collect();
            if !open.is_empty() {
                // Markers that cannot be appended now (the broker away) are asked again after
                // the next poll; a block waits for its marker or its span.
                match source.cut(&open).await {
                    Ok(()) => {
                        for p in &open {
                            held.get_mut(p).expect("held").marker_asked();
                        }
                        progress.markers += open.len() as u64;
                    }
                    Err(e) => {
                        tracing::warn!(partitions = ?open, error = %e,
                            "cut markers not appended; asking again after the next poll");
                    }
                }
            }
        }
        if closed.is_empty() {
            continue;
        }
        // 5. Store the closed blocks, each partition's in order. A stall meanwhile is the
        //    store's, not the group's.
        status.set_writing(true);
        for block in closed {
            let started = Instant::now();
            let next = blocks::after(&block);
            handle(source, writer, config, block, &mut progress).await?;
            // Where to resume reading (a hint; losing it costs a re-read, never a duplicate).
            source.commit(&[next]);
            progress.blocks += 1;
            tracing::debug!(
                ?progress,
                partition = next.partition,
                next = next.offset,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "block handled"
            );
        }
        status.set_writing(false);
    }
    Ok(progress)
}

/// Starts the partitions new to this member: each resumes at its store floor + 1, wherever the
/// group's committed offset (a hint) started the bus. When the bus started there, the
/// messages that arrived are fed at once; otherwise it is sent back (`seek`) and they come
/// again. Answers the blocks the fed messages close.
async fn start<S: EventSource, W: BlockWriter>(
    source: &mut S,
    writer: &W,
    config: &ConsumerConfig,
    held: &mut HashMap<i32, Cutter>,
    arrived: HashMap<i32, Vec<BusMessage>>,
) -> Result<Vec<CutBlock>, ConsumerError> {
    let mut partitions: Vec<i32> = arrived.keys().copied().collect();
    partitions.sort_unstable();
    let floors = retry(config, || writer.stored_offsets(&partitions)).await?;
    let mut closed = Vec::new();
    for (p, messages) in arrived {
        let floor = floors.get(&p).copied().unwrap_or(-1);
        // Offsets are kept per topic name: a floor at or past the topic's end comes from an
        // earlier topic of the same name, whose rows would also pass for this one's.
        if floor >= 0 {
            let end = source.end_offset(p).await?;
            if floor >= end {
                return Err(ConsumerError::ForeignOffsets {
                    topic: source.topic().to_string(),
                    partition: p,
                    floor,
                    end,
                });
            }
        }
        let first = floor + 1;
        let from = messages[0].position.offset;
        let cutter = held.entry(p).or_insert(Cutter::new(p, first));
        if from == first {
            for message in messages {
                closed.extend(cutter.push(message));
            }
        } else {
            source
                .seek(BusPosition {
                    partition: p,
                    offset: first,
                })
                .await?;
            tracing::info!(
                partition = p,
                from,
                to = first,
                "resuming at the stored floor"
            );
        }
    }
    Ok(closed)
}

/// Handles one block: its poison to the dead-letter topic, its events to the store (those the
/// store refuses for good go to the dead-letter topic with the store's reason), and its end
/// recorded when no row of it was stored. Dead letters are durable before the block counts as
/// handled; a writer that handles the block again sends them again (the dead-letter topic is
/// at-least-once).
async fn handle<S: EventSource, W: BlockWriter>(
    source: &S,
    writer: &mut W,
    config: &ConsumerConfig,
    block: CutBlock,
    progress: &mut Progress,
) -> Result<(), ConsumerError> {
    let mut batches: Vec<TenantBatch> = Vec::new();
    for message in block.messages {
        match message.content {
            Content::Event(bus) => push(&mut batches, bus.tenant_id, bus.event, message.position),
            Content::Poison(poison) => {
                dead_letter(source, message.position, &poison, progress).await?;
            }
            Content::Cut => {}
        }
    }
    let block = Block {
        partition: block.partition,
        first: block.first,
        last: block.last,
        batches,
    };
    let mut sent_rows = false;
    if !block.batches.is_empty() {
        let write = store(writer, &block, config, progress).await?;
        sent_rows = write.sent_rows();
        for (position, reason) in &write.refused {
            let (tenant, event) = event_at(&block, *position);
            dead_letter(source, *position, &refused(tenant, event, reason), progress).await?;
        }
    }
    if !sent_rows {
        let end = [(block.partition, block.last)];
        retry(config, || writer.record_offsets(&end)).await?;
    }
    Ok(())
}

/// The tenant and event of a block at `position`.
fn event_at(block: &Block, position: BusPosition) -> (&str, &schemas::event::RatedEvent) {
    block
        .batches
        .iter()
        .find_map(|b| {
            let i = b.positions.iter().position(|p| *p == position)?;
            Some((&*b.tenant_id, &b.events[i]))
        })
        .expect("the store refuses only events of the block")
}

/// Sends one message to the dead-letter topic, durably, and counts it.
async fn dead_letter<S: EventSource>(
    source: &S,
    position: BusPosition,
    poison: &Poison,
    progress: &mut Progress,
) -> Result<(), BusError> {
    tracing::warn!(partition = position.partition, offset = position.offset,
        reason = %poison.reason, "message sent to the dead-letter topic");
    source.dead_letter(position, poison).await?;
    progress.dead_letters += 1;
    METRICS.dead_letters.add(1);
    Ok(())
}

/// A row the store refused for good, as the events topic carried it, with the store's reason.
fn refused(
    tenant_id: &str,
    event: &schemas::event::RatedEvent,
    reason: &backends::error::StoreError,
) -> Poison {
    let payload = serde_json::to_vec(&schemas::event::BusEventRef { tenant_id, event })
        .expect("a rated event serializes");
    Poison {
        reason: format!("the store refused the row: {reason}"),
        key: Some(schemas::event::bus_key(tenant_id, &event.idempotency_key).to_vec()),
        payload: Some(payload),
    }
}

/// Stores `block`, retrying what may pass later (with [`backoff`], up to `give_up_after`).
async fn store<W: BlockWriter>(
    writer: &mut W,
    block: &Block,
    config: &ConsumerConfig,
    progress: &mut Progress,
) -> Result<BlockWrite, ConsumerError> {
    let started = Instant::now();
    let mut attempt = 0u32;
    loop {
        let insert_started = Instant::now();
        match writer.write_block(block).await {
            Ok(write) => {
                METRICS.insert_latency.observe(insert_started.elapsed());
                for o in &write.outcomes {
                    progress.rows_written += o.accepted as u64;
                    progress.duplicates += o.duplicates as u64;
                    METRICS.rows_inserted.add(o.accepted as u64);
                }
                let newest = block
                    .batches
                    .iter()
                    .flat_map(|b| b.events.iter().map(|e| e.received_at_ms))
                    .max();
                if let Some(newest) = newest {
                    let now = chrono::Utc::now().timestamp_millis();
                    METRICS.lag_ms.set(now - newest);
                }
                return Ok(write);
            }
            Err(e) => {
                METRICS.insert_failures.add(1);
                backoff(config, &mut attempt, started, e).await?;
            }
        }
    }
}

/// Adds an event to the batch of its tenant, keeping each batch's positions aligned.
/// The tenant becomes an `Arc<str>` only when it opens a new batch.
fn push(
    batches: &mut Vec<TenantBatch>,
    tenant: impl AsRef<str> + Into<Arc<str>>,
    event: schemas::event::RatedEvent,
    position: BusPosition,
) {
    let batch = match batches
        .iter()
        .position(|b| *b.tenant_id == *tenant.as_ref())
    {
        Some(i) => &mut batches[i],
        None => {
            batches.push(TenantBatch::new(tenant.into(), Vec::new()));
            batches.last_mut().expect("pushed")
        }
    };
    batch.events.push(event);
    batch.positions.push(position);
}

/// Waits before the next try, doubling up to the configured maximum; gives up past the limit.
/// Refused rows do not come here (the writer sets them apart); an error here is one that may
/// pass (a store away, a timeout, a table detached or not migrated yet) or one of reading
/// offsets, which no row can be blamed for.
async fn backoff(
    config: &ConsumerConfig,
    attempt: &mut u32,
    started: Instant,
    e: StoreError,
) -> Result<(), ConsumerError> {
    if started.elapsed() >= config.give_up_after {
        return Err(ConsumerError::GaveUp {
            seconds: started.elapsed().as_secs(),
            last: e,
        });
    }
    let pause = Duration::from_millis(50u64 << (*attempt).min(10)).min(config.max_retry_backoff);
    // Rate-limited by the backoff itself: at most one line per try.
    tracing::warn!(error = %e, retriable = e.is_retriable(), attempt = *attempt, pause_ms = pause.as_millis() as u64,
        "store write failed; retrying");
    *attempt += 1;
    tokio::time::sleep(pause).await;
    Ok(())
}

/// Runs `op` until it succeeds, with [`backoff`] between tries.
async fn retry<T, F, Fut>(config: &ConsumerConfig, mut op: F) -> Result<T, ConsumerError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let started = Instant::now();
    let mut attempt = 0;
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) => backoff(config, &mut attempt, started, e).await?,
        }
    }
}

#[cfg(test)]
mod harness;
