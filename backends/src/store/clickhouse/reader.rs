//! Analytics over the ClickHouse rollups. Every query's text comes from [`queries`] and every
//! answer is read by [`tsv`], whichever [`SqlRunner`] runs it.

use super::{queries, tsv, SqlRunner};
use crate::error::StoreError;
use crate::store::{
    assemble_agents, by_revenue_then_name, AgentDay, AnalyticsStore, SessionQuery, Viewer,
};
use schemas::analytics::{
    AgentUsage, CustomerUsage, DateRange, SeriesQuery, SeriesRow, SessionDetail, SessionToolUsage,
    SessionUsage, ToolUsage, UsageSummary,
};
use schemas::billing::{BillingKey, BillingLine, BillingQuery};
use std::collections::HashMap;

pub struct ClickHouseAnalytics<R> {
    runner: R,
}

impl<R: SqlRunner> ClickHouseAnalytics<R> {
    pub fn new(runner: R) -> ClickHouseAnalytics<R> {
        ClickHouseAnalytics { runner }
    }
}

#[async_trait::async_trait]
impl<R: SqlRunner> AnalyticsStore for ClickHouseAnalytics<R> {
    async fn revenue_by_tool(
        &self,
        viewer: &Viewer,
        range: DateRange,
    ) -> Result<Vec<ToolUsage>, StoreError> {
        let answer = self
            .runner
            .tab_separated(&queries::by_tool(viewer, range))
            .await?;
        let mut tools = Vec::new();
        for mut row in tsv::rows(&answer, "by-tool") {
            tools.push(ToolUsage {
                tool_name: row.string()?,
                figures: row.figures()?,
                sessions: row.int()?,
            });
        }
        by_revenue_then_name(&mut tools, |t| (t.figures.revenue_micros, &t.tool_name));
        Ok(tools)
    }

    async fn usage_by_customer(
        &self,
        viewer: &Viewer,
        range: DateRange,
    ) -> Result<Vec<CustomerUsage>, StoreError> {
        let answer = self
            .runner
            .tab_separated(&queries::by_customer(viewer, range))
            .await?;
        let mut customers = Vec::new();
        for mut row in tsv::rows(&answer, "by-customer") {
            customers.push(CustomerUsage {
                customer_id: Some(row.string()?).filter(|c| !c.is_empty()),
                figures: row.figures()?,
                sessions: row.int()?,
            });
        }
        by_revenue_then_name(&mut customers, |c| (c.figures.revenue_micros, c.name()));
        Ok(customers)
    }

    async fn usage_by_agent(
        &self,
        viewer: &Viewer,
        range: DateRange,
    ) -> Result<Vec<AgentUsage>, StoreError> {
        let days_answer = self
            .runner
            .tab_separated(&queries::by_agent_days(viewer, range))
            .await?;
        let sessions_answer = self
            .runner
            .tab_separated(&queries::by_agent_sessions(viewer, range))
            .await?;
        let mut sessions = HashMap::new();
        for mut row in tsv::rows(&sessions_answer, "by-agent sessions") {
            sessions.insert(row.string()?, row.int()?);
        }
        let mut days = Vec::new();
        for mut row in tsv::rows(&days_answer, "by-agent") {
            days.push(AgentDay {
                agent_id: row.string()?,
                date: row.string()?,
                figures: row.figures()?,
                sessions: row.int()?,
            });
        }
        Ok(assemble_agents(days, &sessions))
    }

    async fn summary(&self, viewer: &Viewer, range: DateRange) -> Result<UsageSummary, StoreError> {
        let answer = self
            .runner
            .tab_separated(&queries::summary(viewer, range))
            .await?;
        let mut row = tsv::rows(&answer, "summary")
            .next()
            .ok_or(StoreError::BadAnswer {
                context: "summary",
                detail: "no row".into(),
            })?;
        Ok(UsageSummary {
            figures: row.figures()?,
            sessions: row.int()?,
            tools: row.int()?,
            agents: row.int()?,
        })
    }

    async fn series_rows(
        &self,
        viewer: &Viewer,
        query: SeriesQuery,
    ) -> Result<Vec<SeriesRow>, StoreError> {
        let answer = self
            .runner
            .tab_separated(&queries::series(viewer, query))
            .await?;
        let mut rows = Vec::new();
        for mut row in tsv::rows(&answer, "series") {
            rows.push(SeriesRow {
                key: row.string()?,
                start_ms: row.int()?,
                figures: row.figures()?,
            });
        }
        Ok(rows)
    }

    async fn sessions(
        &self,
        viewer: &Viewer,
        query: SessionQuery,
    ) -> Result<Vec<SessionUsage>, StoreError> {
        let sql = queries::sessions(viewer, query.range, query.agent_id.as_deref(), query.limit);
        let answer = self.runner.tab_separated(&sql).await?;
        tsv::rows(&answer, "sessions")
            .map(|mut row| row.session())
            .collect()
    }

    async fn session(
        &self,
        viewer: &Viewer,
        session_id: &str,
    ) -> Result<Option<SessionDetail>, StoreError> {
        let answer = self
            .runner
            .tab_separated(&queries::session(viewer, session_id))
            .await?;
        let Some(mut row) = tsv::rows(&answer, "session").next() else {
            return Ok(None);
        };
        let session = row.session()?;
        let tools_answer = self
            .runner
            .tab_separated(&queries::session_tools(viewer, session_id))
            .await?;
        let mut by_tool = Vec::new();
        for mut row in tsv::rows(&tools_answer, "session tools") {
            by_tool.push(SessionToolUsage {
                tool_name: row.string()?,
                figures: row.figures()?,
            });
        }
        by_revenue_then_name(&mut by_tool, |t| (t.figures.revenue_micros, &t.tool_name));
        Ok(Some(SessionDetail {
            session,
            by_tool,
            next_cursor: None,
            killed_until_ms: None,
        }))
    }

    async fn ready(&self) -> Result<(), StoreError> {
        self.runner.tab_separated("SELECT 1").await.map(|_| ())
    }

    fn kind(&self) -> &'static str {
        "clickhouse"
    }

    async fn billing_page(
        &self,
        viewer: &Viewer,
        query: &BillingQuery,
        after: Option<&BillingKey>,
        limit: usize,
    ) -> Result<Vec<BillingLine>, StoreError> {
        let answer = self
            .runner
            .tab_separated(&queries::billing_page(viewer, query, after, limit))
            .await?;
        let mut lines = Vec::new();
        for mut row in tsv::rows(&answer, "billing") {
            lines.push(BillingLine {
                key: BillingKey {
                    customer_id: row.string()?,
                    agent_id: row.string()?,
                    tool_name: row.string()?,
                },
                figures: row.figures()?,
            });
        }
        Ok(lines)
    }
}
