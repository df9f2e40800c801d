//! The one mapping from errors to HTTP answers. Every answer says what to fix.

use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use backends::error::{ErrorKind, SinkError, StoreError};
use backends::state::StateError;
use serde::Serialize;
use utoipa::ToSchema;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("the request body is larger than {limit} bytes; {advice}")]
    PayloadTooLarge { limit: usize, advice: &'static str },
    #[error("the request body did not arrive whole within {ms} ms; send it at once (http.body_timeout_ms)")]
    BodyTimeout { ms: u64 },
    #[error("Content-Type `{0}` is not accepted; send application/json")]
    UnsupportedMediaType(String),
    #[error("{holder} over its rate limit of {per_second} requests per second (burst {burst}); retry after {retry_after_seconds} s")]
    RateLimited {
        /// `this API key is`, or `this customer's portal tokens are`.
        holder: &'static str,
        per_second: f64,
        burst: u32,
        retry_after_seconds: u64,
    },
    #[error("this server is handling {in_flight} ingest requests, its limit; retry after 1 s")]
    Busy { in_flight: usize },
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("analytics are unavailable: {0}")]
    Store(#[from] StoreError),
    #[error("the guard state is unavailable: {0}")]
    State(#[from] StateError),
}

/// Seconds a client should wait before retrying an overloaded or unavailable ingest.
const RETRY_AFTER_SECONDS: &str = "1";

/// The error answers of the analytics endpoints, as the OpenAPI document lists them.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
pub enum ReadErrors {
    /// Bad parameters; `message` says which and how to fix them
    #[response(status = 400)]
    BadRequest(ErrorBody),
    /// No API key, or an unknown one
    #[response(status = 401)]
    Unauthorized(ErrorBody),
    /// The key lacks the endpoint's scope, X-Tenant-Id names another tenant, or a portal token names another customer
    #[response(status = 403)]
    Forbidden(ErrorBody),
    /// This API key, or this customer's portal tokens, are over the rate limit
    #[response(
        status = 429,
        headers(("Retry-After" = u32, description = "Seconds until the key may send again"))
    )]
    RateLimited(ErrorBody),
    /// The store is unavailable; retry after `Retry-After` seconds
    #[response(status = 503, headers(("Retry-After" = u32, description = "Seconds to wait")))]
    Unavailable(ErrorBody),
}

/// What the routes with a small body (authorize and release, credit grants, portal tokens) may
/// answer besides [`ReadErrors`], as the OpenAPI document lists them.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
pub enum SmallBodyErrors {
    /// The body did not arrive whole within `http.body_timeout_ms`
    #[response(status = 408)]
    RequestTimeout(ErrorBody),
    /// The body is larger than `http.max_small_body_bytes`
    #[response(status = 413)]
    PayloadTooLarge(ErrorBody),
}

/// The error answers of the two ingest endpoints, as the OpenAPI document lists them.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
pub enum IngestErrors {
    /// The body is not JSON of the right shape, has no events or too many; `message` says what to fix
    #[response(status = 400)]
    BadRequest(ErrorBody),
    /// No API key, or an unknown one
    #[response(status = 401)]
    Unauthorized(ErrorBody),
    /// The key lacks the `ingest` scope, or X-Tenant-Id names another tenant
    #[response(status = 403)]
    Forbidden(ErrorBody),
    /// The body did not arrive whole within `http.body_timeout_ms`; nothing was stored
    #[response(status = 408)]
    RequestTimeout(ErrorBody),
    /// The body is larger than `ingest.max_body_bytes`
    #[response(status = 413)]
    PayloadTooLarge(ErrorBody),
    /// Content-Type is not JSON
    #[response(status = 415)]
    UnsupportedMediaType(ErrorBody),
    /// This API key is over its rate limit, or too many batches wait for the store; nothing was stored, retry
    #[response(status = 429, headers(("Retry-After" = u32, description = "Seconds to wait")))]
    Overloaded(ErrorBody),
    /// Too many ingest requests in flight, or the store or the bus did not confirm durability; nothing is claimed, retry
    #[response(status = 503, headers(("Retry-After" = u32, description = "Seconds to wait")))]
    Unavailable(ErrorBody),
}

/// Every error answer's body.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    /// A stable code, one per meaning: `bad_request` (400), `unauthorized` (401), `forbidden`
    /// (403), `not_found` (404), `method_not_allowed` (405), `conflict` (409), `request_timeout` (408: the body came too slowly), `payload_too_large` (413),
    /// `unsupported_media_type` (415), `rate_limited` (429: this key is over its rate limit),
    /// `overloaded` (429: the write queue is full; slow down), `busy` (503: too many requests
    /// in flight here), `unavailable` (503: the store, the bus or the guard state is down or
    /// not ready), `internal` (500: a fault no retry fixes; see the server's log).
    #[schema(example = "bad_request")]
    pub error: &'static str,
    /// What went wrong and what to fix.
    #[schema(
        example = "from `yesterday` is not a date like 2026-11-21 (or an RFC 3339 timestamp)"
    )]
    pub message: String,
}

impl ApiError {
    /// The one mapping from errors to HTTP: each answer's status and its stable `error` code.
    /// Port errors are mapped by their kind, never by the driver behind them.
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ApiError::PayloadTooLarge { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
            }
            ApiError::BodyTimeout { .. } => (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
            ApiError::UnsupportedMediaType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            ApiError::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            ApiError::Busy { .. } => (StatusCode::SERVICE_UNAVAILABLE, "busy"),
            ApiError::Sink(e) => by_kind(e.kind()),
            ApiError::Store(e) => by_kind(e.kind()),
            ApiError::State(e) => by_kind(e.kind()),
        }
    }
}

/// A port error's answer: overloaded is the client's cue to slow down (429); retriable and not
/// ready are this server's dependencies (503, retry after a pause); permanent is a fault no
/// retry fixes (500).
fn by_kind(kind: ErrorKind) -> (StatusCode, &'static str) {
    match kind {
        ErrorKind::Overloaded => (StatusCode::TOO_MANY_REQUESTS, "overloaded"),
        ErrorKind::Retriable | ErrorKind::NotReady => {
            (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
        }
        ErrorKind::Permanent => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status_and_code().0
    }

    fn error_response(&self) -> HttpResponse {
        let (status, code) = self.status_and_code();
        if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        }
        let mut answer = HttpResponse::build(status);
        // Every 429 and 503 says when to come back: a rate-limited key when its bucket has a
        // token again, anything else after a pause.
        match self {
            ApiError::RateLimited {
                retry_after_seconds,
                ..
            } => {
                answer.insert_header((header::RETRY_AFTER, retry_after_seconds.to_string()));
            }
            _ if status == StatusCode::TOO_MANY_REQUESTS
                || status == StatusCode::SERVICE_UNAVAILABLE =>
            {
                answer.insert_header((header::RETRY_AFTER, RETRY_AFTER_SECONDS));
            }
            _ => {}
        }
        answer.json(ErrorBody {
            error: code,
            message: self.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One code per meaning: a client can tell "slow down" (429) from "this server's dependency
    /// is down" (503) and from a fault (500) by `error` alone.
    #[test]
    fn each_code_has_one_status_and_port_errors_map_by_kind() {
        let store = |kind| {
            ApiError::Store(StoreError::Failed {
                store: "clickhouse",
                context: "query",
                kind,
                detail: "x".into(),
            })
        };
        let cases = [
            (
                ApiError::Sink(SinkError::Overloaded { waiting: 3 }),
                429,
                "overloaded",
            ),
            (
                ApiError::Sink(SinkError::Unavailable("down".into())),
                503,
                "unavailable",
            ),
            (ApiError::Busy { in_flight: 256 }, 503, "busy"),
            (ApiError::BodyTimeout { ms: 10 }, 408, "request_timeout"),
            (
                ApiError::RateLimited {
                    holder: "this API key is",
                    per_second: 1.0,
                    burst: 1,
                    retry_after_seconds: 1,
                },
                429,
                "rate_limited",
            ),
            (store(ErrorKind::Retriable), 503, "unavailable"),
            (store(ErrorKind::NotReady), 503, "unavailable"),
            (store(ErrorKind::Permanent), 500, "internal"),
            (store(ErrorKind::Overloaded), 429, "overloaded"),
        ];
        let mut status_of_code = std::collections::HashMap::new();
        for (error, status, code) in cases {
            let (s, c) = error.status_and_code();
            assert_eq!((s.as_u16(), c), (status, code), "{error}");
            assert_eq!(*status_of_code.entry(c).or_insert(status), status, "{c}");
            let answer = error.error_response();
            assert_eq!(
                answer.headers().contains_key(header::RETRY_AFTER),
                matches!(status, 429 | 503),
                "{error}: Retry-After on 429 and 503 only"
            );
        }
    }
}
