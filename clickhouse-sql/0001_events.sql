-- Raw rated events: one row per unique (tenant_id, idempotency_key), priced at ingest.
--
-- Tenant first in the sort key: every query filters by tenant, and a tenant's rows of a month
-- then form one contiguous range. occurred_at next, because a time range is the next filter;
-- the idempotency key last makes the order total.
-- occurred_at is a DateTime (seconds, for partitions and days); occurred_at_ms keeps the
-- milliseconds, as DateTime64 does not exist on every server we support.
-- is_call is 0 for heartbeats; is_error says whether the status counts as an error. Both are
-- decided in Rust (schemas), once, so that every store counts alike.
CREATE TABLE IF NOT EXISTS mcp_events
(
    tenant_id             String,
    idempotency_key       String,
    occurred_at           DateTime('UTC'),
    occurred_at_ms        Int64,
    received_at_ms        Int64,
    metric_name           String,
    product_type          String,
    tool_name             String,
    agent_id              String,
    customer_id           String,
    session_id            String,
    execution_status      String,
    is_call               UInt8,
    is_error              UInt8,
    execution_duration_ms Int64,
    session_boundary      String,
    quantity_micros       Int64,
    input_tokens          Int64,
    output_tokens         Int64,
    revenue_micros        Int64,
    cogs_micros           Int64,
    rate_plan_version     UInt32,
    metadata              String
)
ENGINE = MergeTree()
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (tenant_id, occurred_at, idempotency_key);
