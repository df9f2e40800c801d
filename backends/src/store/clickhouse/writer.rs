//! Writing rated batches into ClickHouse exactly once, on any server version.
//!
//! ClickHouse has no unique keys, so dedup happens before the insert: look the write's keys up
//! in `mcp_event_keys` (a primary-key `IN` lookup, legacy keys of derived keys included), drop
//! those found and repeats within the write, insert the rest in one INSERT. The key table is
//! filled by a view on `mcp_events`, so the INSERT that writes the rows writes their keys too.
//!
//! `serve` writes batches ([`StoreWriter`]): it is the store's one writer. The aggregator writes
//! blocks of one Kafka partition ([`BlockWriter`]), which stay exact with any number of late or
//! concurrent writers: the rows wait in a temporary table of the writer's session, and one
//! `INSERT … SELECT` moves them into `mcp_events` only while the partition's floor (kept by a
//! view, in the same INSERT as the rows) is at or below the block's first offset. Two writers
//! sending the same block at the same moment send the same rows in the same order, and the
//! events table drops the second copy (migration 0009).

use super::migrations::{self, Deduplication, DEDUPLICATE_VIEWS};
use super::{queries, tsv, HttpRunner, SqlRunner};
use crate::error::ErrorKind;
use crate::error::StoreError;
use crate::sink::{BusPosition, TenantBatch, WriteOutcome};
use crate::store::{Block, BlockWrite, BlockWriter, StoreWriter, StoredOffsets};
use schemas::event::RatedEvent;
use std::collections::{HashMap, HashSet};
use std::fmt::Write;

/// Keys per lookup query: keeps each query far below `max_query_size` (64 MiB) however large
/// `aggregator.max_batch_rows` is set.
const KEYS_PER_LOOKUP: usize = 100_000;

/// Writes through any [`SqlRunner`]: a server over HTTP, or chDB in the tests.
pub struct ClickHouseWriter<R = HttpRunner> {
    runner: R,
    /// What inserts into the events table add (batches, blocks) for how it drops a block
    /// inserted twice, read at the first write.
    settings: Option<Settings>,
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
            settings: None,
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
}

/// The SETTINGS clauses of the two inserts into `mcp_events`.
#[derive(Debug)]
struct Settings {
    /// Of a batch's INSERT.
    batch: String,
    /// Of a block's INSERT … SELECT.
    block: String,
}

/// Servers from 25.x decide by themselves whether an INSERT … SELECT drops a block inserted
/// twice, and skip it for a SELECT with a subquery (the floor check). The block's rows are
/// what the writer sent, identical in every copy, so the writer asks for the check.
const DEDUPLICATE_BLOCK_SELECT: &str = "deduplicate_insert_select = 'enable_even_for_bad_queries'";

/// `SETTINGS a, b` for the given settings; nothing for none.
fn settings_clause(settings: &[&str]) -> String {
    match settings.is_empty() {
        true => String::new(),
        false => format!("SETTINGS {}", settings.join(", ")),
    }
}

impl<R: SqlRunner> ClickHouseWriter<R> {
    /// Reads, at the first write, what inserts into `mcp_events` carry.
    async fn read_settings(&mut self) -> Result<(), StoreError> {
        if self.settings.is_some() {
            return Ok(());
        }
        let window =
            migrations::events_deduplication(&self.runner).await? == Some(Deduplication::Window);
        let select_setting = self
            .runner
            .tab_separated(
                "SELECT count() FROM system.settings WHERE name = 'deduplicate_insert_select'",
            )
            .await?;
        let views: &[&str] = if window { &[DEDUPLICATE_VIEWS] } else { &[] };
        let mut block = views.to_vec();
        if select_setting.trim() == "1" {
            block.push(DEDUPLICATE_BLOCK_SELECT);
        }
        self.settings = Some(Settings {
            batch: settings_clause(views),
            block: settings_clause(&block),
        });
        Ok(())
    }

    fn settings(&self) -> &Settings {
        self.settings.as_ref().expect("read at the first write")
    }

    /// The rows of `batches` to insert, as TabSeparated lines after the statement `header`
    /// that takes them, in one text, and what became of each batch: an event is new, or
    /// repeats a stored key or an earlier event of this write. Rows carry `block_end` (-1
    /// outside a block).
    async fn new_rows(
        &self,
        batches: &[TenantBatch],
        header: String,
        block_end: i64,
    ) -> Result<(NewRows, Vec<WriteOutcome>), StoreError> {
        // 1. Keys already stored by an earlier write (a client retry, a redelivery).
        let stored = self.stored(batches).await?;
        let mut seen: HashSet<(&str, &str)> = stored
            .iter()
            .map(|(t, k)| (t.as_str(), k.as_str()))
            .collect();
        // 2. Decide each event. `seen` grows as we go so a repeat inside the write is caught.
        let mut rows = NewRows {
            header: header.len(),
            text: header,
            rows: Vec::new(),
        };
        let mut outcomes = Vec::with_capacity(batches.len());
        for (b, batch) in batches.iter().enumerate() {
            let mut outcome = WriteOutcome::with_positions();
            for (i, e) in batch.events.iter().enumerate() {
                // A retry of an event stored under the previous key derivation.
                let stored_before = e
                    .legacy_idempotency_key
                    .as_deref()
                    .is_some_and(|legacy| seen.contains(&(&*batch.tenant_id, legacy)));
                if !stored_before && seen.insert((&batch.tenant_id, &e.idempotency_key)) {
                    outcome.stored();
                    let at = batch.positions.get(i).map(|p| (p, self.topic.as_str()));
                    let start = rows.text.len();
                    push_row(&mut rows.text, &batch.tenant_id, e, at, block_end);
                    rows.rows.push(((b, i), start..rows.text.len()));
                } else {
                    outcome.repeated_at(i);
                }
            }
            outcomes.push(outcome);
        }
        Ok((rows, outcomes))
    }

    /// Fills a block table of a fresh session (`fill`: [`queries::fill_block`] and its rows)
    /// and runs `then` there.
    async fn in_block_table(&self, fill: &str, then: Option<&str>) -> Result<(), StoreError> {
        let mut statements = vec![queries::DROP_BLOCK_TABLE, queries::CREATE_BLOCK_TABLE, fill];
        statements.extend(then);
        statements.push(queries::DROP_BLOCK_TABLE);
        self.runner.execute_in_session(&statements).await
    }

    /// The rows among `rows` that the events table refuses for good, each with the server's
    /// reason, found by filling block tables with halves until each refused row stands alone.
    /// Nothing reaches the events table meanwhile.
    async fn refused(&self, rows: &NewRows) -> Result<Vec<(RowOf, StoreError)>, StoreError> {
        let mut refused = Vec::new();
        let mut parts = vec![&rows.rows[..]];
        while let Some(part) = parts.pop() {
            match self.in_block_table(&rows.only(part), None).await {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::Permanent => match part {
                    [(row, _)] => refused.push((*row, e)),
                    _ => {
                        let (first, second) = part.split_at(part.len() / 2);
                        parts.push(second);
                        parts.push(first);
                    }
                },
                Err(e) => return Err(e),
            }
        }
        Ok(refused)
    }
}

/// Which event a row is: (batch, event), by index.
type RowOf = (usize, usize);

/// The rows to insert: the statement that takes them (its first `header` bytes) and their
/// TabSeparated lines, in one text, and where each row is in it.
struct NewRows {
    text: String,
    header: usize,
    rows: Vec<(RowOf, std::ops::Range<usize>)>,
}

impl NewRows {
    /// The statement with only the lines of `rows` (a slice of `self.rows`), in order.
    fn only(&self, rows: &[(RowOf, std::ops::Range<usize>)]) -> String {
        let lines = rows.iter().map(|(_, range)| &self.text[range.clone()]);
        std::iter::once(&self.text[..self.header])
            .chain(lines)
            .collect()
    }
}

#[async_trait::async_trait]
impl<R: SqlRunner> StoreWriter for ClickHouseWriter<R> {
    async fn write(&mut self, batches: &[TenantBatch]) -> Result<Vec<WriteOutcome>, StoreError> {
        self.read_settings().await?;
        let header = queries::insert_events(&self.settings().batch);
        let (rows, outcomes) = self.new_rows(batches, header, -1).await?;
        if rows.rows.is_empty() {
            return Ok(outcomes);
        }
        // 3. One INSERT: the raw rows, and through the views their rollups and keys. If it
        //    fails, the caller writes the same batches again; step 1 then skips what landed.
        self.runner.execute(&rows.text).await?;
        Ok(outcomes)
    }
}

#[async_trait::async_trait]
impl<R: SqlRunner> BlockWriter for ClickHouseWriter<R> {
    async fn write_block(&mut self, block: &Block) -> Result<BlockWrite, StoreError> {
        self.read_settings().await?;
        let (mut rows, mut outcomes) = self
            .new_rows(&block.batches, queries::fill_block(), block.last)
            .await?;
        let mut write = BlockWrite::default();
        if !rows.rows.is_empty() {
            let insert = queries::insert_block(
                &self.topic,
                block.partition,
                block.first,
                &self.settings().block,
            );
            match self.in_block_table(&rows.text, Some(&insert)).await {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::Permanent => {
                    // Rows the events table refuses (a check of its own): set them apart, and
                    // insert the others as the block. Every writer sets the same ones apart.
                    tracing::warn!(error = %e, rows = rows.rows.len(),
                        "the store refused a block for good; finding the rows it refuses");
                    let refused = self.refused(&rows).await?;
                    rows.rows
                        .retain(|(row, _)| !refused.iter().any(|(r, _)| r == row));
                    for ((b, i), reason) in refused {
                        outcomes[b].accepted -= 1;
                        write.refused.push((block.batches[b].positions[i], reason));
                    }
                    if !rows.rows.is_empty() {
                        let accepted = rows.only(&rows.rows);
                        self.in_block_table(&accepted, Some(&insert)).await?;
                    }
                }
                Err(e) => return Err(e),
            }
        }
        write.outcomes = outcomes;
        Ok(write)
    }
}

/// One row in [`queries::EVENT_COLUMNS`] order, as a TabSeparated line: the event, where it
/// was read from Kafka (`at`: position and topic), and the end of its block.
fn push_row(
    out: &mut String,
    tenant_id: &str,
    e: &RatedEvent,
    at: Option<(&BusPosition, &str)>,
    block_end: i64,
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
    let (partition, offset, topic) = match at {
        Some((p, topic)) => (p.partition, p.offset, topic),
        // '' for rows that did not come through Kafka.
        None => (-1, -1, ""),
    };
    let _ = write!(out, "{partition}\t{offset}\t");
    tsv::push_escaped(out, topic);
    let _ = writeln!(out, "\t{block_end}");
}
