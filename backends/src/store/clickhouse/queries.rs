//! The SQL text of every ClickHouse query, built from values. Pure: the same text runs on the
//! server (18.16 up) and on chDB in the tests, and is tested against expected text.
//!
//! Values are inlined as quoted literals: 18.16 has no server-side query parameters, and the
//! client's `?` binding would misread a `?` inside an id. [`quote`] is the only way a value gets
//! into SQL here. Every query reads rollups with -Merge functions, never `mcp_events`, and
//! orders its rows so that answers compare byte for byte.

use crate::store::Viewer;
use schemas::analytics::{DateRange, Interval, SeriesQuery};
use schemas::billing::{BillingKey, BillingQuery};
use schemas::event::HEARTBEAT_METRIC;
use std::fmt::Write;

/// A ClickHouse string literal: backslash and quote escaped.
pub fn quote(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("\\'"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// The eight usage figures of `UsageFigures`, in its order, merged from rollup states.
const FIGURES: &str = "sumMerge(calls), sumMerge(errors), sumMerge(revenue_micros), \
sumMerge(cogs_micros), sumMerge(input_tokens), sumMerge(output_tokens), sumMerge(duration_ms_sum), \
maxMerge(duration_ms_max)";

/// The tenant, and the customer when the viewer is one.
fn viewer_filter(viewer: &Viewer) -> String {
    let mut filter = format!("tenant_id = {}", quote(&viewer.tenant));
    if let Some(customer) = &viewer.customer {
        let _ = write!(filter, " AND customer_id = {}", quote(customer));
    }
    filter
}

fn daily_filter(viewer: &Viewer, range: DateRange) -> String {
    format!(
        "{} AND day >= toDate({}) AND day <= toDate({})",
        viewer_filter(viewer),
        quote(&range.from_str_day()),
        quote(&range.to_str_day())
    )
}

/// Per tool: name, figures, distinct sessions.
pub fn by_tool(viewer: &Viewer, range: DateRange) -> String {
    format!(
        "SELECT tool_name, {FIGURES}, toInt64(uniqExactIfMerge(sessions)) \
FROM mcp_daily_stats WHERE {} GROUP BY tool_name ORDER BY tool_name",
        daily_filter(viewer, range)
    )
}

/// Per customer: id (empty for the calls that named none), figures, distinct sessions.
pub fn by_customer(viewer: &Viewer, range: DateRange) -> String {
    format!(
        "SELECT customer_id, {FIGURES}, toInt64(uniqExactIfMerge(sessions)) \
FROM mcp_daily_stats WHERE {} GROUP BY customer_id ORDER BY customer_id",
        daily_filter(viewer, range)
    )
}

/// Per agent and day: agent, date, figures, distinct sessions that day.
pub fn by_agent_days(viewer: &Viewer, range: DateRange) -> String {
    format!(
        "SELECT agent_id, toString(day), {FIGURES}, toInt64(uniqExactIfMerge(sessions)) \
FROM mcp_daily_stats WHERE {} GROUP BY agent_id, day ORDER BY agent_id, day",
        daily_filter(viewer, range)
    )
}

/// Per agent: distinct sessions over the whole range.
pub fn by_agent_sessions(viewer: &Viewer, range: DateRange) -> String {
    format!(
        "SELECT agent_id, toInt64(uniqExactIfMerge(sessions)) \
FROM mcp_daily_stats WHERE {} GROUP BY agent_id ORDER BY agent_id",
        daily_filter(viewer, range)
    )
}

/// One row: figures, distinct sessions, tools and agents.
pub fn summary(viewer: &Viewer, range: DateRange) -> String {
    format!(
        "SELECT {FIGURES}, toInt64(uniqExactIfMerge(sessions)), \
toInt64(uniqExactIf(tool_name, tool_name != '')), toInt64(uniqExactIf(agent_id, agent_id != '')) \
FROM mcp_daily_stats WHERE {}",
        daily_filter(viewer, range)
    )
}

/// Per group and bucket (ordered so): the group's name, the bucket's first millisecond, the
/// figures. Hours read the hourly rollup, days the daily one.
pub fn series(viewer: &Viewer, query: SeriesQuery) -> String {
    let group = query.group_by.map_or("''", |g| g.column());
    let (start, table, filter) = match query.interval {
        Interval::Day => (
            // A Date converts to its day number since the epoch.
            "toInt64(day) * 86400000",
            "mcp_daily_stats",
            daily_filter(viewer, query.range),
        ),
        Interval::Hour => {
            let (start_ms, end_ms) = query.range.bounds_ms();
            (
                "toInt64(toUnixTimestamp(hour)) * 1000",
                "mcp_hourly_stats",
                format!(
                    "{} AND hour >= toDateTime({}, 'UTC') AND hour < toDateTime({}, 'UTC')",
                    viewer_filter(viewer),
                    start_ms / 1000,
                    end_ms / 1000
                ),
            )
        }
    };
    format!(
        "SELECT {group} AS series_key, {start} AS series_start, {FIGURES} FROM {table} \
WHERE {filter} GROUP BY series_key, series_start ORDER BY series_key, series_start"
    )
}

/// One page of billing lines: customer, agent, tool, figures; ordered by that key, starting
/// after `after`. The keyset is spelled out (no tuple comparison) for 18.16.
pub fn billing_page(
    viewer: &Viewer,
    query: &BillingQuery,
    after: Option<&BillingKey>,
    limit: usize,
) -> String {
    let mut filter = daily_filter(viewer, query.range);
    if let Some(customer) = &query.customer_id {
        let _ = write!(filter, " AND customer_id = {}", quote(customer));
    }
    if let Some(agent) = &query.agent_id {
        let _ = write!(filter, " AND agent_id = {}", quote(agent));
    }
    if let Some(k) = after {
        let (c, a, t) = (
            quote(&k.customer_id),
            quote(&k.agent_id),
            quote(&k.tool_name),
        );
        let _ = write!(
            filter,
            " AND (customer_id > {c} OR (customer_id = {c} AND (agent_id > {a} OR (agent_id = {a} AND tool_name > {t}))))"
        );
    }
    format!(
        "SELECT customer_id, agent_id, tool_name, {FIGURES} FROM mcp_daily_stats WHERE {filter} \
GROUP BY customer_id, agent_id, tool_name ORDER BY customer_id, agent_id, tool_name LIMIT {limit}"
    )
}

/// The session filter of `viewer`: the tenant's, and when the viewer is a customer, only
/// sessions whose every call names it.
fn session_filter(viewer: &Viewer) -> String {
    let tenant = quote(&viewer.tenant);
    let mut filter = format!("tenant_id = {tenant}");
    if let Some(customer) = &viewer.customer {
        let customer = quote(customer);
        let _ = write!(
            filter,
            " AND session_id IN (SELECT session_id FROM mcp_session_customers \
WHERE tenant_id = {tenant} GROUP BY session_id \
HAVING min(customer_id) = {customer} AND max(customer_id) = {customer})"
        );
    }
    filter
}

/// Sessions are merged per tool first (so `tools` counts tools with calls), then per session.
/// Columns: id, agent, first seen, last seen, ended, tools, figures.
fn sessions_of(viewer: &Viewer, session_id: Option<&str>) -> String {
    let mut filter = session_filter(viewer);
    if let Some(id) = session_id {
        let _ = write!(filter, " AND session_id = {}", quote(id));
    }
    format!(
        "SELECT session_id, max(t_agent), min(t_first), max(t_last), max(t_ended), \
toInt64(countIf(t_calls > 0)), sum(t_calls), sum(t_errors), sum(t_revenue), sum(t_cogs), \
sum(t_input), sum(t_output), sum(t_duration), max(t_duration_max) \
FROM (SELECT session_id, tool_name, maxMerge(agent_id) AS t_agent, \
minMerge(first_seen_ms) AS t_first, maxMerge(last_seen_ms) AS t_last, maxMerge(ended) AS t_ended, \
sumMerge(calls) AS t_calls, sumMerge(errors) AS t_errors, sumMerge(revenue_micros) AS t_revenue, \
sumMerge(cogs_micros) AS t_cogs, sumMerge(input_tokens) AS t_input, \
sumMerge(output_tokens) AS t_output, sumMerge(duration_ms_sum) AS t_duration, \
maxMerge(duration_ms_max) AS t_duration_max \
FROM mcp_session_summary WHERE {filter} GROUP BY session_id, tool_name) \
GROUP BY session_id"
    )
}

/// Sessions active in the range (begun before its end, last seen after its start), most
/// recently active first.
pub fn sessions(viewer: &Viewer, range: DateRange, agent_id: Option<&str>, limit: usize) -> String {
    let (start_ms, end_ms) = range.bounds_ms();
    let agent = agent_id
        .map(|a| format!(" AND max(t_agent) = {}", quote(a)))
        .unwrap_or_default();
    format!(
        "{} HAVING max(t_last) >= {start_ms} AND min(t_first) < {end_ms}{agent} \
ORDER BY max(t_last) DESC, session_id LIMIT {limit}",
        sessions_of(viewer, None)
    )
}

/// One session, in the columns of [`sessions`].
pub fn session(viewer: &Viewer, session_id: &str) -> String {
    sessions_of(viewer, Some(session_id))
}

/// One session's tools with calls: name, figures.
pub fn session_tools(viewer: &Viewer, session_id: &str) -> String {
    format!(
        "SELECT tool_name, {FIGURES} FROM mcp_session_summary \
WHERE {} AND session_id = {} GROUP BY tool_name HAVING sumMerge(calls) > 0 \
ORDER BY tool_name",
        session_filter(viewer),
        quote(session_id)
    )
}

/// The columns the writer sends for each event, in its TabSeparated order.
pub const EVENT_COLUMNS: &str = "tenant_id, idempotency_key, occurred_at, occurred_at_ms, \
received_at_ms, metric_name, product_type, tool_name, agent_id, customer_id, session_id, \
execution_status, is_call, is_error, execution_duration_ms, session_boundary, quantity_micros, \
input_tokens, output_tokens, revenue_micros, cogs_micros, rate_plan_version, metadata, \
kafka_partition, kafka_offset, kafka_topic, kafka_block_end";

/// The INSERT of raw events; the writer appends their rows, one TabSeparated line each, in
/// [`EVENT_COLUMNS`] order. The views on `mcp_events` fill the rollups, the key table and the
/// partition floors from it.
pub fn insert_events(settings: &str) -> String {
    format!("INSERT INTO mcp_events ({EVENT_COLUMNS}) {settings} FORMAT TabSeparated\n")
}

/// Where a block's rows wait, in the writer's session, for the INSERT that checks the floor:
/// a temporary table (gone with the session).
pub const BLOCK_TABLE: &str = "mcp_block";

/// Makes [`BLOCK_TABLE`] with the events table's own columns, checks and MATERIALIZED
/// expressions, so that a row the events table would refuse is refused while filling it, before
/// anything is inserted.
pub const CREATE_BLOCK_TABLE: &str =
    "CREATE TEMPORARY TABLE mcp_block AS mcp_events ENGINE = Memory";

/// Drops [`BLOCK_TABLE`] (a runner whose connection is one session keeps it otherwise).
pub const DROP_BLOCK_TABLE: &str = "DROP TEMPORARY TABLE IF EXISTS mcp_block";

/// Fills [`BLOCK_TABLE`]; the rows follow, in [`EVENT_COLUMNS`] order.
pub fn fill_block() -> String {
    format!("INSERT INTO {BLOCK_TABLE} ({EVENT_COLUMNS}) FORMAT TabSeparated\n")
}

/// Per partition of `partitions` with anything handled, `(kafka_partition, next)` rows whose
/// greatest `next` is the offset after its last handled block: from the floor the rows keep
/// (their block ends, through `mcp_kafka_floors_mv`) and from the ends recorded for blocks that
/// stored no row. `max(max_offset) + 1` per group, never `max(max_offset + 1)`: current
/// servers rewrite the second into the first, which is 1 over no rows.
fn next_offsets(topic: &str, partitions: &[i32]) -> String {
    let list: Vec<String> = partitions.iter().map(i32::to_string).collect();
    let (topic, list) = (quote(topic), list.join(", "));
    format!(
        "SELECT kafka_partition, maxMerge(next_offset) AS next FROM mcp_kafka_floors \
WHERE kafka_topic = {topic} AND kafka_partition IN ({list}) GROUP BY kafka_partition \
UNION ALL \
SELECT kafka_partition, max(max_offset) + 1 AS next FROM mcp_kafka_topic_offsets \
WHERE kafka_topic = {topic} AND kafka_partition IN ({list}) GROUP BY kafka_partition"
    )
}

/// Moves the block waiting in [`BLOCK_TABLE`] into `mcp_events`, unless the partition is
/// already handled at or past `first`: the server checks, in the statement that inserts
/// (`max` of no rows is 0: nothing handled).
pub fn insert_block(topic: &str, partition: i32, first: i64, settings: &str) -> String {
    format!(
        "INSERT INTO mcp_events ({EVENT_COLUMNS}) SELECT {EVENT_COLUMNS} FROM {BLOCK_TABLE} \
WHERE (SELECT max(next) FROM ({})) <= {first} {settings}",
        next_offsets(topic, &[partition])
    )
}

/// The keys among `keys` (tenant, idempotency key) that are already stored. A primary-key
/// lookup: the key table is sorted by exactly (tenant_id, idempotency_key).
///
/// Each tenant's keys travel as one string literal split on the server: ClickHouse parses a
/// list of 20,000 literals in about 115 ms, one string of them in a fraction of that, and the
/// set built from the subquery still narrows the primary key. Newline cannot occur in a key
/// (control characters are refused at ingest), so it separates them.
pub fn stored_keys(keys: &[(&str, &[&str])]) -> String {
    let mut sql = String::from("SELECT tenant_id, idempotency_key FROM mcp_event_keys WHERE ");
    for (n, (tenant, tenant_keys)) in keys.iter().enumerate() {
        if n > 0 {
            sql.push_str(" OR ");
        }
        let _ = write!(
            sql,
            "(tenant_id = {} AND idempotency_key IN (SELECT arrayJoin(splitByChar('\\n', {}))))",
            quote(tenant),
            quote(&tenant_keys.join("\n"))
        );
    }
    sql
}

/// Per partition of `partitions`, the last offset of its last handled block; partitions with
/// nothing handled are left out.
pub fn stored_offsets(topic: &str, partitions: &[i32]) -> String {
    format!(
        "SELECT kafka_partition, max(next) - 1 FROM ({}) GROUP BY kafka_partition \
ORDER BY kafka_partition",
        next_offsets(topic, partitions)
    )
}

/// Records that everything up to each offset of `topic` is stored.
pub fn record_offsets(topic: &str, offsets: &[(i32, i64)]) -> String {
    let topic = quote(topic);
    let rows: Vec<String> = offsets
        .iter()
        .map(|(p, o)| format!("({topic}, {p}, {o})"))
        .collect();
    format!(
        "INSERT INTO mcp_kafka_topic_offsets (kafka_topic, kafka_partition, max_offset) VALUES {}",
        rows.join(", ")
    )
}

/// The columns of a grant, in `ClickHouseLedger`'s reading order.
pub const GRANT_COLUMNS: &str =
    "customer_id, idempotency_key, amount_micros, granted_at_ms, expires_at_ms, note";

/// The tenant's grants (of one customer, when named); every stored row, duplicates included
/// (the reader keeps the first per key).
pub fn grants(tenant: &str, customer: Option<&str>, key: Option<&str>) -> String {
    let mut sql = format!(
        "SELECT {GRANT_COLUMNS} FROM mcp_customer_grants WHERE tenant_id = {}",
        quote(tenant)
    );
    if let Some(customer) = customer {
        sql += &format!(" AND customer_id = {}", quote(customer));
    }
    if let Some(key) = key {
        sql += &format!(" AND idempotency_key = {}", quote(key));
    }
    sql + " ORDER BY granted_at_ms, idempotency_key"
}

/// One grant row (`expires_at_ms` 0: never).
pub fn insert_grant(tenant: &str, g: &schemas::credits::CreditGrant) -> String {
    format!(
        "INSERT INTO mcp_customer_grants (tenant_id, {GRANT_COLUMNS}) VALUES ({}, {}, {}, {}, {}, {}, {})",
        quote(tenant),
        quote(&g.customer_id),
        quote(&g.idempotency_key),
        g.amount_micros,
        g.granted_at_ms,
        g.expires_at_ms.unwrap_or(0),
        quote(&g.note)
    )
}

/// A customer's revenue received at or after `since_ms`: in all, then before each of
/// `before_ms`. The one query over raw rows, run only to rebuild a wallet.
pub fn usage_since(tenant: &str, customer: &str, since_ms: i64, before_ms: &[i64]) -> String {
    let mut sql = "SELECT sum(revenue_micros)".to_string();
    for until in before_ms {
        sql += &format!(", sumIf(revenue_micros, received_at_ms < {until})");
    }
    sql + &format!(
        " FROM mcp_events WHERE tenant_id = {} AND customer_id = {} AND received_at_ms >= {since_ms}",
        quote(tenant),
        quote(customer)
    )
}

/// The tenant's calls received in `[since_ms, before_ms)`, summed per customer, agent and
/// session (a rebuild's window counters).
pub fn call_groups(tenant: &str, since_ms: i64, before_ms: i64) -> String {
    format!(
        "SELECT customer_id, agent_id, session_id, count(), sum(revenue_micros) FROM mcp_events \
         WHERE tenant_id = {} AND received_at_ms >= {since_ms} AND received_at_ms < {before_ms} \
         AND metric_name != {} GROUP BY customer_id, agent_id, session_id",
        quote(tenant),
        quote(HEARTBEAT_METRIC)
    )
}

/// The tenant's calls received at or after `since_ms`, one row each (a rebuild's claims).
pub fn calls_since(tenant: &str, since_ms: i64) -> String {
    format!(
        "SELECT idempotency_key, customer_id, agent_id, session_id, revenue_micros, received_at_ms \
         FROM mcp_events WHERE tenant_id = {} AND received_at_ms >= {since_ms} \
         AND metric_name != {}",
        quote(tenant),
        quote(HEARTBEAT_METRIC)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::NaiveDate;

    fn acme() -> Viewer {
        Viewer::tenant("acme")
    }

    fn range() -> DateRange {
        let d = |s| NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap();
        DateRange {
            from: d("2026-11-01"),
            to: d("2026-11-30"),
        }
    }

    #[test]
    fn billing_pages_filter_then_continue_after_the_last_key() {
        let query = BillingQuery {
            range: range(),
            customer_id: Some("c'1".into()),
            agent_id: None,
        };
        assert_eq!(
            billing_page(&Viewer::tenant("t"), &query, None, 500),
            "SELECT customer_id, agent_id, tool_name, sumMerge(calls), sumMerge(errors), sumMerge(revenue_micros), \
sumMerge(cogs_micros), sumMerge(input_tokens), sumMerge(output_tokens), sumMerge(duration_ms_sum), \
maxMerge(duration_ms_max) FROM mcp_daily_stats WHERE tenant_id = 't' AND day >= toDate('2026-11-01') \
AND day <= toDate('2026-11-30') AND customer_id = 'c\\'1' GROUP BY customer_id, agent_id, tool_name \
ORDER BY customer_id, agent_id, tool_name LIMIT 500"
        );
        let after = BillingKey {
            customer_id: "c".into(),
            agent_id: "a".into(),
            tool_name: "t".into(),
        };
        let next = billing_page(&Viewer::tenant("t"), &query, Some(&after), 500);
        // A customer's viewer reads its own lines whatever the query asks.
        let customer = Viewer {
            tenant: "t".into(),
            customer: Some("own".into()),
        };
        assert!(billing_page(&customer, &query, None, 500).contains(
            "tenant_id = 't' AND customer_id = 'own' AND day >= toDate('2026-11-01') \
AND day <= toDate('2026-11-30') AND customer_id = 'c\\'1'"
        ));
        assert!(next.contains(
            " AND (customer_id > 'c' OR (customer_id = 'c' AND (agent_id > 'a' OR (agent_id = 'a' AND tool_name > 't')))) GROUP BY"
        ), "{next}");
    }

    #[test]
    fn quoting_escapes_backslash_and_quote_only() {
        assert_eq!(quote("plain"), "'plain'");
        assert_eq!(quote("it's"), r"'it\'s'");
        assert_eq!(quote(r"a\b"), r"'a\\b'");
        assert_eq!(quote(r"x\' OR 1=1 --"), r"'x\\\' OR 1=1 --'");
        assert_eq!(quote("what?"), "'what?'");
    }

    #[test]
    fn by_tool_reads_the_daily_rollup_of_one_tenant() {
        assert_eq!(
            by_tool(&acme(), range()),
            "SELECT tool_name, sumMerge(calls), sumMerge(errors), sumMerge(revenue_micros), \
sumMerge(cogs_micros), sumMerge(input_tokens), sumMerge(output_tokens), sumMerge(duration_ms_sum), \
maxMerge(duration_ms_max), toInt64(uniqExactIfMerge(sessions)) FROM mcp_daily_stats \
WHERE tenant_id = 'acme' AND day >= toDate('2026-11-01') AND day <= toDate('2026-11-30') \
GROUP BY tool_name ORDER BY tool_name"
        );
    }

    #[test]
    fn by_customer_reads_the_daily_rollup_of_one_tenant_or_one_customer() {
        assert_eq!(
            by_customer(&acme(), range()),
            "SELECT customer_id, sumMerge(calls), sumMerge(errors), sumMerge(revenue_micros), \
sumMerge(cogs_micros), sumMerge(input_tokens), sumMerge(output_tokens), sumMerge(duration_ms_sum), \
maxMerge(duration_ms_max), toInt64(uniqExactIfMerge(sessions)) FROM mcp_daily_stats \
WHERE tenant_id = 'acme' AND day >= toDate('2026-11-01') AND day <= toDate('2026-11-30') \
GROUP BY customer_id ORDER BY customer_id"
        );
        let one = Viewer {
            tenant: "acme".into(),
            customer: Some("c'1".into()),
        };
        assert!(by_customer(&one, range())
            .contains("WHERE tenant_id = 'acme' AND customer_id = 'c\\'1' AND day >="));
    }

    #[test]
    fn agent_queries_group_by_agent_and_day() {
        let days = by_agent_days(&acme(), range());
        assert!(days.starts_with("SELECT agent_id, toString(day), sumMerge(calls),"));
        assert!(days.ends_with("GROUP BY agent_id, day ORDER BY agent_id, day"));
        assert_eq!(
            by_agent_sessions(&acme(), range()),
            "SELECT agent_id, toInt64(uniqExactIfMerge(sessions)) FROM mcp_daily_stats \
WHERE tenant_id = 'acme' AND day >= toDate('2026-11-01') AND day <= toDate('2026-11-30') \
GROUP BY agent_id ORDER BY agent_id"
        );
    }

    #[test]
    fn summary_counts_distinct_named_tools_and_agents() {
        let sql = summary(&acme(), range());
        assert!(sql.contains(
            "toInt64(uniqExactIf(tool_name, tool_name != '')), toInt64(uniqExactIf(agent_id, agent_id != ''))"
        ));
        assert!(!sql.contains("GROUP BY"), "one row, even with no data");
    }

    #[test]
    fn session_queries_merge_per_tool_then_per_session() {
        let list = sessions(&acme(), range(), Some("agent-1"), 100);
        assert!(list.contains(
            "FROM mcp_session_summary WHERE tenant_id = 'acme' GROUP BY session_id, tool_name)"
        ));
        assert!(list.ends_with(
            "GROUP BY session_id HAVING max(t_last) >= 1793491200000 AND min(t_first) < 1796083200000 \
AND max(t_agent) = 'agent-1' ORDER BY max(t_last) DESC, session_id LIMIT 100"
        ));
        let one = session(&acme(), "s'1");
        assert!(one.contains(
            r"WHERE tenant_id = 'acme' AND session_id = 's\'1' GROUP BY session_id, tool_name)"
        ));
        assert!(
            session_tools(&acme(), "s1").contains("HAVING sumMerge(calls) > 0 ORDER BY tool_name")
        );
    }

    #[test]
    fn a_customer_viewer_filters_rows_and_keeps_only_sessions_wholly_its_own() {
        let viewer = Viewer {
            tenant: "acme".into(),
            customer: Some("c'1".into()),
        };
        assert!(by_tool(&viewer, range()).contains(
            "WHERE tenant_id = 'acme' AND customer_id = 'c\\'1' AND day >= toDate('2026-11-01')"
        ));
        assert!(session(&viewer, "s").contains(
            "WHERE tenant_id = 'acme' AND session_id IN (SELECT session_id FROM mcp_session_customers \
WHERE tenant_id = 'acme' GROUP BY session_id HAVING min(customer_id) = 'c\\'1' AND max(customer_id) = 'c\\'1') \
AND session_id = 's'"
        ));
    }

    #[test]
    fn series_read_hours_from_the_hourly_rollup_and_days_from_the_daily_one() {
        let hours = SeriesQuery::new(
            range(),
            Interval::Hour,
            Some(schemas::analytics::GroupBy::Tool),
        )
        .unwrap();
        assert_eq!(
            series(&acme(), hours),
            "SELECT tool_name AS series_key, toInt64(toUnixTimestamp(hour)) * 1000 AS series_start, \
sumMerge(calls), sumMerge(errors), sumMerge(revenue_micros), sumMerge(cogs_micros), \
sumMerge(input_tokens), sumMerge(output_tokens), sumMerge(duration_ms_sum), maxMerge(duration_ms_max) \
FROM mcp_hourly_stats WHERE tenant_id = 'acme' AND hour >= toDateTime(1793491200, 'UTC') \
AND hour < toDateTime(1796083200, 'UTC') GROUP BY series_key, series_start ORDER BY series_key, series_start"
        );
        let days = SeriesQuery::new(range(), Interval::Day, None).unwrap();
        assert!(series(&acme(), days)
            .starts_with("SELECT '' AS series_key, toInt64(day) * 86400000 AS series_start,"));
    }

    #[test]
    fn floors_are_read_from_the_rows_view_and_the_recorded_offsets_per_topic() {
        let sql = stored_offsets("ev'ents", &[0, 3]);
        for part in [
            "FROM mcp_kafka_floors WHERE kafka_topic = 'ev\\'ents' AND kafka_partition IN (0, 3)",
            "FROM mcp_kafka_topic_offsets WHERE kafka_topic = 'ev\\'ents' AND kafka_partition IN (0, 3)",
            "SELECT kafka_partition, max(next) - 1 FROM (",
        ] {
            assert!(sql.contains(part), "{part} not in {sql}");
        }
        assert_eq!(
            record_offsets("events", &[(0, 17), (3, 5)]),
            "INSERT INTO mcp_kafka_topic_offsets (kafka_topic, kafka_partition, max_offset) \
VALUES ('events', 0, 17), ('events', 3, 5)"
        );
    }

    #[test]
    fn a_block_is_inserted_only_while_its_partition_is_handled_below_its_first_offset() {
        let sql = insert_block("events", 2, 40, "SETTINGS x = 1");
        assert!(sql.starts_with(&format!(
            "INSERT INTO mcp_events ({EVENT_COLUMNS}) SELECT {EVENT_COLUMNS} FROM mcp_block WHERE (SELECT max(next) FROM ("
        )));
        assert!(sql.ends_with(") <= 40 SETTINGS x = 1"), "{sql}");
        assert!(sql.contains("kafka_topic = 'events' AND kafka_partition IN (2)"));
    }

    #[test]
    fn stored_keys_looks_up_each_tenant_by_primary_key() {
        let sql = stored_keys(&[("a", &["k1", "k'2"]), ("b", &["k1"])]);
        assert_eq!(
            sql,
            "SELECT tenant_id, idempotency_key FROM mcp_event_keys WHERE \
(tenant_id = 'a' AND idempotency_key IN (SELECT arrayJoin(splitByChar('\\n', 'k1\nk\\'2')))) OR \
(tenant_id = 'b' AND idempotency_key IN (SELECT arrayJoin(splitByChar('\\n', 'k1'))))"
        );
    }
}
