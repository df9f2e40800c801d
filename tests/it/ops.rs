//! What operators read: `/metrics` in Prometheus text format counting what happened, and JSON
//! logs with `--log-format json`.

use crate::common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};

#[test]
fn metrics_count_ingest_outcomes_requests_and_commits() {
    // nextest runs each test in a process of its own, so the counters start at zero here.
    let s = Server::start();
    let bad = json!({"metricName": "mcp_server.tool_invocations", "toolName": "t", "quantity": -1});
    let events = [call("m1", "t", "a", "s"), call("m2", "t", "a", "s"), bad];
    for _ in 0..2 {
        let (status, _) = s.post("/v1/ingest/batch", ACME, &batch(&events));
        assert_eq!(status, 202);
    }
    let (status, _) = s.post("/v1/ingest/batch", ACME, "{");
    assert_eq!(status, 400);
    let (status, _) = s.get("/analytics/mcp/summary", ACME);
    assert_eq!(status, 200);

    let (status, metrics) = s.get_text("/metrics", "");
    assert_eq!(status, 200);
    let at = |series: &str| {
        sample(&metrics, series).unwrap_or_else(|| panic!("no {series} in:\n{metrics}"))
    };
    assert_eq!(
        at("mcp_meter_ingest_events_total{outcome=\"accepted\"}"),
        2.0
    );
    assert_eq!(
        at("mcp_meter_ingest_events_total{outcome=\"duplicate\"}"),
        2.0
    );
    assert_eq!(at("mcp_meter_ingest_events_total{outcome=\"failed\"}"), 2.0);
    assert_eq!(
        at("mcp_meter_http_requests_total{route=\"/v1/ingest/batch\",status=\"202\"}"),
        2.0
    );
    assert_eq!(
        at("mcp_meter_http_requests_total{route=\"/v1/ingest/batch\",status=\"400\"}"),
        1.0
    );
    assert_eq!(
        at("mcp_meter_http_requests_total{route=\"/analytics/mcp/summary\",status=\"200\"}"),
        1.0
    );
    assert_eq!(
        at("mcp_meter_http_request_duration_seconds_count{route=\"/v1/ingest/batch\"}"),
        3.0
    );
    assert_eq!(
        at("mcp_meter_http_request_duration_seconds_bucket{route=\"/v1/ingest/batch\",le=\"+Inf\"}"),
        3.0
    );
    assert!(at("mcp_meter_store_commit_duration_seconds_count") >= 1.0);
    assert_eq!(at("mcp_meter_store_commit_failures_total"), 0.0);
    for level in ["OK", "L1_WARN", "L2_THROTTLE", "L3_BLOCK"] {
        at(&format!("mcp_meter_guard_subjects{{level=\"{level}\"}}"));
    }
    // Every family has HELP and TYPE, and no line names a tenant.
    for family in [
        "mcp_meter_ingest_events_total counter",
        "mcp_meter_http_request_duration_seconds histogram",
        "mcp_meter_store_commit_duration_seconds histogram",
        "mcp_meter_guard_subjects gauge",
    ] {
        assert!(metrics.contains(&format!("# TYPE {family}\n")), "{family}");
    }
    // Only the families of what `serve` runs: no Kafka producer, no aggregator consumer.
    for absent in ["mcp_meter_kafka_", "mcp_meter_aggregator_"] {
        assert!(
            !metrics.contains(absent),
            "serve lists {absent}… families it never updates"
        );
    }
    assert!(!metrics.contains("acme"), "no tenant ids in metrics");
    println!("{metrics}");
}

#[test]
fn log_format_json_writes_one_json_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mcp-meter"))
        .args([
            "--log-format",
            "json",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--demo-key",
            "k",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .env_remove("MCP_METER_CONFIG")
        .env("MCP_METER_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut banner = String::new();
    stdout.read_line(&mut banner).unwrap();
    assert!(banner.starts_with("mcp-meter serve"), "{banner}");
    // SIGTERM once the server answers (its signal handlers are installed by then).
    let mut urls = String::new();
    stdout.read_line(&mut urls).unwrap();
    let base = urls
        .split_whitespace()
        .nth(1)
        .unwrap()
        .trim_end_matches("/v1/ingest/batch");
    let client = Client::new(base);
    assert!(crate::common::distributed::wait_until(
        std::time::Duration::from_secs(10),
        || { client.get_text("/healthz", "").0 == 200 }
    ));
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let mut logs = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut logs)
        .unwrap();
    assert!(child.wait().unwrap().success());
    let lines: Vec<Value> = logs
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.len() >= 2, "{logs}");
    assert!(
        lines
            .iter()
            .all(|l| l["level"].is_string() && l["timestamp"].is_string()),
        "{logs}"
    );
    assert!(lines.iter().any(|l| l["message"].is_string()), "{logs}");
}
