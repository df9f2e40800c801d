//! `mcp-meter proxy` between MCP software nobody here wrote: the official Python SDK's client
//! (PyPI `mcp` 2.3.0) at the current protocol (2026-07-28: no sessions, clientInfo in each
//! request's `_meta`, `input_required` rounds) and at the handshake generation (2025-11-25),
//! against a FastMCP 4.1.6 server, over Streamable HTTP and stdio, with a real `serve` as the
//! meter. What the client saw is compared with what ran and what was stored, call by call, by
//! the README's billing rule.
//!
//! One test, for volume, puts a trivial server of its own behind the proxy instead.
//!
//! The peers are `tests/peers/{mcp_client,fastmcp_server}.py`, in the venv `scripts/test` builds
//! (`MCP_METER_TEST_PYTHON`); without it these tests fail rather than skip.

use crate::common::distributed::wait_until;
use crate::common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// On the test plan a call with no tokens is priced 5000 (FastMCP reports none).
const RATED_CALL: i64 = 5000;

pub(crate) fn peers() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers")
}

/// A process the test started, killed when dropped.
pub(crate) struct Running(pub(crate) Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Running {
    /// Stops it with SIGTERM (a proxy delivers what is queued first) and waits for it.
    pub(crate) fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub(crate) fn listening(port: u16) -> bool {
    wait_until(Duration::from_secs(30), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
}

/// What a run of the peers leaves behind: the tools that finished, one line each.
pub(crate) struct Runs(tempfile::NamedTempFile);

impl Runs {
    pub(crate) fn new() -> Runs {
        Runs(tempfile::NamedTempFile::new().unwrap())
    }

    pub(crate) fn path(&self) -> String {
        self.0.path().display().to_string()
    }

    /// Every tool that finished.
    pub(crate) fn all(&self) -> usize {
        std::fs::read_to_string(self.0.path())
            .unwrap()
            .lines()
            .count()
    }

    pub(crate) fn of(&self, tool: &str) -> usize {
        std::fs::read_to_string(self.0.path())
            .unwrap()
            .lines()
            .filter(|l| *l == tool)
            .count()
    }
}

/// The FastMCP server on Streamable HTTP; answers its MCP URL.
fn fastmcp_http(runs: &Runs, stateless: bool) -> (Running, String) {
    let port = free_port();
    let mut command = Command::new(test_python());
    command
        .arg(peers().join("fastmcp_server.py"))
        .args(["http", &port.to_string()])
        .env("PEER_RUNS", runs.path())
        .stdout(Stdio::null());
    if stateless {
        command.arg("--stateless");
    }
    let server = Running(command.spawn().expect("python runs"));
    assert!(listening(port), "the FastMCP server listens on {port}");
    (server, format!("http://127.0.0.1:{port}/mcp"))
}

/// `mcp-meter proxy` in front of `upstream`; answers its MCP URL.
fn http_proxy(meter: &str, key: &str, upstream: &str, flags: &[&str]) -> (Running, String) {
    http_proxy_with(meter, key, upstream, flags, &[])
}

/// The same, with `env` beside the key (the customer token secret).
pub(crate) fn http_proxy_with(
    meter: &str,
    key: &str,
    upstream: &str,
    flags: &[&str],
    env: &[(&str, &str)],
) -> (Running, String) {
    let port = free_port();
    let proxy = Running(
        Command::new(env!("CARGO_BIN_EXE_mcp-meter"))
            .args(["proxy", "--upstream", upstream, "--meter-url", meter])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--flush-interval-ms", "100"])
            .args(flags)
            .env("MCP_METER_PROXY_API_KEY", key)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .spawn()
            .expect("mcp-meter runs"),
    );
    assert!(listening(port), "the proxy listens on {port}");
    (proxy, format!("http://127.0.0.1:{port}/mcp"))
}

/// The stdio server's command line, through the proxy when `meter` is given.
fn stdio_command(meter: Option<&str>, flags: &[&str]) -> String {
    let server = format!(
        "{} {} stdio",
        test_python(),
        peers().join("fastmcp_server.py").display()
    );
    match meter {
        None => server,
        Some(meter) => format!(
            "{} proxy --stdio --meter-url {meter} --flush-interval-ms 100 {} -- {server}",
            env!("CARGO_BIN_EXE_mcp-meter"),
            flags.join(" ")
        ),
    }
}

/// Runs the MCP client: `target` is `--url URL` or `--stdio COMMAND`. Answers what each client
/// saw. `env` is given to the client (and so to a stdio proxy it starts).
fn client(
    target: &[&str],
    mode: &str,
    scenario: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Vec<Value> {
    let out = Command::new(test_python())
        .arg(peers().join("mcp_client.py"))
        .args(target)
        .args(["--mode", mode])
        .args(extra)
        .arg(scenario)
        .envs(env.iter().copied())
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the MCP client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}: {stdout}"));
    report.as_array().unwrap().clone()
}

/// The calls as a client saw them, without what a server adds per answer that may differ.
fn answers(report: &[Value]) -> Vec<Value> {
    report
        .iter()
        .flat_map(|c| c["calls"].as_array().unwrap().clone())
        .map(|mut call| {
            call.as_object_mut().unwrap().remove("meta");
            call
        })
        .collect()
}

/// The stored events, each as `tool status agent`, sorted; waits until `expected` are there.
fn stored(s: &Server, expected: usize) -> Vec<String> {
    let read = || -> Vec<String> {
        let db = rusqlite::Connection::open(s.dir.path().join(backends::store::sqlite::DB_FILE))
            .unwrap();
        let mut rows = db
            .prepare(
                "SELECT tool_name, execution_status, agent_id FROM mcp_events ORDER BY 1, 2, 3",
            )
            .unwrap();
        rows.query_map([], |r| {
            Ok(format!(
                "{} {} {}",
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?
            ))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect()
    };
    wait_until(Duration::from_secs(20), || read().len() >= expected);
    // Anything more would come soon after: a short settle, then the final read.
    std::thread::sleep(Duration::from_millis(500));
    read()
}

fn sessions(s: &Server, key: &str) -> Vec<Value> {
    let (_, sessions) = s.get("/analytics/mcp/sessions", key);
    sessions["sessions"].as_array().unwrap().clone()
}

/// The usage scenario at each protocol generation over each transport: the answers equal the
/// direct ones; three `add` (SUCCESS) and one `fail` (ERROR, a tool error) are stored with the
/// client's name as the agent; the unknown tool, which the server never listed and refused, is
/// not; one session.
#[test]
fn every_call_of_current_and_handshake_clients_is_metered_once_through_both_proxies() {
    let mut figures = Vec::new();
    for mode in ["auto", "legacy"] {
        for transport in ["http", "stdio"] {
            let s = Server::start();
            let (direct_runs, runs) = (Runs::new(), Runs::new());
            let (direct, proxied) = if transport == "http" {
                let (_server, url) = fastmcp_http(&direct_runs, false);
                let direct = client(&["--url", &url], mode, "usage", &[], &[]);
                let (_upstream, upstream) = fastmcp_http(&runs, false);
                let (proxy, proxied) = http_proxy(&s.base, ACME, &upstream, &[]);
                let report = client(&["--url", &proxied], mode, "usage", &[], &[]);
                proxy.stop();
                (direct, report)
            } else {
                let direct = client(
                    &["--stdio", &stdio_command(None, &[])],
                    mode,
                    "usage",
                    &[],
                    &[("PEER_RUNS", &direct_runs.path())],
                );
                let proxied = client(
                    &["--stdio", &stdio_command(Some(&s.base), &[])],
                    mode,
                    "usage",
                    &[],
                    &[
                        ("PEER_RUNS", &runs.path()),
                        ("MCP_METER_PROXY_API_KEY", ACME),
                    ],
                );
                (direct, proxied)
            };
            let label = format!("{mode} over {transport}");
            let protocol = proxied[0]["protocol"].as_str().unwrap().to_string();
            assert_eq!(
                answers(&proxied),
                answers(&direct),
                "{label}: the same answers"
            );
            assert_eq!((runs.of("add"), runs.of("fail")), (3, 1), "{label}");
            let events = stored(&s, 4);
            assert_eq!(
                events,
                [
                    "add SUCCESS peer-agent",
                    "add SUCCESS peer-agent",
                    "add SUCCESS peer-agent",
                    "fail ERROR peer-agent"
                ],
                "{label} ({protocol})"
            );
            assert_eq!(sessions(&s, ACME).len(), 1, "{label}");
            figures.push(format!(
                "{label} ({protocol}): 5 calls, {} events",
                events.len()
            ));
        }
    }
    println!("{}", figures.join("; "));
}

/// Four clients at once, each numbering its JSON-RPC ids from the same start, with no session
/// id from the server: a 2026-07-28 client (which has no sessions) and a handshake client of a
/// stateless server. Every call is stored once; a 2026-07-28 call with its own client's name
/// (from its `_meta`). A handshake client names itself only in its `initialize`, which nothing
/// ties to its later requests when the server hands out no session: those have no agent.
/// Each client is a session of its own (its connection): a limit of 5 calls per session, which
/// the 20 calls of one shared session would break, refuses nobody.
#[test]
fn concurrent_sessionless_clients_with_the_same_ids_are_each_metered() {
    for (mode, stateless) in [("auto", false), ("legacy", true)] {
        let s = crate::credits::serve_with(
            "[[tenants.limits]]\nper = \"session\"\nwindow = \"hour\"\nmax_calls = 5\n",
        );
        let runs = Runs::new();
        let (_upstream, upstream) = fastmcp_http(&runs, stateless);
        let (proxy, url) = http_proxy(&s.base, INITECH, &upstream, &[]);
        let report = client(&["--url", &url], mode, "repeat", &["--clients", "4"], &[]);
        proxy.stop();
        let label = format!("{mode}, stateless server: {stateless}");
        assert!(
            answers(&report).iter().all(|a| a["isError"] == false),
            "{label}: no call refused: {report:?}"
        );
        assert_eq!(runs.of("add"), 20, "{label}");
        let events = stored(&s, 20);
        let mut per_agent = std::collections::BTreeMap::new();
        for event in &events {
            *per_agent
                .entry(event.split(' ').nth(2).unwrap().to_string())
                .or_insert(0) += 1;
        }
        assert_eq!(events.len(), 20, "{label}: {events:?}");
        let expected: &[i32] = if stateless { &[20] } else { &[5, 5, 5, 5] };
        assert_eq!(
            per_agent.values().copied().collect::<Vec<_>>(),
            expected,
            "{label}: {per_agent:?}"
        );
        println!(
            "{label}: 20 calls from 4 clients, {} events, {per_agent:?}",
            events.len()
        );
    }
}

/// A paid tool that asks the user for input (two rounds at 2026-07-28) is one call: one
/// authorization, one event, billed once. Then paid calls run while the balance lasts, and the
/// refused ones reach the 2026-07-28 client as valid results with the payment terms.
#[test]
fn an_input_round_is_one_paid_call_and_a_refusal_reaches_a_current_client_with_its_terms() {
    for transport in ["http", "stdio"] {
        let s = Server::start();
        let grant = 3 * RATED_CALL;
        let (status, answer) = crate::credits::grant(&s, ACME, "cust-peer", grant, "g-peer");
        assert_eq!(status, 201, "{answer}");
        let flags = [
            "--customer",
            "cust-peer",
            "--paid-tool",
            "ask",
            "--paid-tool",
            "add",
        ];
        let runs = Runs::new();
        let key_env = [
            ("PEER_RUNS", runs.path()),
            ("MCP_METER_PROXY_API_KEY", ACME.to_string()),
        ];
        let key_env: Vec<(&str, &str)> = key_env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (asked, paid) = if transport == "http" {
            let (_upstream, upstream) = fastmcp_http(&runs, false);
            let (proxy, url) = http_proxy(&s.base, ACME, &upstream, &flags);
            let asked = client(&["--url", &url], "auto", "ask", &[], &[]);
            let paid = client(&["--url", &url], "auto", "paid", &[], &[]);
            proxy.stop();
            (asked, paid)
        } else {
            let command = stdio_command(Some(&s.base), &flags);
            let asked = client(&["--stdio", &command], "auto", "ask", &[], &key_env);
            let paid = client(&["--stdio", &command], "auto", "paid", &[], &key_env);
            (asked, paid)
        };
        assert_eq!(asked[0]["protocol"], "2026-07-28");
        assert_eq!(
            asked[0]["calls"][0]["text"], "hello Ada",
            "{transport}: {asked:?}"
        );
        let calls = paid[0]["calls"].as_array().unwrap();
        let refused: Vec<bool> = calls.iter().map(|c| c["isError"] == true).collect();
        assert_eq!(refused, [false, false, true, true], "{transport}: {paid:?}");
        let terms = &calls[2]["meta"]["mcp-meter/payment"];
        assert_eq!(
            terms["reason"], "insufficient_balance",
            "{transport}: {paid:?}"
        );
        assert_eq!(terms["quoteMicros"], RATED_CALL);
        assert_eq!((runs.of("ask"), runs.of("add")), (1, 2), "{transport}");
        let events = stored(&s, 3);
        assert_eq!(
            events,
            [
                "add SUCCESS peer-agent",
                "add SUCCESS peer-agent",
                "ask SUCCESS peer-agent"
            ],
            "{transport}"
        );
        let balance = crate::credits::balance(&s, ACME, "cust-peer");
        assert_eq!(balance["settledMicros"], grant, "{transport}: {balance}");
        assert_eq!(
            balance["reservedMicros"], 0,
            "{transport}: one authorization per call"
        );
        println!("{transport}: ask (2 rounds) + 4 paid adds, 2 refused: {events:?}, {balance}");
    }
}

/// A paid call the client gives up on (its read timeout) is reported `CANCELLED` and billed,
/// its reservation settled, at both protocol generations over both transports; the client's
/// next call is metered as usual.
#[test]
fn a_call_the_client_gives_up_on_is_reported_cancelled_and_its_reservation_settled() {
    let mut figures = Vec::new();
    for mode in ["auto", "legacy"] {
        for transport in ["http", "stdio"] {
            let s = Server::start();
            let (status, _) = crate::credits::grant(&s, ACME, "cust-peer", 10 * RATED_CALL, "g");
            assert_eq!(status, 201);
            let flags = ["--customer", "cust-peer", "--paid-tool", "slow"];
            let runs = Runs::new();
            let report = if transport == "http" {
                let (_upstream, upstream) = fastmcp_http(&runs, false);
                let (proxy, url) = http_proxy(&s.base, ACME, &upstream, &flags);
                let report = client(&["--url", &url], mode, "timeout", &[], &[]);
                proxy.stop();
                report
            } else {
                let env = [
                    ("PEER_RUNS", runs.path()),
                    ("MCP_METER_PROXY_API_KEY", ACME.into()),
                ];
                let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
                let command = stdio_command(Some(&s.base), &flags);
                client(&["--stdio", &command], mode, "timeout", &[], &env)
            };
            let label = format!("{mode} over {transport}");
            let calls = report[0]["calls"].as_array().unwrap();
            assert!(calls[0].get("raised").is_some(), "{label}: {report:?}");
            assert_eq!(calls[1]["text"], "2", "{label}");
            let events = stored(&s, 2);
            assert_eq!(
                events,
                ["add SUCCESS peer-agent", "slow CANCELLED peer-agent"],
                "{label}"
            );
            let balance = crate::credits::balance(&s, ACME, "cust-peer");
            // Every call of the customer is charged to its balance, the paid one and the other.
            assert_eq!(
                balance["settledMicros"],
                2 * RATED_CALL,
                "{label}: {balance}"
            );
            assert_eq!(balance["reservedMicros"], 0, "{label}: {balance}");
            figures.push(format!("{label}: {events:?}"));
        }
    }
    println!("{}", figures.join("; "));
}

/// The stdio child inherits the client's environment but none of the proxy's own variables:
/// the meter key stays with the proxy.
#[test]
fn the_stdio_server_never_sees_the_meter_key() {
    let s = Server::start();
    let runs = Runs::new();
    let command = stdio_command(Some(&s.base), &[]);
    let report = client(
        &["--stdio", &command],
        "auto",
        "environment",
        &[],
        &[
            ("PEER_RUNS", &runs.path()),
            ("MCP_METER_PROXY_API_KEY", ACME),
            ("MCP_METER_PEER_VISIBLE", "1"),
        ],
    );
    let seen = &report[0]["calls"][0];
    let text = seen["text"].as_str().unwrap_or_default();
    assert_eq!(seen["isError"], false, "{report:?}");
    assert!(
        text.contains("MCP_METER_PEER_VISIBLE"),
        "the server inherits the client's environment: {text}"
    );
    assert!(
        !text.contains("MCP_METER_PROXY") && !text.contains(ACME),
        "the server saw: {text}"
    );
    assert_eq!(runs.of("environment"), 1);
}

/// A trivial Streamable HTTP MCP server of the test's own: each `initialize` is answered with a
/// new session id of `id_len` characters, every other request with a result (the tool `slow`
/// after 3 s), as JSON on a kept-alive connection; a batch with a batch, notifications alone
/// with 202. Answers its MCP URL.
fn trivial_upstream(id_len: usize) -> String {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/mcp", listener.local_addr().unwrap());
    let sessions = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let sessions = sessions.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                stream.set_nodelay(true).unwrap();
                let mut writer = stream;
                loop {
                    let mut length = 0;
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let line = line.trim_end().to_ascii_lowercase();
                        if line.is_empty() {
                            break;
                        }
                        if let Some(v) = line.strip_prefix("content-length:") {
                            length = v.trim().parse().unwrap();
                        }
                    }
                    let mut body = vec![0; length];
                    reader.read_exact(&mut body).unwrap();
                    let request: Value = serde_json::from_slice(&body).unwrap();
                    let mut session = String::new();
                    let mut answers = Vec::new();
                    let messages: Vec<&Value> = match &request {
                        Value::Array(all) => all.iter().collect(),
                        one => vec![one],
                    };
                    for message in messages {
                        if message.get("id").is_none() || message.get("method").is_none() {
                            continue;
                        }
                        let result = if message["method"] == "initialize" {
                            let n = sessions.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            session = format!("mcp-session-id: {n:0>id_len$}\r\n");
                            serde_json::json!({"protocolVersion": "2025-11-25",
                                "capabilities": {}, "serverInfo": {"name": "trivial", "version": "1"}})
                        } else {
                            if message["params"]["name"] == "slow" {
                                std::thread::sleep(Duration::from_secs(3));
                            }
                            serde_json::json!({"content": [{"type": "text", "text": "ok"}]})
                        };
                        answers.push(serde_json::json!({"jsonrpc": "2.0", "id": message["id"],
                            "result": result}));
                    }
                    let (status, answer) = match (request.is_array(), answers.len()) {
                        (_, 0) => ("202 Accepted", String::new()),
                        (false, _) => ("200 OK", answers[0].to_string()),
                        (true, _) => ("200 OK", Value::Array(answers).to_string()),
                    };
                    // One write: a head and a body written apart wait out delayed ACKs.
                    let whole = format!(
                        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\n{session}\
                         content-length: {}\r\n\r\n{answer}",
                        answer.len()
                    );
                    if writer.write_all(whole.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    url
}

/// The resident memory of a process, in KiB.
pub(crate) fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Sessions opened and abandoned (never deleted) leave the HTTP proxy's memory bounded: a
/// handshake session per `initialize`, with a 1 KiB session id and a 1 KiB client name, and a
/// sessionless 2026-07-28 client per `--session-header` value, each with one call. The proxy's
/// resident memory after 30,000 of each is within 16 MiB of what it was after 10,000 (kept
/// without a bound, the 20,000 more would hold over 40 MiB), and every call was metered.
#[test]
fn sessions_opened_and_abandoned_leave_the_http_proxys_memory_bounded() {
    const LONG: usize = 1024;
    let s = Server::start();
    let upstream = trivial_upstream(LONG);
    let (proxy, url) = http_proxy(
        &s.base,
        ACME,
        &upstream,
        &["--session-header", "X-Conversation"],
    );
    let pid = proxy.0.id();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let post = |session: Option<(&str, &str)>, body: Value| {
        let mut request = agent
            .post(&url)
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream");
        if let Some((name, value)) = session {
            request = request.header(name, value);
        }
        let mut answer = request.send(body.to_string()).unwrap();
        assert_eq!(answer.status(), 200);
        let _ = answer.body_mut().read_to_string().unwrap();
    };
    let open = |from: usize, to: usize| {
        for i in from..to {
            let name = format!("{i:0>LONG$}");
            post(
                None,
                serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "initialize",
                    "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                        "clientInfo": {"name": name, "version": "1"}}}),
            );
            let conversation = format!("conversation-{i}");
            post(
                Some(("X-Conversation", &conversation)),
                serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                    "params": {"name": "echo", "arguments": {},
                        "_meta": {"io.modelcontextprotocol/clientInfo":
                            {"name": format!("agent-{}", i % 10), "version": "1"}}}}),
            );
        }
    };
    open(0, 10_000);
    let after_10k = rss_kib(pid);
    open(10_000, 30_000);
    let after_30k = rss_kib(pid);
    println!(
        "proxy RSS after 10,000 sessions of each kind: {after_10k} KiB; after 30,000: \
         {after_30k} KiB ({:+} KiB)",
        after_30k as i64 - after_10k as i64
    );
    let db =
        rusqlite::Connection::open(s.dir.path().join(backends::store::sqlite::DB_FILE)).unwrap();
    let count = || -> i64 {
        db.query_row("SELECT count(*) FROM mcp_events", [], |r| r.get(0))
            .unwrap()
    };
    wait_until(Duration::from_secs(60), || count() >= 30_000);
    assert_eq!(count(), 30_000, "every call is metered once");
    assert!(
        after_30k < after_10k + 16 * 1024,
        "20,000 more abandoned sessions grew the proxy from {after_10k} KiB to {after_30k} KiB"
    );
}

/// `@modelcontextprotocol/server-everything` 2026.8.31 (the official TypeScript SDK 1.32.2's
/// reference server), from `tests/peers/node_modules`.
fn everything() -> String {
    peers()
        .join("node_modules/@modelcontextprotocol/server-everything/dist/index.js")
        .display()
        .to_string()
}

/// server-everything behind both proxies, called by the Python client in both modes (it speaks
/// the handshake generation, so the current client falls back): its answers reach the client,
/// each call is one event with the client's name as the agent, the name it never listed is not
/// metered, and over stdio its `get-env` tool shows the client's environment without any of
/// the proxy's variables (the meter key above all).
#[test]
fn server_everything_through_both_proxies_is_metered_and_never_sees_the_meter_key() {
    let mut figures = Vec::new();
    for mode in ["auto", "legacy"] {
        for transport in ["http", "stdio"] {
            let s = Server::start();
            let report = if transport == "http" {
                let port = free_port();
                let _server = Running(
                    Command::new("node")
                        .args([&everything(), "streamableHttp"])
                        .env("PORT", port.to_string())
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .spawn()
                        .expect("node runs"),
                );
                assert!(listening(port), "server-everything listens on {port}");
                let upstream = format!("http://127.0.0.1:{port}/mcp");
                let (proxy, url) = http_proxy(&s.base, ACME, &upstream, &[]);
                let report = client(&["--url", &url], mode, "everything", &[], &[]);
                proxy.stop();
                report
            } else {
                let command = format!(
                    "{} proxy --stdio --meter-url {} --flush-interval-ms 100 -- node {} stdio",
                    env!("CARGO_BIN_EXE_mcp-meter"),
                    s.base,
                    everything()
                );
                let env = [
                    ("MCP_METER_PROXY_API_KEY", ACME),
                    ("MCP_METER_PEER_VISIBLE", "1"),
                ];
                client(&["--stdio", &command], mode, "everything", &[], &env)
            };
            let label = format!("{mode} over {transport}");
            let calls = report[0]["calls"].as_array().unwrap();
            assert_eq!(calls[0]["text"], "Echo: hello", "{label}: {report:?}");
            assert_eq!(calls[1]["text"], "The sum of 2 and 3 is 5.", "{label}");
            let environment = calls[2]["text"].as_str().unwrap_or_default();
            assert!(
                !environment.contains("MCP_METER_PROXY") && !environment.contains(ACME),
                "{label}: the server saw {environment}"
            );
            if transport == "stdio" {
                assert!(
                    environment.contains("MCP_METER_PEER_VISIBLE"),
                    "{label}: the server inherits the client's environment"
                );
            }
            assert_eq!(calls[3]["isError"], true, "{label}");
            let events = stored(&s, 3);
            assert_eq!(
                events,
                [
                    "echo SUCCESS peer-agent",
                    "get-env SUCCESS peer-agent",
                    "get-sum SUCCESS peer-agent"
                ],
                "{label}"
            );
            figures.push(format!(
                "{label} ({}): {} calls, {} events",
                report[0]["protocol"].as_str().unwrap_or_default(),
                calls.len(),
                events.len()
            ));
        }
    }
    println!("{}", figures.join("; "));
}

/// JSON-RPC batches and a stop, against the HTTP proxy: a batch with two calls of one id runs
/// one and answers the other a JSON-RPC error (two answers of one id could not be told apart);
/// a call cancelled in its own batch is reported `CANCELLED`; a call in flight when the proxy
/// gets SIGTERM is reported `CANCELLED` and delivered before it exits. One event per call that
/// ran, none for the one refused.
#[test]
fn repeated_ids_a_cancel_in_the_same_batch_and_a_stop_mid_call_are_billed_by_the_rule() {
    let s = Server::start();
    let upstream = trivial_upstream(8);
    let (proxy, url) = http_proxy(&s.base, ACME, &upstream, &[]);
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let post = |body: Value| -> Value {
        let mut answer = agent
            .post(&url)
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .send(body.to_string())
            .unwrap();
        let text = answer.body_mut().read_to_string().unwrap();
        serde_json::from_str(&text).unwrap_or(Value::Null)
    };
    let call = |id: i64, tool: &str| {
        serde_json::json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
            "params": {"name": tool, "arguments": {}}})
    };
    let twice = post(serde_json::json!([call(7, "echo"), call(7, "echo")]));
    println!("two calls of id 7: {twice}");
    let answers = twice.as_array().unwrap();
    assert_eq!(answers.len(), 2, "{twice}");
    assert_eq!(
        answers
            .iter()
            .filter(|a| a["error"]["code"] == -32600)
            .count(),
        1,
        "{twice}"
    );
    let cancelled = serde_json::json!({"jsonrpc": "2.0", "method": "notifications/cancelled",
        "params": {"requestId": 8}});
    post(serde_json::json!([call(8, "cancelled"), cancelled]));
    let in_flight = std::thread::spawn({
        let url = url.clone();
        move || {
            // The proxy stops under it: whatever the client gets, the call is billed once.
            let _ = ureq::post(&url)
                .header("content-type", "application/json")
                .header("accept", "application/json, text/event-stream")
                .send(call(9, "slow").to_string());
        }
    });
    std::thread::sleep(Duration::from_millis(700));
    proxy.stop();
    in_flight.join().unwrap();
    let events = stored(&s, 3);
    assert_eq!(
        events,
        ["cancelled CANCELLED ", "echo SUCCESS ", "slow CANCELLED "],
        "one event per call that ran"
    );
}

/// A stdio call that never reached the server (it closed its stdin, so the write failed) did not
/// run: nothing is billed for it.
#[test]
fn a_stdio_call_the_server_never_received_is_not_billed() {
    use std::io::Write;
    let s = Server::start();
    let mut proxy = Command::new(env!("CARGO_BIN_EXE_mcp-meter"))
        .args(["proxy", "--stdio", "--meter-url", &s.base])
        .args(["--flush-interval-ms", "100", "--"])
        .args(["sh", "-c", "exec 0<&-; sleep 1"])
        .env("MCP_METER_PROXY_API_KEY", ACME)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("mcp-meter runs");
    // Give the child time to close its stdin.
    std::thread::sleep(Duration::from_millis(300));
    let mut stdin = proxy.stdin.take().unwrap();
    let request = serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": "never_sent", "arguments": {}}});
    writeln!(stdin, "{request}").unwrap();
    drop(stdin);
    assert!(proxy.wait().unwrap().success());
    let db =
        rusqlite::Connection::open(s.dir.path().join(backends::store::sqlite::DB_FILE)).unwrap();
    let stored: i64 = db
        .query_row("SELECT count(*) FROM mcp_events", [], |r| r.get(0))
        .unwrap();
    assert_eq!(stored, 0, "a call the server never received was billed");
}
