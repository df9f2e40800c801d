//! The one mapping from errors to HTTP answers. Every answer says what to fix.

use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use backends::error::{SinkError, StoreError};
use serde::Serialize;
use utoipa::ToSchema;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("the request body is larger than {limit} bytes; send fewer events per request")]
    PayloadTooLarge { limit: usize },
    #[error("Content-Type `{0}` is not accepted; send application/json")]
    UnsupportedMediaType(String),
    #[error("this API key is over its rate limit of {per_second} requests per second (burst {burst}); retry after {retry_after_seconds} s")]
    RateLimited {
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
    /// The key lacks the `read` scope, or X-Tenant-Id names another tenant
    #[response(status = 403)]
    Forbidden(ErrorBody),
    /// This API key is over its rate limit
    #[response(
        status = 429,
        headers(("Retry-After" = u32, description = "Seconds until the key may send again"))
    )]
    RateLimited(ErrorBody),
    /// The store is unavailable; retry after `Retry-After` seconds
    #[response(status = 503, headers(("Retry-After" = u32, description = "Seconds to wait")))]
    Unavailable(ErrorBody),
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
    /// A stable code: bad_request, unauthorized, forbidden, not_found, payload_too_large,
    /// unsupported_media_type, rate_limited, overloaded, unavailable.
    #[schema(example = "bad_request")]
    pub error: &'static str,
    /// What went wrong and what to fix.
    #[schema(
        example = "from `yesterday` is not a date like 2026-11-21 (or an RFC 3339 timestamp)"
    )]
    pub message: String,
}

impl ApiError {
    fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::PayloadTooLarge { .. } => "payload_too_large",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::RateLimited { .. } => "rate_limited",
            ApiError::Busy { .. } => "overloaded",
            ApiError::Sink(SinkError::Overloaded { .. }) => "overloaded",
            ApiError::Sink(SinkError::Unavailable(_)) | ApiError::Store(_) => "unavailable",
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Sink(SinkError::Overloaded { .. }) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Sink(SinkError::Unavailable(_))
            | ApiError::Store(_)
            | ApiError::Busy { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let status = self.status_code();
        if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        }
        let mut answer = HttpResponse::build(status);
        match self {
            ApiError::Sink(_) | ApiError::Store(_) | ApiError::Busy { .. } => {
                answer.insert_header((header::RETRY_AFTER, RETRY_AFTER_SECONDS));
            }
            ApiError::RateLimited {
                retry_after_seconds,
                ..
            } => {
                answer.insert_header((header::RETRY_AFTER, retry_after_seconds.to_string()));
            }
            _ => {}
        }
        answer.json(ErrorBody {
            error: self.code(),
            message: self.to_string(),
        })
    }
}
