-- What the dashboard and the customer portal read beside the daily rollup.
--
-- mcp_hourly_stats: calls per UTC hour, tenant, customer, agent and tool (heartbeats excluded),
-- for hourly series. The daily rollup's figures at an hour's grain; no sessions, no quantities.
CREATE TABLE IF NOT EXISTS mcp_hourly_stats
(
    tenant_id       String,
    hour            DateTime('UTC'),
    customer_id     String,
    agent_id        String,
    tool_name       String,
    calls           AggregateFunction(sum, Int64),
    errors          AggregateFunction(sum, Int64),
    revenue_micros  AggregateFunction(sum, Int64),
    cogs_micros     AggregateFunction(sum, Int64),
    input_tokens    AggregateFunction(sum, Int64),
    output_tokens   AggregateFunction(sum, Int64),
    duration_ms_sum AggregateFunction(sum, Int64),
    duration_ms_max AggregateFunction(max, Int64)
)
ENGINE = AggregatingMergeTree()
PARTITION BY toYYYYMM(hour)
ORDER BY (tenant_id, hour, customer_id, agent_id, tool_name);

CREATE MATERIALIZED VIEW IF NOT EXISTS mcp_hourly_stats_mv TO mcp_hourly_stats AS
SELECT
    tenant_id,
    toStartOfHour(occurred_at) AS hour,
    customer_id,
    agent_id,
    tool_name,
    sumState(toInt64(1)) AS calls,
    sumState(toInt64(is_error)) AS errors,
    sumState(revenue_micros) AS revenue_micros,
    sumState(cogs_micros) AS cogs_micros,
    sumState(input_tokens) AS input_tokens,
    sumState(output_tokens) AS output_tokens,
    sumState(execution_duration_ms) AS duration_ms_sum,
    maxState(execution_duration_ms) AS duration_ms_max
FROM mcp_events
WHERE is_call = 1
GROUP BY tenant_id, hour, customer_id, agent_id, tool_name;

-- Rows stored before this file, from the raw rows retention kept: only hours that have no row
-- yet, so running it again adds nothing. (Migrate before writing: rows of an hour the view has
-- begun to fill would not be filled.)
INSERT INTO mcp_hourly_stats
SELECT
    tenant_id,
    toStartOfHour(occurred_at) AS hour,
    customer_id,
    agent_id,
    tool_name,
    sumState(toInt64(1)),
    sumState(toInt64(is_error)),
    sumState(revenue_micros),
    sumState(cogs_micros),
    sumState(input_tokens),
    sumState(output_tokens),
    sumState(execution_duration_ms),
    maxState(execution_duration_ms)
FROM mcp_events
WHERE is_call = 1
    AND (tenant_id, toStartOfHour(occurred_at)) NOT IN (SELECT tenant_id, hour FROM mcp_hourly_stats)
GROUP BY tenant_id, hour, customer_id, agent_id, tool_name;

-- mcp_session_customers: which customers each session's calls name, so that a portal lists
-- only its customer's sessions (a session is a customer's when every call in it names that
-- customer). Readers group, so repeated rows change nothing.
CREATE TABLE IF NOT EXISTS mcp_session_customers
(
    tenant_id   String,
    session_id  String,
    customer_id String
)
ENGINE = ReplacingMergeTree()
ORDER BY (tenant_id, session_id, customer_id);

CREATE MATERIALIZED VIEW IF NOT EXISTS mcp_session_customers_mv TO mcp_session_customers AS
SELECT tenant_id, session_id, customer_id
FROM mcp_events
WHERE is_call = 1 AND session_id != ''
GROUP BY tenant_id, session_id, customer_id;

INSERT INTO mcp_session_customers
SELECT tenant_id, session_id, customer_id
FROM mcp_events
WHERE is_call = 1 AND session_id != ''
GROUP BY tenant_id, session_id, customer_id;
