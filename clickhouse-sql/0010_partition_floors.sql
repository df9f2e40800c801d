-- How far each partition of the events topic is stored, kept by the store itself: every row an
-- aggregator writes carries the last offset of its block (kafka_block_end), and a view keeps the
-- greatest block end + 1 per (topic, partition), in the same INSERT as the rows. The aggregator
-- inserts a block only while this floor is at or below the block's first offset, checked by the
-- server inside that INSERT, so a writer that was paused, or whose partition went to another
-- aggregator, can never add a block late. Rows that did not come through Kafka keep -1 and are
-- not counted.
ALTER TABLE mcp_events ADD COLUMN kafka_block_end Int64 DEFAULT -1;

CREATE TABLE IF NOT EXISTS mcp_kafka_floors
(
    kafka_topic     String,
    kafka_partition Int32,
    next_offset     AggregateFunction(max, Int64)
)
ENGINE = AggregatingMergeTree()
ORDER BY (kafka_topic, kafka_partition);

CREATE MATERIALIZED VIEW IF NOT EXISTS mcp_kafka_floors_mv TO mcp_kafka_floors AS
SELECT
    kafka_topic,
    kafka_partition,
    maxState(kafka_block_end + 1) AS next_offset
FROM mcp_events
WHERE kafka_block_end >= 0
GROUP BY kafka_topic, kafka_partition;
