//! The whole embedded path through the real HTTP server: ingest, rate, store, analyze.

use crate::common::*;
use serde_json::{json, Value};

fn by_tool(s: &Server, key: &str) -> Value {
    let (status, body) = s.get("/analytics/mcp/revenue/by-tool", key);
    assert_eq!(status, 200, "{body}");
    body
}

fn summary(s: &Server, key: &str) -> Value {
    let (status, body) = s.get("/analytics/mcp/summary", key);
    assert_eq!(status, 200, "{body}");
    body
}

#[test]
fn the_seed_event_is_rated_7550_1529_and_shows_in_every_endpoint() {
    let s = Server::start();
    let (status, mut answer) = s.post("/v1/ingest/events", ACME, SEED);
    assert_eq!(status, 202, "{answer}");
    // The seed has no key and no time: accepted, with a warning about retries.
    let warnings = answer.as_object_mut().unwrap().remove("warnings").unwrap();
    assert_eq!(warnings[0]["index"], 0);
    assert_eq!(
        answer,
        json!({"accepted":1,"duplicates":0,"failed":0,"errors":[],"killedSessionIds":[]})
    );

    let (_, raw) = s.get_text("/analytics/mcp/revenue/by-tool", ACME);
    assert!(
        raw.contains(r#""tools":[{"toolName":"web_search","calls":1,"errors":0,"revenueMicros":7550,"cogsMicros":1529,"grossProfitMicros":6021,"margin":0.7975,"inputTokens":1200,"outputTokens":450,"durationMsSum":542,"avgDurationMs":542,"maxDurationMs":542,"sessions":1}],"nextCursor":null}"#),
        "fields in their documented order: {raw}"
    );
    let tools = by_tool(&s, ACME);
    let row = &tools["tools"][0];
    assert_eq!(row["toolName"], "web_search");
    assert_eq!(
        (row["revenueMicros"].as_i64(), row["cogsMicros"].as_i64()),
        (Some(7550), Some(1529))
    );
    assert_eq!(row["calls"], 1);
    assert_eq!(row["margin"], 0.7975);
    assert_eq!(
        (row["inputTokens"].as_i64(), row["outputTokens"].as_i64()),
        (Some(1200), Some(450))
    );
    assert_eq!(row["durationMsSum"], 542);

    let sum = summary(&s, ACME);
    assert_eq!(
        (sum["revenueMicros"].as_i64(), sum["sessions"].as_i64()),
        (Some(7550), Some(1))
    );

    let (_, agents) = s.get("/analytics/mcp/by-agent", ACME);
    assert_eq!(agents["agents"][0]["agentId"], "agent_gpt4o_prod");
    assert_eq!(agents["agents"][0]["daily"][0]["revenueMicros"], 7550);

    let (_, sessions) = s.get("/analytics/mcp/sessions", ACME);
    assert_eq!(sessions["sessions"][0]["sessionId"], "sess_abc123");
    let (status, one) = s.get("/analytics/mcp/sessions/sess_abc123", ACME);
    assert_eq!(status, 200);
    assert_eq!(one["byTool"][0]["cogsMicros"], 1529);
}

#[test]
fn a_repeated_key_changes_nothing_and_is_counted_as_duplicate() {
    let s = Server::start();
    let events = [
        call("k1", "search", "a1", "s1"),
        call("k2", "search", "a1", "s1"),
    ];
    let (_, first) = s.post("/v1/ingest/batch", ACME, &batch(&events));
    assert_eq!(
        (first["accepted"].as_i64(), first["duplicates"].as_i64()),
        (Some(2), Some(0))
    );
    // A retrying client sends the batch again; a key repeated inside one batch counts too.
    let (_, again) = s.post("/v1/ingest/batch", ACME, &batch(&events));
    assert_eq!(
        (again["accepted"].as_i64(), again["duplicates"].as_i64()),
        (Some(0), Some(2))
    );
    let repeat = [
        call("k3", "search", "a1", "s1"),
        call("k3", "search", "a1", "s1"),
    ];
    let (_, inner) = s.post("/v1/ingest/batch", ACME, &batch(&repeat));
    assert_eq!(
        (inner["accepted"].as_i64(), inner["duplicates"].as_i64()),
        (Some(1), Some(1))
    );

    let sum = summary(&s, ACME);
    assert_eq!(sum["calls"], 3);
    assert_eq!(sum["revenueMicros"], 3 * CALL_REVENUE);
}

/// Without an idempotencyKey the key comes from the event's canonical JSON: spacing and field
/// order (Swagger's "Try it out" sends its own) do not make a second event. An event stored by
/// an earlier version, under the hash of its bytes, still catches a retry of those bytes.
#[test]
fn an_event_without_a_key_is_one_event_however_it_is_spaced_or_ordered() {
    use backends::sink::TenantBatch;
    use backends::store::{sqlite, StoreWriter};
    use schemas::event::{legacy_derived_idempotency_key, RatedEvent};
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    // With `occurredAt`, the content (time included) is the event's identity.
    let (seed, at) = timed_seed();
    let earlier = seed.replace("542", "600");
    actix_web::rt::System::new().block_on(async {
        let (mut writer, _) = sqlite::open(dir.path(), &config.sqlite).unwrap();
        let stored = RatedEvent {
            idempotency_key: legacy_derived_idempotency_key(&earlier),
            tool_name: "web_search".into(),
            ..RatedEvent::sample_call("", chrono::Utc::now().timestamp_millis())
        };
        writer
            .write(&[TenantBatch::new("acme".into(), vec![stored])])
            .await
            .unwrap();
    });
    let s = Server::start_in(dir, config);
    let post = |body: &str| {
        let (status, answer) = s.post("/v1/ingest/events", ACME, body);
        assert_eq!(status, 202, "{answer}");
        (
            answer["accepted"].as_i64().unwrap(),
            answer["duplicates"].as_i64().unwrap(),
        )
    };
    assert_eq!(post(&seed), (1, 0));
    let pretty_and_reordered = format!(
        r#"{{
  "metadata": {{ "outputTokens": 450, "inputTokens": 1200 }},
  "executionDurationMs": 542,
  "agentId": "agent_gpt4o_prod",
  "sessionId": "sess_abc123",
  "toolName": "web_search",
  "productType": "MCP_SERVER",
  "occurredAt": "{at}",
  "metricName": "mcp_server.tool_invocations"
}}"#
    );
    assert_eq!(post(&pretty_and_reordered), (0, 1));
    assert_eq!(post(&seed.replace(",\"", ", \"")), (0, 1));
    assert_eq!(post(&earlier), (0, 1), "a retry of an event stored before");
    assert_eq!(post(&seed.replace("542", "543")), (1, 0), "other content");
    assert_eq!(summary(&s, ACME)["calls"], 3);
}

/// Two real calls with equal content, sent with neither a key nor a time, are two events
/// (never merged), and the answer says what a retry of them would do.
#[test]
fn events_without_a_key_or_a_time_are_each_a_call_and_the_answer_says_so() {
    let s = Server::start();
    for _ in 0..2 {
        let (status, answer) = s.post("/v1/ingest/events", ACME, SEED);
        assert_eq!(status, 202, "{answer}");
        assert_eq!(answer["accepted"], 1, "{answer}");
        let warning = answer["warnings"][0]["message"].as_str().unwrap();
        assert!(warning.contains("send an idempotencyKey"), "{answer}");
        std::thread::sleep(std::time::Duration::from_millis(3));
    }
    // Twice in one request: two calls too.
    let (_, both) = s.post("/v1/ingest/events", ACME, &format!("[{SEED},{SEED}]"));
    assert_eq!(both["accepted"], 2, "{both}");
    let (_, keyed) = s.post(
        "/v1/ingest/events",
        ACME,
        &call("k1", "t", "a", "s").to_string(),
    );
    assert!(keyed.get("warnings").is_none(), "{keyed}");
    assert_eq!(summary(&s, ACME)["calls"], 5);
}

#[test]
fn a_bad_event_fails_alone_with_its_index_and_the_rest_are_stored() {
    let s = Server::start();
    let mut no_tool = call("bad1", "x", "a", "s");
    no_tool.as_object_mut().unwrap().remove("toolName");
    let mut bad_status = call("bad2", "x", "a", "s");
    bad_status["executionStatus"] = json!("EXPLODED");
    let mut bad_type = call("bad3", "x", "a", "s");
    bad_type["executionDurationMs"] = json!("slow");
    let events = [
        call("good1", "search", "a", "s"),
        no_tool,
        bad_status,
        call("good2", "fetch", "a", "s"),
        bad_type,
        json!("not an object"),
    ];
    let (status, answer) = s.post("/v1/ingest/batch", ACME, &batch(&events));
    assert_eq!(status, 202, "{answer}");
    assert_eq!(
        (answer["accepted"].as_i64(), answer["failed"].as_i64()),
        (Some(2), Some(4))
    );
    let errors = answer["errors"].as_array().unwrap();
    let at = |i: usize| {
        errors.iter().find(|e| e["index"] == i).unwrap()["message"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(at(1), "toolName is required for productType MCP_SERVER");
    assert!(
        at(2).starts_with("executionStatus `EXPLODED` is not one of"),
        "{}",
        at(2)
    );
    assert!(
        at(4).starts_with("executionDurationMs: invalid type: string"),
        "{}",
        at(4)
    );
    assert!(
        at(5).starts_with("an event must be a JSON object"),
        "{}",
        at(5)
    );
    assert_eq!(summary(&s, ACME)["calls"], 2);
}

#[test]
fn keys_decide_the_tenant_and_scopes_what_it_may_do() {
    let s = Server::start();
    let (status, body) = s.post_with(
        "/v1/ingest/events",
        None,
        SEED,
        &[("Content-Type", "application/json")],
    );
    assert_eq!(status, 401);
    assert!(
        body["message"].as_str().unwrap().contains("X-API-Key"),
        "{body}"
    );
    let (status, body) = s.post("/v1/ingest/events", "no-such-key", SEED);
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("unauthorized"))
    );
    let (status, body) = s.get("/analytics/mcp/summary", "no-such-key");
    assert_eq!(status, 401, "{body}");

    // A tenant header may confirm the key's tenant, never select another.
    let json_ct = ("Content-Type", "application/json");
    let (status, _) = s.post_with(
        "/v1/ingest/events",
        Some(ACME),
        SEED,
        &[json_ct, ("X-Tenant-Id", "acme")],
    );
    assert_eq!(status, 202);
    let (status, body) = s.post_with(
        "/v1/ingest/events",
        Some(ACME),
        SEED,
        &[json_ct, ("X-Tenant-Id", "globex")],
    );
    assert_eq!(status, 403);
    assert!(
        body["message"].as_str().unwrap().contains("does not match"),
        "{body}"
    );
    let (status, _) = s.get_with("/analytics/mcp/summary", ACME, &[("X-Tenant-Id", "globex")]);
    assert_eq!(status, 403);

    // Scopes: an SDK key cannot read; an analyst key cannot ingest.
    let (status, body) = s.get("/analytics/mcp/summary", ACME_INGEST);
    assert_eq!(status, 403);
    assert_eq!(body["message"], "this API key lacks the `read` scope");
    let (status, _) = s.post("/v1/ingest/events", ACME_READ, SEED);
    assert_eq!(status, 403);
    let (status, _) = s.post(
        "/v1/ingest/events",
        ACME_INGEST,
        &call("x", "t", "a", "s").to_string(),
    );
    assert_eq!(status, 202);
    assert_eq!(summary(&s, ACME_READ)["calls"], 2);
    // Bearer works for ingest too.
    let (status, _) = s.post_with(
        "/v1/ingest/events",
        None,
        &call("bearer", "t", "a", "s").to_string(),
        &[json_ct, ("Authorization", &format!("Bearer {ACME_INGEST}"))],
    );
    assert_eq!(status, 202);
}

#[test]
fn a_tenant_never_sees_another_tenants_data() {
    let s = Server::start();
    s.post(
        "/v1/ingest/batch",
        ACME,
        &batch(&[call("a1", "acme-tool", "acme-agent", "acme-session")]),
    );
    // The same idempotency key in another tenant is another event.
    s.post(
        "/v1/ingest/batch",
        GLOBEX,
        &batch(&[call("a1", "globex-tool", "globex-agent", "globex-session")]),
    );

    let text = |key: &str| {
        let mut all = String::new();
        for path in [
            "/analytics/mcp/revenue/by-tool",
            "/analytics/mcp/by-agent",
            "/analytics/mcp/summary",
            "/analytics/mcp/sessions",
        ] {
            all.push_str(&s.get(path, key).1.to_string());
        }
        all
    };
    let acme = text(ACME);
    assert!(
        acme.contains("acme-tool") && !acme.contains("globex"),
        "{acme}"
    );
    let globex = text(GLOBEX);
    assert!(
        globex.contains("globex-tool") && !globex.contains("acme"),
        "{globex}"
    );
    let (status, _) = s.get("/analytics/mcp/sessions/globex-session", ACME);
    assert_eq!(status, 404);
    let (status, _) = s.get("/analytics/mcp/sessions?agentId=globex-agent", ACME);
    assert_eq!(status, 200);
    assert_eq!(
        s.get("/analytics/mcp/sessions?agentId=globex-agent", ACME)
            .1["sessions"],
        json!([])
    );
}

#[test]
fn malformed_bodies_are_refused_whole_with_what_is_wrong() {
    let s = Server::start();
    let cases: &[(&str, &str, u16, &str)] = &[
        ("/v1/ingest/batch", "{\"events\":[", 400, "ends early"),
        ("/v1/ingest/batch", "{events:[]}", 400, "not valid JSON"),
        (
            "/v1/ingest/batch",
            "[]",
            400,
            "send a bare array to /v1/ingest/events",
        ),
        ("/v1/ingest/batch", "{}", 400, "no `events` array"),
        ("/v1/ingest/batch", "{\"events\":{}}", 400, "wrong shape"),
        ("/v1/ingest/batch", "{\"events\":[]}", 400, "no events"),
        ("/v1/ingest/events", "[]", 400, "no events"),
        (
            "/v1/ingest/events",
            "42",
            400,
            "one event object or a JSON array",
        ),
        (
            "/v1/ingest/events",
            "",
            400,
            "one event object or a JSON array",
        ),
    ];
    for (path, body, want_status, want_text) in cases {
        let (status, answer) = s.post(path, ACME, body);
        assert_eq!(status, *want_status, "{path} {body}: {answer}");
        let message = answer["message"].as_str().unwrap_or_default();
        assert!(message.contains(want_text), "{path} {body}: {message}");
    }
    let many: Vec<Value> = (0..1001)
        .map(|i| call(&format!("k{i}"), "t", "a", "s"))
        .collect();
    let (status, answer) = s.post("/v1/ingest/batch", ACME, &batch(&many));
    assert_eq!(status, 400);
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("1001 events; the limit is 1000"),
        "{answer}"
    );
    let (status, answer) = s.post_with(
        "/v1/ingest/batch",
        Some(ACME),
        &batch(&many[..1]),
        &[("Content-Type", "text/plain")],
    );
    assert_eq!(status, 415, "{answer}");
    assert_eq!(
        summary(&s, ACME)["calls"],
        0,
        "nothing of a refused request is stored"
    );
}

#[test]
fn a_body_over_the_limit_is_413() {
    let s = Server::start_with(|c| c.ingest.max_body_bytes = 4096);
    let events: Vec<Value> = (0..100)
        .map(|i| call(&format!("k{i}"), "t", "a", "s"))
        .collect();
    let (status, answer) = s.post("/v1/ingest/batch", ACME, &batch(&events));
    assert_eq!(status, 413, "{answer}");
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("larger than 4096 bytes"),
        "{answer}"
    );
    let (status, _) = s.post("/v1/ingest/batch", ACME, &batch(&events[..2]));
    assert_eq!(status, 202);
}

#[test]
fn heartbeats_are_accepted_never_billed_and_refresh_the_session() {
    let s = Server::start();
    s.post(
        "/v1/ingest/batch",
        ACME,
        &batch(&[call("c1", "search", "agent", "sess-hb")]),
    );
    let heartbeat = |key: &str, boundary: &str| {
        json!({
            "idempotencyKey": key, "metricName": "system.session.heartbeat", "customerId": "system",
            "quantity": 1, "productType": "MCP_SERVER", "sessionId": "sess-hb", "sessionBoundary": boundary,
            "metadata": {"heartbeatType": "PERIODIC", "uptimeMs": 1234}
        })
    };
    let (status, answer) = s.post(
        "/v1/ingest/batch",
        ACME,
        &batch(&[heartbeat("hb1", "HEARTBEAT")]),
    );
    assert_eq!(status, 202);
    assert_eq!(answer["accepted"], 1);
    assert_eq!(answer["killedSessionIds"], json!([]));
    let sum = summary(&s, ACME);
    assert_eq!(
        (sum["calls"].as_i64(), sum["revenueMicros"].as_i64()),
        (Some(1), Some(CALL_REVENUE))
    );
    let (_, session) = s.get("/analytics/mcp/sessions/sess-hb", ACME);
    assert_eq!(session["ended"], false);
    s.post(
        "/v1/ingest/batch",
        ACME,
        &batch(&[heartbeat("hb2", "SESSION_END")]),
    );
    let (_, session) = s.get("/analytics/mcp/sessions/sess-hb", ACME);
    assert_eq!(
        (session["ended"].as_bool(), session["calls"].as_i64()),
        (Some(true), Some(1))
    );
    assert_eq!(
        session["byTool"].as_array().unwrap().len(),
        1,
        "heartbeats are not a tool"
    );
}

#[test]
fn concurrent_clients_land_exactly_once() {
    let s = Server::start();
    let threads = 8;
    let batches_each = 20;
    let per_batch = 50;
    std::thread::scope(|scope| {
        for t in 0..threads {
            let s = &s;
            scope.spawn(move || {
                for b in 0..batches_each {
                    // Keys overlap between neighbouring threads: every key is posted twice.
                    let events: Vec<Value> = (0..per_batch)
                        .map(|i| {
                            call(
                                &format!("k-{}-{b}-{i}", t / 2),
                                "search",
                                &format!("agent-{t}"),
                                "s",
                            )
                        })
                        .collect();
                    let (status, answer) = s.post("/v1/ingest/batch", ACME, &batch(&events));
                    assert_eq!(status, 202, "{answer}");
                }
            });
        }
    });
    let unique = (threads / 2) * batches_each * per_batch;
    let sum = summary(&s, ACME);
    assert_eq!(sum["calls"], unique);
    assert_eq!(sum["revenueMicros"], unique as i64 * CALL_REVENUE);
    assert_eq!(sum["cogsMicros"], unique as i64 * CALL_COGS);
}

#[test]
fn accepted_events_survive_a_restart() {
    let s = Server::start();
    let (status, _) = s.post("/v1/ingest/events", ACME, SEED);
    assert_eq!(status, 202);
    let dir = s.stop();
    let config = crate::common::config(dir.path());
    let s = Server::start_in(dir, config);
    assert_eq!(summary(&s, ACME)["revenueMicros"], 7550);
    let keyed = call("survivor", "t", "a", "s").to_string();
    assert_eq!(s.post("/v1/ingest/events", ACME, &keyed).0, 202);
    let dir = s.stop();
    let config = crate::common::config(dir.path());
    let s = Server::start_in(dir, config);
    let (_, again) = s.post("/v1/ingest/events", ACME, &keyed);
    assert_eq!(again["duplicates"], 1, "dedup survives the restart too");
}

#[test]
fn analytics_parameters_are_checked() {
    let s = Server::start();
    let (status, body) = s.get("/analytics/mcp/summary?from=yesterday", ACME);
    assert_eq!(status, 400);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("not a date like 2026-11-21"),
        "{body}"
    );
    let (status, body) = s.get("/analytics/mcp/summary?form=2026-01-01", ACME);
    assert_eq!(status, 400);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("unknown field `form`"),
        "{body}"
    );
    let (status, _) = s.get("/analytics/mcp/sessions?limit=0", ACME);
    assert_eq!(status, 400);
    let (status, body) = s.get("/analytics/mcp/summary?from=2026-11-01&to=2026-11-05", ACME);
    assert_eq!(status, 200);
    assert_eq!(
        (body["from"].as_str(), body["to"].as_str()),
        (Some("2026-11-01"), Some("2026-11-05"))
    );
}

#[test]
fn a_wrong_method_is_405_with_allow() {
    let s = Server::start();
    let (status, body) = s.get("/v1/ingest/batch", ACME);
    assert_eq!(status, 405, "{body}");
    assert_eq!(body["message"], "this path answers POST only");
    let (status, body) = s.post("/analytics/mcp/summary", ACME, "{}");
    assert_eq!(status, 405, "{body}");
    assert_eq!(body["error"], "method_not_allowed");
    let answer = ureq::head(format!("{}/healthz", s.base)).call().unwrap();
    assert_eq!(answer.status(), 200, "GET paths answer HEAD");
    let answer = ureq::delete(format!("{}/healthz", s.base))
        .config()
        .http_status_as_error(false)
        .build()
        .call()
        .unwrap();
    assert_eq!(answer.headers()["allow"], "GET, HEAD");
}

/// Lists of tools come a page at a time: `limit` rows after `cursor`, highest revenue first,
/// then by name, with the next page's cursor until the last. Every tool once, whatever the
/// page size; a session's `byTool` pages the same way.
#[test]
fn lists_of_tools_are_paged_with_a_cursor() {
    let s = Server::start();
    // 250 tools in one session: `big-*` with more output tokens (more revenue), the rest tied.
    let events: Vec<Value> = (0..250)
        .map(|n| {
            let mut e = call(&format!("p{n}"), &format!("tool-{n:03}"), "a", "paged");
            if n % 50 == 0 {
                e["toolName"] = format!("big-{n:03}").into();
                e["metadata"]["outputTokens"] = 1000.into();
            }
            e
        })
        .collect();
    let (status, answer) = s.post(
        "/v1/ingest/batch",
        INITECH,
        &json!({ "events": events }).to_string(),
    );
    assert_eq!(
        (status, answer["accepted"].as_u64()),
        (202, Some(250)),
        "{answer}"
    );

    let walk = |first: &str, rows: &str| -> (Vec<String>, usize) {
        let (mut names, mut pages, mut url) = (Vec::new(), 0, first.to_string());
        loop {
            let (status, page) = s.get(&url, INITECH);
            assert_eq!(status, 200, "{page}");
            pages += 1;
            assert!(pages <= 250, "{first}: more pages than tools; last {page}");
            let rows = page[rows].as_array().unwrap();
            names.extend(
                rows.iter()
                    .map(|t| t["toolName"].as_str().unwrap().to_string()),
            );
            match page["nextCursor"].as_str() {
                Some(cursor) => {
                    assert!(!rows.is_empty());
                    url = format!("{first}&cursor={cursor}");
                }
                None => break,
            }
        }
        (names, pages)
    };
    let mut expected: Vec<String> = (0..250)
        .map(|n| match n % 50 {
            0 => format!("big-{n:03}"),
            _ => format!("tool-{n:03}"),
        })
        .collect();
    expected.sort_by_key(|name| (!name.starts_with("big"), name.clone()));

    let (all, _) = walk("/analytics/mcp/revenue/by-tool?limit=1000", "tools");
    assert_eq!(all, expected);
    // The default page is 100 rows.
    let (status, first) = s.get("/analytics/mcp/revenue/by-tool", INITECH);
    assert_eq!(status, 200);
    assert_eq!(first["tools"].as_array().unwrap().len(), 100);
    assert!(first["nextCursor"].is_string(), "{first}");
    for limit in [1, 7, 100, 249, 250] {
        let (names, pages) = walk(
            &format!("/analytics/mcp/revenue/by-tool?limit={limit}"),
            "tools",
        );
        assert_eq!(names, expected, "limit {limit}");
        assert_eq!(pages, 250usize.div_ceil(limit), "limit {limit}");
    }
    let (names, pages) = walk("/analytics/mcp/sessions/paged?limit=60", "byTool");
    assert_eq!((names, pages), (expected, 5));
    let (_, session) = s.get("/analytics/mcp/sessions/paged?limit=60", INITECH);
    assert_eq!(
        session["tools"], 250,
        "the count is the session's, not the page's"
    );

    for (query, what) in [
        ("limit=0", "limit must be 1 to 1000"),
        ("limit=1001", "limit must be 1 to 1000"),
        ("limit=ten", "limit `ten` is not a whole number"),
        ("cursor=nope", "cursor `nope` is not one this API gave"),
    ] {
        for path in [
            "/analytics/mcp/revenue/by-tool",
            "/analytics/mcp/sessions/paged",
        ] {
            let (status, answer) = s.get(&format!("{path}?{query}"), INITECH);
            assert_eq!(status, 400, "{path}?{query}: {answer}");
            assert!(
                answer["message"].as_str().unwrap().contains(what),
                "{answer}"
            );
        }
    }
}
