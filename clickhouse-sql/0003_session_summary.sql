-- Per session and tool. Heartbeats land on tool_name '' with no calls: they move last seen and
-- mark a session ended, and never count as calls. agent_id keeps the greatest id seen, which
-- every engine agrees on.
CREATE TABLE IF NOT EXISTS mcp_session_summary
(
    tenant_id       String,
    session_id      String,
    tool_name       String,
    agent_id        AggregateFunction(max, String),
    first_seen_ms   AggregateFunction(min, Int64),
    last_seen_ms    AggregateFunction(max, Int64),
    ended           AggregateFunction(max, UInt8),
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
ORDER BY (tenant_id, session_id, tool_name);

CREATE MATERIALIZED VIEW IF NOT EXISTS mcp_session_summary_mv TO mcp_session_summary AS
SELECT
    tenant_id,
    session_id,
    if(is_call = 1, tool_name, '') AS tool_name,
    maxState(agent_id) AS agent_id,
    minState(occurred_at_ms) AS first_seen_ms,
    maxState(occurred_at_ms) AS last_seen_ms,
    maxState(toUInt8(is_call = 0 AND upper(session_boundary) = 'SESSION_END')) AS ended,
    sumState(toInt64(is_call)) AS calls,
    sumState(toInt64(is_call * is_error)) AS errors,
    sumState(if(is_call = 1, revenue_micros, toInt64(0))) AS revenue_micros,
    sumState(if(is_call = 1, cogs_micros, toInt64(0))) AS cogs_micros,
    sumState(if(is_call = 1, input_tokens, toInt64(0))) AS input_tokens,
    sumState(if(is_call = 1, output_tokens, toInt64(0))) AS output_tokens,
    sumState(if(is_call = 1, execution_duration_ms, toInt64(0))) AS duration_ms_sum,
    maxState(if(is_call = 1, execution_duration_ms, toInt64(0))) AS duration_ms_max
FROM mcp_events
WHERE session_id != ''
GROUP BY tenant_id, session_id, tool_name;
