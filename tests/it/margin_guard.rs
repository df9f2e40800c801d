//! The margin guard and `GET /v1/guard/check` through the real `serve` (in-memory guard state):
//! levels follow the margin as COGS rises and as revenue recovers, and a killed session is
//! blocked whatever its margins.

use crate::common::distributed::wait_until;
use crate::common::*;
use mcp_meter::sha256_hex;
use schemas::config::Config;
use serde_json::{json, Value};
use std::time::Duration;

const HOOLI: &str = "test-key-hooli-admin";
/// What an SDK or a proxy holds: ingest only.
const HOOLI_SDK: &str = "test-key-hooli-sdk";
/// Ingest and read: sees the figures.
const HOOLI_OPS: &str = "test-key-hooli-ops";

/// `serve` recomputing levels every second, with tenant `hooli`: a call to any tool is priced
/// 1000 µUSD (`cheap`: 200) plus 1 per output token, and costs 1 µUSD per input token, so a
/// test moves the margin where it wants with token counts.
fn serve() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        r#"{base}
[margin_guard]
interval_seconds = 1
window_days = 2

[[tenants]]
id = "hooli"
api_keys = [
  {{ name = "admin", sha256 = "{key}", scopes = ["admin"] }},
  {{ name = "sdk", sha256 = "{sdk}", scopes = ["ingest"] }},
  {{ name = "ops", sha256 = "{ops}", scopes = ["ingest", "read"] }},
]
[[tenants.limits]]
per = "session"
window = "hour"
max_calls = 2
[[tenants.rate_plans]]
version = 1
[tenants.rate_plans.tools."*"]
price = {{ per_call = 1000, per_output_token = 1 }}
cost = {{ per_input_token = 1 }}
[tenants.rate_plans.tools.cheap]
price = {{ per_call = 200, per_output_token = 1 }}
cost = {{ per_input_token = 1 }}
"#,
        base = config_text(dir.path()),
        key = sha256_hex(HOOLI),
        sdk = sha256_hex(HOOLI_SDK),
        ops = sha256_hex(HOOLI_OPS),
    );
    let config = Config::from_toml(&text).unwrap();
    config.validate().unwrap();
    Server::start_in(dir, config)
}

fn post_call(
    s: &Server,
    key: &str,
    tool: &str,
    agent: &str,
    session: &str,
    input: i64,
    output: i64,
) {
    let event = json!({
        "idempotencyKey": key,
        "metricName": "mcp_server.tool_invocations",
        "toolName": tool,
        "agentId": agent,
        "sessionId": session,
        "executionDurationMs": 10,
        "metadata": {"inputTokens": input, "outputTokens": output},
    });
    let (status, answer) = s.post("/v1/ingest/events", HOOLI, &event.to_string());
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["accepted"], 1, "{answer}");
}

/// Polls the check until its level is `level`, computed from `revenue` µUSD of `subject`
/// (`agent` or `tool`): the guard recomputes every second.
fn wait_for_level(s: &Server, query: &str, level: &str, subject: &str, revenue: i64) -> Value {
    let mut last = Value::Null;
    let reached = wait_until(Duration::from_secs(15), || {
        let (status, answer) = s.get(&format!("/v1/guard/check?{query}"), HOOLI);
        assert_eq!(status, 200, "{answer}");
        last = answer;
        last["level"] == level && last[subject]["revenueMicros"] == revenue
    });
    assert!(
        reached,
        "{query} never reached {level} at revenue {revenue}; last answer {last}"
    );
    last
}

#[test]
fn levels_follow_the_margin_down_as_cogs_rises_and_back_up_as_revenue_recovers() {
    let s = serve();
    // (tool, input tokens, output tokens) of each call, and the agent's level after it, with
    // its cumulative revenue and COGS.
    let steps: [(&str, i64, i64, &str, i64, i64); 7] = [
        ("search", 0, 0, "OK", 1000, 0),                // 100%
        ("search", 1700, 0, "L1_WARN", 2000, 1700),     // 15%
        ("search", 1200, 0, "L2_THROTTLE", 3000, 2900), // 3.3%
        ("search", 1200, 0, "L3_BLOCK", 4000, 4100),    // -2.5%
        ("cheap", 0, 0, "L2_THROTTLE", 4200, 4100),     // 2.4%
        ("cheap", 0, 500, "L1_WARN", 4900, 4100),       // 16.3%
        ("search", 0, 1000, "OK", 6900, 4100),          // 40.6%
    ];
    let mut seen = Vec::new();
    for (n, (tool, input, output, level, revenue, cogs)) in steps.into_iter().enumerate() {
        post_call(
            &s,
            &format!("m{n}"),
            tool,
            "agent-1",
            &format!("s{n}"),
            input,
            output,
        );
        let answer = wait_for_level(&s, "agentId=agent-1", level, "agent", revenue);
        assert_eq!(answer["agent"]["cogsMicros"], cogs, "{answer}");
        assert_eq!(answer["agent"]["windowDays"], 2);
        let action = match level {
            "L2_THROTTLE" => "throttle",
            "L3_BLOCK" => "block",
            _ => "allow",
        };
        assert_eq!(answer["action"], action, "{answer}");
        assert_eq!(
            answer["retryAfterSeconds"],
            if action == "allow" { 0 } else { 1 },
            "{answer}"
        );
        assert_eq!(answer["degraded"], false);
        if level == "L3_BLOCK" {
            assert_eq!(answer["margin"], -0.025);
            assert!(
                answer["reason"]
                    .as_str()
                    .unwrap()
                    .starts_with("L3_BLOCK: agent `agent-1`: margin -2.50% over the last 2 day(s)"),
                "{answer}"
            );
            // The tool has the same figures at this point, and is judged on its own.
            let tool = wait_for_level(&s, "toolName=search", "L3_BLOCK", "tool", 4000);
            assert_eq!(tool["agent"], Value::Null);
        }
        seen.push(level);
    }
    assert_eq!(
        seen,
        [
            "OK",
            "L1_WARN",
            "L2_THROTTLE",
            "L3_BLOCK",
            "L2_THROTTLE",
            "L1_WARN",
            "OK"
        ]
    );
    // Levels are per tool too: `cheap` has revenue and no cost.
    let cheap = wait_for_level(&s, "agentId=agent-1&toolName=cheap", "OK", "tool", 900);
    assert_eq!(cheap["agent"]["revenueMicros"], 6900);
    // Another tenant knows nothing of hooli's agent.
    let (_, other) = s.get("/v1/guard/check?agentId=agent-1&toolName=search", ACME);
    assert_eq!(other["level"], "OK");
    assert_eq!(other["agent"], Value::Null);
    assert_eq!(
        other["reason"],
        "no margin figures for this agent or tool yet"
    );
}

/// Fails when `body` carries a cost figure of the operator's: a margin, revenue or COGS field or
/// word, an amount in µUSD or a percentage. "margin guard" names the mechanism, not a figure.
fn assert_no_cost_figures(body: &str) {
    let text = body.to_lowercase().replace("margin guard", "");
    for figure in ["margin", "revenue", "cogs", "µusd", "%"] {
        assert!(
            !text.contains(figure),
            "`{figure}` in an answer to an ingest-only key: {body}"
        );
    }
}

#[test]
fn an_ingest_only_key_gets_the_decision_without_any_cost_figure() {
    let s = serve();
    // 1000 µUSD of revenue against 950 of COGS: a 5% margin, throttled.
    let event = json!({
        "idempotencyKey": "thin-1",
        "metricName": "mcp_server.tool_invocations",
        "toolName": "search",
        "agentId": "agent-9",
        "sessionId": "s9",
        "metadata": {"inputTokens": 950, "outputTokens": 0},
    });
    let (status, ingested) = s.post("/v1/ingest/events", HOOLI_SDK, &event.to_string());
    assert_eq!(status, 202, "{ingested}");
    assert_no_cost_figures(&ingested.to_string());
    let query = "agentId=agent-9&toolName=search&sessionId=s9";
    wait_for_level(&s, query, "L2_THROTTLE", "tool", 1000);

    let (status, body) = s.get_text(&format!("/v1/guard/check?{query}"), HOOLI_SDK);
    assert_eq!(status, 200, "{body}");
    assert_no_cost_figures(&body);
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["level"], "L2_THROTTLE", "{answer}");
    assert_eq!(answer["action"], "throttle");
    assert_eq!(answer["retryAfterSeconds"], 1);
    assert_eq!(answer["degraded"], false);
    assert_eq!(answer["sessionKilled"], false);
    assert_eq!(
        answer["reason"],
        "L2_THROTTLE: tool `search` is throttled by the operator's margin guard"
    );

    // A key with `read` keeps the figures.
    let (status, answer) = s.get(&format!("/v1/guard/check?{query}"), HOOLI_OPS);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["margin"], 0.05, "{answer}");
    assert_eq!(answer["tool"]["revenueMicros"], 1000);
    assert_eq!(answer["tool"]["cogsMicros"], 950);
    assert!(
        answer["reason"]
            .as_str()
            .unwrap()
            .ends_with("(revenue 1000 µUSD, COGS 950 µUSD)"),
        "{answer}"
    );
}

#[test]
fn a_killed_session_is_blocked_until_its_window_ends() {
    let s = serve();
    for n in 0..3 {
        post_call(&s, &format!("k{n}"), "search", "agent-2", "sk", 0, 0);
    }
    let (status, answer) = s.get(
        "/v1/guard/check?agentId=agent-2&toolName=search&sessionId=sk",
        HOOLI,
    );
    assert_eq!(status, 200);
    assert_eq!(answer["action"], "block", "{answer}");
    assert_eq!(answer["sessionKilled"], true);
    let retry = answer["retryAfterSeconds"].as_u64().unwrap();
    assert!((1..=3600).contains(&retry), "until the hour ends: {retry}");
    assert!(answer["reason"]
        .as_str()
        .unwrap()
        .starts_with("the session was killed by a hard limit until "));
    // Its sibling session of the same agent is not killed (a session limit).
    let (_, sibling) = s.get("/v1/guard/check?sessionId=other", HOOLI);
    assert_eq!(sibling["action"], "allow");
    assert_eq!(sibling["sessionKilled"], false);
}

#[test]
fn the_check_needs_an_ingest_key_and_something_to_check() {
    let s = serve();
    let (status, answer) = s.get("/v1/guard/check", HOOLI);
    assert_eq!(status, 400);
    assert_eq!(
        answer["message"],
        "name what is about to run: at least one of agentId, toolName, sessionId"
    );
    let (status, answer) = s.get("/v1/guard/check?agent=x", HOOLI);
    assert_eq!(status, 400);
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("unknown field `agent`"),
        "{answer}"
    );
    let (status, _) = s.get("/v1/guard/check?agentId=x", ACME_READ);
    assert_eq!(
        status, 403,
        "a read-only key cannot use the ingest-side check"
    );
    let (status, _) = s.get("/v1/guard/check?agentId=x", ACME_INGEST);
    assert_eq!(status, 200);
    let (status, _) = s.get("/v1/guard/check?agentId=x", "no-such-key");
    assert_eq!(status, 401);
}

#[test]
fn health_and_readiness_name_the_guard_state() {
    let s = serve();
    let (status, health) = s.get("/healthz", "");
    assert_eq!((status, health), (200, json!({"status": "ok"})));
    let (status, ready) = s.get("/readyz", "");
    assert_eq!(status, 200);
    assert_eq!(ready["status"], "ready");
    let names: Vec<&str> = ready["dependencies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["store-writer", "sqlite", "memory"]);
    assert!(ready["dependencies"]
        .as_array()
        .unwrap()
        .iter()
        .all(|d| d["ready"] == true));
    assert_eq!(ready["degraded"], json!([]));
}
