//! The API before and around authentication, through the real `serve`: a request without a key
//! is answered from its headers alone (no permit taken, no byte of its body read); a keyed body
//! must arrive whole within `http.body_timeout_ms`; small routes take small bodies; every key
//! and every customer's portal tokens have a rate limit; answers say `no-store`; `/docs/` has a
//! content security policy; `/metrics` can live on a listener of its own and counts each route
//! and each 402 reason.

use crate::common::*;
use crate::credits::{authorize_body, grant};
use schemas::config::Config;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// `serve` whose config has `sections` appended (they must open sections of their own).
fn serve_with(sections: &str) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let text = format!("{}\n{sections}", config_text(dir.path()));
    let config = Config::from_toml(&text).unwrap();
    config.validate().unwrap();
    Server::start_in(dir, config)
}

fn addr(s: &Server) -> String {
    s.base.trim_start_matches("http://").to_string()
}

/// Sends a request head announcing `length` body bytes, then `sent` of them, and leaves the
/// connection open.
fn partial_post(
    s: &Server,
    path: &str,
    key: Option<&str>,
    length: usize,
    sent: &[u8],
) -> TcpStream {
    let mut c = TcpStream::connect(addr(s)).unwrap();
    let key = key
        .map(|k| format!("X-API-Key: {k}\r\n"))
        .unwrap_or_default();
    write!(
        c,
        "POST {path} HTTP/1.1\r\nHost: x\r\n{key}Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    )
    .unwrap();
    c.write_all(sent).unwrap();
    c
}

/// The status line and body of what the server answered on `c`, waiting at most `within`.
fn answer_on(c: &mut TcpStream, within: Duration) -> (u16, String) {
    c.set_read_timeout(Some(within)).unwrap();
    let mut text = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match c.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                text.extend_from_slice(&buf[..n]);
                let t = String::from_utf8_lossy(&text);
                if let Some((head, body)) = t.split_once("\r\n\r\n") {
                    let length = head.lines().find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length: ")
                            .map(|v| v.trim().parse::<usize>().unwrap())
                    });
                    if length.is_some_and(|n| body.len() >= n) {
                        break;
                    }
                }
            }
            Err(e) => panic!(
                "no answer within {within:?}: {e}; read so far: {}",
                String::from_utf8_lossy(&text)
            ),
        }
    }
    let t = String::from_utf8_lossy(&text).to_string();
    let status = t
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = t
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[test]
fn a_request_without_a_key_is_answered_from_its_headers_and_takes_no_permit() {
    // Two ingest permits only: were keyless requests to take them, ingest would answer 503.
    let s = serve_with("[ingest]\nmax_in_flight_requests = 2\n");
    let started = Instant::now();
    let mut keyless: Vec<TcpStream> = Vec::new();
    for path in [
        "/v1/ingest/batch",
        "/v1/ingest/events",
        "/v1/authorize",
        "/v1/portal/tokens",
    ] {
        for _ in 0..8 {
            keyless.push(partial_post(&s, path, None, 8 << 20, b"{"));
        }
    }
    // Each is answered 401 though its body never came, and long before any body timeout.
    for c in &mut keyless {
        let (status, body) = answer_on(c, Duration::from_secs(5));
        assert_eq!(status, 401, "{body}");
        assert!(body.contains("no API key"), "{body}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // A wrong key too, and a key without the route's scope: 401 and 403 before the body.
    let mut wrong = partial_post(&s, "/v1/ingest/batch", Some("not-a-key"), 1000, b"");
    assert_eq!(answer_on(&mut wrong, Duration::from_secs(5)).0, 401);
    let mut reader = partial_post(&s, "/v1/customers/c1/credits", Some(ACME_READ), 1000, b"");
    let (status, body) = answer_on(&mut reader, Duration::from_secs(5));
    assert_eq!(status, 403, "{body}");
    // The legitimate caller is served at once.
    let (status, answer) = s.post(
        "/v1/ingest/events",
        ACME,
        &call("k1", "t", "a", "s").to_string(),
    );
    assert_eq!((status, &answer["accepted"]), (202, &json!(1)), "{answer}");
}

/// Sends `head` (a request with `Transfer-Encoding: chunked`), then chunks of `chunk` bytes
/// every `every` for up to 20 s; answers the status and how long after the first chunk the
/// server closed the connection (`None`: still open after 20 s).
fn chunked_until_closed(
    s: &Server,
    head: &str,
    chunk: usize,
    every: Duration,
) -> (u16, Option<Duration>) {
    let mut c = TcpStream::connect(addr(s)).unwrap();
    c.write_all(head.as_bytes()).unwrap();
    let mut writer = c.try_clone().unwrap();
    let started = Instant::now();
    let sender = std::thread::spawn(move || {
        let piece = format!("{chunk:x}\r\n{}\r\n", "x".repeat(chunk));
        while started.elapsed() < Duration::from_secs(20) {
            if writer.write_all(piece.as_bytes()).is_err() {
                return Some(started.elapsed());
            }
            std::thread::sleep(every);
        }
        None
    });
    let (status, _) = answer_on(&mut c, Duration::from_secs(5));
    // Then the server must close: reads end (EOF or reset) and writes fail.
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut buf = [0u8; 1024];
    let read_closed = loop {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => break started.elapsed(),
            Ok(_) => continue,
        }
    };
    let write_closed = sender.join().unwrap();
    let closed = write_closed
        .map(|w| w.max(read_closed))
        .filter(|d| *d < Duration::from_secs(20));
    (status, closed)
}

#[test]
fn a_chunked_body_nobody_reads_is_not_drained_the_connection_closes() {
    let s = Server::start();
    let chunked = |request: &str, key: &str| {
        format!("{request} HTTP/1.1\r\nHost: x\r\n{key}Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    };
    for (head, expected) in [
        // Keyless, a wrong key, a key without the scope: refused from the headers.
        (chunked("POST /v1/ingest/batch", ""), 401),
        (
            chunked("POST /v1/authorize", "X-API-Key: not-a-key\r\n"),
            401,
        ),
        (
            chunked(
                "POST /v1/customers/c1/credits",
                &format!("X-API-Key: {ACME_READ}\r\n"),
            ),
            403,
        ),
        // Routes that never read a body.
        (chunked("GET /healthz", ""), 200),
        (chunked("GET /v1/ingest/batch", ""), 405),
        (chunked("PUT /no/such/path", ""), 404),
    ] {
        // As fast as the client can send, and one chunk at a time.
        for (chunk, every) in [(64 << 10, Duration::ZERO), (1, Duration::from_millis(300))] {
            let (status, closed) = chunked_until_closed(&s, &head, chunk, every);
            assert_eq!(status, expected, "{head}");
            let closed = closed.unwrap_or_else(|| panic!("still open after 20 s: {head}"));
            assert!(
                closed < Duration::from_secs(5),
                "{head}: closed after {closed:?}"
            );
        }
    }
    // A keyed chunked body over the small cap: 413, then closed too.
    let (status, closed) = chunked_until_closed(
        &s,
        &chunked("POST /v1/authorize", &format!("X-API-Key: {ACME}\r\n")),
        64 << 10,
        Duration::ZERO,
    );
    assert_eq!(status, 413);
    assert!(
        closed.is_some_and(|c| c < Duration::from_secs(5)),
        "{closed:?}"
    );
    // A keyed chunked body that arrives whole is read as any other.
    let event = call("chunked", "t", "a", "s").to_string();
    let mut c = TcpStream::connect(addr(&s)).unwrap();
    write!(
        c,
        "{}{:x}\r\n{event}\r\n0\r\n\r\n",
        chunked("POST /v1/ingest/events", &format!("X-API-Key: {ACME}\r\n")),
        event.len()
    )
    .unwrap();
    let (status, body) = answer_on(&mut c, Duration::from_secs(5));
    assert_eq!(status, 202, "{body}");
}

#[test]
fn a_keyed_body_that_does_not_arrive_in_time_is_refused_408_and_frees_its_permit() {
    let s = serve_with("[ingest]\nmax_in_flight_requests = 2\n\n[http]\nbody_timeout_ms = 600\n");
    let mut slow: Vec<TcpStream> = (0..2)
        .map(|_| partial_post(&s, "/v1/ingest/events", Some(ACME), 100, b"{\"metric"))
        .collect();
    // Both permits are held while the bodies trickle: a third ingest is told it is busy.
    std::thread::sleep(Duration::from_millis(100));
    let (status, busy) = s.post(
        "/v1/ingest/events",
        ACME,
        &call("k0", "t", "a", "s").to_string(),
    );
    assert_eq!(
        (status, busy["error"].as_str()),
        (503, Some("busy")),
        "{busy}"
    );
    for c in &mut slow {
        let started = Instant::now();
        let (status, body) = answer_on(c, Duration::from_secs(5));
        assert_eq!(status, 408, "{body}");
        let body: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["error"], "request_timeout", "{body}");
        assert!(
            body["message"].as_str().unwrap().contains("within 600 ms"),
            "{body}"
        );
        assert!(started.elapsed() < Duration::from_secs(2));
    }
    // The permits are back.
    let (status, answer) = s.post(
        "/v1/ingest/events",
        ACME,
        &call("k1", "t", "a", "s").to_string(),
    );
    assert_eq!(status, 202, "{answer}");
    // A whole body sent slowly but within the time is read as any other.
    let event = call("k2", "t", "a", "s").to_string();
    let mut c = partial_post(
        &s,
        "/v1/ingest/events",
        Some(ACME),
        event.len(),
        &event.as_bytes()[..10],
    );
    std::thread::sleep(Duration::from_millis(200));
    c.write_all(&event.as_bytes()[10..]).unwrap();
    let (status, body) = answer_on(&mut c, Duration::from_secs(5));
    assert_eq!(status, 202, "{body}");
    assert_eq!(s.get("/analytics/mcp/summary", ACME).1["calls"], 2);
}

#[test]
fn credit_authorize_and_portal_bodies_are_capped_small() {
    let s = serve_with("[http]\nmax_small_body_bytes = 1024\n");
    let padding = "x".repeat(2000);
    let big = json!({"nonce": "n1", "customerId": "c1", "toolName": "search", "note": padding})
        .to_string();
    for (path, key) in [
        ("/v1/authorize", ACME),
        ("/v1/authorize/n1/release", ACME),
        ("/v1/customers/c1/credits", ACME),
        ("/v1/portal/tokens", ACME),
    ] {
        let (status, answer) = s.post(path, key, &big);
        assert_eq!(status, 413, "{path}: {answer}");
        assert!(
            answer["message"]
                .as_str()
                .unwrap()
                .contains("larger than 1024 bytes"),
            "{answer}"
        );
        // An announced length past the cap is refused before a byte of it is read.
        let mut c = partial_post(&s, path, Some(ACME), 8 << 20, b"");
        assert_eq!(answer_on(&mut c, Duration::from_secs(5)).0, 413, "{path}");
    }
    // Ingest keeps its own cap, `ingest.max_body_bytes`.
    let events: Vec<Value> = (0..10)
        .map(|i| call(&format!("e{i}"), "t", "a", "s"))
        .collect();
    assert!(batch(&events).len() > 1024);
    assert_eq!(s.post("/v1/ingest/batch", ACME, &batch(&events)).0, 202);
    // A small body still works.
    let (status, answer) = grant(&s, ACME, "c1", 10_000, "g1");
    assert_eq!(status, 201, "{answer}");
}

#[test]
fn every_key_and_every_customers_portal_tokens_have_a_rate_limit_by_default() {
    let s = serve_with(
        "[rate_limits]\nkey_requests_per_second = 0.5\nkey_burst = 4\n\
portal_requests_per_second = 0.5\nportal_burst = 3\n",
    );
    // ACME's keys have no `rate_limit`: the default bucket, one per key.
    let statuses: Vec<u16> = (0..5)
        .map(|_| s.get("/analytics/mcp/summary", ACME_READ).0)
        .collect();
    assert_eq!(statuses, [200, 200, 200, 200, 429]);
    let (status, answer) = s.get("/analytics/mcp/summary", ACME_READ);
    assert_eq!(status, 429);
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .starts_with("this API key is over its rate limit of 0.5"),
        "{answer}"
    );
    assert_eq!(
        s.get("/analytics/mcp/summary", ACME).0,
        200,
        "another key, another bucket"
    );
    // Portal tokens: one bucket per customer, however many tokens it holds.
    let token = |customer: &str, seconds: u32| {
        let (status, t) = s.post(
            "/v1/portal/tokens",
            INITECH,
            &json!({"customerId": customer, "expiresInSeconds": seconds}).to_string(),
        );
        assert_eq!(status, 201, "{t}");
        t["token"].as_str().unwrap().to_string()
    };
    let (first, second) = (token("cust-1", 600), token("cust-1", 601));
    assert_ne!(first, second, "two tokens of one customer");
    let other = token("cust-2", 600);
    let statuses: Vec<u16> = [&first, &second, &first, &second]
        .iter()
        .map(|t| s.get("/analytics/mcp/summary", t).0)
        .collect();
    assert_eq!(statuses, [200, 200, 200, 429]);
    let (_, answer) = s.get("/analytics/mcp/summary", &first);
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .starts_with("this customer's portal tokens are over its rate limit of 0.5"),
        "{answer}"
    );
    assert_eq!(
        s.get("/analytics/mcp/summary", &other).0,
        200,
        "another customer"
    );
}

#[test]
fn answers_are_not_stored_by_caches_and_the_docs_have_a_content_security_policy() {
    let s = Server::start();
    let get = |path: &str, key: Option<&str>| {
        let mut r = ureq::get(format!("{}{path}", s.base))
            .config()
            .http_status_as_error(false)
            .build();
        if let Some(k) = key {
            r = r.header("X-API-Key", k);
        }
        r.call().unwrap()
    };
    let header = |r: &ureq::http::Response<ureq::Body>, name: &str| {
        r.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    };
    for (path, key) in [
        ("/v1/customers/c1/balance", Some(ACME)),
        ("/analytics/mcp/summary", Some(ACME)),
        ("/v1/exports/billing", Some(ACME)),
        ("/healthz", None),
        ("/openapi.json", None),
        ("/analytics/mcp/summary", None),
    ] {
        let r = get(path, key);
        assert_eq!(header(&r, "cache-control"), "no-store", "{path}");
        assert_eq!(header(&r, "x-content-type-options"), "nosniff", "{path}");
    }
    // Token issuance and ingest answers too.
    let issued = ureq::post(format!("{}/v1/portal/tokens", s.base))
        .header("X-API-Key", ACME)
        .header("Content-Type", "application/json")
        .send(json!({"customerId": "c1", "expiresInSeconds": 60}).to_string())
        .unwrap();
    assert_eq!(header(&issued, "cache-control"), "no-store");
    // The dashboard keeps its own policy: revalidate its files.
    assert_eq!(
        header(&get("/dashboard/", None), "cache-control"),
        "no-cache"
    );
    for path in [
        "/docs/",
        "/docs/swagger-ui.css",
        "/docs/swagger-initializer.js",
    ] {
        let r = get(path, None);
        assert_eq!(r.status(), 200, "{path}");
        let csp = header(&r, "content-security-policy");
        for directive in [
            "default-src 'none'",
            "script-src 'self'",
            "frame-ancestors 'none'",
            "connect-src 'self'",
        ] {
            assert!(csp.contains(directive), "{path}: {csp}");
        }
        assert_eq!(header(&r, "x-content-type-options"), "nosniff", "{path}");
        assert_eq!(header(&r, "x-frame-options"), "DENY", "{path}");
    }
}

#[test]
fn metrics_can_be_served_on_a_listener_of_their_own() {
    let port = crate::proxy_peers::free_port();
    let s = serve_with(&format!("[http]\nmetrics_listen = \"127.0.0.1:{port}\"\n"));
    let (status, answer) = s.get("/metrics", "");
    assert_eq!(status, 404, "{answer}");
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("http.metrics_listen"),
        "{answer}"
    );
    let metrics = Client::new(&format!("http://127.0.0.1:{port}"));
    let (status, text) = metrics.get_text("/metrics", "");
    assert_eq!(status, 200);
    assert!(text.contains("mcp_meter_ingest_events_total"), "{text}");
    // The metrics listener serves nothing else.
    assert_eq!(metrics.get("/analytics/mcp/summary", ACME).0, 404);
    assert_eq!(
        metrics
            .post(
                "/v1/ingest/events",
                ACME,
                &call("m", "t", "a", "s").to_string()
            )
            .0,
        404
    );
    assert_eq!(s.get("/analytics/mcp/summary", ACME).0, 200);
}

#[test]
fn each_route_has_its_own_metrics_label_and_402s_are_counted_by_reason() {
    // nextest runs each test in a process of its own, so the counters start at zero here.
    // Initech's customers may spend 6000 µUSD a day; a call is quoted 5000.
    let s = serve_with("[[tenants.customer_caps]]\nwindow = \"day\"\nmax_spend_micros = 6000\n");
    assert_eq!(grant(&s, INITECH, "rich", 1_000_000, "g1").0, 201);
    assert_eq!(grant(&s, INITECH, "poor", 1_000, "g2").0, 201);
    let authorize = |nonce: &str, customer: &str| {
        let (status, answer) = s.post("/v1/authorize", INITECH, &authorize_body(nonce, customer));
        (status, answer["reason"].as_str().unwrap_or("").to_string())
    };
    assert_eq!(authorize("n1", "rich"), (200, "".into()));
    assert_eq!(s.post("/v1/authorize/n1/release", INITECH, "").0, 200);
    assert_eq!(
        authorize("n2", "poor"),
        (402, "insufficient_balance".into())
    );
    assert_eq!(
        authorize("n3", "poor"),
        (402, "insufficient_balance".into())
    );
    assert_eq!(authorize("n4", "rich"), (200, "".into()));
    assert_eq!(authorize("n5", "rich"), (402, "spend_cap".into()));
    assert_eq!(s.get("/v1/customers/rich/balance", INITECH).0, 200);
    let (_, token) = s.post(
        "/v1/portal/tokens",
        INITECH,
        &json!({"customerId": "rich", "expiresInSeconds": 60}).to_string(),
    );
    assert_eq!(s.get("/v1/guard/states", INITECH).0, 200);
    assert_eq!(
        s.get("/analytics/mcp/summary", token["token"].as_str().unwrap())
            .0,
        200
    );
    assert_eq!(s.get_text("/dashboard/app.js", "").0, 200);
    assert_eq!(s.get("/no/such/path", "").0, 404);

    let (_, metrics) = s.get_text("/metrics", "");
    let at = |series: &str| {
        metrics
            .lines()
            .find_map(|l| {
                l.strip_prefix(series)?
                    .strip_prefix(' ')?
                    .parse::<f64>()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no {series} in:\n{metrics}"))
    };
    for (route, status, n) in [
        ("/v1/customers/{customer_id}/credits", 201, 2.0),
        ("/v1/authorize", 200, 2.0),
        ("/v1/authorize", 402, 3.0),
        ("/v1/authorize/{nonce}/release", 200, 1.0),
        ("/v1/customers/{customer_id}/balance", 200, 1.0),
        ("/v1/portal/tokens", 201, 1.0),
        ("/v1/guard/states", 200, 1.0),
        ("/analytics/mcp/summary", 200, 1.0),
        ("/dashboard", 200, 1.0),
        ("other", 404, 1.0),
    ] {
        assert_eq!(
            at(&format!(
                "mcp_meter_http_requests_total{{route=\"{route}\",status=\"{status}\"}}"
            )),
            n,
            "{route} {status}"
        );
    }
    for (reason, n) in [
        ("insufficient_balance", 2.0),
        ("spend_cap", 1.0),
        ("no_credits", 0.0),
        ("too_many_in_flight", 0.0),
    ] {
        assert_eq!(
            at(&format!(
                "mcp_meter_authorizations_refused_total{{reason=\"{reason}\"}}"
            )),
            n,
            "{reason}"
        );
    }
    assert!(
        !metrics.contains("rich") && !metrics.contains("initech"),
        "no customer or tenant in metrics"
    );
}

#[test]
fn a_portal_secret_must_be_32_random_bytes_in_hex() {
    let refused = |secret: &str| {
        let config = Config::from_toml(&format!("[portal]\nsecret = \"{secret}\"\n")).unwrap();
        config.validate().unwrap_err().to_string()
    };
    let same = "a".repeat(32);
    assert!(
        refused(&same).contains("portal.secret has 32 hex digits"),
        "{}",
        refused(&same)
    );
    let same = "a".repeat(64);
    assert!(
        refused(&same).contains("portal.secret is not random"),
        "{}",
        refused(&same)
    );
    // A passphrase whose letters happen to be base64.
    let words = "thisismysecretpasswordthisismysecretpasswordabcd";
    assert!(
        refused(words).contains("portal.secret must be random bytes written as hex"),
        "{}",
        refused(words)
    );
    let good = "5f1c0e9a4b7d2c8e3a6f9b1d4e7c0a2f5b8d1e4a7c0f3b6d9e2a5c8f1b4d7e0a";
    Config::from_toml(&format!("[portal]\nsecret = \"{good}\"\n"))
        .unwrap()
        .validate()
        .unwrap();
}

#[test]
fn the_docs_render_in_chromium_under_their_content_security_policy() {
    let s = Server::start();
    let report = crate::dashboard::run_browser_driver("docs.mjs", &[&s.base]);
    assert!(
        report["csp"]
            .as_str()
            .unwrap_or("")
            .contains("frame-ancestors 'none'"),
        "{report}"
    );
    assert_eq!(report["consoleErrors"], json!([]), "{report}");
    assert_eq!(report["foreignRequests"], json!([]), "{report}");
    let operations = report["operations"].as_array().unwrap();
    for path in [
        "/v1/ingest/batch",
        "/v1/authorize",
        "/analytics/mcp/summary",
    ] {
        assert!(
            operations.iter().any(|o| o == path),
            "{path} not listed: {report}"
        );
    }
}
