//! Writers paused, frozen and doubled: the store decides what is stored, so no timing of a
//! writer can store an event twice. An aggregator stopped (SIGSTOP) past its group session
//! wakes up with a block in hand; a writer frozen between its key lookup and its INSERT sends
//! that INSERT after another stored the partition; two aggregators in two consumer groups write
//! every partition at once; ClickHouse is paused while the broker is killed. Each test posts
//! its events with keys of its own, retried until answered 202, and checks that every one is
//! stored once with the rollups equal to the raw rows, and how long after the last fault the
//! last one became visible.

use super::*;
use crate::common::distributed::Proc;
use backends::error::StoreError;
use backends::store::clickhouse::{ClickHouseWriter, HttpRunner, SqlRunner};

/// Posts `events` events (keys `{prefix}-{i}`, batches of 200 over three tenants) evenly over
/// `over`, each batch retried with the same keys until answered 202, through `clients` in turn;
/// fails when a batch is still not accepted 120 s after `over` has passed.
fn post(clients: &[Client], prefix: &str, events: usize, over: Duration) {
    let tenants = [ACME, GLOBEX, INITECH];
    let batches: Vec<String> = (0..events)
        .collect::<Vec<_>>()
        .chunks(200)
        .map(|chunk| {
            let events: Vec<Value> = chunk
                .iter()
                .map(|i| {
                    call(
                        &format!("{prefix}-{i}"),
                        &format!("tool_{}", i % 5),
                        &format!("agent_{}", i % 7),
                        &format!("s{}", i % 100),
                    )
                })
                .collect();
            batch(&events)
        })
        .collect();
    let started = Instant::now();
    for (n, body) in batches.iter().enumerate() {
        let due = started + over.mul_f64(n as f64 / batches.len() as f64);
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        let mut attempt = 0;
        let give_up_at = started + over + Duration::from_secs(120);
        while !matches!(
            clients[(n + attempt) % clients.len()].try_post(
                "/v1/ingest/batch",
                tenants[n % 3],
                body
            ),
            Some((202, _))
        ) {
            attempt += 1;
            assert!(
                Instant::now() < give_up_at,
                "batch {n} not accepted after {attempt} attempts, 120 s after posting should have ended"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Two aggregators and two ingestors (with a client each) on `setup`.
fn pipeline(setup: &Setup) -> ([Proc; 2], [Proc; 2], [Client; 2]) {
    let aggregators = [setup.aggregator(), setup.aggregator()];
    let (ingestors, clients) = setup.two_ingestors();
    (aggregators, ingestors, clients)
}

/// Waits up to `bound` for `events` rows, and answers how long after `since` they were all
/// there (`None`: not within the bound).
fn visible_after(
    setup: &Setup,
    events: usize,
    since: Instant,
    bound: Duration,
) -> Option<Duration> {
    wait_until(bound, || stored_rows(setup) >= events).then(|| since.elapsed())
}

/// A runner whose first block insert waits, after the writer's key lookup and before the
/// INSERT reaches the server, until `wake` is sent; `frozen` says that it waits.
struct Frozen {
    inner: HttpRunner,
    gate: tokio::sync::Mutex<
        Option<(
            std::sync::mpsc::Sender<()>,
            tokio::sync::oneshot::Receiver<()>,
        )>,
    >,
}

#[async_trait::async_trait]
impl SqlRunner for Frozen {
    async fn execute(&self, sql: &str) -> Result<(), StoreError> {
        self.inner.execute(sql).await
    }
    async fn tab_separated(&self, sql: &str) -> Result<String, StoreError> {
        self.inner.tab_separated(sql).await
    }
    async fn execute_in_session(&self, statements: &[&str]) -> Result<(), StoreError> {
        if let Some((frozen, wake)) = self.gate.lock().await.take() {
            let _ = frozen.send(());
            let _ = wake.await;
        }
        self.inner.execute_in_session(statements).await
    }
}

/// Under load, each aggregator in turn is stopped (SIGSTOP) for longer than its group session
/// (6 s), so the group gives its partitions to the other, then continued (SIGCONT) with the
/// block it had in hand; at the end both are stopped at once and continued. 0 doubled, 0 lost,
/// rollups equal to the raw rows.
#[test]
fn aggregators_stopped_past_their_group_session_wake_up_without_doubling_a_row() {
    const EVENTS: usize = 30_000;
    const POSTING: Duration = Duration::from_secs(50);
    let tansu = Tansu::start();
    let setup = Setup::new("sigstop", &tansu.brokers(), 4, FAULT_SETTINGS);
    let (aggregators, _ingestors, clients) = pipeline(&setup);
    let started = Instant::now();
    let mut last_fault = started;
    std::thread::scope(|scope| {
        let poster = scope.spawn(|| post(&clients, "sigstop", EVENTS, POSTING));
        // (second, aggregators to stop or continue)
        let plan: [(u64, &str, &[usize]); 6] = [
            (5, "-STOP", &[0]),
            (14, "-CONT", &[0]),
            (18, "-STOP", &[1]),
            (27, "-CONT", &[1]),
            (31, "-STOP", &[0, 1]),
            (40, "-CONT", &[0, 1]),
        ];
        for (at, signal, which) in plan {
            std::thread::sleep(
                (started + Duration::from_secs(at)).saturating_duration_since(Instant::now()),
            );
            eprintln!(
                "[{:5.1} s] kill {signal} aggregator(s) {which:?}",
                started.elapsed().as_secs_f64()
            );
            for i in which {
                aggregators[*i].signal(signal);
            }
            last_fault = Instant::now();
        }
        poster.join().unwrap();
    });
    let posted = Instant::now();
    let visible = visible_after(&setup, EVENTS, last_fault, Duration::from_secs(90));
    eprintln!(
        "sigstop: {EVENTS} events posted over {} s; all visible {} after the last fault ({:.1} s after posting ended)",
        POSTING.as_secs(),
        visible.map_or("not within 90 s".into(), |d| format!("{:.1} s", d.as_secs_f64())),
        posted.elapsed().as_secs_f64()
    );
    assert_stored_once(&setup, EVENTS);
    assert!(visible.is_some(), "{}", diagnose(&setup));
}

/// The targeted pause: writer A (this process, the aggregator's own loop and writer) decides
/// a block's rows and is frozen before its INSERT reaches the server; an aggregator process of
/// another consumer group, which reads every partition too, stores all of it, more included;
/// then A's INSERT goes out, and A goes on. The store refuses A's late block, and what A reads
/// next it finds stored.
#[test]
fn a_writer_frozen_before_its_insert_sends_it_after_another_stored_the_partition() {
    const EVENTS: usize = 2_000;
    let tansu = Tansu::start();
    let setup = Setup::new("frozen", &tansu.brokers(), 2, "");
    let (_ingestor, client) = setup.ingestor();
    post(
        std::slice::from_ref(&client),
        "frozen-a",
        EVENTS,
        Duration::ZERO,
    );
    let (frozen_tx, frozen_rx) = std::sync::mpsc::channel();
    let (wake_tx, wake_rx) = tokio::sync::oneshot::channel();
    let runner = Frozen {
        inner: HttpRunner::new(&setup.config.clickhouse),
        gate: tokio::sync::Mutex::new(Some((frozen_tx, wake_rx))),
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let kafka = setup.config.kafka.clone();
    let a = std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            let mut source = backends::kafka::KafkaSource::new(&kafka).unwrap();
            let mut writer = ClickHouseWriter::for_topic(runner, &kafka.events_topic);
            let config = aggregator::consumer::ConsumerConfig {
                max_batch_rows: 25_000,
                max_batch_wait: Duration::from_millis(100),
                max_retry_backoff: Duration::from_millis(500),
                give_up_after: Duration::from_secs(120),
            };
            let status = aggregator::lag::ConsumerStatus::default();
            aggregator::consumer::run(&mut source, &mut writer, &config, &status, stop_rx).await
        })
    });
    frozen_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("A reaches its first block insert");
    eprintln!("A is frozen before its first INSERT; B (consumer group frozen-b) stores everything");
    let mut b = {
        let (child, _) = spawn_logged(
            &setup,
            &["aggregator"],
            &[
                (
                    "MCP_METER_KAFKA_CONSUMER_GROUP",
                    format!("{}-b", setup.name),
                ),
                ("MCP_METER_AGGREGATOR_LISTEN", "127.0.0.1:0".into()),
            ],
        );
        child
    };
    post(
        std::slice::from_ref(&client),
        "frozen-b",
        EVENTS,
        Duration::ZERO,
    );
    assert!(
        wait_until(Duration::from_secs(60), || all_consumed(&setup)),
        "B stored everything: {}",
        diagnose(&setup)
    );
    assert_stored_once(&setup, 2 * EVENTS);
    let _ = b.kill();
    let _ = b.wait();
    // A's INSERT goes out now, after B stored its block and more.
    let woke = Instant::now();
    wake_tx.send(()).unwrap();
    post(
        std::slice::from_ref(&client),
        "frozen-c",
        EVENTS,
        Duration::ZERO,
    );
    let visible = visible_after(&setup, 3 * EVENTS, woke, Duration::from_secs(60));
    stop_tx.send(true).unwrap();
    let progress = a.join().unwrap().unwrap();
    eprintln!(
        "frozen writer: A sent {} rows ({} found stored already) in {} blocks; {} events visible {:.1} s after A woke",
        progress.rows_written,
        progress.duplicates,
        progress.blocks,
        3 * EVENTS,
        visible.unwrap_or_default().as_secs_f64()
    );
    assert_stored_once(&setup, 3 * EVENTS);
}

/// Two aggregators in two consumer groups: each reads and writes every partition, at once,
/// under load, for the whole run. Every event is stored once.
#[test]
fn two_aggregator_groups_writing_every_partition_at_once_store_each_event_once() {
    const EVENTS: usize = 20_000;
    let tansu = Tansu::start();
    let setup = Setup::new(
        "twogroups",
        &tansu.brokers(),
        4,
        "[aggregator]\nmax_batch_wait_ms = 50\n",
    );
    let _a = setup.aggregator();
    let (mut b, _) = spawn_logged(
        &setup,
        &["aggregator"],
        &[
            (
                "MCP_METER_KAFKA_CONSUMER_GROUP",
                format!("{}-b", setup.name),
            ),
            ("MCP_METER_AGGREGATOR_LISTEN", "127.0.0.1:0".into()),
        ],
    );
    let (_ingestors, clients) = setup.two_ingestors();
    post(&clients, "twogroups", EVENTS, Duration::from_secs(20));
    let posted = Instant::now();
    let visible = visible_after(&setup, EVENTS, posted, Duration::from_secs(60));
    assert!(
        wait_until(Duration::from_secs(30), || all_consumed(&setup)),
        "{}",
        diagnose(&setup)
    );
    let _ = b.kill();
    let _ = b.wait();
    eprintln!(
        "two groups: {EVENTS} events, all visible {:.1} s after posting ended",
        visible.unwrap_or_default().as_secs_f64()
    );
    assert_stored_once(&setup, EVENTS);
}

/// ClickHouse is paused (SIGSTOP) under load, the broker is killed (SIGKILL) while it is
/// paused and started again 4 s later, then ClickHouse continues. Every event answered 202 is stored once, and
/// the visibility delay after the last fault is measured.
#[test]
fn a_clickhouse_pause_across_a_broker_kill_stores_every_event_once() {
    const EVENTS: usize = 20_000;
    let (clickhouse, mut tansu, setup) = own_services("chpause", FAULT_SETTINGS);
    let (_aggregators, _ingestors, clients) = pipeline(&setup);
    let started = Instant::now();
    let say = |what: &str| eprintln!("[{:5.1} s] {what}", started.elapsed().as_secs_f64());
    let mut last_fault = started;
    let mut visible = None;
    let mut panics_seen = 0;
    std::thread::scope(|scope| {
        let poster = scope.spawn(|| post(&clients, "chpause", EVENTS, Duration::from_secs(30)));
        std::thread::sleep(Duration::from_secs(6));
        say("pause clickhouse");
        clickhouse.signal("-STOP");
        std::thread::sleep(Duration::from_secs(6));
        say("kill the broker");
        tansu.crash();
        std::thread::sleep(Duration::from_secs(4));
        say("start the broker again");
        tansu.start_again();
        std::thread::sleep(Duration::from_secs(4));
        say("resume clickhouse");
        clickhouse.signal("-CONT");
        last_fault = Instant::now();
        // Until every event is visible: the broker's own panics restarted (not faults of ours).
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            if tansu.restart_after_panic(&mut panics_seen) {
                say("tansu panicked after its restart; restarted it again");
                last_fault = Instant::now();
            }
            if poster.is_finished() && stored_rows(&setup) >= EVENTS {
                visible = Some(last_fault.elapsed());
                break;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        poster.join().unwrap();
    });
    eprintln!(
        "clickhouse pause across a broker kill: {EVENTS} events, all visible {} after the last fault \
({panics_seen} tansu panics restarted)",
        visible.map_or("not within 120 s".into(), |d: Duration| format!("{:.1} s", d.as_secs_f64()))
    );
    assert_stored_once(&setup, EVENTS);
    assert!(visible.is_some(), "{}", diagnose(&setup));
}

/// The broker paused (SIGSTOP) under load for longer than the delivery timeout, twice. Every
/// idempotent producer with a request in flight then gives up on it and, as librdkafka does
/// for an idempotent producer, bumps its epoch on its own; tansu 0.6.0 does not know the new
/// epoch and refuses (panics on) every produce that carries it. The ingestors' producers and
/// the aggregators' (which append cut markers) must each be replaced by a new one, or ingest
/// answers 503 and blocks wait for their markers for ever. Every event answered 202 is stored
/// once.
#[test]
fn producers_whose_epoch_the_broker_refuses_after_a_pause_are_replaced() {
    const EVENTS: usize = 12_000;
    let mut tansu = Tansu::start();
    let setup = Setup::new("epochs", &tansu.brokers(), 4, FAULT_SETTINGS);
    let (aggregators, _ingestors, clients) = pipeline(&setup);
    let started = Instant::now();
    let say = |what: &str| eprintln!("[{:5.1} s] {what}", started.elapsed().as_secs_f64());
    let mut panics_seen = 0;
    let mut visible = None;
    std::thread::scope(|scope| {
        let poster = scope.spawn(|| post(&clients, "epochs", EVENTS, Duration::from_secs(24)));
        for pause in [4, 12] {
            std::thread::sleep(Duration::from_secs(pause).saturating_sub(started.elapsed()));
            say("pause the broker past the 3 s delivery timeout");
            tansu.signal("-STOP");
            std::thread::sleep(Duration::from_secs(5));
            say("continue the broker");
            tansu.signal("-CONT");
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            if tansu.restart_after_panic(&mut panics_seen) {
                say("tansu refused an epoch it does not know (panicked); restarted it");
            }
            if poster.is_finished() && stored_rows(&setup) >= EVENTS {
                visible = Some(started.elapsed());
                break;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        poster.join().unwrap();
    });
    let rebuilds = |bases: [String; 2]| -> [f64; 2] {
        bases.map(|base| {
            let metrics = Client::new(&base).get_text("/metrics", "").1;
            sample(&metrics, "mcp_meter_kafka_producer_rebuilds_total")
                .expect("the producer rebuilds counter")
        })
    };
    let aggregators_rebuilt = rebuilds(aggregators.each_ref().map(|a| a.metrics_url()));
    eprintln!(
        "producers after broker pauses: {EVENTS} events, {panics_seen} tansu panics on unknown epochs, \
producers replaced: ingestors {:?}, aggregators {aggregators_rebuilt:?}; all visible {}",
        rebuilds(clients.each_ref().map(|c| c.base.clone())),
        visible.map_or("not within 120 s of the last pause".into(), |d| format!(
            "{:.1} s after the start",
            d.as_secs_f64()
        ))
    );
    assert!(visible.is_some(), "{}", diagnose(&setup));
    assert_stored_once(&setup, EVENTS);
    assert!(
        aggregators_rebuilt.iter().sum::<f64>() > 0.0,
        "no aggregator's producer was replaced: the pauses caught no cut marker in flight"
    );
}
