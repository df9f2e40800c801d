//! Analytics over the SQLite rollups. Queries run on the blocking pool with connections of
//! their own, so they never wait for the writer (WAL) and never stall the async runtime.

use super::SqliteContext;
use crate::error::StoreError;
use crate::store::{
    assemble_agents, by_revenue_then_name, AgentDay, AnalyticsStore, SessionQuery, Viewer,
};
use rusqlite::{params, Connection, OpenFlags, Row};
use schemas::analytics::{
    AgentUsage, CustomerUsage, DateRange, Interval, SeriesQuery, SeriesRow, SessionDetail,
    SessionToolUsage, SessionUsage, ToolUsage, UsageFigures, UsageSummary,
};
use schemas::billing::{BillingKey, BillingLine, BillingQuery};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// The sums of every figure, in [`figures_at`]'s order. COALESCE: a sum over no rows is NULL.
const FIGURES: &str = "COALESCE(SUM(calls), 0), COALESCE(SUM(errors), 0),
    COALESCE(SUM(revenue_micros), 0), COALESCE(SUM(cogs_micros), 0),
    COALESCE(SUM(input_tokens), 0), COALESCE(SUM(output_tokens), 0),
    COALESCE(SUM(duration_ms_sum), 0), COALESCE(MAX(duration_ms_max), 0)";

/// A session's columns over its per-tool rows, in [`session_row`]'s order.
const SESSION_COLUMNS: &str = "session_id, MAX(agent_id), MIN(first_seen_ms), MAX(last_seen_ms),
    MAX(ended), SUM(calls > 0)";

/// ?1 tenant, ?2 and ?3 the days, ?4 the viewer's customer (NULL: every customer).
const IN_RANGE: &str =
    "tenant_id = ?1 AND day BETWEEN ?2 AND ?3 AND (?4 IS NULL OR customer_id = ?4)";

/// Whether `session_id` is a session of the customer in parameter `customer` (every call in it
/// names that customer; NULL: any session) of tenant ?1.
fn customers_session(customer: &str) -> String {
    format!(
        "({customer} IS NULL OR session_id IN (
            SELECT session_id FROM mcp_daily_sessions WHERE tenant_id = ?1
            GROUP BY session_id HAVING MIN(customer_id) = {customer} AND MAX(customer_id) = {customer}))"
    )
}

fn figures_at(row: &Row, first: usize) -> rusqlite::Result<UsageFigures> {
    Ok(UsageFigures {
        calls: row.get(first)?,
        errors: row.get(first + 1)?,
        revenue_micros: row.get(first + 2)?,
        cogs_micros: row.get(first + 3)?,
        input_tokens: row.get(first + 4)?,
        output_tokens: row.get(first + 5)?,
        duration_ms_sum: row.get(first + 6)?,
        duration_ms_max: row.get(first + 7)?,
    })
}

#[derive(Clone)]
pub struct SqliteAnalytics {
    pool: Arc<Pool>,
}

struct Pool {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    max_idle: usize,
}

impl SqliteAnalytics {
    pub(super) fn new(path: PathBuf, read_connections: usize) -> SqliteAnalytics {
        SqliteAnalytics {
            pool: Arc::new(Pool {
                path,
                idle: Mutex::new(Vec::new()),
                max_idle: read_connections,
            }),
        }
    }

    /// Runs `query` on a pooled read-only connection on the blocking thread pool.
    async fn read<T, F>(&self, query: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let pool = self.pool.clone();
        tokio::task::spawn_blocking(move || {
            let conn = match pool.idle.lock().expect("pool lock").pop() {
                Some(conn) => conn,
                None => {
                    let conn = Connection::open_with_flags(
                        &pool.path,
                        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                    )
                    .context("open a read connection")?;
                    conn.busy_timeout(std::time::Duration::from_secs(5))
                        .context("set the busy timeout")?;
                    conn
                }
            };
            // One read transaction: a query of several statements reads one snapshot, even
            // when a commit lands between them.
            let answer = conn
                .unchecked_transaction()
                .context("begin a read")
                .and_then(|snapshot| query(&snapshot));
            // A connection left inside a transaction (its rollback failed) is not reused.
            let mut idle = pool.idle.lock().expect("pool lock");
            if idle.len() < pool.max_idle && conn.is_autocommit() {
                idle.push(conn);
            }
            answer
        })
        .await
        .map_err(|e| StoreError::WorkerGone(format!("an analytics query panicked: {e}")))?
    }
}

#[async_trait::async_trait]
impl AnalyticsStore for SqliteAnalytics {
    async fn revenue_by_tool(
        &self,
        viewer: &Viewer,
        range: DateRange,
    ) -> Result<Vec<ToolUsage>, StoreError> {
        let Viewer { tenant, customer } = viewer.clone();
        self.read(move |conn| {
            let (from, to) = (range.from_str_day(), range.to_str_day());
            let sessions = distinct_sessions_by(conn, "tool_name", &tenant, &from, &to, &customer)?;
            let sql = format!(
                "SELECT tool_name, {FIGURES} FROM mcp_daily_stats WHERE {IN_RANGE} GROUP BY tool_name"
            );
            let mut stmt = conn.prepare_cached(&sql).context("prepare by-tool")?;
            let mut rows = stmt
                .query_map(params![tenant, from, to, customer], |row| {
                    let tool_name: String = row.get(0)?;
                    Ok(ToolUsage {
                        sessions: sessions.get(&tool_name).copied().unwrap_or(0),
                        tool_name,
                        figures: figures_at(row, 1)?,
                    })
                })
                .context("query by-tool")?
                .collect::<Result<Vec<_>, _>>()
                .context("read by-tool")?;
            by_revenue_then_name(&mut rows, |r| (r.figures.revenue_micros, &r.tool_name));
            Ok(rows)
        })
        .await
    }

    async fn usage_by_customer(
        &self,
        viewer: &Viewer,
        range: DateRange,
    ) -> Result<Vec<CustomerUsage>, StoreError> {
        let Viewer { tenant, customer } = viewer.clone();
        self.read(move |conn| {
            let (from, to) = (range.from_str_day(), range.to_str_day());
            let sessions =
                distinct_sessions_by(conn, "customer_id", &tenant, &from, &to, &customer)?;
            let sql = format!(
                "SELECT customer_id, {FIGURES} FROM mcp_daily_stats WHERE {IN_RANGE}
                 GROUP BY customer_id"
            );
            let mut stmt = conn.prepare_cached(&sql).context("prepare by-customer")?;
            let mut rows = stmt
                .query_map(params![tenant, from, to, customer], |row| {
                    let customer_id: String = row.get(0)?;
                    Ok(CustomerUsage {
                        sessions: sessions.get(&customer_id).copied().unwrap_or(0),
                        customer_id: Some(customer_id).filter(|c| !c.is_empty()),
                        figures: figures_at(row, 1)?,
                    })
                })
                .context("query by-customer")?
                .collect::<Result<Vec<_>, _>>()
                .context("read by-customer")?;
            by_revenue_then_name(&mut rows, |r| (r.figures.revenue_micros, r.name()));
            Ok(rows)
        })
        .await
    }

    async fn usage_by_agent(
        &self,
        viewer: &Viewer,
        range: DateRange,
    ) -> Result<Vec<AgentUsage>, StoreError> {
        let Viewer { tenant, customer } = viewer.clone();
        self.read(move |conn| {
            let (from, to) = (range.from_str_day(), range.to_str_day());
            let by = |group| distinct_sessions_by(conn, group, &tenant, &from, &to, &customer);
            let agent_sessions = by("agent_id")?;
            let day_sessions = by("agent_id || char(0) || day")?;
            let sql = format!(
                "SELECT agent_id, day, {FIGURES} FROM mcp_daily_stats WHERE {IN_RANGE}
                 GROUP BY agent_id, day ORDER BY agent_id, day"
            );
            let mut stmt = conn.prepare_cached(&sql).context("prepare by-agent")?;
            let days = stmt
                .query_map(params![tenant, from, to, customer], |row| {
                    let agent_id: String = row.get(0)?;
                    let date: String = row.get(1)?;
                    Ok(AgentDay {
                        sessions: day_sessions
                            .get(&format!("{agent_id}\0{date}"))
                            .copied()
                            .unwrap_or(0),
                        agent_id,
                        date,
                        figures: figures_at(row, 2)?,
                    })
                })
                .context("query by-agent")?
                .collect::<Result<Vec<_>, _>>()
                .context("read by-agent")?;
            Ok(assemble_agents(days, &agent_sessions))
        })
        .await
    }

    async fn summary(&self, viewer: &Viewer, range: DateRange) -> Result<UsageSummary, StoreError> {
        let Viewer { tenant, customer } = viewer.clone();
        self.read(move |conn| {
            let (from, to) = (range.from_str_day(), range.to_str_day());
            let sql = format!(
                "SELECT {FIGURES}, COUNT(DISTINCT NULLIF(tool_name, '')),
                        COUNT(DISTINCT NULLIF(agent_id, ''))
                 FROM mcp_daily_stats WHERE {IN_RANGE}"
            );
            let (figures, tools, agents) = conn
                .prepare_cached(&sql)
                .context("prepare summary")?
                .query_row(params![tenant, from, to, customer], |row| {
                    Ok((figures_at(row, 0)?, row.get(8)?, row.get(9)?))
                })
                .context("query summary")?;
            let sessions = conn
                .prepare_cached(&format!(
                    "SELECT COUNT(DISTINCT session_id) FROM mcp_daily_sessions WHERE {IN_RANGE}"
                ))
                .context("prepare summary sessions")?
                .query_row(params![tenant, from, to, customer], |row| row.get(0))
                .context("query summary sessions")?;
            Ok(UsageSummary {
                figures,
                sessions,
                tools,
                agents,
            })
        })
        .await
    }

    async fn sessions(
        &self,
        viewer: &Viewer,
        query: SessionQuery,
    ) -> Result<Vec<SessionUsage>, StoreError> {
        let Viewer { tenant, customer } = viewer.clone();
        self.read(move |conn| {
            let (start_ms, end_ms) = query.range.bounds_ms();
            // A session is in the range if any of its activity is: it began before the range
            // ended and was last seen after the range began.
            let sql = format!(
                "SELECT {SESSION_COLUMNS}, {FIGURES}
                 FROM mcp_session_summary
                 WHERE tenant_id = ?1 AND session_id IN (
                     SELECT session_id FROM mcp_session_summary
                     WHERE tenant_id = ?1 AND last_seen_ms >= ?2) AND {}
                 GROUP BY session_id
                 HAVING MIN(first_seen_ms) < ?3 AND (?4 IS NULL OR MAX(agent_id) = ?4)
                 ORDER BY MAX(last_seen_ms) DESC, session_id
                 LIMIT ?5",
                customers_session("?6")
            );
            let mut stmt = conn.prepare_cached(&sql).context("prepare sessions")?;
            let rows = stmt
                .query_map(
                    params![
                        tenant,
                        start_ms,
                        end_ms,
                        query.agent_id,
                        query.limit as i64,
                        customer
                    ],
                    session_row,
                )
                .context("query sessions")?
                .collect::<Result<Vec<_>, _>>()
                .context("read sessions")?;
            Ok(rows)
        })
        .await
    }

    async fn session(
        &self,
        viewer: &Viewer,
        session_id: &str,
    ) -> Result<Option<SessionDetail>, StoreError> {
        let Viewer { tenant, customer } = viewer.clone();
        let session_id = session_id.to_string();
        self.read(move |conn| {
            let sql = format!(
                "SELECT {SESSION_COLUMNS}, {FIGURES}
                 FROM mcp_session_summary WHERE tenant_id = ?1 AND session_id = ?2 AND {}
                 GROUP BY session_id",
                customers_session("?3")
            );
            let session = match conn
                .prepare_cached(&sql)
                .context("prepare session")?
                .query_row(params![tenant, session_id, customer], session_row)
            {
                Ok(s) => s,
                Err(rusqlite::Error::QueryReturnedNoRows) => return Ok(None),
                Err(e) => return Err(super::store_error("query session", e)),
            };
            let sql = format!(
                "SELECT tool_name, {FIGURES} FROM mcp_session_summary
                 WHERE tenant_id = ?1 AND session_id = ?2 AND calls > 0 GROUP BY tool_name"
            );
            let mut by_tool = conn
                .prepare_cached(&sql)
                .context("prepare session tools")?
                .query_map(params![tenant, session_id], |row| {
                    Ok(SessionToolUsage {
                        tool_name: row.get(0)?,
                        figures: figures_at(row, 1)?,
                    })
                })
                .context("query session tools")?
                .collect::<Result<Vec<_>, _>>()
                .context("read session tools")?;
            by_revenue_then_name(&mut by_tool, |t| (t.figures.revenue_micros, &t.tool_name));
            Ok(Some(SessionDetail {
                session,
                by_tool,
                next_cursor: None,
                killed_until_ms: None,
            }))
        })
        .await
    }

    async fn series_rows(
        &self,
        viewer: &Viewer,
        query: SeriesQuery,
    ) -> Result<Vec<SeriesRow>, StoreError> {
        let Viewer { tenant, customer } = viewer.clone();
        self.read(move |conn| {
            let group = query.group_by.map_or("''", |g| g.column());
            // Days are `YYYY-MM-DD` text: unixepoch() of it is its midnight, UTC.
            let (start, table, filter, bounds) = match query.interval {
                Interval::Day => (
                    "unixepoch(day) * 1000",
                    "mcp_daily_stats",
                    IN_RANGE,
                    (
                        query.range.from_str_day().into(),
                        query.range.to_str_day().into(),
                    ),
                ),
                Interval::Hour => {
                    let (start_ms, end_ms) = query.range.bounds_ms();
                    (
                        "hour_ms",
                        "mcp_hourly_stats",
                        "tenant_id = ?1 AND hour_ms >= ?2 AND hour_ms < ?3 \
                         AND (?4 IS NULL OR customer_id = ?4)",
                        (
                            rusqlite::types::Value::from(start_ms),
                            rusqlite::types::Value::from(end_ms),
                        ),
                    )
                }
            };
            let sql = format!(
                "SELECT {group}, {start}, {FIGURES} FROM {table} WHERE {filter}
                 GROUP BY 1, 2 ORDER BY 1, 2"
            );
            let bounds: (rusqlite::types::Value, rusqlite::types::Value) = bounds;
            let mut stmt = conn.prepare_cached(&sql).context("prepare series")?;
            let rows = stmt
                .query_map(params![tenant, bounds.0, bounds.1, customer], |row| {
                    Ok(SeriesRow {
                        key: row.get(0)?,
                        start_ms: row.get(1)?,
                        figures: figures_at(row, 2)?,
                    })
                })
                .context("query series")?
                .collect::<Result<Vec<_>, _>>()
                .context("read series")?;
            Ok(rows)
        })
        .await
    }

    async fn ready(&self) -> Result<(), StoreError> {
        self.read(|conn| {
            conn.query_row("SELECT 1", [], |_| Ok(()))
                .context("answer SELECT 1")
        })
        .await
    }

    fn kind(&self) -> &'static str {
        "sqlite"
    }

    async fn billing_page(
        &self,
        viewer: &Viewer,
        query: &BillingQuery,
        after: Option<&BillingKey>,
        limit: usize,
    ) -> Result<Vec<BillingLine>, StoreError> {
        let Viewer { tenant, customer } = viewer.clone();
        let query = query.clone();
        let after = after.cloned();
        self.read(move |conn| {
            // NULL parameters switch a filter off; the row-value comparison is the keyset
            // (bytewise, like ClickHouse's), so page n+1 starts where page n ended.
            let sql = format!(
                "SELECT customer_id, agent_id, tool_name, {FIGURES} FROM mcp_daily_stats \
                 WHERE {IN_RANGE} AND (?5 IS NULL OR agent_id = ?5) \
                 AND (?6 IS NULL OR (customer_id, agent_id, tool_name) > (?6, ?7, ?8)) \
                 AND (?10 IS NULL OR customer_id = ?10) \
                 GROUP BY customer_id, agent_id, tool_name \
                 ORDER BY customer_id, agent_id, tool_name LIMIT ?9"
            );
            let mut stmt = conn.prepare_cached(&sql).context("prepare billing")?;
            let after = after.as_ref();
            let rows = stmt
                .query_map(
                    params![
                        tenant,
                        query.range.from_str_day(),
                        query.range.to_str_day(),
                        customer,
                        query.agent_id,
                        after.map(|k| &k.customer_id),
                        after.map(|k| &k.agent_id),
                        after.map(|k| &k.tool_name),
                        limit as i64,
                        query.customer_id,
                    ],
                    |row| {
                        Ok(BillingLine {
                            key: BillingKey {
                                customer_id: row.get(0)?,
                                agent_id: row.get(1)?,
                                tool_name: row.get(2)?,
                            },
                            figures: figures_at(row, 3)?,
                        })
                    },
                )
                .context("query billing")?
                .collect::<Result<Vec<_>, _>>()
                .context("read billing")?;
            Ok(rows)
        })
        .await
    }
}

fn session_row(row: &Row) -> rusqlite::Result<SessionUsage> {
    Ok(SessionUsage {
        session_id: row.get(0)?,
        agent_id: row.get(1)?,
        first_seen: row.get(2)?,
        last_seen: row.get(3)?,
        ended: row.get(4)?,
        tools: row.get(5)?,
        figures: figures_at(row, 6)?,
    })
}

/// Distinct sessions per value of `group` (a column expression) over a range of days.
fn distinct_sessions_by(
    conn: &Connection,
    group: &str,
    tenant: &str,
    from: &str,
    to: &str,
    customer: &Option<String>,
) -> Result<HashMap<String, i64>, StoreError> {
    let sql = format!(
        "SELECT {group}, COUNT(DISTINCT session_id) FROM mcp_daily_sessions
         WHERE {IN_RANGE} GROUP BY 1"
    );
    let mut stmt = conn
        .prepare_cached(&sql)
        .context("prepare distinct sessions")?;
    let rows = stmt
        .query_map(params![tenant, from, to, customer], |row| {
            Ok((row.get(0)?, row.get(1)?))
        })
        .context("query distinct sessions")?
        .collect::<Result<HashMap<_, _>, _>>()
        .context("read distinct sessions")?;
    Ok(rows)
}
