//! A real `serve` process stopped under load. SIGTERM stops accepting, finishes the requests
//! in flight and the batches queued for the store, then exits; every event that was answered
//! 202 is stored. SIGKILL, again and again, lands wherever it lands: in a commit, between
//! commits; every start finds raw rows and rollups that agree.

use crate::common::distributed::{serve_base, spawn_with_url, wait_until, Proc};
use crate::common::*;
use std::process::Command;
use std::time::{Duration, Instant};

/// Starts `serve` on `config` and answers the child and its base URL.
fn spawn_serve(config: &std::path::Path) -> (std::process::Child, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_mcp-meter"));
    command
        .args(["serve", "--config"])
        .arg(config)
        .env("MCP_METER_LOG", "warn");
    spawn_with_url(command, serve_base)
}

#[test]
fn sigterm_under_load_loses_no_event_answered_202() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mcp-meter.toml");
    std::fs::write(&file, config_text(dir.path())).unwrap();
    let (mut child, base) = spawn_serve(&file);
    let client = Client::new(&base);
    assert!(wait_until(Duration::from_secs(10), || client
        .get_text("/healthz", "")
        .0
        == 200));

    let load = Load::start(&base, ACME, 8);
    std::thread::sleep(Duration::from_millis(1500));
    let before_term = load.answered();
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let term_at = Instant::now();
    let status = child.wait().unwrap();
    println!(
        "serve exited {status} {:?} after SIGTERM",
        term_at.elapsed()
    );
    assert!(status.success(), "serve exits cleanly on SIGTERM: {status}");
    let (answered, refused) = load.stop();
    assert!(
        before_term > 1000,
        "the server was under load when signalled"
    );

    // Start it again on the same data: every event answered 202 is there, and nothing else.
    let (mut again, base) = spawn_serve(&file);
    let client = Client::new(&base);
    assert!(wait_until(Duration::from_secs(10), || client
        .get_text("/healthz", "")
        .0
        == 200));
    let (_, summary) = client.get("/analytics/mcp/summary", ACME);
    let stored = summary["calls"].as_u64().unwrap();
    println!(
        "{answered} events answered 202 before exit, {stored} stored, {refused} requests refused or cut off"
    );
    assert_eq!(stored, answered, "every event answered 202 is stored");
    let _ = Command::new("kill")
        .args(["-TERM", &again.id().to_string()])
        .status();
    assert!(again.wait().unwrap().success());
}

/// `serve` SIGKILLed under load eight times, at seeded random moments, each time started again
/// on the same data. At the end every event answered 202 is stored, once, and each rollup table
/// adds up to exactly what the raw rows do. `MCP_METER_TEST_KILL_SEED` replays a seed.
#[test]
fn rollups_equal_the_raw_rows_after_serve_is_killed_again_and_again_under_load() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;
    let seed = schemas::search::env_number(
        "MCP_METER_TEST_KILL_SEED",
        chrono::Utc::now().timestamp() as u64,
    );
    println!("seed {seed} (MCP_METER_TEST_KILL_SEED={seed})");
    let mut next = xorshift(seed | 1);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mcp-meter.toml");
    std::fs::write(&file, config_text(dir.path())).unwrap();
    let db = || rusqlite::Connection::open(dir.path().join("mcp-meter.sqlite")).unwrap();
    let acked: Mutex<Vec<String>> = Mutex::new(Vec::new());
    for round in 0..8 {
        let (child, base) = spawn_serve(&file);
        let mut serve = Proc::of(child, "serve");
        let stop = AtomicBool::new(false);
        let uptime = Duration::from_millis(300 + next() % 900);
        std::thread::scope(|scope| {
            for poster in 0..4 {
                let (base, stop, acked) = (&base, &stop, &acked);
                scope.spawn(move || {
                    let client = Client::new(base);
                    let mut n = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let keys: Vec<String> = (0..100)
                            .map(|i| format!("r{round}-p{poster}-{n}-{i}"))
                            .collect();
                        let events: Vec<serde_json::Value> = keys
                            .iter()
                            .enumerate()
                            .map(|(i, key)| {
                                call(
                                    key,
                                    &format!("tool_{}", i % 7),
                                    &format!("agent_{}", (n + i) % 11),
                                    &format!("s{}-{}", poster, (n * 100 + i) % 37),
                                )
                            })
                            .collect();
                        n += 1;
                        match client.try_post("/v1/ingest/batch", ACME, &batch(&events)) {
                            Some((202, _)) => acked.lock().unwrap().extend(keys),
                            // Cut off by the kill: a client would retry; this one stops.
                            _ => break,
                        }
                    }
                });
            }
            std::thread::sleep(uptime);
            serve.crash();
            stop.store(true, Ordering::Relaxed);
        });
    }
    // A last start, and SIGTERM to stop it cleanly (killed on drop if the test fails first).
    let (child, base) = spawn_serve(&file);
    let mut last = Proc::of(child, "serve");
    let (_, summary) = Client::new(&base).get("/analytics/mcp/summary", ACME);
    assert!(last.terminate().success());

    let acked = acked.into_inner().unwrap();
    let conn = db();
    let one = |sql: &str| -> i64 { conn.query_row(sql, [], |r| r.get(0)).unwrap() };
    println!(
        "{} events answered 202 over 8 kills, {} stored",
        acked.len(),
        one("SELECT count(*) FROM mcp_events")
    );
    assert!(
        acked.len() >= 8 * 100,
        "events were answered 202 between the kills"
    );
    let mut missing = 0;
    {
        let mut stored = conn
            .prepare("SELECT 1 FROM mcp_events WHERE tenant_id = 'acme' AND idempotency_key = ?1")
            .unwrap();
        for key in &acked {
            missing += usize::from(!stored.exists([key]).unwrap());
        }
    }
    assert_eq!(missing, 0, "events answered 202 and not stored");
    let raw_calls = one("SELECT count(*) FROM mcp_events");
    let raw_revenue = one("SELECT sum(revenue_micros) FROM mcp_events");
    assert_eq!(
        summary["calls"].as_i64(),
        Some(raw_calls),
        "summary after the last kill"
    );
    for (table, calls, revenue) in [
        ("mcp_daily_stats", "sum(calls)", "sum(revenue_micros)"),
        ("mcp_hourly_stats", "sum(calls)", "sum(revenue_micros)"),
        ("mcp_session_summary", "sum(calls)", "sum(revenue_micros)"),
    ] {
        assert_eq!(
            (
                one(&format!("SELECT {calls} FROM {table}")),
                one(&format!("SELECT {revenue} FROM {table}"))
            ),
            (raw_calls, raw_revenue),
            "{table} against the raw rows"
        );
    }
    assert_eq!(
        one("SELECT count(*) FROM mcp_daily_sessions"),
        one("SELECT count(*) FROM (SELECT DISTINCT substr(datetime(occurred_at_ms / 1000, 'unixepoch'), 1, 10),
                customer_id, agent_id, tool_name, session_id FROM mcp_events)"),
        "mcp_daily_sessions against the raw rows"
    );
}
