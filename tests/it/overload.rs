//! Overload: far more concurrent ingest requests than `serve` can commit. It answers 429 or 503
//! with Retry-After for what it cannot take, stores exactly what it answered 202, and its peak
//! memory stays bounded (read from the kernel: VmHWM of the real process).

use crate::common::distributed::{serve_base, spawn_with_url, wait_until};
use crate::common::*;
use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Peak resident memory of process `pid` so far, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/<pid>/status")
}

#[test]
fn under_overload_serve_sheds_with_retry_after_loses_nothing_and_stays_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mcp-meter.toml");
    // Few permits and a short commit queue, so that 200 clients overload it.
    let text = format!(
        "{}\n[ingest]\nmax_in_flight_requests = 32\n\n[sqlite]\nqueue_capacity_batches = 8\n",
        config_text(dir.path())
    );
    std::fs::write(&file, &text).unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_mcp-meter"));
    command
        .args(["serve", "--config"])
        .arg(&file)
        .env("MCP_METER_LOG", "error");
    let (mut child, base) = spawn_with_url(command, serve_base);
    let pid = child.id();
    let client = Client::new(&base);
    assert!(wait_until(Duration::from_secs(10), || client
        .get_text("/healthz", "")
        .0
        == 200));
    let idle_kib = peak_rss_kib(pid);

    // 200 clients, each pushing batches of 200 events (about 60 KB) back to back for 6 s.
    let stop = AtomicBool::new(false);
    let answered = AtomicU64::new(0);
    let statuses: Mutex<BTreeMap<u16, u64>> = Mutex::new(BTreeMap::new());
    let missing_retry_after = AtomicU64::new(0);
    std::thread::scope(|scope| {
        for t in 0..200 {
            let (stop, answered, statuses, missing) =
                (&stop, &answered, &statuses, &missing_retry_after);
            let base = base.clone();
            scope.spawn(move || {
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .timeout_global(Some(Duration::from_secs(30)))
                    .build()
                    .into();
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    let events: Vec<_> = (0..200)
                        .map(|i| {
                            call(
                                &format!("o{t}-{n}-{i}"),
                                "web_search",
                                "agent",
                                &format!("s{t}"),
                            )
                        })
                        .collect();
                    n += 1;
                    let Ok(mut answer) = agent
                        .post(format!("{base}/v1/ingest/batch"))
                        .header("X-API-Key", ACME)
                        .header("Content-Type", "application/json")
                        .send(batch(&events).as_bytes())
                    else {
                        *statuses.lock().unwrap().entry(0).or_default() += 1;
                        continue;
                    };
                    let status = answer.status().as_u16();
                    *statuses.lock().unwrap().entry(status).or_default() += 1;
                    if status == 202 {
                        let body: serde_json::Value =
                            serde_json::from_str(&answer.body_mut().read_to_string().unwrap())
                                .unwrap();
                        answered.fetch_add(body["accepted"].as_u64().unwrap(), Ordering::Relaxed);
                    } else if answer.headers().get("retry-after").is_none() {
                        missing.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
        std::thread::sleep(Duration::from_secs(6));
        stop.store(true, Ordering::Relaxed);
    });
    let peak_kib = peak_rss_kib(pid);
    let statuses = statuses.into_inner().unwrap();
    let answered = answered.into_inner();
    let shed: u64 = statuses
        .iter()
        .filter(|(s, _)| **s == 429 || **s == 503)
        .map(|(_, n)| n)
        .sum();
    println!(
        "statuses {statuses:?}; {answered} events answered 202; peak RSS {} MiB (idle {} MiB)",
        peak_kib / 1024,
        idle_kib / 1024
    );
    assert!(
        statuses.keys().all(|s| [202, 429, 503].contains(s)),
        "only 202, 429 or 503 (0 = no answer): {statuses:?}"
    );
    assert!(
        shed > 0,
        "the load exceeded what the server takes: {statuses:?}"
    );
    assert_eq!(
        missing_retry_after.into_inner(),
        0,
        "every 429 and 503 carries Retry-After"
    );
    assert!(peak_kib < 400 * 1024, "peak RSS {} MiB", peak_kib / 1024);

    let (_, summary) = client.get("/analytics/mcp/summary", ACME);
    assert_eq!(
        summary["calls"].as_u64().unwrap(),
        answered,
        "exactly what was answered 202 is stored"
    );
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    assert!(child.wait().unwrap().success());
}
