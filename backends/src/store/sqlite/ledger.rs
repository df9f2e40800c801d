//! Prepaid grants in the embedded store: a table whose primary key is the grant's key, so a
//! repeated key keeps the first grant. Grants are rare: each call opens a connection of its
//! own on the blocking pool, beside the group commit's writer (WAL, busy timeout).

use super::{open_connection, SqliteContext};
use crate::error::StoreError;
use crate::store::{CallGroup, CreditLedger, StoredCall};
use rusqlite::{params, OptionalExtension};
use schemas::credits::CreditGrant;
use schemas::event::HEARTBEAT_METRIC;
use std::path::PathBuf;

pub struct SqliteLedger {
    path: PathBuf,
}

const GRANT_COLUMNS: &str =
    "customer_id, idempotency_key, amount_micros, granted_at_ms, expires_at_ms, note";

fn grant_row(row: &rusqlite::Row) -> rusqlite::Result<CreditGrant> {
    Ok(CreditGrant {
        customer_id: row.get(0)?,
        idempotency_key: row.get(1)?,
        amount_micros: row.get(2)?,
        granted_at_ms: row.get(3)?,
        expires_at_ms: row.get(4)?,
        note: row.get(5)?,
    })
}

impl SqliteLedger {
    pub(super) fn new(path: PathBuf) -> SqliteLedger {
        SqliteLedger { path }
    }

    async fn with_connection<T: Send + 'static>(
        &self,
        work: impl FnOnce(&rusqlite::Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || work(&open_connection(&path)?))
            .await
            .map_err(|e| StoreError::WorkerGone(format!("the ledger task failed: {e}")))?
    }
}

#[async_trait::async_trait]
impl CreditLedger for SqliteLedger {
    async fn record_grant(
        &self,
        tenant: &str,
        grant: &CreditGrant,
    ) -> Result<CreditGrant, StoreError> {
        let (tenant, g) = (tenant.to_string(), grant.clone());
        self.with_connection(move |conn| {
            conn.execute(
                &format!(
                    "INSERT OR IGNORE INTO mcp_customer_grants (tenant_id, {GRANT_COLUMNS})
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"
                ),
                params![
                    tenant,
                    g.customer_id,
                    g.idempotency_key,
                    g.amount_micros,
                    g.granted_at_ms,
                    g.expires_at_ms,
                    g.note
                ],
            )
            .context("record a grant")?;
            conn.query_row(
                &format!(
                    "SELECT {GRANT_COLUMNS} FROM mcp_customer_grants
                     WHERE tenant_id = ?1 AND idempotency_key = ?2"
                ),
                params![tenant, g.idempotency_key],
                grant_row,
            )
            .optional()
            .context("read a grant")?
            .ok_or_else(|| StoreError::WorkerGone("a recorded grant is not there".into()))
        })
        .await
    }

    async fn grants(
        &self,
        tenant: &str,
        customer: Option<&str>,
    ) -> Result<Vec<CreditGrant>, StoreError> {
        let (tenant, customer) = (tenant.to_string(), customer.map(str::to_string));
        self.with_connection(move |conn| {
            let mut query = conn
                .prepare(&format!(
                    "SELECT {GRANT_COLUMNS} FROM mcp_customer_grants
                     WHERE tenant_id = ?1 AND (?2 IS NULL OR customer_id = ?2)
                     ORDER BY granted_at_ms, idempotency_key"
                ))
                .context("prepare the grants query")?;
            let rows = query
                .query_map(params![tenant, customer], grant_row)
                .context("read grants")?;
            rows.collect::<Result<Vec<_>, _>>().context("read grants")
        })
        .await
    }

    async fn call_groups(
        &self,
        tenant: &str,
        since_ms: i64,
        before_ms: i64,
    ) -> Result<Vec<CallGroup>, StoreError> {
        let tenant = tenant.to_string();
        self.with_connection(move |conn| {
            let mut query = conn
                .prepare(
                    "SELECT customer_id, agent_id, session_id, COUNT(*), SUM(revenue_micros)
                     FROM mcp_events
                     WHERE tenant_id = ?1 AND received_at_ms >= ?2 AND received_at_ms < ?3
                       AND metric_name != ?4
                     GROUP BY customer_id, agent_id, session_id",
                )
                .context("prepare the call groups query")?;
            let rows = query
                .query_map(
                    params![tenant, since_ms, before_ms, HEARTBEAT_METRIC],
                    |row| {
                        Ok(CallGroup {
                            customer_id: row.get(0)?,
                            agent_id: row.get(1)?,
                            session_id: row.get(2)?,
                            calls: row.get(3)?,
                            revenue_micros: row.get(4)?,
                        })
                    },
                )
                .context("read call groups")?;
            rows.collect::<Result<Vec<_>, _>>()
                .context("read call groups")
        })
        .await
    }

    async fn calls_since(
        &self,
        tenant: &str,
        since_ms: i64,
    ) -> Result<Vec<StoredCall>, StoreError> {
        let tenant = tenant.to_string();
        self.with_connection(move |conn| {
            let mut query = conn
                .prepare(
                    "SELECT idempotency_key, customer_id, agent_id, session_id, revenue_micros,
                            received_at_ms
                     FROM mcp_events
                     WHERE tenant_id = ?1 AND received_at_ms >= ?2 AND metric_name != ?3",
                )
                .context("prepare the calls query")?;
            let rows = query
                .query_map(params![tenant, since_ms, HEARTBEAT_METRIC], |row| {
                    Ok(StoredCall {
                        idempotency_key: row.get(0)?,
                        customer_id: row.get(1)?,
                        agent_id: row.get(2)?,
                        session_id: row.get(3)?,
                        revenue_micros: row.get(4)?,
                        received_at_ms: row.get(5)?,
                    })
                })
                .context("read calls")?;
            rows.collect::<Result<Vec<_>, _>>().context("read calls")
        })
        .await
    }

    async fn usage_since(
        &self,
        tenant: &str,
        customer: &str,
        since_ms: i64,
        before_ms: &[i64],
    ) -> Result<(i64, Vec<i64>), StoreError> {
        let (tenant, customer, before) =
            (tenant.to_string(), customer.to_string(), before_ms.to_vec());
        self.with_connection(move |conn| {
            let mut query = conn
                .prepare(
                    "SELECT COALESCE(SUM(revenue_micros), 0) FROM mcp_events
                     WHERE tenant_id = ?1 AND customer_id = ?2
                       AND received_at_ms >= ?3 AND received_at_ms < ?4",
                )
                .context("prepare the usage query")?;
            let mut sum = |until: i64| {
                query
                    .query_row(params![tenant, customer, since_ms, until], |row| row.get(0))
                    .context("sum usage")
            };
            let total = sum(i64::MAX)?;
            let before = before
                .iter()
                .map(|until| sum(*until))
                .collect::<Result<Vec<i64>, _>>()?;
            Ok((total, before))
        })
        .await
    }
}
