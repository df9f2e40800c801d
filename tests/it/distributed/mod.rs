//! The distributed mode with real processes: ingestor → Kafka (tansu) → aggregator →
//! ClickHouse, by subject; the helpers they share are here.

mod crashes;
mod credits;
mod lag;
mod outages;
mod pauses;
mod pipeline;
mod shared_state;

use crate::common::distributed::{
    kafka_brokers, wait_until, ClickHouseServer, RedisServer, Setup, Tansu,
};
use crate::common::*;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message};
use serde_json::Value;
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The `[kafka]` tail and `[aggregator]` section of the fault tests: a broker that does not
/// acknowledge in 3 s is answered 503, polls wait 100 ms for more, retries back off 500 ms at
/// most.
const FAULT_SETTINGS: &str = "delivery_timeout_ms = 3000\n[aggregator]\nmax_batch_wait_ms = 100\n\
max_retry_backoff_ms = 500\n";

/// A ClickHouse and a broker of the test's own (a test pauses or kills them), and a setup on
/// them with 4 partitions whose ClickHouse requests time out after 5 s.
fn own_services(prefix: &str, extra: &str) -> (ClickHouseServer, Tansu, Setup) {
    let clickhouse = ClickHouseServer::start();
    let tansu = Tansu::start();
    let setup = Setup::on(
        clickhouse.url(),
        "request_timeout_ms = 5000",
        prefix,
        &tansu.brokers(),
        4,
        extra,
    );
    (clickhouse, tansu, setup)
}

/// How many rows `mcp_events` holds.
fn stored_rows(setup: &Setup) -> usize {
    let count = setup.sql("SELECT count() FROM mcp_events");
    count.trim().parse().unwrap()
}

/// The Redis `scripts/test` starts, which tests share under key prefixes of their own.
fn shared_redis() -> String {
    std::env::var("MCP_METER_TEST_REDIS_URL")
        .expect("MCP_METER_TEST_REDIS_URL is not set: run scripts/test, which starts Redis")
}

fn calls(client: &Client, key: &str) -> i64 {
    let (status, body) = client.get("/analytics/mcp/summary", key);
    assert_eq!(status, 200, "{body}");
    body["calls"].as_i64().unwrap()
}

/// `mcp-meter <args>` on `setup`'s config with its stderr in a file of the setup's directory.
fn spawn_logged(
    setup: &Setup,
    args: &[&str],
    envs: &[(&str, String)],
) -> (std::process::Child, PathBuf) {
    let log = setup.dir.path().join(format!("{}.log", args[0]));
    let child = Command::new(env!("CARGO_BIN_EXE_mcp-meter"))
        .args(args)
        .arg("--config")
        .arg(&setup.file)
        .env("MCP_METER_LOG", "info")
        .envs(envs.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    (child, log)
}

/// The first `n` messages of the setup's dead-letter topic (waiting up to 20 s for them), read
/// from its start by a reader of its own: each payload and its headers.
fn dead_letters(setup: &Setup, n: usize) -> Vec<(Option<String>, HashMap<String, String>)> {
    static READERS: AtomicUsize = AtomicUsize::new(0);
    let kafka = &setup.config.kafka;
    let reader = READERS.fetch_add(1, Ordering::Relaxed);
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka.brokers.as_deref().unwrap())
        .set("group.id", format!("{}-reader-{reader}", setup.name))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[&kafka.dead_letter_topic]).unwrap();
    let mut found = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while found.len() < n && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            let headers: HashMap<String, String> = m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| {
                            (
                                h.key.to_string(),
                                String::from_utf8_lossy(h.value.unwrap_or_default()).to_string(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            found.push((
                m.payload().map(|p| String::from_utf8_lossy(p).to_string()),
                headers,
            ));
        }
    }
    found
}

/// Per partition: the broker's watermarks, the group's committed offset, the store's floor and
/// row count, for a failure message.
fn diagnose(setup: &Setup) -> String {
    let kafka = &setup.config.kafka;
    let consumer = group_consumer(setup);
    let mut list = rdkafka::TopicPartitionList::new();
    for p in 0..kafka.partitions {
        list.add_partition(&kafka.events_topic, p);
    }
    let committed = consumer.committed_offsets(list, Duration::from_secs(5));
    let mut out = String::from(
        "partition: low..high watermark | committed | floor (rows, recorded) | rows\n",
    );
    for p in 0..kafka.partitions {
        let marks = consumer.fetch_watermarks(&kafka.events_topic, p, Duration::from_secs(5));
        let c = committed
            .as_ref()
            .ok()
            .and_then(|l| l.find_partition(&kafka.events_topic, p))
            .map(|e| format!("{:?}", e.offset()));
        let floor = setup.sql(&format!(
            "SELECT (SELECT maxMerge(next_offset) - 1 FROM mcp_kafka_floors WHERE kafka_partition = {p}), \
(SELECT max(max_offset) FROM mcp_kafka_topic_offsets WHERE kafka_partition = {p})"
        ));
        let rows = setup.sql(&format!(
            "SELECT count(), max(kafka_offset) FROM mcp_events WHERE kafka_partition = {p}"
        ));
        out.push_str(&format!(
            "{p}: {marks:?} | {c:?} | {} | {}\n",
            floor.trim(),
            rows.trim()
        ));
    }
    // Rows stored twice, with the part each copy is in (a part's name orders the inserts).
    let twice = setup.sql(
        "SELECT idempotency_key, groupArray(kafka_partition), groupArray(kafka_offset), \
groupArray(_part) FROM mcp_events GROUP BY idempotency_key HAVING count() > 1 \
ORDER BY idempotency_key LIMIT 20",
    );
    if !twice.trim().is_empty() {
        out.push_str("stored twice: key | partitions | offsets | parts\n");
        out.push_str(&twice);
    }
    out
}

/// A consumer in the aggregators' group (not subscribed), to read or set its committed offsets.
fn group_consumer(setup: &Setup) -> BaseConsumer {
    let kafka = &setup.config.kafka;
    ClientConfig::new()
        .set("bootstrap.servers", kafka.brokers.as_deref().unwrap())
        .set("group.id", &kafka.consumer_group)
        .create()
        .unwrap()
}

/// Each partition of `topic` with its end offset, read as the lag monitor reads them
/// (`KafkaProbe`); `None` while the broker does not answer.
fn end_offsets(setup: &Setup, topic: &str) -> Option<Vec<(i32, i64)>> {
    use backends::source::TopicProbe;
    let mut kafka = setup.config.kafka.clone();
    kafka.events_topic = topic.to_string();
    backends::kafka::KafkaProbe::new(&kafka)
        .unwrap()
        .end_offsets()
        .ok()
}

/// Whether the aggregators have dealt with everything the events topic holds: each partition's
/// stored floor (read as the aggregator reads it) is one below its end offset (what was not
/// stored was dead-lettered). Counts read after this are final, so a test checks them once
/// instead of waiting to see that nothing more arrives.
fn all_consumed(setup: &Setup) -> bool {
    use backends::store::clickhouse::{ClickHouseWriter, HttpRunner};
    use backends::store::StoredOffsets;
    let topic = &setup.config.kafka.events_topic;
    let Some(ends) = end_offsets(setup, topic) else {
        return false;
    };
    let partitions: Vec<i32> = ends.iter().map(|(p, _)| *p).collect();
    let writer = ClickHouseWriter::for_topic(HttpRunner::new(&setup.config.clickhouse), topic);
    let Ok(floors) = actix_web::rt::System::new().block_on(writer.stored_offsets(&partitions))
    else {
        return false;
    };
    ends.iter()
        .all(|(p, end)| floors.get(p).copied().unwrap_or(-1) == end - 1)
}

/// How many messages the setup's dead-letter topic holds now (its end offsets, summed): an
/// exact count, with no waiting for messages that might still come.
fn dead_letter_count(setup: &Setup) -> i64 {
    end_offsets(setup, &setup.config.kafka.dead_letter_topic)
        .expect("the broker answers")
        .iter()
        .map(|(_, end)| end)
        .sum()
}

/// Fails unless the setup's database holds exactly `events` calls, each key once, and the
/// rollups count exactly the raw rows, to the micro-dollar. An INSERT makes its raw rows
/// visible before it has filled every view's table, so the figures get up to 20 s to agree.
fn assert_stored_once(setup: &Setup, events: usize) {
    let revenue = events as i64 * CALL_REVENUE;
    let rollups = || {
        setup.sql(&format!(
            "SELECT (SELECT sumMerge(calls) FROM mcp_daily_stats) = {events} \
AND (SELECT sumMerge(revenue_micros) FROM mcp_daily_stats) = {revenue} \
AND (SELECT sumMerge(calls) FROM mcp_session_summary) = {events}"
        )) == "1\n"
    };
    wait_until(Duration::from_secs(20), rollups);
    let found = setup.sql("SELECT count(), count() - uniqExact(tenant_id, idempotency_key), sum(revenue_micros) FROM mcp_events");
    if found != format!("{events}\t0\t{}\n", events as i64 * CALL_REVENUE) {
        panic!(
            "expected {events} rows, no key twice, revenue {}; found (rows, doubled, revenue) {found}{}",
            events as i64 * CALL_REVENUE,
            diagnose(setup)
        );
    }
    assert_eq!(
        setup.sql("SELECT sumMerge(calls), sumMerge(revenue_micros) FROM mcp_daily_stats"),
        format!("{events}\t{}\n", events as i64 * CALL_REVENUE),
        "mcp_daily_stats"
    );
    assert_eq!(
        setup.sql("SELECT sumMerge(calls) FROM mcp_session_summary"),
        format!("{events}\n"),
        "mcp_session_summary"
    );
}
