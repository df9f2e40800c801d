//! Request bodies read as JSON: what is wrong with one is said in terms of the body (truncated,
//! not JSON, the wrong shape at a named field), so a client knows what to fix.

use crate::error::ApiError;
use actix_web::web::{Bytes, BytesMut};
use actix_web::HttpMessage;
use futures_util::StreamExt;
use std::time::Duration;

/// The request's body, read whole within `timeout` and at most `limit` bytes (`advice` says
/// what to send instead). A `Content-Length` over the limit is refused before a byte is read;
/// the buffer grows with what arrives, never with what is announced.
pub(crate) async fn read_whole(
    req: &mut actix_web::dev::ServiceRequest,
    limit: usize,
    advice: &'static str,
    timeout: Duration,
) -> Result<Bytes, ApiError> {
    let too_large = ApiError::PayloadTooLarge { limit, advice };
    let announced = req
        .headers()
        .get(actix_web::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > limit as u64) {
        return Err(too_large);
    }
    let deadline = tokio::time::Instant::now() + timeout;
    let mut payload = req.take_payload();
    let mut body = BytesMut::new();
    loop {
        match tokio::time::timeout_at(deadline, payload.next()).await {
            Err(_) => {
                return Err(ApiError::BodyTimeout {
                    ms: timeout.as_millis() as u64,
                })
            }
            Ok(None) => return Ok(body.freeze()),
            Ok(Some(Err(e))) => {
                return Err(ApiError::BadRequest(format!(
                    "the request body could not be read: {e}"
                )))
            }
            Ok(Some(Ok(chunk))) => {
                if body.len() + chunk.len() > limit {
                    return Err(too_large);
                }
                body.extend_from_slice(&chunk);
            }
        }
    }
}

/// The body as `T`; a field of the wrong type is named in the message (`amountMicros: invalid
/// type: string "5", expected i64`).
pub(crate) fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let mut json = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut json).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." || inner.classify() != serde_json::error::Category::Data {
            body_error(&inner)
        } else {
            ApiError::BadRequest(format!("the body has the wrong shape: {path}: {inner}"))
        }
    })
}

/// A JSON error as the answer to the client: where the body went wrong and how.
pub(crate) fn body_error(e: &serde_json::Error) -> ApiError {
    let what = match e.classify() {
        serde_json::error::Category::Eof => "the JSON body ends early (truncated?)",
        serde_json::error::Category::Syntax => "the body is not valid JSON",
        serde_json::error::Category::Data => "the body has the wrong shape",
        serde_json::error::Category::Io => "the body could not be read",
    };
    ApiError::BadRequest(format!("{what}: {e}"))
}
