//! Events through the pipeline once: ingestor → Kafka → aggregator → ClickHouse, the dead-letter
//! topic for what cannot be stored, and where an aggregator resumes.

use super::*;

#[test]
fn events_flow_from_ingestor_through_kafka_to_clickhouse_once() {
    let setup = Setup::new("flow", &kafka_brokers(), 2, "");
    let aggregator = setup.aggregator();
    let (_ingestor, client) = setup.ingestor();
    // With `occurredAt`, the content is the event's identity, so a retry is recognised.
    let (seed, _) = timed_seed();
    let (status, answer) = client.post("/v1/ingest/events", ACME, &seed);
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["accepted"], 1);
    assert!(wait_until(Duration::from_secs(20), || calls(&client, ACME) == 1));
    let (_, tools) = client.get("/analytics/mcp/revenue/by-tool", ACME);
    assert_eq!(tools["tools"][0]["revenueMicros"], 7550);
    assert_eq!(tools["tools"][0]["cogsMicros"], 1529);

    // A client retry of the same event: the ingestor cannot know, the aggregator drops it.
    let (status, _) = client.post("/v1/ingest/events", ACME, &seed);
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
    assert!(wait_until(Duration::from_secs(20), || all_consumed(&setup)));
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
    assert!(
        metrics.contains("mcp_meter_kafka_producer_rebuilds_total 0\n"),
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

/// A row ClickHouse refuses for good (here: a check of the test's own, a MATERIALIZED column
/// that throws for one tool) is found in a temporary table with the events table's checks,
/// before anything is inserted: the other rows are stored once,
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
    // The floor reaches the topic's end: the refused row is handled.
    assert!(
        wait_until(Duration::from_secs(10), || all_consumed(&setup)),
        "{}",
        diagnose(&setup)
    );
    // One dead letter, not more: the topic's end offset, now that everything is stored.
    assert_eq!(dead_letter_count(&setup), 1, "one dead letter, not more");
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
        wait_until(Duration::from_secs(30), || all_consumed(&setup)),
        "{}",
        stored()
    );
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
    // Each topic's floor is its own end: the floors are per topic.
    assert!(
        all_consumed(&setup) && all_consumed(&other),
        "{}",
        diagnose(&setup)
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
    let end = end_offsets(&setup, &other.config.kafka.events_topic).unwrap()[0].1;
    assert!(
        stderr.contains(&format!(
            "holds offsets up to 100 of partition 0 of topic {}.other, but that topic now ends at offset {end}",
            setup.name
        )) && stderr.contains("Give the new topic a name of its own"),
        "{stderr}"
    );
    assert_eq!(stored(), "28\t28\n");
}
