//! Writing rated batches into ClickHouse exactly once, on any server version.
//!
//! ClickHouse has no unique keys, so dedup happens before the insert: look the write's keys up
//! in `mcp_event_keys` (a primary-key `IN` lookup, legacy keys of derived keys included), drop
//! those found and repeats within the write, insert the rest in one INSERT. The key table is filled by a view on `mcp_events`,
//! so the INSERT that writes the rows writes their keys too. This is race-free because each
//! store has one writer (one per Kafka partition in the distributed mode).

use super::migrations::{self, Deduplication, DEDUPLICATE_VIEWS};
use super::{queries, tsv, HttpRunner, SqlRunner};
use crate::error::StoreError;
use crate::sink::{BusPosition, TenantBatch, WriteOutcome};
use crate::store::{StoreWriter, StoredOffsets};
use schemas::event::RatedEvent;
use std::collections::{HashMap, HashSet};
use std::fmt::Write;

/// Keys per lookup query: keeps each query far below `max_query_size` (64 MiB) however large
/// `aggregator.max_batch_rows` is set.
const KEYS_PER_LOOKUP: usize = 100_000;

/// Writes through any [`SqlRunner`]: a server over HTTP, or chDB in the tests.
pub struct ClickHouseWriter<R = HttpRunner> {
    runner: R,
    /// The INSERT's first line, made at the first write for how the events table drops a block
    /// inserted twice.
    insert_header: Option<String>,
    /// The events topic whose offsets this writer reads and records ('' when events do not
    /// come through Kafka).
    topic: String,
}

impl<R: SqlRunner> ClickHouseWriter<R> {
    /// A writer of events that do not come through Kafka (`serve` with the ClickHouse store).
    pub fn new(runner: R) -> ClickHouseWriter<R> {
        ClickHouseWriter::for_topic(runner, "")
    }

    /// A writer of the events topic `topic`: its floors and positions are that topic's.
    pub fn for_topic(runner: R, topic: &str) -> ClickHouseWriter<R> {
        ClickHouseWriter {
            runner,
            insert_header: None,
            topic: topic.to_string(),
        }
    }

    /// The (tenant, key) pairs among `batches` that are already stored.
    async fn stored(
        &self,
        batches: &[TenantBatch],
    ) -> Result<HashSet<(String, String)>, StoreError> {
        let mut by_tenant: HashMap<&str, Vec<&str>> = HashMap::new();
        for batch in batches {
            let keys = by_tenant.entry(&batch.tenant_id).or_default();
            for e in &batch.events {
                keys.push(&e.idempotency_key);
                keys.extend(e.legacy_idempotency_key.as_deref());
            }
        }
        // Lookups of at most KEYS_PER_LOOKUP keys, tenants sharing one while there is room.
        let mut lookups: Vec<Vec<(&str, &[&str])>> = Vec::new();
        let mut room = 0;
        for (tenant, keys) in &by_tenant {
            for chunk in keys.chunks(KEYS_PER_LOOKUP) {
                if chunk.len() > room {
                    lookups.push(Vec::new());
                    room = KEYS_PER_LOOKUP;
                }
                lookups.last_mut().expect("pushed").push((tenant, chunk));
                room -= chunk.len();
            }
        }
        let mut stored = HashSet::new();
        for lookup in lookups {
            let answer = self
                .runner
                .tab_separated(&queries::stored_keys(&lookup))
                .await?;
            for mut row in tsv::rows(&answer, "look up stored keys") {
                stored.insert((row.string()?, row.string()?));
            }
        }
        Ok(stored)
    }
}

#[async_trait::async_trait]
impl<R: SqlRunner> StoredOffsets for ClickHouseWriter<R> {
    async fn stored_offsets(&self, partitions: &[i32]) -> Result<HashMap<i32, i64>, StoreError> {
        let answer = self
            .runner
            .tab_separated(&queries::stored_offsets(&self.topic, partitions))
            .await?;
        let mut offsets = HashMap::new();
        for mut row in tsv::rows(&answer, "read stored offsets") {
            offsets.insert(row.int()? as i32, row.int()?);
        }
        Ok(offsets)
    }

    async fn record_offsets(&self, offsets: &[(i32, i64)]) -> Result<(), StoreError> {
        if offsets.is_empty() {
            return Ok(());
        }
        self.runner
            .execute(&queries::record_offsets(&self.topic, offsets))
            .await
    }

    async fn stored_positions(
        &self,
        batches: &[TenantBatch],
    ) -> Result<HashSet<BusPosition>, StoreError> {
        let mut tenants: Vec<&str> = Vec::new();
        let mut span = (i64::MAX, i64::MIN);
        let mut ranges: HashMap<i32, (i64, i64)> = HashMap::new();
        for batch in batches {
            if !tenants.contains(&&*batch.tenant_id) {
                tenants.push(&batch.tenant_id);
            }
            for (e, p) in batch.events.iter().zip(&batch.positions) {
                span = (span.0.min(e.occurred_at_ms), span.1.max(e.occurred_at_ms));
                let range = ranges.entry(p.partition).or_insert((p.offset, p.offset));
                *range = (range.0.min(p.offset), range.1.max(p.offset));
            }
        }
        if ranges.is_empty() {
            return Ok(HashSet::new());
        }
        let positions: Vec<(i32, i64, i64)> = ranges
            .into_iter()
            .map(|(p, (lo, hi))| (p, lo, hi))
            .collect();
        let answer = self
            .runner
            .tab_separated(&queries::stored_positions(
                &self.topic,
                &tenants,
                span,
                &positions,
            ))
            .await?;
        let mut stored = HashSet::new();
        for mut row in tsv::rows(&answer, "read stored positions") {
            stored.insert(BusPosition {
                partition: row.int()? as i32,
                offset: row.int()?,
            });
        }
        Ok(stored)
    }
}

#[async_trait::async_trait]
impl<R: SqlRunner> StoreWriter for ClickHouseWriter<R> {
    async fn write(&mut self, batches: &[TenantBatch]) -> Result<Vec<WriteOutcome>, StoreError> {
        // 1. Keys already stored by an earlier write (a client retry, a redelivery).
        let stored = self.stored(batches).await?;
        let mut seen: HashSet<(&str, &str)> = stored
            .iter()
            .map(|(t, k)| (t.as_str(), k.as_str()))
            .collect();
        // 2. Decide each event: new, or a duplicate of a stored key or of an earlier event of
        //    this same write. `seen` grows as we go so a repeat inside the write is caught too.
        let mut outcomes = Vec::with_capacity(batches.len());
        if self.insert_header.is_none() {
            let views_check = migrations::events_deduplication(&self.runner).await?
                == Some(Deduplication::Window);
            self.insert_header = Some(match views_check {
                true => queries::INSERT_EVENTS
                    .replace(" FORMAT ", &format!(" {DEDUPLICATE_VIEWS} FORMAT ")),
                false => queries::INSERT_EVENTS.to_string(),
            });
        }
        let mut insert = self.insert_header.clone().expect("made above");
        let header = insert.len();
        for batch in batches {
            let mut outcome = WriteOutcome::with_positions();
            for (i, e) in batch.events.iter().enumerate() {
                // A retry of an event stored under the previous key derivation.
                let stored_before = e
                    .legacy_idempotency_key
                    .as_deref()
                    .is_some_and(|legacy| seen.contains(&(&*batch.tenant_id, legacy)));
                if !stored_before && seen.insert((&batch.tenant_id, &e.idempotency_key)) {
                    outcome.stored();
                    let position = batch.positions.get(i);
                    push_row(&mut insert, &batch.tenant_id, e, position, &self.topic);
                } else {
                    outcome.repeated_at(i);
                }
            }
            outcomes.push(outcome);
        }
        if insert.len() == header {
            return Ok(outcomes);
        }
        // 3. One INSERT: the raw rows, and through the views their rollups and keys. If it
        //    fails, the caller writes the same batches again; step 1 then skips what landed.
        self.runner.execute(&insert).await?;
        Ok(outcomes)
    }
}

/// One row of [`queries::INSERT_EVENTS`], in its column order, as a TabSeparated line.
fn push_row(
    out: &mut String,
    tenant_id: &str,
    e: &RatedEvent,
    position: Option<&BusPosition>,
    topic: &str,
) {
    for text in [tenant_id, &e.idempotency_key] {
        tsv::push_field(out, text);
    }
    tsv::push_date_time(out, e.occurred_at_ms.div_euclid(1000));
    let _ = write!(out, "{}\t{}\t", e.occurred_at_ms, e.received_at_ms);
    for text in [
        &*e.metric_name,
        &e.product_type,
        &e.tool_name,
        &e.agent_id,
        &e.customer_id,
        &e.session_id,
        e.execution_status.as_str(),
    ] {
        tsv::push_field(out, text);
    }
    let _ = write!(
        out,
        "{}\t{}\t{}\t",
        u8::from(e.is_call()),
        u8::from(e.execution_status.is_error()),
        e.execution_duration_ms
    );
    tsv::push_field(out, &e.session_boundary);
    let _ = write!(
        out,
        "{}\t{}\t{}\t{}\t{}\t{}\t",
        e.quantity_micros,
        e.input_tokens,
        e.output_tokens,
        e.revenue_micros,
        e.cogs_micros,
        e.rate_plan_version
    );
    tsv::push_field(out, e.metadata.as_deref().unwrap_or(""));
    let (partition, offset, topic) = match position {
        Some(p) => (p.partition, p.offset, topic),
        // '' for rows that did not come through Kafka.
        None => (-1, -1, ""),
    };
    let _ = write!(out, "{partition}\t{offset}\t");
    tsv::push_escaped(out, topic);
    out.push('\n');
}
