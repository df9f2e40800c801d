//! `mcp-meter proxy --upstream http://HOST:PORT/mcp --listen ADDR`: a reverse proxy for the MCP
//! Streamable HTTP transport. POSTs of JSON-RPC messages (and batches) are read whole (they are
//! small), checked, and forwarded; answers, JSON or SSE streams, and the GET stream go back
//! frame by frame as they come. `Mcp-Session-Id`, the protocol version and every other
//! end-to-end header pass through both ways. The proxy serves MCP on the upstream URL's path,
//! and its own `/healthz` and `/metrics` beside it.
//!
//! Calls are matched per exchange: a POST's calls are answered in that POST's answer, so each
//! exchange keeps its own calls (an [`Exchange`]), read from its answer as it streams past
//! ([`Observed`]), whatever ids other clients use. An exchange that ends without an answer
//! reports its calls by the billing rule: the client gone → `CANCELLED`, the server's answer
//! ended → `ERROR`, the call timeout passed → `TIMEOUT`.
//!
//! A session is the `Mcp-Session-Id` the server handed out; where there is none (MCP
//! 2026-07-28, stateless servers) it is the value of the operator's `--session-header`, else
//! the client's connection. Sessions are kept only for their agent, and forgotten when idle.

use crate::calls::{client_name, id_key, messages, tool_call, CallTracker};
use crate::enforce::{unreachable, Caller, Door};
use crate::sse::BodyReader;
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// The upstream's URL and the header names, as the binary gives them.
pub use hyper::header::HeaderName;
pub use hyper::Uri;

type Body = BoxBody<Bytes, hyper::Error>;

/// Sessions remembered at most; past it the idle ones, then the oldest, are forgotten.
const MAX_SESSIONS: usize = 10_000;

/// A session unseen for this long is forgotten (its agent is learnt again from its requests).
const SESSION_IDLE: Duration = Duration::from_secs(3600);

pub struct HttpProxy {
    /// The upstream MCP endpoint (`http://host:port/path`).
    pub upstream: Uri,
    /// The header naming a call's customer, if any (else `customer`).
    pub customer_header: Option<HeaderName>,
    pub customer: Option<String>,
    /// The header naming the agent, if any (else the client's clientInfo name).
    pub agent_header: Option<HeaderName>,
    /// The header naming the session where the server hands out no `Mcp-Session-Id`.
    pub session_header: Option<HeaderName>,
}

struct Shared {
    proxy: HttpProxy,
    door: Arc<Door>,
    client: Client<HttpConnector, Full<Bytes>>,
    /// Session id → its agent (the `initialize` clientInfo name) and when it was last seen.
    sessions: Mutex<HashMap<String, (Option<String>, Instant)>>,
    /// (session, request id) → the cancel flag of a call in flight, for the client's
    /// `notifications/cancelled`, which comes in another exchange.
    cancels: Mutex<HashMap<(String, String), Arc<AtomicBool>>>,
}

/// Serves until the listener fails or `stop` completes; each connection on a task of its own.
/// On `stop` the connections are ended (their calls in flight reported `CANCELLED`, as when a
/// client goes away) and so are the input rounds waiting for a client, before it returns.
pub async fn serve(
    listener: tokio::net::TcpListener,
    proxy: HttpProxy,
    door: Arc<Door>,
    stop: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    // Requests go out at once, not after the upstream's delayed ACK of the previous write.
    let mut upstream_connector = HttpConnector::new();
    upstream_connector.set_nodelay(true);
    let shared = Arc::new(Shared {
        proxy,
        door,
        client: Client::builder(TokioExecutor::new()).build(upstream_connector),
        sessions: Mutex::new(HashMap::new()),
        cancels: Mutex::new(HashMap::new()),
    });
    let expiring = shared.clone();
    // Input rounds nobody came back to are reported once the call timeout passes.
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(1));
        loop {
            every.tick().await;
            expiring.door.expire_waiting();
        }
    });
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(stop);
    let served = loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut stop => break Ok(()),
        };
        // Finished connections leave the set as it goes.
        while connections.try_join_next().is_some() {}
        let (stream, _) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => break Err(e),
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        // A client that hands out no session is one session per connection.
        let connection = format!("connection-{}", crate::calls::uuid());
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                handle(shared.clone(), connection.clone(), req)
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    };
    // Dropping a connection's task drops its exchanges, which report their calls.
    connections.shutdown().await;
    shared.door.end_waiting("CANCELLED");
    served
}

fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed()
}

fn answer(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_str(content_type).expect("a valid content type"),
    );
    response
}

fn json_answer(value: &Value) -> Response<Body> {
    answer(
        StatusCode::OK,
        "application/json",
        serde_json::to_vec(value).expect("a value serializes"),
    )
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) and those the proxy sets itself.
fn end_to_end(headers: &HeaderMap) -> HeaderMap {
    let mut out = headers.clone();
    for name in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    ] {
        out.remove(name);
    }
    out
}

async fn handle(
    s: Arc<Shared>,
    connection: String,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    if path != s.proxy.upstream.path() {
        return Ok(match path.as_str() {
            "/healthz" => answer(StatusCode::OK, "text/plain", "ok\n"),
            "/metrics" => answer(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                crate::ops::metrics(&s.door.meter),
            ),
            _ => answer(
                StatusCode::NOT_FOUND,
                "text/plain",
                format!("MCP is served on {}\n", s.proxy.upstream.path()),
            ),
        });
    }
    match forward(&s, connection, req).await {
        Ok(response) => Ok(response),
        Err(e) => Ok(answer(
            StatusCode::BAD_GATEWAY,
            "text/plain",
            format!("mcp-meter proxy: {e}\n"),
        )),
    }
}

/// The calls of one exchange. Dropped with calls left (the client went away before their
/// answers), it reports them `CANCELLED`.
struct Exchange {
    shared: Arc<Shared>,
    calls: CallTracker,
    /// The (session, id) cancel flags this exchange registered.
    registered: Vec<(String, String)>,
}

impl Exchange {
    fn end(&mut self, status: &str) {
        self.shared.door.end_all(&mut self.calls, status);
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        self.end("CANCELLED");
        let mut cancels = lock(&self.shared.cancels);
        for key in self.registered.drain(..) {
            cancels.remove(&key);
        }
    }
}

/// An answer body read on the way for its exchange's results; it ends the calls left when the
/// server's answer ends and those past the call timeout while it streams.
struct Observed {
    inner: Incoming,
    reader: BodyReader,
    exchange: Exchange,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl Observed {
    fn new(inner: Incoming, reader: BodyReader, exchange: Exchange) -> Observed {
        let timeout = exchange.shared.door.rules.call_timeout;
        let due = exchange.calls.oldest().unwrap_or_else(Instant::now) + timeout;
        Observed {
            inner,
            reader,
            exchange,
            timer: Box::pin(tokio::time::sleep_until(due.into())),
        }
    }
}

impl hyper::body::Body for Observed {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    for value in this.reader.feed(data) {
                        for message in messages(&value) {
                            this.exchange
                                .shared
                                .door
                                .from_server(&mut this.exchange.calls, message);
                        }
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(end) => {
                // The server's answer ended (or broke) with calls unanswered.
                this.exchange.end("ERROR");
                Poll::Ready(end)
            }
            Poll::Pending => {
                if this.exchange.calls.in_flight() > 0 && this.timer.as_mut().poll(cx).is_ready() {
                    let door = &this.exchange.shared.door;
                    door.end_overdue(&mut this.exchange.calls);
                    if let Some(oldest) = this.exchange.calls.oldest() {
                        let due = oldest + door.rules.call_timeout;
                        this.timer.as_mut().reset(due.into());
                        let _ = this.timer.as_mut().poll(cx);
                    }
                }
                Poll::Pending
            }
        }
    }
}

async fn forward(
    s: &Arc<Shared>,
    connection: String,
    req: Request<Incoming>,
) -> Result<Response<Body>, String> {
    let (parts, body) = req.into_parts();
    let bytes = body
        .collect()
        .await
        .map_err(|e| format!("reading the request: {e}"))?
        .to_bytes();
    let header = |name: &Option<HeaderName>| {
        name.as_ref()
            .and_then(|n| parts.headers.get(n))
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let server_session = parts
        .headers
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let session = server_session
        .clone()
        .or_else(|| header(&s.proxy.session_header))
        .unwrap_or(connection);
    let customer = header(&s.proxy.customer_header).or_else(|| s.proxy.customer.clone());
    let session_agent = touch(s, &session);
    let mut exchange = Exchange {
        shared: s.clone(),
        calls: CallTracker::default(),
        registered: Vec::new(),
    };
    let mut forwarded = bytes.clone();
    let mut refusals = Vec::new();
    let mut initialize_name = None;
    let parsed = if parts.method == Method::POST {
        serde_json::from_slice::<Value>(&bytes).ok()
    } else {
        None
    };
    if let Some(value) = &parsed {
        let mut keep = Vec::new();
        for message in messages(value) {
            if message.get("method").and_then(Value::as_str) == Some("initialize") {
                initialize_name = client_name(message).map(str::to_string);
            }
            if message.get("method").and_then(Value::as_str) == Some("notifications/cancelled") {
                if let Some(id) = message.pointer("/params/requestId") {
                    if let Some(flag) = lock(&s.cancels).get(&(session.clone(), id_key(id))) {
                        flag.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
            let Some((id, tool)) = tool_call(message) else {
                // A `tools/list`, or a cancellation of a call of this very batch, which ends it.
                if let Some(cancelled) = exchange.calls.from_client(message) {
                    s.door.ended(crate::calls::Ended::Report(cancelled));
                }
                keep.push(message.clone());
                continue;
            };
            let who = Caller {
                session: session.clone(),
                agent: header(&s.proxy.agent_header)
                    .or_else(|| client_name(message).map(str::to_string))
                    .or_else(|| session_agent.clone()),
                customer: customer.clone(),
            };
            // The door blocks (authorization, guard, throttle): off the async workers.
            let decision = {
                let (s2, message2, tool2) = (s.clone(), message.clone(), tool.to_string());
                tokio::task::spawn_blocking(move || s2.door.admit(&message2, &tool2, &who))
                    .await
                    .map_err(|e| format!("admission failed: {e}"))?
            };
            match decision {
                Ok(call) => {
                    let flag = call.cancelled.clone();
                    match exchange.calls.start(id, call) {
                        Ok(()) => {
                            let key = (session.clone(), id_key(id));
                            lock(&s.cancels).insert(key.clone(), flag);
                            exchange.registered.push(key);
                            keep.push(message.clone());
                        }
                        Err(call) => {
                            s.door.ended(crate::calls::Ended::NotRun(*call));
                            refusals.push(crate::enforce::id_in_use(message));
                        }
                    }
                }
                Err(refusal) => refusals.push(refusal),
            }
        }
        if !refusals.is_empty() {
            if keep.is_empty() {
                let body = if refusals.len() == 1 && !value.is_array() {
                    refusals.remove(0)
                } else {
                    Value::Array(refusals)
                };
                return Ok(json_answer(&body));
            }
            forwarded = Bytes::from(
                serde_json::to_vec(&if value.is_array() {
                    Value::Array(keep)
                } else {
                    keep.remove(0)
                })
                .expect("a value serializes"),
            );
        }
    }

    let mut upstream = Request::builder()
        .method(parts.method.clone())
        .uri(with_query(&s.proxy.upstream, parts.uri.query()))
        .body(Full::new(forwarded))
        .map_err(|e| e.to_string())?;
    *upstream.headers_mut() = end_to_end(&parts.headers);
    let timeout = s.door.rules.call_timeout;
    let response = match tokio::time::timeout(timeout, s.client.request(upstream)).await {
        Ok(Ok(response)) => Ok(response),
        Ok(Err(e)) if e.is_connect() => {
            // Never delivered: its calls did not run.
            for (_, call) in exchange.calls.take_all() {
                s.door.ended(crate::calls::Ended::NotRun(call));
            }
            Err(format!("cannot connect: {e}"))
        }
        Ok(Err(e)) => {
            exchange.end("ERROR");
            Err(e.to_string())
        }
        Err(_) => {
            exchange.end("TIMEOUT");
            Err(format!("no answer within {} s", timeout.as_secs()))
        }
    };
    let response = match response {
        Ok(response) => response,
        Err(why) => {
            return match parsed.as_ref().and_then(|p| unreachable(p, &why)) {
                Some(errors) => Ok(json_answer(&errors)),
                None => Err(format!("the upstream MCP server did not answer: {why}")),
            }
        }
    };
    let (mut head, body) = response.into_parts();
    if parts.method == Method::DELETE && head.status.is_success() {
        lock(&s.sessions).remove(&session);
    }
    if let Some(name) = initialize_name {
        // The session the server hands out in its answer to `initialize` is named here.
        let answered = head
            .headers
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .unwrap_or(session);
        touch(s, &answered);
        if let Some(entry) = lock(&s.sessions).get_mut(&answered) {
            entry.0 = Some(name);
        }
    }
    let content_type = head
        .headers
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let reader = BodyReader::for_content_type(&content_type);
    let is_sse = matches!(reader, BodyReader::Sse(_));
    head.headers = end_to_end(&head.headers);
    let observed = if exchange.calls.watching() {
        Observed::new(body, reader, exchange).boxed()
    } else {
        body.boxed()
    };
    if refusals.is_empty() {
        return Ok(Response::from_parts(head, observed));
    }
    // A batch whose refused members were answered here and the rest went upstream: the
    // refusals join the upstream's answers, as events before its stream or members of its array.
    if is_sse {
        let events: String = refusals
            .iter()
            .map(|r| format!("event: message\ndata: {r}\n\n"))
            .collect();
        let body = Prefixed {
            prefix: Some(Bytes::from(events)),
            rest: observed,
        };
        return Ok(Response::from_parts(head, body.boxed()));
    }
    let whole = observed
        .collect()
        .await
        .map_err(|e| format!("reading the upstream answer: {e}"))?
        .to_bytes();
    let mut answers = match serde_json::from_slice::<Value>(&whole) {
        Ok(Value::Array(answers)) => answers,
        Ok(one) => vec![one],
        Err(_) => Vec::new(),
    };
    answers.extend(refusals);
    let merged = serde_json::to_vec(&Value::Array(answers)).expect("a value serializes");
    head.headers.remove(hyper::header::CONTENT_LENGTH);
    Ok(Response::from_parts(head, full(merged)))
}

/// Notes a request of `session`; answers its agent. Keeps the sessions bounded: past
/// [`MAX_SESSIONS`] the idle ones go, then the least recently seen.
fn touch(s: &Shared, session: &str) -> Option<String> {
    let mut sessions = lock(&s.sessions);
    let now = Instant::now();
    if !sessions.contains_key(session) && sessions.len() >= MAX_SESSIONS {
        sessions.retain(|_, (_, seen)| now.duration_since(*seen) < SESSION_IDLE);
        if sessions.len() >= MAX_SESSIONS {
            let mut by_age: Vec<(Instant, String)> = sessions
                .iter()
                .map(|(k, (_, seen))| (*seen, k.clone()))
                .collect();
            by_age.sort();
            for (_, k) in by_age.into_iter().take(MAX_SESSIONS / 10) {
                sessions.remove(&k);
            }
        }
    }
    let entry = sessions.entry(session.to_string()).or_insert((None, now));
    entry.1 = now;
    entry.0.clone()
}

/// A body that sends `prefix` first, then `rest`.
struct Prefixed {
    prefix: Option<Bytes>,
    rest: Body,
}

impl hyper::body::Body for Prefixed {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if let Some(prefix) = self.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(prefix))));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }
}

fn with_query(base: &Uri, query: Option<&str>) -> Uri {
    match query {
        Some(q) => format!("{base}?{q}")
            .parse()
            .unwrap_or_else(|_| base.clone()),
        None => base.clone(),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().expect("proxy lock")
}
