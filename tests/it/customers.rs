//! Analytics by customer: the `customerId` filter of every ranged read and
//! `GET /analytics/mcp/by-customer`, through a real `serve` on SQLite and on ClickHouse.
//!
//! The filter is the portal token's own (one `Viewer` customer): a tenant key may name any of
//! its customers and keeps its costs; a portal token may name only its own. The seeded search
//! posts random calls of several customers (and calls that name none) for two tenants and
//! compares every by-customer row and every filtered summary with an oracle of plain sums kept
//! by this test alone. A run prints its seed; `MCP_METER_TEST_CUSTOMERS_SEED=<seed>` replays
//! it, `MCP_METER_TEST_CUSTOMERS_EVENTS` makes it larger.

use crate::common::*;
use schemas::search::env_number;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};

/// A call of `customer` (none when empty) in `session`, of tool and agent `word`.
fn customer_call(key: &str, customer: &str, session: &str, word: &str) -> Value {
    let mut call = json!({
        "idempotencyKey": key,
        "metricName": "mcp_server.tool_invocations",
        "toolName": format!("{word}-tool"),
        "agentId": format!("{word}-agent"),
        "sessionId": session,
        "metadata": {"inputTokens": 10},
    });
    if !customer.is_empty() {
        call["customerId"] = json!(customer);
    }
    call
}

fn portal_token(s: &Server, key: &str, customer: &str) -> String {
    let (status, answer) = s.post(
        "/v1/portal/tokens",
        key,
        &json!({"customerId": customer, "expiresInSeconds": 600}).to_string(),
    );
    assert_eq!(status, 201, "{answer}");
    answer["token"].as_str().unwrap().to_string()
}

/// The customer ids of a by-customer answer, in its order.
fn ids(answer: &Value) -> Vec<Value> {
    answer["customers"]
        .as_array()
        .unwrap_or_else(|| panic!("no customers: {answer}"))
        .iter()
        .map(|c| c["customerId"].clone())
        .collect()
}

#[test]
fn the_customer_filter_and_by_customer_keep_to_the_tenant_and_the_portals_customer() {
    let s = Server::start();
    // acme: cust-a 2 calls, cust-b 3, one call without a customer. globex has a cust-a too.
    let acme = [
        customer_call("a1", "cust-a", "sa", "a"),
        customer_call("a2", "cust-a", "sa", "a"),
        customer_call("b1", "cust-b", "sb", "b"),
        customer_call("b2", "cust-b", "sb", "b"),
        customer_call("b3", "cust-b", "sb2", "b"),
        customer_call("n1", "", "sn", "n"),
    ];
    assert_eq!(s.post("/v1/ingest/batch", ACME, &batch(&acme)).0, 202);
    let globex = [
        customer_call("g1", "cust-a", "ga", "globex"),
        customer_call("g2", "globex-cust", "gb", "globex"),
    ];
    assert_eq!(s.post("/v1/ingest/batch", GLOBEX, &batch(&globex)).0, 202);

    // By customer: highest revenue first; the call without a customer under null.
    let (status, rows) = s.get("/analytics/mcp/by-customer", ACME);
    assert_eq!(status, 200, "{rows}");
    assert_eq!(rows["view"], "tenant", "{rows}");
    assert_eq!(ids(&rows), [json!("cust-b"), json!("cust-a"), json!(null)]);
    let b = &rows["customers"][0];
    assert_eq!(
        (&b["calls"], &b["sessions"], &b["revenueMicros"]),
        (&json!(3), &json!(2), &json!(3 * 5010)),
        "{b}"
    );
    assert_eq!(b["cogsMicros"], 3 * 205, "{b}");
    // Paged one at a time, the pages are the whole list.
    let mut paged = Vec::new();
    let mut url = "/analytics/mcp/by-customer?limit=1".to_string();
    loop {
        let (_, page) = s.get(&url, ACME);
        paged.extend(ids(&page));
        match page["nextCursor"].as_str() {
            Some(cursor) => url = format!("/analytics/mcp/by-customer?limit=1&cursor={cursor}"),
            None => break,
        }
    }
    assert_eq!(paged, ids(&rows));

    // The filter, with a tenant key: that customer's calls, costs kept.
    let (_, summary) = s.get("/analytics/mcp/summary?customerId=cust-a", ACME);
    assert_eq!(
        (&summary["calls"], &summary["view"]),
        (&json!(2), &json!("tenant"))
    );
    assert_eq!(summary["cogsMicros"], 2 * 205, "{summary}");
    let (_, sessions) = s.get("/analytics/mcp/sessions?customerId=cust-b", ACME);
    let session_ids: BTreeSet<&str> = sessions["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["sessionId"].as_str().unwrap())
        .collect();
    assert_eq!(session_ids, BTreeSet::from(["sb", "sb2"]), "{sessions}");
    for path in [
        "/analytics/mcp/revenue/by-tool?customerId=cust-a",
        "/analytics/mcp/by-agent?customerId=cust-a",
        "/analytics/mcp/timeseries?customerId=cust-a&groupBy=customer",
        "/analytics/mcp/by-customer?customerId=cust-a",
    ] {
        let (status, text) = s.get_text(path, ACME);
        assert_eq!(status, 200, "{path}: {text}");
        assert!(text.contains("\"calls\":2"), "{path}: {text}");
        for other in ["cust-b", "b-tool", "n-tool", "globex"] {
            assert!(!text.contains(other), "{path} shows {other}: {text}");
        }
    }
    // Tenant B's key never sees tenant A's customers, by filter or by listing.
    let (_, theirs) = s.get("/analytics/mcp/by-customer", GLOBEX);
    assert_eq!(ids(&theirs), [json!("cust-a"), json!("globex-cust")]);
    assert_eq!(theirs["customers"][0]["calls"], 1, "globex's own cust-a");
    for path in [
        "/analytics/mcp/summary?customerId=cust-b",
        "/analytics/mcp/by-customer?customerId=cust-b",
        "/analytics/mcp/revenue/by-tool?customerId=cust-b",
    ] {
        let (status, text) = s.get_text(path, GLOBEX);
        assert_eq!(status, 200, "{path}: {text}");
        assert!(
            !text.contains("b-tool") && !text.contains("\"calls\":3"),
            "{path}: {text}"
        );
    }
    assert_eq!(
        s.get("/analytics/mcp/summary?customerId=cust-b", GLOBEX).1["calls"],
        0
    );

    // A portal token: its own row only, in the customer view; its own id is fine, another 403.
    let token = portal_token(&s, ACME, "cust-a");
    for path in [
        "/analytics/mcp/by-customer",
        "/analytics/mcp/by-customer?customerId=cust-a",
    ] {
        let (status, answer) = s.get(path, &token);
        assert_eq!(status, 200, "{path}: {answer}");
        assert_eq!(answer["view"], "customer", "{answer}");
        assert_eq!(ids(&answer), [json!("cust-a")], "{answer}");
        let row = &answer["customers"][0];
        assert_eq!(
            (&row["calls"], &row["revenueMicros"]),
            (&json!(2), &json!(2 * 5010))
        );
        for cost in ["cogsMicros", "grossProfitMicros", "margin"] {
            assert!(row.get(cost).is_none(), "{cost}: {row}");
        }
    }
    for path in [
        "/analytics/mcp/by-customer?customerId=cust-b",
        "/analytics/mcp/summary?customerId=cust-b",
        "/analytics/mcp/revenue/by-tool?customerId=cust-b",
        "/analytics/mcp/by-agent?customerId=cust-b",
        "/analytics/mcp/timeseries?customerId=cust-b",
        "/analytics/mcp/sessions?customerId=cust-b",
    ] {
        let (status, answer) = s.get(path, &token);
        assert_eq!(status, 403, "{path}: {answer}");
        let message = answer["message"].as_str().unwrap();
        assert!(
            message.contains("cust-a") && message.contains("cust-b"),
            "{answer}"
        );
    }
    // A customer id is checked as everywhere else.
    let long = "c".repeat(65);
    for bad in ["", long.as_str(), "a%01b"] {
        let (status, answer) = s.get(&format!("/analytics/mcp/summary?customerId={bad}"), ACME);
        assert_eq!(status, 400, "{bad:?}: {answer}");
        assert!(
            answer["message"].as_str().unwrap().contains("customerId"),
            "{answer}"
        );
    }
    assert_eq!(s.get("/analytics/mcp/by-customer?cursor=nope", ACME).0, 400);
    assert_eq!(s.get("/analytics/mcp/by-customer?limit=0", ACME).0, 400);
}

/// The oracle's figures of one customer: plain sums of the calls it was told about.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Sums {
    calls: i64,
    errors: i64,
    revenue: i64,
    cogs: i64,
    input_tokens: i64,
    output_tokens: i64,
    duration_sum: i64,
    duration_max: i64,
    sessions: BTreeSet<String>,
}

impl Sums {
    fn of(row: &Value) -> (i64, i64, i64, i64, i64, i64, i64, i64, i64) {
        let n = |f: &str| row[f].as_i64().unwrap_or_else(|| panic!("{f}: {row}"));
        (
            n("calls"),
            n("errors"),
            n("revenueMicros"),
            n("cogsMicros"),
            n("inputTokens"),
            n("outputTokens"),
            n("durationMsSum"),
            n("maxDurationMs"),
            n("sessions"),
        )
    }

    fn expected(&self) -> (i64, i64, i64, i64, i64, i64, i64, i64, i64) {
        (
            self.calls,
            self.errors,
            self.revenue,
            self.cogs,
            self.input_tokens,
            self.output_tokens,
            self.duration_sum,
            self.duration_max,
            self.sessions.len() as i64,
        )
    }
}

/// Statuses and whether the README counts them as errors.
const STATUSES: [(&str, bool); 6] = [
    ("SUCCESS", false),
    ("PARTIAL", false),
    ("TIMEOUT", true),
    ("ERROR", true),
    ("FAILED", true),
    ("CANCELLED", false),
];
/// Two tenants; `c0` is a customer of both. "" names no customer.
const TENANTS: [(&str, &[&str]); 2] = [
    (ACME, &["c0", "c1", "c2", "c3", ""]),
    (GLOBEX, &["c0", "g1", ""]),
];

/// Per tenant (index into [`TENANTS`]) and customer (`None`: no customer), the sums of the
/// unique calls posted: what every store must answer.
type Oracle = BTreeMap<(usize, Option<String>), Sums>;

/// Random calls from `seed` over the last three days, posted to `s` in batches (some keys
/// sent twice, as a retrying client does), and the oracle's sums of them.
fn post_random_calls(s: &Server, seed: u64, events: usize) -> Oracle {
    let mut next = xorshift(seed | 1);
    let mut below = move |n: u64| next() % n;
    let now_ms = chrono::Utc::now().timestamp_millis();
    let mut oracle = Oracle::new();
    let mut sent: Vec<Vec<Value>> = vec![Vec::new(); TENANTS.len()];
    for i in 0..events {
        let t = below(TENANTS.len() as u64) as usize;
        if !sent[t].is_empty() && below(10) == 0 {
            let again = sent[t][below(sent[t].len() as u64) as usize].clone();
            sent[t].push(again);
            continue;
        }
        let customers = TENANTS[t].1;
        let customer = customers[below(customers.len() as u64) as usize];
        let (status, is_error) = STATUSES[below(STATUSES.len() as u64) as usize];
        // Even tokens and whole tens of ms keep the plan's half µUSD and tenths exact.
        let (input, output, duration) = (2 * below(500), 2 * below(300), 10 * below(2000));
        let session = match below(8) {
            0 => None,
            n => Some(format!("s{t}-{n}")),
        };
        let at_ms = now_ms - 60_000 - below(3 * 86_400) as i64 * 1000;
        let mut call = json!({
            "idempotencyKey": format!("k{i}"),
            "metricName": "mcp_server.tool_invocations",
            "toolName": format!("tool{}", below(4)),
            "agentId": format!("agent{}", below(3)),
            "executionStatus": status,
            "executionDurationMs": duration,
            "occurredAt": schemas::event::format_ms(at_ms),
            "metadata": {"inputTokens": input, "outputTokens": output},
        });
        if !customer.is_empty() {
            call["customerId"] = json!(customer);
        }
        if let Some(session) = &session {
            call["sessionId"] = json!(session);
        }
        sent[t].push(call);
        // The test plan: 5000 + 1/input + 3/output token; cost 200 + 0.5/input + 1.5/output
        // token + 100 per second.
        let sums = oracle
            .entry((t, Some(customer.to_string()).filter(|c| !c.is_empty())))
            .or_default();
        sums.calls += 1;
        sums.errors += i64::from(is_error);
        sums.revenue += 5000 + input as i64 + 3 * output as i64;
        sums.cogs += 200 + input as i64 / 2 + 3 * output as i64 / 2 + duration as i64 / 10;
        sums.input_tokens += input as i64;
        sums.output_tokens += output as i64;
        sums.duration_sum += duration as i64;
        sums.duration_max = sums.duration_max.max(duration as i64);
        sums.sessions.extend(session);
    }
    for (t, calls) in sent.iter().enumerate() {
        for chunk in calls.chunks(200) {
            let (status, answer) = s.post("/v1/ingest/batch", TENANTS[t].0, &batch(chunk));
            assert_eq!((status, &answer["failed"]), (202, &json!(0)), "{answer}");
        }
    }
    oracle
}

/// Every answer the oracle can check on `s`: by-customer whole and paged, each customer's
/// filtered summary and by-tool, a portal token's row. Answers the texts read, to compare
/// stores with.
fn check_against_oracle(s: &Server, oracle: &Oracle, seed: u64) -> Vec<String> {
    let today = chrono::Utc::now().date_naive();
    let range = format!(
        "from={}&to={}",
        today - chrono::Days::new(4),
        today.format("%Y-%m-%d")
    );
    let mut texts = Vec::new();
    for (t, (key, _)) in TENANTS.iter().enumerate() {
        let mut expected: Vec<(&Option<String>, &Sums)> = oracle
            .iter()
            .filter(|((tenant, _), _)| *tenant == t)
            .map(|((_, c), sums)| (c, sums))
            .collect();
        // Highest revenue first, then by id, no customer as the empty id.
        expected.sort_by(|a, b| {
            b.1.revenue.cmp(&a.1.revenue).then_with(|| {
                a.0.as_deref()
                    .unwrap_or("")
                    .cmp(b.0.as_deref().unwrap_or(""))
            })
        });
        let (status, text) = s.get_text(&format!("/analytics/mcp/by-customer?{range}"), key);
        assert_eq!(status, 200, "seed {seed}: {text}");
        let whole: Value = serde_json::from_str(&text).unwrap();
        let rows = whole["customers"].as_array().unwrap();
        let got: Vec<(Value, _)> = rows
            .iter()
            .map(|r| (r["customerId"].clone(), Sums::of(r)))
            .collect();
        let want: Vec<(Value, _)> = expected
            .iter()
            .map(|(c, sums)| (json!(c), sums.expected()))
            .collect();
        assert_eq!(got, want, "seed {seed}: tenant {key}'s rows by customer");
        texts.push(text);
        // Two at a time, cursor after cursor: the same rows.
        let mut paged = Vec::new();
        let first = format!("/analytics/mcp/by-customer?{range}&limit=2");
        let mut url = first.clone();
        loop {
            let (status, text) = s.get_text(&url, key);
            assert_eq!(status, 200, "seed {seed}: {url}: {text}");
            let page: Value = serde_json::from_str(&text).unwrap();
            paged.extend(page["customers"].as_array().unwrap().iter().cloned());
            texts.push(text);
            match page["nextCursor"].as_str() {
                Some(cursor) => url = format!("{first}&cursor={cursor}"),
                None => break,
            }
        }
        assert_eq!(&paged, rows, "seed {seed}: pages of two");
        // Each named customer through the filter: the summary and by-tool sum to its row.
        for (customer, sums) in expected.iter().filter_map(|(c, s)| Some((c.as_ref()?, s))) {
            let filter = format!("{range}&customerId={customer}");
            let (_, text) = s.get_text(&format!("/analytics/mcp/summary?{filter}"), key);
            let summary: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(
                Sums::of(&summary),
                sums.expected(),
                "seed {seed}: tenant {key}, summary?customerId={customer}"
            );
            texts.push(text);
            let (_, text) = s.get_text(&format!("/analytics/mcp/revenue/by-tool?{filter}"), key);
            let tools: Value = serde_json::from_str(&text).unwrap();
            let tools = tools["tools"].as_array().unwrap();
            let by_tool: (i64, i64) = tools.iter().fold((0, 0), |(calls, revenue), t| {
                (
                    calls + t["calls"].as_i64().unwrap(),
                    revenue + t["revenueMicros"].as_i64().unwrap(),
                )
            });
            assert_eq!(
                by_tool,
                (sums.calls, sums.revenue),
                "seed {seed}: tenant {key}, by-tool?customerId={customer}"
            );
            texts.push(text);
        }
    }
    // acme's c0 through a portal token: its row alone, without costs.
    let token = portal_token(s, ACME, "c0");
    let (_, text) = s.get_text(&format!("/analytics/mcp/by-customer?{range}"), &token);
    let answer: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(ids(&answer), [json!("c0")], "seed {seed}: {answer}");
    let row = &answer["customers"][0];
    let c0 = &oracle[&(0, Some("c0".to_string()))];
    assert_eq!(
        (row["calls"].as_i64(), row["revenueMicros"].as_i64()),
        (Some(c0.calls), Some(c0.revenue)),
        "seed {seed}: the portal's row"
    );
    assert!(row.get("cogsMicros").is_none(), "seed {seed}: {row}");
    texts.push(text);
    texts
}

/// The seed of this run: `MCP_METER_TEST_CUSTOMERS_SEED`, else the clock.
fn seed() -> u64 {
    env_number(
        "MCP_METER_TEST_CUSTOMERS_SEED",
        chrono::Utc::now().timestamp_millis() as u64,
    )
}

fn seeded_search(s: &Server, store: &str, seed: u64) -> Vec<String> {
    let events = env_number("MCP_METER_TEST_CUSTOMERS_EVENTS", 1500) as usize;
    println!(
        "by-customer ({store}): seed {seed}, {events} events (replay with MCP_METER_TEST_CUSTOMERS_SEED={seed})"
    );
    let oracle = post_random_calls(s, seed, events);
    check_against_oracle(s, &oracle, seed)
}

#[test]
fn by_customer_and_the_customer_filter_equal_a_seeded_oracle_on_sqlite() {
    let s = Server::start();
    let checked = seeded_search(&s, "sqlite", seed());
    println!("{} answers equal to the oracle", checked.len());
}

/// The same seed on SQLite and on ClickHouse: both equal the oracle, and each other to the
/// byte.
#[test]
fn by_customer_and_the_customer_filter_equal_a_seeded_oracle_on_clickhouse_and_sqlite() {
    let seed = seed();
    let sqlite = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let config = clickhouse_config(dir.path(), &unique_database("by_customer"));
    let clickhouse = Server::start_in(dir, config);
    let on_sqlite = seeded_search(&sqlite, "sqlite", seed);
    let on_clickhouse = seeded_search(&clickhouse, "clickhouse", seed);
    assert_eq!(on_sqlite.len(), on_clickhouse.len(), "seed {seed}");
    for (a, b) in on_sqlite.iter().zip(&on_clickhouse) {
        assert_eq!(a, b, "seed {seed}: SQLite and ClickHouse differ");
    }
    println!("{} answers equal on both stores", on_sqlite.len());
}
