//! Graceful shutdown of a real `serve` process: SIGTERM under load stops accepting, finishes
//! the requests in flight and the batches queued for the store, then exits; every event that
//! was answered 202 is stored.

use crate::common::distributed::{serve_base, spawn_with_url, wait_until};
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
