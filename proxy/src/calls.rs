//! The billing rule, pure: what the proxy learns from the JSON-RPC messages passing through.
//! Each `tools/call` request is matched with its answer by id within one exchange (an HTTP
//! request and its answer, or a stdio child), and ends as the README's billing rule says:
//!
//! - a result (`resultType` absent or `complete`) → `SUCCESS`; `isError: true` → `ERROR`;
//! - a JSON-RPC error the protocol answers before a tool runs (parse error, invalid request,
//!   method not found, invalid params: an unknown tool or bad arguments) → no event, and the
//!   reservation of a paid call is released; any other JSON-RPC error → `ERROR`;
//! - an `input_required` result → no event yet: the call waits for the client's next round,
//!   which continues it (same key, same start, one authorization);
//! - cancelled by the client, or the client gone before the answer → `CANCELLED`; no answer
//!   within the call timeout → `TIMEOUT`; the server gone before the answer → `ERROR`.
//!
//! Every reported call is billed at its tool's rate; its event's key is the authorization's
//! nonce, so storing the event settles the reservation. A message may be a JSON-RPC batch.

use serde_json::{json, Map, Value};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Where clientInfo travels in each request from MCP 2026-07-28 on (`params._meta`).
pub const CLIENT_INFO_META: &str = "io.modelcontextprotocol/clientInfo";

/// JSON-RPC errors that mean no tool ran: parse error, invalid request, method not found,
/// invalid params (MCP's answer to an unknown tool or arguments that fail the schema).
const NOT_RUN_CODES: [i64; 4] = [-32700, -32600, -32601, -32602];

/// A `tools/call` on its way: what its event needs once it ends.
#[derive(Clone, Debug)]
pub struct PendingCall {
    pub tool: String,
    /// When the call began (its duration counts from here, across its input rounds).
    pub started: Instant,
    /// When its current round was forwarded: the call timeout counts from here, not from the
    /// call's start, so the client's time to answer an input request is not the server's.
    pub round: Instant,
    pub occurred_at: SystemTime,
    pub session: String,
    pub agent: Option<String>,
    pub customer: Option<String>,
    /// The key of its event, made when the call was seen: the authorization's nonce.
    pub key: String,
    /// Whether a reservation was made for it (a paid tool), to release if it never runs.
    pub authorized: bool,
    /// Set by the client's `notifications/cancelled`, which may come in another exchange.
    pub cancelled: Arc<AtomicBool>,
}

impl PendingCall {
    fn was_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }

    /// `CANCELLED` for a call the client cancelled, else `status`.
    fn status_or<'a>(&self, status: &'a str) -> &'a str {
        if self.was_cancelled() {
            "CANCELLED"
        } else {
            status
        }
    }
}

/// How a call ended, by the billing rule.
#[derive(Debug)]
pub enum Ended {
    /// Report this event (billed; storing it settles a reservation).
    Report(Value),
    /// The tool never ran: nothing is billed; release the reservation if there is one.
    NotRun(PendingCall),
    /// An `input_required` round: the call goes on when the client answers, under this token.
    Waiting(String, PendingCall),
}

/// The calls in flight of one exchange (an HTTP request's answer) or one stdio child.
#[derive(Debug, Default)]
pub struct CallTracker {
    /// JSON-RPC id (normalized, [`id_key`]) → the call.
    pending: HashMap<String, PendingCall>,
    /// Ids of `tools/list` requests in flight: their answers name the server's tools.
    lists: HashSet<String>,
    /// Ids of the client's other requests in flight: an answer to one of them must not be
    /// taken for a call's (a `-32601` to `nosuch/method` would release a call that ran).
    others: HashSet<String>,
}

/// Requests one exchange (or stdio child) keeps in flight at most; past it, new ones are
/// refused until answers come.
pub const MAX_IN_FLIGHT: usize = 10_000;

/// The JSON-RPC messages of one line or body: a batch's members, or the message itself.
pub fn messages(value: &Value) -> Vec<&Value> {
    match value {
        Value::Array(batch) => batch.iter().collect(),
        other => vec![other],
    }
}

/// A JSON-RPC id as a map key: numbers by value (`1.0` and `1` are one id, as a JavaScript
/// peer sees them), strings as themselves.
pub fn id_key(id: &Value) -> String {
    match id {
        Value::Number(n) => match n.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() <= crate::wire::MAX_SAFE_INTEGER => {
                format!("{}", f as i64)
            }
            _ => n.to_string(),
        },
        other => other.to_string(),
    }
}

/// The client's name in a message: `initialize`'s clientInfo (handshake generations) or the
/// request's `_meta` clientInfo (2026-07-28, where every request carries it).
pub fn client_name(message: &Value) -> Option<&str> {
    let params = message.get("params")?;
    params
        .get("_meta")
        .and_then(|m| m.get(CLIENT_INFO_META))
        .or_else(|| {
            (message.get("method")?.as_str()? == "initialize")
                .then(|| params.get("clientInfo"))
                .flatten()
        })?
        .get("name")?
        .as_str()
}

/// The token a round of a call that asked for input is continued with: its `requestState`.
fn continuation(result: &Value) -> Option<String> {
    Some(result.get("requestState")?.as_str()?.to_string())
}

/// The token a `tools/call` continues a call with, if it is a later round of one.
pub fn continues(request: &Value) -> Option<&str> {
    request.pointer("/params/requestState")?.as_str()
}

/// Whether a message is a JSON-RPC response (it has no method).
fn is_answer(message: &Value) -> bool {
    message.get("method").is_none() && message.get("id").is_some()
}

impl CallTracker {
    /// Why a new request with `id` cannot be taken, if it cannot: its id is in flight already
    /// (two answers with one id could not be told apart), or too many requests are.
    pub fn busy(&self, id: &Value) -> Option<&'static str> {
        let key = id_key(id);
        if self.pending.contains_key(&key) || self.others.contains(&key) {
            Some("is already in use by a request in flight; give each request its own id")
        } else if self.pending.len() + self.others.len() >= MAX_IN_FLIGHT {
            Some("cannot be taken: too many requests are in flight; wait for their answers")
        } else {
            None
        }
    }

    /// A call that was forwarded: its answer ends it. A call [`busy`](Self::busy) refuses is
    /// given back, with why: it must not be forwarded.
    pub fn start(
        &mut self,
        id: &Value,
        call: PendingCall,
    ) -> Result<(), (Box<PendingCall>, &'static str)> {
        if let Some(why) = self.busy(id) {
            return Err((Box::new(call), why));
        }
        self.pending.insert(id_key(id), call);
        Ok(())
    }

    /// Notes a client request that is not a call (it has an id and a method), or answers why
    /// it cannot be taken ([`busy`](Self::busy)).
    pub fn claim(&mut self, request: &Value) -> Result<(), &'static str> {
        let (Some(id), Some(_)) = (request.get("id"), request.get("method")) else {
            return Ok(());
        };
        if let Some(why) = self.busy(id) {
            return Err(why);
        }
        self.others.insert(id_key(id));
        Ok(())
    }

    /// Takes a call back (one that was never delivered).
    pub fn take(&mut self, id: &Value) -> Option<PendingCall> {
        self.pending.remove(&id_key(id))
    }

    /// Notes a client → server message that concerns calls: a `tools/list` whose answer names
    /// the server's tools, and `notifications/cancelled`, which ends the call at once (the
    /// server should not answer it): answers its `CANCELLED` event.
    pub fn from_client(&mut self, message: &Value) -> Option<Value> {
        match message.get("method").and_then(Value::as_str) {
            Some("notifications/cancelled") => {
                let id = message.pointer("/params/requestId")?;
                let call = self.pending.remove(&id_key(id))?;
                Some(event(&call, "CANCELLED", None))
            }
            Some("tools/list") => {
                self.lists.insert(id_key(message.get("id")?));
                None
            }
            _ => None,
        }
    }

    /// The tool names of a `tools/list` answer, if `message` is one.
    pub fn listed_tools(&mut self, message: &Value) -> Option<Vec<String>> {
        if !is_answer(message) || !self.lists.remove(&id_key(&message["id"])) {
            return None;
        }
        self.others.remove(&id_key(&message["id"]));
        let tools = message.pointer("/result/tools")?.as_array()?;
        Some(
            tools
                .iter()
                .filter_map(|t| Some(t.get("name")?.as_str()?.to_string()))
                .collect(),
        )
    }

    /// A server → client message: the answer of a started call ends it.
    pub fn from_server(&mut self, message: &Value) -> Option<Ended> {
        if !is_answer(message) {
            return None;
        }
        let key = id_key(&message["id"]);
        if self.others.remove(&key) {
            return None;
        }
        let call = self.pending.remove(&key)?;
        Some(ending(call, message))
    }

    /// Ends every call still waiting for its answer with `status` (the client went away, the
    /// server went away, or the time ran out).
    pub fn end_all(&mut self, status: &str) -> Vec<Value> {
        self.pending
            .drain()
            .map(|(_, call)| event(&call, call.status_or(status), None))
            .collect()
    }

    /// Ends the calls that have waited longer than `timeout` with `TIMEOUT`.
    pub fn end_overdue(&mut self, timeout: Duration) -> Vec<Value> {
        let overdue: Vec<String> = self
            .pending
            .iter()
            .filter(|(_, call)| call.round.elapsed() >= timeout)
            .map(|(id, _)| id.clone())
            .collect();
        overdue
            .into_iter()
            .filter_map(|id| self.pending.remove(&id))
            .map(|call| event(&call, call.status_or("TIMEOUT"), None))
            .collect()
    }

    /// When the oldest round in flight was forwarded.
    pub fn oldest(&self) -> Option<Instant> {
        self.pending.values().map(|c| c.round).min()
    }

    /// Takes every call in flight out (for calls that were never delivered).
    pub fn take_all(&mut self) -> Vec<(String, PendingCall)> {
        self.pending.drain().collect()
    }

    /// Whether an answer has anything to tell: calls in flight, or a tool list asked for.
    pub fn watching(&self) -> bool {
        !self.pending.is_empty() || !self.lists.is_empty()
    }

    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }
}

/// A call's end by its answer, by the billing rule.
pub fn ending(call: PendingCall, answer: &Value) -> Ended {
    if let Some(error) = answer.get("error") {
        let code = error.get("code").and_then(Value::as_i64).unwrap_or(0);
        if NOT_RUN_CODES.contains(&code) && !call.was_cancelled() {
            return Ended::NotRun(call);
        }
        let status = if call.was_cancelled() {
            "CANCELLED"
        } else {
            "ERROR"
        };
        return Ended::Report(event(&call, status, None));
    }
    let result = answer.get("result").unwrap_or(&Value::Null);
    if result.get("resultType").and_then(Value::as_str) == Some("input_required") {
        if let Some(token) = continuation(result) {
            return Ended::Waiting(token, call);
        }
    }
    let errored = result
        .get("isError")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let status = if call.was_cancelled() {
        "CANCELLED"
    } else if errored {
        "ERROR"
    } else {
        "SUCCESS"
    };
    Ended::Report(event(&call, status, token_counts(result)))
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

/// The usage event of a call that ended with `status`.
pub fn event(call: &PendingCall, status: &str, tokens: Option<(i64, i64)>) -> Value {
    let mut event = Map::new();
    event.insert("idempotencyKey".into(), json!(call.key));
    event.insert("metricName".into(), json!("mcp_server.tool_invocations"));
    event.insert("toolName".into(), json!(call.tool));
    event.insert("sessionId".into(), json!(call.session));
    event.insert("occurredAt".into(), json!(rfc3339(call.occurred_at)));
    event.insert("executionStatus".into(), json!(status));
    event.insert(
        "executionDurationMs".into(),
        json!(call.started.elapsed().as_millis() as u64),
    );
    if let Some(agent) = &call.agent {
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

/// A heartbeat of `session` (the SDKs' `system.session.heartbeat`): the answer to it says
/// whether the session is still killed.
pub fn heartbeat(session: &str) -> Value {
    json!({
        "idempotencyKey": uuid(),
        "metricName": "system.session.heartbeat",
        "sessionId": session,
        "sessionBoundary": "HEARTBEAT",
        "occurredAt": rfc3339(SystemTime::now()),
    })
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
            round: Instant::now(),
            occurred_at: SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_181_530_123),
            session: "s".into(),
            agent: Some("claude".into()),
            customer: Some("c".into()),
            key: "k".into(),
            authorized: false,
            cancelled: Arc::default(),
        }
    }

    fn status(ended: Option<Ended>) -> String {
        match ended {
            Some(Ended::Report(event)) => event["executionStatus"].as_str().unwrap().into(),
            Some(Ended::NotRun(_)) => "not run".into(),
            Some(Ended::Waiting(token, _)) => format!("waiting {token}"),
            None => "none".into(),
        }
    }

    #[test]
    fn every_outcome_of_a_call_ends_as_the_billing_rule_says() {
        let mut t = CallTracker::default();
        let answers = [
            (1, json!({"result":{"content":[]}}), "SUCCESS"),
            (
                2,
                json!({"result":{"content":[],"resultType":"complete"}}),
                "SUCCESS",
            ),
            (3, json!({"result":{"content":[],"isError":true}}), "ERROR"),
            (4, json!({"error":{"code":-32603,"message":"x"}}), "ERROR"),
            (
                5,
                json!({"error":{"code":-32602,"message":"Unknown tool"}}),
                "not run",
            ),
            (
                6,
                json!({"error":{"code":-32601,"message":"no"}}),
                "not run",
            ),
            (
                7,
                json!({"result":{"resultType":"input_required","inputRequests":{},"requestState":"r1"}}),
                "waiting r1",
            ),
            (8, json!({"result":{"content":[]}}), "CANCELLED"),
            (
                9,
                json!({"error":{"code":-32602,"message":"x"}}),
                "CANCELLED",
            ),
        ];
        for (id, _, _) in &answers {
            t.start(&json!(id), pending("t")).unwrap();
        }
        for id in [8, 9] {
            // Cancelled in another exchange (HTTP): the flag decides when the answer comes.
            t.pending[&id.to_string()]
                .cancelled
                .store(true, Ordering::Relaxed);
        }
        // A notification or a request from the server ends nothing.
        assert_eq!(
            status(t.from_server(&json!({"method":"notifications/progress","params":{}}))),
            "none"
        );
        assert_eq!(
            status(t.from_server(&json!({"id":1,"method":"sampling/createMessage"}))),
            "none"
        );
        for (id, mut answer, expected) in answers {
            answer["id"] = json!(id);
            assert_eq!(status(t.from_server(&answer)), expected, "{answer}");
        }
        assert_eq!(t.in_flight(), 0);
        assert_eq!(
            status(t.from_server(&json!({"id":1,"result":{}}))),
            "none",
            "answered twice"
        );
    }

    #[test]
    fn ids_match_by_value_and_left_calls_end_with_the_status_given() {
        let mut t = CallTracker::default();
        t.start(&json!(1), pending("a")).unwrap();
        t.start(&json!("1"), pending("b")).unwrap();
        assert!(
            t.start(&json!(1.0), pending("x")).is_err(),
            "an id in flight is not taken twice"
        );
        let Some(Ended::Report(event)) = t.from_server(&json!({"id":1.0,"result":{}})) else {
            panic!("1.0 answers 1")
        };
        assert_eq!(event["toolName"], "a");
        t.start(&json!(2), pending("c")).unwrap();
        let mut left: Vec<String> = t
            .end_all("CANCELLED")
            .iter()
            .map(|e| format!("{} {}", e["toolName"], e["executionStatus"]))
            .collect();
        left.sort();
        assert_eq!(left, ["\"b\" \"CANCELLED\"", "\"c\" \"CANCELLED\""]);
        t.start(&json!(4), pending("e")).unwrap();
        let cancelled =
            t.from_client(&json!({"method":"notifications/cancelled","params":{"requestId":4}}));
        assert_eq!(
            cancelled.unwrap()["executionStatus"],
            "CANCELLED",
            "at once"
        );
        assert_eq!(status(t.from_server(&json!({"id":4,"result":{}}))), "none");
        t.start(&json!(3), pending("d")).unwrap();
        assert!(t.end_overdue(Duration::from_secs(60)).is_empty());
        assert_eq!(
            t.end_overdue(Duration::ZERO)[0]["executionStatus"],
            "TIMEOUT"
        );
    }

    #[test]
    fn the_event_carries_tokens_agent_customer_and_the_call_time() {
        let mut t = CallTracker::default();
        t.start(&json!("a"), pending("t")).unwrap();
        let Some(Ended::Report(event)) = t.from_server(&json!({"id":"a","result":{"structuredContent":{"usage":{"inputTokens":3,"outputTokens":4}}}})) else {
            panic!("reported")
        };
        assert_eq!(event["metadata"], json!({"inputTokens":3,"outputTokens":4}));
        assert_eq!(event["customerId"], "c");
        assert_eq!(event["agentId"], "claude");
        assert_eq!(event["occurredAt"], "2026-11-20T13:32:10.123Z");
    }

    #[test]
    fn the_client_is_named_by_initialize_or_by_each_requests_meta() {
        let init = json!({"method":"initialize","params":{"clientInfo":{"name":"old"}}});
        let modern = json!({"method":"tools/call","params":{"name":"t","_meta":{CLIENT_INFO_META:{"name":"new","version":"1"}}}});
        let neither =
            json!({"method":"tools/call","params":{"name":"t","clientInfo":{"name":"x"}}});
        assert_eq!(client_name(&init), Some("old"));
        assert_eq!(client_name(&modern), Some("new"));
        assert_eq!(client_name(&neither), None);
        assert_eq!(
            continues(&json!({"params":{"requestState":"r"}})),
            Some("r")
        );
        let mut t = CallTracker::default();
        t.from_client(&json!({"id":"l","method":"tools/list"}));
        let answer = json!({"id":"l","result":{"tools":[{"name":"a"},{"name":"b"}]}});
        assert_eq!(t.listed_tools(&answer), Some(vec!["a".into(), "b".into()]));
        assert_eq!(t.listed_tools(&answer), None, "answered once");
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
