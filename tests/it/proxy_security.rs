//! `mcp-meter proxy` as a security boundary, probed as an attacker would: bodies only a lenient
//! parser reads, a payer the client names, ids and names that make a call unmatchable or its
//! event unstorable, and resources a client can make the proxy hold. The server behind it is
//! `tests/peers/lenient_server.mjs`: it reads messages with JavaScript's `JSON.parse` and runs
//! every `tools/call` it reads, so whatever the proxy lets through shows in its runs.

use crate::common::distributed::wait_until;
use crate::common::*;
use crate::proxy_peers::{free_port, listening, peers, rss_kib, Running, Runs};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

/// The test plan's price of a call with no tokens.
const RATED_CALL: i64 = 5000;

/// The portal secret of the meter, which the proxy verifies customer tokens with.
const SECRET: &str = "3b9e07c1d54a8f26e0b7c3d91a4f5e82c6d0b1a7e39f4c2d8b5a06e1f7c3d94b";

fn serve() -> Server {
    crate::credits::serve_with(&format!("[portal]\nsecret = \"{SECRET}\"\n"))
}

/// The lenient server on Streamable HTTP; answers its MCP URL.
fn lenient_http(runs: &Runs) -> (Running, String) {
    let port = free_port();
    let server = Running(
        Command::new("node")
            .arg(peers().join("lenient_server.mjs"))
            .args(["http", &port.to_string()])
            .env("PEER_RUNS", runs.path())
            .spawn()
            .expect("node runs"),
    );
    assert!(listening(port), "the lenient server listens on {port}");
    (server, format!("http://127.0.0.1:{port}/mcp"))
}

/// `mcp-meter proxy` in front of `upstream`, with `env` (the secret) beside its key.
fn proxy(meter: &str, upstream: &str, flags: &[&str], env: &[(&str, &str)]) -> (Running, String) {
    crate::proxy_peers::http_proxy_with(meter, INITECH, upstream, flags, env)
}

/// Grants `customer` of `initech` `amount` µUSD.
fn granted(s: &Server, customer: &str, amount: i64) {
    let (status, answer) =
        crate::credits::grant(s, INITECH, customer, amount, &format!("g-{customer}"));
    assert_eq!(status, 201, "{answer}");
}

/// A meter, the lenient server, and a proxy in front of it with `flags` and `env`.
struct Rig {
    s: Server,
    runs: Runs,
    url: String,
    _server: Running,
    _proxy: Running,
}

fn rig(flags: &[&str], env: &[(&str, &str)]) -> Rig {
    let s = serve();
    let runs = Runs::new();
    let (server, upstream) = lenient_http(&runs);
    let (proxy, url) = proxy(&s.base, &upstream, flags, env);
    Rig {
        s,
        runs,
        url,
        _server: server,
        _proxy: proxy,
    }
}

/// A POST of `body` with `headers`: the status and the JSON answer (`null` for none).
fn post(url: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, Value) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into();
    let mut request = agent
        .post(url)
        .header("accept", "application/json, text/event-stream");
    if !headers.iter().any(|(name, _)| *name == "content-type") {
        request = request.header("content-type", "application/json");
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let mut answer = request.send(body).expect("the proxy answers");
    let status = answer.status().as_u16();
    let text = answer
        .body_mut()
        .with_config()
        .limit(u64::MAX)
        .read_to_string()
        .unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn call(id: &str, tool: &str, arguments: &str) -> String {
    format!(
        r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/call","params":{{"name":"{tool}","arguments":{arguments}}}}}"#
    )
}

/// What each client probe is, and what it must not do: reach the server.
fn unreadable() -> Vec<(&'static str, Vec<u8>)> {
    let plain = call("7", "premium", "{}");
    vec![
        (
            "a lone surrogate",
            call("7", "premium", r#"{"city":"\ud800"}"#).into_bytes(),
        ),
        (
            "a number out of range",
            call("7", "premium", r#"{"n":1e400}"#).into_bytes(),
        ),
        ("bytes that are not UTF-8", {
            let mut bytes = call("7", "premium", r#"{"s":"X"}"#).into_bytes();
            let at = bytes.iter().position(|&b| b == b'X').unwrap();
            bytes[at] = 0xFF;
            bytes
        }),
        ("trailing garbage", format!("{plain} x").into_bytes()),
    ]
}

fn with_bom(body: &str) -> Vec<u8> {
    [&b"\xEF\xBB\xBF"[..], body.as_bytes()].concat()
}

fn assert_payment_refusal(answer: &Value, what: &str) {
    assert_eq!(answer["result"]["isError"], true, "{what}: {answer}");
    assert_eq!(
        answer["result"]["_meta"]["mcp-meter/payment"]["reason"], "insufficient_balance",
        "{what}: {answer}"
    );
}

fn assert_balance_untouched(s: &Server, customer: &str, granted: i64) {
    let balance = crate::credits::balance(s, INITECH, customer);
    assert_eq!(balance["availableMicros"], granted, "{balance}");
    assert_eq!(balance["reservedMicros"], 0, "{balance}");
    assert_eq!(balance["settledMicros"], 0, "{balance}");
}

/// Bodies JavaScript reads and serde_json does not: before, the proxy forwarded them unread,
/// and a customer with 1 µUSD ran a paid tool with each. Now each is answered with a parse
/// error, over HTTP and stdio (and over stdio, calls with ids no peer matches with -32600);
/// the tool never runs and the balance never moves. The same call
/// readable (and behind a byte order mark, the one leniency) is refused with payment terms.
#[test]
fn a_body_the_proxy_cannot_read_never_reaches_the_server() {
    let s = serve();
    granted(&s, "poor", 1);
    let runs = Runs::new();
    let (_server, upstream) = lenient_http(&runs);
    let flags = ["--paid-tool", "premium", "--customer", "poor"];
    let (_proxy, url) = proxy(&s.base, &upstream, &flags, &[]);
    for (what, body) in unreadable() {
        let (status, answer) = post(&url, &[], &body);
        assert_eq!(status, 400, "{what}: {answer}");
        assert_eq!(answer["error"]["code"], -32700, "{what}: {answer}");
    }
    // A charset or an encoding the server might decode otherwise (body-parser reads UTF-7,
    // in which `+ACI-` is a quote): refused, unread.
    let plain = call("7", "premium", "{}");
    for (name, value) in [
        ("content-type", "application/json; charset=utf-7"),
        ("content-type", "text/plain"),
        ("content-encoding", "gzip"),
    ] {
        let (status, answer) = post(&url, &[(name, value)], plain.as_bytes());
        assert_eq!(status, 415, "{name}: {value}: {answer}");
        assert_eq!(answer["error"]["code"], -32600, "{name}: {value}: {answer}");
    }
    // Two Content-Types: a server might read the second.
    let twice = [
        ("content-type", "application/json"),
        ("content-type", "application/json; charset=utf-7"),
    ];
    let (status, answer) = post(&url, &twice, plain.as_bytes());
    assert_eq!(status, 415, "two Content-Types: {answer}");
    let (_, answer) = post(&url, &[], plain.as_bytes());
    assert_payment_refusal(&answer, "readable");
    let (_, answer) = post(&url, &[], &with_bom(&plain));
    assert_payment_refusal(&answer, "behind a BOM");
    assert_eq!(runs.of("premium"), 0, "a paid tool ran unpaid over HTTP");
    assert_balance_untouched(&s, "poor", 1);

    // stdio: one line each, one answer line each, in order.
    let mut proxy = Command::new(env!("CARGO_BIN_EXE_mcp-meter"))
        .args(["proxy", "--stdio", "--meter-url", &s.base])
        .args(["--flush-interval-ms", "50"])
        .args(flags)
        .arg("--")
        .arg("node")
        .arg(peers().join("lenient_server.mjs"))
        .arg("stdio")
        .env("MCP_METER_PROXY_API_KEY", INITECH)
        .env("PEER_RUNS", runs.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("mcp-meter runs");
    let mut stdin = proxy.stdin.take().unwrap();
    let mut stdout = BufReader::new(proxy.stdout.take().unwrap());
    let mut answer = || {
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        serde_json::from_str::<Value>(&line).unwrap_or_else(|_| panic!("not JSON: {line:?}"))
    };
    for (what, mut line) in unreadable() {
        line.push(b'\n');
        stdin.write_all(&line).unwrap();
        let answer = answer();
        assert_eq!(answer["error"]["code"], -32700, "stdio, {what}: {answer}");
    }
    // Calls whose ids no peer would match, or without an id, refused the same way.
    for id in ["9007199254740993", "1.5", "null"] {
        writeln!(stdin, "{}", call(id, "premium", "{}")).unwrap();
        let answer = answer();
        assert_eq!(answer["error"]["code"], -32600, "stdio, id {id}: {answer}");
    }
    stdin.write_all(b"\n  \n").unwrap();
    writeln!(stdin, "{plain}").unwrap();
    assert_payment_refusal(&answer(), "stdio, readable");
    stdin.write_all(&with_bom(&format!("{plain}\n"))).unwrap();
    assert_payment_refusal(&answer(), "stdio, behind a BOM");
    drop(stdin);
    assert!(proxy.wait().unwrap().success());
    assert_eq!(runs.of("premium"), 0, "a paid tool ran unpaid over stdio");
    assert_balance_untouched(&s, "poor", 1);
}

/// A token for `customer` of `tenant`, signed with `secret`, expiring `ttl` seconds from now.
fn token(secret: &str, tenant: &str, customer: &str, ttl: i64) -> String {
    let claims = schemas::token::CustomerClaims {
        tenant: tenant.into(),
        customer: customer.into(),
        expires_at: chrono::Utc::now().timestamp() + ttl,
    };
    schemas::token::sign(secret.as_bytes(), &claims)
}

/// Before, `--customer-header` believed the client: it billed another customer's wallet, or
/// named a new id (postpaid) and ran a paid call. Now the header holds a customer token signed
/// with the operator's secret (a portal token, or one a gateway signed): a forged, altered,
/// expired or other tenant's token is refused before anything is forwarded, and so is an
/// unsigned header unless the operator asked for it.
#[test]
fn the_payer_is_the_one_a_signed_token_names() {
    let s = serve();
    granted(&s, "richp", 100 * RATED_CALL);
    granted(&s, "poor", 1);
    let runs = Runs::new();
    let (_server, upstream) = lenient_http(&runs);
    let flags = [
        "--paid-tool",
        "premium",
        "--customer-header",
        "X-Customer-Token",
        "--tenant",
        "initech",
    ];
    let env = [("MCP_METER_PROXY_CUSTOMER_SECRET", SECRET)];
    let (_proxy, url) = proxy(&s.base, &upstream, &flags, &env);
    let premium = call("1", "premium", "{}");
    let with = |token: &str| post(&url, &[("x-customer-token", token)], premium.as_bytes());

    // The portal's own token for `poor`: poor pays (and cannot).
    let (status, issued) = s.post(
        "/v1/portal/tokens",
        INITECH,
        &json!({"customerId": "poor", "expiresInSeconds": 600}).to_string(),
    );
    assert_eq!(status, 201, "{issued}");
    let (_, answer) = with(issued["token"].as_str().unwrap());
    assert_payment_refusal(&answer, "poor's own token");

    let poor = token(SECRET, "initech", "poor", 600);
    let (claims, signature) = poor.split_once('.').unwrap();
    let richp_claims = token(SECRET, "initech", "richp", 600);
    let altered = format!("{}.{signature}", richp_claims.split_once('.').unwrap().0);
    assert_ne!(claims, altered.split_once('.').unwrap().0);
    for (what, forged) in [
        (
            "signed with another secret",
            token("not the operator's secret", "initech", "richp", 600),
        ),
        ("richp's claims under poor's signature", altered),
        ("expired", token(SECRET, "initech", "richp", -1)),
        ("another tenant's", token(SECRET, "acme", "richp", 600)),
        ("not a token", "richp".to_string()),
    ] {
        let (status, answer) = with(&forged);
        assert_eq!(status, 403, "{what}: {answer}");
        assert_eq!(answer["error"]["code"], -32600, "{what}: {answer}");
    }
    let (status, _) = post(
        &url,
        &[
            ("x-customer-token", &poor),
            ("x-customer-token", &richp_claims),
        ],
        premium.as_bytes(),
    );
    assert_eq!(status, 403, "two payer headers");
    // No header and no --customer: nobody to charge.
    let (_, answer) = post(&url, &[], premium.as_bytes());
    assert_eq!(answer["result"]["isError"], true, "{answer}");
    assert_eq!(
        runs.of("premium"),
        0,
        "a call ran on a payer the proxy cannot believe"
    );
    assert_balance_untouched(&s, "richp", 100 * RATED_CALL);

    // richp's own token: richp pays, once.
    let (status, answer) = with(&richp_claims);
    assert_eq!(status, 200);
    assert_eq!(answer["result"]["content"][0]["text"], "ran", "{answer}");
    assert_eq!(runs.of("premium"), 1);
    assert!(wait_until(Duration::from_secs(15), || {
        crate::credits::balance(&s, INITECH, "richp")["settledMicros"] == RATED_CALL
    }));

    // A header nobody signs is refused at start, unless the operator vouches for it.
    let out = Command::new(env!("CARGO_BIN_EXE_mcp-meter"))
        .args(["proxy", "--upstream", &upstream, "--meter-url", &s.base])
        .args(["--customer-header", "X-Customer-Id"])
        .env("MCP_METER_PROXY_API_KEY", INITECH)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("--trust-customer-header"), "{said}");
}

/// One probe of the id search: a message (or batch) of `tools/call`s with an id trick, and the
/// runs it may cause.
#[derive(Clone, Debug)]
enum Trick {
    /// A plain integer id.
    Integer(u64),
    /// `N.0`: the integer N to a JavaScript server, which answers `N`.
    IntegerAsFloat(u64),
    /// A string id.
    Text(String),
    /// Beyond 2^53: a JavaScript server answers another id.
    Huge,
    /// A fraction.
    Fraction,
    /// `null`.
    Null,
    /// No id: a call sent as a notification.
    Missing,
    /// Two calls with one id in one batch.
    TwiceInABatch(u64),
    /// A client name over the agentId limit, with a control character.
    LongName(u64),
    /// An Mcp-Session-Id over the sessionId limit.
    LongSession(u64),
    /// Another request with the call's id, before it in the batch: its answer (a -32601 from
    /// an SDK server) would have ended the call as never run, and released it.
    OtherRequestFirst(u64),
    /// Another request with the call's id, after it in the batch.
    OtherRequestAfter(u64),
    /// A tool name its event could not carry (over 64 characters).
    LongToolName(u64),
}

impl Trick {
    /// The body and headers of the probe.
    fn request(&self) -> (String, Vec<(&'static str, String)>) {
        let plain = |id: String| call(&id, "premium", "{}");
        match self {
            Trick::Integer(n) => (plain(n.to_string()), vec![]),
            Trick::IntegerAsFloat(n) => (plain(format!("{n}.0")), vec![]),
            Trick::Text(t) => (plain(json!(t).to_string()), vec![]),
            Trick::Huge => (plain("9007199254740993".into()), vec![]),
            Trick::Fraction => (plain("1.5".into()), vec![]),
            Trick::Null => (plain("null".into()), vec![]),
            Trick::Missing => (
                r#"{"jsonrpc":"2.0","method":"tools/call","params":{"name":"premium"}}"#.into(),
                vec![],
            ),
            Trick::TwiceInABatch(n) => (
                format!("[{},{}]", plain(n.to_string()), plain(n.to_string())),
                vec![],
            ),
            Trick::LongName(n) => {
                let name = format!("agent\u{7}{}", "n".repeat(100));
                let body = json!({"jsonrpc": "2.0", "id": n, "method": "tools/call",
                    "params": {"name": "premium", "arguments": {},
                    "_meta": {"io.modelcontextprotocol/clientInfo": {"name": name, "version": "1"}}}});
                (body.to_string(), vec![])
            }
            Trick::OtherRequestFirst(n) => (
                format!(
                    r#"[{{"jsonrpc":"2.0","id":{n},"method":"nosuch/method"}},{}]"#,
                    plain(n.to_string())
                ),
                vec![],
            ),
            Trick::OtherRequestAfter(n) => (
                format!(
                    r#"[{},{{"jsonrpc":"2.0","id":{n},"method":"nosuch/method"}}]"#,
                    plain(n.to_string())
                ),
                vec![],
            ),
            Trick::LongToolName(n) => (call(&n.to_string(), &"t".repeat(65), "{}"), vec![]),
            Trick::LongSession(n) => (
                plain(n.to_string()),
                vec![(
                    "mcp-session-id",
                    format!("session-{}", "s".repeat(200 + *n as usize % 7)),
                )],
            ),
        }
    }

    /// The oracle: how many calls of the probe may run (and so are billed).
    fn runs(&self) -> usize {
        match self {
            Trick::Huge
            | Trick::Fraction
            | Trick::Null
            | Trick::Missing
            | Trick::OtherRequestFirst(_)
            | Trick::LongToolName(_) => 0,
            _ => 1,
        }
    }
}

fn random_trick(next: &mut impl FnMut() -> u64) -> Trick {
    let n = 1 + next() % 1_000_000;
    match next() % 13 {
        0 => Trick::Integer(n),
        1 => Trick::IntegerAsFloat(n),
        2 => Trick::Text(format!("t-{n}")),
        3 => Trick::Huge,
        4 => Trick::Fraction,
        5 => Trick::Null,
        6 => Trick::Missing,
        7 => Trick::TwiceInABatch(n),
        8 => Trick::LongName(n),
        9 => Trick::OtherRequestFirst(n),
        10 => Trick::OtherRequestAfter(n),
        11 => Trick::LongToolName(n),
        _ => Trick::LongSession(n),
    }
}

/// Seeded random sequences of id and name tricks against an oracle: each call that may run
/// runs once at the lenient server, and is billed exactly once (its customer's settled amount
/// is its runs times the price, nothing stays reserved); every other is refused unforwarded.
/// Before, `1.0` answered as `1` left a reservation unsettled and an event unsent, two calls
/// with one id in a batch ran twice and billed once, and a long client name made an event
/// ingest refused: the call ran unbilled. The seed is printed; a failure is shrunk.
#[test]
fn every_id_and_name_trick_is_billed_exactly_once() {
    let flags = [
        "--paid-tool",
        "premium",
        "--customer-header",
        "X-Customer-Id",
        "--trust-customer-header",
    ];
    let Rig {
        s,
        runs,
        url,
        _server,
        _proxy,
    } = rig(&flags, &[]);
    let now = chrono::Utc::now().timestamp_millis() as u64;
    let seed = schemas::search::env_number("MCP_METER_SEARCH_SEED", now);
    let sequences = schemas::search::env_number("MCP_METER_SEARCH_SEQUENCES", 6);
    println!(
        "seed {seed} ({sequences} sequences of 8 probes); rerun with MCP_METER_SEARCH_SEED={seed}"
    );
    let attempt = std::sync::atomic::AtomicU64::new(0);
    let run = |tricks: &[Trick]| -> Result<(), schemas::search::Failure> {
        let customer = format!(
            "c-{seed}-{}",
            attempt.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        granted(&s, &customer, 100 * RATED_CALL);
        let before = runs.all();
        let mut expected = 0;
        for (i, trick) in tricks.iter().enumerate() {
            let (body, headers) = trick.request();
            let mut all: Vec<(&str, &str)> = vec![("x-customer-id", &customer)];
            all.extend(headers.iter().map(|(n, v)| (*n, v.as_str())));
            let (status, answer) = post(&url, &all, body.as_bytes());
            expected += trick.runs();
            let ran = runs.all() - before;
            if ran != expected {
                return Err((
                    i,
                    format!("{ran} runs, the oracle says {expected} ({status} {answer})"),
                ));
            }
        }
        let settled = || crate::credits::balance(&s, INITECH, &customer);
        let billed = expected as i64 * RATED_CALL;
        wait_until(Duration::from_secs(15), || {
            let b = settled();
            b["settledMicros"] == billed && b["reservedMicros"] == 0
        });
        let b = settled();
        if b["settledMicros"] != billed || b["reservedMicros"] != 0 {
            return Err((tricks.len() - 1, format!("{expected} runs billed as {b}")));
        }
        Ok(())
    };
    let mut next = xorshift(seed | 1);
    for _ in 0..sequences {
        let tricks: Vec<Trick> = (0..8).map(|_| random_trick(&mut next)).collect();
        if let Err(failure) = run(&tricks) {
            let (shortest, (at, why)) = schemas::search::shrink(tricks, failure, run);
            panic!(
                "seed {seed}: step {at}: {why}\n{}",
                schemas::search::listing(&shortest)
            );
        }
    }
    // Each long name and session became a field ingest takes: every call ran was stored.
    let db =
        rusqlite::Connection::open(s.dir.path().join(backends::store::sqlite::DB_FILE)).unwrap();
    let stored: i64 = db
        .query_row("SELECT count(*) FROM mcp_events", [], |r| r.get(0))
        .unwrap();
    assert_eq!(
        stored as usize,
        runs.all(),
        "a call that ran was not stored"
    );
}

/// An upstream of its own for the bounds: it answers `tools/call` of `big_json` with a JSON
/// body of `size` bytes written in 4 KiB pieces, `big_sse` with one SSE event that never ends
/// (then the stream ends), and anything else with a small result; it records each request's
/// headers.
fn heavy_upstream(size: usize) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/mcp", listener.local_addr().unwrap());
    let heads = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = heads.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let heads = seen.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut writer = stream;
                let mut head = String::new();
                let mut length = 0;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    if line == "\r\n" {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap();
                    }
                    head.push_str(&line);
                }
                heads.lock().unwrap().push(head);
                let mut body = vec![0; length];
                reader.read_exact(&mut body).unwrap();
                let request: Value = serde_json::from_slice(&body).unwrap();
                let id = request["id"].clone();
                let tool = request["params"]["name"].as_str().unwrap_or("").to_string();
                let chunked = |w: &mut std::net::TcpStream, piece: &[u8]| {
                    w.write_all(format!("{:x}\r\n", piece.len()).as_bytes())?;
                    w.write_all(piece)?;
                    w.write_all(b"\r\n")
                };
                let (content_type, pieces): (&str, Box<dyn Iterator<Item = Vec<u8>>>) = match tool
                    .as_str()
                {
                    "big_json" => {
                        let text = format!("{{\"jsonrpc\":\"2.0\",\"id\":{id},\"result\":{{\"content\":[{{\"type\":\"text\",\"text\":\"{}\"}}]}}}}", "x".repeat(size));
                        let bytes = text.into_bytes();
                        (
                            "application/json",
                            Box::new(
                                bytes
                                    .chunks(4096)
                                    .map(<[u8]>::to_vec)
                                    .collect::<Vec<_>>()
                                    .into_iter(),
                            ),
                        )
                    }
                    "big_sse" => {
                        let start = b"event: message\ndata: {\"x\":\"".to_vec();
                        let rest = (0..size / 4096).map(|_| vec![b'y'; 4096]);
                        (
                            "text/event-stream",
                            Box::new(std::iter::once(start).chain(rest)),
                        )
                    }
                    _ => {
                        let text = json!({"jsonrpc": "2.0", "id": id, "result": {"content": [{"type": "text", "text": "ok"}]}}).to_string();
                        (
                            "application/json",
                            Box::new(std::iter::once(text.into_bytes())),
                        )
                    }
                };
                let head = format!("HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n");
                if writer.write_all(head.as_bytes()).is_err() {
                    return;
                }
                for piece in pieces {
                    if chunked(&mut writer, &piece).is_err() {
                        return;
                    }
                }
                let _ = writer.write_all(b"0\r\n\r\n");
            });
        }
    });
    (url, heads)
}

/// The most resident memory a process has had, in KiB (its high-water mark).
fn peak_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// The CPU seconds a process has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

/// What a client can make the proxy hold is bounded. Before: 4 × 300 MB bodies took 3.56 GB,
/// 20,000 session ids 170 MB, headers and bodies could trickle forever, and a 64 MB SSE event
/// cost ~50 s of CPU (each chunk re-scanned the whole buffer). Now bodies over
/// `--max-body-bytes` are refused (413) unread, a slow client is cut off after
/// `--read-timeout-ms`, sessions are kept at most 10,000 under ids of at most 64 characters,
/// and an answer event over `--max-answer-bytes` passes to the client unread, its call ended
/// as unanswered. The proxy's resident memory through all of it never goes 64 MiB above where
/// it started. Hop-by-hop headers and the client's own X-Forwarded-For never reach the server.
#[test]
fn what_a_client_makes_the_proxy_hold_is_bounded() {
    let s = serve();
    const ANSWER: usize = 20 << 20;
    let (upstream, heads) = heavy_upstream(ANSWER);
    let flags = [
        "--customer",
        "bounded",
        "--read-timeout-ms",
        "1000",
        "--max-answer-bytes",
        "4194304",
    ];
    let (proxy, url) = proxy(&s.base, &upstream, &flags, &[]);
    let pid = proxy.0.id();
    let (status, answer) = post(&url, &[], call("1", "small", "{}").as_bytes());
    assert_eq!(
        (status, &answer["result"]["content"][0]["text"]),
        (200, &json!("ok"))
    );
    let start = rss_kib(pid);

    // A body declared too large is refused before it is sent (the client waits for 100).
    let address = url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let mut stream = std::net::TcpStream::connect(&address).unwrap();
    let head = format!("POST /mcp HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nexpect: 100-continue\r\ncontent-length: {}\r\n\r\n", 300 << 20);
    stream.write_all(head.as_bytes()).unwrap();
    let mut answer = [0u8; 12];
    stream.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"HTTP/1.1 413");
    // Four bodies of 64 MiB of unknown length, each cut off past the 4 MiB limit.
    for _ in 0..4 {
        let mut stream = std::net::TcpStream::connect(&address).unwrap();
        let head = "POST /mcp HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
        stream.write_all(head.as_bytes()).unwrap();
        let mut reader = stream.try_clone().unwrap();
        let answered = std::thread::spawn(move || {
            let mut answer = Vec::new();
            let _ = reader.read_to_end(&mut answer);
            answer
        });
        let piece = [
            format!("{:x}\r\n", 1 << 20).into_bytes(),
            vec![b' '; 1 << 20],
            b"\r\n".to_vec(),
        ]
        .concat();
        for _ in 0..64 {
            if stream.write_all(&piece).is_err() {
                break;
            }
        }
        let _ = stream.write_all(b"0\r\n\r\n");
        let _ = stream.shutdown(std::net::Shutdown::Write);
        let answer = answered.join().unwrap();
        // The 413 comes before the rest is refused; a reset may overtake it.
        assert!(
            answer.is_empty() || answer.starts_with(b"HTTP/1.1 413"),
            "{}",
            String::from_utf8_lossy(&answer[..answer.len().min(200)])
        );
    }
    // Headers that never end, and a body that never comes: cut off.
    let mut slow = std::net::TcpStream::connect(&address).unwrap();
    slow.write_all(b"POST /mcp HTTP/1.1\r\nhost: x\r\n")
        .unwrap();
    let mut rest = Vec::new();
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let closed = slow.read_to_end(&mut rest);
    assert!(closed.is_ok(), "the slow headers were cut off: {closed:?}");
    let mut slow = std::net::TcpStream::connect(&address).unwrap();
    slow.write_all(b"POST /mcp HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{")
        .unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut answer = String::new();
    let _ = slow.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");

    // 20,000 sessions with 8 KiB ids.
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#;
    for i in 0..20_000 {
        let id = format!("{i:08}{}", "s".repeat(8 << 10));
        let answer = agent
            .post(&url)
            .header("content-type", "application/json")
            .header("mcp-session-id", &id)
            .send(body)
            .unwrap();
        assert_eq!(answer.status().as_u16(), 200);
    }

    // Answers too large to read: passed on whole, unread; their calls end as unanswered.
    let cpu = cpu_seconds(pid);
    let (status, answer) = post(&url, &[], call("2", "big_json", "{}").as_bytes());
    assert_eq!(status, 200);
    assert_eq!(
        answer["result"]["content"][0]["text"]
            .as_str()
            .unwrap()
            .len(),
        ANSWER
    );
    let mut sse = agent
        .post(&url)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .send(call("3", "big_sse", "{}").as_bytes())
        .unwrap()
        .into_body()
        .into_reader();
    let sse = std::io::copy(&mut sse, &mut std::io::sink()).unwrap() as usize;
    assert!(
        sse >= ANSWER,
        "the SSE answer reached the client whole: {sse} bytes"
    );
    let used = cpu_seconds(pid) - cpu;
    let (end, peak) = (rss_kib(pid), peak_kib(pid));
    println!(
        "proxy RSS {start} KiB at start, {end} KiB after the probes, {peak} KiB at most (+{} KiB); {used:.2} CPU s for a {} MiB JSON answer and a {} MiB SSE event",
        peak.saturating_sub(start),
        ANSWER >> 20,
        ANSWER >> 20
    );
    assert!(peak < start + 64 * 1024, "{start} → at most {peak} KiB");
    let stored = wait_until(Duration::from_secs(15), || {
        let (_, sessions) = s.get("/analytics/mcp/summary", INITECH);
        sessions["calls"] == 3
    });
    let (_, summary) = s.get("/analytics/mcp/summary", INITECH);
    assert!(stored, "the three calls are stored: {summary}");

    // A request with hop-by-hop headers and a forged X-Forwarded-For.
    let (status, _) = post(
        &url,
        &[
            ("connection", "keep-alive, x-secret-hop"),
            ("x-secret-hop", "1"),
            ("proxy-authorization", "Basic Zm9vOmJhcg=="),
            ("x-forwarded-for", "203.0.113.9"),
        ],
        call("4", "small", "{}").as_bytes(),
    );
    assert_eq!(status, 200);
    let head = heads.lock().unwrap().last().unwrap().to_ascii_lowercase();
    for header in ["x-secret-hop", "proxy-authorization", "203.0.113.9"] {
        assert!(
            !head.contains(header),
            "{header} reached the server: {head}"
        );
    }
    assert!(head.contains("x-forwarded-for: 127.0.0.1"), "{head}");
}

/// A TCP relay in front of `target` that holds each request for `/v1/authorize` for `delay`
/// before passing it on: a meter slow to authorize. Answers its address.
fn slow_authorizing(target: &str, delay: Duration) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    let target = target.trim_start_matches("http://").to_string();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { continue };
            let Ok(server) = std::net::TcpStream::connect(&target) else {
                continue;
            };
            let (mut from_client, mut to_server) =
                (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                while let Ok(n) = from_client.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    if buf[..n].windows(18).any(|w| w == b"POST /v1/authorize") {
                        std::thread::sleep(delay);
                    }
                    if to_server.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = to_server.shutdown(std::net::Shutdown::Write);
            });
            let (mut from_server, mut to_client) = (server, client);
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut from_server, &mut to_client);
                let _ = to_client.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    address
}

/// A client that goes away while its paid calls are being authorized leaves nothing behind:
/// before, the call admitted first was reported `CANCELLED` (billed) though it was never
/// forwarded, and the one still being authorized kept its reservation until it lapsed. Now
/// neither runs, nothing is billed and nothing stays reserved.
#[test]
fn a_client_gone_while_its_calls_are_authorized_leaves_nothing_behind() {
    let s = serve();
    granted(&s, "slowpay", 100 * RATED_CALL);
    let runs = Runs::new();
    let (_server, upstream) = lenient_http(&runs);
    let meter = slow_authorizing(&s.base, Duration::from_millis(1500));
    let flags = ["--paid-tool", "premium", "--customer", "slowpay"];
    let (_proxy, url) = proxy(&meter, &upstream, &flags, &[]);
    let address = url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let body = format!(
        "[{},{}]",
        call("1", "premium", "{}"),
        call("2", "premium", "{}")
    );
    let mut client = std::net::TcpStream::connect(&address).unwrap();
    let head = format!(
        "POST /mcp HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\naccept: application/json, text/event-stream\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    client.write_all(head.as_bytes()).unwrap();
    client.write_all(body.as_bytes()).unwrap();
    // Gone during the second authorization (the first takes 1.5 s), which then completes.
    std::thread::sleep(Duration::from_millis(2000));
    drop(client);
    std::thread::sleep(Duration::from_millis(2500));
    let settled = wait_until(Duration::from_secs(20), || {
        let b = crate::credits::balance(&s, INITECH, "slowpay");
        b["reservedMicros"] == 0
    });
    let balance = crate::credits::balance(&s, INITECH, "slowpay");
    assert!(settled, "a reservation was left behind: {balance}");
    std::thread::sleep(Duration::from_millis(500));
    let balance = crate::credits::balance(&s, INITECH, "slowpay");
    assert_eq!(
        balance["settledMicros"], 0,
        "a call never forwarded was billed: {balance}"
    );
    assert_eq!(runs.all(), 0, "a call ran after its client left");
}

/// The session a gateway names (`--session-header`) is the call's, whatever `Mcp-Session-Id`
/// the client adds: before, the client's header won, and a new value per request was a new
/// session per call, out of reach of session limits and kills.
#[test]
fn the_gateways_session_header_comes_before_the_clients_session_id() {
    let flags = [
        "--session-header",
        "x-conversation",
        "--customer",
        "c-session",
    ];
    let Rig {
        s,
        url,
        _server,
        _proxy,
        ..
    } = rig(&flags, &[]);
    for (i, own) in ["evil-1", "evil-2"].iter().enumerate() {
        let headers = [("x-conversation", "conv-1"), ("mcp-session-id", *own)];
        let (status, answer) = post(
            &url,
            &headers,
            call(&i.to_string(), "free", "{}").as_bytes(),
        );
        assert_eq!(status, 200, "{answer}");
    }
    let sessions = || -> Vec<String> {
        let db = rusqlite::Connection::open(s.dir.path().join(backends::store::sqlite::DB_FILE))
            .unwrap();
        let mut rows = db
            .prepare("SELECT session_id FROM mcp_events ORDER BY 1")
            .unwrap();
        rows.query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    assert!(wait_until(Duration::from_secs(15), || sessions().len() == 2));
    assert_eq!(sessions(), ["conv-1", "conv-1"]);
}
