//! The distributed path with real processes: ingestor → Kafka (tansu) → aggregator → ClickHouse.

mod common;

use common::distributed::{kafka_brokers, wait_until, ClickHouseServer, RedisServer, Setup, Tansu};
use common::*;
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

fn calls(client: &Client, key: &str) -> i64 {
    let (status, body) = client.get("/analytics/mcp/summary", key);
    assert_eq!(status, 200, "{body}");
    body["calls"].as_i64().unwrap()
}

#[test]
fn events_flow_from_ingestor_through_kafka_to_clickhouse_once() {
    let setup = Setup::new("flow", &kafka_brokers(), 2, "");
    let aggregator = setup.aggregator();
    let (_ingestor, client) = setup.ingestor();
    let (status, answer) = client.post("/v1/ingest/events", ACME, SEED);
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["accepted"], 1);
    assert!(wait_until(Duration::from_secs(20), || calls(&client, ACME) == 1));
    let (_, tools) = client.get("/analytics/mcp/revenue/by-tool", ACME);
    assert_eq!(tools["tools"][0]["revenueMicros"], 7550);
    assert_eq!(tools["tools"][0]["cogsMicros"], 1529);

    // A client retry of the same event: the ingestor cannot know, the aggregator drops it.
    let (status, _) = client.post("/v1/ingest/events", ACME, SEED);
    assert_eq!(status, 202);
    let events = [
        call("a", "t", "ag", "s"),
        call("a", "t", "ag", "s"),
        call("b", "t", "ag", "s"),
    ];
    let (_, answer) = client.post("/v1/ingest/batch", ACME, &batch(&events));
    assert_eq!(
        (answer["accepted"].as_i64(), answer["duplicates"].as_i64()),
        (Some(2), Some(1))
    );
    assert!(wait_until(Duration::from_secs(20), || calls(&client, ACME) == 3));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(calls(&client, ACME), 3);
    let raw = setup.sql("SELECT count(), min(kafka_offset) >= 0 FROM mcp_events");
    assert_eq!(raw, "3\t1\n", "rows carry their Kafka positions");

    // The aggregator's own /metrics: the rows it inserted, its inserts' latency, its lag.
    let metrics = Client::new(&aggregator.metrics_url())
        .get_text("/metrics", "")
        .1;
    assert!(
        metrics.contains("mcp_meter_aggregator_rows_inserted_total 3\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("mcp_meter_aggregator_insert_duration_seconds_count "),
        "{metrics}"
    );
    assert!(
        metrics.contains("mcp_meter_aggregator_lag_seconds "),
        "{metrics}"
    );
    // Its own families only: no HTTP API, no ingest outcomes, no embedded commits.
    for absent in [
        "mcp_meter_http_",
        "mcp_meter_ingest_",
        "mcp_meter_store_commit_",
    ] {
        assert!(!metrics.contains(absent), "{absent}: {metrics}");
    }
    let (status, _) = Client::new(&aggregator.metrics_url()).get_text("/healthz", "");
    assert_eq!(status, 200);
    // The ingestor's: 5 events in, 4 through to Kafka (it cannot see the retry), 1 in-batch repeat.
    let metrics = client.get_text("/metrics", "").1;
    assert!(
        metrics.contains("mcp_meter_ingest_events_total{outcome=\"accepted\"} 4\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("mcp_meter_ingest_events_total{outcome=\"duplicate\"} 1\n"),
        "{metrics}"
    );
}

#[test]
fn an_unreachable_broker_answers_503_with_retry_after_and_claims_nothing() {
    let setup = Setup::new("nobroker", &kafka_brokers(), 1, "");
    // The same config, pointed at a port where no broker listens.
    let text = std::fs::read_to_string(&setup.file)
        .unwrap()
        .replace(&kafka_brokers(), "127.0.0.1:1")
        .replace(
            "session_timeout_ms = 6000",
            "session_timeout_ms = 6000\ndelivery_timeout_ms = 1500",
        );
    std::fs::write(&setup.file, text).unwrap();
    let (_ingestor, client) = setup.ingestor();
    let started = Instant::now();
    let (status, body) = client.post("/v1/ingest/events", ACME, SEED);
    assert_eq!(status, 503, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("kafka"),
        "{body}"
    );
    assert!(body.get("accepted").is_none(), "nothing is claimed: {body}");
    assert!(started.elapsed() < Duration::from_secs(10));
    let answer = ureq::post(format!("{}/v1/ingest/events", client.base))
        .header("X-API-Key", ACME)
        .header("Content-Type", "application/json")
        .config()
        .http_status_as_error(false)
        .build()
        .send(SEED)
        .unwrap();
    assert_eq!(answer.headers().get("retry-after").unwrap(), "1");
    // /readyz says ingest cannot work, and why.
    let (status, ready) = client.get("/readyz", "");
    assert_eq!(status, 503, "{ready}");
    assert_eq!(ready["status"], "unavailable");
    assert_eq!(ready["dependencies"][0]["name"], "kafka");
    assert_eq!(ready["dependencies"][0]["ready"], false);
    assert!(
        ready["dependencies"][0]["error"]
            .as_str()
            .unwrap()
            .contains("kafka metadata"),
        "{ready}"
    );
    let (_, metrics) = client.get_text("/metrics", "");
    assert!(
        metrics.contains("mcp_meter_kafka_delivery_errors_total 2\n"),
        "{metrics}"
    );
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

#[test]
fn a_missing_broker_is_named_by_migrate_the_ingestor_and_the_aggregator_whose_health_fails() {
    let setup = Setup::new("nobroker2", &kafka_brokers(), 1, "");
    // Port 1 of loopback: nothing listens, the connection is refused at once.
    let nowhere = "127.0.0.1:1";
    let text = std::fs::read_to_string(&setup.file)
        .unwrap()
        .replace(&kafka_brokers(), nowhere);
    std::fs::write(&setup.file, text).unwrap();

    // migrate: fails within seconds (it waited 60 s for OperationTimedOut), naming the address
    // and the setting.
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_mcp-meter"))
        .args(["migrate", "--config"])
        .arg(&setup.file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    assert!(
        stderr.contains(nowhere) && stderr.contains("kafka.brokers"),
        "{stderr}"
    );
    assert!(!stderr.contains("OperationTimedOut"), "{stderr}");

    // ingestor: starts, and says at once that the broker is not there.
    let (mut ingestor, ingestor_log) =
        spawn_logged(&setup, &["ingestor", "--listen", "127.0.0.1:0"], &[]);
    assert!(
        wait_until(Duration::from_secs(20), || std::fs::read_to_string(
            &ingestor_log
        )
        .unwrap()
        .contains("starting anyway")),
        "{}",
        std::fs::read_to_string(&ingestor_log).unwrap()
    );
    let said = std::fs::read_to_string(&ingestor_log).unwrap();
    assert!(
        said.contains(nowhere) && said.contains("kafka.brokers"),
        "{said}"
    );
    let _ = ingestor.kill();
    let _ = ingestor.wait();

    // aggregator: /readyz 503 from the first failed check, /healthz 503 once the checks have
    // failed for the stall timeout, both naming the address; its consumer's errors are logged
    // once per 30 s, not every poll.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (mut aggregator, aggregator_log) = spawn_logged(
        &setup,
        &["aggregator"],
        &[
            ("MCP_METER_AGGREGATOR_LISTEN", format!("127.0.0.1:{port}")),
            ("MCP_METER_AGGREGATOR_LAG_CHECK_INTERVAL_MS", "200".into()),
            ("MCP_METER_AGGREGATOR_STALL_TIMEOUT_MS", "7000".into()),
        ],
    );
    let ops = Client::new(&format!("http://127.0.0.1:{port}"));
    let mut ready = None;
    assert!(
        wait_until(Duration::from_secs(30), || {
            ready = ops.try_get_text("/readyz");
            // 503 "no check has run yet" comes first.
            matches!(&ready, Some((503, body)) if body.contains("kafka.brokers"))
        }),
        "{ready:?} {:?}\n{}",
        aggregator.try_wait(),
        std::fs::read_to_string(&aggregator_log).unwrap()
    );
    let (_, ready) = ready.unwrap();
    assert!(
        ready.contains(nowhere) && ready.contains("unavailable"),
        "{ready}"
    );
    let mut health = None;
    assert!(
        wait_until(Duration::from_secs(30), || {
            health = ops.try_get_text("/healthz");
            matches!(health, Some((503, _)))
        }),
        "{health:?}"
    );
    let (_, health) = health.unwrap();
    assert!(
        health.contains("\"status\":\"unreachable\"") && health.contains(nowhere),
        "{health}"
    );
    // A few more seconds of a broker that is not there: ~12 s in all.
    std::thread::sleep(Duration::from_secs(4));
    let _ = aggregator.kill();
    let _ = aggregator.wait();
    let log = std::fs::read_to_string(&aggregator_log).unwrap();
    let consumer_errors = log.matches("kafka consumer error").count();
    assert!(
        consumer_errors <= 1,
        "{consumer_errors} lines in ~12 s:\n{log}"
    );
    assert!(
        log.contains("starting anyway") && log.contains(nowhere),
        "{log}"
    );
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

/// A row ClickHouse refuses for good (here: a check of the test's own, a MATERIALIZED column
/// that throws for one tool) is found by halving the insert: the other rows are stored once,
/// the refused row goes to the dead-letter topic with the server's reason and its source
/// offset, and the aggregator goes on with later batches.
#[test]
fn a_row_clickhouse_refuses_is_dead_lettered_and_the_rest_of_its_batch_is_stored_once() {
    let setup = Setup::new("refused", &kafka_brokers(), 1, "");
    setup.sql(
        "ALTER TABLE mcp_events ADD COLUMN refusal UInt8 MATERIALIZED throwIf(tool_name = 'refused_tool')",
    );
    let (_ingestor, client) = setup.ingestor();
    let events: Vec<Value> = (0..9)
        .map(|i| {
            let tool = if i == 6 { "refused_tool" } else { "web_search" };
            call(&format!("refused-{i}"), tool, "a", "s")
        })
        .collect();
    // Posted before the aggregator starts, so that its first poll reads them as one batch.
    let (status, answer) = client.post("/v1/ingest/batch", ACME, &batch(&events));
    assert_eq!(
        (status, answer["accepted"].as_u64()),
        (202, Some(9)),
        "{answer}"
    );
    let mut aggregator = setup.aggregator();
    let stored = || setup.sql("SELECT count(), uniqExact(idempotency_key) FROM mcp_events");
    assert!(
        wait_until(Duration::from_secs(30), || stored() == "8\t8\n"),
        "{}",
        stored()
    );
    let refused = dead_letters(&setup, 1);
    assert_eq!(refused.len(), 1, "{refused:?}");
    let (payload, headers) = &refused[0];
    println!("dead letter: {headers:?}\n  payload {payload:?}");
    assert!(
        headers["mcp-meter-reason"].contains("the store refused the row"),
        "{headers:?}"
    );
    assert!(
        headers["mcp-meter-reason"].contains("Code: 395"),
        "{headers:?}"
    );
    assert_eq!(headers["mcp-meter-source-offset"], "6", "{headers:?}");
    let payload: Value = serde_json::from_str(payload.as_deref().unwrap()).unwrap();
    assert_eq!(payload["tenantId"], "acme");
    assert_eq!(payload["event"]["idempotencyKey"], "refused-6");
    // The aggregator goes on: a later batch is stored, nothing is doubled, and the floor has
    // passed the refused row.
    let later: Vec<Value> = (9..12)
        .map(|i| call(&format!("refused-{i}"), "web_search", "a", "s"))
        .collect();
    assert_eq!(client.post("/v1/ingest/batch", ACME, &batch(&later)).0, 202);
    assert!(
        wait_until(Duration::from_secs(30), || stored() == "11\t11\n"),
        "{}",
        stored()
    );
    assert!(aggregator.is_running(), "the aggregator still runs");
    // The floor is recorded just after the insert.
    let floor = || setup.sql("SELECT max(max_offset) FROM mcp_kafka_topic_offsets");
    assert!(
        wait_until(Duration::from_secs(10), || floor() == "11\n"),
        "{}",
        floor()
    );
    // One dead letter, not more: the topic's end offset, now that everything is stored.
    let kafka = &setup.config.kafka;
    let probe: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka.brokers.as_deref().unwrap())
        .create()
        .unwrap();
    let (_, end) = probe
        .fetch_watermarks(&kafka.dead_letter_topic, 0, Duration::from_secs(10))
        .unwrap();
    assert_eq!(end, 1, "one dead letter, not more");
}

#[test]
fn a_poison_message_goes_to_the_dead_letter_topic_and_the_partition_keeps_flowing() {
    let setup = Setup::new("poison", &kafka_brokers(), 1, "");
    let kafka = &setup.config.kafka;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka.brokers.as_deref().unwrap())
        .create()
        .unwrap();
    actix_web::rt::System::new().block_on(async {
        producer
            .send(
                FutureRecord::to(&kafka.events_topic)
                    .key("k")
                    .payload("{not an event"),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    });
    let _aggregator = setup.aggregator();
    let (_ingestor, client) = setup.ingestor();
    let (status, _) = client.post("/v1/ingest/events", ACME, SEED);
    assert_eq!(status, 202);
    assert!(
        wait_until(Duration::from_secs(20), || calls(&client, ACME) == 1),
        "the event behind the poison message is stored"
    );

    let found = dead_letters(&setup, 1).pop();
    let (payload, headers) = found.expect("a message on the dead-letter topic");
    assert_eq!(payload.as_deref(), Some("{not an event"));
    assert!(
        headers["mcp-meter-reason"].contains("not a rated event"),
        "{headers:?}"
    );
    assert_eq!(headers["mcp-meter-source-offset"], "0");
}

#[test]
fn while_clickhouse_refuses_inserts_the_aggregator_retries_then_catches_up_exactly() {
    let setup = Setup::new(
        "chdown",
        &kafka_brokers(),
        2,
        "[aggregator]\nmax_retry_backoff_ms = 200\n",
    );
    let mut aggregator = setup.aggregator();
    let (_ingestor, client) = setup.ingestor();
    // The writer's table goes away: every insert fails until it is back.
    setup.sql("DETACH TABLE mcp_events");
    let events: Vec<Value> = (0..300)
        .map(|i| call(&format!("k{i}"), "t", "ag", "s"))
        .collect();
    let (status, _) = client.post("/v1/ingest/batch", GLOBEX, &batch(&events));
    assert_eq!(status, 202, "ingest does not depend on ClickHouse");
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        aggregator.is_running(),
        "the aggregator waits, it does not fall over"
    );
    setup.sql("ATTACH TABLE mcp_events");
    assert!(wait_until(Duration::from_secs(30), || {
        setup.sql("SELECT count() FROM mcp_events") == "300\n"
    }));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        setup.sql("SELECT count(), uniqExact(idempotency_key) FROM mcp_events"),
        "300\t300\n"
    );
    assert_eq!(calls(&client, GLOBEX), 300);
    assert!(aggregator.terminate().success(), "SIGTERM is a clean stop");
}

#[test]
fn ingest_recovers_by_itself_after_the_broker_restarts_under_load() {
    let mut tansu = Tansu::start();
    let setup = Setup::new("recover", &tansu.brokers(), 2, "delivery_timeout_ms = 5000");
    let (_ingestor, client) = setup.ingestor();
    let stop = AtomicBool::new(false);
    let statuses: Mutex<Vec<(Instant, u16)>> = Mutex::new(Vec::new());
    let mut restarted_at = None;
    std::thread::scope(|scope| {
        // A steady client, posting across the restart as a busy SDK would.
        scope.spawn(|| {
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                let events: Vec<Value> = (0..50)
                    .map(|i| call(&format!("r{n}-{i}"), "t", "a", "s"))
                    .collect();
                let status = client.post("/v1/ingest/batch", ACME, &batch(&events)).0;
                statuses.lock().unwrap().push((Instant::now(), status));
                n += 1;
            }
        });
        std::thread::sleep(Duration::from_secs(1));
        tansu.restart();
        restarted_at = Some(Instant::now());
        std::thread::sleep(Duration::from_secs(20));
        stop.store(true, Ordering::SeqCst);
    });
    // The restarted broker has forgotten the idempotent producer's state; the ingestor must be
    // back to 202 without being restarted itself.
    let restarted_at = restarted_at.unwrap();
    let statuses = statuses.into_inner().unwrap();
    let late: Vec<u16> = statuses
        .iter()
        .filter(|(at, _)| *at > restarted_at + Duration::from_secs(12))
        .map(|(_, s)| *s)
        .collect();
    let refused = statuses.iter().filter(|(_, s)| *s != 202).count();
    eprintln!(
        "{} posts, {refused} refused around the restart",
        statuses.len()
    );
    assert!(!late.is_empty());
    assert!(
        late.iter().all(|s| *s == 202),
        "still failing 12 s after the restart: {late:?}"
    );
    assert!(statuses.iter().all(|(_, s)| *s == 202 || *s == 503));
}

/// Hard limits across ingestors: two ingestor processes share the counters in Redis, so the
/// limit holds for the session whichever ingestor each call goes through.
#[test]
fn two_ingestors_share_hard_limit_counters_through_redis() {
    let redis = std::env::var("MCP_METER_TEST_REDIS_URL")
        .expect("MCP_METER_TEST_REDIS_URL is not set: run scripts/test, which starts Redis");
    let prefix = unique_database("limits");
    let setup = Setup::new(
        "limits",
        &kafka_brokers(),
        2,
        &format!(
            "[redis]\nurl = \"{redis}\"\nkey_prefix = \"{prefix}:\"\n\n\
[[tenants.limits]]\nper = \"session\"\nwindow = \"day\"\nmax_calls = 4\n"
        ),
    );
    assert_eq!(
        setup.config.tenants[2].limits.len(),
        1,
        "the limit belongs to initech"
    );
    let (_a, client_a) = setup.ingestor();
    let (_b, client_b) = setup.ingestor();
    let mut answers = Vec::new();
    for n in 0..6 {
        let client = if n % 2 == 0 { &client_a } else { &client_b };
        let (status, answer) = client.post(
            "/v1/ingest/events",
            INITECH,
            &call(&format!("l{n}"), "t", "a", "shared").to_string(),
        );
        assert_eq!(status, 202, "{answer}");
        answers.push(answer["killedSessionIds"].clone());
    }
    let none = serde_json::json!([]);
    let killed = serde_json::json!(["shared"]);
    assert_eq!(
        answers,
        vec![
            none.clone(),
            none.clone(),
            none.clone(),
            none,
            killed.clone(),
            killed
        ]
    );
}

/// Redis stopped mid-run: ingest keeps answering 202 and every event is stored once; the guard
/// check answers allow with `degraded: true` and `/readyz` names Redis; when Redis is back
/// (empty), levels and limits come back by themselves, with no restart of any process.
#[test]
fn redis_down_ingest_goes_on_the_guard_fails_open_and_recovers_by_itself() {
    let mut redis = RedisServer::start();
    let prefix = unique_database("redis-down");
    // initech has a (high) session limit, so every ingest goes to Redis; its warn threshold of
    // 95% puts the test plan's 93.7% margin at L1, a level only the guard can have written.
    let setup = Setup::new(
        "redisdown",
        &kafka_brokers(),
        2,
        &format!(
            "[redis]\nurl = \"{}\"\nkey_prefix = \"{prefix}:\"\n\n\
[margin_guard]\ninterval_seconds = 1\n\n\
[[tenants.limits]]\nper = \"session\"\nwindow = \"day\"\nmax_calls = 1000000\n\n\
[tenants.margin_guard]\nwarn_below = 0.95\n",
            redis.url()
        ),
    );
    let (_ingestor, client) = setup.ingestor();
    let _aggregator = setup.aggregator();
    let check = || {
        let (status, answer) = client.get("/v1/guard/check?agentId=a&sessionId=s0", INITECH);
        assert_eq!(status, 200, "{answer}");
        answer
    };
    let ready = || client.get("/readyz", "").1;

    // Posts batches of 20 from another thread, across the outage, until told to stop.
    let stop = AtomicBool::new(false);
    let statuses = Mutex::new(Vec::new());
    let posted = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let events: Vec<Value> = (0..20)
                    .map(|i| call(&format!("r{n}-{i}"), "t", "a", &format!("s{}", i % 4)))
                    .collect();
                let (status, answer) = client.post("/v1/ingest/batch", INITECH, &batch(&events));
                if status == 202 {
                    assert_eq!(answer["accepted"], 20, "{answer}");
                    posted.fetch_add(20, Ordering::Relaxed);
                }
                statuses.lock().unwrap().push(status);
                n += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
        });

        let before = Instant::now();
        assert!(
            wait_until(Duration::from_secs(30), || check()["level"] == "L1_WARN"),
            "the guard never wrote initech's level: {}",
            check()
        );
        let up = check();
        assert_eq!(
            (up["action"].clone(), up["degraded"].clone()),
            ("allow".into(), false.into())
        );
        assert_eq!(ready()["status"], "ready");
        println!("guard level visible after {:?}", before.elapsed());

        redis.stop();
        let down_at = statuses.lock().unwrap().len();
        std::thread::sleep(Duration::from_secs(3));
        let down = check();
        assert_eq!(down["degraded"], true, "{down}");
        assert_eq!(down["action"], "allow");
        assert!(down["reason"]
            .as_str()
            .unwrap()
            .starts_with("guard state unavailable, failing open"));
        let r = ready();
        assert_eq!(r["status"], "degraded", "{r}");
        assert_eq!(r["degraded"], serde_json::json!(["redis"]));
        assert_eq!(r["dependencies"][2]["name"], "redis");
        assert_eq!(r["dependencies"][2]["ready"], false);
        assert_eq!(r["dependencies"][0]["name"], "kafka");
        assert_eq!(r["dependencies"][0]["ready"], true);
        let during = statuses.lock().unwrap().len() - down_at;
        assert!(
            during >= 10,
            "only {during} batches posted while Redis was down"
        );

        redis.start_again();
        assert!(
            wait_until(Duration::from_secs(30), || {
                let c = check();
                c["degraded"] == false && c["level"] == "L1_WARN"
            }),
            "the guard did not come back after Redis did: {}",
            check()
        );
        assert_eq!(ready()["status"], "ready");
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
    });

    let statuses = statuses.into_inner().unwrap();
    assert!(
        statuses.iter().all(|s| *s == 202),
        "every batch is accepted: {:?}",
        statuses.iter().filter(|s| **s != 202).collect::<Vec<_>>()
    );
    let posted = posted.into_inner() as i64;
    assert!(
        wait_until(Duration::from_secs(60), || calls(&client, INITECH)
            == posted),
        "{} of {posted} counted",
        calls(&client, INITECH)
    );
    assert_eq!(
        setup.sql("SELECT count(), uniqExact(idempotency_key) FROM mcp_events"),
        format!("{posted}\t{posted}\n")
    );
    println!(
        "{} batches, {posted} events, all 202, all stored once",
        statuses.len()
    );
}

/// SIGTERM to an ingestor under load: it stops accepting, waits for the delivery reports of
/// the requests in flight, answers them, and exits; every event answered 202 reaches ClickHouse.
#[test]
fn an_ingestor_stopped_under_load_loses_no_event_answered_202() {
    let setup = Setup::new("ingstop", &kafka_brokers(), 2, "");
    let _aggregator = setup.aggregator();
    let (mut ingestor, client) = setup.ingestor();
    let load = Load::start(&client.base, ACME, 8);
    assert!(wait_until(Duration::from_secs(20), || load.answered() > 2000));
    let status = ingestor.terminate();
    assert!(
        status.success(),
        "the ingestor exits cleanly on SIGTERM: {status}"
    );
    let (answered, refused) = load.stop();
    let stored = || setup.sql("SELECT count(), uniqExact(idempotency_key) FROM mcp_events");
    assert!(
        wait_until(Duration::from_secs(60), || stored()
            == format!("{answered}\t{answered}\n")),
        "{answered} answered 202, stored: {}",
        stored()
    );
    println!("{answered} events answered 202, all stored; {refused} requests refused or cut off");
}

/// A key's rate limit holds across ingestors: its bucket lives in Redis, so a burst of 4 is 4
/// requests whichever ingestor each goes to.
#[test]
fn two_ingestors_share_a_keys_rate_limit_through_redis() {
    let redis = std::env::var("MCP_METER_TEST_REDIS_URL")
        .expect("MCP_METER_TEST_REDIS_URL is not set: run scripts/test, which starts Redis");
    let prefix = unique_database("rate");
    let setup = Setup::new(
        "rate",
        &kafka_brokers(),
        1,
        &format!("[redis]\nurl = \"{redis}\"\nkey_prefix = \"{prefix}:\"\n"),
    );
    // initech's key: 4 at once, then one every 10 s.
    let text = std::fs::read_to_string(&setup.file).unwrap();
    let limited = text.replacen(
        "scopes = [\"admin\"] }]",
        "scopes = [\"admin\"], rate_limit = { requests_per_second = 0.1, burst = 4 } }]",
        1,
    );
    assert_ne!(text, limited);
    std::fs::write(&setup.file, limited).unwrap();
    let (_a, client_a) = setup.ingestor();
    let (_b, client_b) = setup.ingestor();
    let mut statuses = Vec::new();
    for n in 0..6 {
        let client = if n % 2 == 0 { &client_a } else { &client_b };
        let (status, answer) = client.post(
            "/v1/ingest/events",
            INITECH,
            &call(&format!("q{n}"), "t", "a", "s").to_string(),
        );
        if status == 429 {
            assert_eq!(answer["error"], "rate_limited", "{answer}");
        }
        statuses.push(status);
    }
    assert_eq!(statuses, [202, 202, 202, 202, 429, 429]);
    // Other keys are not limited.
    assert_eq!(client_b.post("/v1/ingest/events", ACME, SEED).0, 202);
}

/// Kafka's committed offsets are hints: an aggregator resumes each partition where the store's
/// floor says, whether the group's offset is ahead of it (records nobody stored would be skipped)
/// or behind it (stored records would be re-read).
#[test]
fn an_aggregator_resumes_at_the_stored_floor_whatever_offset_the_group_committed() {
    let setup = Setup::new("floor", &kafka_brokers(), 1, "");
    let kafka = &setup.config.kafka;
    let (_ingestor, client) = setup.ingestor();
    let post = |from: usize, to: usize| {
        let events: Vec<Value> = (from..to)
            .map(|i| call(&format!("f{i}"), "t", "a", "s"))
            .collect();
        assert_eq!(
            client.post("/v1/ingest/batch", ACME, &batch(&events)).0,
            202
        );
    };
    let commit = |offset: i64| {
        let consumer = group_consumer(&setup);
        let mut list = rdkafka::TopicPartitionList::new();
        list.add_partition_offset(&kafka.events_topic, 0, rdkafka::Offset::Offset(offset))
            .unwrap();
        consumer
            .commit(&list, rdkafka::consumer::CommitMode::Sync)
            .unwrap();
    };
    let stored = || setup.sql("SELECT count(), uniqExact(idempotency_key) FROM mcp_events");

    post(0, 100);
    let mut aggregator = setup.aggregator();
    assert!(wait_until(Duration::from_secs(30), || stored() == "100\t100\n"));
    assert!(aggregator.terminate().success());

    // While no aggregator runs, 50 more arrive, and the group's offset claims 40 of them read.
    post(100, 150);
    commit(140);
    let mut aggregator = setup.aggregator();
    assert!(
        wait_until(Duration::from_secs(30), || stored() == "150\t150\n"),
        "offsets 100..140 must not be skipped: {}",
        stored()
    );
    assert!(aggregator.terminate().success());

    // And behind it: the group says 10, the store holds everything to 149.
    post(150, 160);
    commit(10);
    let _aggregator = setup.aggregator();
    assert!(
        wait_until(Duration::from_secs(30), || stored() == "160\t160\n"),
        "{}",
        stored()
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(stored(), "160\t160\n", "nothing stored twice");
}

/// A ClickHouse database keeps its stored offsets per topic: pointed at a new topic, an
/// aggregator stores that topic from its start, and back on the first it resumes where it was.
/// Only a floor past its own topic's end (a topic recreated under the same name) is refused,
/// with what to do.
#[test]
fn one_database_follows_a_new_topic_and_refuses_only_a_recreated_one() {
    let setup = Setup::new("topics", &kafka_brokers(), 1, "");
    let stored = || setup.sql("SELECT count(), uniqExact(idempotency_key) FROM mcp_events");
    let post = |setup: &Setup, prefix: &str, n: usize| {
        let (_ingestor, client) = setup.ingestor();
        let events: Vec<Value> = (0..n)
            .map(|i| call(&format!("{prefix}{i}"), "t", "a", "s"))
            .collect();
        assert_eq!(
            client.post("/v1/ingest/batch", ACME, &batch(&events)).0,
            202
        );
    };
    let store_all = |setup: &Setup, expected: &str| {
        let mut aggregator = setup.aggregator();
        assert!(
            wait_until(Duration::from_secs(30), || stored() == expected),
            "{}",
            stored()
        );
        assert!(aggregator.terminate().success());
    };
    post(&setup, "a", 20);
    store_all(&setup, "20\t20\n");

    // The same database, a new topic with 5 events on it.
    let text = std::fs::read_to_string(&setup.file).unwrap().replace(
        &format!("events_topic = \"{}.events\"", setup.name),
        &format!("events_topic = \"{}.other\"", setup.name),
    );
    let other = Setup {
        name: setup.name.clone(),
        dir: tempfile::tempdir().unwrap(),
        file: setup.dir.path().join("other.toml"),
        config: schemas::config::Config::from_toml(&text).unwrap(),
    };
    std::fs::write(&other.file, &text).unwrap();
    actix_web::rt::System::new()
        .block_on(mcp_meter::migrate_kafka(&other.config))
        .unwrap();
    post(&other, "b", 5);
    store_all(&other, "25\t25\n");
    // Back to the first topic, which resumes after its own floor.
    post(&setup, "c", 3);
    store_all(&setup, "28\t28\n");
    assert_eq!(
        setup.sql(
            "SELECT kafka_topic, max(max_offset) FROM mcp_kafka_topic_offsets \
GROUP BY kafka_topic ORDER BY kafka_topic"
        ),
        format!("{0}.events\t22\n{0}.other\t4\n", setup.name)
    );

    // The other topic as if recreated: its floor lies past its end, and a new record waits.
    setup.sql(&format!(
        "INSERT INTO mcp_kafka_topic_offsets VALUES ('{}.other', 0, 100)",
        setup.name
    ));
    post(&other, "d", 1);
    let mut aggregator = std::process::Command::new(env!("CARGO_BIN_EXE_mcp-meter"))
        .args(["aggregator", "--config"])
        .arg(&other.file)
        .env("MCP_METER_AGGREGATOR_LISTEN", "127.0.0.1:0")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = aggregator.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(30) {
            aggregator.kill().unwrap();
            panic!("the aggregator went on past its topic's end");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(aggregator.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(!status.success());
    assert!(
        stderr.contains(&format!(
            "holds offsets up to 100 of partition 0 of topic {}.other, but that topic now ends at offset 6",
            setup.name
        )) && stderr.contains("Give the new topic a name of its own"),
        "{stderr}"
    );
    assert_eq!(stored(), "28\t28\n");
}

/// The fault test: 100,000 events with 5% repeated keys, some batches posted twice as a retrying
/// client would, through two ingestor processes into two aggregator processes. During the run an
/// aggregator is SIGKILLed five times (and restarted), and the broker is restarted once.
/// Afterwards every count and sum equals the unique events', to the micro-dollar.
#[test]
fn exactly_once_through_aggregator_crashes_and_a_broker_restart() {
    const EVENTS: usize = 100_000;
    const BATCH: usize = 500;
    let mut tansu = Tansu::start();
    let setup = Setup::new(
        "fault",
        &tansu.brokers(),
        4,
        "delivery_timeout_ms = 3000\n[aggregator]\nmax_batch_wait_ms = 100\nmax_retry_backoff_ms = 500\n",
    );
    let aggregators = Mutex::new(vec![setup.aggregator(), setup.aggregator()]);
    let (_ingestors, clients) = setup.two_ingestors();

    // The stream, per tenant, and what it should add up to (first occurrence of each key).
    let tenants = [ACME, GLOBEX, INITECH];
    let mut next = xorshift(7);
    let mut batches: Vec<(usize, String)> = Vec::new();
    let mut expected: HashMap<&str, (i64, i64, i64)> = HashMap::new();
    let mut keys: Vec<Vec<String>> = vec![Vec::new(); 3];
    let mut current: Vec<Vec<Value>> = vec![Vec::new(); 3];
    for i in 0..EVENTS {
        let t = (next() % 3) as usize;
        let key = if !keys[t].is_empty() && next() % 100 < 5 {
            keys[t][(next() % keys[t].len() as u64) as usize].clone()
        } else {
            let k = format!("fault-{i}");
            keys[t].push(k.clone());
            let e = expected.entry(tenants[t]).or_default();
            e.0 += 1;
            e.1 += CALL_REVENUE;
            e.2 += CALL_COGS;
            k
        };
        current[t].push(call(
            &key,
            &format!("tool_{}", next() % 5),
            &format!("agent_{}", next() % 7),
            &format!("s{}", next() % 300),
        ));
        if current[t].len() == BATCH {
            batches.push((t, batch(&std::mem::take(&mut current[t]))));
        }
    }
    for (t, rest) in current.into_iter().enumerate() {
        if !rest.is_empty() {
            batches.push((t, batch(&rest)));
        }
    }
    let unique: i64 = expected.values().map(|e| e.0).sum();

    let posted = AtomicUsize::new(0);
    let retried_posts = AtomicUsize::new(0);
    let done = AtomicBool::new(false);
    let (mut kills, mut broker_restarts) = (0, 0);
    let started = Instant::now();
    std::thread::scope(|scope| {
        let lanes = 4;
        for lane in 0..lanes {
            let (batches, posted, retried_posts, clients, tenants) =
                (&batches, &posted, &retried_posts, &clients, &tenants);
            scope.spawn(move || {
                for (n, (t, body)) in batches.iter().enumerate().skip(lane).step_by(lanes) {
                    // Every tenth batch is sent twice, as a client whose first answer was lost.
                    let times = if n % 10 == 0 { 2 } else { 1 };
                    for time in 0..times {
                        let mut attempt = 0;
                        loop {
                            let client = &clients[(n + attempt + time) % 2];
                            let (status, _) = client.post("/v1/ingest/batch", tenants[*t], body);
                            if status == 202 {
                                break;
                            }
                            // 503 while the broker restarts: back off and retry, as the SDKs do.
                            attempt += 1;
                            retried_posts.fetch_add(1, Ordering::Relaxed);
                            assert!(
                                attempt < 200,
                                "batch {n} never accepted (last status {status})"
                            );
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    }
                    posted.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        // Chaos: five aggregator crashes and one broker restart while the posts go on.
        scope.spawn(|| {
            for round in 0..6 {
                std::thread::sleep(Duration::from_millis(1500));
                if round == 3 {
                    tansu.restart();
                    broker_restarts += 1;
                    continue;
                }
                let mut aggs = aggregators.lock().unwrap();
                let victim = round % 2;
                aggs[victim].crash();
                aggs[victim] = setup.aggregator();
                kills += 1;
            }
            done.store(true, Ordering::SeqCst);
        });
    });
    assert!(done.load(Ordering::SeqCst));
    let post_seconds = started.elapsed().as_secs_f64();

    let count = || {
        setup
            .sql("SELECT count() FROM mcp_events")
            .trim()
            .parse::<i64>()
            .unwrap()
    };
    let settled = wait_until(Duration::from_secs(180), || count() >= unique);
    std::thread::sleep(Duration::from_secs(2));
    let found = count();
    eprintln!(
        "fault test: {} events in {} batches ({} posted twice), {} posts retried, {unique} unique expected, \
         {found} found; {kills} aggregator kills, {broker_restarts} broker restart; posting took {post_seconds:.1} s, \
         settled after {:.1} s",
        EVENTS,
        batches.len(),
        batches.len().div_ceil(10),
        retried_posts.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64()
    );
    if !settled {
        eprintln!("{}", diagnose(&setup));
    }
    assert!(settled, "only {found} of {unique} events arrived");
    assert_eq!(found, unique, "raw rows");
    assert_eq!(
        setup.sql("SELECT count() - uniqExact(tenant_id, idempotency_key) FROM mcp_events"),
        "0\n"
    );
    assert_eq!((kills, broker_restarts), (5, 1));
    for (t, tenant) in ["acme", "globex", "initech"].iter().enumerate() {
        let (calls_expected, revenue, cogs) = expected[tenants[t]];
        let q = |sql: &str| setup.sql(&sql.replace("$T", &format!("'{tenant}'")));
        assert_eq!(
            q("SELECT count(), sum(revenue_micros), sum(cogs_micros) FROM mcp_events WHERE tenant_id = $T"),
            format!("{calls_expected}\t{revenue}\t{cogs}\n"),
            "{tenant} raw"
        );
        assert_eq!(
            q("SELECT sumMerge(calls), sumMerge(revenue_micros), sumMerge(cogs_micros) FROM mcp_daily_stats WHERE tenant_id = $T"),
            format!("{calls_expected}\t{revenue}\t{cogs}\n"),
            "{tenant} mcp_daily_stats"
        );
        assert_eq!(
            q("SELECT sumMerge(calls), sumMerge(revenue_micros), sumMerge(cogs_micros) FROM mcp_session_summary WHERE tenant_id = $T"),
            format!("{calls_expected}\t{revenue}\t{cogs}\n"),
            "{tenant} mcp_session_summary"
        );
        assert_eq!(
            q("SELECT count() FROM mcp_event_keys WHERE tenant_id = $T"),
            format!("{calls_expected}\n"),
            "{tenant} mcp_event_keys"
        );
        let (_, summary) = clients[0].get("/analytics/mcp/summary", tenants[t]);
        assert_eq!(
            (
                summary["calls"].as_i64(),
                summary["revenueMicros"].as_i64(),
                summary["cogsMicros"].as_i64()
            ),
            (Some(calls_expected), Some(revenue), Some(cogs)),
            "{tenant} /analytics/mcp/summary"
        );
        let (_, tools) = clients[1].get("/analytics/mcp/revenue/by-tool", tenants[t]);
        let by_tool: i64 = tools["tools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["revenueMicros"].as_i64().unwrap())
            .sum();
        assert_eq!(by_tool, revenue, "{tenant} by-tool revenue");
    }
    for mut a in aggregators.into_inner().unwrap() {
        assert!(a.terminate().success());
    }
}

/// The fault test with time to settle: two ingestors, two aggregators, 60,000 events in batches
/// of 100 to 500 posted evenly over 125 s (each retried with the same keys until answered 202),
/// while an aggregator is SIGKILLed and restarted three times 25 s or more apart (long enough
/// for the group to settle between kills), ClickHouse is paused for 20 s (SIGSTOP, then
/// SIGCONT) and the broker is SIGKILLed and restarted. Every event answered 202 must be stored,
/// exactly once, within 90 s after posting ends. The test is the aggregators' supervisor: one
/// that exits (a stall it could not end by rejoining) is started again, and the test says so.
/// Every stall the aggregators report (503 from `/healthz`) is printed with their lag metrics.
#[test]
fn every_acked_event_is_stored_through_spaced_kills_a_clickhouse_pause_and_a_broker_kill() {
    const EVENTS: usize = 60_000;
    const POSTING: Duration = Duration::from_secs(125);
    const BOUND: Duration = Duration::from_secs(90);
    let clickhouse = ClickHouseServer::start();
    let mut tansu = Tansu::start();
    let setup = Setup::on(
        clickhouse.url(),
        "request_timeout_ms = 5000",
        "spaced",
        &tansu.brokers(),
        4,
        "delivery_timeout_ms = 3000\n[aggregator]\nmax_batch_wait_ms = 100\nmax_retry_backoff_ms = 500\n\
lag_check_interval_ms = 500\nstall_timeout_ms = 10000\n",
    );
    let aggregators = Mutex::new(vec![setup.aggregator(), setup.aggregator()]);
    let (_ingestors, clients) = setup.two_ingestors();

    let tenants = [ACME, GLOBEX, INITECH];
    let mut next = xorshift(13);
    let mut batches: Vec<(usize, String)> = Vec::new();
    let mut made = 0;
    while made < EVENTS {
        let size = (100 + (next() % 401) as usize).min(EVENTS - made);
        let events: Vec<Value> = (made..made + size)
            .map(|i| {
                let tool = format!("tool_{}", i % 5);
                call(
                    &format!("spaced-{i}"),
                    &tool,
                    &format!("agent_{}", i % 7),
                    &format!("s{}", i % 300),
                )
            })
            .collect();
        batches.push(((next() % 3) as usize, batch(&events)));
        made += size;
    }
    let stored = || {
        setup
            .sql("SELECT count() FROM mcp_events")
            .trim()
            .parse::<usize>()
            .unwrap()
    };

    let started = Instant::now();
    let lines = Mutex::new(Vec::<String>::new());
    let say = |line: String| {
        let line = format!("[{:6.1} s] {line}", started.elapsed().as_secs_f64());
        eprintln!("{line}");
        lines.lock().unwrap().push(line);
    };
    let retried_posts = AtomicUsize::new(0);
    let finished = AtomicBool::new(false);
    let mut posting_ended = started;
    let mut all_stored_after = None;
    let mut chaos_done = 0;
    let mut healthy_at_end = false;
    let (mut stalls_seen, mut recoveries, mut exits, mut broker_panics) = (0, 0, 0, 0);
    std::thread::scope(|scope| {
        let lanes: Vec<_> = (0..4)
            .map(|lane| {
                let (batches, clients, tenants, retried_posts) =
                    (&batches, &clients, &tenants, &retried_posts);
                scope.spawn(move || {
                    for (n, (t, body)) in batches.iter().enumerate().skip(lane).step_by(4) {
                        let due = started + POSTING.mul_f64(n as f64 / batches.len() as f64);
                        std::thread::sleep(due.saturating_duration_since(Instant::now()));
                        let mut attempt = 0;
                        loop {
                            let client = &clients[(n + attempt) % 2];
                            match client.try_post("/v1/ingest/batch", tenants[*t], body) {
                                Some((202, _)) => break,
                                _ => {
                                    attempt += 1;
                                    retried_posts.fetch_add(1, Ordering::Relaxed);
                                    assert!(attempt < 600, "batch {n} never accepted");
                                    std::thread::sleep(Duration::from_millis(100));
                                }
                            }
                        }
                    }
                })
            })
            .collect();

        // Chaos, supervision and observation, every 250 ms until the check below is done.
        let chaos = scope.spawn(|| {
            let plan: [(u64, &str); 6] = [
                (5, "kill aggregator 0"),
                (30, "kill aggregator 1"),
                (55, "pause clickhouse"),
                (75, "resume clickhouse"),
                (90, "kill the broker"),
                (115, "kill aggregator 0"),
            ];
            let mut done = 0;
            let mut unhealthy_since: [Option<Instant>; 2] = [None, None];
            let mut panics_seen = 0;
            let (mut stalls, mut recovered, mut exited, mut restarts_for_panic) = (0, 0, 0, 0);
            while !finished.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(250));
                let now = started.elapsed();
                if done < plan.len() && now >= Duration::from_secs(plan[done].0) {
                    let action = plan[done].1;
                    say(action.to_string());
                    match action {
                        "pause clickhouse" => clickhouse.signal("-STOP"),
                        "resume clickhouse" => clickhouse.signal("-CONT"),
                        "kill the broker" => tansu.crash_and_restart(),
                        _ => {
                            let victim = if action.ends_with('0') { 0 } else { 1 };
                            let mut aggs = aggregators.lock().unwrap();
                            aggs[victim].crash();
                            aggs[victim] = setup.aggregator();
                        }
                    }
                    done += 1;
                }
                // tansu 0.6.0 after a SIGKILL can panic in its idempotent-producer check and
                // then refuse every produce until it is restarted again: a broker fault, not
                // ours; restart it and say so.
                let panics = tansu.log().matches("more or less than one row").count();
                if panics > panics_seen {
                    panics_seen = panics;
                    restarts_for_panic += 1;
                    say("tansu panicked in idempotent_message_check; restarting it again".into());
                    tansu.crash_and_restart();
                }
                let mut aggs = aggregators.lock().unwrap();
                for (i, aggregator) in aggs.iter_mut().enumerate() {
                    if let Some(status) = aggregator.exited() {
                        exited += 1;
                        say(format!(
                            "aggregator {i} exited ({status}); the supervisor starts it again"
                        ));
                        *aggregator = setup.aggregator();
                        unhealthy_since[i] = None;
                        continue;
                    }
                    let ops = Client::new(&aggregator.metrics_url());
                    let Some((code, body)) = ops.try_get_text("/healthz") else {
                        continue;
                    };
                    match (code, unhealthy_since[i]) {
                        (503, None) => {
                            stalls += 1;
                            unhealthy_since[i] = Some(Instant::now());
                            let metrics = ops
                                .try_get_text("/metrics")
                                .map(|m| m.1)
                                .unwrap_or_default();
                            let lag: Vec<&str> = metrics
                                .lines()
                                .filter(|l| {
                                    l.starts_with("mcp_meter_aggregator_partition_lag_records{")
                                        || l.starts_with("mcp_meter_aggregator_lag_records ")
                                        || l.starts_with("mcp_meter_aggregator_oldest_unstored")
                                        || l.starts_with("mcp_meter_aggregator_stalled_partitions ")
                                        || l.starts_with(
                                            "mcp_meter_aggregator_assigned_partitions ",
                                        )
                                })
                                .collect();
                            say(format!(
                                "aggregator {i} /healthz 503 {body}\n    {}",
                                lag.join("\n    ")
                            ));
                        }
                        (200, Some(since)) => {
                            recovered += 1;
                            unhealthy_since[i] = None;
                            say(format!(
                                "aggregator {i} /healthz 200 again after {:.1} s: {body}",
                                since.elapsed().as_secs_f64()
                            ));
                        }
                        _ => {}
                    }
                }
            }
            (done, stalls, recovered, exited, restarts_for_panic)
        });

        for lane in lanes {
            lane.join().unwrap();
        }
        posting_ended = Instant::now();
        say(format!("posting ended: {EVENTS} events answered 202"));
        if wait_until(BOUND, || stored() >= EVENTS) {
            all_stored_after = Some(posting_ended.elapsed());
        }
        // The aggregators' own view agrees once they have measured again: no lag, healthy.
        let healthy = wait_until(Duration::from_secs(20), || {
            aggregators.lock().unwrap().iter().all(|a| {
                Client::new(&a.metrics_url())
                    .try_get_text("/healthz")
                    .is_some_and(|(code, body)| code == 200 && body.contains("\"lagRecords\":0,"))
            })
        });
        say(format!("both aggregators healthy with no lag: {healthy}"));
        healthy_at_end = healthy;
        finished.store(true, Ordering::SeqCst);
        (chaos_done, stalls_seen, recoveries, exits, broker_panics) = chaos.join().unwrap();
    });

    let found = stored();
    eprintln!(
        "spaced fault test: {EVENTS} events in {} batches, {} posts retried; {chaos_done} chaos steps; \
{stalls_seen} stalls reported by /healthz, {recoveries} recovered; {exits} aggregator exits restarted \
by the supervisor; {broker_panics} tansu panics restarted; {found} stored, all of them {} after posting ended",
        batches.len(),
        retried_posts.load(Ordering::Relaxed),
        match all_stored_after {
            Some(d) => format!("{:.1} s", d.as_secs_f64()),
            None => format!("not within {} s", BOUND.as_secs()),
        }
    );
    if all_stored_after.is_none() {
        eprintln!("{}", diagnose(&setup));
    }
    assert_eq!(chaos_done, 6, "every chaos step ran");
    assert!(
        all_stored_after.is_some(),
        "only {found} of {EVENTS} acked events stored"
    );
    assert_eq!(found, EVENTS, "raw rows");
    assert_eq!(
        setup.sql("SELECT count() - uniqExact(tenant_id, idempotency_key), sum(revenue_micros) FROM mcp_events"),
        format!("0\t{}\n", EVENTS as i64 * CALL_REVENUE)
    );
    assert_eq!(
        setup.sql("SELECT sumMerge(calls), sumMerge(revenue_micros) FROM mcp_daily_stats"),
        format!("{EVENTS}\t{}\n", EVENTS as i64 * CALL_REVENUE),
        "mcp_daily_stats"
    );
    assert_eq!(
        setup.sql("SELECT sumMerge(calls) FROM mcp_session_summary"),
        format!("{EVENTS}\n"),
        "mcp_session_summary"
    );
    assert!(
        healthy_at_end,
        "both aggregators answer /healthz 200 with no lag at the end"
    );
}

/// Freshness: the time from a 202 to the event counting in `/analytics/mcp/summary`, over
/// 1,002 probes. Three lanes run at once, each on its own tenant, so each lane knows exactly
/// which count means its event arrived. Measured and printed, not asserted.
#[test]
fn freshness_from_202_to_summary_over_1000_probes() {
    let setup = Setup::new("fresh", &kafka_brokers(), 4, "");
    let _aggregator = setup.aggregator();
    let (_ingestor, client) = setup.ingestor();
    let probes_per_lane = 334;
    let latencies = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for (lane, key) in [ACME, GLOBEX, INITECH].into_iter().enumerate() {
            let (client, latencies) = (&client, &latencies);
            scope.spawn(move || {
                for probe in 0..probes_per_lane {
                    let event = call(&format!("probe-{lane}-{probe}"), "probe", "agent", "s");
                    let (status, _) = client.post("/v1/ingest/events", key, &event.to_string());
                    assert_eq!(status, 202);
                    let sent = Instant::now();
                    let arrived = probe as i64 + 1;
                    assert!(
                        wait_until(Duration::from_secs(10), || calls(client, key) >= arrived),
                        "probe {probe} never showed"
                    );
                    latencies.lock().unwrap().push(sent.elapsed());
                }
            });
        }
    });
    let mut l = latencies.into_inner().unwrap();
    l.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let at = |q: f64| ms(l[((l.len() as f64 * q) as usize).min(l.len() - 1)]);
    eprintln!(
        "freshness over {} probes: p50 {:.0} ms, p90 {:.0} ms, p99 {:.0} ms, max {:.0} ms \
         (aggregator max_batch_wait_ms {}, summary polled every 20 ms)",
        l.len(),
        at(0.5),
        at(0.9),
        at(0.99),
        ms(*l.last().unwrap()),
        setup.config.aggregator.max_batch_wait_ms
    );
    assert!(l.len() >= 1000);
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
    let mut out = String::from("partition: low..high watermark | committed | floor | rows\n");
    for p in 0..kafka.partitions {
        let marks = consumer.fetch_watermarks(&kafka.events_topic, p, Duration::from_secs(5));
        let c = committed
            .as_ref()
            .ok()
            .and_then(|l| l.find_partition(&kafka.events_topic, p))
            .map(|e| format!("{:?}", e.offset()));
        let floor = setup.sql(&format!(
            "SELECT max(max_offset) FROM mcp_kafka_offsets WHERE kafka_partition = {p}"
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

/// The lag monitor reads the topic from outside the group: each partition's end, and when the
/// first unstored record was written, so the age of what waits is a real figure.
#[test]
fn the_lag_probe_reads_end_offsets_and_when_a_record_was_written() {
    use backends::kafka::KafkaProbe;
    use backends::source::TopicProbe;
    let setup = Setup::new("probe", &kafka_brokers(), 2, "");
    let (_ingestor, client) = setup.ingestor();
    let before = chrono::Utc::now().timestamp_millis();
    let events: Vec<Value> = (0..30)
        .map(|i| call(&format!("p{i}"), "t", "a", &format!("s{i}")))
        .collect();
    assert_eq!(
        client.post("/v1/ingest/batch", ACME, &batch(&events)).0,
        202
    );
    let after = chrono::Utc::now().timestamp_millis();

    let probe = KafkaProbe::new(&setup.config.kafka).unwrap();
    let ends = probe.end_offsets().unwrap();
    assert_eq!(ends.iter().map(|(p, _)| *p).collect::<Vec<_>>(), vec![0, 1]);
    assert_eq!(ends.iter().map(|(_, end)| end).sum::<i64>(), 30, "{ends:?}");
    for (partition, end) in ends {
        if end == 0 {
            continue;
        }
        let at = probe
            .written_at_ms(partition, 0)
            .unwrap()
            .unwrap_or_else(|| panic!("partition {partition}: no write time for offset 0"));
        assert!(
            (before - 1000..=after + 1000).contains(&at),
            "partition {partition}: written at {at}, posted between {before} and {after}"
        );
    }
}
