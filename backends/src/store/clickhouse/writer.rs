//! Writing rated batches into ClickHouse exactly once, on any server version.
//!
//! ClickHouse has no unique keys, so dedup happens before the insert: look the write's keys up
//! in `mcp_event_keys` (a primary-key `IN` lookup, legacy keys of derived keys included), drop
//! those found and repeats within the write, insert the rest in one INSERT. The key table is filled by a view on `mcp_events`,
//! so the INSERT that writes the rows writes their keys too. This is race-free because each
//! store has one writer (one per Kafka partition in the distributed mode).

use super::ClickHouseContext;
use super::{queries, tsv, within, HttpRunner, SqlRunner};
use crate::error::StoreError;
use crate::sink::{BusPosition, TenantBatch, WriteOutcome};
use crate::store::{StoreWriter, StoredOffsets};
use clickhouse::Row;
use serde::Serialize;
use std::collections::{HashMap, HashSet};

/// One row of `mcp_events`, in its column order (RowBinary is positional).
#[derive(Row, Serialize)]
struct EventRow<'a> {
    tenant_id: &'a str,
    idempotency_key: &'a str,
    /// DateTime: seconds since the epoch.
    occurred_at: u32,
    occurred_at_ms: i64,
    received_at_ms: i64,
    metric_name: &'a str,
    product_type: &'a str,
    tool_name: &'a str,
    agent_id: &'a str,
    customer_id: &'a str,
    session_id: &'a str,
    execution_status: &'a str,
    is_call: u8,
    is_error: u8,
    execution_duration_ms: i64,
    session_boundary: &'a str,
    quantity_micros: i64,
    input_tokens: i64,
    output_tokens: i64,
    revenue_micros: i64,
    cogs_micros: i64,
    rate_plan_version: u32,
    metadata: &'a str,
    kafka_partition: i32,
    kafka_offset: i64,
    /// '' for rows that did not come through Kafka.
    kafka_topic: &'a str,
}

/// Keys per lookup query: keeps each query far below `max_query_size` (64 MiB) however large
/// `aggregator.max_batch_rows` is set.
const KEYS_PER_LOOKUP: usize = 100_000;

pub struct ClickHouseWriter {
    runner: HttpRunner,
    /// The events topic whose offsets this writer reads and records ('' when events do not
    /// come through Kafka).
    topic: String,
}

impl ClickHouseWriter {
    /// A writer of events that do not come through Kafka (`serve` with the ClickHouse store).
    pub fn new(runner: HttpRunner) -> ClickHouseWriter {
        ClickHouseWriter::for_topic(runner, "")
    }

    /// A writer of the events topic `topic`: its floors and positions are that topic's.
    pub fn for_topic(runner: HttpRunner, topic: &str) -> ClickHouseWriter {
        ClickHouseWriter {
            runner,
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
impl StoredOffsets for ClickHouseWriter {
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
impl StoreWriter for ClickHouseWriter {
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
        let mut rows = Vec::new();
        for batch in batches {
            let mut outcome = WriteOutcome::default();
            for (i, e) in batch.events.iter().enumerate() {
                let position = batch.positions.get(i);
                // A retry of an event stored under the previous key derivation.
                let stored_before = e
                    .legacy_idempotency_key
                    .as_deref()
                    .is_some_and(|legacy| seen.contains(&(&*batch.tenant_id, legacy)));
                if !stored_before && seen.insert((&batch.tenant_id, &e.idempotency_key)) {
                    outcome.accepted += 1;
                    rows.push(EventRow {
                        tenant_id: &batch.tenant_id,
                        idempotency_key: &e.idempotency_key,
                        occurred_at: e.occurred_at_ms.div_euclid(1000) as u32,
                        occurred_at_ms: e.occurred_at_ms,
                        received_at_ms: e.received_at_ms,
                        metric_name: &e.metric_name,
                        product_type: &e.product_type,
                        tool_name: &e.tool_name,
                        agent_id: &e.agent_id,
                        customer_id: &e.customer_id,
                        session_id: &e.session_id,
                        execution_status: e.execution_status.as_str(),
                        is_call: u8::from(e.is_call()),
                        is_error: u8::from(e.execution_status.is_error()),
                        execution_duration_ms: e.execution_duration_ms,
                        session_boundary: &e.session_boundary,
                        quantity_micros: e.quantity_micros,
                        input_tokens: e.input_tokens,
                        output_tokens: e.output_tokens,
                        revenue_micros: e.revenue_micros,
                        cogs_micros: e.cogs_micros,
                        rate_plan_version: e.rate_plan_version,
                        metadata: e.metadata.as_deref().unwrap_or(""),
                        kafka_partition: position.map_or(-1, |p| p.partition),
                        kafka_offset: position.map_or(-1, |p| p.offset),
                        kafka_topic: if position.is_some() { &self.topic } else { "" },
                    });
                } else {
                    outcome.duplicates += 1;
                }
            }
            outcomes.push(outcome);
        }
        if rows.is_empty() {
            return Ok(outcomes);
        }
        // 3. One INSERT: the raw rows, and through the views their rollups and keys. If it
        //    fails, the caller writes the same batches again; step 1 then skips what landed.
        let timeout = Some(self.runner.timeout());
        let mut insert = self
            .runner
            .client()
            .insert::<EventRow>("mcp_events")
            .await
            .context("start an insert")?
            .with_timeouts(timeout, timeout);
        for row in &rows {
            insert.write(row).await.context("insert events")?;
        }
        within(self.runner.timeout(), insert.end())
            .await
            .context("finish an insert")?;
        Ok(outcomes)
    }
}
