//! Request bodies read as JSON: what is wrong with one is said in terms of the body (truncated,
//! not JSON, the wrong shape at a named field), so a client knows what to fix.

use crate::error::ApiError;
use actix_web::body::{BodySize, BoxBody, MessageBody};
use actix_web::dev::Payload;
use actix_web::web::{Bytes, BytesMut};
use actix_web::HttpMessage;
use futures_util::StreamExt;
use std::cell::RefCell;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

/// The request's body, kept by [`hold_unread_body`] until the answer is written, unless a
/// route's door reads it whole first.
#[derive(Clone)]
pub(crate) struct HeldBody(Rc<RefCell<Option<Payload>>>);

/// Takes every request's body out of reach of the routes and keeps it alive inside the answer's
/// body until the answer is written. A body nobody read is then still unread when the answer
/// goes out, so the connection closes after it (actix lingers `client_disconnect_timeout`,
/// then shuts it); dropped instead, a chunked body would be drained for as long as the client
/// sends, by any caller, a keyless one included, on any route.
pub async fn hold_unread_body(
    mut req: actix_web::dev::ServiceRequest,
    next: actix_web::middleware::Next<impl MessageBody + 'static>,
) -> Result<actix_web::dev::ServiceResponse<impl MessageBody>, actix_web::Error> {
    let payload = req.take_payload();
    if matches!(payload, Payload::None) {
        return Ok(next.call(req).await?.map_into_left_body());
    }
    let held = HeldBody(Rc::new(RefCell::new(Some(payload))));
    req.extensions_mut().insert(held.clone());
    let answer = next.call(req).await?;
    let unread = held.0.borrow_mut().take();
    Ok(answer
        .map_body(|_, body| WithBody {
            body: body.boxed(),
            _unread: unread,
        })
        .map_into_right_body())
}

/// An answer's body, and the request body it keeps alive until it is written.
struct WithBody {
    body: BoxBody,
    _unread: Option<Payload>,
}

impl MessageBody for WithBody {
    type Error = Box<dyn std::error::Error>;

    fn size(&self) -> BodySize {
        self.body.size()
    }

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        Pin::new(&mut self.body).poll_next(cx)
    }
}

/// The body a route's door read whole, handed to its handler as it is (never read twice).
pub struct Whole(pub Bytes);

impl std::ops::Deref for Whole {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl actix_web::FromRequest for Whole {
    type Error = ApiError;
    type Future = std::future::Ready<Result<Whole, ApiError>>;

    fn from_request(req: &actix_web::HttpRequest, _: &mut Payload) -> Self::Future {
        std::future::ready(req.extensions_mut().remove::<Whole>().ok_or_else(|| {
            ApiError::BadRequest(
                "this route reads no body here; POST it where the API lists it".into(),
            )
        }))
    }
}

/// The request's body, read whole within `timeout` and at most `limit` bytes (`advice` says
/// what to send instead). A `Content-Length` over the limit is refused before a byte is read;
/// the buffer grows with what arrives, never with what is announced. Refused, the rest stays
/// held (see [`hold_unread_body`]) and the connection closes after the answer.
pub(crate) async fn read_whole(
    req: &actix_web::dev::ServiceRequest,
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
    let Some(held) = req.extensions().get::<HeldBody>().cloned() else {
        return Ok(Bytes::new()); // no body at all
    };
    let Some(mut payload) = held.0.borrow_mut().take() else {
        return Ok(Bytes::new());
    };
    let deadline = tokio::time::Instant::now() + timeout;
    // A body that comes in one chunk (most do) is handed on as it came, uncopied.
    let mut first: Option<Bytes> = None;
    let mut body = BytesMut::new();
    let refused = loop {
        match tokio::time::timeout_at(deadline, payload.next()).await {
            Err(_) => {
                break ApiError::BodyTimeout {
                    ms: timeout.as_millis() as u64,
                }
            }
            Ok(None) if body.is_empty() => return Ok(first.unwrap_or_default()),
            Ok(None) => return Ok(body.freeze()),
            Ok(Some(Err(e))) => {
                break ApiError::BadRequest(format!("the request body could not be read: {e}"))
            }
            Ok(Some(Ok(chunk))) => {
                let held = first.as_ref().map_or(0, Bytes::len) + body.len();
                if held + chunk.len() > limit {
                    break too_large;
                }
                match first.take() {
                    None if body.is_empty() => first = Some(chunk),
                    earlier => {
                        if let Some(earlier) = earlier {
                            body.extend_from_slice(&earlier);
                        }
                        body.extend_from_slice(&chunk);
                    }
                }
            }
        }
    };
    *held.0.borrow_mut() = Some(payload);
    Err(refused)
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
