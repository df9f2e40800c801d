-- The embedded store. Raw rated events plus the same rollups ClickHouse keeps in
-- mcp_daily_stats and mcp_session_summary, maintained in the transaction that inserts the rows.
-- Every statement is idempotent: the file runs on every start.

-- Raw rated events. The primary key is the dedup key: INSERT OR IGNORE stores an event once
-- per (tenant, idempotency key), and only rows really inserted reach the rollups.
CREATE TABLE IF NOT EXISTS mcp_events (
    tenant_id             TEXT    NOT NULL,
    idempotency_key       TEXT    NOT NULL,
    occurred_at_ms        INTEGER NOT NULL,
    received_at_ms        INTEGER NOT NULL,
    metric_name           TEXT    NOT NULL,
    product_type          TEXT    NOT NULL,
    tool_name             TEXT    NOT NULL,
    agent_id              TEXT    NOT NULL,
    customer_id           TEXT    NOT NULL,
    session_id            TEXT    NOT NULL,
    execution_status      TEXT    NOT NULL,
    execution_duration_ms INTEGER NOT NULL,
    session_boundary      TEXT    NOT NULL,
    quantity_micros       INTEGER NOT NULL,
    input_tokens          INTEGER NOT NULL,
    output_tokens         INTEGER NOT NULL,
    revenue_micros        INTEGER NOT NULL,
    cogs_micros           INTEGER NOT NULL,
    rate_plan_version     INTEGER NOT NULL,
    metadata              TEXT,
    PRIMARY KEY (tenant_id, idempotency_key)
) WITHOUT ROWID;

-- Calls per UTC day, tenant, customer, agent and tool (heartbeats excluded). Tenant first in
-- the key: every query filters by tenant, then by a range of days.
CREATE TABLE IF NOT EXISTS mcp_daily_stats (
    tenant_id       TEXT    NOT NULL,
    day             TEXT    NOT NULL,  -- YYYY-MM-DD, UTC
    customer_id     TEXT    NOT NULL,
    agent_id        TEXT    NOT NULL,
    tool_name       TEXT    NOT NULL,
    calls           INTEGER NOT NULL,
    errors          INTEGER NOT NULL,
    quantity_micros INTEGER NOT NULL,
    revenue_micros  INTEGER NOT NULL,
    cogs_micros     INTEGER NOT NULL,
    input_tokens    INTEGER NOT NULL,
    output_tokens   INTEGER NOT NULL,
    duration_ms_sum INTEGER NOT NULL,
    duration_ms_max INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, day, customer_id, agent_id, tool_name)
) WITHOUT ROWID;

-- Calls per UTC hour (hour_ms: its first millisecond), tenant, customer, agent and tool: what
-- hourly series read. No sessions and no quantities: series show figures only.
CREATE TABLE IF NOT EXISTS mcp_hourly_stats (
    tenant_id       TEXT    NOT NULL,
    hour_ms         INTEGER NOT NULL,
    customer_id     TEXT    NOT NULL,
    agent_id        TEXT    NOT NULL,
    tool_name       TEXT    NOT NULL,
    calls           INTEGER NOT NULL,
    errors          INTEGER NOT NULL,
    revenue_micros  INTEGER NOT NULL,
    cogs_micros     INTEGER NOT NULL,
    input_tokens    INTEGER NOT NULL,
    output_tokens   INTEGER NOT NULL,
    duration_ms_sum INTEGER NOT NULL,
    duration_ms_max INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, hour_ms, customer_id, agent_id, tool_name)
) WITHOUT ROWID;

-- The distinct sessions behind each mcp_daily_stats row, so that a range can count distinct
-- sessions exactly (ClickHouse keeps a uniqExact state in the row instead).
CREATE TABLE IF NOT EXISTS mcp_daily_sessions (
    tenant_id   TEXT NOT NULL,
    day         TEXT NOT NULL,
    customer_id TEXT NOT NULL,
    agent_id    TEXT NOT NULL,
    tool_name   TEXT NOT NULL,
    session_id  TEXT NOT NULL,
    PRIMARY KEY (tenant_id, day, customer_id, agent_id, tool_name, session_id)
) WITHOUT ROWID;

-- Per session and tool. Heartbeats land on tool_name '' with no calls: they move last_seen
-- and mark the end of a session, and are never counted as calls.
CREATE TABLE IF NOT EXISTS mcp_session_summary (
    tenant_id       TEXT    NOT NULL,
    session_id      TEXT    NOT NULL,
    tool_name       TEXT    NOT NULL,
    agent_id        TEXT    NOT NULL,  -- the greatest agent id seen: deterministic in every engine
    first_seen_ms   INTEGER NOT NULL,
    last_seen_ms    INTEGER NOT NULL,
    ended           INTEGER NOT NULL,  -- 1 once a SESSION_END heartbeat arrived
    calls           INTEGER NOT NULL,
    errors          INTEGER NOT NULL,
    revenue_micros  INTEGER NOT NULL,
    cogs_micros     INTEGER NOT NULL,
    input_tokens    INTEGER NOT NULL,
    output_tokens   INTEGER NOT NULL,
    duration_ms_sum INTEGER NOT NULL,
    duration_ms_max INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, session_id, tool_name)
) WITHOUT ROWID;

-- The sessions list filters by activity; this keeps it off a full scan of the tenant.
CREATE INDEX IF NOT EXISTS mcp_session_summary_by_last_seen
    ON mcp_session_summary (tenant_id, last_seen_ms);

-- Prepaid credit grants, one per (tenant, idempotency key): a repeated key keeps the first.
-- The wallets in the guard state are rebuilt from these and the raw rows.
CREATE TABLE IF NOT EXISTS mcp_customer_grants (
    tenant_id       TEXT    NOT NULL,
    idempotency_key TEXT    NOT NULL,
    customer_id     TEXT    NOT NULL,
    amount_micros   INTEGER NOT NULL,
    granted_at_ms   INTEGER NOT NULL,
    expires_at_ms   INTEGER,
    note            TEXT    NOT NULL,
    PRIMARY KEY (tenant_id, idempotency_key)
) WITHOUT ROWID;
