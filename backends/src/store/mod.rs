//! The store ports: the writer (one transaction over many batches) and the analytics reader.
//!
//! Analytics read the rollups, never raw rows, and return integer sums; ordering and derived
//! figures are applied by the callers in `schemas`' row types, so every adapter answers alike.

use crate::error::StoreError;
use crate::sink::{TenantBatch, WriteOutcome};
use schemas::analytics::{
    AgentUsage, DateRange, SessionDetail, SessionUsage, ToolUsage, UsageSummary,
};

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

/// Filters of the sessions list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionQuery {
    pub range: DateRange,
    /// Only sessions of this agent.
    pub agent_id: Option<String>,
    /// Most sessions returned, newest activity first.
    pub limit: usize,
}

/// The read side. Every query is scoped to one tenant; no query can reach another's rows.
#[async_trait::async_trait]
pub trait AnalyticsStore: Send + Sync {
    /// Per tool over the range, highest revenue first.
    async fn revenue_by_tool(
        &self,
        tenant: &str,
        range: DateRange,
    ) -> Result<Vec<ToolUsage>, StoreError>;
    /// Per agent over the range with its daily series, highest revenue first.
    async fn usage_by_agent(
        &self,
        tenant: &str,
        range: DateRange,
    ) -> Result<Vec<AgentUsage>, StoreError>;
    /// The tenant's totals over the range.
    async fn summary(&self, tenant: &str, range: DateRange) -> Result<UsageSummary, StoreError>;
    /// Sessions active in the range, most recently active first.
    async fn sessions(
        &self,
        tenant: &str,
        query: SessionQuery,
    ) -> Result<Vec<SessionUsage>, StoreError>;
    /// One session, with its per-tool breakdown; `None` if the tenant has no such session.
    async fn session(
        &self,
        tenant: &str,
        session_id: &str,
    ) -> Result<Option<SessionDetail>, StoreError>;
}

/// Orders tool or agent rows the one way every adapter answers: revenue, then name.
pub fn by_revenue_then_name<T>(rows: &mut [T], key: impl Fn(&T) -> (i64, &str)) {
    rows.sort_by(|a, b| {
        let (ra, na) = key(a);
        let (rb, nb) = key(b);
        rb.cmp(&ra).then_with(|| na.cmp(nb))
    });
}
