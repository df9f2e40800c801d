//! The door: what a call must pass before it is forwarded, the refusal it gets instead, and
//! what happens to a call once it ended (reported, released, or waiting for the client's next
//! round). A call of a killed session, a call the guard blocks and a paid call whose
//! authorization is refused never reach the upstream server; the client gets a tool result with
//! `isError: true` instead. A tool result, not a JSON-RPC error: an MCP client hands tool results
//! to the model, which can tell the user why (and see the payment terms); a JSON-RPC error means
//! the protocol failed, and clients show it as a fault of the server.

use crate::calls::{event, uuid, CallTracker, Ended, PendingCall};
use crate::meter::{GuardAnswer, Meter};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// The `_meta` key a 2026-07-28 request names its protocol version with.
const PROTOCOL_META: &str = "io.modelcontextprotocol/protocolVersion";

/// The first protocol generation whose results must say their `resultType`.
const RESULT_TYPE_SINCE: &str = "2026-07-28";

/// Tool names the proxy keeps from the server's lists; past it, no new name is learnt.
const MAX_LISTED_TOOLS: usize = 10_000;

/// Calls waiting for the client's next round (`input_required`) at most.
const MAX_WAITING_CALLS: usize = 10_000;

/// What the operator asked the proxy to enforce.
#[derive(Clone, Debug)]
pub struct Enforcement {
    /// Tools authorized (`POST /v1/authorize`) before they are forwarded.
    pub paid_tools: Vec<String>,
    /// Ask the guard check before each call.
    pub guard: bool,
    /// Longest a `throttle` answer delays a call.
    pub max_throttle: Duration,
    /// Longest a call waits for its answer (and for the client's next round) before it is
    /// reported as `TIMEOUT`.
    pub call_timeout: Duration,
}

impl Default for Enforcement {
    fn default() -> Self {
        Enforcement {
            paid_tools: Vec::new(),
            guard: false,
            max_throttle: Duration::from_secs(5),
            call_timeout: Duration::from_secs(600),
        }
    }
}

/// Who a call is for, as the transport tells it.
#[derive(Clone, Debug, Default)]
pub struct Caller {
    pub session: String,
    pub agent: Option<String>,
    pub customer: Option<String>,
}

/// The door of one proxy, shared by its exchanges.
pub struct Door {
    pub meter: Arc<Meter>,
    pub rules: Enforcement,
    /// [`round_key`] → a call that asked the client for input, and when it did.
    waiting: Mutex<HashMap<String, (Instant, PendingCall)>>,
    /// The rounds already continued or given up, so that a token replayed (or sent again after
    /// its call ended) is not taken for a new call, authorized and billed again.
    spent: Mutex<Spent>,
    /// The tools the server listed (`tools/list` answers), to tell its tools from invented names.
    listed: Mutex<HashSet<String>>,
}

impl Door {
    pub fn new(meter: Arc<Meter>, rules: Enforcement) -> Door {
        Door {
            meter,
            rules,
            waiting: Mutex::new(HashMap::new()),
            spent: Mutex::new(Spent::default()),
            listed: Mutex::new(HashSet::new()),
        }
    }

    /// Decides one `tools/call` request: `Ok` with the call to track (forward it), or `Err`
    /// with the answer to send the client instead. Blocks on the guard check, a throttle and an
    /// authorization: callers keep it off their relays. A later round of a call that asked for
    /// input continues that call, already admitted, when it comes from the session and payer
    /// the round was handed to; a round already continued or given up is refused.
    pub fn admit(&self, request: &Value, tool: &str, who: &Caller) -> Result<PendingCall, Value> {
        let refuse = |text: String, terms: Option<Value>| {
            self.meter.stats().calls_refused.add(1);
            refusal(request, &text, terms)
        };
        if let Some(token) = crate::calls::continues(request) {
            let key = round_key(&who.session, who.customer.as_deref(), token);
            let mut waiting = lock(&self.waiting);
            match waiting.remove(&key) {
                Some((_, call)) if call.tool == tool => {
                    drop(waiting);
                    lock(&self.spent).insert(key);
                    return Ok(PendingCall {
                        round: Instant::now(),
                        ..call
                    });
                }
                Some(other) => {
                    waiting.insert(key, other);
                }
                None if lock(&self.spent).contains(&key) => {
                    return Err(refuse(
                        format!("the call of {tool} this round continues has already ended (answered, or given up after the call timeout); call the tool again"),
                        None,
                    ));
                }
                None => {}
            }
        }
        let session = &who.session;
        if self.meter.is_killed(session) {
            return Err(refuse(
                format!("mcp-meter stopped session {session} (a hard limit was reached); start a new session"),
                None,
            ));
        }
        if self.rules.guard {
            match self.meter.guard(who.agent.as_deref(), tool, session) {
                GuardAnswer::Block(reason) => {
                    // The reason may hold the operator's costs and margins: it is logged for
                    // the operator; the client is told the call is blocked, not why.
                    tracing::info!(tool, session, reason, "the margin guard blocked a call");
                    return Err(refuse(
                        format!("mcp-meter blocked {tool}: the operator's limits do not allow this call now; try again later"),
                        None,
                    ));
                }
                GuardAnswer::Throttle(wait) => {
                    std::thread::sleep(wait.min(self.rules.max_throttle))
                }
                GuardAnswer::Allow => {}
            }
        }
        // Made before the call and reused on every retry of its event: the authorization's nonce.
        let key = uuid();
        let paid = self.rules.paid_tools.iter().any(|t| t == tool);
        if paid {
            let Some(customer) = &who.customer else {
                return Err(refuse(
                    format!("{tool} is a paid tool and the call names no customer to charge"),
                    None,
                ));
            };
            if let Err(refused) =
                self.meter
                    .authorize(&key, customer, tool, who.agent.as_deref(), session)
            {
                return Err(refuse(refused.message, refused.terms));
            }
        }
        Ok(PendingCall {
            tool: tool.to_string(),
            started: Instant::now(),
            round: Instant::now(),
            occurred_at: SystemTime::now(),
            session: session.clone(),
            agent: who.agent.clone(),
            customer: who.customer.clone(),
            key,
            authorized: paid,
            cancelled: Default::default(),
        })
    }

    /// Whether admitting a call of `tool` asks mcp-meter (the guard, an authorization), and so
    /// may wait.
    pub fn asks_meter(&self, tool: &str) -> bool {
        self.rules.guard || self.rules.paid_tools.iter().any(|t| t == tool)
    }

    /// Acts on a call's end: reports it, releases what it reserved, or keeps it for the
    /// client's next round. A call of a tool the server never listed is reported only when it
    /// succeeded: invented names, which the server refuses, never become tools.
    pub fn ended(&self, ended: Ended) {
        match ended {
            Ended::Report(event) => {
                let tool = event["toolName"].as_str().unwrap_or("");
                let listed = lock(&self.listed);
                let unknown = !listed.is_empty() && !listed.contains(tool);
                drop(listed);
                if unknown && event["executionStatus"] != "SUCCESS" {
                    // Only a paid tool's call holds a reservation to give back.
                    if self.rules.paid_tools.iter().any(|t| t == tool) {
                        let key = event["idempotencyKey"].as_str().unwrap_or("").to_string();
                        self.release(key);
                    }
                } else {
                    self.meter.record(event);
                }
            }
            Ended::NotRun(call) => {
                if call.authorized {
                    self.release(call.key);
                }
            }
            Ended::Waiting(token, call) => {
                let mut waiting = lock(&self.waiting);
                self.expire(&mut waiting);
                if waiting.len() >= MAX_WAITING_CALLS {
                    // The oldest round is given up: it is reported as the rule says for a call
                    // nobody came back to.
                    if let Some(oldest) = waiting
                        .iter()
                        .min_by_key(|(_, (at, _))| *at)
                        .map(|(t, _)| t.clone())
                    {
                        let (_, call) = waiting.remove(&oldest).expect("present");
                        self.meter.record(event(&call, "TIMEOUT", None));
                        lock(&self.spent).insert(oldest);
                    }
                }
                let key = round_key(&call.session, call.customer.as_deref(), &token);
                if let Some((_, replaced)) = waiting.insert(key, (Instant::now(), call)) {
                    // A server that hands out one token twice: the call it first answered can
                    // no longer be continued; it ends as one nobody came back to.
                    self.meter.record(event(&replaced, "TIMEOUT", None));
                }
            }
        }
    }

    /// Releases a reservation, off the caller's thread (the relays never wait on mcp-meter;
    /// `Meter::release` blocks through its retries). A release mcp-meter never takes is logged
    /// and counted there; the reservation then lapses on its own.
    fn release(&self, key: String) {
        let meter = self.meter.clone();
        std::thread::spawn(move || meter.release(&key));
    }

    /// A server → client message: a call's answer ends it, a tool list is learnt.
    pub fn from_server(&self, calls: &mut CallTracker, message: &Value) {
        if let Some(names) = calls.listed_tools(message) {
            self.listed(names);
        } else if let Some(ended) = calls.from_server(message) {
            self.ended(ended);
        }
    }

    /// Reports the calls nobody came back to within the call timeout as `TIMEOUT`.
    fn expire(&self, waiting: &mut HashMap<String, (Instant, PendingCall)>) {
        let timeout = self.rules.call_timeout;
        let late: Vec<String> = waiting
            .iter()
            .filter(|(_, (at, _))| at.elapsed() >= timeout)
            .map(|(t, _)| t.clone())
            .collect();
        for token in late {
            let (_, call) = waiting.remove(&token).expect("present");
            self.meter.record(event(&call, "TIMEOUT", None));
            lock(&self.spent).insert(token);
        }
    }

    /// Ends every round waiting for its client with `status`: the proxy is stopping, or (stdio)
    /// its one client is gone.
    pub fn end_waiting(&self, status: &str) {
        let ended: Vec<(String, (Instant, PendingCall))> = lock(&self.waiting).drain().collect();
        let mut spent = lock(&self.spent);
        for (key, (_, call)) in ended {
            self.meter.record(event(&call, status, None));
            spent.insert(key);
        }
    }

    /// Reports the waiting rounds past the call timeout; the binary calls it now and then.
    pub fn expire_waiting(&self) {
        self.expire(&mut lock(&self.waiting));
    }

    /// Learns the tools a `tools/list` answer names.
    pub fn listed(&self, names: Vec<String>) {
        let mut listed = lock(&self.listed);
        for name in names {
            if listed.len() >= MAX_LISTED_TOOLS {
                break;
            }
            listed.insert(name);
        }
    }

    /// Ends every call of `calls` left without an answer with `status` (see [`CallTracker::end_all`]).
    pub fn end_all(&self, calls: &mut CallTracker, status: &str) {
        for event in calls.end_all(status) {
            self.ended(Ended::Report(event));
        }
    }

    /// Ends the calls of `calls` that waited past the call timeout.
    pub fn end_overdue(&self, calls: &mut CallTracker) {
        for event in calls.end_overdue(self.rules.call_timeout) {
            self.ended(Ended::Report(event));
        }
    }

    pub fn waiting(&self) -> usize {
        lock(&self.waiting).len()
    }
}

/// Where a waiting round is kept: its token with the session and payer it was handed to, so that
/// only they continue it.
fn round_key(session: &str, customer: Option<&str>, token: &str) -> String {
    format!("{session}\u{0}{}\u{0}{token}", customer.unwrap_or(""))
}

/// Rounds already continued or given up, the latest [`MAX_WAITING_CALLS`].
#[derive(Default)]
struct Spent {
    keys: HashSet<String>,
    order: VecDeque<String>,
}

impl Spent {
    fn insert(&mut self, key: String) {
        if self.keys.insert(key.clone()) {
            self.order.push_back(key);
            if self.order.len() > MAX_WAITING_CALLS {
                if let Some(oldest) = self.order.pop_front() {
                    self.keys.remove(&oldest);
                }
            }
        }
    }

    fn contains(&self, key: &str) -> bool {
        self.keys.contains(key)
    }
}

/// Whether a request comes from a client of a generation whose results carry `resultType`.
fn wants_result_type(request: &Value) -> bool {
    request
        .pointer("/params/_meta")
        .and_then(|m| m.get(PROTOCOL_META))
        .and_then(Value::as_str)
        .is_some_and(|v| v >= RESULT_TYPE_SINCE)
}

/// The tool result a refused call is answered with; a 2026-07-28 client gets its `resultType`.
pub fn refusal(request: &Value, text: &str, terms: Option<Value>) -> Value {
    let mut result = json!({"content": [{"type": "text", "text": text}], "isError": true});
    if let Some(terms) = terms {
        result["content"][0]["text"] = json!(format!("{text}\n{terms}"));
        result["_meta"] = json!({"mcp-meter/payment": terms});
    }
    if wants_result_type(request) {
        result["resultType"] = json!("complete");
    }
    json!({"jsonrpc": "2.0", "id": request["id"], "result": result})
}

/// The JSON-RPC error for a request the exchange (or stdio session) cannot take, saying why
/// ([`crate::calls::CallTracker::busy`]): it is not forwarded.
pub fn id_in_use(request: &Value, why: &str) -> Value {
    crate::wire::error(
        &request["id"],
        -32600,
        format!("mcp-meter proxy: request id {} {why}", request["id"]),
    )
}

/// A JSON-RPC error for each request of `body` (a message or a batch), for when the upstream
/// cannot be reached: MCP clients read JSON-RPC, not an HTTP error page.
pub fn unreachable(body: &Value, why: &str) -> Option<Value> {
    let errors: Vec<Value> = crate::calls::messages(body)
        .into_iter()
        .filter(|m| m.get("method").is_some() && m.get("id").is_some())
        .map(|m| {
            crate::wire::error(
                &m["id"],
                -32603,
                format!("mcp-meter proxy: the upstream MCP server did not answer: {why}"),
            )
        })
        .collect();
    match (body.is_array(), errors.len()) {
        (_, 0) => None,
        (false, _) => errors.into_iter().next(),
        (true, _) => Some(Value::Array(errors)),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().expect("door lock")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_says_its_result_type_to_the_generation_that_needs_it() {
        let modern = json!({"id":3,"method":"tools/call","params":{"name":"t","_meta":{PROTOCOL_META:"2026-07-28"}}});
        let old = json!({"id":3,"method":"tools/call","params":{"name":"t"}});
        let terms = json!({"reason":"insufficient_balance"});
        let r = refusal(&modern, "pay", Some(terms.clone()));
        assert_eq!(r["result"]["resultType"], "complete");
        assert_eq!(r["result"]["isError"], true);
        assert_eq!(r["result"]["_meta"]["mcp-meter/payment"], terms);
        assert!(refusal(&old, "pay", None)["result"]
            .get("resultType")
            .is_none());
    }

    /// A door whose meter cannot be reached: what it records waits in its queue, countable.
    fn door(call_timeout: Duration) -> Door {
        let meter = Meter::start(crate::meter::MeterConfig {
            url: "http://127.0.0.1:1".into(),
            api_key: "k".into(),
            max_batch_events: 100,
            flush_interval: Duration::from_secs(3600),
            max_queue_events: 100,
            request_timeout: Duration::from_millis(100),
            guard_timeout: Duration::from_millis(100),
            kill_recheck: Duration::from_secs(60),
        });
        let rules = Enforcement {
            call_timeout,
            ..Enforcement::default()
        };
        Door::new(Arc::new(meter), rules)
    }

    fn who(session: &str, customer: &str) -> Caller {
        Caller {
            session: session.into(),
            agent: None,
            customer: Some(customer.into()),
        }
    }

    fn round(token: &str) -> Value {
        json!({"id": 2, "method": "tools/call", "params": {"name": "t", "requestState": token}})
    }

    #[test]
    fn a_round_is_continued_once_and_only_by_the_session_and_payer_it_was_handed_to() {
        let door = door(Duration::from_secs(600));
        let first = json!({"id": 1, "method": "tools/call", "params": {"name": "t"}});
        let call = door.admit(&first, "t", &who("s1", "c1")).unwrap();
        let key = call.key.clone();
        door.ended(Ended::Waiting("tok".into(), call));
        // Another session, or another payer, sending the token starts a call of its own.
        for stranger in [who("s2", "c1"), who("s1", "c2")] {
            let other = door.admit(&round("tok"), "t", &stranger).unwrap();
            assert_ne!(other.key, key, "{stranger:?} took the call over");
        }
        assert_eq!(door.waiting(), 1);
        std::thread::sleep(Duration::from_millis(5));
        let continued = door.admit(&round("tok"), "t", &who("s1", "c1")).unwrap();
        assert_eq!(continued.key, key, "the same call, its one authorization");
        assert!(
            continued.round > continued.started,
            "the timeout counts from this round"
        );
        assert_eq!(door.waiting(), 0);
        // The same round again (a replay, or two sent at once): refused, not a new call.
        let again = door
            .admit(&round("tok"), "t", &who("s1", "c1"))
            .unwrap_err();
        assert_eq!(again["result"]["isError"], true, "{again}");
        assert_eq!(door.meter.queued(), 0, "nothing reported yet");
    }

    #[test]
    fn a_round_nobody_came_back_to_is_reported_once_and_cannot_be_continued_later() {
        let door = door(Duration::ZERO);
        let first = json!({"id": 1, "method": "tools/call", "params": {"name": "t"}});
        let call = door.admit(&first, "t", &who("s1", "c1")).unwrap();
        door.ended(Ended::Waiting("late".into(), call));
        door.expire_waiting();
        assert_eq!((door.waiting(), door.meter.queued()), (0, 1), "one TIMEOUT");
        let late = door
            .admit(&round("late"), "t", &who("s1", "c1"))
            .unwrap_err();
        assert_eq!(late["result"]["isError"], true, "{late}");
        // Rounds still waiting when the proxy stops are reported too.
        let call = door.admit(&first, "t", &who("s1", "c1")).unwrap();
        let door = Door {
            rules: Enforcement::default(),
            ..door
        };
        door.ended(Ended::Waiting("open".into(), call));
        door.end_waiting("CANCELLED");
        assert_eq!((door.waiting(), door.meter.queued()), (0, 2));
    }

    #[test]
    fn an_unreachable_upstream_answers_each_request_with_a_json_rpc_error() {
        let batch = json!([{"id":1,"method":"tools/call"},{"method":"notifications/initialized"}]);
        let errors = unreachable(&batch, "refused").unwrap();
        assert_eq!(errors.as_array().unwrap().len(), 1);
        assert_eq!(errors[0]["error"]["code"], -32603);
        assert!(unreachable(&json!({"method":"notifications/x"}), "x").is_none());
    }
}
