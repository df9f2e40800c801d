//! Per-key rate limits through the real `serve`: a key's burst, then 429 with Retry-After and a
//! message saying when to come back; other keys and tenants are not affected.

use crate::common::*;
use mcp_meter::sha256_hex;
use schemas::config::Config;

const LIMITED: &str = "test-key-acme-limited";

fn serve() -> Server {
    let dir = tempfile::tempdir().unwrap();
    // A fourth tenant whose SDK key may send 3 requests at once, then one every 2 s.
    let text = format!(
        "{}\n[[tenants]]\nid = \"umbrella\"\n[[tenants.api_keys]]\nname = \"sdk\"\nsha256 = \"{}\"\n\
scopes = [\"ingest\", \"read\"]\nrate_limit = {{ requests_per_second = 0.5, burst = 3 }}\n\
[[tenants.rate_plans]]\nversion = 1\n[tenants.rate_plans.tools.\"*\"]\nprice = {{ per_call = 1 }}\n",
        config_text(dir.path()),
        sha256_hex(LIMITED)
    );
    let config = Config::from_toml(&text).unwrap();
    config.validate().unwrap();
    Server::start_in(dir, config)
}

#[test]
fn a_key_gets_its_burst_then_429_with_retry_after() {
    let s = serve();
    let mut statuses = Vec::new();
    for n in 0..3 {
        let (status, answer) = s.post(
            "/v1/ingest/events",
            LIMITED,
            &call(&format!("r{n}"), "t", "a", "s").to_string(),
        );
        assert_eq!(answer["accepted"], 1, "{answer}");
        statuses.push(status);
    }
    assert_eq!(statuses, [202, 202, 202]);
    let answer = ureq::post(format!("{}/v1/ingest/events", s.base))
        .header("X-API-Key", LIMITED)
        .header("Content-Type", "application/json")
        .config()
        .http_status_as_error(false)
        .build()
        .send(call("r3", "t", "a", "s").to_string())
        .unwrap();
    assert_eq!(answer.status(), 429);
    let retry: u64 = answer.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (1..=2).contains(&retry),
        "a token is back within 2 s: {retry}"
    );
    let body: serde_json::Value =
        serde_json::from_str(&answer.into_body().read_to_string().unwrap()).unwrap();
    assert_eq!(body["error"], "rate_limited");
    assert!(
        body["message"].as_str().unwrap().starts_with(
            "this API key is over its rate limit of 0.5 requests per second (burst 3); retry after"
        ),
        "{body}"
    );
    // Reads with the same key share its bucket; other keys and tenants do not.
    assert_eq!(s.get("/analytics/mcp/summary", LIMITED).0, 429);
    for _ in 0..5 {
        assert_eq!(
            s.post(
                "/v1/ingest/events",
                ACME,
                &call("x", "t", "a", "s").to_string()
            )
            .0,
            202
        );
    }
    // The refused request stored nothing: 3 calls.
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let (status, summary) = s.get("/analytics/mcp/summary", LIMITED);
    assert_eq!(status, 200, "a token came back after Retry-After");
    assert_eq!(summary["calls"], 3);
}

#[test]
fn a_rate_limit_must_be_positive() {
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(dir.path()).replacen(
        "scopes = [\"admin\"] }",
        "scopes = [\"admin\"], rate_limit = { requests_per_second = 0, burst = 0 } }",
        1,
    );
    let err = Config::from_toml(&text).unwrap().validate().unwrap_err();
    assert!(
        err.to_string()
            .contains("rate_limit needs requests_per_second above 0"),
        "{err}"
    );
}
