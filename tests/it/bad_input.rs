//! The bad-input matrix: every way a client can get a request or an event wrong, through the
//! real HTTP server. Each case gets a 4xx, or a per-event error inside a 202, whose message
//! says what to fix; none gets a 5xx; the good event sent beside a bad one is stored.

use crate::common::*;
use serde_json::{json, Value};

/// The good event every per-event case sends first, with its own key.
fn good(n: usize) -> Value {
    call(&format!("good-{n}"), "web_search", "agent", "sess")
}

/// A valid call with `field` set to `value` (or removed, for `null` on a required field).
fn with(field: &str, value: Value) -> Value {
    let mut e = call("bad", "web_search", "agent", "sess");
    if value.is_null() {
        e.as_object_mut().unwrap().remove(field);
    } else {
        e[field] = value;
    }
    e
}

fn meta(value: Value) -> Value {
    with("metadata", value)
}

/// Per-event cases: (what, the bad event, what the error message must say).
fn event_cases() -> Vec<(&'static str, Value, &'static str)> {
    let now = chrono::Utc::now();
    let ago = |days: i64| (now - chrono::Duration::days(days)).to_rfc3339();
    let ahead = |minutes: i64| (now + chrono::Duration::minutes(minutes)).to_rfc3339();
    vec![
        (
            "missing metricName",
            with("metricName", Value::Null),
            "metricName",
        ),
        (
            "metricName a number",
            with("metricName", json!(7)),
            "metricName",
        ),
        (
            "missing toolName on a call",
            with("toolName", Value::Null),
            "toolName",
        ),
        ("toolName a number", with("toolName", json!(12)), "toolName"),
        (
            "toolName an object",
            with("toolName", json!({"a": 1})),
            "toolName",
        ),
        (
            "toolName of 33 emoji (66 UTF-16 units)",
            with("toolName", json!("😀".repeat(33))),
            "toolName",
        ),
        (
            "agentId of 37",
            with("agentId", json!("a".repeat(37))),
            "agentId",
        ),
        (
            "customerId of 65",
            with("customerId", json!("c".repeat(65))),
            "customerId",
        ),
        (
            "sessionId of 65",
            with("sessionId", json!("s".repeat(65))),
            "sessionId",
        ),
        (
            "idempotencyKey of 256",
            with("idempotencyKey", json!("k".repeat(256))),
            "idempotencyKey",
        ),
        (
            "metricName of 256",
            with("metricName", json!("m".repeat(256))),
            "metricName",
        ),
        (
            "productType of 21",
            with("productType", json!("P".repeat(21))),
            "productType",
        ),
        (
            "sessionBoundary of 33",
            with("sessionBoundary", json!("B".repeat(33))),
            "sessionBoundary",
        ),
        (
            "control character in toolName",
            with("toolName", json!("web\u{1}search")),
            "toolName",
        ),
        (
            "NUL in agentId",
            with("agentId", json!("a\u{0}b")),
            "agentId",
        ),
        (
            "newline in sessionId",
            with("sessionId", json!("s\n1")),
            "sessionId",
        ),
        (
            "negative executionDurationMs",
            with("executionDurationMs", json!(-5)),
            "executionDurationMs",
        ),
        (
            "huge executionDurationMs",
            with("executionDurationMs", json!(1e15)),
            "executionDurationMs",
        ),
        (
            "fractional executionDurationMs",
            with("executionDurationMs", json!(1.5)),
            "executionDurationMs",
        ),
        (
            "executionDurationMs a string",
            with("executionDurationMs", json!("542")),
            "executionDurationMs",
        ),
        ("negative quantity", with("quantity", json!(-1)), "quantity"),
        ("zero quantity", with("quantity", json!(0)), "quantity"),
        (
            "quantity \"NaN\"",
            with("quantity", json!("NaN")),
            "quantity",
        ),
        (
            "quantity \"Infinity\"",
            with("quantity", json!("Infinity")),
            "quantity",
        ),
        ("huge quantity", with("quantity", json!(1e300)), "quantity"),
        (
            "quantity with 7 decimals",
            with("quantity", json!(0.0000001)),
            "quantity",
        ),
        (
            "occurredAt 40 days old",
            with("occurredAt", json!(ago(40))),
            "occurredAt",
        ),
        (
            "occurredAt an hour ahead",
            with("occurredAt", json!(ahead(60))),
            "occurredAt",
        ),
        (
            "occurredAt unparsable",
            with("occurredAt", json!("yesterday")),
            "occurredAt",
        ),
        (
            "occurredAt without a zone",
            with("occurredAt", json!("2026-11-21T10:00:00")),
            "occurredAt",
        ),
        (
            "occurredAt a number",
            with("occurredAt", json!(1795181530000i64)),
            "occurredAt",
        ),
        (
            "unknown executionStatus",
            with("executionStatus", json!("EXPLODED")),
            "executionStatus",
        ),
        ("metadata an array", meta(json!([1, 2])), "metadata"),
        (
            "metadata over 16 KiB",
            meta(json!({"blob": "x".repeat(17 * 1024)})),
            "metadata",
        ),
        (
            "negative inputTokens",
            meta(json!({"inputTokens": -3})),
            "inputTokens",
        ),
        (
            "inputTokens a string",
            meta(json!({"inputTokens": "12"})),
            "inputTokens",
        ),
        (
            "huge outputTokens",
            meta(json!({"outputTokens": 1e13})),
            "outputTokens",
        ),
        (
            "heartbeat without sessionId",
            json!({"metricName": "system.session.heartbeat", "sessionBoundary": "HEARTBEAT"}),
            "sessionId",
        ),
        ("an event that is a number", json!(42), "object"),
        ("an event that is null", Value::Null, "object"),
        ("an event that is a string", json!("web_search"), "object"),
    ]
}

#[test]
fn every_bad_event_fails_alone_with_a_message_and_its_good_neighbour_is_stored() {
    let s = Server::start();
    let cases = event_cases();
    let mut report = Vec::new();
    for (n, (what, bad, wanted)) in cases.iter().enumerate() {
        let (status, answer) = s.post("/v1/ingest/batch", ACME, &batch(&[good(n), bad.clone()]));
        assert_eq!(status, 202, "{what}: {answer}");
        assert_eq!(
            (answer["accepted"].as_u64(), answer["failed"].as_u64()),
            (Some(1), Some(1)),
            "{what}: {answer}"
        );
        let error = &answer["errors"][0];
        assert_eq!(error["index"], 1, "{what}: {answer}");
        let message = error["message"].as_str().unwrap();
        assert!(
            message.contains(wanted),
            "{what}: `{message}` does not name {wanted}"
        );
        report.push(format!("{what}: {message}"));
    }
    // Every good neighbour is stored, and nothing of the bad ones.
    let (_, summary) = s.get("/analytics/mcp/summary", ACME);
    assert_eq!(summary["calls"], cases.len());
    println!(
        "{} per-event cases:\n  {}",
        cases.len(),
        report.join("\n  ")
    );
}

/// POSTs raw bytes with headers; answers status and body text.
fn post_raw(s: &Server, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut req = agent.post(format!("{}{path}", s.base));
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let mut answer = req.send(body).expect("the server answers");
    let status = answer.status().as_u16();
    (
        status,
        answer.body_mut().read_to_string().unwrap_or_default(),
    )
}

const JSON: (&str, &str) = ("Content-Type", "application/json");
const KEY: (&str, &str) = ("X-API-Key", ACME);

/// A whole-request case: what, path, headers, body, status, what the message must say.
type RequestCase = (
    &'static str,
    &'static str,
    Vec<(&'static str, &'static str)>,
    Vec<u8>,
    u16,
    &'static str,
);

fn request_cases() -> Vec<RequestCase> {
    let b = |s: &str| s.as_bytes().to_vec();
    let events = |n: usize| {
        batch(
            &(0..n)
                .map(|i| call(&format!("k{i}"), "t", "a", "s"))
                .collect::<Vec<_>>(),
        )
    };
    vec![
        (
            "truncated JSON",
            "/v1/ingest/batch",
            vec![KEY, JSON],
            b(r#"{"events":[{"metricName":"#),
            400,
            "ends early",
        ),
        (
            "invalid JSON",
            "/v1/ingest/batch",
            vec![KEY, JSON],
            b("{events: []}"),
            400,
            "not valid JSON",
        ),
        (
            "a number as the body",
            "/v1/ingest/batch",
            vec![KEY, JSON],
            b("42"),
            400,
            "takes a JSON object {\"events\":[...]}",
        ),
        (
            "a bare array to /batch",
            "/v1/ingest/batch",
            vec![KEY, JSON],
            b("[]"),
            400,
            "send a bare array to /v1/ingest/events",
        ),
        (
            "no events field",
            "/v1/ingest/batch",
            vec![KEY, JSON],
            b(r#"{"evnts":[]}"#),
            400,
            "no `events` array",
        ),
        (
            "events an object",
            "/v1/ingest/batch",
            vec![KEY, JSON],
            b(r#"{"events":{}}"#),
            400,
            "wrong shape",
        ),
        (
            "events null",
            "/v1/ingest/batch",
            vec![KEY, JSON],
            b(r#"{"events":null}"#),
            400,
            "no `events` array",
        ),
        (
            "empty batch",
            "/v1/ingest/batch",
            vec![KEY, JSON],
            b(r#"{"events":[]}"#),
            400,
            "no events; send 1 to 1000",
        ),
        (
            "1001 events",
            "/v1/ingest/batch",
            vec![KEY, JSON],
            b(&events(1001)),
            400,
            "1001 events; the limit is 1000",
        ),
        (
            "an empty body",
            "/v1/ingest/events",
            vec![KEY, JSON],
            b(""),
            400,
            "one event object or a JSON array",
        ),
        (
            "a string body to /events",
            "/v1/ingest/events",
            vec![KEY, JSON],
            b(r#""hi""#),
            400,
            "one event object or a JSON array",
        ),
        (
            "invalid UTF-8",
            "/v1/ingest/events",
            vec![KEY, JSON],
            vec![b'{', b'"', 0xff, 0xfe, b'"', b':', b'1', b'}'],
            400,
            "not valid JSON",
        ),
        (
            "a raw NUL byte",
            "/v1/ingest/events",
            vec![KEY, JSON],
            b("{\"metricName\":\"x\"\0}"),
            400,
            "not valid JSON",
        ),
        (
            "a body over the limit",
            "/v1/ingest/batch",
            vec![KEY, JSON],
            vec![b' '; 9 * 1024 * 1024],
            413,
            "larger than 8388608 bytes",
        ),
        (
            "text/plain",
            "/v1/ingest/events",
            vec![KEY, ("Content-Type", "text/plain")],
            b(SEED),
            415,
            "Content-Type `text/plain`",
        ),
        (
            "form encoding",
            "/v1/ingest/events",
            vec![KEY, ("Content-Type", "application/x-www-form-urlencoded")],
            b(SEED),
            415,
            "send application/json",
        ),
        (
            "no key",
            "/v1/ingest/events",
            vec![JSON],
            b(SEED),
            401,
            "no API key",
        ),
        (
            "an unknown key",
            "/v1/ingest/events",
            vec![("X-API-Key", "nope"), JSON],
            b(SEED),
            401,
            "not recognized",
        ),
        (
            "an empty bearer",
            "/v1/ingest/events",
            vec![("Authorization", "Bearer "), JSON],
            b(SEED),
            401,
            "no API key",
        ),
        (
            "a foreign tenant header",
            "/v1/ingest/events",
            vec![KEY, JSON, ("X-Tenant-Id", "globex")],
            b(SEED),
            403,
            "does not match this API key's tenant",
        ),
        (
            "a read-only key ingesting",
            "/v1/ingest/events",
            vec![("X-API-Key", ACME_READ), JSON],
            b(SEED),
            403,
            "lacks the `ingest` scope",
        ),
    ]
}

#[test]
fn every_bad_request_gets_a_4xx_that_says_what_to_fix_and_changes_nothing() {
    let s = Server::start();
    let cases = request_cases();
    let mut report = Vec::new();
    for (what, path, headers, body, status, wanted) in &cases {
        let (got, text) = post_raw(&s, path, headers, body);
        assert_eq!(got, *status, "{what}: {text}");
        let answer: Value =
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("{what}: not JSON: {text}"));
        let message = answer["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(wanted),
            "{what}: `{message}` does not say `{wanted}`"
        );
        report.push(format!("{what}: {got} {message}"));
    }
    let (_, summary) = s.get("/analytics/mcp/summary", ACME);
    assert_eq!(summary["calls"], 0, "no bad request stored anything");
    // Two events with one key inside one batch: the second is a duplicate, not an error.
    let twice = [call("same", "t", "a", "s"), call("same", "t", "a", "s")];
    let (status, answer) = s.post("/v1/ingest/batch", ACME, &batch(&twice));
    assert_eq!(status, 202);
    assert_eq!(
        (answer["accepted"].as_u64(), answer["duplicates"].as_u64()),
        (Some(1), Some(1)),
        "{answer}"
    );
    println!("{} request cases:\n  {}", cases.len(), report.join("\n  "));
    assert!(cases.len() + event_cases().len() + 1 >= 40);
}

/// A GET with `key`, answered whatever its status: the status, the body as JSON.
fn get_raw(s: &Server, path: &str, method: &str) -> (u16, Value) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let url = format!("{}{path}", s.base);
    let answer = match method {
        "GET" => agent.get(&url).header("X-API-Key", ACME).call(),
        _ => agent.delete(&url).header("X-API-Key", ACME).call(),
    };
    let mut answer = answer.expect("the server answers");
    let status = answer.status().as_u16();
    let text = answer.body_mut().read_to_string().unwrap_or_default();
    let body = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!("{method} {path} answered {status} with no JSON ({e}): {text:?}")
    });
    (status, body)
}

/// Paths that do not exist answer JSON like every other error, `GET /` says where to go, and a
/// bad query parameter is named, without actix's "Query deserialize error:" prefix.
#[test]
fn unknown_paths_answer_json_and_bad_query_parameters_are_named() {
    let s = Server::start();
    let (status, root) = get_raw(&s, "/", "GET");
    assert_eq!(status, 200, "{root}");
    assert_eq!(root["docs"], "/docs/", "{root}");
    assert_eq!(root["openapi"], "/openapi.json", "{root}");
    for (method, path) in [
        ("GET", "/nope"),
        ("GET", "/v1/ingest"),
        ("DELETE", "/analytics"),
    ] {
        let (status, body) = get_raw(&s, path, method);
        assert_eq!(status, 404, "{method} {path}: {body}");
        assert_eq!(body["error"], "not_found", "{body}");
        let message = body["message"].as_str().unwrap();
        assert!(
            message.contains(&format!("{method} {path}")) && message.contains("/docs/"),
            "{message}"
        );
    }
    let cases = [
        (
            "/analytics/mcp/sessions?limit=abc",
            "limit `abc` is not a whole number; give 1 to 1000",
        ),
        (
            "/analytics/mcp/sessions?limit=-3",
            "limit `-3` is not a whole number",
        ),
        (
            "/v1/exports/billing?period=2026-11&format=xml",
            "format `xml` is not one of csv, json",
        ),
        (
            "/analytics/mcp/summary?form=2026-11-01",
            "unknown field `form`",
        ),
        ("/v1/exports/billing?format=csv", "missing field `period`"),
    ];
    for (path, says) in cases {
        let (status, body) = get_raw(&s, path, "GET");
        assert_eq!(status, 400, "{path}: {body}");
        let message = body["message"].as_str().unwrap();
        assert!(message.contains(says), "{path}: {message}");
        assert!(!message.contains("deserialize error"), "{path}: {message}");
    }
}
