//! `mcp-meter proxy --upstream http://HOST:PORT/mcp --listen ADDR`: a reverse proxy for the MCP
//! Streamable HTTP transport. POSTs of JSON-RPC messages (and batches) are read whole (they are
//! small), checked, and forwarded; answers, JSON or SSE streams, and the GET stream go back
//! frame by frame as they come, read on the way for the results of calls (`sse::BodyReader`).
//! `Mcp-Session-Id`, the protocol version and every other end-to-end header pass through both
//! ways; DELETE ends a session. The proxy serves MCP on the upstream URL's path, and its own
//! `/healthz` and `/metrics` beside it.

use crate::calls::{messages, tool_call, CallTracker};
use crate::enforce::{gate_call, Enforcement};
use crate::meter::Meter;
use crate::sse::BodyReader;
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

/// The upstream's URL and the header names, as the binary gives them.
pub use hyper::header::HeaderName;
pub use hyper::Uri;

type Body = BoxBody<Bytes, hyper::Error>;

pub struct HttpProxy {
    /// The upstream MCP endpoint (`http://host:port/path`).
    pub upstream: Uri,
    pub rules: Enforcement,
    /// The header naming a call's customer, if any (else `customer`).
    pub customer_header: Option<HeaderName>,
    pub customer: Option<String>,
    /// The header naming the agent, if any (else the client's `initialize` clientInfo name).
    pub agent_header: Option<HeaderName>,
}

struct Shared {
    proxy: HttpProxy,
    meter: Arc<Meter>,
    client: Client<HttpConnector, Full<Bytes>>,
    /// Session id → its calls in flight (and its agent).
    sessions: Mutex<HashMap<String, CallTracker>>,
}

/// Serves until the listener fails; each connection on a task of its own.
pub async fn serve(
    listener: tokio::net::TcpListener,
    proxy: HttpProxy,
    meter: Arc<Meter>,
) -> std::io::Result<()> {
    let shared = Arc::new(Shared {
        proxy,
        meter,
        client: Client::builder(TokioExecutor::new()).build_http(),
        sessions: Mutex::new(HashMap::new()),
    });
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(shared.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
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

async fn handle(s: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    if path != s.proxy.upstream.path() {
        return Ok(match path.as_str() {
            "/healthz" => answer(StatusCode::OK, "text/plain", "ok\n"),
            "/metrics" => answer(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                crate::ops::metrics(&s.meter),
            ),
            _ => answer(
                StatusCode::NOT_FOUND,
                "text/plain",
                format!("MCP is served on {}\n", s.proxy.upstream.path()),
            ),
        });
    }
    match forward(&s, req).await {
        Ok(response) => Ok(response),
        Err(e) => Ok(answer(
            StatusCode::BAD_GATEWAY,
            "text/plain",
            format!("mcp-meter proxy: the upstream MCP server did not answer: {e}\n"),
        )),
    }
}

async fn forward(s: &Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, String> {
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
    let session = parts
        .headers
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let customer = header(&s.proxy.customer_header).or_else(|| s.proxy.customer.clone());
    let mut forwarded = bytes.clone();
    let mut refusals = Vec::new();
    let mut client_name = None;
    if parts.method == Method::POST {
        if let Ok(value) = serde_json::from_slice::<Value>(&bytes) {
            let mut keep = Vec::new();
            for message in messages(&value) {
                if message.get("method").and_then(Value::as_str) == Some("initialize") {
                    client_name = message
                        .pointer("/params/clientInfo/name")
                        .and_then(Value::as_str)
                        .map(str::to_string);
                }
                let Some((_, tool)) = tool_call(message) else {
                    lock(&s.sessions)
                        .entry(session.clone())
                        .or_default()
                        .from_client(message, None);
                    keep.push(message.clone());
                    continue;
                };
                let agent = header(&s.proxy.agent_header).or_else(|| {
                    lock(&s.sessions)
                        .get(&session)
                        .and_then(|t| t.agent.clone())
                });
                // The meter's calls block (authorization, guard): off the async workers.
                let decision = {
                    let (s2, message2, tool2, session2, customer2) = (
                        s.clone(),
                        message.clone(),
                        tool.clone(),
                        session.clone(),
                        customer.clone(),
                    );
                    let agent2 = agent.clone();
                    tokio::task::spawn_blocking(move || {
                        gate_call(
                            &s2.meter,
                            &s2.proxy.rules,
                            &message2,
                            &tool2,
                            if session2.is_empty() {
                                "stateless"
                            } else {
                                &session2
                            },
                            agent2.as_deref(),
                            customer2.as_deref(),
                        )
                    })
                    .await
                    .map_err(|e| format!("admission failed: {e}"))?
                };
                match decision {
                    Ok(call) => {
                        lock(&s.sessions)
                            .entry(session.clone())
                            .or_default()
                            .from_client(message, Some(call));
                        keep.push(message.clone());
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
                    return Ok(answer(
                        StatusCode::OK,
                        "application/json",
                        serde_json::to_vec(&body).expect("a value serializes"),
                    ));
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
    }

    let mut upstream = Request::builder()
        .method(parts.method.clone())
        .uri(with_query(&s.proxy.upstream, parts.uri.query()))
        .body(Full::new(forwarded))
        .map_err(|e| e.to_string())?;
    *upstream.headers_mut() = end_to_end(&parts.headers);
    let response = s
        .client
        .request(upstream)
        .await
        .map_err(|e| e.to_string())?;
    let (mut head, body) = response.into_parts();
    let answered_session = head
        .headers
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .unwrap_or_else(|| session.clone());
    if parts.method == Method::DELETE && head.status.is_success() {
        lock(&s.sessions).remove(&session);
    }
    if let Some(name) = client_name {
        lock(&s.sessions)
            .entry(answered_session.clone())
            .or_default()
            .agent = Some(name);
    }
    let content_type = head
        .headers
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let mut reader = BodyReader::for_content_type(&content_type);
    let is_sse = matches!(reader, BodyReader::Sse(_));
    head.headers = end_to_end(&head.headers);
    let tracked = s.clone();
    let observed = body
        .map_frame(move |frame| {
            if let Some(data) = frame.data_ref() {
                for value in reader.feed(data) {
                    let mut sessions = lock(&tracked.sessions);
                    let tracker = sessions.entry(answered_session.clone()).or_default();
                    for message in messages(&value) {
                        if let Some(done) = tracker.from_server(message) {
                            tracked.meter.record(done.event);
                        }
                    }
                }
            }
            frame
        })
        .boxed();
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

/// A body that sends `prefix` first, then `rest`.
struct Prefixed {
    prefix: Option<Bytes>,
    rest: Body,
}

impl hyper::body::Body for Prefixed {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        if let Some(prefix) = self.prefix.take() {
            return std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(prefix))));
        }
        std::pin::Pin::new(&mut self.rest).poll_frame(cx)
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
    m.lock().expect("sessions lock")
}
