//! One transaction per group commit: raw rows with `INSERT OR IGNORE`, then the rollups of the
//! rows that were really inserted, aggregated in memory first so each rollup row is written
//! once per commit however many events it sums.

use super::SqliteContext;
use crate::error::StoreError;
use crate::sink::{TenantBatch, WriteOutcome};
use crate::store::StoreWriter;
use rusqlite::{params, Connection, Transaction};
use schemas::analytics::{day_of_ms, UsageFigures};
use schemas::event::{ExecutionStatus, RatedEvent};
use std::collections::{HashMap, HashSet};

/// How an upsert merges a rollup row's usage figures: sums add up, maxima take the larger.
macro_rules! merge_figures {
    () => {
        "calls = calls + excluded.calls,
    errors = errors + excluded.errors,
    revenue_micros = revenue_micros + excluded.revenue_micros,
    cogs_micros = cogs_micros + excluded.cogs_micros,
    input_tokens = input_tokens + excluded.input_tokens,
    output_tokens = output_tokens + excluded.output_tokens,
    duration_ms_sum = duration_ms_sum + excluded.duration_ms_sum,
    duration_ms_max = max(duration_ms_max, excluded.duration_ms_max)"
    };
}

const INSERT_EVENT: &str = "INSERT OR IGNORE INTO mcp_events (
    tenant_id, idempotency_key, occurred_at_ms, received_at_ms, metric_name, product_type,
    tool_name, agent_id, customer_id, session_id, execution_status, execution_duration_ms,
    session_boundary, quantity_micros, input_tokens, output_tokens, revenue_micros, cogs_micros,
    rate_plan_version, metadata)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20)";

const LEGACY_KEY_STORED: &str =
    "SELECT 1 FROM mcp_events WHERE tenant_id = ?1 AND idempotency_key = ?2";

const UPSERT_DAILY: &str = concat!(
    "INSERT INTO mcp_daily_stats (
    tenant_id, day, customer_id, agent_id, tool_name, calls, errors, quantity_micros,
    revenue_micros, cogs_micros, input_tokens, output_tokens, duration_ms_sum, duration_ms_max)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)
ON CONFLICT (tenant_id, day, customer_id, agent_id, tool_name) DO UPDATE SET
    quantity_micros = quantity_micros + excluded.quantity_micros, ",
    merge_figures!()
);

const UPSERT_HOURLY: &str = concat!(
    "INSERT INTO mcp_hourly_stats (
    tenant_id, hour_ms, customer_id, agent_id, tool_name, calls, errors, revenue_micros,
    cogs_micros, input_tokens, output_tokens, duration_ms_sum, duration_ms_max)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)
ON CONFLICT (tenant_id, hour_ms, customer_id, agent_id, tool_name) DO UPDATE SET ",
    merge_figures!()
);

const INSERT_DAILY_SESSION: &str = "INSERT OR IGNORE INTO mcp_daily_sessions (
    tenant_id, day, customer_id, agent_id, tool_name, session_id)
VALUES (?1, ?2, ?3, ?4, ?5, ?6)";

const UPSERT_SESSION: &str = concat!(
    "INSERT INTO mcp_session_summary (
    tenant_id, session_id, tool_name, agent_id, first_seen_ms, last_seen_ms, ended, calls,
    errors, revenue_micros, cogs_micros, input_tokens, output_tokens, duration_ms_sum,
    duration_ms_max)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)
ON CONFLICT (tenant_id, session_id, tool_name) DO UPDATE SET
    agent_id = max(agent_id, excluded.agent_id),
    first_seen_ms = min(first_seen_ms, excluded.first_seen_ms),
    last_seen_ms = max(last_seen_ms, excluded.last_seen_ms),
    ended = max(ended, excluded.ended), ",
    merge_figures!()
);

/// The session boundary a heartbeat sends when the session closes.
pub const SESSION_END: &str = "SESSION_END";

pub struct SqliteWriter {
    conn: Connection,
}

impl SqliteWriter {
    pub(super) fn new(conn: Connection) -> SqliteWriter {
        SqliteWriter { conn }
    }
}

#[async_trait::async_trait]
impl StoreWriter for SqliteWriter {
    /// Blocks for the whole transaction; see [`StoreWriter`] on where it runs.
    async fn write(&mut self, batches: &[TenantBatch]) -> Result<Vec<WriteOutcome>, StoreError> {
        // Dropping the transaction on any error below rolls everything back: a failed commit
        // leaves neither raw rows nor rollups behind, and the callers are told nothing stored.
        let tx = self.conn.transaction().context("begin a transaction")?;
        let mut rollups = Rollups::default();
        let mut outcomes = Vec::with_capacity(batches.len());
        {
            let mut insert = tx
                .prepare_cached(INSERT_EVENT)
                .context("prepare the event insert")?;
            let mut legacy = tx
                .prepare_cached(LEGACY_KEY_STORED)
                .context("prepare the legacy key lookup")?;
            for batch in batches {
                let mut outcome = WriteOutcome::with_positions();
                for (i, e) in batch.events.iter().enumerate() {
                    // A retry of an event stored under the previous key derivation.
                    if let Some(key) = &e.legacy_idempotency_key {
                        if legacy
                            .exists(params![&*batch.tenant_id, key])
                            .context("look up a legacy key")?
                        {
                            outcome.repeated_at(i);
                            continue;
                        }
                    }
                    let inserted = insert
                        .execute(params![
                            &*batch.tenant_id,
                            e.idempotency_key,
                            e.occurred_at_ms,
                            e.received_at_ms,
                            e.metric_name,
                            e.product_type,
                            e.tool_name,
                            e.agent_id,
                            e.customer_id,
                            e.session_id,
                            e.execution_status.as_str(),
                            e.execution_duration_ms,
                            e.session_boundary,
                            e.quantity_micros,
                            e.input_tokens,
                            e.output_tokens,
                            e.revenue_micros,
                            e.cogs_micros,
                            e.rate_plan_version,
                            e.metadata,
                        ])
                        .context("insert an event")?;
                    // 0 rows: the key is already stored (or repeated earlier in this commit).
                    if inserted == 1 {
                        outcome.stored();
                        rollups.add(&batch.tenant_id, e);
                    } else {
                        outcome.repeated_at(i);
                    }
                }
                outcomes.push(outcome);
            }
        }
        rollups.write(&tx)?;
        tx.commit().context("commit")?;
        Ok(outcomes)
    }
}

/// `(tenant, day number, customer, agent, tool)`
/// Tenant, day (or hour) since the epoch, customer, agent, tool.
type DailyKey<'a> = (&'a str, i64, &'a str, &'a str, &'a str);

const HOUR_MS: i64 = 3_600_000;

#[derive(Default)]
struct DailySums {
    figures: UsageFigures,
    quantity_micros: i64,
}

struct SessionSums<'a> {
    agent_id: &'a str,
    first_seen_ms: i64,
    last_seen_ms: i64,
    ended: bool,
    figures: UsageFigures,
}

/// The rollup rows a commit touches, summed in memory before they are written.
#[derive(Default)]
struct Rollups<'a> {
    daily: HashMap<DailyKey<'a>, DailySums>,
    daily_sessions: HashSet<(DailyKey<'a>, &'a str)>,
    hourly: HashMap<DailyKey<'a>, UsageFigures>,
    /// `(tenant, session, tool)`
    sessions: HashMap<(&'a str, &'a str, &'a str), SessionSums<'a>>,
}

impl<'a> Rollups<'a> {
    fn add(&mut self, tenant: &'a str, e: &'a RatedEvent) {
        if e.is_call() {
            let day = e.occurred_at_ms.div_euclid(86_400_000);
            let key = (tenant, day, &*e.customer_id, &*e.agent_id, &*e.tool_name);
            let sums = self.daily.entry(key).or_default();
            sums.figures.record(e);
            sums.quantity_micros += e.quantity_micros;
            if !e.session_id.is_empty() {
                self.daily_sessions.insert((key, &e.session_id));
            }
            let hour = e.occurred_at_ms.div_euclid(HOUR_MS);
            let key = (tenant, hour, &*e.customer_id, &*e.agent_id, &*e.tool_name);
            self.hourly.entry(key).or_default().record(e);
        }
        if e.session_id.is_empty() {
            return;
        }
        // Heartbeats roll up under tool '' so they refresh the session without adding calls.
        let tool: &str = if e.is_call() { &e.tool_name } else { "" };
        let session = self
            .sessions
            .entry((tenant, &e.session_id, tool))
            .or_insert_with(|| SessionSums {
                agent_id: &e.agent_id,
                first_seen_ms: e.occurred_at_ms,
                last_seen_ms: e.occurred_at_ms,
                ended: false,
                figures: UsageFigures::default(),
            });
        session.agent_id = session.agent_id.max(&e.agent_id);
        session.first_seen_ms = session.first_seen_ms.min(e.occurred_at_ms);
        session.last_seen_ms = session.last_seen_ms.max(e.occurred_at_ms);
        session.ended |= e.is_heartbeat() && e.session_boundary.eq_ignore_ascii_case(SESSION_END);
        if e.is_call() {
            session.figures.record(e);
        }
    }

    fn write(&self, tx: &Transaction) -> Result<(), StoreError> {
        let mut days: HashMap<i64, String> = HashMap::new();
        let mut day_text = |day: i64| -> String {
            days.entry(day)
                .or_insert_with(|| day_of_ms(day * 86_400_000))
                .clone()
        };
        let mut upsert = tx
            .prepare_cached(UPSERT_DAILY)
            .context("prepare the daily upsert")?;
        for ((tenant, day, customer, agent, tool), sums) in &self.daily {
            let f = &sums.figures;
            upsert
                .execute(params![
                    tenant,
                    day_text(*day),
                    customer,
                    agent,
                    tool,
                    f.calls,
                    f.errors,
                    sums.quantity_micros,
                    f.revenue_micros,
                    f.cogs_micros,
                    f.input_tokens,
                    f.output_tokens,
                    f.duration_ms_sum,
                    f.duration_ms_max,
                ])
                .context("upsert daily stats")?;
        }
        upsert_hourly(tx, self.hourly.iter().map(|(k, f)| (*k, f)))?;
        let mut insert = tx
            .prepare_cached(INSERT_DAILY_SESSION)
            .context("prepare the daily session insert")?;
        for ((tenant, day, customer, agent, tool), session) in &self.daily_sessions {
            insert
                .execute(params![
                    tenant,
                    day_text(*day),
                    customer,
                    agent,
                    tool,
                    session
                ])
                .context("insert a daily session")?;
        }
        let mut upsert = tx
            .prepare_cached(UPSERT_SESSION)
            .context("prepare the session upsert")?;
        for ((tenant, session_id, tool), s) in &self.sessions {
            let f = &s.figures;
            upsert
                .execute(params![
                    tenant,
                    session_id,
                    tool,
                    s.agent_id,
                    s.first_seen_ms,
                    s.last_seen_ms,
                    s.ended,
                    f.calls,
                    f.errors,
                    f.revenue_micros,
                    f.cogs_micros,
                    f.input_tokens,
                    f.output_tokens,
                    f.duration_ms_sum,
                    f.duration_ms_max,
                ])
                .context("upsert a session summary")?;
        }
        Ok(())
    }
}

/// Adds hourly sums (keyed by hours since the epoch) to the hourly rollup.
fn upsert_hourly<'a>(
    tx: &Transaction,
    hours: impl Iterator<Item = (DailyKey<'a>, &'a UsageFigures)>,
) -> Result<(), StoreError> {
    let mut upsert = tx
        .prepare_cached(UPSERT_HOURLY)
        .context("prepare the hourly upsert")?;
    for ((tenant, hour, customer, agent, tool), f) in hours {
        upsert
            .execute(params![
                tenant,
                hour * HOUR_MS,
                customer,
                agent,
                tool,
                f.calls,
                f.errors,
                f.revenue_micros,
                f.cogs_micros,
                f.input_tokens,
                f.output_tokens,
                f.duration_ms_sum,
                f.duration_ms_max,
            ])
            .context("upsert hourly stats")?;
    }
    Ok(())
}

/// Fills the hourly rollup of a store made before it existed from the raw rows retention kept,
/// in one transaction. `open` calls it once, when it created the table. Calls and errors are
/// told apart by the same rules as at ingest (`RatedEvent::is_call`, `is_error`).
pub(super) fn fill_hourly(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = conn.transaction().context("begin the hourly fill")?;
    let mut sums: HashMap<(String, i64, String, String, String), UsageFigures> = HashMap::new();
    {
        let mut rows = tx
            .prepare(
                "SELECT tenant_id, occurred_at_ms, customer_id, agent_id, tool_name, metric_name,
                        execution_status, execution_duration_ms, input_tokens, output_tokens,
                        revenue_micros, cogs_micros
                 FROM mcp_events",
            )
            .context("prepare the hourly fill")?;
        let mut rows = rows
            .query([])
            .context("read raw rows for the hourly fill")?;
        while let Some(row) = rows.next().context("read a raw row")? {
            let status: String = row.get(6).context("read a status")?;
            let event = RatedEvent {
                occurred_at_ms: row.get(1).context("read a time")?,
                metric_name: row.get(5).context("read a metric")?,
                execution_status: ExecutionStatus::parse(&status)
                    .unwrap_or(ExecutionStatus::Success),
                execution_duration_ms: row.get(7).context("read a duration")?,
                input_tokens: row.get(8).context("read tokens")?,
                output_tokens: row.get(9).context("read tokens")?,
                revenue_micros: row.get(10).context("read revenue")?,
                cogs_micros: row.get(11).context("read COGS")?,
                ..RatedEvent::sample_call("", 0)
            };
            if !event.is_call() {
                continue;
            }
            let key = (
                row.get(0).context("read a tenant")?,
                event.occurred_at_ms.div_euclid(HOUR_MS),
                row.get(2).context("read a customer")?,
                row.get(3).context("read an agent")?,
                row.get(4).context("read a tool")?,
            );
            sums.entry(key).or_default().record(&event);
        }
    }
    upsert_hourly(
        &tx,
        sums.iter()
            .map(|((t, h, c, a, tool), f)| ((&**t, *h, &**c, &**a, &**tool), f)),
    )?;
    tx.commit().context("commit the hourly fill")
}
