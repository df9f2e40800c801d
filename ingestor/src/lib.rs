//! mcp-meter's HTTP API (actix-web): ingest, the guard check, analytics, health.
//!
//! - [`auth`]: API keys (stored hashed) to tenant and scopes.
//! - [`ingest`]: `POST /v1/ingest/batch`, `POST /v1/ingest/events`.
//! - [`guard`]: `GET /v1/guard/check` from the guard state only.
//! - [`ops`]: `/healthz`, `/readyz`, `/metrics`, and the request-recording middleware.
//! - [`limits`]: hard limits, charged at ingest; breaches kill sessions.
//! - [`analytics`]: `GET /analytics/mcp/...`.
//! - [`exports`]: `GET /v1/exports/billing`, streamed CSV or JSON.
//! - [`openapi`]: the OpenAPI document (`/openapi.json`) and Swagger UI (`/docs`).
//! - [`error`]: the one mapping from errors to HTTP status codes.
//!
//! The API talks to the pipeline only through `backends`' ports; which adapters stand behind
//! them is the binary's choice.

pub mod analytics;
pub mod auth;
pub mod error;
pub mod exports;
pub mod guard;
pub mod ingest;
pub mod limits;
pub mod openapi;
pub mod ops;

use actix_web::web;
use backends::sink::EventSink;
use backends::state::GuardState;
use backends::store::AnalyticsStore;
use schemas::config::IngestConfig;
use std::sync::Arc;

/// What every handler shares.
pub struct AppState {
    pub keys: auth::Keyring,
    pub sink: Arc<dyn EventSink>,
    pub analytics: Arc<dyn AnalyticsStore>,
    /// Hard-limit counters and the kill list.
    pub guard: Arc<dyn GuardState>,
    /// How often the margin guard recomputes levels: what a throttled caller is told to wait.
    pub guard_recompute_seconds: u64,
    pub ingest: IngestConfig,
}

impl AppState {
    /// The caller's grant for `scope`, once its key's rate limit admits the request. Without
    /// the guard state the limit is not enforced (fail open), as with hard limits.
    pub async fn admit(
        &self,
        req: &actix_web::HttpRequest,
        scope: schemas::config::Scope,
    ) -> Result<auth::Grant, error::ApiError> {
        let grant = self.keys.authorize(req, scope)?;
        let Some(limit) = grant.rate_limit else {
            return Ok(grant);
        };
        let bucket = format!("rate:{}:{}", grant.tenant.id, grant.key_name);
        let now_ms = chrono::Utc::now().timestamp_millis();
        match self
            .guard
            .take_token(&bucket, limit.requests_per_second, limit.burst, now_ms)
            .await
        {
            Ok(None) => Ok(grant),
            Ok(Some(wait_ms)) => Err(error::ApiError::RateLimited {
                per_second: limit.requests_per_second,
                burst: limit.burst,
                retry_after_seconds: wait_ms.div_ceil(1000),
            }),
            Err(e) => {
                guard::warn_state_unavailable(&e);
                Ok(grant)
            }
        }
    }
}

/// Mounts the API on an actix app: `App::new().configure(ingestor::routes(state))`.
pub fn routes(state: web::Data<AppState>) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg| {
        let body_limit = state.ingest.max_body_bytes;
        cfg.app_data(state)
            .app_data(web::PayloadConfig::new(body_limit))
            .app_data(web::QueryConfig::default().error_handler(|e, _| {
                error::ApiError::BadRequest(format!("bad query parameters: {e}")).into()
            }))
            .app_data(
                web::PathConfig::default().error_handler(|e, _| {
                    error::ApiError::BadRequest(format!("bad path: {e}")).into()
                }),
            )
            .route("/v1/ingest/batch", web::post().to(ingest::batch))
            .route("/v1/ingest/events", web::post().to(ingest::events))
            .route("/v1/guard/check", web::get().to(guard::check))
            .route("/v1/exports/billing", web::get().to(exports::billing))
            .route("/healthz", web::get().to(ops::healthz))
            .route("/readyz", web::get().to(ops::readyz))
            .route("/metrics", web::get().to(ops::metrics))
            .route(
                "/openapi.json",
                web::get().to(|| async {
                    actix_web::HttpResponse::Ok()
                        .content_type("application/json")
                        .body(openapi::document())
                }),
            )
            .route(
                "/docs",
                web::get().to(|| async {
                    actix_web::HttpResponse::PermanentRedirect()
                        .insert_header((actix_web::http::header::LOCATION, "/docs/"))
                        .finish()
                }),
            )
            .service(
                utoipa_swagger_ui::SwaggerUi::new("/docs/{_:.*}")
                    .config(utoipa_swagger_ui::Config::new(["/openapi.json"])),
            )
            .route(
                "/analytics/mcp/revenue/by-tool",
                web::get().to(analytics::by_tool),
            )
            .route(
                "/analytics/mcp/by-agent",
                web::get().to(analytics::by_agent),
            )
            .route("/analytics/mcp/summary", web::get().to(analytics::summary))
            .route(
                "/analytics/mcp/sessions",
                web::get().to(analytics::sessions),
            )
            .route(
                "/analytics/mcp/sessions/{session_id}",
                web::get().to(analytics::session),
            );
    }
}
