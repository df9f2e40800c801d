//! `mcp-meter loadgen` against a real `serve` and a real ClickHouse: it sends what it says it
//! sends, the target stores exactly that, and the summary's counts add up.

mod common;

use common::*;
use std::process::Command;

fn loadgen(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_mcp-meter"))
        .arg("loadgen")
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap()
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
    assert_eq!(batch["requests"], 12);
    assert_eq!(batch["statuses"]["202"], 12);
    for p in ["p50", "p90", "p99", "max"] {
        assert!(batch["latencyMs"][p].as_f64().unwrap() > 0.0, "{batch}");
    }
    let single = loadgen(&[
        "--url", &s.base, "--key", ACME, "--events", "200", "--target", "events", "--seed", "2",
    ]);
    assert_eq!(
        (single["requests"].as_u64(), single["eventsOk"].as_u64()),
        (Some(200), Some(200)),
        "{single}"
    );
    let (_, summary) = s.get("/analytics/mcp/summary", ACME);
    assert_eq!(summary["calls"], 3200);
    // The same seed again: every event is a duplicate, nothing more is stored.
    loadgen(&[
        "--url",
        &s.base,
        "--key",
        ACME,
        "--events",
        "3000",
        "--batch-size",
        "250",
    ]);
    assert_eq!(s.get("/analytics/mcp/summary", ACME).1["calls"], 3200);
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
    let (status, session) = s.get("/analytics/mcp/sessions/fresh-9-39", ACME);
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
