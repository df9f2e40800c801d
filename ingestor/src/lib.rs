//! mcp-meter's HTTP API (actix-web): ingest, the guard check, analytics, health.
//!
//! - [`auth`]: API keys (stored hashed) to tenant and scopes.
//! - [`ingest`]: `POST /v1/ingest/batch`, `POST /v1/ingest/events`.
//! - [`guard`]: `GET /v1/guard/check` from the guard state only.
//! - [`ops`]: `/healthz`, `/readyz`, `/metrics`, and the request-recording middleware.
//! - [`limits`]: hard limits, charged at ingest; breaches kill sessions.
//! - [`credits`]: charge before the tool runs: grants, balances, `POST /v1/authorize`, and
//!   the settlement of ingested calls, once per event key.
//! - [`state`]: [`AppState`], what every handler shares, and `authenticate` (key, scope,
//!   rate limit).
//! - [`body`]: request bodies read as JSON, with messages that say what to fix.
//! - [`rebuild`]: the ledger seed a state that lost a tenant's money state is loaded with.
//! - [`analytics`]: `GET /analytics/mcp/...`.
//! - [`exports`]: `GET /v1/exports/billing`, streamed CSV or JSON.
//! - [`portal`]: `POST /v1/portal/tokens`, signed read-only tokens for one customer.
//! - [`dashboard`]: `/dashboard/`, the pages and chart library embedded in the binary.
//! - [`openapi`]: the OpenAPI document (`/openapi.json`) and Swagger UI (`/docs`).
//! - [`metrics`]: the API's metric families (ingest outcomes, requests by route and status).
//! - [`error`]: the one mapping from errors to HTTP status codes.
//!
//! The API talks to the pipeline only through `backends`' ports; which adapters stand behind
//! them is the binary's choice.

pub mod analytics;
pub mod auth;
pub mod body;
pub mod credits;
pub mod dashboard;
pub mod error;
pub mod exports;
pub mod guard;
pub mod ingest;
pub mod limits;
pub mod metrics;
pub mod openapi;
pub mod ops;
pub mod portal;
pub mod rebuild;
pub mod state;

use actix_web::{web, HttpMessage};
use schemas::config::Scope;
use state::AppState;

/// `path` answering `route` (a method and its handler); any other method gets 405 with `Allow`.
fn resource(
    path: &str,
    method: actix_web::http::Method,
    route: actix_web::Route,
) -> actix_web::Resource {
    use actix_web::guard;
    // A GET path answers HEAD too (load balancers probe with it).
    let (route, allow) = if method == actix_web::http::Method::GET {
        (
            route.guard(guard::Any(guard::Get()).or(guard::Head())),
            "GET, HEAD".to_string(),
        )
    } else {
        (route.method(method.clone()), method.to_string())
    };
    web::resource(path)
        .route(route)
        .default_service(web::to(move || {
            let allow = allow.clone();
            async move {
                actix_web::HttpResponse::MethodNotAllowed()
                    .insert_header((actix_web::http::header::ALLOW, allow.clone()))
                    .json(error::ErrorBody {
                        error: "method_not_allowed",
                        message: format!("this path answers {allow} only"),
                    })
            }
        }))
}

fn get<F, Args>(path: &str, handler: F) -> actix_web::Resource
where
    F: actix_web::Handler<Args>,
    Args: actix_web::FromRequest + 'static,
    F::Output: actix_web::Responder + 'static,
{
    resource(path, actix_web::http::Method::GET, web::route().to(handler))
}

/// What a route that takes a body checks before reading it, in this order: the key (from the
/// headers alone), for ingest the content type and an in-flight permit, then the body, whole
/// within `http.body_timeout_ms` and no larger than its cap. A caller without a key never gets
/// a byte of its body read, nor a permit.
#[derive(Clone, Copy)]
struct Door {
    scope: schemas::config::Scope,
    /// Ingest: `ingest.max_body_bytes`, a JSON content type and an in-flight permit
    /// (`ingest.max_in_flight_requests`). Otherwise `http.max_small_body_bytes`.
    ingest: bool,
}

impl Door {
    const INGEST: Door = Door {
        scope: schemas::config::Scope::Ingest,
        ingest: true,
    };

    fn small(scope: schemas::config::Scope) -> Door {
        Door {
            scope,
            ingest: false,
        }
    }
}

/// `path` answering POST with `handler` behind `door`.
fn post_behind<F, Args>(path: &str, door: Door, handler: F) -> actix_web::Resource
where
    F: actix_web::Handler<Args>,
    Args: actix_web::FromRequest + 'static,
    F::Output: actix_web::Responder + 'static,
{
    let route = web::route()
        .to(handler)
        .wrap(actix_web::middleware::from_fn(move |req, next| {
            through(door, req, next)
        }));
    resource(path, actix_web::http::Method::POST, route)
}

/// Runs `door`'s checks, then the handler with the body read and the caller known (its own
/// `authenticate` takes the caller the door found, without charging the rate limit again).
async fn through(
    door: Door,
    req: actix_web::dev::ServiceRequest,
    next: actix_web::middleware::Next<actix_web::body::BoxBody>,
) -> Result<actix_web::dev::ServiceResponse, actix_web::Error> {
    let state = req
        .app_data::<web::Data<AppState>>()
        .cloned()
        .expect("routes() registers the app state");
    // A refusal leaves the body unread, held until the answer is written: the connection is
    // then closed rather than drained (`body::hold_unread_body`).
    let refuse = |req: actix_web::dev::ServiceRequest, e: error::ApiError| {
        Ok(req.into_response(actix_web::ResponseError::error_response(&e)))
    };
    let caller = match state.authenticate(req.request(), door.scope).await {
        Ok(caller) => caller,
        Err(e) => return refuse(req, e),
    };
    req.extensions_mut().insert(state::Authenticated {
        scope: door.scope,
        caller,
    });
    let mut _permit = None;
    let (limit, advice) = if door.ingest {
        if let Err(e) = ingest::json_content_type(req.request()) {
            return refuse(req, e);
        }
        match state.in_flight.try_acquire() {
            Ok(permit) => _permit = Some(permit),
            Err(_) => {
                let busy = error::ApiError::Busy {
                    in_flight: state.ingest.max_in_flight_requests,
                };
                return refuse(req, busy);
            }
        }
        (state.ingest.max_body_bytes, "send fewer events per request")
    } else {
        (
            state.http.max_small_body_bytes,
            "this route takes a small JSON object (http.max_small_body_bytes)",
        )
    };
    let timeout = std::time::Duration::from_millis(state.http.body_timeout_ms);
    match body::read_whole(&req, limit, advice, timeout).await {
        Ok(bytes) => {
            req.extensions_mut().insert(body::Whole(bytes));
        }
        Err(e) => return refuse(req, e),
    }
    next.call(req).await
}

/// Mounts the API on an actix app: `App::new().configure(ingestor::routes(state))`.
pub fn routes(state: web::Data<AppState>) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg| {
        let body_limit = state.ingest.max_body_bytes;
        cfg.app_data(state)
            .app_data(web::PayloadConfig::new(body_limit))
            .app_data(web::QueryConfig::default().error_handler(|e, _| {
                // The serde message alone: actix's own prefix ("Query deserialize error:")
                // tells a caller nothing.
                let detail = match e {
                    actix_web::error::QueryPayloadError::Deserialize(inner) => inner.to_string(),
                    other => other.to_string(),
                };
                error::ApiError::BadRequest(format!("bad query parameters: {detail}")).into()
            }))
            .app_data(
                web::PathConfig::default().error_handler(|e, _| {
                    error::ApiError::BadRequest(format!("bad path: {e}")).into()
                }),
            )
            .service(post_behind("/v1/ingest/batch", Door::INGEST, ingest::batch))
            .service(post_behind(
                "/v1/ingest/events",
                Door::INGEST,
                ingest::events,
            ))
            .service(get("/v1/guard/check", guard::check))
            .service(get("/v1/guard/states", guard::states))
            .service(post_behind(
                "/v1/portal/tokens",
                Door::small(Scope::Admin),
                portal::issue,
            ))
            .service(post_behind(
                "/v1/authorize",
                Door::small(Scope::Ingest),
                credits::authorize,
            ))
            .service(post_behind(
                "/v1/authorize/{nonce}/release",
                Door::small(Scope::Ingest),
                credits::release,
            ))
            .service(post_behind(
                "/v1/customers/{customer_id}/credits",
                Door::small(Scope::Admin),
                credits::grant,
            ))
            .service(get("/v1/customers/{customer_id}/balance", credits::balance))
            .service(get("/v1/exports/billing", exports::billing))
            .service(get("/", ops::index))
            .service(get("/healthz", ops::healthz))
            .service(get("/readyz", ops::readyz))
            .service(get("/metrics", ops::metrics))
            .service(get("/dashboard", dashboard::redirect))
            .service(get("/dashboard/{file:.*}", dashboard::asset))
            .service(get("/openapi.json", || async {
                actix_web::HttpResponse::Ok()
                    .content_type("application/json")
                    .body(openapi::document())
            }))
            .service(get("/docs", || async {
                actix_web::HttpResponse::PermanentRedirect()
                    .insert_header((actix_web::http::header::LOCATION, "/docs/"))
                    .finish()
            }))
            .service(
                utoipa_swagger_ui::SwaggerUi::new("/docs/{_:.*}")
                    .config(utoipa_swagger_ui::Config::new(["/openapi.json"])),
            )
            .service(get("/analytics/mcp/revenue/by-tool", analytics::by_tool))
            .service(get("/analytics/mcp/by-agent", analytics::by_agent))
            .service(get("/analytics/mcp/by-customer", analytics::by_customer))
            .service(get("/analytics/mcp/summary", analytics::summary))
            .service(get("/analytics/mcp/sessions", analytics::sessions))
            .service(get("/analytics/mcp/timeseries", analytics::timeseries))
            .service(get(
                "/analytics/mcp/sessions/{session_id}",
                analytics::session,
            ))
            .default_service(web::to(|req: actix_web::HttpRequest| async move {
                actix_web::ResponseError::error_response(&error::ApiError::NotFound(format!(
                    "no such path: {} {}; GET / lists where to start, /docs/ the whole API",
                    req.method(),
                    req.path()
                )))
            }));
    }
}
