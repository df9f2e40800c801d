//! Tenant isolation on every endpoint, and scopes: a key of tenant `acme` that names `globex`'s
//! sessions, agents, tools and customers, by id or by filter, sees none of them; each key can do
//! only what its scopes allow.

use crate::common::distributed::wait_until;
use crate::common::*;
use serde_json::json;
use std::time::Duration;

fn event(key: &str, tenant_word: &str) -> serde_json::Value {
    json!({
        "idempotencyKey": key,
        "metricName": "mcp_server.tool_invocations",
        "toolName": format!("{tenant_word}-tool"),
        "agentId": format!("{tenant_word}-agent"),
        "customerId": format!("{tenant_word}-cust"),
        "sessionId": format!("{tenant_word}-session"),
        "metadata": {"inputTokens": 10},
    })
}

#[test]
fn a_key_never_reaches_another_tenants_data_on_any_endpoint() {
    let s = Server::start_with(|c| c.margin_guard.interval_seconds = 1);
    for n in 0..3 {
        assert_eq!(
            s.post(
                "/v1/ingest/events",
                GLOBEX,
                &event(&format!("g{n}"), "globex").to_string()
            )
            .0,
            202
        );
    }
    assert_eq!(
        s.post("/v1/ingest/events", ACME, &event("a0", "acme").to_string())
            .0,
        202
    );
    // The guard has computed globex's levels: its own key sees them.
    let check =
        "/v1/guard/check?agentId=globex-agent&toolName=globex-tool&sessionId=globex-session";
    assert!(wait_until(Duration::from_secs(10), || s
        .get(check, GLOBEX)
        .1["agent"]
        .is_object()));

    let month = chrono::Utc::now().format("%Y-%m").to_string();
    let paths = [
        "/analytics/mcp/revenue/by-tool".to_string(),
        "/analytics/mcp/by-agent".to_string(),
        "/analytics/mcp/summary".to_string(),
        "/analytics/mcp/sessions".to_string(),
        "/analytics/mcp/sessions?agentId=globex-agent".to_string(),
        "/analytics/mcp/sessions/globex-session".to_string(),
        format!("/v1/exports/billing?period={month}"),
        format!("/v1/exports/billing?period={month}&format=json&customerId=globex-cust"),
        format!("/v1/exports/billing?period={month}&format=json&agentId=globex-agent"),
        check.to_string(),
    ];
    for path in &paths {
        let (status, text) = s.get_text(path, ACME);
        assert!(status == 200 || status == 404, "{path}: {status} {text}");
        // Nothing of globex's beyond what the question itself named (a 404 repeats the id).
        for word in [
            "globex-tool",
            "globex-agent",
            "globex-cust",
            "globex-session",
        ] {
            if !path.contains(word) {
                assert!(!text.contains(word), "{path} leaks globex's {word}: {text}");
            }
        }
        assert!(
            !text.contains("\"calls\":3"),
            "{path} counts globex's 3 calls: {text}"
        );
        // The same question with globex's key does find globex's data (the query is not empty
        // for some other reason).
        let (_, theirs) = s.get_text(path, GLOBEX);
        if !path.contains("summary") {
            assert!(
                theirs.contains("globex"),
                "{path} with globex's key: {theirs}"
            );
        }
    }
    let (status, _) = s.get("/analytics/mcp/sessions/globex-session", ACME);
    assert_eq!(status, 404);
    let (_, summary) = s.get("/analytics/mcp/summary", ACME);
    assert_eq!(summary["calls"], 1, "acme's own call only");
    let (_, guard) = s.get(check, ACME);
    assert_eq!(
        (guard["agent"].is_null(), guard["tool"].is_null()),
        (true, true),
        "{guard}"
    );
    // Re-sending globex's keys under acme's key stores acme events; globex's stay as they were.
    let (_, answer) = s.post("/v1/ingest/events", ACME, &event("g0", "acme").to_string());
    assert_eq!(answer["accepted"], 1, "keys are per tenant: {answer}");
    assert_eq!(s.get("/analytics/mcp/summary", GLOBEX).1["calls"], 3);
}

#[test]
fn scopes_decide_what_each_key_may_do() {
    let s = Server::start();
    let month = chrono::Utc::now().format("%Y-%m").to_string();
    let export = format!("/v1/exports/billing?period={month}");
    // (key, ingest, guard check, analytics, export): 2xx or 403.
    let table: [(&str, &str, [u16; 4]); 4] = [
        ("admin", ACME, [202, 200, 200, 200]),
        ("ingest-only", ACME_INGEST, [202, 200, 403, 403]),
        ("read-only", ACME_READ, [403, 403, 200, 403]),
        ("ingest+read+export", GLOBEX, [202, 200, 200, 200]),
    ];
    for (what, key, expected) in table {
        let got = [
            s.post("/v1/ingest/events", key, SEED).0,
            s.get("/v1/guard/check?agentId=a", key).0,
            s.get("/analytics/mcp/summary", key).0,
            s.get_text(&export, key).0,
        ];
        assert_eq!(
            got, expected,
            "{what}: ingest, guard check, analytics, export"
        );
    }
}
