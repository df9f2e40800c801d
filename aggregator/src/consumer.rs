//! The distributed mode's store writer: consume the events topic, write ClickHouse exactly once.
//!
//! Consistency contract. Three facts make every step below safe to crash at:
//! - A partition has one writer at a time: rebalances happen only inside `poll`, and a batch is
//!   written completely (or the process exits) before the next `poll`.
//! - The store's floor of a partition (the greatest offset of a fully stored batch) is recorded
//!   after the insert succeeded, so everything at or below it is stored.
//! - Every row carries its idempotency key and its (partition, offset); the writer drops keys
//!   already stored, and after a failure the loop drops positions already stored.
//!
//! Offsets committed to Kafka are only a hint of where to resume reading.

use crate::lag::ConsumerStatus;
use crate::metrics::METRICS;
use backends::error::{ErrorKind, StoreError};
use backends::sink::{BusPosition, TenantBatch};
use backends::source::{BusError, BusMessage, EventSource, Poison};
use backends::store::{StoreWriter, StoredOffsets};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How the loop batches and how long it keeps trying.
#[derive(Clone, Debug)]
pub struct ConsumerConfig {
    /// Most messages per insert.
    pub max_batch_rows: usize,
    /// Longest a message waits for its batch to fill.
    pub max_batch_wait: Duration,
    /// Longest pause between two tries of a failed insert.
    pub max_retry_backoff: Duration,
    /// Longest the loop keeps retrying one batch. Past it, it gives up (the process exits): the
    /// group may already have given the partitions to another aggregator, and a late write
    /// could then duplicate theirs. A restart is always safe.
    pub give_up_after: Duration,
}

/// What the loop did, for logs and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    pub batches: u64,
    pub rows_written: u64,
    pub duplicates: u64,
    pub already_stored: u64,
    pub dead_letters: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("gave up on a batch after {seconds} s of failures; last: {last}")]
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
    #[error(
        "the consumer group went on without this member before its batch was written; the \
batch is left to the partitions' new holder"
    )]
    Lost,
}

/// Runs until `shutdown` turns true (then finishes the batch in hand and returns), until a
/// batch cannot be written for `give_up_after`, or until the lag monitor gives up on a stall.
/// `status` is what the loop and the lag monitor share: the loop publishes its assignment and
/// whether it is writing, and acts on the monitor's requests between batches.
pub async fn run<S, W>(
    source: &mut S,
    writer: &mut W,
    config: &ConsumerConfig,
    status: &ConsumerStatus,
    mut shutdown: watch::Receiver<bool>,
) -> Result<Progress, ConsumerError>
where
    S: EventSource,
    W: StoreWriter + StoredOffsets,
{
    let mut progress = Progress::default();
    // Per owned partition: the greatest offset known stored. Absent = not read since assignment.
    let mut floors: HashMap<i32, i64> = HashMap::new();
    // Partitions whose first batch since assignment still needs the position check: a crash may
    // have left a partial insert above the floor.
    let mut unverified: HashSet<i32> = HashSet::new();
    // Per partition: the offset the next message should have. On a topic that is neither
    // compacted nor transactional, a message beyond it means the bus skipped records.
    let mut expected: HashMap<i32, i64> = HashMap::new();
    let idle = Duration::from_millis(500);
    while !*shutdown.borrow() {
        // 0. The lag monitor's requests, between two batches: nothing is half-written here,
        //    so leaving the group (or the process) loses nothing and keeps one writer per
        //    partition.
        if let Some(reason) = status.give_up() {
            return Err(ConsumerError::Stalled(reason));
        }
        let mut revoked = Vec::new();
        if status.take_rejoin() {
            revoked = source.rejoin().await?;
            tracing::warn!(held = ?revoked, "left and rejoined the consumer group to end a stall");
        }
        // 1. Read a batch. Partitions change hands only inside this call.
        let mut polled = tokio::select! {
            polled = source.poll(config.max_batch_rows, idle, config.max_batch_wait) => polled?,
            _ = shutdown.changed() => break,
        };
        status.set_assigned(source.assignment());
        polled.revoked.append(&mut revoked);
        // 2. Forget partitions taken away: their new owner writes them now, and if they come
        //    back their floor is read again.
        for p in &polled.revoked {
            floors.remove(p);
            unverified.remove(p);
            expected.remove(p);
        }
        for m in &polled.messages {
            let p = m.position;
            if !floors.contains_key(&p.partition) {
                continue; // first sight since assignment: step 3 decides where it resumes
            }
            if let Some(want) = expected.get(&p.partition) {
                if p.offset > *want {
                    tracing::error!(
                        partition = p.partition,
                        expected = *want,
                        got = p.offset,
                        "the bus skipped offsets: records in between were never delivered"
                    );
                }
            }
            expected.insert(p.partition, p.offset + 1);
        }
        if polled.messages.is_empty() {
            continue;
        }
        // From here to the floors recorded in step 7 the loop is busy with this batch: a stall
        // meanwhile is the store's, not the group's.
        status.set_writing(true);
        // 3. Partitions new to us since their assignment: read their floors (one small query)
        //    and resume each at floor + 1, wherever the group's committed offset (a hint)
        //    started us. Behind it we would skip records nobody stored; at or below it we would
        //    re-read what is stored. Messages of such a partition in this poll are dropped: the
        //    seek delivers them again.
        let new: Vec<i32> = partitions(&polled.messages)
            .into_iter()
            .filter(|p| !floors.contains_key(p))
            .collect();
        let mut resumed: HashSet<i32> = HashSet::new();
        if !new.is_empty() {
            let stored = retry(config, || writer.stored_offsets(&new)).await?;
            for p in new {
                let floor = stored.get(&p).copied().unwrap_or(-1);
                // Offsets are kept per topic name: a floor at or past the topic's end comes
                // from an earlier topic of the same name (what is stored was read below the
                // end), whose rows would also pass for this one's.
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
                floors.insert(p, floor);
                unverified.insert(p);
                let first = polled.messages.iter().find(|m| m.position.partition == p);
                if first.is_some_and(|m| m.position.offset != floor + 1) {
                    let resume = BusPosition {
                        partition: p,
                        offset: floor + 1,
                    };
                    source.seek(resume).await?;
                    tracing::info!(
                        partition = p,
                        from = first.map(|m| m.position.offset),
                        to = resume.offset,
                        "resuming at the stored floor"
                    );
                    expected.insert(p, resume.offset);
                    resumed.insert(p);
                }
            }
        }
        // 4. Drop what a fully stored batch already holds (re-read after a crash or a seek).
        let before = polled.messages.len();
        let messages: Vec<BusMessage> = polled
            .messages
            .into_iter()
            .filter(|m| !resumed.contains(&m.position.partition))
            .filter(|m| m.position.offset > floors[&m.position.partition])
            .collect();
        progress.already_stored += (before - messages.len()) as u64;
        let next = next_positions(&messages);
        // 5. Poison to the dead-letter topic, durably, before the batch counts as done. After a
        //    crash it may be sent again: the dead-letter topic is at-least-once.
        let mut batches = Vec::new();
        for message in messages {
            match message.content {
                Ok(bus) => push(&mut batches, bus.tenant_id, bus.event, message.position),
                Err(poison) => {
                    dead_letter(source, message.position, &poison, &mut progress).await?;
                }
            }
        }
        // 6. Insert. The writer drops keys already stored and repeats within the batch. On the
        //    first batch of a partition since assignment, and after any failed try, positions
        //    already stored are dropped first: a failed INSERT may have stored part of a batch.
        //    Rows the store refuses for good (bad data) are found by halving and come back here.
        let check_positions = batches
            .iter()
            .flat_map(|b| &b.positions)
            .any(|p| unverified.contains(&p.partition));
        let started = Instant::now();
        let refused = match store(
            writer,
            batches,
            check_positions,
            &|| source.still_member(),
            config,
            &mut progress,
        )
        .await
        {
            Err(ConsumerError::Lost) => {
                // Another member writes these partitions now; the next poll says which were
                // lost, and they are forgotten there.
                tracing::warn!("the group went on without this member: its batch is left to the new holder of its partitions");
                status.set_writing(false);
                continue;
            }
            answer => answer?,
        };
        // 6b. Refused rows go to the dead-letter topic with the store's reason and their source
        //     offsets, durably, before the floors pass them: the batch's other rows are stored,
        //     and these are kept where an operator can read, fix and replay them.
        for (position, poison) in refused {
            dead_letter(source, position, &poison, &mut progress).await?;
        }
        // 7. Raise the floors, now that everything up to them is stored. A crash before this
        //    line re-reads the batch, and step 6's checks drop what is stored.
        let new_floors: Vec<(i32, i64)> =
            next.iter().map(|p| (p.partition, p.offset - 1)).collect();
        retry(config, || writer.record_offsets(&new_floors)).await?;
        for (p, floor) in &new_floors {
            floors.insert(*p, *floor);
            unverified.remove(p);
        }
        status.set_writing(false);
        // 8. Tell Kafka where to resume (a hint; losing it costs a re-read, never a duplicate).
        source.commit(&next);
        progress.batches += 1;
        tracing::debug!(
            ?progress,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "batch stored"
        );
    }
    Ok(progress)
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

/// Stores `batches`, retrying what may pass later (with [`backoff`], up to `give_up_after`).
/// A write the store refuses for good is halved until the refused rows stand alone: every other
/// row is stored, and the refused ones are returned. Each try first drops positions already
/// stored when a partial write may have happened (`check_positions`, and after any failure).
/// Before every insert it asks `still_member`: once the group has gone on without this member,
/// it writes nothing more and answers [`ConsumerError::Lost`].
async fn store<W>(
    writer: &mut W,
    batches: Vec<TenantBatch>,
    check_positions: bool,
    still_member: &dyn Fn() -> bool,
    config: &ConsumerConfig,
    progress: &mut Progress,
) -> Result<Vec<(BusPosition, Poison)>, ConsumerError>
where
    W: StoreWriter + StoredOffsets,
{
    let started = Instant::now();
    let mut attempt = 0u32;
    let mut refused = Vec::new();
    // Chunks still to write, the next one last; each with whether to check positions first.
    let mut chunks = vec![(batches, check_positions)];
    while let Some((mut chunk, mut check)) = chunks.pop() {
        loop {
            if check {
                match writer.stored_positions(&chunk).await {
                    Ok(stored) => {
                        progress.already_stored += drop_positions(&mut chunk, &stored) as u64;
                    }
                    Err(e) => {
                        backoff(config, &mut attempt, started, e).await?;
                        continue;
                    }
                }
            }
            if !still_member() {
                return Err(ConsumerError::Lost);
            }
            let insert_started = Instant::now();
            match writer.write(&chunk).await {
                Ok(outcomes) => {
                    METRICS.insert_latency.observe(insert_started.elapsed());
                    for o in outcomes {
                        progress.rows_written += o.accepted as u64;
                        progress.duplicates += o.duplicates as u64;
                        METRICS.rows_inserted.add(o.accepted as u64);
                    }
                    let newest = chunk
                        .iter()
                        .flat_map(|b| b.events.iter().map(|e| e.received_at_ms))
                        .max();
                    if let Some(newest) = newest {
                        let now = chrono::Utc::now().timestamp_millis();
                        METRICS.lag_ms.set(now - newest);
                    }
                    break;
                }
                Err(e) if e.kind() == ErrorKind::Permanent => {
                    METRICS.insert_failures.add(1);
                    let mut rows = rows_of(chunk);
                    if let [(tenant_id, event, position)] = rows.as_slice() {
                        refused.push((*position, self::refused(tenant_id, event, &e)));
                    } else {
                        tracing::warn!(error = %e, rows = rows.len(),
                            "the store refused a write for good; halving it to find the rows it refuses");
                        let second = rows.split_off(rows.len() / 2);
                        // The first half is written first: it is pushed last.
                        chunks.push((batches_of(second), true));
                        chunks.push((batches_of(rows), true));
                    }
                    break;
                }
                Err(e) => {
                    METRICS.insert_failures.add(1);
                    check = true;
                    backoff(config, &mut attempt, started, e).await?;
                }
            }
        }
    }
    Ok(refused)
}

/// The rows of `batches`, each with its tenant and position, in order.
fn rows_of(batches: Vec<TenantBatch>) -> Vec<(Arc<str>, schemas::event::RatedEvent, BusPosition)> {
    batches
        .into_iter()
        .flat_map(|b| {
            let tenant = b.tenant_id;
            b.events
                .into_iter()
                .zip(b.positions)
                .map(move |(e, p)| (tenant.clone(), e, p))
        })
        .collect()
}

/// `rows` grouped back into one batch per tenant.
fn batches_of(rows: Vec<(Arc<str>, schemas::event::RatedEvent, BusPosition)>) -> Vec<TenantBatch> {
    let mut batches = Vec::new();
    for (tenant, event, position) in rows {
        push(&mut batches, tenant, event, position);
    }
    batches
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
        .iter_mut()
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

/// Removes events whose positions are in `stored`; returns how many.
fn drop_positions(batches: &mut [TenantBatch], stored: &HashSet<BusPosition>) -> usize {
    let mut dropped = 0;
    for batch in batches.iter_mut() {
        let keep: Vec<bool> = batch
            .positions
            .iter()
            .map(|p| !stored.contains(p))
            .collect();
        dropped += keep.iter().filter(|k| !**k).count();
        let mut k = keep.iter();
        batch.events.retain(|_| *k.next().expect("aligned"));
        let mut k = keep.iter();
        batch.positions.retain(|_| *k.next().expect("aligned"));
    }
    dropped
}

fn partitions(messages: &[BusMessage]) -> Vec<i32> {
    let mut ps: Vec<i32> = messages.iter().map(|m| m.position.partition).collect();
    ps.sort_unstable();
    ps.dedup();
    ps
}

/// Per partition, the offset after the last message: where reading resumes.
fn next_positions(messages: &[BusMessage]) -> Vec<BusPosition> {
    let mut next: HashMap<i32, i64> = HashMap::new();
    for m in messages {
        let n = next.entry(m.position.partition).or_insert(0);
        *n = (*n).max(m.position.offset + 1);
    }
    let mut out: Vec<BusPosition> = next
        .into_iter()
        .map(|(partition, offset)| BusPosition { partition, offset })
        .collect();
    out.sort_by_key(|p| p.partition);
    out
}

/// Waits before the next try, doubling up to the configured maximum; gives up past the limit.
/// Refused rows do not come here ([`store`] sets them apart); an error here is one that may
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

#[cfg(test)]
mod tests {
    use super::*;
    use schemas::event::{BusEvent, RatedEvent};

    fn message(partition: i32, offset: i64) -> BusMessage {
        BusMessage {
            position: BusPosition { partition, offset },
            content: Ok(BusEvent {
                tenant_id: "t".into(),
                event: RatedEvent::sample_call(&format!("k{partition}-{offset}"), 0),
            }),
        }
    }

    #[test]
    fn resume_positions_are_one_past_the_last_offset_of_each_partition() {
        let ms = [message(1, 5), message(0, 9), message(1, 7), message(0, 3)];
        assert_eq!(
            next_positions(&ms),
            vec![
                BusPosition {
                    partition: 0,
                    offset: 10
                },
                BusPosition {
                    partition: 1,
                    offset: 8
                }
            ]
        );
        assert_eq!(partitions(&ms), vec![0, 1]);
    }

    #[test]
    fn dropping_stored_positions_keeps_events_and_positions_aligned() {
        let mut batches = Vec::new();
        for (p, o) in [(0, 1), (0, 2), (1, 1), (0, 3)] {
            let m = message(p, o);
            let bus = m.content.unwrap();
            push(&mut batches, bus.tenant_id, bus.event, m.position);
        }
        let stored: HashSet<BusPosition> = [BusPosition {
            partition: 0,
            offset: 2,
        }]
        .into();
        assert_eq!(drop_positions(&mut batches, &stored), 1);
        let b = &batches[0];
        assert_eq!(b.events.len(), b.positions.len());
        let keys: Vec<&str> = b
            .events
            .iter()
            .map(|e| e.idempotency_key.as_str())
            .collect();
        assert_eq!(keys, ["k0-1", "k1-1", "k0-3"]);
    }
}
