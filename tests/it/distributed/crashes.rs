//! Processes killed and stopped under load: no event answered 202 is lost or doubled.

use super::*;

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

/// The fault test: 100,000 events with 5% repeated keys, some batches posted twice as a retrying
/// client would, through two ingestor processes into two aggregator processes. During the run an
/// aggregator is SIGKILLed five times (and restarted), and the broker is restarted once.
/// Afterwards every count and sum equals the unique events', to the micro-dollar.
#[test]
fn exactly_once_through_aggregator_crashes_and_a_broker_restart() {
    const EVENTS: usize = 100_000;
    const BATCH: usize = 500;
    let mut tansu = Tansu::start();
    let setup = Setup::new("fault", &tansu.brokers(), 4, FAULT_SETTINGS);
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
    let mut panics_seen = 0;
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
                tansu.restart_after_panic(&mut panics_seen);
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
            let deadline = Instant::now() + Duration::from_secs(120);
            while posted.load(Ordering::SeqCst) < batches.len() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(200));
                tansu.restart_after_panic(&mut panics_seen);
            }
            done.store(true, Ordering::SeqCst);
        });
    });
    assert!(done.load(Ordering::SeqCst));
    let post_seconds = started.elapsed().as_secs_f64();

    let count = || stored_rows(&setup) as i64;
    // Then everything the topic holds is dealt with: the count is final, not a count that
    // might still grow.
    // tansu's known panic may come while the aggregators drain, too: it is restarted then.
    let settled = wait_until(Duration::from_secs(180), || {
        tansu.restart_after_panic(&mut panics_seen);
        count() >= unique
    }) && wait_until(Duration::from_secs(30), || {
        tansu.restart_after_panic(&mut panics_seen);
        all_consumed(&setup)
    });
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
    let (clickhouse, mut tansu, setup) = own_services(
        "spaced",
        &format!("{FAULT_SETTINGS}lag_check_interval_ms = 500\nstall_timeout_ms = 10000\n"),
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
    let stored = || stored_rows(&setup);

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
    // When the last chaos step (or broker panic restart) happened.
    let last_fault = Mutex::new(started);
    let mut visible_after_last_fault = None;
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
                    *last_fault.lock().unwrap() = Instant::now();
                }
                if tansu.restart_after_panic(&mut panics_seen) {
                    *last_fault.lock().unwrap() = Instant::now();
                    restarts_for_panic += 1;
                    say("tansu panicked in idempotent_message_check; restarted it again".into());
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
            visible_after_last_fault = Some(last_fault.lock().unwrap().elapsed());
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
by the supervisor; {broker_panics} tansu panics restarted; {found} stored, all of them {} after posting ended \
({} after the last fault)",
        batches.len(),
        retried_posts.load(Ordering::Relaxed),
        match all_stored_after {
            Some(d) => format!("{:.1} s", d.as_secs_f64()),
            None => format!("not within {} s", BOUND.as_secs()),
        },
        visible_after_last_fault.map_or("-".into(), |d| format!("{:.1} s", d.as_secs_f64()))
    );
    if all_stored_after.is_none() || found != EVENTS {
        eprintln!("{}", diagnose(&setup));
    }
    assert_eq!(chaos_done, 6, "every chaos step ran");
    assert!(
        all_stored_after.is_some(),
        "only {found} of {EVENTS} acked events stored"
    );
    assert_stored_once(&setup, EVENTS);
    assert!(
        healthy_at_end,
        "both aggregators answer /healthz 200 with no lag at the end"
    );
}
