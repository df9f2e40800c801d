//! `mcp-meter proxy --stdio` in front of a real MCP server (the official TypeScript SDK's, not
//! metered itself), driven by the official MCP client through it, against a real `serve`: every
//! call reported, the answers unchanged, and killed sessions, unpaid calls and a meter that is
//! down handled as the SDKs' delivery rules say (README, "Metering a server you cannot change").

use crate::common::*;
use crate::typescript_sdk::{drive_at, metered_as_driven};
use serde_json::Value;

/// On the test plan a call with no tokens is priced 5000 (the unmetered server reports none).
const RATED_CALL: i64 = 5000;

#[test]
fn every_call_through_the_stdio_proxy_is_metered_and_its_answer_unchanged() {
    every_call_is_metered_and_its_answer_unchanged("plain", "proxy");
}

#[test]
fn every_call_through_the_http_proxy_is_metered_and_its_answer_unchanged() {
    every_call_is_metered_and_its_answer_unchanged("plain-http", "proxy-http");
}

fn every_call_is_metered_and_its_answer_unchanged(direct_mode: &str, proxy_mode: &str) {
    let s = Server::start();
    let direct = drive_at(&s.base, ACME, "cust-px", "usage", direct_mode, &[]);
    let proxied = drive_at(&s.base, ACME, "cust-px", "usage", proxy_mode, &[]);
    assert_eq!(
        proxied["answers"], direct["answers"],
        "the client gets the same answers with and without the proxy"
    );
    metered_as_driven(&s, ACME, &proxied, RATED_CALL, proxy_mode);
    // One session (the child), the agent from the client's initialize, the customer given.
    let (_, sessions) = s.get("/analytics/mcp/sessions", ACME);
    let sessions = sessions["sessions"].as_array().unwrap().clone();
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    assert_eq!(sessions[0]["agentId"], "e2e-agent");
    let (_, export) = s.get_text(
        &format!(
            "/v1/exports/billing?period={}",
            chrono::Utc::now().format("%Y-%m")
        ),
        ACME,
    );
    assert!(export.contains("cust-px"), "{export}");
    println!("{proxy_mode}: {}", proxied["expected"]);
}

#[test]
fn a_killed_session_and_an_unpaid_call_never_reach_the_stdio_server() {
    killed_and_unpaid_calls_never_reach_the_server("proxy");
}

#[test]
fn a_killed_session_and_an_unpaid_call_never_reach_the_http_server() {
    killed_and_unpaid_calls_never_reach_the_server("proxy-http");
}

fn killed_and_unpaid_calls_never_reach_the_server(mode: &str) {
    let s = crate::credits::serve_with(
        "[[tenants.limits]]\nper = \"session\"\nwindow = \"hour\"\nmax_calls = 3\n",
    );
    let flags = [("MCP_METER_PROXY_FLAGS", "--flush-interval-ms 50")];
    let killed = drive_at(&s.base, INITECH, "cust-px", "kill", mode, &flags);
    println!("{killed}");
    assert_eq!(killed["answered"], 4, "{killed}");
    assert_eq!(killed["refusedAt"], 4, "{killed}");
    assert_eq!(
        killed["runs"]["search"], 4,
        "the refused call never reached the server"
    );

    let (status, _) = crate::credits::grant(&s, INITECH, "cust-paid", 3 * RATED_CALL, "g-px");
    assert_eq!(status, 201);
    let flags = [("MCP_METER_PROXY_FLAGS", "--paid-tool premium")];
    let paid = drive_at(&s.base, INITECH, "cust-paid", "paid", mode, &flags);
    println!("{paid}");
    let refused: Vec<bool> = paid["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["isError"] == true)
        .collect();
    assert_eq!(refused, [false, false, false, true], "{paid}");
    assert_eq!(
        paid["results"][3]["terms"]["reason"],
        "insufficient_balance"
    );
    assert_eq!(
        paid["runs"]["premium"], 3,
        "the unpaid call never reached the server"
    );
    let balance = crate::credits::balance(&s, INITECH, "cust-paid");
    assert_eq!(balance["settledMicros"], 3 * RATED_CALL);
    assert_eq!(balance["availableMicros"], 0);
}

/// The meter is down while the calls happen: they pass, and the queued events are delivered
/// once it is up, before the proxy exits. The meter's port first refuses the proxy's delivery
/// (the connection is closed unanswered), and the meter starts only after that, whatever time
/// the driver takes to start.
#[test]
fn calls_pass_while_the_meter_is_down_and_their_events_arrive_after_it_is_back() {
    let down = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = down.local_addr().unwrap().port();
    let base = format!("http://127.0.0.1:{port}");
    let driver = std::thread::spawn(move || {
        let flags = [("MCP_METER_PROXY_FLAGS", "--close-wait-ms 30000")];
        drive_at(&base, ACME, "cust-px", "usage", "proxy", &flags)
    });
    down.set_nonblocking(true).unwrap();
    // The proxy's first delivery: accepted, and closed unanswered as the stream drops.
    let refused =
        crate::common::distributed::wait_until(std::time::Duration::from_secs(60), || {
            down.accept().is_ok() || driver.is_finished()
        });
    assert!(
        refused && !driver.is_finished(),
        "the proxy never tried to deliver its events"
    );
    drop(down);
    let s = Server::start_with(|c| c.listen = format!("127.0.0.1:{port}"));
    let result: Value = driver.join().unwrap();
    assert_eq!(result["runs"]["search"], 34, "every call passed");
    let log = result["proxyLog"].to_string();
    assert!(
        log.contains("unreachable"),
        "the meter was down during the calls: {log}"
    );
    let (_, summary) = s.get("/analytics/mcp/summary", ACME);
    assert_eq!(summary["calls"], 100, "{summary}");
}

/// A tool the margin guard blocks (its cost is above its price) is answered by the proxy with
/// `--guard`, over both transports, without reaching the server, and without the guard's
/// reason, which holds the operator's costs.
#[test]
fn a_tool_the_guard_blocks_never_reaches_the_server() {
    let s = crate::credits::serve_with("[margin_guard]\ninterval_seconds = 1\n");
    // 1000 s of a tool whose cost is 100 µUSD a second and whose price is 5000 a call: a
    // negative margin, L3 BLOCK once the guard has run.
    let costly = serde_json::json!({
        "idempotencyKey": "costly", "metricName": "mcp_server.tool_invocations",
        "toolName": "search", "agentId": "someone", "sessionId": "s0",
        "executionDurationMs": 1_000_000,
    });
    assert_eq!(
        s.post("/v1/ingest/events", INITECH, &costly.to_string()).0,
        202
    );
    let blocked = || s.get("/v1/guard/check?toolName=search", INITECH).1["action"] == "block";
    assert!(
        crate::common::distributed::wait_until(std::time::Duration::from_secs(15), blocked),
        "the guard blocks search"
    );
    for mode in ["proxy", "proxy-http"] {
        let flags = [("MCP_METER_PROXY_FLAGS", "--guard --guard-timeout-ms 2000")];
        let result = drive_at(&s.base, INITECH, "cust-px", "blocked", mode, &flags);
        assert_eq!(result["refused"], true, "{mode}: {result}");
        let text = result["text"].to_string();
        assert!(text.contains("blocked search"), "{result}");
        // The guard's reason names the operator's costs and margin: the client never sees it.
        for figure in ["COGS", "margin", "µUSD", "revenue"] {
            assert!(
                !text.contains(figure),
                "{mode}: the client saw {figure}: {text}"
            );
        }
        assert_eq!(
            result["runs"]["search"], 0,
            "{mode}: the server never ran it"
        );
    }
}

/// 200 calls from 4 concurrent clients through the HTTP proxy, one tool slow and one streaming
/// progress over SSE: 200 events with the right tools and statuses, durations within what the
/// clients measured, one session per client, and every progress notification delivered.
#[test]
fn concurrent_clients_through_the_http_proxy_are_metered_per_session() {
    let s = Server::start();
    let result = drive_at(&s.base, ACME, "cust-px", "concurrent", "proxy-http", &[]);
    println!("{result}");
    let (_, report) = s.get("/analytics/mcp/revenue/by-tool", ACME);
    let tools = report["tools"].as_array().unwrap();
    let mut total = 0;
    for tool in ["search", "flaky", "slow", "progress"] {
        let expected = &result["expected"][tool];
        let row = tools
            .iter()
            .find(|t| t["toolName"] == tool)
            .unwrap_or_else(|| panic!("no row for {tool}: {report}"));
        assert_eq!(row["calls"], expected["calls"], "{tool}");
        assert_eq!(row["errors"], expected["errors"], "{tool}");
        assert_eq!(row["calls"], result["runs"][tool], "{tool}");
        let measured = expected["maxMs"].as_f64().unwrap().ceil() as i64;
        assert!(
            row["maxDurationMs"].as_i64().unwrap() <= measured,
            "{tool}: reported {} ms, the client measured at most {measured} ms",
            row["maxDurationMs"]
        );
        total += row["calls"].as_i64().unwrap();
    }
    assert_eq!(total, 200);
    assert!(
        tools.iter().find(|t| t["toolName"] == "slow").unwrap()["maxDurationMs"]
            .as_i64()
            .unwrap()
            >= 40,
        "the slow tool's duration is measured"
    );
    let (_, sessions) = s.get("/analytics/mcp/sessions", ACME);
    assert_eq!(
        sessions["sessions"].as_array().unwrap().len(),
        4,
        "{sessions}"
    );
    assert_eq!(
        result["progressSeen"].as_i64().unwrap(),
        3 * result["expected"]["progress"]["calls"].as_i64().unwrap(),
        "every progress notification reached its client through the proxy"
    );
}
