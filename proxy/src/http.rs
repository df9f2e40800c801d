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
//! A session is the value of the operator's `--session-header` (a gateway's session id, which
//! a client's own headers cannot override), else the `Mcp-Session-Id` the server handed out,
//! else the client's connection. Sessions are kept only for their agent, and forgotten when idle.
//!
//! Clients are not trusted ([`crate::wire`]): a body the proxy cannot parse is answered with a
//! parse error, never forwarded; the payer comes from a signed customer token, a header the
//! operator vouches for, or `--customer` ([`Payer`]); and every resource a client can make the
//! proxy hold is bounded ([`Limits`]): the body, the time to send it, the connections, the
//! sessions, and the answer events read for results.

use crate::calls::{client_name, id_key, messages, CallTracker};
use crate::enforce::{unreachable, Caller, Door};
use crate::sse::BodyReader;
use crate::wire;
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use schemas::event::{fit_text, MAX_AGENT_ID_LEN, MAX_SESSION_ID_LEN};
use serde_json::Value;
use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
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
    /// Where each call's payer comes from.
    pub payer: Payer,
    pub limits: Limits,
    /// The header naming the agent, if any (else the client's clientInfo name).
    pub agent_header: Option<HeaderName>,
    /// The header naming the session where the server hands out no `Mcp-Session-Id`.
    pub session_header: Option<HeaderName>,
}

/// Who pays for a call: a customer named in a header the proxy can trust, else `fixed`.
#[derive(Default)]
pub struct Payer {
    /// The customer of a call whose request names none (`--customer`).
    pub fixed: Option<String>,
    /// The header naming a request's payer (`--customer-header`), and why it is believed.
    pub header: Option<(HeaderName, PayerCheck)>,
}

pub enum PayerCheck {
    /// The header holds a customer token (`schemas::token`) of `tenant` signed with `secret`:
    /// a gateway signed it, or the portal handed it to the customer.
    Signed { secret: Vec<u8>, tenant: String },
    /// The header's value is the customer, as it is: only where a gateway the operator runs
    /// sets it and clients cannot (`--trust-customer-header`).
    Trusted,
}

impl Payer {
    /// The payer of a request, or why the request is refused: a payer header that is not
    /// believed (a forged, altered or expired token; an id that is not one), or given twice.
    pub fn of(&self, headers: &HeaderMap, now_s: i64) -> Result<Option<String>, String> {
        let Some((name, check)) = &self.header else {
            return Ok(self.fixed.clone());
        };
        let mut values = headers.get_all(name).iter();
        let Some(value) = values.next() else {
            return Ok(self.fixed.clone());
        };
        if values.next().is_some() {
            return Err(format!(
                "the {name} header is given more than once; give it once"
            ));
        }
        let value = value
            .to_str()
            .map_err(|_| format!("the {name} header is not text"))?;
        let customer = match check {
            PayerCheck::Trusted => value.to_string(),
            PayerCheck::Signed { secret, tenant } => {
                use schemas::token::TokenError;
                let claims = schemas::token::verify(secret, value, now_s).map_err(|e| match e {
                    TokenError::Malformed => format!("the {name} header is not a customer token (mcpp_…)"),
                    TokenError::Signature => format!("the {name} header's signature does not match: the token was altered or signed with another secret"),
                    TokenError::Expired(at) => format!("the {name} header's token expired at {}", schemas::event::format_ms(at * 1000)),
                })?;
                if claims.tenant != *tenant {
                    return Err(format!("the {name} header's token is for another tenant"));
                }
                claims.customer
            }
        };
        schemas::credits::valid_customer_id(&customer)
            .map_err(|e| format!("the {name} header names no valid customer: {e}"))?;
        Ok(Some(customer))
    }
}

/// What a client can make the proxy hold, bounded.
#[derive(Clone, Debug)]
pub struct Limits {
    /// The largest request body (a POST's messages): larger ones are refused (413) unread.
    pub max_body_bytes: usize,
    /// The longest a client may take to send a request's headers, and then its body.
    pub read_timeout: Duration,
    /// Connections served at once; more wait to be accepted.
    pub max_connections: usize,
    /// The largest answer (one SSE event, or a JSON body) read for its results. A larger one
    /// still reaches the client; its calls end by the billing rule as unanswered (`ERROR`).
    pub max_answer_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 4 << 20,
            read_timeout: Duration::from_secs(30),
            max_connections: 1024,
            max_answer_bytes: 16 << 20,
        }
    }
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
    let slots = Arc::new(tokio::sync::Semaphore::new(
        shared.proxy.limits.max_connections,
    ));
    tokio::pin!(stop);
    let served = loop {
        let accepted = tokio::select! {
            accepted = async {
                let slot = slots.clone().acquire_owned().await.expect("never closed");
                listener.accept().await.map(|a| (a, slot))
            } => accepted,
            () = &mut stop => break Ok(()),
        };
        // Finished connections leave the set as it goes.
        while connections.try_join_next().is_some() {}
        let ((stream, peer), slot) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => break Err(e),
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        // A client that hands out no session is one session per connection.
        let connection = format!("connection-{}", crate::calls::uuid());
        connections.spawn(async move {
            let read_timeout = shared.proxy.limits.read_timeout;
            let service = hyper::service::service_fn(move |req| {
                handle(shared.clone(), connection.clone(), peer, req)
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(read_timeout)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            drop(slot);
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

/// The end-to-end headers of a message: without the hop-by-hop ones (RFC 9110 §7.6.1: those
/// `Connection` names, and the standard ones), the proxy credentials meant for this hop, and
/// those the proxy sets itself.
fn end_to_end(headers: &HeaderMap) -> HeaderMap {
    let mut out = headers.clone();
    for listed in headers.get_all(hyper::header::CONNECTION) {
        for name in listed.to_str().unwrap_or("").split(',') {
            if let Ok(name) = HeaderName::try_from(name.trim()) {
                // What MCP itself reads stays, whatever `Connection` says.
                if !name.as_str().starts_with("mcp-") && name != hyper::header::CONTENT_TYPE {
                    out.remove(name);
                }
            }
        }
    }
    for name in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "proxy-authenticate",
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

/// Why a POST's body is not one the proxy reads as the server will, if it is not: a server may
/// decode the charset or the encoding the client names (body-parser reads UTF-7), where the
/// proxy reads UTF-8 JSON only.
fn not_plain_json(headers: &HeaderMap) -> Option<String> {
    if let Some(encoding) = headers.get(hyper::header::CONTENT_ENCODING) {
        if !encoding.as_bytes().eq_ignore_ascii_case(b"identity") {
            return Some("send the body without Content-Encoding".into());
        }
    }
    if headers.get_all(hyper::header::CONTENT_TYPE).iter().count() > 1 {
        return Some("the Content-Type is given more than once; give it once".into());
    }
    let content_type = headers.get(hyper::header::CONTENT_TYPE)?;
    let text = content_type.to_str().unwrap_or("");
    let mut parts = text.split(';');
    let mime = parts.next().unwrap_or("").trim();
    if !mime.eq_ignore_ascii_case("application/json") {
        return Some(format!(
            "the Content-Type is `{text}`; send application/json"
        ));
    }
    for parameter in parts {
        let (name, value) = parameter.split_once('=').unwrap_or((parameter, ""));
        let value = value.trim().trim_matches('"');
        if name.trim().eq_ignore_ascii_case("charset")
            && !value.eq_ignore_ascii_case("utf-8")
            && !value.eq_ignore_ascii_case("utf8")
        {
            return Some(format!("the charset is `{value}`; send UTF-8"));
        }
    }
    None
}

/// A request's headers as the upstream gets them: end to end, without the payer header (the
/// proxy's), and `X-Forwarded-For` saying the client's address, not what the client claims.
fn upstream_headers(headers: &HeaderMap, payer: &Payer, peer: SocketAddr) -> HeaderMap {
    let mut out = end_to_end(headers);
    if let Some((name, _)) = &payer.header {
        out.remove(name);
    }
    for name in ["forwarded", "x-forwarded-for", "x-real-ip"] {
        out.remove(name);
    }
    if out.contains_key(hyper::header::CONTENT_TYPE) {
        // The body the proxy read, named as it read it.
        out.insert(
            hyper::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    out.insert(
        "x-forwarded-for",
        HeaderValue::from_str(&peer.ip().to_string()).expect("an address is a header value"),
    );
    out
}

/// The answer to a request refused before anything of it was forwarded (counted): a JSON-RPC
/// error, with an HTTP status.
fn refused(s: &Shared, status: StatusCode, body: &Value) -> Response<Body> {
    s.door.meter.stats().requests_refused.add(1);
    let mut response = json_answer(body);
    *response.status_mut() = status;
    response
}

async fn handle(
    s: Arc<Shared>,
    connection: String,
    peer: SocketAddr,
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
    match forward(&s, connection, peer, req).await {
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
    /// Set once the request goes upstream: calls dropped before never ran.
    forwarded: bool,
}

impl Exchange {
    fn end(&mut self, status: &str) {
        self.shared.door.end_all(&mut self.calls, status);
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        if self.forwarded {
            self.end("CANCELLED");
        } else {
            // The client went away while the calls were admitted: none was forwarded.
            for (_, call) in self.calls.take_all() {
                self.shared.door.ended(crate::calls::Ended::NotRun(call));
            }
        }
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

impl Observed {
    /// Ends the calls the messages read from the answer answer; counts the events too large
    /// to read.
    fn read(&mut self, values: Vec<Value>) {
        let skipped = self.reader.take_skipped();
        if skipped > 0 {
            self.exchange
                .shared
                .door
                .meter
                .stats()
                .answers_unread
                .add(skipped);
        }
        for value in values {
            for message in messages(&value) {
                self.exchange
                    .shared
                    .door
                    .from_server(&mut self.exchange.calls, message);
            }
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
                    let read = this.reader.feed(data);
                    this.read(read);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(end) => {
                if end.is_none() {
                    let read = this.reader.finish();
                    this.read(read);
                }
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
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Body>, String> {
    let (parts, body) = req.into_parts();
    let limits = &s.proxy.limits;
    let declared = parts
        .headers
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limits.max_body_bytes as u64) {
        // Refused before a byte of it is read (a client that asked `Expect: 100-continue`
        // never sends it).
        return Ok(refused(
            s,
            StatusCode::PAYLOAD_TOO_LARGE,
            &wire::too_large(limits.max_body_bytes),
        ));
    }
    let read = Limited::new(body, limits.max_body_bytes).collect();
    let bytes = match tokio::time::timeout(limits.read_timeout, read).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return Ok(refused(
                s,
                StatusCode::PAYLOAD_TOO_LARGE,
                &wire::too_large(limits.max_body_bytes),
            ));
        }
        Ok(Err(e)) => return Err(format!("reading the request: {e}")),
        Err(_) => {
            return Ok(refused(
                s,
                StatusCode::REQUEST_TIMEOUT,
                &wire::refused_whole(&format!(
                    "the request body did not arrive within {} s",
                    limits.read_timeout.as_secs()
                )),
            ));
        }
    };
    let header = |name: &Option<HeaderName>| {
        name.as_ref()
            .and_then(|n| parts.headers.get(n))
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    // Messages travel in POSTs; nothing else may carry a body past the proxy.
    let parsed = if parts.method == Method::POST {
        if let Some(why) = not_plain_json(&parts.headers) {
            return Ok(refused(
                s,
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                &wire::refused_whole(&why),
            ));
        }
        match wire::read(&bytes) {
            Ok((value, forwarded)) => Some((value, bytes.slice_ref(forwarded))),
            Err(error) => {
                return Ok(refused(s, StatusCode::BAD_REQUEST, &error));
            }
        }
    } else if !bytes.is_empty() {
        return Ok(refused(
            s,
            StatusCode::BAD_REQUEST,
            &wire::refused_whole(&format!("a {} request carries no body", parts.method)),
        ));
    } else {
        None
    };
    let customer = if parsed.is_some() {
        let now_s = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        match s.proxy.payer.of(&parts.headers, now_s) {
            Ok(customer) => customer,
            Err(why) => {
                return Ok(refused(
                    s,
                    StatusCode::FORBIDDEN,
                    &wire::refused_whole(&why),
                ));
            }
        }
    } else {
        None
    };
    let server_session = parts
        .headers
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .map(|v| fit_text(v, MAX_SESSION_ID_LEN).into_owned());
    // The operator's session header, set by a gateway, comes first: a client's own
    // Mcp-Session-Id must not move its calls out of the session the gateway names.
    let session = header(&s.proxy.session_header)
        .map(|v| fit_text(&v, MAX_SESSION_ID_LEN).into_owned())
        .or_else(|| server_session.clone())
        .unwrap_or(connection);
    let session_agent = touch(s, &session);
    let mut exchange = Exchange {
        shared: s.clone(),
        calls: CallTracker::default(),
        registered: Vec::new(),
        forwarded: false,
    };
    let mut forwarded = parsed.as_ref().map_or(bytes.clone(), |(_, b)| b.clone());
    let mut refusals = Vec::new();
    let mut initialize_name = None;
    if let Some((value, _)) = &parsed {
        let mut keep = Vec::new();
        for message in messages(value) {
            if message.get("method").and_then(Value::as_str) == Some("initialize") {
                initialize_name = client_name(message).map(agent_id);
            }
            if message.get("method").and_then(Value::as_str) == Some("notifications/cancelled") {
                if let Some(id) = message.pointer("/params/requestId") {
                    if let Some(flag) = lock(&s.cancels).get(&(session.clone(), id_key(id))) {
                        flag.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
            let (id, tool) = match wire::tool_call(message) {
                Ok(Some(call)) => call,
                Ok(None) => {
                    // Another request: its id must not be a call's, or its answer would end
                    // the call.
                    if let Err(why) = exchange.calls.claim(message) {
                        refusals.push(crate::enforce::id_in_use(message, why));
                        continue;
                    }
                    // A `tools/list`, or a cancellation of a call of this very batch, which
                    // ends it.
                    if let Some(cancelled) = exchange.calls.from_client(message) {
                        s.door.ended(crate::calls::Ended::Report(cancelled));
                    }
                    keep.push(message.clone());
                    continue;
                }
                Err(invalid) => {
                    refusals.push(invalid);
                    continue;
                }
            };
            if let Some(why) = exchange.calls.busy(id) {
                refusals.push(crate::enforce::id_in_use(message, why));
                continue;
            }
            let who = Caller {
                session: session.clone(),
                agent: header(&s.proxy.agent_header)
                    .or_else(|| client_name(message).map(str::to_string))
                    .map(|name| agent_id(&name))
                    .or_else(|| session_agent.clone()),
                customer: customer.clone(),
            };
            // The door blocks (authorization, guard, throttle): off the async workers. A client
            // gone while its call is admitted drops the receiver: the call never runs, and
            // what it reserved is released.
            let decision = {
                let (s2, message2, tool2) = (s.clone(), message.clone(), tool.to_string());
                let (answer, decided) = tokio::sync::oneshot::channel();
                tokio::task::spawn_blocking(move || {
                    let decision = s2.door.admit(&message2, &tool2, &who);
                    if let Err(Ok(call)) = answer.send(decision) {
                        s2.door.ended(crate::calls::Ended::NotRun(call));
                    }
                });
                decided.await.map_err(|_| "admission failed".to_string())?
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
                        Err((call, why)) => {
                            s.door.ended(crate::calls::Ended::NotRun(*call));
                            refusals.push(crate::enforce::id_in_use(message, why));
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
    *upstream.headers_mut() = upstream_headers(&parts.headers, &s.proxy.payer, peer);
    let timeout = s.door.rules.call_timeout;
    exchange.forwarded = true;
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
            return match parsed.as_ref().and_then(|(p, _)| unreachable(p, &why)) {
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
            .map(|v| fit_text(v, MAX_SESSION_ID_LEN).into_owned())
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
    let length = head
        .headers
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse().ok());
    let reader = BodyReader::new(&content_type, length, s.proxy.limits.max_answer_bytes);
    let is_sse = reader.is_sse();
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
    let whole = Limited::new(observed, s.proxy.limits.max_answer_bytes)
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

/// An MCP client's name as an event's `agentId` ([`fit_text`]: a name too long or with
/// control characters would make an event ingest refuses, and a call that ran unbilled).
fn agent_id(name: &str) -> String {
    fit_text(name, MAX_AGENT_ID_LEN).into_owned()
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
