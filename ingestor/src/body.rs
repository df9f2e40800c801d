//! Request bodies read as JSON: what is wrong with one is said in terms of the body (truncated,
//! not JSON, the wrong shape at a named field), so a client knows what to fix.

use crate::error::ApiError;

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
