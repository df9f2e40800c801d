//! What the proxy learns from the JSON-RPC messages passing through, pure: each `tools/call`
//! request is matched with its answer by id, and becomes one usage event.
//!
//! Client → server: `initialize` names the agent (`clientInfo.name`); `tools/call` starts a
//! call; `notifications/cancelled` marks one cancelled. Server → client: a response with the
//! id of a started call ends it: `isError: true` or a JSON-RPC error is `ERROR`, a cancelled
//! call `CANCELLED`, anything else `SUCCESS`. A message may be a JSON-RPC batch (an array).

use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

/// A `tools/call` on its way: what the event needs once its answer comes.
#[derive(Clone, Debug)]
pub struct PendingCall {
    pub tool: String,
    pub started: Instant,
    pub occurred_at: SystemTime,
    pub session: String,
    pub cancelled: bool,
    /// The key of its event, made when the call was seen (and the authorization's nonce).
    pub key: String,
    pub customer: Option<String>,
}

/// A finished call, ready to be reported.
#[derive(Clone, Debug, PartialEq)]
pub struct FinishedCall {
    pub event: Value,
}

/// The calls in flight of one MCP session (a stdio child, or one `Mcp-Session-Id`).
#[derive(Debug, Default)]
pub struct CallTracker {
    /// JSON-RPC id (as its JSON text) → the call.
    pending: HashMap<String, PendingCall>,
    /// The client's `initialize` clientInfo name.
    pub agent: Option<String>,
}

/// The JSON-RPC messages of one line or body: a batch's members, or the message itself.
pub fn messages(value: &Value) -> Vec<&Value> {
    match value {
        Value::Array(batch) => batch.iter().collect(),
        other => vec![other],
    }
}

/// A `tools/call` request's id (as JSON text) and tool name.
pub fn tool_call(message: &Value) -> Option<(String, String)> {
    if message.get("method")?.as_str()? != "tools/call" {
        return None;
    }
    let id = message.get("id")?.to_string();
    let tool = message.get("params")?.get("name")?.as_str()?.to_string();
    Some((id, tool))
}

impl CallTracker {
    /// Notes a client → server message: the agent's name, a call starting, a cancellation.
    pub fn from_client(&mut self, message: &Value, call: Option<PendingCall>) {
        match message.get("method").and_then(Value::as_str) {
            Some("initialize") => {
                if let Some(name) = message
                    .pointer("/params/clientInfo/name")
                    .and_then(Value::as_str)
                {
                    self.agent = Some(name.to_string());
                }
            }
            Some("tools/call") => {
                if let (Some(id), Some(call)) = (message.get("id"), call) {
                    self.pending.insert(id.to_string(), call);
                }
            }
            Some("notifications/cancelled") => {
                if let Some(id) = message.pointer("/params/requestId") {
                    if let Some(call) = self.pending.get_mut(&id.to_string()) {
                        call.cancelled = true;
                    }
                }
            }
            _ => {}
        }
    }

    /// Notes a server → client message: the answer of a started call ends it.
    pub fn from_server(&mut self, message: &Value) -> Option<FinishedCall> {
        if message.get("method").is_some() {
            return None;
        }
        let id = message.get("id")?.to_string();
        let call = self.pending.remove(&id)?;
        let errored = message.get("error").is_some()
            || message
                .pointer("/result/isError")
                .and_then(Value::as_bool)
                .unwrap_or(false);
        let status = if call.cancelled {
            "CANCELLED"
        } else if errored {
            "ERROR"
        } else {
            "SUCCESS"
        };
        let tokens = message.get("result").and_then(token_counts);
        Some(FinishedCall {
            event: event(
                &call,
                status,
                call.started.elapsed(),
                self.agent.as_deref(),
                tokens,
            ),
        })
    }

    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }
}

/// Token counts a server reports in its result: `_meta` or `structuredContent` with
/// `inputTokens` and `outputTokens` (or `usage.{inputTokens,outputTokens}`).
fn token_counts(result: &Value) -> Option<(i64, i64)> {
    for place in [
        "/_meta",
        "/_meta/usage",
        "/structuredContent/usage",
        "/structuredContent",
    ] {
        if let Some(found) = result.pointer(place) {
            let input = found.get("inputTokens").and_then(Value::as_i64);
            let output = found.get("outputTokens").and_then(Value::as_i64);
            if input.is_some() || output.is_some() {
                return Some((input.unwrap_or(0), output.unwrap_or(0)));
            }
        }
    }
    None
}

fn event(
    call: &PendingCall,
    status: &str,
    took: Duration,
    agent: Option<&str>,
    tokens: Option<(i64, i64)>,
) -> Value {
    let mut event = Map::new();
    event.insert("idempotencyKey".into(), json!(call.key));
    event.insert("metricName".into(), json!("mcp_server.tool_invocations"));
    event.insert("toolName".into(), json!(call.tool));
    event.insert("sessionId".into(), json!(call.session));
    event.insert("occurredAt".into(), json!(rfc3339(call.occurred_at)));
    event.insert("executionStatus".into(), json!(status));
    event.insert("executionDurationMs".into(), json!(took.as_millis() as u64));
    if let Some(agent) = agent {
        event.insert("agentId".into(), json!(agent));
    }
    if let Some(customer) = &call.customer {
        event.insert("customerId".into(), json!(customer));
    }
    if let Some((input, output)) = tokens {
        event.insert(
            "metadata".into(),
            json!({"inputTokens": input, "outputTokens": output}),
        );
    }
    Value::Object(event)
}

/// `2026-12-02T10:00:00.123Z` for a time, as the wire spells it.
fn rfc3339(at: SystemTime) -> String {
    let ms = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    schemas::event::format_ms(ms)
}

/// A fresh random UUID (v4), for event keys.
pub fn uuid() -> String {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("the OS has randomness");
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(tool: &str) -> PendingCall {
        PendingCall {
            tool: tool.into(),
            started: Instant::now(),
            occurred_at: SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_181_530_123),
            session: "s".into(),
            cancelled: false,
            key: "k".into(),
            customer: Some("c".into()),
        }
    }

    #[test]
    fn a_call_is_matched_with_its_answer_by_id_and_gets_its_status() {
        let mut t = CallTracker::default();
        t.from_client(
            &json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{"clientInfo":{"name":"claude","version":"1"}}}),
            None,
        );
        for (id, tool) in [(1, "ok"), (2, "flagged"), (3, "broken"), (4, "stopped")] {
            let request =
                json!({"jsonrpc":"2.0","id":id,"method":"tools/call","params":{"name":tool}});
            assert_eq!(
                tool_call(&request),
                Some((id.to_string(), tool.to_string()))
            );
            t.from_client(&request, Some(pending(tool)));
        }
        t.from_client(
            &json!({"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":4}}),
            None,
        );
        // A notification or a request from the server ends nothing.
        assert!(t
            .from_server(&json!({"jsonrpc":"2.0","method":"notifications/progress","params":{}}))
            .is_none());
        let status = |t: &mut CallTracker, answer: Value| {
            let done = t.from_server(&answer).unwrap().event;
            (
                done["toolName"].clone(),
                done["executionStatus"].clone(),
                done["agentId"].clone(),
            )
        };
        assert_eq!(
            status(
                &mut t,
                json!({"jsonrpc":"2.0","id":2,"result":{"content":[],"isError":true}})
            ),
            (json!("flagged"), json!("ERROR"), json!("claude"))
        );
        assert_eq!(
            status(&mut t, json!({"jsonrpc":"2.0","id":1,"result":{"content":[],"_meta":{"inputTokens":7,"outputTokens":9}}})).1,
            json!("SUCCESS")
        );
        assert_eq!(
            status(
                &mut t,
                json!({"jsonrpc":"2.0","id":3,"error":{"code":-32603,"message":"x"}})
            )
            .1,
            json!("ERROR")
        );
        assert_eq!(
            status(
                &mut t,
                json!({"jsonrpc":"2.0","id":4,"result":{"content":[]}})
            )
            .1,
            json!("CANCELLED")
        );
        assert_eq!(t.in_flight(), 0);
        // An id answered twice, or never asked, ends nothing.
        assert!(t
            .from_server(&json!({"jsonrpc":"2.0","id":1,"result":{}}))
            .is_none());
    }

    #[test]
    fn the_event_carries_tokens_customer_and_the_call_time() {
        let mut t = CallTracker::default();
        let request = json!({"jsonrpc":"2.0","id":"a","method":"tools/call","params":{"name":"t"}});
        t.from_client(&request, Some(pending("t")));
        let event = t
            .from_server(&json!({"jsonrpc":"2.0","id":"a","result":{"structuredContent":{"usage":{"inputTokens":3,"outputTokens":4}}}}))
            .unwrap()
            .event;
        assert_eq!(event["metadata"], json!({"inputTokens":3,"outputTokens":4}));
        assert_eq!(event["customerId"], "c");
        assert_eq!(event["occurredAt"], "2026-11-20T13:32:10.123Z");
        assert!(event.get("agentId").is_none());
    }

    #[test]
    fn batches_are_split_into_their_messages() {
        let batch = json!([{"id":1,"method":"a"},{"id":2,"method":"b"}]);
        assert_eq!(messages(&batch).len(), 2);
        assert_eq!(messages(&json!({"id":1})).len(), 1);
        let key = uuid();
        assert_eq!(key.len(), 36);
        assert_eq!(&key[14..15], "4");
    }
}
