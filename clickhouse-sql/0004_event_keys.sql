-- Every stored (tenant_id, idempotency_key), for the writer's dedup lookup before each insert.
-- Filled by the very INSERT that writes mcp_events (through the view), so a key is here exactly
-- when its row is. Sorted by the lookup key; partitioned by the day the event arrived, so that
-- keys past the dedup window leave by dropping whole partitions.
CREATE TABLE IF NOT EXISTS mcp_event_keys
(
    tenant_id       String,
    idempotency_key String,
    received_day    Date
)
ENGINE = MergeTree()
PARTITION BY received_day
ORDER BY (tenant_id, idempotency_key);

CREATE MATERIALIZED VIEW IF NOT EXISTS mcp_event_keys_mv TO mcp_event_keys AS
SELECT
    tenant_id,
    idempotency_key,
    toDate(toDateTime(intDiv(received_at_ms, 1000), 'UTC')) AS received_day
FROM mcp_events;
