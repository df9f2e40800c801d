//! Reads the JSON-RPC messages out of an answer as it streams past, without holding it up: an
//! SSE stream's `data:` events, or a JSON body once it is whole.

use serde_json::Value;

pub enum BodyReader {
    /// `text/event-stream`: events end at a blank line.
    Sse(Vec<u8>),
    /// `application/json`: one message or a batch, parsed once the bytes form a whole value.
    Json(Vec<u8>),
    /// Anything else: nothing to read.
    Other,
}

impl BodyReader {
    pub fn for_content_type(content_type: &str) -> BodyReader {
        let mime = content_type.split(';').next().unwrap_or("").trim();
        match mime {
            "text/event-stream" => BodyReader::Sse(Vec::new()),
            "application/json" => BodyReader::Json(Vec::new()),
            _ => BodyReader::Other,
        }
    }

    /// Takes the next chunk; answers the messages it completed.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<Value> {
        match self {
            BodyReader::Other => Vec::new(),
            BodyReader::Json(buf) => {
                buf.extend_from_slice(chunk);
                match serde_json::from_slice::<Value>(buf) {
                    Ok(value) => {
                        buf.clear();
                        vec![value]
                    }
                    Err(_) => Vec::new(),
                }
            }
            BodyReader::Sse(buf) => {
                buf.extend_from_slice(chunk);
                let mut found = Vec::new();
                while let Some((end, skip)) = event_end(buf) {
                    let event: Vec<u8> = buf.drain(..end + skip).collect();
                    let text = String::from_utf8_lossy(&event[..end]);
                    let data: Vec<&str> = text
                        .lines()
                        .filter_map(|l| l.strip_prefix("data:"))
                        .map(|d| d.strip_prefix(' ').unwrap_or(d))
                        .collect();
                    if let Ok(value) = serde_json::from_str::<Value>(&data.join("\n")) {
                        found.push(value);
                    }
                }
                found
            }
        }
    }
}

/// Where the first complete event ends, and the length of the blank line after it.
fn event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2));
    let crlf = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sse_events_are_read_across_chunk_boundaries() {
        let mut r = BodyReader::for_content_type("text/event-stream");
        let stream = "event: message\nid: 1\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\"}\n\nevent: message\ndata: {\"jsonrpc\":\"2.0\",\"id\":3,\"result\":{}}\n\n";
        let (a, b) = stream.as_bytes().split_at(70);
        let mut got = r.feed(a);
        got.extend(r.feed(b));
        assert_eq!(got.len(), 2);
        assert_eq!(got[1], json!({"jsonrpc":"2.0","id":3,"result":{}}));
    }

    #[test]
    fn a_json_body_is_read_once_whole() {
        let mut r = BodyReader::for_content_type("application/json; charset=utf-8");
        assert!(r.feed(b"{\"id\":1,").is_empty());
        assert_eq!(r.feed(b"\"result\":{}}"), vec![json!({"id":1,"result":{}})]);
    }
}
