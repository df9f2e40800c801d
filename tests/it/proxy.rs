//! `mcp-meter proxy --stdio` in front of a real MCP server (the official TypeScript SDK's, not
//! metered itself), driven by the official MCP client through it, against a real `serve`: every
//! call reported, the answers unchanged, and killed sessions, unpaid calls and a meter that is
//! down handled as the clients' design says (DESIGN §11).

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
/// once it is up, before the proxy exits.
#[test]
fn calls_pass_while_the_meter_is_down_and_their_events_arrive_after_it_is_back() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let base = format!("http://127.0.0.1:{port}");
    let driver = std::thread::spawn(move || {
        let flags = [("MCP_METER_PROXY_FLAGS", "--close-wait-ms 30000")];
        drive_at(&base, ACME, "cust-px", "usage", "proxy", &flags)
    });
    std::thread::sleep(std::time::Duration::from_millis(1500));
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
