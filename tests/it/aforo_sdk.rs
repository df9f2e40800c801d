//! The real Aforo SDK (PyPI `aforo-mcp-metering`) against a running `mcp-meter serve`.
//!
//! Needs the venv `scripts/test` builds; `MCP_METER_TEST_PYTHON` names its interpreter. Without
//! it this test fails rather than skips: a client that was never run proves nothing.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

const KEY: &str = "sdk-test-demo-key";
const CALLS: i64 = 20;

struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the binary on a free port and reads the ingest URL off its banner. Without a config
/// file it runs the demo tenant with key [`KEY`].
fn serve(data_dir: &std::path::Path) -> (Serve, String) {
    serve_with(data_dir, None)
}

fn serve_with(data_dir: &std::path::Path, config: Option<&std::path::Path>) -> (Serve, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_mcp-meter"));
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .env("MCP_METER_DEMO_KEY", KEY)
        .env_remove("MCP_METER_CONFIG");
    if let Some(file) = config {
        command.arg("--config").arg(file);
    }
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start mcp-meter serve");
    let stdout = child.stdout.take().unwrap();
    let mut base = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        if let Some(url) = line
            .trim()
            .strip_prefix("POST ")
            .and_then(|u| u.strip_suffix("/v1/ingest/batch"))
        {
            base = Some(url.to_string());
            break;
        }
    }
    (Serve(child), base.expect("serve printed its ingest URL"))
}

/// Runs a client script of `tests/sdk/` against `base` and answers the JSON it prints.
fn run_client(python: &str, script: &str, base: &str, calls: i64) -> serde_json::Value {
    let script = format!("{}/tests/sdk/{script}", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(python)
        .args([script.as_str(), base, KEY, &calls.to_string()])
        .output()
        .expect("run the SDK client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "client failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap()
}

fn get(base: &str, path: &str) -> serde_json::Value {
    let mut answer = ureq::get(format!("{base}{path}"))
        .header("Authorization", format!("Bearer {KEY}"))
        .call()
        .unwrap();
    answer.body_mut().read_json().unwrap()
}

#[test]
fn the_aforo_python_sdk_meters_calls_that_analytics_then_show() {
    let python = std::env::var("MCP_METER_TEST_PYTHON").expect(
        "MCP_METER_TEST_PYTHON is not set: run scripts/test, which installs aforo-mcp-metering into a venv",
    );
    let dir = tempfile::tempdir().unwrap();
    let (mut server, base) = serve(dir.path());

    let report = run_client(&python, "aforo_client.py", &base, CALLS);
    assert_eq!(report["dropped"], 0, "the SDK dropped events: {report}");
    assert_eq!(report["errors"], serde_json::json!([]), "{report}");

    let tools = get(&base, "/analytics/mcp/revenue/by-tool");
    let tool = |name: &str| {
        tools["tools"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["toolName"] == name)
            .unwrap_or_else(|| panic!("{name} missing from {tools}"))
            .clone()
    };
    // The demo plan: 5000 µUSD a call; the SDK reports no tokens and ~0 ms for these calls.
    let search = tool("sdk_search");
    assert_eq!(search["calls"], CALLS);
    assert_eq!(search["revenueMicros"], CALLS * 5000);
    assert_eq!(search["errors"], 0);
    let flaky = tool("sdk_flaky_tool");
    assert_eq!(
        (flaky["calls"].as_i64(), flaky["errors"].as_i64()),
        (Some(3), Some(3))
    );
    assert_eq!(flaky["revenueMicros"], 3 * 5000);

    // Heartbeats (one at session start, SESSION_END at the end) refreshed the session and were
    // never billed.
    let session = get(&base, "/analytics/mcp/sessions/sdk-session");
    assert_eq!(session["calls"], CALLS + 3);
    assert_eq!(session["ended"], true, "{session}");
    assert_eq!(
        get(&base, "/analytics/mcp/summary")["revenueMicros"],
        (CALLS + 3) * 5000
    );

    // SIGTERM stops it cleanly.
    let status = Command::new("kill")
        .args(["-TERM", &server.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = server.0.wait().unwrap();
    assert!(exit.success(), "serve exited with {exit}");
}

#[test]
fn the_aforo_sdk_hears_the_kill_signal_after_a_session_limit_is_breached() {
    let python = std::env::var("MCP_METER_TEST_PYTHON").expect(
        "MCP_METER_TEST_PYTHON is not set: run scripts/test, which installs aforo-mcp-metering into a venv",
    );
    let dir = tempfile::tempdir().unwrap();
    // Tenant `demo` (the SDK sends it as X-Tenant-Id), three calls per session and hour.
    let config = dir.path().join("limits.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[[tenants]]
id = "demo"
api_keys = [{{ name = "sdk", sha256 = "{}", scopes = ["admin"] }}]
[[tenants.rate_plans]]
version = 1
[tenants.rate_plans.tools."*"]
price = {{ per_call = 5000 }}
[[tenants.limits]]
per = "session"
window = "hour"
max_calls = 3
"#,
            mcp_meter::sha256_hex(KEY)
        ),
    )
    .unwrap();
    let (_server, base) = serve_with(dir.path(), Some(&config));
    let report = run_client(&python, "aforo_kill.py", &base, 5);
    assert_eq!(
        report["killed"],
        serde_json::json!([["sdk-limited", "SERVER_KILL"]]),
        "{report}"
    );
    assert_eq!(
        report["dropped"], 0,
        "the calls past the limit are still accepted: {report}"
    );
    // All five calls are stored and billed.
    assert_eq!(get(&base, "/analytics/mcp/summary")["calls"], 5);
}
