//! What operators and load balancers read: `/healthz`, `/readyz` (each dependency's state),
//! `/metrics` (Prometheus text), and the middleware that records every request.

use crate::state::AppState;
use actix_web::{web, HttpResponse};
use serde::Serialize;
use utoipa::ToSchema;

/// The answer of `/healthz`.
#[derive(Serialize, ToSchema)]
pub struct Health {
    /// Always `ok`.
    status: &'static str,
}

/// The process answers.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "Alive", body = Health, example = json!({"status": "ok"}))))]
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(Health { status: "ok" })
}

/// The answer of `GET /`: where to go from here.
#[derive(Serialize, ToSchema)]
pub struct Index {
    /// `mcp-meter`.
    name: &'static str,
    version: &'static str,
    /// The interactive API documentation.
    docs: &'static str,
    /// The dashboard (sign in with a `read` key) and the customer portal (with a portal token).
    dashboard: &'static str,
    /// The OpenAPI document.
    openapi: &'static str,
    health: &'static str,
    ready: &'static str,
    metrics: &'static str,
}

/// Where to start: the documentation, the dashboard, the OpenAPI document and the operations endpoints.
#[utoipa::path(get, path = "/", tag = "operations",
    responses((status = 200, description = "Links", body = Index)))]
pub async fn index() -> HttpResponse {
    HttpResponse::Ok().json(Index {
        name: "mcp-meter",
        version: env!("CARGO_PKG_VERSION"),
        docs: "/docs/",
        dashboard: "/dashboard/",
        openapi: "/openapi.json",
        health: "/healthz",
        ready: "/readyz",
        metrics: "/metrics",
    })
}

/// A health or readiness answer: 200, or 503 when `ok` is false, with `body` either way.
pub fn probe_answer(ok: bool, body: impl Serialize) -> HttpResponse {
    let mut answer = if ok {
        HttpResponse::Ok()
    } else {
        HttpResponse::ServiceUnavailable()
    };
    answer.json(body)
}

/// One dependency's state in `/readyz`.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Dependency {
    /// `kafka` or `store-writer` (where ingest publishes), `sqlite` or `clickhouse` (where
    /// analytics read), `memory` or `redis` (the guard state).
    name: &'static str,
    ready: bool,
    /// Whether ingest needs it: when a required dependency is down, `/readyz` answers 503.
    required: bool,
    /// What the process does without it.
    without_it: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// The answer of `/readyz`.
#[derive(Serialize, ToSchema)]
pub struct Readiness {
    /// `ready`; `degraded` when only dependencies ingest can do without are down (200);
    /// `unavailable` when ingest cannot work (503).
    status: &'static str,
    /// The names of the dependencies that are down.
    degraded: Vec<&'static str>,
    dependencies: Vec<Dependency>,
}

/// Each dependency's state, checked now and in parallel. Only the sink is required: without
/// the store ingest still works (distributed) and without the guard state ingest goes on
/// unenforced, so their loss answers 200 with `status: degraded` (a load balancer keeps sending
/// events) and names them.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Ready, or degraded with the dependencies named", body = Readiness, example = json!(
            {"status":"degraded","degraded":["redis"],"dependencies":[{"name":"kafka","ready":true,"required":true,"withoutIt":"ingest answers 503 with Retry-After; nothing is accepted"},{"name":"clickhouse","ready":true,"required":false,"withoutIt":"analytics and exports answer 503; ingest goes on"},{"name":"redis","ready":false,"required":false,"withoutIt":"ingest goes on; hard limits are not enforced and guard checks answer allow with degraded: true","error":"redis ping: Connection refused (os error 111)"}]})),
        (status = 503, description = "A dependency ingest needs is down", body = Readiness),
    ))]
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let (sink, store, guard) = futures_util::future::join3(
        state.sink.ready(),
        state.analytics.ready(),
        state.limits.ping(),
    )
    .await;
    let dependencies = vec![
        Dependency {
            name: state.sink.kind(),
            ready: sink.is_ok(),
            required: true,
            without_it: "ingest answers 503 with Retry-After; nothing is accepted",
            error: sink.err().map(|e| e.to_string()),
        },
        Dependency {
            name: state.analytics.kind(),
            ready: store.is_ok(),
            required: false,
            without_it: "analytics and exports answer 503; ingest goes on",
            error: store.err().map(|e| e.to_string()),
        },
        Dependency {
            name: state.limits.kind(),
            ready: guard.is_ok(),
            required: false,
            without_it: "ingest goes on; hard limits are not enforced and guard checks answer allow with degraded: true",
            error: guard.err().map(|e| e.to_string()),
        },
    ];
    let degraded: Vec<&'static str> = dependencies
        .iter()
        .filter(|d| !d.ready)
        .map(|d| d.name)
        .collect();
    let unavailable = dependencies.iter().any(|d| d.required && !d.ready);
    let status = match (unavailable, degraded.is_empty()) {
        (true, _) => "unavailable",
        (false, true) => "ready",
        (false, false) => "degraded",
    };
    probe_answer(
        !unavailable,
        Readiness {
            status,
            degraded,
            dependencies,
        },
    )
}

/// The process's metrics in Prometheus text format: the API's (ingest events by outcome,
/// requests by route and status with latency histograms), then those of the other components
/// this process runs (`serve`: store commits and margin levels; `ingestor`: Kafka delivery).
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format 0.0.4", content_type = "text/plain",
        body = String, example = "# HELP mcp_meter_ingest_events_total Events received by ingest, by outcome\n# TYPE mcp_meter_ingest_events_total counter\nmcp_meter_ingest_events_total{outcome=\"accepted\"} 1\n")))]
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    let mut out = String::with_capacity(16 * 1024);
    crate::metrics::METRICS.render(&mut out);
    for render in &state.metric_families {
        render(&mut out);
    }
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(out)
}

/// What the interactive documentation (Swagger UI, served from the binary) may load: its own
/// scripts, styles (it sets some inline) and images, and calls to this origin only; nothing
/// may frame it.
const DOCS_CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
style-src 'self' 'unsafe-inline'; img-src 'self' data:; font-src 'self' data:; \
connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Headers every answer carries: `nosniff`; `Cache-Control: no-store` unless the route chose
/// its own (keys, tokens, balances and usage are never kept by a cache or a proxy); on
/// `/docs/`, a content security policy that also forbids framing.
pub async fn security_headers(
    req: actix_web::dev::ServiceRequest,
    next: actix_web::middleware::Next<impl actix_web::body::MessageBody>,
) -> Result<actix_web::dev::ServiceResponse<impl actix_web::body::MessageBody>, actix_web::Error> {
    use actix_web::http::header::{self, HeaderValue};
    let docs = req.path() == "/docs" || req.path().starts_with("/docs/");
    let mut answer = next.call(req).await?;
    let headers = answer.headers_mut();
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if docs {
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(DOCS_CONTENT_SECURITY_POLICY),
        );
        headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
        headers.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        );
    }
    if !headers.contains_key(header::CACHE_CONTROL) {
        let policy = if docs { "no-cache" } else { "no-store" };
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static(policy));
    }
    Ok(answer)
}

/// With `http.metrics_listen`, keeps `/metrics` and the API apart: its addresses answer
/// `/metrics` only, and the API's addresses answer everything but `/metrics`, both with 404.
pub async fn split_metrics_listener(
    req: actix_web::dev::ServiceRequest,
    next: actix_web::middleware::Next<impl actix_web::body::MessageBody>,
) -> Result<
    actix_web::dev::ServiceResponse<actix_web::body::EitherBody<impl actix_web::body::MessageBody>>,
    actix_web::Error,
> {
    let state = req
        .app_data::<web::Data<AppState>>()
        .cloned()
        .expect("routes() registers the app state");
    if let Some(metrics_addrs) = state.metrics_addrs.get() {
        let on_metrics_listener = metrics_addrs.contains(&req.app_config().local_addr());
        let wants_metrics = req.path() == "/metrics";
        let refusal = match (on_metrics_listener, wants_metrics) {
            (true, false) => Some("this address serves /metrics only; the API is on `listen`"),
            (false, true) => Some("/metrics is served on http.metrics_listen only"),
            _ => None,
        };
        if let Some(why) = refusal {
            let answer = actix_web::ResponseError::error_response(
                &crate::error::ApiError::NotFound(why.into()),
            );
            return Ok(req.into_response(answer).map_into_right_body());
        }
    }
    Ok(next.call(req).await?.map_into_left_body())
}

/// The access log's target: `MCP_METER_LOG=info,access=warn` silences it.
pub const ACCESS_LOG: &str = "access";

/// Records every answered request's route, status and latency, and writes one access-log line
/// at `info`: method, path (no query string), status, milliseconds and the peer. Keys travel
/// in headers, which are never logged.
pub async fn record_request(
    req: actix_web::dev::ServiceRequest,
    next: actix_web::middleware::Next<impl actix_web::body::MessageBody>,
) -> Result<actix_web::dev::ServiceResponse<impl actix_web::body::MessageBody>, actix_web::Error> {
    let started = std::time::Instant::now();
    let answer = next.call(req).await?;
    let (status, took) = (answer.status().as_u16(), started.elapsed());
    let route = crate::metrics::route_of(answer.request().match_pattern().as_deref());
    crate::metrics::METRICS.http_request(route, status, took);
    // The request rides along with its answer: nothing is copied for the log beforehand.
    let req = answer.request();
    tracing::info!(target: ACCESS_LOG, method = %req.method(), path = %req.path(), status,
        ms = format_args!("{:.1}", took.as_secs_f64() * 1000.0),
        peer = %req.peer_addr().map(|p| p.to_string()).unwrap_or_default());
    Ok(answer)
}
