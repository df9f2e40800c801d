//! The store ports: the writer (one transaction over many batches) and the analytics reader.
//!
//! Analytics read the rollups, never raw rows, and return integer sums; ordering and assembly
//! ([`by_revenue_then_name`], [`assemble_agents`]) and derived figures (in `schemas`' row
//! types) are shared, so every adapter answers alike.
//!
//! - [`CreditLedger`]: prepaid grants and the usage they pay for, the one read of raw rows
//!   (by the time usage was received), done only to rebuild a wallet.
//! - [`sqlite`]: the embedded store.
//! - [`clickhouse`]: the distributed store.

use crate::error::StoreError;
use crate::sink::{TenantBatch, WriteOutcome};
use crate::state::WalletSeed;
use schemas::analytics::{
    AgentUsage, CustomerUsage, DateRange, DayUsage, Series, SeriesPoint, SeriesQuery, SeriesRow,
    SessionDetail, SessionUsage, ToolUsage, UsageFigures, UsageSummary,
};
use schemas::billing::{BillingKey, BillingLine, BillingQuery};
use schemas::credits::{CreditGrant, WalletGrant};
use std::collections::{BTreeMap, HashMap, HashSet};

pub mod clickhouse;
pub mod sqlite;

/// Writes rated batches. One writer per store (or per Kafka partition): deduplication relies on
/// no other writer inserting the same keys at the same time. `write` may block the thread it
/// runs on (SQLite does), so it is given a thread of its own, never the shared runtime.
#[async_trait::async_trait]
pub trait StoreWriter: Send {
    /// Writes every batch: raw rows deduplicated on (tenant, idempotencyKey), and the rollups of
    /// exactly the rows that were new. Returns one outcome per batch, in order. On `Err` the
    /// caller must assume nothing was written and write the same batches again, which
    /// deduplication makes safe.
    async fn write(&mut self, batches: &[TenantBatch]) -> Result<Vec<WriteOutcome>, StoreError>;
}

/// Prepaid credit grants, durable, and the usage they pay for: what a customer's wallet is
/// rebuilt from when the state lost it ([`wallet_seeds`]).
#[async_trait::async_trait]
pub trait CreditLedger: Send + Sync {
    /// Records `grant` unless its key is recorded for the tenant already; answers the grant
    /// recorded under the key (the first one, whatever this one says).
    async fn record_grant(
        &self,
        tenant: &str,
        grant: &CreditGrant,
    ) -> Result<CreditGrant, StoreError>;

    /// The tenant's grants (of one customer, when named), oldest first, one per key.
    async fn grants(
        &self,
        tenant: &str,
        customer: Option<&str>,
    ) -> Result<Vec<CreditGrant>, StoreError>;

    /// The tenant's calls received in `[since_ms, before_ms)`, summed per customer, agent and
    /// session: what window counters count from before the rows a rebuild reads one by one.
    async fn call_groups(
        &self,
        tenant: &str,
        since_ms: i64,
        before_ms: i64,
    ) -> Result<Vec<CallGroup>, StoreError>;

    /// The tenant's calls received at or after `since_ms`, one by one, read in one query (so
    /// the rows are one consistent set, whatever is being written meanwhile).
    async fn calls_since(&self, tenant: &str, since_ms: i64)
        -> Result<Vec<StoredCall>, StoreError>;

    /// The customer's usage (rated revenue) received at or after `since_ms`: in all, and
    /// before each of `before_ms`.
    async fn usage_since(
        &self,
        tenant: &str,
        customer: &str,
        since_ms: i64,
        before_ms: &[i64],
    ) -> Result<(i64, Vec<i64>), StoreError>;
}

/// Calls of one customer, agent and session, summed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallGroup {
    pub customer_id: String,
    pub agent_id: String,
    pub session_id: String,
    pub calls: i64,
    pub revenue_micros: i64,
}

/// One stored call, as a rebuild reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredCall {
    pub idempotency_key: String,
    pub customer_id: String,
    pub agent_id: String,
    pub session_id: String,
    pub revenue_micros: i64,
    pub received_at_ms: i64,
}

/// Keeps the first grant of each key (by grant time): concurrent grants with one key may both
/// be stored where the store has no unique index (ClickHouse); every reader picks the same one.
pub fn first_grant_per_key(mut grants: Vec<CreditGrant>) -> Vec<CreditGrant> {
    grants.sort_by(|a, b| {
        (
            a.granted_at_ms,
            &a.idempotency_key,
            &a.customer_id,
            a.amount_micros,
        )
            .cmp(&(
                b.granted_at_ms,
                &b.idempotency_key,
                &b.customer_id,
                b.amount_micros,
            ))
    });
    let mut seen = HashSet::new();
    grants.retain(|g| seen.insert(g.idempotency_key.clone()));
    grants
}

/// Every prepaid customer's wallet of `tenant` as the store knows it at `now_ms`: its grants,
/// for each lapsed one the usage received before it lapsed, and the usage received since its
/// first grant (a wallet counts usage from then on).
///
/// Usage received before `recent_since_ms` is summed by the store; what came after is summed
/// from `recent`, the calls a rebuild read one by one (and claims). Both parts together count
/// each stored call once, and exactly the recent calls the rebuild claims.
pub async fn wallet_seeds(
    ledger: &dyn CreditLedger,
    tenant: &str,
    now_ms: i64,
    recent_since_ms: i64,
    recent: &[StoredCall],
) -> Result<Vec<WalletSeed>, StoreError> {
    let mut by_customer: BTreeMap<String, Vec<CreditGrant>> = BTreeMap::new();
    for g in ledger.grants(tenant, None).await? {
        by_customer
            .entry(g.customer_id.clone())
            .or_default()
            .push(g);
    }
    // The recent calls of each prepaid customer, found in one pass.
    let mut recent_of: HashMap<&str, Vec<&StoredCall>> = HashMap::new();
    for c in recent {
        if by_customer.contains_key(&c.customer_id) {
            recent_of.entry(&c.customer_id).or_default().push(c);
        }
    }
    let mut seeds = Vec::with_capacity(by_customer.len());
    for (customer, grants) in &by_customer {
        let since = grants.iter().map(|g| g.granted_at_ms).min().unwrap_or(0);
        let mine = recent_of
            .get(customer.as_str())
            .map_or(&[][..], |v| v.as_slice());
        let recent_usage = |before: i64| -> i64 {
            mine.iter()
                .filter(|c| c.received_at_ms >= since && c.received_at_ms < before)
                .map(|c| c.revenue_micros)
                .sum()
        };
        let lapsed: Vec<i64> = grants
            .iter()
            .filter_map(|g| g.expires_at_ms.filter(|e| *e <= now_ms))
            .collect();
        // The store sums what came before `recent_since_ms`, and before each lapse that came
        // earlier still; the rest is in `recent`.
        let bounds: Vec<i64> = lapsed
            .iter()
            .map(|e| (*e).min(recent_since_ms))
            .chain([recent_since_ms])
            .collect();
        let (_, older) = ledger.usage_since(tenant, customer, since, &bounds).await?;
        let before_recent = *older.last().expect("one bound at least");
        let usage_before = |until: i64, older: i64| {
            if until <= recent_since_ms {
                older
            } else {
                before_recent + recent_usage(until)
            }
        };
        let mut before = lapsed.iter().zip(&older).map(|(e, o)| usage_before(*e, *o));
        let grants = grants
            .iter()
            .map(|g| {
                let lapsed = g.expires_at_ms.is_some_and(|e| e <= now_ms);
                let grant = WalletGrant {
                    amount_micros: g.amount_micros,
                    expires_at_ms: g.expires_at_ms,
                    settled_at_expiry: if lapsed { before.next() } else { None },
                };
                (g.idempotency_key.clone(), grant)
            })
            .collect();
        seeds.push(WalletSeed {
            customer: customer.clone(),
            grants,
            settled_micros: before_recent + recent_usage(i64::MAX),
        });
    }
    Ok(seeds)
}

/// What a store knows of the bus: how far each partition of the events topic is handled.
#[async_trait::async_trait]
pub trait StoredOffsets: Send + Sync {
    /// Per partition, the last offset of the last block handled (its rows stored, or found
    /// stored already, or set apart): every record up to it is handled, and the next block
    /// starts after it. Partitions with nothing handled are absent.
    async fn stored_offsets(&self, partitions: &[i32]) -> Result<HashMap<i32, i64>, StoreError>;
    /// Records that blocks up to each offset are handled. Needed only for a block that stored
    /// no row (every event in it a duplicate, or set apart): a block's rows carry its end.
    async fn record_offsets(&self, offsets: &[(i32, i64)]) -> Result<(), StoreError>;
}

/// The records of one partition from `first` to `last` (offsets), as the log cuts them: every
/// writer of the partition, now or later, cuts the same blocks (see the aggregator's
/// `consumer::blocks`), so a block written twice is the same block.
#[derive(Clone, Debug)]
pub struct Block {
    pub partition: i32,
    pub first: i64,
    pub last: i64,
    /// The block's events by tenant, in offset order, positions aligned.
    pub batches: Vec<TenantBatch>,
}

/// What became of a block: per batch, its events stored now and those stored before; and the
/// events the store refuses for good (bad data), by position, with its reason. Refused events
/// are neither stored nor counted as stored.
#[derive(Debug, Default)]
pub struct BlockWrite {
    pub outcomes: Vec<WriteOutcome>,
    pub refused: Vec<(crate::sink::BusPosition, StoreError)>,
}

impl BlockWrite {
    /// Whether rows were sent, which then carry the block's end.
    pub fn sent_rows(&self) -> bool {
        self.outcomes.iter().any(|o| o.accepted > 0)
    }
}

/// A store the aggregator writes blocks to, exactly once whoever writes them and however late.
#[async_trait::async_trait]
pub trait BlockWriter: StoredOffsets {
    /// Stores the block's events that are not stored yet (by key) and that the store accepts,
    /// all in one atomic insert, which the store itself skips when it already holds a block of
    /// this partition ending at or after `first` (the writer is late: another wrote this block,
    /// and maybe more) or the same rows inserted before (a retry, or two writers at once). The
    /// events it refuses for good are found before anything is inserted. An error leaves
    /// nothing half-written; sending the same block again is always safe.
    async fn write_block(&mut self, block: &Block) -> Result<BlockWrite, StoreError>;
}

/// Where retention cuts, computed from the config at one instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetentionCutoffs {
    /// Dedup keys of events that arrived before this UTC midnight (ms) may go.
    pub keys_before_ms: i64,
    /// Raw rows of events that occurred before this instant may go; `None` keeps them.
    pub raw_before_ms: Option<i64>,
}

const DAY_MS: i64 = 86_400_000;

impl RetentionCutoffs {
    /// Keys are kept for `dedup_days` whole days after the day they arrived; raw rows for
    /// `raw_days` after they occurred.
    pub fn at(now_ms: i64, config: &schemas::config::RetentionConfig) -> RetentionCutoffs {
        let today = now_ms.div_euclid(DAY_MS) * DAY_MS;
        RetentionCutoffs {
            keys_before_ms: today - i64::from(config.dedup_days) * DAY_MS,
            raw_before_ms: config
                .raw_days
                .map(|days| now_ms - i64::from(days) * DAY_MS),
        }
    }
}

/// One thing retention dropped, or would drop.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Dropped {
    pub table: &'static str,
    /// For people: `partition 2026-10-01`, `events that occurred before 2026-…`.
    pub what: String,
    pub rows: u64,
}

/// Forgets what has outlived its use: dedup keys and raw rows past the cutoffs. Rollups, which
/// analytics read, are never touched.
#[async_trait::async_trait]
pub trait Retention: Send + Sync {
    /// Drops what lies before the cutoffs and says what it dropped; with `dry_run`, drops
    /// nothing and says what it would drop.
    async fn apply(
        &self,
        cutoffs: RetentionCutoffs,
        dry_run: bool,
    ) -> Result<Vec<Dropped>, StoreError>;
}

/// Filters of the sessions list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionQuery {
    pub range: DateRange,
    /// Only sessions of this agent.
    pub agent_id: Option<String>,
    /// Most sessions returned, newest activity first.
    pub limit: usize,
}

/// Whose rows a read sees: one tenant's, and within it one customer's when the caller holds a
/// portal token or names one (`customerId`): one filter for both. Every analytics query
/// filters on both.
///
/// A session belongs to a customer when every call in it names that customer: a portal sees
/// its customer's sessions whole, and a session that mixes customers in no portal at all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Viewer {
    pub tenant: String,
    pub customer: Option<String>,
}

impl Viewer {
    /// All of `tenant`'s rows.
    pub fn tenant(tenant: &str) -> Viewer {
        Viewer {
            tenant: tenant.to_string(),
            customer: None,
        }
    }
}

/// The read side. Every query is scoped to one tenant (and one customer, when the viewer is
/// one); no query can reach another's rows.
#[async_trait::async_trait]
pub trait AnalyticsStore: Send + Sync {
    /// Per tool over the range, highest revenue first.
    async fn revenue_by_tool(
        &self,
        viewer: &Viewer,
        range: DateRange,
    ) -> Result<Vec<ToolUsage>, StoreError>;
    /// Per customer over the range, highest revenue first, then by id (the calls that named
    /// no customer in one row of their own, `customer_id: None`, ordered as the empty id).
    async fn usage_by_customer(
        &self,
        viewer: &Viewer,
        range: DateRange,
    ) -> Result<Vec<CustomerUsage>, StoreError>;
    /// Per agent over the range with its daily series, highest revenue first.
    async fn usage_by_agent(
        &self,
        viewer: &Viewer,
        range: DateRange,
    ) -> Result<Vec<AgentUsage>, StoreError>;
    /// The viewer's totals over the range.
    async fn summary(&self, viewer: &Viewer, range: DateRange) -> Result<UsageSummary, StoreError>;
    /// Buckets of an hour or a day, per group, ordered by group then bucket (for
    /// [`assemble_series`]); hours read the hourly rollup, days the daily one.
    async fn series_rows(
        &self,
        viewer: &Viewer,
        query: SeriesQuery,
    ) -> Result<Vec<SeriesRow>, StoreError>;
    /// Sessions active in the range, most recently active first.
    async fn sessions(
        &self,
        viewer: &Viewer,
        query: SessionQuery,
    ) -> Result<Vec<SessionUsage>, StoreError>;
    /// One session, with its per-tool breakdown; `None` if the viewer has no such session.
    async fn session(
        &self,
        viewer: &Viewer,
        session_id: &str,
    ) -> Result<Option<SessionDetail>, StoreError>;
    /// Whether the store answers a trivial query (for `/readyz`).
    async fn ready(&self) -> Result<(), StoreError>;
    /// What stands behind the port, for people: `sqlite`, `clickhouse`.
    fn kind(&self) -> &'static str;
    /// Up to `limit` billing lines (per customer, agent and tool) ordered by their key, bytewise,
    /// starting after `after`: an export reads page after page, so a large period never sits
    /// whole in memory. A customer viewer reads its own lines only, whatever `query` asks.
    async fn billing_page(
        &self,
        viewer: &Viewer,
        query: &BillingQuery,
        after: Option<&BillingKey>,
        limit: usize,
    ) -> Result<Vec<BillingLine>, StoreError>;
}

/// Orders tool or agent rows the one way every adapter answers: revenue, then name.
pub fn by_revenue_then_name<T>(rows: &mut [T], key: impl Fn(&T) -> (i64, &str)) {
    rows.sort_by(|a, b| {
        let (ra, na) = key(a);
        let (rb, nb) = key(b);
        rb.cmp(&ra).then_with(|| na.cmp(nb))
    });
}

/// Where a page of a list in [`by_revenue_then_name`] order ended: its last row's revenue and
/// name. The next page is the rows after that place, so consecutive pages neither repeat nor
/// skip a row that kept its place, and a page is the same whichever store answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageCursor {
    pub revenue_micros: i64,
    pub name: String,
}

impl PageCursor {
    /// As the API hands it out: the revenue, `.`, then the name's UTF-8 bytes in lower-case
    /// hex, so it needs no escaping in a query string.
    pub fn encode(&self) -> String {
        let hex: String = self.name.bytes().map(|b| format!("{b:02x}")).collect();
        format!("{}.{hex}", self.revenue_micros)
    }

    /// A cursor [`PageCursor::encode`] made; `None` for any other text.
    pub fn parse(text: &str) -> Option<PageCursor> {
        let (revenue, hex) = text.split_once('.')?;
        if hex.len() % 2 != 0 || !hex.is_ascii() {
            return None;
        }
        let bytes = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok())
            .collect::<Option<Vec<u8>>>()?;
        Some(PageCursor {
            revenue_micros: revenue.parse().ok()?,
            name: String::from_utf8(bytes).ok()?,
        })
    }
}

/// At most `limit` of `rows` (in [`by_revenue_then_name`] order) that come after `after`, and
/// the cursor of the next page when more remain.
pub fn page_by_revenue_then_name<T>(
    rows: Vec<T>,
    key: impl Fn(&T) -> (i64, &str),
    after: Option<&PageCursor>,
    limit: usize,
) -> (Vec<T>, Option<PageCursor>) {
    let mut page: Vec<T> = rows
        .into_iter()
        .filter(|row| {
            let (revenue, name) = key(row);
            after.is_none_or(|c| {
                revenue < c.revenue_micros || (revenue == c.revenue_micros && name > &*c.name)
            })
        })
        .collect();
    if page.len() <= limit {
        return (page, None);
    }
    page.truncate(limit);
    let next = page.last().map(|row| {
        let (revenue_micros, name) = key(row);
        PageCursor {
            revenue_micros,
            name: name.to_string(),
        }
    });
    (page, next)
}

/// Series from rows ordered by group then bucket, highest revenue first.
pub fn assemble_series(rows: Vec<SeriesRow>, grouped: bool) -> Vec<Series> {
    let mut series: Vec<Series> = Vec::new();
    for row in rows {
        let key = grouped.then_some(row.key);
        if series.last().is_none_or(|s| s.key != key) {
            series.push(Series {
                key,
                figures: UsageFigures::default(),
                points: Vec::new(),
            });
        }
        let s = series.last_mut().expect("pushed above");
        s.figures.merge(&row.figures);
        s.points.push(SeriesPoint {
            start: row.start_ms,
            figures: row.figures,
        });
    }
    series.sort_by(|a, b| {
        b.figures
            .revenue_micros
            .cmp(&a.figures.revenue_micros)
            .then_with(|| a.key.cmp(&b.key))
    });
    series
}

/// One agent's figures on one day with that day's distinct sessions, as stores read them.
pub struct AgentDay {
    pub agent_id: String,
    pub date: String,
    pub figures: UsageFigures,
    pub sessions: i64,
}

/// Builds the by-agent answer from rows ordered by agent then day, and each agent's distinct
/// sessions over the whole range (which the daily counts cannot give: a session spans days).
pub fn assemble_agents(
    days: Vec<AgentDay>,
    sessions_by_agent: &HashMap<String, i64>,
) -> Vec<AgentUsage> {
    let mut agents: Vec<AgentUsage> = Vec::new();
    for day in days {
        if agents
            .last()
            .map(|a| a.agent_id != day.agent_id)
            .unwrap_or(true)
        {
            agents.push(AgentUsage {
                sessions: sessions_by_agent.get(&day.agent_id).copied().unwrap_or(0),
                agent_id: day.agent_id.clone(),
                figures: UsageFigures::default(),
                daily: Vec::new(),
            });
        }
        let agent = agents.last_mut().expect("pushed above");
        agent.figures.merge(&day.figures);
        agent.daily.push(DayUsage {
            date: day.date,
            figures: day.figures,
            sessions: day.sessions,
        });
    }
    by_revenue_then_name(&mut agents, |a| (a.figures.revenue_micros, &a.agent_id));
    agents
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_any_name_and_refuse_other_text() {
        for name in ["web_search", "", "a.b", "naïve tool & co", "0"] {
            for revenue_micros in [0, 7550, -3, i64::MAX] {
                let c = PageCursor {
                    revenue_micros,
                    name: name.into(),
                };
                assert_eq!(PageCursor::parse(&c.encode()), Some(c));
            }
        }
        for bad in ["", "7550", "x.61", "1.6", "1.zz", "1.ff", "1.é1"] {
            assert_eq!(PageCursor::parse(bad), None, "{bad}");
        }
    }

    /// Seeded lists with revenue ties, paged at every size: the pages joined are the list, each
    /// row once, and only the last page has no cursor.
    #[test]
    fn pages_joined_are_the_whole_list_in_order() {
        let mut seed: u64 = 0x5eed;
        let mut next = |n: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        for round in 0..200 {
            let len = next(40) as usize;
            let mut rows: Vec<(i64, String)> = (0..len)
                .map(|i| (next(5) as i64 * 100, format!("tool-{}-{i}", next(3))))
                .collect();
            by_revenue_then_name(&mut rows, |r| (r.0, &r.1));
            let limit = 1 + next(8) as usize;
            let (mut joined, mut after, mut pages) = (Vec::new(), None, 0);
            loop {
                let (page, cursor) =
                    page_by_revenue_then_name(rows.clone(), |r| (r.0, &r.1), after.as_ref(), limit);
                assert!(page.len() <= limit);
                pages += 1;
                joined.extend(page);
                match cursor {
                    Some(c) => after = PageCursor::parse(&c.encode()),
                    None => break,
                }
            }
            assert_eq!(joined, rows, "round {round}, limit {limit}");
            assert_eq!(pages, len.div_ceil(limit).max(1), "round {round}");
        }
    }
}
