-- Calls per UTC day, tenant, customer, agent and tool; heartbeats excluded. Written only by
-- mcp_daily_stats_mv, read only with -Merge functions.
-- sessions counts distinct non-empty session ids, exactly (uniqExact), so that a range of days
-- merges into a true distinct count.
CREATE TABLE IF NOT EXISTS mcp_daily_stats
(
    tenant_id       String,
    day             Date,
    customer_id     String,
    agent_id        String,
    tool_name       String,
    calls           AggregateFunction(sum, Int64),
    errors          AggregateFunction(sum, Int64),
    quantity_micros AggregateFunction(sum, Int64),
    revenue_micros  AggregateFunction(sum, Int64),
    cogs_micros     AggregateFunction(sum, Int64),
    input_tokens    AggregateFunction(sum, Int64),
    output_tokens   AggregateFunction(sum, Int64),
    duration_ms_sum AggregateFunction(sum, Int64),
    duration_ms_max AggregateFunction(max, Int64),
    sessions        AggregateFunction(uniqExactIf, String, UInt8)
)
ENGINE = AggregatingMergeTree()
PARTITION BY toYYYYMM(day)
ORDER BY (tenant_id, day, customer_id, agent_id, tool_name);

-- Output types equal the target's exactly: sumState of an Int64 is AggregateFunction(sum, Int64).
CREATE MATERIALIZED VIEW IF NOT EXISTS mcp_daily_stats_mv TO mcp_daily_stats AS
SELECT
    tenant_id,
    toDate(occurred_at) AS day,
    customer_id,
    agent_id,
    tool_name,
    sumState(toInt64(1)) AS calls,
    sumState(toInt64(is_error)) AS errors,
    sumState(quantity_micros) AS quantity_micros,
    sumState(revenue_micros) AS revenue_micros,
    sumState(cogs_micros) AS cogs_micros,
    sumState(input_tokens) AS input_tokens,
    sumState(output_tokens) AS output_tokens,
    sumState(execution_duration_ms) AS duration_ms_sum,
    maxState(execution_duration_ms) AS duration_ms_max,
    uniqExactIfState(session_id, toUInt8(session_id != '')) AS sessions
FROM mcp_events
WHERE is_call = 1
GROUP BY tenant_id, day, customer_id, agent_id, tool_name;
