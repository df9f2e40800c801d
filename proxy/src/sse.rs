//! Reads the JSON-RPC messages out of an answer as it streams past, without holding it up: an
//! SSE stream's `data:` events, or a JSON body once it is whole.
//!
//! Each byte is looked at a bounded number of times, however the answer is cut into chunks,
//! and at most `max` bytes of one event (or one JSON body) are held: a larger one is passed on
//! to the client unread, and the calls it answered end as unanswered. `take_skipped` says how many.

use serde_json::Value;

enum Kind {
    /// `text/event-stream`: events end at a blank line.
    Sse,
    /// `application/json`: one message or a batch, parsed once whole: when `length` bytes
    /// (its Content-Length) have come, else at the body's end.
    Json { length: Option<usize> },
    /// Anything else: nothing to read.
    Other,
}

pub struct BodyReader {
    kind: Kind,
    /// The bytes of the event (or body) not yet complete.
    buf: Vec<u8>,
    /// How far `buf` was searched for an event's end already.
    scanned: usize,
    max: usize,
    /// Set while an event over `max` goes past: its bytes are dropped until it ends.
    skipping: bool,
    /// Events (or bodies) too large to read, not yet taken ([`take_skipped`](Self::take_skipped)).
    skipped: u64,
}

/// The longest blank line that ends an event (`\r\n\r\n`), less one: a search resumes this far
/// back, in case the previous chunk ended inside one.
const OVERLAP: usize = 3;

impl BodyReader {
    pub fn new(content_type: &str, length: Option<usize>, max: usize) -> BodyReader {
        let mime = content_type.split(';').next().unwrap_or("").trim();
        let kind = match mime {
            "text/event-stream" => Kind::Sse,
            "application/json" => Kind::Json { length },
            _ => Kind::Other,
        };
        BodyReader {
            kind,
            buf: Vec::new(),
            scanned: 0,
            max,
            skipping: false,
            skipped: 0,
        }
    }

    /// The events (or bodies) skipped as too large since the last call.
    pub fn take_skipped(&mut self) -> u64 {
        std::mem::take(&mut self.skipped)
    }

    pub fn is_sse(&self) -> bool {
        matches!(self.kind, Kind::Sse)
    }

    /// Takes the next chunk; answers the messages it completed.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<Value> {
        match self.kind {
            Kind::Other => Vec::new(),
            Kind::Json { length } => {
                if self.skipping {
                    return Vec::new();
                }
                if self.buf.len() + chunk.len() > self.max {
                    self.skip();
                    return Vec::new();
                }
                self.buf.extend_from_slice(chunk);
                match length {
                    Some(length) if self.buf.len() >= length => self.finish(),
                    _ => Vec::new(),
                }
            }
            Kind::Sse => self.feed_events(chunk),
        }
    }

    /// The body ended: a JSON body read whole.
    pub fn finish(&mut self) -> Vec<Value> {
        if !matches!(self.kind, Kind::Json { .. }) || self.buf.is_empty() {
            return Vec::new();
        }
        let whole = std::mem::take(&mut self.buf);
        serde_json::from_slice::<Value>(&whole)
            .into_iter()
            .collect()
    }

    fn skip(&mut self) {
        self.buf = Vec::new();
        self.scanned = 0;
        self.skipping = true;
        self.skipped += 1;
    }

    fn feed_events(&mut self, chunk: &[u8]) -> Vec<Value> {
        self.buf.extend_from_slice(chunk);
        let mut found = Vec::new();
        let mut start = 0;
        let mut from = self.scanned.saturating_sub(OVERLAP);
        while let Some((end, blank)) = event_end(&self.buf[from..]) {
            let (end, next) = (from + end, from + end + blank);
            if self.skipping {
                // The rest of an event too large to read ends here.
                self.skipping = false;
            } else if let Some(value) = event_data(&self.buf[start..end]) {
                found.push(value);
            }
            start = next;
            from = next;
        }
        self.buf.drain(..start);
        if self.skipping {
            // Only the tail that may begin the blank line is kept.
            let keep = self.buf.len().saturating_sub(OVERLAP);
            self.buf.drain(..keep);
        } else if self.buf.len() > self.max {
            self.skip();
            let keep = chunk.len().min(OVERLAP);
            self.buf.extend_from_slice(&chunk[chunk.len() - keep..]);
        }
        self.scanned = self.buf.len();
        found
    }
}

/// The JSON-RPC message of one event: its `data:` lines joined.
fn event_data(event: &[u8]) -> Option<Value> {
    let text = String::from_utf8_lossy(event);
    let data: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| d.strip_prefix(' ').unwrap_or(d))
        .collect();
    serde_json::from_str::<Value>(&data.join("\n")).ok()
}

/// Where the first complete event ends, and the length of the blank line after it.
fn event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let mut i = 0;
    while let Some(at) = buf[i..].iter().position(|&b| b == b'\n') {
        let at = i + at;
        if buf.get(at + 1) == Some(&b'\n') {
            return Some((at, 2));
        }
        if at >= 1 && buf[at - 1] == b'\r' && buf.get(at + 1..at + 3) == Some(b"\r\n") {
            return Some((at - 1, 4));
        }
        i = at + 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sse(max: usize) -> BodyReader {
        BodyReader::new("text/event-stream", None, max)
    }

    #[test]
    fn sse_events_are_read_across_chunk_boundaries() {
        let stream = "event: message\nid: 1\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\"}\n\nevent: message\ndata: {\"jsonrpc\":\"2.0\",\"id\":3,\"result\":{}}\r\n\r\n";
        // Every cut, and one byte at a time.
        for cut in 0..stream.len() {
            let mut r = sse(1 << 20);
            let (a, b) = stream.as_bytes().split_at(cut);
            let mut got = r.feed(a);
            got.extend(r.feed(b));
            assert_eq!(got.len(), 2, "cut at {cut}");
            assert_eq!(got[1], json!({"jsonrpc":"2.0","id":3,"result":{}}));
        }
        let mut r = sse(1 << 20);
        let got: Vec<Value> = stream.bytes().flat_map(|b| r.feed(&[b])).collect();
        assert_eq!(got.len(), 2);
    }

    #[test]
    fn an_event_over_the_limit_is_skipped_and_the_next_one_read() {
        let big = format!(
            "data: {{\"id\":1,\"result\":{{\"x\":\"{}\"}}}}\n\n",
            "a".repeat(5000)
        );
        let small = "data: {\"id\":2,\"result\":{}}\n\n";
        let mut r = sse(1000);
        let mut got = Vec::new();
        for piece in format!("{big}{small}").as_bytes().chunks(700) {
            got.extend(r.feed(piece));
        }
        assert_eq!(got, vec![json!({"id":2,"result":{}})]);
        assert_eq!(r.skipped, 1);
        assert!(r.buf.len() <= 1000);
    }

    #[test]
    fn a_json_body_is_read_once_whole() {
        let mut r = BodyReader::new("application/json; charset=utf-8", None, 1 << 20);
        assert!(r.feed(b"{\"id\":1,").is_empty());
        assert!(r.feed(b"\"result\":{}}").is_empty());
        assert_eq!(r.finish(), vec![json!({"id":1,"result":{}})]);
        // With its length, as soon as the last byte comes.
        let mut r = BodyReader::new("application/json", Some(20), 1 << 20);
        assert!(r.feed(b"{\"id\":1,").is_empty());
        assert_eq!(r.feed(b"\"result\":{}}"), vec![json!({"id":1,"result":{}})]);
        // Over the limit: not held, not read.
        let mut r = BodyReader::new("application/json", None, 10);
        assert!(r.feed(b"{\"id\":1,").is_empty());
        assert!(r.feed(b"\"result\":{}}").is_empty());
        assert!(r.finish().is_empty());
        assert_eq!(r.skipped, 1);
    }
}
