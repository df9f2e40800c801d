//! Charge before the tool runs, through the real `serve` (in-memory state, grants in SQLite):
//! grants, balances, authorizations under concurrency, settlement by the call's event, release,
//! expiry, caps, and charges made once per event key.

use crate::common::*;
use schemas::config::Config;
use serde_json::{json, Value};

/// What `authorize_body` quotes on the test plan: one call, no tokens, no duration.
pub const QUOTE: i64 = 5000;

/// `serve` whose config has `extra` appended (it lands in the last tenant, `initech`, unless
/// it opens a section of its own).
pub fn serve_with(extra: &str) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let text = format!("{}\n{extra}", config_text(dir.path()));
    let config = Config::from_toml(&text).unwrap();
    config.validate().unwrap();
    Server::start_in(dir, config)
}

pub fn authorize_body(nonce: &str, customer: &str) -> String {
    json!({"nonce": nonce, "customerId": customer, "toolName": "search", "agentId": "a", "sessionId": "s"})
        .to_string()
}

pub fn grant(c: &Client, key: &str, customer: &str, amount: i64, grant_key: &str) -> (u16, Value) {
    c.post(
        &format!("/v1/customers/{customer}/credits"),
        key,
        &json!({"amountMicros": amount, "idempotencyKey": grant_key, "note": "test"}).to_string(),
    )
}

pub fn balance(c: &Client, key: &str, customer: &str) -> Value {
    let (status, balance) = c.get(&format!("/v1/customers/{customer}/balance"), key);
    assert_eq!(status, 200, "{balance}");
    // The identity every answer keeps, to the µUSD.
    assert_eq!(
        balance["availableMicros"].as_i64().unwrap(),
        balance["grantedMicros"].as_i64().unwrap()
            - balance["settledMicros"].as_i64().unwrap()
            - balance["reservedMicros"].as_i64().unwrap(),
        "{balance}"
    );
    balance
}

/// The usage event of an authorized call: its key is the nonce; `tokens` output tokens change
/// its rated amount (3 µUSD each on the test plan).
pub fn settling_call(nonce: &str, customer: &str, output_tokens: i64) -> Value {
    json!({
        "idempotencyKey": nonce,
        "metricName": "mcp_server.tool_invocations",
        "toolName": "search",
        "agentId": "a",
        "sessionId": "s",
        "customerId": customer,
        "metadata": {"outputTokens": output_tokens},
    })
}

/// `n` authorizations at once, one thread each; answers (status, body) in request order.
pub fn authorize_all(clients: &[&Client], key: &str, bodies: &[String]) -> Vec<(u16, Value)> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = bodies
            .iter()
            .enumerate()
            .map(|(i, body)| {
                let client = clients[i % clients.len()];
                scope.spawn(move || client.post("/v1/authorize", key, body))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// 200 concurrent authorizations against a balance of exactly 37 quotes: 37 pass, 163 are
/// refused for the balance, and 37 quotes are reserved.
pub fn exactly_37_of_200_pass(clients: &[&Client], key: &str, customer: &str) {
    let (status, answer) = grant(clients[0], key, customer, 37 * QUOTE, "g-37");
    assert_eq!(status, 201, "{answer}");
    let bodies: Vec<String> = (0..200)
        .map(|i| authorize_body(&format!("n-{customer}-{i}"), customer))
        .collect();
    let answers = authorize_all(clients, key, &bodies);
    let passed = answers.iter().filter(|(s, _)| *s == 200).count();
    let refused: Vec<&Value> = answers
        .iter()
        .filter(|(s, _)| *s == 402)
        .map(|(_, a)| a)
        .collect();
    assert_eq!((passed, refused.len()), (37, 163), "{answers:?}");
    assert!(refused
        .iter()
        .all(|a| a["reason"] == "insufficient_balance" && a["authorized"] == false));
    let b = balance(clients[0], key, customer);
    assert_eq!(b["reservedMicros"], 37 * QUOTE);
    assert_eq!(b["availableMicros"], 0);
    assert_eq!(b["inFlight"], 37);
}

#[test]
fn concurrent_authorizations_reserve_exactly_what_the_balance_covers() {
    let s = serve_with("");
    exactly_37_of_200_pass(&[&s.client], INITECH, "cust-37");
}

/// One nonce asked 50 times at once: one reservation, 50 identical answers.
pub fn one_nonce_asked_50_times_reserves_once(clients: &[&Client], key: &str) {
    let (status, _) = grant(clients[0], key, "cust-nonce", 10 * QUOTE, "g-nonce");
    assert_eq!(status, 201);
    let bodies = vec![authorize_body("same-nonce", "cust-nonce"); 50];
    let answers = authorize_all(clients, key, &bodies);
    assert!(answers.iter().all(|a| *a == answers[0]), "{answers:?}");
    assert_eq!(answers[0].0, 200);
    let b = balance(clients[0], key, "cust-nonce");
    assert_eq!(
        (b["reservedMicros"].as_i64(), b["inFlight"].as_i64()),
        (Some(QUOTE), Some(1))
    );
}

#[test]
fn one_nonce_asked_concurrently_answers_its_first_decision_and_reserves_once() {
    let s = serve_with("");
    one_nonce_asked_50_times_reserves_once(&[&s.client], INITECH);
}

#[test]
fn settlement_charges_the_rated_amount_whatever_the_quote_and_ends_the_reservation() {
    let s = serve_with("[credits]\nreservation_seconds = 1\n");
    let c = "cust-settle";
    let (status, answer) = grant(&s, INITECH, c, 100_000, "g1");
    assert_eq!(status, 201, "{answer}");
    assert_eq!(answer["grant"]["amountMicros"], 100_000);
    assert_eq!(answer["balance"]["availableMicros"], 100_000);

    // Authorize, then report less than the quote: the settled amount is the rated one.
    let (status, a) = s.post("/v1/authorize", INITECH, &authorize_body("n1", c));
    assert_eq!(
        (status, a["quoteMicros"].as_i64()),
        (200, Some(QUOTE)),
        "{a}"
    );
    let b = balance(&s, INITECH, c);
    assert_eq!(
        (b["reservedMicros"].as_i64(), b["settledMicros"].as_i64()),
        (Some(QUOTE), Some(0))
    );
    // A call with quantity 0.5 is rated at half the per-call price.
    let mut cheaper = settling_call("n1", c, 0);
    cheaper["quantity"] = json!(0.5);
    let (status, _) = s.post("/v1/ingest/events", INITECH, &cheaper.to_string());
    assert_eq!(status, 202);
    let b = balance(&s, INITECH, c);
    assert_eq!(
        (
            b["reservedMicros"].as_i64(),
            b["settledMicros"].as_i64(),
            b["availableMicros"].as_i64()
        ),
        (Some(0), Some(2500), Some(97_500))
    );

    // More than the quote: 1000 output tokens add 3000.
    let (status, _) = s.post("/v1/authorize", INITECH, &authorize_body("n2", c));
    assert_eq!(status, 200);
    let (status, _) = s.post(
        "/v1/ingest/events",
        INITECH,
        &settling_call("n2", c, 1000).to_string(),
    );
    assert_eq!(status, 202);
    let b = balance(&s, INITECH, c);
    assert_eq!(
        (b["reservedMicros"].as_i64(), b["settledMicros"].as_i64()),
        (Some(0), Some(2500 + 8000))
    );

    // Released: nothing is charged, the reservation ends; a second release changes nothing.
    let (status, _) = s.post("/v1/authorize", INITECH, &authorize_body("n3", c));
    assert_eq!(status, 200);
    assert_eq!(balance(&s, INITECH, c)["reservedMicros"], QUOTE);
    let (status, r) = s.post("/v1/authorize/n3/release", INITECH, "");
    assert_eq!((status, r["released"].as_bool()), (200, Some(true)), "{r}");
    let (_, r) = s.post("/v1/authorize/n3/release", INITECH, "");
    assert_eq!(r["released"], false);
    let (status, r) = s.post("/v1/authorize/never-asked/release", INITECH, "");
    assert_eq!(status, 404, "{r}");
    assert_eq!(balance(&s, INITECH, c)["reservedMicros"], 0);

    // Expired: the reservation ends by itself after reservation_seconds.
    let (status, _) = s.post("/v1/authorize", INITECH, &authorize_body("n4", c));
    assert_eq!(status, 200);
    assert_eq!(balance(&s, INITECH, c)["reservedMicros"], QUOTE);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let b = balance(&s, INITECH, c);
    assert_eq!(
        (b["reservedMicros"].as_i64(), b["inFlight"].as_i64()),
        (Some(0), Some(0))
    );

    // Usage without an authorization is settled too: the call happened.
    let (status, _) = s.post(
        "/v1/ingest/events",
        INITECH,
        &settling_call("unauthorized", c, 0).to_string(),
    );
    assert_eq!(status, 202);
    let b = balance(&s, INITECH, c);
    assert_eq!(b["settledMicros"], 2500 + 8000 + 5000);
    // Settled equals an independent sum of the stored events' revenue (the only customer here).
    let (_, summary) = s.get("/analytics/mcp/summary", INITECH);
    assert_eq!(summary["revenueMicros"], b["settledMicros"]);
    assert_eq!(b["availableMicros"], 100_000 - 15_500);
}

#[test]
fn an_overrun_is_charged_in_full_and_refuses_later_calls_until_a_grant_lifts_it() {
    let s = serve_with("");
    let c = "cust-over";
    assert_eq!(grant(&s, INITECH, c, QUOTE, "g1").0, 201);
    assert_eq!(
        s.post("/v1/authorize", INITECH, &authorize_body("o1", c)).0,
        200
    );
    // The call cost more than its quote: 2000 output tokens, 11000 in all.
    let (status, _) = s.post(
        "/v1/ingest/events",
        INITECH,
        &settling_call("o1", c, 2000).to_string(),
    );
    assert_eq!(status, 202);
    let b = balance(&s, INITECH, c);
    assert_eq!(b["availableMicros"], QUOTE - 11_000);
    let (status, refused) = s.post("/v1/authorize", INITECH, &authorize_body("o2", c));
    assert_eq!(status, 402);
    assert_eq!(refused["reason"], "insufficient_balance");
    assert_eq!(refused["availableMicros"], QUOTE - 11_000);
    assert_eq!(refused["quoteMicros"], QUOTE);
    assert!(
        refused.get("retryAfterSeconds").is_none(),
        "waiting does not lift a balance"
    );
    assert!(refused["message"].as_str().unwrap().contains("grant"));
    // The same nonce asked again answers the same refusal, even after a grant.
    assert_eq!(grant(&s, INITECH, c, 11_000, "g2").0, 201);
    let (status, again) = s.post("/v1/authorize", INITECH, &authorize_body("o2", c));
    assert_eq!((status, &again), (402, &refused));
    let (status, _) = s.post("/v1/authorize", INITECH, &authorize_body("o3", c));
    assert_eq!(status, 200);
}

#[test]
fn in_flight_and_spend_caps_bind_postpaid_customers_too() {
    let s = Server::start_with(|config| {
        let initech = &mut config.tenants[2];
        initech.max_in_flight_per_customer = Some(1);
        initech.customer_caps = vec![schemas::config::CustomerCapConfig {
            window: schemas::config::LimitWindow::Day,
            max_spend_micros: 3 * QUOTE,
        }];
    });
    let c = "cust-caps";
    // Two at once with max 1 in flight: one passes, one is told to wait.
    let bodies = vec![authorize_body("f1", c), authorize_body("f2", c)];
    let answers = authorize_all(&[&s.client], INITECH, &bodies);
    let mut statuses: Vec<u16> = answers.iter().map(|(s, _)| *s).collect();
    statuses.sort();
    assert_eq!(statuses, [200, 402], "{answers:?}");
    let (passed, refused) = if answers[0].0 == 200 {
        ("f1", &answers[1].1)
    } else {
        ("f2", &answers[0].1)
    };
    assert_eq!(refused["reason"], "too_many_in_flight");
    assert!(refused["retryAfterSeconds"].as_u64().unwrap() >= 1);
    // Settled: the next passes.
    let (status, _) = s.post(
        "/v1/ingest/events",
        INITECH,
        &settling_call(passed, c, 0).to_string(),
    );
    assert_eq!(status, 202);
    assert_eq!(
        s.post("/v1/authorize", INITECH, &authorize_body("f3", c)).0,
        200
    );
    // Released: the next passes.
    assert_eq!(s.post("/v1/authorize/f3/release", INITECH, "").0, 200);
    assert_eq!(
        s.post("/v1/authorize", INITECH, &authorize_body("f4", c)).0,
        200
    );
    // The day's cap is 3 quotes: the first call and f4 settled, f5 reaches the cap exactly,
    // f6 would pass it and is refused until the day ends.
    let (status, _) = s.post(
        "/v1/ingest/events",
        INITECH,
        &settling_call("f4", c, 0).to_string(),
    );
    assert_eq!(status, 202);
    assert_eq!(
        s.post("/v1/authorize", INITECH, &authorize_body("f5", c)).0,
        200
    );
    let (status, _) = s.post(
        "/v1/ingest/events",
        INITECH,
        &settling_call("f5", c, 0).to_string(),
    );
    assert_eq!(status, 202);
    let (status, capped) = s.post("/v1/authorize", INITECH, &authorize_body("f6", c));
    assert_eq!(status, 402, "{capped}");
    assert_eq!(capped["reason"], "spend_cap");
    assert!(capped["retryAfterSeconds"].as_u64().unwrap() <= 86_400);
    // A postpaid customer has no balance to show: no availableMicros (not -20000000).
    assert!(capped.get("availableMicros").is_none(), "{capped}");
    // A postpaid customer has no balance: nothing is granted, settled counts only for prepaid.
    let b = balance(&s, INITECH, c);
    assert_eq!(
        (b["grantedMicros"].as_i64(), b["settledMicros"].as_i64()),
        (Some(0), Some(0))
    );
}

/// `prepaid_only`: a customer never granted credits is refused with what to do, a granted one
/// with balance is authorized; without the option the same customer is postpaid.
#[test]
fn a_prepaid_only_tenant_refuses_customers_never_granted_credits() {
    let s = Server::start_with(|config| config.tenants[2].prepaid_only = true);
    let (status, refused) = s.post("/v1/authorize", INITECH, &authorize_body("po1", "cust-new"));
    assert_eq!(status, 402, "{refused}");
    assert_eq!(refused["authorized"], false);
    assert_eq!(refused["reason"], "no_credits");
    assert_eq!(refused["quoteMicros"], QUOTE);
    let message = refused["message"].as_str().unwrap();
    assert!(
        message.contains("no credits")
            && message.contains("POST /v1/customers/{customerId}/credits"),
        "{message}"
    );
    // Waiting does not help, and there is no balance to show.
    assert!(refused.get("retryAfterSeconds").is_none(), "{refused}");
    assert!(refused.get("availableMicros").is_none(), "{refused}");
    // Nothing was reserved for it.
    assert_eq!(balance(&s, INITECH, "cust-new")["reservedMicros"], 0);

    let (status, _) = grant(&s, INITECH, "cust-paid", 2 * QUOTE, "g-paid");
    assert_eq!(status, 201);
    let (status, answer) = s.post(
        "/v1/authorize",
        INITECH,
        &authorize_body("po2", "cust-paid"),
    );
    assert_eq!(status, 200, "{answer}");
    // The grant is what lifts the refusal.
    let (status, _) = grant(&s, INITECH, "cust-new", QUOTE, "g-new");
    assert_eq!(status, 201);
    let (status, answer) = s.post("/v1/authorize", INITECH, &authorize_body("po3", "cust-new"));
    assert_eq!(status, 200, "{answer}");

    // Without the option a customer never granted credits is postpaid, as before.
    let postpaid = serve_with("");
    let (status, answer) =
        postpaid.post("/v1/authorize", INITECH, &authorize_body("po4", "cust-new"));
    assert_eq!(status, 200, "{answer}");
}

#[test]
fn a_batch_resent_after_a_lost_answer_is_settled_once_and_counted_once_against_limits() {
    let s = serve_with("[[tenants.limits]]\nper = \"session\"\nwindow = \"hour\"\nmax_calls = 3\n");
    let c = "cust-resend";
    assert_eq!(grant(&s, INITECH, c, 100_000, "g1").0, 201);
    let events: Vec<Value> = (0..3)
        .map(|i| settling_call(&format!("r{i}"), c, 0))
        .collect();
    let body = batch(&events);
    let (status, first) = s.post("/v1/ingest/batch", INITECH, &body);
    assert_eq!(
        (status, first["accepted"].as_i64()),
        (202, Some(3)),
        "{first}"
    );
    // The same batch again, as a client does when the 202 was lost.
    let (status, again) = s.post("/v1/ingest/batch", INITECH, &body);
    assert_eq!(
        (status, again["duplicates"].as_i64()),
        (202, Some(3)),
        "{again}"
    );
    assert_eq!(
        again["killedSessionIds"],
        json!([]),
        "3 calls, limit 3: not breached"
    );
    assert_eq!(balance(&s, INITECH, c)["settledMicros"], 3 * QUOTE);
    // A fourth call breaches the limit: the counter holds 3, not 6.
    let (_, fourth) = s.post(
        "/v1/ingest/events",
        INITECH,
        &settling_call("r3", c, 0).to_string(),
    );
    assert_eq!(fourth["killedSessionIds"], json!(["s"]));
}

#[test]
fn grants_are_idempotent_validated_and_scoped() {
    let s = serve_with("");
    let (status, first) = grant(&s, ACME, "cust-g", 5_000_000, "grant-42");
    assert_eq!(status, 201, "{first}");
    // The same body again answers the first grant and adds nothing.
    let (status, again) = grant(&s, ACME, "cust-g", 5_000_000, "grant-42");
    assert_eq!(status, 201);
    assert_eq!(again["grant"], first["grant"]);
    assert_eq!(again["balance"]["grantedMicros"], 5_000_000);
    // Another amount under the key (a typo in finance's script): refused, said, nothing added.
    let (status, typo) = grant(&s, ACME, "cust-g", 7_000_000, "grant-42");
    assert_eq!(status, 409, "{typo}");
    assert!(
        typo["message"]
            .as_str()
            .unwrap()
            .contains("grant of 5000000 µUSD"),
        "{typo}"
    );
    assert_eq!(balance(&s, ACME, "cust-g")["grantedMicros"], 5_000_000);
    // Used for another customer: a conflict, not a silent answer about someone else.
    let (status, conflict) = grant(&s, ACME, "cust-other", 1, "grant-42");
    assert_eq!(status, 409, "{conflict}");
    for (body, says) in [
        (
            json!({"amountMicros": 0, "idempotencyKey": "z"}),
            "amountMicros",
        ),
        (
            json!({"amountMicros": -5, "idempotencyKey": "z"}),
            "amountMicros",
        ),
        (
            json!({"amountMicros": "5", "idempotencyKey": "z"}),
            "amountMicros",
        ),
        (json!({"amountMicros": 5}), "idempotencyKey"),
        (
            json!({"amountMicros": 5, "idempotencyKey": "z", "expiresAt": "2001-01-01T00:00:00Z"}),
            "expiresAt",
        ),
        (
            json!({"amountMicros": 5, "idempotencyKey": "z", "amount": 5}),
            "amount",
        ),
    ] {
        let (status, error) = s.post("/v1/customers/cust-g/credits", ACME, &body.to_string());
        assert_eq!(status, 400, "{body}: {error}");
        assert!(
            error["message"].as_str().unwrap().contains(says),
            "{body}: {error}"
        );
    }
    // Scopes: granting needs admin, reading a balance read, authorizing ingest.
    assert_eq!(grant(&s, ACME_READ, "cust-g", 5, "k").0, 403);
    assert_eq!(grant(&s, ACME_INGEST, "cust-g", 5, "k").0, 403);
    assert_eq!(s.get("/v1/customers/cust-g/balance", ACME_INGEST).0, 403);
    assert_eq!(
        balance(&s, ACME_READ, "cust-g")["grants"][0]["idempotencyKey"],
        "grant-42"
    );
    assert_eq!(
        s.post("/v1/authorize", ACME_READ, &authorize_body("x", "cust-g"))
            .0,
        403
    );
    // Another tenant sees nothing of it.
    let other = balance(&s, INITECH, "cust-g");
    assert_eq!(
        (
            other["grantedMicros"].as_i64(),
            other["grants"].as_array().unwrap().len()
        ),
        (Some(0), 0)
    );
    // Authorize refuses bad input with what to fix.
    for (body, says) in [
        (json!({"customerId": "c", "toolName": "t"}), "nonce"),
        (json!({"nonce": "n", "toolName": "t"}), "customerId"),
        (json!({"nonce": "n", "customerId": "c"}), "toolName"),
        (
            json!({"nonce": "n", "customerId": "c", "toolName": "t", "estimatedDurationMs": -1}),
            "estimatedDurationMs",
        ),
    ] {
        let (status, error) = s.post("/v1/authorize", ACME, &body.to_string());
        assert_eq!(status, 400, "{body}: {error}");
        assert!(
            error["message"].as_str().unwrap().contains(says),
            "{body}: {error}"
        );
    }
}

#[test]
fn a_restarted_serve_rebuilds_balances_from_the_store() {
    let s = serve_with("");
    let c = "cust-restart";
    assert_eq!(grant(&s, INITECH, c, 50_000, "g1").0, 201);
    for i in 0..3 {
        let (status, _) = s.post(
            "/v1/ingest/events",
            INITECH,
            &settling_call(&format!("e{i}"), c, i * 100).to_string(),
        );
        assert_eq!(status, 202);
    }
    let before = balance(&s, INITECH, c);
    assert_eq!(before["settledMicros"], 3 * QUOTE + 300 * 3);
    let dir = s.stop();
    let config = Config::from_toml(&config_text(dir.path())).unwrap();
    let s = Server::start_in(dir, config);
    assert_eq!(balance(&s, INITECH, c), before);
}

/// A nonce names one call: asked again for another customer, another tool or another quote,
/// it answers 409 and reserves nothing; asked again for the same call, its first decision.
#[test]
fn a_nonce_replayed_for_another_call_is_a_conflict() {
    let s = serve_with("");
    assert_eq!(grant(&s, INITECH, "rich", 1_000_000, "g-rich").0, 201);
    let first = authorize_body("n-once", "rich");
    assert_eq!(s.post("/v1/authorize", INITECH, &first).0, 200);
    let other_tool = json!({"nonce": "n-once", "customerId": "rich", "toolName": "other"});
    let dearer = json!({"nonce": "n-once", "customerId": "rich", "toolName": "search",
        "agentId": "a", "sessionId": "s", "estimatedOutputTokens": 10});
    for replay in [
        authorize_body("n-once", "poor"),
        other_tool.to_string(),
        dearer.to_string(),
    ] {
        let (status, answer) = s.post("/v1/authorize", INITECH, &replay);
        assert_eq!(status, 409, "{replay}: {answer}");
        assert!(
            answer["message"]
                .as_str()
                .unwrap()
                .contains("customer `rich`"),
            "{answer}"
        );
    }
    let (status, same) = s.post("/v1/authorize", INITECH, &first);
    assert_eq!((status, same["authorized"].as_bool()), (200, Some(true)));
    assert_eq!(balance(&s, INITECH, "rich")["reservedMicros"], QUOTE);
    assert_eq!(balance(&s, INITECH, "poor")["inFlight"], 0);
}

/// One rule for customer ids wherever they appear: no control character (as events refuse).
#[test]
fn customer_ids_with_control_characters_are_refused_everywhere() {
    let s = serve_with(
        "[portal]\nsecret = \"e4b1f07a9c2d58e3b6a0f1c7d94e2b5a8c3f6d0e1b7a9c4f2e5d8b0a3c6f9e17\"\n",
    );
    let bad = "cust\nx";
    let (status, answer) = s.post(
        "/v1/authorize",
        INITECH,
        &json!({"nonce": "n1", "customerId": bad, "toolName": "search"}).to_string(),
    );
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["message"].as_str().unwrap().contains("U+000A"),
        "{answer}"
    );
    let (status, answer) = s.post(
        "/v1/portal/tokens",
        INITECH,
        &json!({"customerId": "cust\u{0}", "expiresInSeconds": 60}).to_string(),
    );
    assert_eq!(status, 400, "{answer}");
    let (status, answer) = s.post(
        "/v1/customers/cust%0Ax/credits",
        INITECH,
        &json!({"amountMicros": 5, "idempotencyKey": "k"}).to_string(),
    );
    assert_eq!(status, 400, "{answer}");
    let (status, answer) = s.post(
        "/v1/authorize",
        INITECH,
        &json!({"nonce": "n\u{1}", "customerId": "c", "toolName": "search"}).to_string(),
    );
    assert_eq!(status, 400, "{answer}");
}

/// `s` stopped and started again on the same data directory, with the test config.
fn restart(s: Server) -> Server {
    let dir = s.stop();
    let config = Config::from_toml(&config_text(dir.path())).unwrap();
    Server::start_in(dir, config)
}

/// The restart scenario, on `serve` and on the distributed mode: a prepaid customer's batch of
/// two calls before the state is lost, and one call after.
pub fn scenario_batch(customer: &str) -> String {
    batch(&[
        settling_call("r1", customer, 100),
        settling_call("r2", customer, 14),
    ])
}

pub fn scenario_call_after(customer: &str) -> String {
    settling_call("r3", customer, 7).to_string()
}

/// What the batch settles, and what the three calls are rated (3 µUSD per output token).
pub const SCENARIO_BATCH_MICROS: i64 = 2 * QUOTE + 3 * (100 + 14);
pub const SCENARIO_STORED_MICROS: i64 = SCENARIO_BATCH_MICROS + QUOTE + 3 * 7;

/// The first batch after a restart is charged once: the rebuild counts the stored batch and
/// claims its keys, so its settlement adds nothing on top. Then another restart agrees with
/// the live figure, and the balance equals the stored revenue of the customer's calls.
#[test]
fn the_first_batch_after_a_restart_is_charged_once() {
    let s = serve_with("");
    let c = "cust-r";
    assert_eq!(grant(&s, INITECH, c, 1_000_000, "g1").0, 201);
    let first = scenario_batch(c);
    assert_eq!(s.post("/v1/ingest/batch", INITECH, &first).0, 202);
    assert_eq!(
        balance(&s, INITECH, c)["settledMicros"],
        SCENARIO_BATCH_MICROS
    );
    let s = restart(s);
    let third = scenario_call_after(c);
    assert_eq!(s.post("/v1/ingest/events", INITECH, &third).0, 202);
    let stored_revenue = SCENARIO_STORED_MICROS;
    let live = balance(&s, INITECH, c);
    assert_eq!(live["settledMicros"], stored_revenue, "{live}");
    // The same batch re-sent after the restart: a duplicate, and nothing more is charged.
    let (status, answer) = s.post("/v1/ingest/batch", INITECH, &first);
    assert_eq!((status, answer["duplicates"].as_i64()), (202, Some(2)));
    assert_eq!(balance(&s, INITECH, c), live);
    let s = restart(s);
    assert_eq!(balance(&s, INITECH, c), live);
    let (_, summary) = s.get("/analytics/mcp/summary", INITECH);
    assert_eq!(summary["revenueMicros"], stored_revenue, "{summary}");
}

/// A call re-sent long after it was stored (past `credits.charged_keys_hours`, when its key's
/// claim is forgotten) is a duplicate the store reports, and charges nothing.
#[test]
fn a_call_re_sent_after_its_claim_is_forgotten_is_not_charged_again() {
    use backends::sink::TenantBatch;
    use backends::store::{sqlite, StoreWriter};
    use schemas::event::RatedEvent;
    let dir = tempfile::tempdir().unwrap();
    let config = Config::from_toml(&config_text(dir.path())).unwrap();
    let long_ago = chrono::Utc::now().timestamp_millis() - 30 * 3_600_000;
    actix_web::rt::System::new().block_on(async {
        let (mut writer, _) = sqlite::open(dir.path(), &config.sqlite).unwrap();
        let stored = RatedEvent {
            customer_id: "cust-d".into(),
            revenue_micros: QUOTE,
            ..RatedEvent::sample_call("old-1", long_ago)
        };
        writer
            .write(&[TenantBatch::new("initech".into(), vec![stored])])
            .await
            .unwrap();
    });
    let s = Server::start_in(dir, config);
    assert_eq!(grant(&s, INITECH, "cust-d", 50_000, "g1").0, 201);
    let resent = settling_call("old-1", "cust-d", 0).to_string();
    let (status, answer) = s.post("/v1/ingest/events", INITECH, &resent);
    assert_eq!(
        (status, answer["duplicates"].as_i64()),
        (202, Some(1)),
        "{answer}"
    );
    assert_eq!(balance(&s, INITECH, "cust-d")["settledMicros"], 0);
}

/// One scenario through both adapters of `CustomerBalances`, with the clock given: grants that
/// lapse, settlements before and after the lapse, a decision of each kind, replays, releases
/// and a tenant not loaded. The memory state (one lock) and Redis (the Lua scripts) answer
/// every step alike.
#[test]
fn the_memory_and_redis_states_decide_alike() {
    use backends::state::memory::MemoryState;
    use backends::state::redis::RedisState;
    let redis = std::env::var("MCP_METER_TEST_REDIS_URL")
        .expect("MCP_METER_TEST_REDIS_URL is not set: run scripts/test, which starts Redis");
    let prefix = format!("{}:", unique_database("balances"));
    let memory = MemoryState::new();
    actix_web::rt::System::new().block_on(async {
        let redis = RedisState::new(&redis, &prefix, std::time::Duration::from_secs(2)).unwrap();
        let on_redis = balance_scenario(&redis).await;
        let on_memory = balance_scenario(&memory).await;
        assert_eq!(on_redis, on_memory);
    });
}

async fn balance_scenario(state: &dyn backends::state::CustomerBalances) -> Vec<String> {
    use backends::state::{AuthorizeAsk, CapCounter, Settlement, StateError};
    use schemas::credits::{Decision, WalletGrant};
    const T: i64 = 1_800_000_000_000;
    let mut seen = Vec::new();
    let not_loaded = state.wallet("t", "c", T).await;
    assert!(matches!(not_loaded, Err(StateError::WalletsNotLoaded(_))));
    use backends::state::{LedgerMark, LedgerSeed, Loaded, WalletSeed, WindowCount};
    assert_eq!(state.ledger_mark("t").await.unwrap(), LedgerMark::Absent);
    let loaded = state
        .load_ledger("t", &LedgerMark::Absent, &LedgerSeed::default())
        .await
        .unwrap();
    assert_eq!(loaded, Loaded::Now);
    let lapsing = WalletGrant {
        amount_micros: 1000,
        expires_at_ms: Some(T + 100),
        settled_at_expiry: None,
    };
    let lasting = WalletGrant {
        expires_at_ms: None,
        amount_micros: 500,
        ..lapsing
    };
    state.add_grant("t", "c", "g1", lapsing, T).await.unwrap();
    state.add_grant("t", "c", "g2", lasting, T).await.unwrap();
    state.add_grant("t", "c", "g2", lapsing, T).await.unwrap();
    let cap = CapCounter {
        key: "cap:t:c".into(),
        max_spend_micros: 2000,
        window_end_ms: T + 1_000_000,
    };
    let settle = |key: &str, amount: i64| Settlement {
        key: key.into(),
        customer: "c".into(),
        amount_micros: amount,
        caps: vec![cap.clone()],
        always_claim: true,
    };
    let caps = [cap.clone()];
    let ask = |nonce: &'static str, quote: i64, now_ms: i64| AuthorizeAsk {
        tenant: "t",
        customer: "c",
        tool: "search",
        nonce,
        quote_micros: quote,
        max_in_flight: Some(2),
        prepaid_only: false,
        caps: &caps,
        now_ms,
        expires_at_ms: now_ms + 50,
        remember_until_ms: now_ms + 10_000,
    };
    let mut record = |what: String| seen.push(what);
    let claimed = state
        .settle(
            "t",
            &[settle("e1", 300), settle("e1", 300)],
            T + 50,
            T + 10_000,
        )
        .await
        .unwrap();
    record(format!("{claimed:?}"));
    for at in [T + 50, T + 150] {
        record(format!("{:?}", state.wallet("t", "c", at).await.unwrap()));
    }
    let claimed = state
        .settle("t", &[settle("e2", 200)], T + 200, T + 10_000)
        .await
        .unwrap();
    record(format!("{claimed:?}"));
    record(format!(
        "{:?}",
        state.wallet("t", "c", T + 200).await.unwrap()
    ));
    for (nonce, quote, at) in [
        ("n1", 400, T + 210),
        ("n2", 100, T + 210),
        ("n2", 100, T + 211),
        ("n3", 100, T + 212),
        ("n4", 50, T + 213),
        ("n5", 50, T + 300),
        ("n6", 1500, T + 300),
    ] {
        record(format!(
            "{nonce}: {:?}",
            state.authorize(&ask(nonce, quote, at)).await.unwrap()
        ));
    }
    record(format!(
        "{:?}",
        state.wallet("t", "c", T + 300).await.unwrap()
    ));
    record(format!(
        "{:?}",
        state.release("t", "n5", T + 301).await.unwrap()
    ));
    record(format!(
        "{:?}",
        state.release("t", "n5", T + 302).await.unwrap()
    ));
    record(format!(
        "{:?}",
        state.release("t", "nope", T + 302).await.unwrap()
    ));
    let claimed = state
        .settle("t", &[settle("n3", 10)], T + 303, T + 10_000)
        .await
        .unwrap();
    record(format!("{claimed:?}"));
    record(format!(
        "{:?}",
        state.wallet("t", "c", T + 303).await.unwrap()
    ));
    // A customer without a wallet, on a tenant whose counters do not count it: nothing to
    // charge, nothing claimed, so the same key again is not "charged before".
    let walletless = Settlement {
        customer: "nobody".into(),
        caps: Vec::new(),
        always_claim: false,
        ..settle("w1", 10)
    };
    for _ in 0..2 {
        let claimed = state
            .settle("t", std::slice::from_ref(&walletless), T + 304, T + 10_000)
            .await
            .unwrap();
        record(format!("{claimed:?}"));
    }
    record(format!(
        "{:?}",
        state.wallet("t", "nobody", T + 304).await.unwrap()
    ));
    // What the lapse kept: 300 of g1's 1000 was used before it lapsed.
    let last = state.wallet("t", "c", T + 303).await.unwrap();
    assert_eq!(last.granted_micros, 500 + 300);
    assert_eq!(last.settled_micros, 510);
    // Forgotten: a seed read before the forget is refused, one read after is loaded, and the
    // keys it counts are claimed.
    assert_eq!(state.ledger_mark("t").await.unwrap(), LedgerMark::Loaded(1));
    state.forget_ledger("t").await.unwrap();
    let forgotten = state.ledger_mark("t").await.unwrap();
    assert_eq!(forgotten, LedgerMark::Forgotten(1));
    assert!(matches!(
        state.wallet("t", "c", T + 310).await,
        Err(StateError::WalletsNotLoaded(_))
    ));
    let seed = LedgerSeed {
        wallets: vec![WalletSeed {
            customer: "c".into(),
            grants: vec![("g2".into(), lasting)],
            settled_micros: 700,
        }],
        charged: vec![("e9".into(), T + 10_000)],
        counters: vec![WindowCount {
            key: "cap:t:c".into(),
            value: 700,
            window_end_ms: T + 1_000_000,
        }],
        killed: Vec::new(),
        agent_sessions: Vec::new(),
    };
    let stale = state
        .load_ledger("t", &LedgerMark::Absent, &seed)
        .await
        .unwrap();
    assert_eq!(stale, Loaded::Changed);
    let fresh = state.load_ledger("t", &forgotten, &seed).await.unwrap();
    assert_eq!(fresh, Loaded::Now);
    assert_eq!(state.ledger_mark("t").await.unwrap(), LedgerMark::Loaded(2));
    let again = state.load_ledger("t", &forgotten, &seed).await.unwrap();
    assert_eq!(again, Loaded::Already);
    record(format!(
        "{:?}",
        state.wallet("t", "c", T + 311).await.unwrap()
    ));
    // e9 is counted by the seed: its settlement charges nothing.
    let claimed = state
        .settle("t", &[settle("e9", 50)], T + 312, T + 10_000)
        .await
        .unwrap();
    record(format!("{claimed:?}"));
    let after = state.wallet("t", "c", T + 312).await.unwrap();
    assert_eq!(after.settled_micros, 700);
    record(format!("{after:?}"));
    // prepaid_only: a customer never granted credits is refused, whatever else would pass; one
    // with grants is judged by its balance (c's is spent: -200); without the option the same
    // never-granted customer is postpaid.
    state
        .add_grant("t", "paid", "g-paid", lasting, T + 400)
        .await
        .unwrap();
    let prepaid_only = |nonce: &'static str, customer: &'static str, only: bool| AuthorizeAsk {
        customer,
        prepaid_only: only,
        ..ask(nonce, 10, T + 400)
    };
    let mut decisions = Vec::new();
    for (nonce, customer, only) in [
        ("p1", "never", true),
        ("p2", "c", true),
        ("p3", "paid", true),
        ("p4", "never", false),
    ] {
        let answer = state
            .authorize(&prepaid_only(nonce, customer, only))
            .await
            .unwrap();
        record(format!("{nonce}: {answer:?}"));
        decisions.push(match answer.decision {
            Decision::Authorized { .. } => "authorized",
            Decision::Refused { reason, .. } => reason.as_str(),
        });
    }
    assert_eq!(
        decisions,
        [
            "no_credits",
            "insufficient_balance",
            "authorized",
            "authorized"
        ]
    );
    seen
}
