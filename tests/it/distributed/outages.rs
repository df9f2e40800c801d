//! A dependency that is not there: the broker, ClickHouse, Redis; what each process answers,
//! logs and recovers.

use super::*;

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
    // Two seconds of an outage: a dozen failed tries at this backoff, and it is still there.
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        aggregator.is_running(),
        "the aggregator waits, it does not fall over"
    );
    setup.sql("ATTACH TABLE mcp_events");
    assert!(wait_until(Duration::from_secs(30), || all_consumed(&setup)));
    // A missing table is the database's state, not the rows' fault: nothing was dead-lettered.
    assert_eq!(
        dead_letter_count(&setup),
        0,
        "rows dead-lettered while the table was away"
    );
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
        // The poster stops however this scope ends: a failed assertion below must fail the
        // test, not leave the scope waiting for the poster for ever.
        let _stop_posting = StopOnDrop(&stop);
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

/// Sets its flag when dropped, a panic's unwinding included.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Rows of the table `paused` in an INSERT larger than the sockets' buffers: sent to a stopped
/// server, it stays on its way.
const PAUSED_ROWS: usize = 400_000;

/// An INSERT whose request times out because ClickHouse is paused is not abandoned: it goes on
/// until the server answers, and the runner's next query waits for that. So the dedup lookup
/// that follows a timed-out write sees all of its rows or none, never a write that lands after
/// it. The INSERT carries about 10 MB, more than the paused server's socket takes, so its
/// request is still being sent when the server resumes (a dropped request would be cut short).
/// A neighbour sharing the runner (the margin guard, analytics) that waits for the insert too
/// and is cancelled while it waits leaves it waited for.
#[test]
fn an_insert_timed_out_by_a_clickhouse_pause_is_answered_before_the_next_query() {
    use backends::store::clickhouse::{HttpRunner, SqlRunner};
    let clickhouse = ClickHouseServer::start();
    let config = schemas::config::ClickHouseConfig {
        url: clickhouse.url().to_string(),
        database: "default".into(),
        request_timeout_ms: 1000,
        ..Default::default()
    };
    let mut insert = String::from("INSERT INTO paused FORMAT TabSeparated\n");
    for i in 0..PAUSED_ROWS {
        insert.push_str(&format!("{i}\tpadding-to-make-the-request-large\n"));
    }
    actix_web::rt::System::new().block_on(async {
        let runner = HttpRunner::new(&config);
        let neighbour = runner.clone();
        runner
            .execute("CREATE TABLE paused (n UInt64, note String) ENGINE = MergeTree ORDER BY n")
            .await
            .unwrap();
        clickhouse.signal("-STOP");
        let timed_out = runner.execute(&insert).await.unwrap_err();
        assert!(timed_out.to_string().contains("timeout"), "{timed_out}");
        let still_waiting = || async {
            let waiting = runner
                .tab_separated("SELECT count() FROM paused")
                .await
                .unwrap_err();
            assert!(
                waiting.to_string().contains("still unanswered"),
                "{waiting}"
            );
        };
        still_waiting().await;
        let cancelled = tokio::time::timeout(
            Duration::from_millis(200),
            neighbour.tab_separated("SELECT 1"),
        )
        .await;
        assert!(cancelled.is_err(), "the neighbour was still waiting");
        still_waiting().await;
        clickhouse.signal("-CONT");
        let started = Instant::now();
        let count = loop {
            match runner.tab_separated("SELECT count() FROM paused").await {
                Ok(count) => break count,
                Err(e) => {
                    assert!(started.elapsed() < Duration::from_secs(60), "{e}");
                    actix_web::rt::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        assert_eq!(
            count.trim(),
            PAUSED_ROWS.to_string(),
            "the first answer after the pause counts every row of the timed-out insert"
        );
    });
}
