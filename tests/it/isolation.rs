//! Tenant isolation on every endpoint, and scopes: a key of tenant `acme` that names `globex`'s
//! sessions, agents, tools and customers, by id or by filter, sees none of them; each key can do
//! only what its scopes allow. A portal token sees one customer of one tenant, and writes
//! nothing.

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
        "/analytics/mcp/timeseries?groupBy=customer".to_string(),
        "/analytics/mcp/timeseries?interval=hour&groupBy=tool".to_string(),
        "/analytics/mcp/timeseries?groupBy=agent".to_string(),
        "/v1/guard/states".to_string(),
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

/// A call of `customer` in `session` (tool and agent named after the customer).
fn customer_call(key: &str, customer: &str, session: &str) -> serde_json::Value {
    json!({
        "idempotencyKey": key,
        "metricName": "mcp_server.tool_invocations",
        "toolName": format!("{customer}-tool"),
        "agentId": format!("{customer}-agent"),
        "customerId": customer,
        "sessionId": session,
        "metadata": {"inputTokens": 10},
    })
}

fn portal_token(s: &Server, key: &str, customer: &str, seconds: u64) -> String {
    let (status, answer) = s.post(
        "/v1/portal/tokens",
        key,
        &json!({"customerId": customer, "expiresInSeconds": seconds}).to_string(),
    );
    assert_eq!(status, 201, "{answer}");
    assert_eq!(answer["customerId"], customer);
    answer["token"].as_str().unwrap().to_string()
}

#[test]
fn a_portal_token_reads_one_customer_of_one_tenant_and_writes_nothing() {
    let s = Server::start_with(|c| c.margin_guard.interval_seconds = 1);
    // acme: cust-a's session sa (2 calls), cust-b's sb (3 calls), and sm, which mixes them
    // (one call each). globex has a cust-a too, with a session of its own.
    let acme = [
        customer_call("a1", "cust-a", "sa"),
        customer_call("a2", "cust-a", "sa"),
        customer_call("b1", "cust-b", "sb"),
        customer_call("b2", "cust-b", "sb"),
        customer_call("b3", "cust-b", "sb"),
        customer_call("m1", "cust-a", "sm"),
        customer_call("m2", "cust-b", "sm"),
    ];
    assert_eq!(s.post("/v1/ingest/batch", ACME, &batch(&acme)).0, 202);
    let globex = [customer_call("g1", "cust-a", "ga")];
    assert_eq!(s.post("/v1/ingest/batch", GLOBEX, &batch(&globex)).0, 202);
    let token = portal_token(&s, ACME, "cust-a", 600);
    let month = chrono::Utc::now().format("%Y-%m").to_string();

    // Totals are cust-a's three calls (sa's two, its one in sm).
    let (status, summary) = s.get("/analytics/mcp/summary", &token);
    assert_eq!(status, 200, "{summary}");
    assert_eq!(summary["calls"], 3, "{summary}");
    assert_eq!(summary["revenueMicros"], 3 * 5010, "{summary}");
    // The operator's costs stay the operator's: no COGS, gross profit or margin, anywhere.
    for field in ["cogsMicros", "grossProfitMicros", "margin"] {
        assert!(summary.get(field).is_none(), "{field}: {summary}");
    }
    let (_, csv) = s.get_text(&format!("/v1/exports/billing?period={month}"), &token);
    assert!(
        csv.starts_with(schemas::billing::CSV_HEADER_WITHOUT_COSTS),
        "{csv}"
    );
    assert!(csv.lines().all(|l| l.matches(',').count() == 11), "{csv}");
    let reads = [
        "/analytics/mcp/revenue/by-tool".to_string(),
        "/analytics/mcp/by-agent".to_string(),
        "/analytics/mcp/sessions".to_string(),
        "/analytics/mcp/sessions?agentId=cust-b-agent".to_string(),
        "/analytics/mcp/timeseries?groupBy=customer".to_string(),
        "/analytics/mcp/timeseries?interval=hour&groupBy=tool".to_string(),
        "/v1/customers/cust-a/balance".to_string(),
        format!("/v1/exports/billing?period={month}"),
        format!("/v1/exports/billing?period={month}&format=json&customerId=cust-a"),
    ];
    for path in &reads {
        let (status, text) = s.get_text(path, &token);
        assert_eq!(status, 200, "{path}: {text}");
        for word in ["cust-b", "\"sb\"", "\"sm\"", "\"ga\""] {
            assert!(!text.contains(word), "{path} shows {word}: {text}");
        }
    }
    // Its sessions: sa only (sm mixes customers, ga is globex's).
    let (_, sessions) = s.get("/analytics/mcp/sessions", &token);
    let ids: Vec<&str> = sessions["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["sessionId"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["sa"], "{sessions}");
    assert_eq!(s.get("/analytics/mcp/sessions/sa", &token).0, 200);
    for other in ["sb", "sm", "ga"] {
        let (status, answer) = s.get(&format!("/analytics/mcp/sessions/{other}"), &token);
        assert_eq!(status, 404, "{other}: {answer}");
        assert!(
            answer["message"].as_str().unwrap().contains("customer"),
            "{answer}"
        );
    }
    let (_, series) = s.get("/analytics/mcp/timeseries?groupBy=customer", &token);
    assert_eq!(series["series"].as_array().unwrap().len(), 1, "{series}");
    assert_eq!(series["series"][0]["key"], "cust-a", "{series}");

    // Another customer's rows, by name: refused, and said so.
    for path in [
        "/v1/customers/cust-b/balance".to_string(),
        format!("/v1/exports/billing?period={month}&customerId=cust-b"),
    ] {
        let (status, answer) = s.get(&path, &token);
        assert_eq!(status, 403, "{path}: {answer}");
        assert!(
            answer["message"].as_str().unwrap().contains("cust-a"),
            "{answer}"
        );
    }
    // The operator's margins and every write: refused.
    assert_eq!(s.get("/v1/guard/states", &token).0, 403);
    assert_eq!(s.get("/v1/guard/check?agentId=cust-a-agent", &token).0, 403);
    let writes = [
        (
            "/v1/ingest/events",
            customer_call("p1", "cust-a", "sa").to_string(),
        ),
        (
            "/v1/ingest/batch",
            batch(&[customer_call("p2", "cust-a", "sa")]),
        ),
        (
            "/v1/customers/cust-a/credits",
            json!({"amountMicros": 1000, "idempotencyKey": "g"}).to_string(),
        ),
        (
            "/v1/authorize",
            json!({"nonce": "n", "customerId": "cust-a", "toolName": "t"}).to_string(),
        ),
        (
            "/v1/portal/tokens",
            json!({"customerId": "cust-b", "expiresInSeconds": 60}).to_string(),
        ),
    ];
    for (path, body) in &writes {
        let (status, answer) = s.post(path, &token, body);
        assert_eq!(status, 403, "{path}: {answer}");
    }
    assert_eq!(s.get("/analytics/mcp/summary", &token).1["calls"], 3);

    // Tampered, foreign and expired tokens: 401, each saying why.
    let mut tampered = token.clone().into_bytes();
    let last = tampered.len() - 2;
    tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    let foreign = ingestor::portal::PortalSigner::new(Some("a secret this server does not have!"))
        .issue("acme", "cust-a", chrono::Utc::now().timestamp() + 600);
    let short = portal_token(&s, ACME, "cust-a", 1);
    std::thread::sleep(Duration::from_millis(2100));
    for (what, bad, says) in [
        ("tampered", tampered.as_str(), "signature"),
        ("foreign", foreign.as_str(), "signature"),
        ("expired", short.as_str(), "expired"),
        ("malformed", "mcpp_garbage", "malformed"),
    ] {
        let (status, answer) = s.get("/analytics/mcp/summary", bad);
        assert_eq!(status, 401, "{what}: {answer}");
        assert!(
            answer["message"].as_str().unwrap().contains(says),
            "{what}: {answer}"
        );
    }

    // Issuing: admin keys only, a customer, 1 s to 30 days.
    let ask =
        |key: &str, body: serde_json::Value| s.post("/v1/portal/tokens", key, &body.to_string());
    assert_eq!(
        ask(
            ACME_READ,
            json!({"customerId": "c", "expiresInSeconds": 60})
        )
        .0,
        403
    );
    for (body, says) in [
        (
            json!({"customerId": "c", "expiresInSeconds": 0}),
            "expiresInSeconds",
        ),
        (
            json!({"customerId": "c", "expiresInSeconds": 2_592_001}),
            "expiresInSeconds",
        ),
        (
            json!({"customerId": "", "expiresInSeconds": 60}),
            "customerId",
        ),
        (json!({"expiresInSeconds": 60}), "customerId"),
    ] {
        let (status, answer) = ask(ACME, body.clone());
        assert_eq!(status, 400, "{body}: {answer}");
        assert!(
            answer["message"].as_str().unwrap().contains(says),
            "{body}: {answer}"
        );
    }
}

/// What a customer may read of a tenant answer, by this test's own rule: the same answer
/// without the operator's costs (JSON fields, CSV columns), in the `customer` view.
fn as_customer_sees_it(tenant_answer: &str) -> String {
    const COSTS: [&str; 4] = ["cogsMicros", "cogsUsd", "grossProfitMicros", "margin"];
    fn strip(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(fields) => {
                fields.retain(|name, _| !COSTS.contains(&name.as_str()));
                fields.values_mut().for_each(strip);
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(strip),
            _ => {}
        }
    }
    if let Ok(mut value) = serde_json::from_str::<serde_json::Value>(tenant_answer) {
        strip(&mut value);
        if value.get("view").is_some() {
            value["view"] = json!("customer");
        }
        return value.to_string();
    }
    // CSV: every column but cogs_micros and cogs_usd.
    let mut lines = tenant_answer.split_terminator("\r\n");
    let header: Vec<&str> = lines.next().unwrap_or_default().split(',').collect();
    let kept: Vec<usize> = (0..header.len())
        .filter(|&i| !["cogs_micros", "cogs_usd"].contains(&header[i]))
        .collect();
    let keep = |line: &str| {
        let cells: Vec<&str> = line.split(',').collect();
        kept.iter().map(|&i| cells[i]).collect::<Vec<_>>().join(",") + "\r\n"
    };
    std::iter::once(header.join(","))
        .chain(lines.map(str::to_string))
        .map(|line| keep(&line))
        .collect()
}

/// A value to send for a parameter, and whether it names another customer's rows (which a
/// portal token must be refused, not answered empty).
type Fill = Vec<(String, bool)>;

/// Every GET of the OpenAPI document that takes a key, as URLs: its path parameters filled from
/// `fill`; then with its required query parameters only, with each value of each enum parameter,
/// all enums at once, and each value `fill` knows for the other query parameters. Each URL comes
/// with its documented path, its operation, and whether it names another customer's rows.
fn every_documented_read(
    doc: &serde_json::Value,
    fill: &dyn Fn(&str) -> Option<Fill>,
) -> Vec<(String, serde_json::Value, String, bool)> {
    let month = chrono::Utc::now().format("%Y-%m").to_string();
    let mut reads = Vec::new();
    for (path, methods) in doc["paths"].as_object().unwrap() {
        let Some(op) = methods.get("get") else {
            continue;
        };
        if op["security"].is_null() {
            continue; // /healthz and the like take no key
        }
        let params = op["parameters"].as_array().cloned().unwrap_or_default();
        let mut urls = vec![(path.clone(), false)];
        for p in params.iter().filter(|p| p["in"] == "path") {
            let name = p["name"].as_str().unwrap();
            let values =
                fill(name).unwrap_or_else(|| panic!("{path}: say what to fill in for `{name}`"));
            urls = urls
                .iter()
                .flat_map(|(u, foreign)| {
                    values.iter().map(move |(v, other)| {
                        (u.replace(&format!("{{{name}}}"), v), *foreign || *other)
                    })
                })
                .collect();
        }
        let required: Vec<String> = params
            .iter()
            .filter(|p| p["in"] == "query" && p["required"] == true)
            .map(|p| match p["name"].as_str().unwrap() {
                "period" => format!("period={month}"),
                other => panic!("{path}: say what to send as its required `{other}`"),
            })
            .collect();
        let mut queries = vec![(required.clone(), false)];
        let mut all_enums = required.clone();
        for p in params
            .iter()
            .filter(|p| p["in"] == "query" && p["required"] != true)
        {
            let name = p["name"].as_str().unwrap();
            let mut schema = &p["schema"];
            if let Some(r) = schema["$ref"].as_str() {
                schema =
                    &doc["components"]["schemas"][r.trim_start_matches("#/components/schemas/")];
            }
            let values: Fill = match schema["enum"].as_array() {
                Some(values) => values
                    .iter()
                    .map(|v| (v.as_str().unwrap().to_string(), false))
                    .collect(),
                None => fill(name).unwrap_or_default(),
            };
            for (value, foreign) in &values {
                let mut q = required.clone();
                q.push(format!("{name}={value}"));
                queries.push((q, *foreign));
            }
            if schema["enum"].is_array() {
                all_enums.push(format!("{name}={}", values.last().unwrap().0));
            }
        }
        queries.push((all_enums, false));
        for (url, foreign) in &urls {
            for (q, other) in &queries {
                let url = match q.is_empty() {
                    true => url.clone(),
                    false => format!("{url}?{}", q.join("&")),
                };
                reads.push((path.clone(), op.clone(), url, *foreign || *other));
            }
        }
    }
    reads
}

#[test]
fn every_read_endpoint_answers_a_portal_token_only_its_customers_rows() {
    // `both` holds cust-a's and cust-b's calls and grants; `only_a` cust-a's alone. A portal
    // token of cust-a on `both` must read exactly what a tenant key reads on `only_a`, costs
    // left out.
    let at = (chrono::Utc::now() - chrono::Duration::minutes(1)).to_rfc3339();
    let call = |key: &str, customer: &str, session: &str, tokens: i64| {
        let mut call = customer_call(key, customer, session);
        call["occurredAt"] = json!(at);
        call["metadata"]["outputTokens"] = json!(tokens);
        call
    };
    let a_calls = [
        call("a1", "cust-a", "sa", 5),
        call("a2", "cust-a", "sa", 50),
        call("a3", "cust-a", "sa2", 500),
    ];
    let b_calls = [
        call("b1", "cust-b", "sb", 7),
        call("b2", "cust-b", "sb", 70),
    ];
    let both = Server::start();
    let only_a = Server::start();
    let all: Vec<_> = a_calls.iter().chain(&b_calls).cloned().collect();
    let grant = |s: &Server, customer: &str, amount: i64| {
        let body = json!({"amountMicros": amount, "idempotencyKey": format!("g-{customer}"), "note": format!("{customer}'s credits")});
        let (status, answer) = s.post(
            &format!("/v1/customers/{customer}/credits"),
            ACME,
            &body.to_string(),
        );
        assert_eq!(status, 201, "{answer}");
    };
    grant(&both, "cust-a", 1_000_000);
    grant(&both, "cust-b", 2_000_000);
    grant(&only_a, "cust-a", 1_000_000);
    assert_eq!(both.post("/v1/ingest/batch", ACME, &batch(&all)).0, 202);
    assert_eq!(
        only_a.post("/v1/ingest/batch", ACME, &batch(&a_calls)).0,
        202
    );
    let token = portal_token(&both, ACME, "cust-a", 600);
    assert_eq!(both.get("/analytics/mcp/summary", &token).1["calls"], 3);

    let doc: serde_json::Value = serde_json::from_str(&ingestor::openapi::document()).unwrap();
    let fill = |name: &str| -> Option<Fill> {
        let values: &[(&str, bool)] = match name {
            "sessionId" => &[("sa", false), ("sb", true)],
            "customerId" => &[("cust-a", false), ("cust-b", true)],
            "agentId" => &[("cust-a-agent", false), ("cust-b-agent", false)],
            _ => return None,
        };
        Some(values.iter().map(|(v, f)| (v.to_string(), *f)).collect())
    };
    // When a grant was made differs between the two servers; nothing else may.
    let unstamped = |text: &str| -> String {
        let mut value: serde_json::Value = serde_json::from_str(text).unwrap();
        for g in value["grants"].as_array_mut().into_iter().flatten() {
            g["grantedAt"] = json!("…");
        }
        value.to_string()
    };
    let reads = every_documented_read(&doc, &fill);
    let (mut compared, mut refused) = (0, 0);
    for (path, op, url, foreign) in &reads {
        let (status, text) = both.get_text(url, &token);
        let portal_readable = op["security"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s.get("portal_token").is_some());
        if !portal_readable {
            assert_eq!(
                status, 403,
                "{url} answered a portal token {status} but does not list portal_token: {text}"
            );
            refused += 1;
            continue;
        }
        if *foreign {
            assert!([403, 404].contains(&status), "{url}: {status} {text}");
            for other in ["cust-b-", "\"sb\"", "2000000"] {
                assert!(
                    !text.contains(other),
                    "{url} shows {other} to cust-a's token: {text}"
                );
            }
            refused += 1;
            continue;
        }
        assert_eq!(status, 200, "{url}: {text}");
        let (tenant_status, tenant_text) = only_a.get_text(url, ACME);
        assert_eq!(tenant_status, 200, "{path}: {tenant_text}");
        let expected = as_customer_sees_it(&tenant_text);
        match serde_json::from_str::<serde_json::Value>(&text) {
            Ok(_) => assert_eq!(
                serde_json::from_str::<serde_json::Value>(&unstamped(&text)).unwrap(),
                serde_json::from_str::<serde_json::Value>(&unstamped(&expected)).unwrap(),
                "{url}: the portal token's answer is not cust-a's rows without costs"
            ),
            Err(_) => assert_eq!(
                text, expected,
                "{url}: the portal token's export is not cust-a's lines without costs"
            ),
        }
        compared += 1;
    }
    println!("{compared} reads compared with the oracle, {refused} refused");
    assert!(
        compared >= 25 && refused >= 8,
        "{compared} compared, {refused} refused"
    );
}
