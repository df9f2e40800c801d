-- Offsets per topic, so that one database can follow a renamed or recreated topic: the floors
-- of mcp_kafka_offsets (0005) were per partition of whichever topic the aggregators read.
-- `mcp-meter migrate` copies those floors here under its configured events topic, once, and
-- names that topic in mcp_kafka_untagged_topic: rows of mcp_events written before this file
-- carry kafka_topic '' and were read from it.
CREATE TABLE IF NOT EXISTS mcp_kafka_topic_offsets
(
    kafka_topic     String,
    kafka_partition Int32,
    max_offset      Int64
)
ENGINE = ReplacingMergeTree(max_offset)
ORDER BY (kafka_topic, kafka_partition);

CREATE TABLE IF NOT EXISTS mcp_kafka_untagged_topic
(
    kafka_topic String
)
ENGINE = ReplacingMergeTree()
ORDER BY kafka_topic;

ALTER TABLE mcp_events ADD COLUMN kafka_topic String DEFAULT '';
