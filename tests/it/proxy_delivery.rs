//! Every tool call billed exactly once at both ends: the proxy's delivery over real HTTP (a
//! batch on the wire is out of the queue bound's reach and goes again with the same keys), the
//! release of an authorized call that never ran, and the kill lists an ingest answer carries
//! (only the sessions its events name) and the proxy keeps (per batch).

use crate::common::distributed::wait_until;
use crate::common::*;
use proxy::meter::{Meter, MeterConfig};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn meter_at(url: &str, max_batch_events: usize, max_queue_events: usize) -> Meter {
    meter_rechecking(
        url,
        max_batch_events,
        max_queue_events,
        Duration::from_secs(60),
    )
}

fn meter_rechecking(
    url: &str,
    max_batch_events: usize,
    max_queue_events: usize,
    kill_recheck: Duration,
) -> Meter {
    Meter::start(MeterConfig {
        url: url.to_string(),
        api_key: INITECH.to_string(),
        max_batch_events,
        flush_interval: Duration::from_millis(50),
        max_queue_events,
        request_timeout: Duration::from_secs(10),
        guard_timeout: Duration::from_millis(500),
        kill_recheck,
    })
}

/// Reads one HTTP/1.1 request from `stream`: its body, as JSON.
fn read_request(stream: &TcpStream) -> Value {
    let mut reader = BufReader::new(stream);
    let mut length = 0;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap();
            }
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    serde_json::from_slice(&body).unwrap()
}

fn respond(mut stream: &TcpStream, status: &str, extra: &str, body: &Value) {
    let body = body.to_string();
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
}

fn keys(batch: &Value) -> Vec<String> {
    batch["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["idempotencyKey"].as_str().unwrap().to_string())
        .collect()
}

/// A fake mcp-meter holds the proxy's first batch while six events are recorded against a
/// bound of four, then answers it 503: the bound drops the two oldest *waiting* events, the
/// batch goes again with the same keys, and no event counted dropped ever reached the meter.
#[test]
fn a_batch_on_the_wire_is_out_of_the_bounds_reach_and_goes_again_with_the_same_keys() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let received = Arc::new(Mutex::new(Vec::<Vec<String>>::new()));
    let (arrived, first_arrived) = mpsc::channel::<()>();
    let (answer_first, go) = mpsc::channel::<()>();
    let seen = received.clone();
    std::thread::spawn(move || {
        for (n, stream) in listener.incoming().enumerate() {
            let stream = stream.unwrap();
            let batch = read_request(&stream);
            seen.lock().unwrap().push(keys(&batch));
            if n == 0 {
                arrived.send(()).unwrap();
                go.recv().unwrap();
                respond(
                    &stream,
                    "503 Service Unavailable",
                    "Retry-After: 0\r\n",
                    &json!({"message": "busy"}),
                );
            } else {
                let count = keys(&batch).len();
                let answer = json!({"accepted": count, "duplicates": 0, "failed": 0,
                    "errors": [], "killedSessionIds": []});
                respond(&stream, "202 Accepted", "", &answer);
            }
        }
    });
    let meter = meter_at(&url, 2, 4);
    let event = |n: usize| call(&format!("e{n}"), "t", "a", "s");
    meter.record(event(0));
    meter.record(event(1));
    first_arrived
        .recv_timeout(Duration::from_secs(10))
        .expect("the first batch is sent");
    for n in 2..6 {
        meter.record(event(n));
    }
    assert_eq!(meter.queued(), 4, "the bound counts the batch on the wire");
    answer_first.send(()).unwrap();
    let left = meter.close(Instant::now() + Duration::from_secs(10));

    let received = received.lock().unwrap().clone();
    println!("batches received: {received:?}");
    let stats = meter.stats();
    let (sent, failed, dropped, retried) = (
        stats.events_sent.get(),
        stats.events_failed.get(),
        stats.events_dropped.get(),
        stats.batches_retried.get(),
    );
    println!("sent {sent}, failed {failed}, dropped {dropped}, retried {retried}, left {left}");
    assert_eq!(received[0], ["e0", "e1"]);
    assert_eq!(
        received[1], received[0],
        "the batch answered 503 goes again, with the same keys"
    );
    let distinct: BTreeSet<&String> = received.iter().flatten().collect();
    assert_eq!(
        distinct.len() as u64,
        6 - dropped,
        "an event counted dropped never reached the meter: {received:?}"
    );
    assert_eq!(
        distinct.into_iter().cloned().collect::<Vec<_>>(),
        ["e0", "e1", "e4", "e5"]
    );
    assert_eq!((sent, failed, dropped, retried, left), (4, 0, 2, 1, 0));
    let text = proxy::ops::metrics(&meter);
    for line in [
        "# TYPE mcp_meter_proxy_events_sent_total counter",
        "mcp_meter_proxy_events_sent_total 4",
        "mcp_meter_proxy_events_dropped_total 2",
        "mcp_meter_proxy_batches_retried_total 1",
        "# TYPE mcp_meter_proxy_events_queued gauge",
        "mcp_meter_proxy_events_queued 0",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
    }
}

/// A process the test started, killed when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A paid call is authorized, then its upstream refuses the connection, so it never ran: the
/// proxy releases its reservation, and the customer's balance is whole again (nothing reserved,
/// nothing settled).
#[test]
fn an_authorized_call_whose_upstream_is_unreachable_is_released() {
    let s = crate::credits::serve_with("");
    let customer = "cust-release";
    let (status, _) = crate::credits::grant(&s, INITECH, customer, 2 * 5000, "g-release");
    assert_eq!(status, 201);
    // Nothing listens there: every connection is refused.
    let upstream = format!("http://127.0.0.1:{}/mcp", free_port());
    let port = free_port();
    let _proxy = Running(
        Command::new(env!("CARGO_BIN_EXE_mcp-meter"))
            .args(["proxy", "--upstream", &upstream, "--meter-url", &s.base])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--paid-tool", "premium", "--customer", customer])
            .env("MCP_METER_PROXY_API_KEY", INITECH)
            .stdout(Stdio::null())
            .spawn()
            .expect("mcp-meter runs"),
    );
    assert!(
        wait_until(Duration::from_secs(30), || TcpStream::connect((
            "127.0.0.1",
            port
        ))
        .is_ok()),
        "the proxy listens on {port}"
    );
    let proxy = Client::new(&format!("http://127.0.0.1:{port}"));
    let request = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": "premium", "arguments": {}}});
    let (status, answer) = proxy.post_with(
        "/mcp",
        None,
        &request.to_string(),
        &[
            ("Content-Type", "application/json"),
            ("Accept", "application/json, text/event-stream"),
        ],
    );
    println!("{status} {answer}");
    // Admitted (a refusal would be a tool result), then not delivered.
    assert_eq!(answer["error"]["code"], -32603, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("cannot connect"),
        "{answer}"
    );
    let released = wait_until(Duration::from_secs(10), || {
        crate::credits::balance(&s, INITECH, customer)["reservedMicros"] == 0
    });
    let balance = crate::credits::balance(&s, INITECH, customer);
    println!("balance after the call: {balance}");
    assert!(released, "the reservation is released: {balance}");
    assert_eq!(balance["settledMicros"], 0);
    assert_eq!(balance["availableMicros"], 2 * 5000);
}

/// A session limit of one call per hour on `initech`.
const ONE_CALL_PER_SESSION: &str =
    "[[tenants.limits]]\nper = \"session\"\nwindow = \"hour\"\nmax_calls = 1\n";

fn killed(answer: &Value) -> Vec<&str> {
    answer["killedSessionIds"]
        .as_array()
        .unwrap_or_else(|| panic!("{answer}"))
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect()
}

/// A tenant with 10,001 killed sessions (as in the report of issue 30): an ingest for another
/// session answers no kill (and a small body), and a batch naming a killed session among
/// others lists that one alone; so does a heartbeat.
#[test]
fn an_ingest_answer_lists_only_the_killed_sessions_its_events_name() {
    let s = crate::credits::serve_with(ONE_CALL_PER_SESSION);
    // Two calls of each session: the second breaches the limit.
    let events: Vec<Value> = (0..10_001)
        .flat_map(|k| [0, 1].map(|i| call(&format!("kill-{k}-{i}"), "t", "a", &format!("k{k}"))))
        .collect();
    for chunk in events.chunks(1000) {
        let (status, answer) = s.post("/v1/ingest/batch", INITECH, &batch(chunk));
        assert_eq!(status, 202, "{answer}");
    }
    let (status, unrelated) = s.post(
        "/v1/ingest/events",
        INITECH,
        &call("fresh-1", "t", "a", "fresh").to_string(),
    );
    let text = unrelated.to_string();
    println!(
        "one event of an unrelated session: {status}, {} bytes, {} ids: {}",
        text.len(),
        unrelated["killedSessionIds"].as_array().map_or(0, Vec::len),
        &text[..text.len().min(300)]
    );
    assert_eq!(status, 202);
    assert_eq!(killed(&unrelated), Vec::<&str>::new());

    let events = [
        call("fresh-2", "t", "a", "fresh-2"),
        call("again-17", "t", "a", "k17"),
    ];
    let (_, mixed) = s.post("/v1/ingest/batch", INITECH, &batch(&events));
    println!("a batch of fresh-2 and k17: {mixed}");
    assert_eq!(killed(&mixed), ["k17"]);

    let heartbeat = json!({"metricName": "system.session.heartbeat", "sessionId": "k5",
        "sessionBoundary": "HEARTBEAT", "idempotencyKey": "hb-k5"});
    let (_, beat) = s.post("/v1/ingest/batch", INITECH, &batch(&[heartbeat]));
    assert_eq!(killed(&beat), ["k5"]);
}

/// The proxy learns a kill from the answer to its session's batch, and keeps it when a later
/// answer, for a batch of another session, lists none.
#[test]
fn the_proxy_keeps_a_kill_that_an_answer_for_another_session_does_not_list() {
    let s = crate::credits::serve_with(ONE_CALL_PER_SESSION);
    let meter = meter_at(&s.base, 100, 1000);
    meter.record(call("p1-a", "t", "a", "p1"));
    meter.record(call("p1-b", "t", "a", "p1"));
    assert!(
        wait_until(Duration::from_secs(10), || meter.is_killed("p1")),
        "the answer to p1's batch kills it"
    );
    meter.record(call("p2-a", "t", "a", "p2"));
    assert!(
        wait_until(Duration::from_secs(10), || meter.stats().events_sent.get()
            == 3),
        "p2's event is delivered"
    );
    assert!(
        meter.is_killed("p1"),
        "an answer for p2's batch says nothing of p1"
    );
    assert!(!meter.is_killed("p2"));
    assert_eq!(meter.close(Instant::now() + Duration::from_secs(5)), 0);
}

/// A killed session sends no more calls, so the proxy asks about it with a heartbeat, once per
/// `kill_recheck` however often it is refused: a fake mcp-meter lists `p1` in the answer to its
/// call, then (its limit's window over) not in the answer to the heartbeat, which lifts the kill.
#[test]
fn a_killed_session_is_asked_about_again_and_its_kill_ends_with_the_answer() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let received = Arc::new(Mutex::new(Vec::<Value>::new()));
    let seen = received.clone();
    std::thread::spawn(move || {
        for (n, stream) in listener.incoming().enumerate() {
            let stream = stream.unwrap();
            let batch = read_request(&stream);
            let count = keys(&batch).len();
            seen.lock()
                .unwrap()
                .extend(batch["events"].as_array().unwrap().clone());
            let killed = if n == 0 { json!(["p1"]) } else { json!([]) };
            let answer = json!({"accepted": count, "duplicates": 0, "failed": 0,
                "errors": [], "killedSessionIds": killed});
            respond(&stream, "202 Accepted", "", &answer);
        }
    });
    let recheck = Duration::from_millis(300);
    let meter = meter_rechecking(&url, 100, 1000, recheck);
    meter.record(call("p1-a", "t", "a", "p1"));
    assert!(
        wait_until(Duration::from_secs(10), || meter.is_killed("p1")),
        "the answer to p1's call kills it"
    );
    // Refused again and again within the interval: no heartbeat yet.
    for _ in 0..20 {
        assert!(meter.is_killed("p1"));
    }
    std::thread::sleep(recheck);
    assert!(
        meter.is_killed("p1"),
        "killed until an answer says otherwise"
    );
    assert!(meter.is_killed("p1"));
    assert!(
        wait_until(Duration::from_secs(10), || !meter.is_killed("p1")),
        "the answer to the heartbeat lifts the kill"
    );
    let received = received.lock().unwrap().clone();
    let heartbeats: Vec<&Value> = received
        .iter()
        .filter(|e| e["metricName"] == "system.session.heartbeat")
        .collect();
    println!("events received: {received:?}");
    assert_eq!(
        heartbeats.len(),
        1,
        "one heartbeat per interval: {received:?}"
    );
    assert_eq!(heartbeats[0]["sessionId"], "p1");
    assert_eq!(heartbeats[0]["sessionBoundary"], "HEARTBEAT");
    assert_eq!(meter.close(Instant::now() + Duration::from_secs(5)), 0);
}
