//! Prepaid grants in ClickHouse (`mcp_customer_grants`, migration 0007). There is no unique
//! index: a grant is written after a lookup of its key, and readers keep the first row per key
//! (`first_grant_per_key`), so two concurrent grants with one key still count once.

use super::{queries, tsv, SqlRunner};
use crate::error::StoreError;
use crate::store::{first_grant_per_key, CallGroup, CreditLedger, StoredCall};
use schemas::credits::CreditGrant;

pub struct ClickHouseLedger<R> {
    runner: R,
}

impl<R: SqlRunner> ClickHouseLedger<R> {
    pub fn new(runner: R) -> ClickHouseLedger<R> {
        ClickHouseLedger { runner }
    }

    async fn read(
        &self,
        tenant: &str,
        customer: Option<&str>,
        key: Option<&str>,
    ) -> Result<Vec<CreditGrant>, StoreError> {
        let answer = self
            .runner
            .tab_separated(&queries::grants(tenant, customer, key))
            .await?;
        let mut grants = Vec::new();
        for mut row in tsv::rows(&answer, "grants") {
            grants.push(CreditGrant {
                customer_id: row.string()?,
                idempotency_key: row.string()?,
                amount_micros: row.int()?,
                granted_at_ms: row.int()?,
                expires_at_ms: Some(row.int()?).filter(|e| *e != 0),
                note: row.string()?,
            });
        }
        Ok(first_grant_per_key(grants))
    }
}

#[async_trait::async_trait]
impl<R: SqlRunner> CreditLedger for ClickHouseLedger<R> {
    async fn record_grant(
        &self,
        tenant: &str,
        grant: &CreditGrant,
    ) -> Result<CreditGrant, StoreError> {
        let key = Some(grant.idempotency_key.as_str());
        if let Some(first) = self.read(tenant, None, key).await?.pop() {
            return Ok(first);
        }
        self.runner
            .execute(&queries::insert_grant(tenant, grant))
            .await?;
        self.read(tenant, None, key)
            .await?
            .pop()
            .ok_or_else(|| StoreError::BadAnswer {
                context: "grants",
                detail: "a grant just inserted is not there".into(),
            })
    }

    async fn grants(
        &self,
        tenant: &str,
        customer: Option<&str>,
    ) -> Result<Vec<CreditGrant>, StoreError> {
        self.read(tenant, customer, None).await
    }

    async fn call_groups(
        &self,
        tenant: &str,
        since_ms: i64,
        before_ms: i64,
    ) -> Result<Vec<CallGroup>, StoreError> {
        let answer = self
            .runner
            .tab_separated(&queries::call_groups(tenant, since_ms, before_ms))
            .await?;
        let mut groups = Vec::new();
        for mut row in tsv::rows(&answer, "call groups") {
            groups.push(CallGroup {
                customer_id: row.string()?,
                agent_id: row.string()?,
                session_id: row.string()?,
                calls: row.int()?,
                revenue_micros: row.int()?,
            });
        }
        Ok(groups)
    }

    async fn calls_since(
        &self,
        tenant: &str,
        since_ms: i64,
    ) -> Result<Vec<StoredCall>, StoreError> {
        let answer = self
            .runner
            .tab_separated(&queries::calls_since(tenant, since_ms))
            .await?;
        let mut calls = Vec::new();
        for mut row in tsv::rows(&answer, "calls") {
            calls.push(StoredCall {
                idempotency_key: row.string()?,
                customer_id: row.string()?,
                agent_id: row.string()?,
                session_id: row.string()?,
                revenue_micros: row.int()?,
                received_at_ms: row.int()?,
            });
        }
        Ok(calls)
    }

    async fn usage_since(
        &self,
        tenant: &str,
        customer: &str,
        since_ms: i64,
        before_ms: &[i64],
    ) -> Result<(i64, Vec<i64>), StoreError> {
        let answer = self
            .runner
            .tab_separated(&queries::usage_since(tenant, customer, since_ms, before_ms))
            .await?;
        let mut row = tsv::rows(&answer, "usage")
            .next()
            .ok_or_else(|| StoreError::BadAnswer {
                context: "usage",
                detail: "no row".into(),
            })?;
        let total = row.int()?;
        let before = before_ms
            .iter()
            .map(|_| row.int())
            .collect::<Result<Vec<i64>, _>>()?;
        Ok((total, before))
    }
}
