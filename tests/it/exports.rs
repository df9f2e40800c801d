//! The billing export through the real `serve`: lines per customer, agent and tool, totals equal
//! to the summary's for the same month, CSV and JSON, filters, scopes, paging past one page.

use crate::common::*;
use serde_json::{json, Value};

/// This month's first day and a time in it at least a minute old (occurredAt may not be ahead).
fn this_month() -> (String, String) {
    let now = chrono::Utc::now() - chrono::Duration::minutes(1);
    (now.format("%Y-%m").to_string(), now.to_rfc3339())
}

/// 2,500 distinct (customer, agent, tool) lines for `acme` (more than one page of 2,000),
/// among them a customer whose id needs CSV quoting, plus one line for `globex`.
fn seed(s: &Server) -> usize {
    let (_, at) = this_month();
    let mut events = Vec::new();
    for c in 0..50 {
        for a in 0..10 {
            for t in 0..5 {
                let customer = if c == 7 {
                    "acme, \"inc\"".to_string()
                } else {
                    format!("cust_{c:02}")
                };
                events.push(json!({
                    "idempotencyKey": format!("e-{c}-{a}-{t}"),
                    "metricName": "mcp_server.tool_invocations",
                    "toolName": format!("tool_{t}"),
                    "agentId": format!("agent_{a}"),
                    "customerId": customer,
                    "sessionId": format!("s-{c}"),
                    "occurredAt": at,
                    "executionDurationMs": 100 * (t + 1),
                    "executionStatus": if t == 4 { "ERROR" } else { "SUCCESS" },
                    "metadata": {"inputTokens": 10 * a, "outputTokens": c},
                }));
            }
        }
    }
    for chunk in events.chunks(1000) {
        let (status, answer) = s.post("/v1/ingest/batch", ACME, &batch(chunk));
        assert_eq!(status, 202, "{answer}");
    }
    let (status, _) = s.post(
        "/v1/ingest/events",
        GLOBEX,
        &call("g1", "tool_0", "agent_0", "gs").to_string(),
    );
    assert_eq!(status, 202);
    events.len()
}

/// Splits CSV text into records of fields (RFC 4180: quoted fields, doubled quotes, CRLF).
fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let mut records = Vec::new();
    let (mut record, mut field, mut quoted, mut chars) =
        (Vec::new(), String::new(), false, text.chars().peekable());
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') => quoted = true,
            (false, ',') => record.push(std::mem::take(&mut field)),
            (false, '\r') => assert_eq!(chars.next(), Some('\n'), "CR without LF"),
            (false, '\n') => panic!("a bare LF ends a record"),
            (false, c) => field.push(c),
        }
        if !quoted && c == '\r' {
            record.push(std::mem::take(&mut field));
            records.push(std::mem::take(&mut record));
        }
    }
    assert!(
        record.is_empty() && field.is_empty(),
        "the last record ends in CRLF"
    );
    records
}

#[test]
fn a_months_export_has_a_line_per_customer_agent_and_tool_and_totals_equal_to_the_summary() {
    let s = Server::start();
    let events = seed(&s);
    let (period, _) = this_month();

    let (status, csv) = s.get_text(&format!("/v1/exports/billing?period={period}"), ACME);
    assert_eq!(status, 200, "{csv}");
    let records = parse_csv(&csv);
    let header = &records[0];
    assert_eq!(header.join(","), "period,line,customer_id,agent_id,tool_name,calls,errors,input_tokens,output_tokens,duration_ms,revenue_micros,revenue_usd,cogs_micros,cogs_usd");
    let col = |name: &str| header.iter().position(|h| h == name).unwrap();
    let lines = &records[1..records.len() - 1];
    let totals = records.last().unwrap();
    assert_eq!(lines.len(), events, "one line per customer, agent and tool");
    assert!(lines
        .iter()
        .all(|l| l[col("line")] == "usage" && l[col("period")] == period));
    assert_eq!(totals[col("line")], "total");
    // Ordered by (customer, agent, tool), bytewise, with no line twice across pages.
    let keys: Vec<(&str, &str, &str)> = lines
        .iter()
        .map(|l| {
            (
                &*l[col("customer_id")],
                &*l[col("agent_id")],
                &*l[col("tool_name")],
            )
        })
        .collect();
    assert!(keys.windows(2).all(|w| w[0] < w[1]), "strictly ascending");
    assert!(
        keys.contains(&("acme, \"inc\"", "agent_3", "tool_2")),
        "quoted ids survive"
    );

    // Totals: the sum of the lines, and exactly the summary of the same month.
    let sum = |name: &str| {
        lines
            .iter()
            .map(|l| l[col(name)].parse::<i64>().unwrap())
            .sum::<i64>()
    };
    let total = |name: &str| totals[col(name)].parse::<i64>().unwrap();
    for name in [
        "calls",
        "errors",
        "input_tokens",
        "output_tokens",
        "duration_ms",
        "revenue_micros",
        "cogs_micros",
    ] {
        assert_eq!(sum(name), total(name), "{name}");
    }
    let first = format!("{period}-01");
    let last = chrono::NaiveDate::parse_from_str(&first, "%Y-%m-%d").unwrap()
        + chrono::Months::new(1)
        - chrono::Days::new(1);
    let (_, summary) = s.get(
        &format!("/analytics/mcp/summary?from={first}&to={last}"),
        ACME,
    );
    for (csv_name, summary_name) in [
        ("calls", "calls"),
        ("errors", "errors"),
        ("input_tokens", "inputTokens"),
        ("output_tokens", "outputTokens"),
        ("duration_ms", "durationMsSum"),
        ("revenue_micros", "revenueMicros"),
        ("cogs_micros", "cogsMicros"),
    ] {
        assert_eq!(
            total(csv_name),
            summary[summary_name].as_i64().unwrap(),
            "{csv_name}"
        );
    }
    assert_eq!(total("calls"), events as i64);
    let usd = &totals[col("revenue_usd")];
    let micros = total("revenue_micros");
    assert_eq!(
        *usd,
        format!("{}.{:06}", micros / 1_000_000, micros % 1_000_000)
    );

    // JSON: the same lines and totals.
    let (status, body) = s.get(
        &format!("/v1/exports/billing?period={period}&format=json"),
        ACME,
    );
    assert_eq!(status, 200);
    assert_eq!(body["period"], period.as_str());
    assert_eq!(body["lineCount"], events);
    assert_eq!(body["lines"].as_array().unwrap().len(), events);
    assert_eq!(body["totals"]["revenueMicros"], summary["revenueMicros"]);
    assert_eq!(body["totals"]["revenueUsd"], usd.as_str());
    let line = &body["lines"][0];
    assert_eq!(
        line["customerId"], "acme, \"inc\"",
        "bytewise, `acme…` sorts before `cust_…`: {line}"
    );
    println!(
        "export {period}: {} lines, {} calls, revenue {} µUSD (summary {}), COGS {} µUSD (summary {}), {} bytes of CSV",
        lines.len(),
        total("calls"),
        micros,
        summary["revenueMicros"],
        total("cogs_micros"),
        summary["cogsMicros"],
        csv.len()
    );
}

#[test]
fn filters_narrow_the_lines_and_their_totals() {
    let s = Server::start();
    seed(&s);
    let (period, _) = this_month();
    let (_, one) = s.get(
        &format!(
            "/v1/exports/billing?period={period}&format=json&customerId=cust_03&agentId=agent_2"
        ),
        ACME,
    );
    let lines = one["lines"].as_array().unwrap();
    assert_eq!(lines.len(), 5, "five tools");
    assert!(lines
        .iter()
        .all(|l| l["customerId"] == "cust_03" && l["agentId"] == "agent_2"));
    assert_eq!(one["totals"]["calls"], 5);
    let (_, none) = s.get(
        &format!("/v1/exports/billing?period={period}&format=json&customerId=nobody"),
        ACME,
    );
    assert_eq!(none["lines"], json!([]));
    assert_eq!(none["totals"]["calls"], 0);
    assert_eq!(none["totals"]["revenueUsd"], "0.000000");
    let (_, csv) = s.get_text("/v1/exports/billing?period=2001-01", ACME);
    assert_eq!(parse_csv(&csv).len(), 2, "header and totals only: {csv}");
}

/// A client's `clientInfo.name` of `=HYPERLINK(…)` becomes an agent id; in the CSV export its
/// cell begins with `'`, so a spreadsheet shows it as text and never runs it. JSON keeps it as
/// it is.
#[test]
fn a_cell_a_spreadsheet_would_run_is_exported_as_text() {
    let s = Server::start();
    let (period, at) = this_month();
    let formula = r#"=HYPERLINK("http://e.x","y")"#;
    let event = json!({"idempotencyKey": "f-1", "metricName": "mcp_server.tool_invocations",
        "toolName": "@SUM", "agentId": formula, "customerId": "-5", "sessionId": "s",
        "occurredAt": at});
    let (status, body) = s.post("/v1/ingest/events", ACME, &event.to_string());
    assert_eq!((status, &body["accepted"]), (202, &json!(1)), "{body}");
    let (_, csv) = s.get_text(&format!("/v1/exports/billing?period={period}"), ACME);
    let rows = parse_csv(&csv);
    let line = rows.iter().find(|r| r[1] == "usage").expect("a usage line");
    assert_eq!(line[2], "'-5", "{csv}");
    assert_eq!(line[3], format!("'{formula}"), "{csv}");
    assert_eq!(line[4], "'@SUM", "{csv}");
    let (_, json) = s.get(
        &format!("/v1/exports/billing?period={period}&format=json"),
        ACME,
    );
    assert_eq!(json["lines"][0]["agentId"], formula);
}

#[test]
fn exports_need_the_export_scope_and_show_only_the_keys_tenant() {
    let s = Server::start();
    seed(&s);
    let (period, _) = this_month();
    let path = format!("/v1/exports/billing?period={period}&format=json");
    for key in [ACME_READ, ACME_INGEST] {
        let (status, answer) = s.get(&path, key);
        assert_eq!(status, 403, "{answer}");
        assert!(answer["message"]
            .as_str()
            .unwrap()
            .contains("`export` scope"));
    }
    let (status, globex) = s.get(&path, GLOBEX);
    assert_eq!(status, 200);
    assert_eq!(globex["lineCount"], 1);
    assert_eq!(globex["totals"]["revenueMicros"], CALL_REVENUE);
    let (_, filtered) = s.get(&format!("{path}&customerId=cust_03"), GLOBEX);
    assert_eq!(
        filtered["lines"],
        json!([]),
        "another tenant's customer is not reachable"
    );
}

#[test]
fn bad_export_requests_say_what_to_fix() {
    let s = Server::start();
    let cases: [(&str, &str); 4] = [
        ("/v1/exports/billing", "missing field `period`"),
        (
            "/v1/exports/billing?period=2026-13",
            "period `2026-13` is not a month like 2026-11 (YYYY-MM)",
        ),
        (
            "/v1/exports/billing?period=2026-11&format=xml",
            "format `xml` is not one of csv, json",
        ),
        (
            "/v1/exports/billing?period=2026-11&tenant=x",
            "unknown field `tenant`",
        ),
    ];
    for (path, wanted) in cases {
        let (status, answer): (u16, Value) = s.get(path, ACME);
        assert_eq!(status, 400, "{path}: {answer}");
        assert!(
            answer["message"].as_str().unwrap().contains(wanted),
            "{path}: {answer}"
        );
    }
}
