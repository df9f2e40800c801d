//! The dashboard and the customer portal in a real browser: Debian's Chromium, headless, driven
//! by `tests/browser/dashboard.mjs` (playwright-core) against a seeded `serve`. Every view is
//! opened and what it shows is compared with the API's answer for the same range; every chart
//! must have drawn its data, the console must stay free of errors, and no request may leave
//! the server's origin or carry a key in its URL. Screenshots of each view are kept under
//! `target/dashboard-screenshots/`.
//!
//! `scripts/test` installs Chromium (Debian's `chromium`) and the driver's packages (`npm ci` in
//! `tests/browser`); without them this test fails rather than skips.

use crate::common::distributed::wait_until;
use crate::common::*;
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const SECRET: &str = "9f2c4e81b7a3d05e6c1f8a92b4d7e03c5a8f1b6e2d9c4a7f0e3b8d5c1a6f9e24";

/// The `n`th call of the seed, of `customer` by `agent` in `session`, `days_ago` days before
/// now; durations and tokens vary with `n`, and every fifth call fails.
fn call_at(
    n: usize,
    tool: &str,
    agent: &str,
    customer: &str,
    session: &str,
    days_ago: i64,
) -> Value {
    let at = chrono::Utc::now() - chrono::Duration::days(days_ago);
    let key = format!("{session}-{n}");
    json!({
        "idempotencyKey": key,
        "metricName": "mcp_server.tool_invocations",
        "toolName": tool,
        "agentId": agent,
        "customerId": customer,
        "sessionId": session,
        "occurredAt": at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "executionDurationMs": 80 + (n * 397) % 1500,
        "executionStatus": if n % 5 == 4 { "ERROR" } else { "SUCCESS" },
        "metadata": {"inputTokens": 200 + (n * 131) % 900, "outputTokens": 40 + (n * 53) % 400},
    })
}

/// acme with a session limit of 4 calls (so one session is killed), the margin guard every
/// second, and a portal secret; three customers over several days, one of them prepaid.
fn seeded() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(dir.path()).replacen(
        "[[tenants]]\nid = \"globex\"",
        "[[tenants.limits]]\nper = \"session\"\nwindow = \"day\"\nmax_calls = 4\n\n[[tenants]]\nid = \"globex\"",
        1,
    ) + &format!("\n[margin_guard]\ninterval_seconds = 1\n\n[portal]\nsecret = \"{SECRET}\"\n");
    let config = schemas::config::Config::from_toml(&text).unwrap();
    config.validate().unwrap();
    let s = Server::start_in(dir, config);
    let mut events = Vec::new();
    let plan = [
        // (session, agent, customer, tools, days ago)
        (
            "sess-a1",
            "agent-alpha",
            "cust-a",
            &["web_search", "summarize"][..],
            0,
        ),
        ("sess-a2", "agent-alpha", "cust-a", &["web_search"][..], 2),
        (
            "sess-b1",
            "agent-beta",
            "cust-b",
            &["web_search", "translate"][..],
            1,
        ),
        ("sess-b2", "agent-beta", "cust-b", &["translate"][..], 5),
        ("sess-n1", "agent-gamma", "", &["summarize"][..], 3),
    ];
    for (session, agent, customer, tools, days_ago) in plan {
        for tool in tools.iter().cycle().take(3) {
            events.push(call_at(
                events.len(),
                tool,
                agent,
                customer,
                session,
                days_ago,
            ));
        }
    }
    // sess-a1's fifth call passes its limit of 4: the session is killed.
    for _ in 0..2 {
        events.push(call_at(
            events.len(),
            "web_search",
            "agent-alpha",
            "cust-a",
            "sess-a1",
            0,
        ));
    }
    let (status, answer) = s.post("/v1/ingest/batch", ACME, &batch(&events));
    assert_eq!(
        (status, &answer["accepted"]),
        (202, &json!(events.len())),
        "{answer}"
    );
    let (status, answer) = s.post(
        "/v1/customers/cust-a/credits",
        ACME,
        &json!({"amountMicros": 1_000_000, "idempotencyKey": "welcome", "note": "welcome credit"})
            .to_string(),
    );
    assert_eq!(status, 201, "{answer}");
    assert!(
        wait_until(Duration::from_secs(10), || s
            .get("/v1/guard/states", ACME)
            .1["tools"]
            .as_array()
            .is_some_and(|t| t.len() == 3)),
        "the margin guard computed no levels: {}",
        s.get("/v1/guard/states", ACME).1
    );
    s
}

fn token(s: &Server, customer: &str, seconds: u64) -> String {
    let (status, answer) = s.post(
        "/v1/portal/tokens",
        ACME,
        &json!({"customerId": customer, "expiresInSeconds": seconds}).to_string(),
    );
    assert_eq!(status, 201, "{answer}");
    answer["token"].as_str().unwrap().to_string()
}

/// Runs the browser driver; answers its report.
fn drive(
    s: &Server,
    key: &str,
    portal: &str,
    expired: &str,
    other_session: &str,
    out: &Path,
) -> Value {
    let out = out.display().to_string();
    run_browser_driver(
        "dashboard.mjs",
        &[&s.base, key, portal, expired, other_session, &out],
    )
}

/// Runs `tests/browser/<script>` with `args` in Debian's headless Chromium; answers the JSON
/// report it prints last.
pub(crate) fn run_browser_driver(script: &str, args: &[&str]) -> Value {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    assert!(
        dir.join("node_modules/playwright-core").exists(),
        "{}/node_modules is missing: run scripts/test, which installs the driver's packages",
        dir.display()
    );
    let chromium = std::env::var("MCP_METER_TEST_CHROMIUM").unwrap_or("/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists(),
        "{chromium} is missing: run scripts/test, which installs Debian's chromium"
    );
    let out = Command::new("node")
        .arg(dir.join(script))
        .args(args)
        .env("MCP_METER_TEST_CHROMIUM", &chromium)
        .output()
        .expect("node runs (Node.js 18 or later)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the browser driver failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// Table rows as the page showed them: key and exact µUSD cells.
fn rows(view: &Value) -> Vec<(String, Vec<i64>)> {
    view["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let micros = r["micros"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m.as_i64().unwrap())
                .collect();
            (r["key"].as_str().unwrap().to_string(), micros)
        })
        .collect()
}

fn every_chart_drew(what: &str, view: &Value, at_least: usize) {
    let charts = view["charts"].as_array().unwrap();
    assert!(
        charts.len() >= at_least,
        "{what}: {} charts: {view}",
        charts.len()
    );
    for chart in charts {
        assert!(
            chart["canvas"] == true && chart["seriesPixels"].as_u64().unwrap() > 20,
            "{what}: chart {} drew no data: {chart}",
            chart["name"]
        );
        assert!(
            chart["caption"].as_str().is_some_and(|c| c.len() > 20),
            "{what}: {chart}"
        );
    }
}

#[test]
fn every_view_shows_the_apis_figures_in_chromium_and_the_portal_only_its_customers() {
    let s = seeded();
    let portal = token(&s, "cust-a", 3600);
    let expired = token(&s, "cust-a", 1);
    std::thread::sleep(Duration::from_millis(1100));
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/dashboard-screenshots");
    let _ = std::fs::remove_dir_all(&out);
    let report = drive(&s, ACME, &portal, &expired, "sess-b1", &out);
    let views = &report["views"];

    // A wrong key is refused and says so; errors in the console only where a request was
    // refused on purpose (the wrong key, another customer's session, the expired token).
    assert!(
        report["wrongKey"]
            .as_str()
            .unwrap()
            .contains("not accepted"),
        "{}",
        report["wrongKey"]
    );
    for error in report["consoleErrors"].as_array().unwrap() {
        let phase = error["phase"].as_str().unwrap();
        assert!(
            ["wrong-key", "portal-other-session", "portal-expired"].contains(&phase),
            "console error while {phase}: {}",
            error["text"]
        );
    }
    assert_eq!(
        report["foreignRequests"],
        json!([]),
        "requests to another origin"
    );
    assert_eq!(report["secretInUrl"], json!([]), "a key or token in a URL");

    // Overview: the cards are the summary's figures, exactly.
    let (_, summary) = s.get("/analytics/mcp/summary", ACME);
    let cards = &views["overview"]["cards"];
    for figure in ["revenueMicros", "cogsMicros", "grossProfitMicros"] {
        assert_eq!(cards[figure], summary[figure], "overview {figure}: {cards}");
    }
    assert_eq!(cards["calls"], summary["calls"].to_string());
    assert_eq!(cards["sessions"], summary["sessions"].to_string());
    every_chart_drew("overview", &views["overview"], 1);

    // Tools: each row's revenue and COGS, and the guard's level, in the API's order.
    let (_, by_tool) = s.get("/analytics/mcp/revenue/by-tool", ACME);
    let (_, states) = s.get("/v1/guard/states", ACME);
    let expected: Vec<(String, Vec<i64>)> = by_tool["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["toolName"].as_str().unwrap().into(),
                vec![
                    t["revenueMicros"].as_i64().unwrap(),
                    t["cogsMicros"].as_i64().unwrap(),
                ],
            )
        })
        .collect();
    let shown: Vec<(String, Vec<i64>)> = rows(&views["tools"])
        .into_iter()
        .filter(|(_, m)| m.len() == 2)
        .collect();
    assert_eq!(shown, expected, "tools table");
    for row in views["tools"]["rows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["levels"].as_array().unwrap().len() == 1)
    {
        let state = states["tools"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["id"] == row["key"])
            .unwrap();
        assert_eq!(row["levels"][0], state["level"], "{row}");
    }
    every_chart_drew("tools", &views["tools"], 1);
    let ascending: Vec<i64> = rows(&views["toolsSortedAscending"])
        .into_iter()
        .filter(|(_, m)| m.len() == 2)
        .map(|(_, m)| m[0])
        .collect();
    assert!(
        ascending.windows(2).all(|w| w[0] <= w[1]),
        "sorted ascending: {ascending:?}"
    );

    // Agents, sessions, customers: the API's rows.
    let (_, by_agent) = s.get("/analytics/mcp/by-agent", ACME);
    let agent_rows: Vec<(String, Vec<i64>)> = rows(&views["agents"])
        .into_iter()
        .filter(|(k, _)| k.starts_with("agent-"))
        .collect();
    let expected: Vec<(String, Vec<i64>)> = by_agent["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["agentId"].as_str().unwrap().into(),
                vec![
                    a["revenueMicros"].as_i64().unwrap(),
                    a["cogsMicros"].as_i64().unwrap(),
                ],
            )
        })
        .collect();
    assert_eq!(agent_rows, expected, "agents table");
    every_chart_drew("agents", &views["agents"], 1);
    let (_, sessions) = s.get("/analytics/mcp/sessions?limit=100", ACME);
    let session_ids: Vec<String> = rows(&views["sessions"])
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    let expected: Vec<String> = sessions["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["sessionId"].as_str().unwrap().into())
        .collect();
    assert_eq!(session_ids, expected, "sessions table");
    let detail = &report["sessionDetail"];
    let (_, api_detail) = s.get(
        &format!("/analytics/mcp/sessions/{}", detail["id"].as_str().unwrap()),
        ACME,
    );
    assert_eq!(
        detail["killed"],
        json!((!api_detail["killedUntil"].is_null()).to_string()),
        "{detail}"
    );
    assert_eq!(detail["id"], "sess-a1", "the most recently active session");
    assert_eq!(
        detail["killed"], "true",
        "sess-a1 passed its limit: {detail}"
    );
    let (_, by_customer) = s.get("/analytics/mcp/by-customer", ACME);
    let (_, balance) = s.get("/v1/customers/cust-a/balance", ACME);
    let customers = rows(&views["customers"]);
    let cust_a = customers
        .iter()
        .find(|(k, _)| k == "cust-a")
        .expect("cust-a listed");
    let api_a = by_customer["customers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["customerId"] == "cust-a")
        .unwrap();
    assert_eq!(
        cust_a.1,
        vec![
            api_a["revenueMicros"].as_i64().unwrap(),
            api_a["cogsMicros"].as_i64().unwrap(),
            balance["availableMicros"].as_i64().unwrap(),
            1_000_000
        ],
        "cust-a: spend, COGS, balance, granted"
    );
    // Every customer of the by-customer answer, in its order.
    let listed: Vec<String> = customers.iter().map(|(k, _)| k.clone()).collect();
    let api_listed: Vec<String> = by_customer["customers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["customerId"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        listed, api_listed,
        "the customers view lists by-customer's rows"
    );
    every_chart_drew("customers", &views["customers"], 1);

    // Exports: the file downloaded is the API's export, byte for byte.
    let month = chrono::Utc::now().format("%Y-%m").to_string();
    let (_, csv) = s.get_text(&format!("/v1/exports/billing?period={month}"), ACME);
    assert_eq!(report["exportCsv"]["text"], csv, "the downloaded CSV");
    assert_eq!(
        report["exportCsv"]["name"],
        format!("billing-acme-{month}.csv")
    );

    // The portal: cust-a's figures only, no costs, its balance; B's session is not found.
    let pv = &report["portal"]["views"];
    let (_, own) = s.get("/analytics/mcp/summary", &portal);
    assert_eq!(
        pv["overview"]["cards"]["revenueMicros"],
        own["revenueMicros"]
    );
    assert!(
        pv["overview"]["cards"].get("cogsMicros").is_none(),
        "{}",
        pv["overview"]
    );
    assert_ne!(
        own["revenueMicros"], summary["revenueMicros"],
        "the portal sees less than the tenant"
    );
    let text = pv.to_string();
    for other in [
        "cust-b",
        "sess-b",
        "sess-n",
        "agent-beta",
        "agent-gamma",
        "translate",
    ] {
        assert!(!text.contains(other), "the portal shows {other}: {text}");
    }
    let portal_sessions: Vec<String> = rows(&pv["sessions"]).into_iter().map(|(k, _)| k).collect();
    assert_eq!(portal_sessions, ["sess-a1", "sess-a2"]);
    assert_eq!(
        pv["customers"]["cards"]["availableMicros"],
        balance["availableMicros"]
    );
    for view in ["overview", "tools", "agents", "customers"] {
        every_chart_drew(view, &pv[view], 1);
    }
    let (_, own_csv) = s.get_text(&format!("/v1/exports/billing?period={month}"), &portal);
    assert_eq!(report["portal"]["exportCsv"]["text"], own_csv);
    assert!(
        !own_csv.contains("cust-b") && own_csv.contains("cust-a"),
        "{own_csv}"
    );
    let other = &report["portal"]["otherSession"];
    assert!(
        other["alerts"][0]
            .as_str()
            .unwrap()
            .contains("no session `sess-b1`"),
        "{other}"
    );
    assert!(
        report["portal"]["expired"]
            .as_str()
            .unwrap()
            .contains("expired"),
        "{}",
        report["portal"]["expired"]
    );

    let shots = report["screenshots"].as_array().unwrap();
    assert_eq!(shots.len(), 13, "{shots:?}");
    for shot in shots {
        let bytes = std::fs::metadata(shot.as_str().unwrap()).unwrap().len();
        assert!(bytes > 10_000, "{shot}: {bytes} bytes");
    }
    println!("screenshots: {shots:?}");
}

#[test]
fn the_pages_and_their_chart_library_are_served_from_the_binary_with_a_strict_policy() {
    let s = Server::start();
    let (status, page) = s.get_text("/dashboard/", "");
    assert_eq!(status, 200);
    assert!(
        page.contains("<script type=\"module\" src=\"app.js\">"),
        "{page}"
    );
    for file in [
        "app.js",
        "views.js",
        "charts.js",
        "vendor/uPlot-1.6.32.esm.js",
        "vendor/uPlot-1.6.32.LICENSE",
    ] {
        let (status, body) = s.get_text(&format!("/dashboard/{file}"), "");
        assert_eq!(status, 200, "{file}");
        assert!(
            !body.contains("http://") || file.starts_with("vendor/uPlot-1.6.32.esm"),
            "{file} names another origin"
        );
    }
    let answer = ureq::get(&format!("{}/dashboard/app.js", s.base))
        .call()
        .unwrap();
    let policy = answer
        .headers()
        .get("content-security-policy")
        .unwrap()
        .to_str()
        .unwrap();
    assert!(
        policy.contains("default-src 'none'") && policy.contains("connect-src 'self'"),
        "{policy}"
    );
    assert_eq!(s.get("/dashboard/../Cargo.toml", "").0, 404);
    assert_eq!(s.get("/dashboard/nothing.js", "").0, 404);
    let redirect = ureq::get(&format!("{}/dashboard", s.base))
        .config()
        .max_redirects(0)
        .build()
        .call()
        .unwrap();
    assert_eq!(redirect.status(), 308);
}
