-- Where each row was read from Kafka, so that an aggregator that restarts (or takes over a
-- partition) skips what is already stored: exactly once without server-side dedup features.
-- Rows that did not come through Kafka (embedded serve) keep -1.
-- 18.16 has no ADD COLUMN IF NOT EXISTS; `mcp-meter migrate` accepts "column already exists"
-- for ADD COLUMN, which keeps this file idempotent on every version.
ALTER TABLE mcp_events ADD COLUMN kafka_partition Int32 DEFAULT -1;
ALTER TABLE mcp_events ADD COLUMN kafka_offset Int64 DEFAULT -1;

-- The greatest offset per partition of a batch whose insert fully succeeded. Written by the
-- aggregator after each successful insert (not by a view: an INSERT can fail part-way, and a
-- floor must never cover rows that are missing). One row per partition after merges; read with
-- max() so unmerged rows do not matter. Tiny, so reading it on every assignment costs nothing.
CREATE TABLE IF NOT EXISTS mcp_kafka_offsets
(
    kafka_partition Int32,
    max_offset      Int64
)
ENGINE = ReplacingMergeTree(max_offset)
ORDER BY kafka_partition;
