//! `mcp-meter loadgen` against a real `serve` and a real ClickHouse: it sends what it says it
//! sends, the target stores exactly that, and the summary's counts add up.

use crate::common::*;
use std::process::Command;

/// `mcp-meter loadgen ARGS`: whether it exited 0, its stdout and its stderr.
fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mcp-meter"))
        .arg("loadgen")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A run that must succeed, and its JSON summary.
fn loadgen(args: &[&str]) -> serde_json::Value {
    let (ok, stdout, stderr) = run(&[args, &["--json"]].concat());
    assert!(ok, "{stderr}");
    serde_json::from_str(stdout.trim()).unwrap()
}

#[test]
fn loadgen_batches_and_single_events_land_in_serve_exactly() {
    let s = Server::start();
    let batch = loadgen(&[
        "--url",
        &s.base,
        "--key",
        ACME,
        "--events",
        "3000",
        "--batch-size",
        "250",
        "--concurrency",
        "3",
    ]);
    assert_eq!(batch["eventsOk"], 3000, "{batch}");
    assert_eq!(
        (batch["accepted"].as_u64(), batch["duplicates"].as_u64()),
        (Some(3000), Some(0)),
        "{batch}"
    );
    assert_eq!(batch["requests"], 12);
    assert_eq!(batch["statuses"]["202"], 12);
    for p in ["p50", "p90", "p99", "max"] {
        assert!(batch["latencyMs"][p].as_f64().unwrap() > 0.0, "{batch}");
    }
    let single = loadgen(&[
        "--url", &s.base, "--key", ACME, "--events", "200", "--target", "events", "--seed", "2",
    ]);
    assert_eq!(
        (single["requests"].as_u64(), single["accepted"].as_u64()),
        (Some(200), Some(200)),
        "{single}"
    );
    let (_, summary) = s.get("/analytics/mcp/summary", ACME);
    assert_eq!(summary["calls"], 3200);
    // Without --seed each run picks a fresh one: another 3000 events are stored.
    let again = loadgen(&[
        "--url",
        &s.base,
        "--key",
        ACME,
        "--events",
        "3000",
        "--batch-size",
        "250",
    ]);
    assert_ne!(again["seed"], batch["seed"], "{again}");
    assert_eq!(again["accepted"], 3000, "{again}");
    assert_eq!(s.get("/analytics/mcp/summary", ACME).1["calls"], 6200);
    // The first run's seed again: every event is a duplicate, nothing more is stored, and the
    // text summary says so rather than "3000 events accepted".
    let seed = batch["seed"].to_string();
    let (ok, text, stderr) = run(&[
        "--url",
        &s.base,
        "--key",
        ACME,
        "--events",
        "3000",
        "--batch-size",
        "250",
        "--seed",
        &seed,
    ]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains(&format!("seed {seed}")), "{stderr}");
    assert!(
        text.contains("stored now: 0; duplicates (already stored): 3000"),
        "{text}"
    );
    assert!(
        text.contains("warning: 3000 of 3000 events were duplicates"),
        "{text}"
    );
    assert!(
        text.contains("3 workers") || text.contains("8 workers"),
        "{text}"
    );
    assert_eq!(s.get("/analytics/mcp/summary", ACME).1["calls"], 6200);
}

/// `--target healthz`: one bare `GET /healthz` per event, no key, nothing stored.
#[test]
fn loadgen_healthz_sends_one_bare_request_per_event() {
    let s = Server::start();
    let bare = loadgen(&[
        "--url",
        &s.base,
        "--target",
        "healthz",
        "--events",
        "300",
        "--concurrency",
        "4",
    ]);
    assert_eq!(
        (bare["requests"].as_u64(), bare["statuses"]["200"].as_u64()),
        (Some(300), Some(300)),
        "{bare}"
    );
    assert!(bare["requestsPerSecond"].as_f64().unwrap() > 0.0, "{bare}");
    let (_, summary) = s.get("/analytics/mcp/summary", ACME);
    assert_eq!(summary["calls"], 0, "a health check stores nothing");
}

#[test]
fn loadgen_exits_non_zero_and_says_why_when_every_request_fails() {
    let s = Server::start();
    let (ok, text, stderr) = run(&[
        "--url",
        &s.base,
        "--key",
        "mcpm_wrong",
        "--events",
        "20",
        "--concurrency",
        "1",
    ]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("target batch: 1 worker, 100 events per request"),
        "{text}"
    );
    assert!(
        stderr.contains("every request failed (401 x1)") && stderr.contains("--key"),
        "{stderr}"
    );
    // Nothing listens on port 1.
    let (ok, _, stderr) = run(&[
        "--url",
        "http://127.0.0.1:1",
        "--key",
        ACME,
        "--events",
        "5",
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("nothing answered at http://127.0.0.1:1"),
        "{stderr}"
    );
}

/// A freshness run whose events were all stored before (another run with the same seed)
/// cannot see its probes: each times out, is counted as a miss, and the run fails saying so.
#[test]
fn loadgen_freshness_probes_that_never_appear_time_out_as_misses() {
    let s = Server::start();
    loadgen(&[
        "--url", &s.base, "--key", ACME, "--events", "3", "--seed", "77",
    ]);
    let started = std::time::Instant::now();
    let (ok, text, stderr) = run(&[
        "--url",
        &s.base,
        "--key",
        ACME,
        "--target",
        "freshness",
        "--events",
        "3",
        "--seed",
        "77",
        "--probe-timeout-seconds",
        "1",
        "--json",
    ]);
    assert!(!ok, "{text}");
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
    let summary: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(summary["probeMisses"], 3, "{summary}");
    assert_eq!(summary["duplicates"], 3, "{summary}");
    assert!(
        stderr.contains("no freshness probe became visible"),
        "{stderr}"
    );
}

/// Freshness probes each find their own session once stored: every probe ends on a 200, and
/// each left exactly one call behind in a session of its own.
#[test]
fn loadgen_freshness_probes_find_their_own_session() {
    let s = Server::start();
    let fresh = loadgen(&[
        "--url",
        &s.base,
        "--key",
        ACME,
        "--target",
        "freshness",
        "--events",
        "40",
        "--concurrency",
        "4",
        "--seed",
        "9",
    ]);
    assert_eq!(fresh["target"], "freshness", "{fresh}");
    assert_eq!(fresh["statuses"]["200"], 40, "{fresh}");
    assert!(fresh["latencyMs"]["max"].as_f64().unwrap() > 0.0, "{fresh}");
    let (status, session) = s.get("/analytics/mcp/sessions/loadgen-fresh-9-39", ACME);
    assert_eq!(status, 200, "{session}");
    assert_eq!(session["calls"], 1, "{session}");
    assert_eq!(s.get("/analytics/mcp/summary", ACME).1["calls"], 40);
}

#[test]
fn loadgen_writes_the_same_events_straight_into_clickhouse() {
    let url = clickhouse_url();
    let database = unique_database("loadgen");
    let sql = |q: &str| {
        ureq::post(format!("{url}/"))
            .send(q)
            .unwrap()
            .body_mut()
            .read_to_string()
            .unwrap()
    };
    sql(&format!("CREATE DATABASE {database}"));
    let table = format!("{database}.events");
    let summary = loadgen(&[
        "--target",
        "clickhouse",
        "--clickhouse-url",
        &url,
        "--clickhouse-table",
        &table,
        "--events",
        "5000",
        "--batch-size",
        "1000",
    ]);
    assert_eq!(summary["eventsOk"], 5000, "{summary}");
    assert_eq!(summary["statuses"]["200"], 5);
    assert_eq!(
        sql(&format!(
            "SELECT count(), uniqExact(idempotency_key), sum(input_tokens) > 0 FROM {table}"
        )),
        "5000\t5000\t1\n"
    );
    sql(&format!("DROP DATABASE {database}"));
}
