//! Enforcement before forwarding: a call of a killed session, a call the guard blocks, and a
//! paid call whose authorization is refused never reach the upstream server; the client gets a
//! tool result with `isError: true` instead. A tool result, not a JSON-RPC error: an MCP client
//! hands tool results to the model, which can tell the user why (and see the payment terms); a
//! JSON-RPC error means the protocol failed, and clients show it as a fault of the server.

use crate::calls::{uuid, PendingCall};
use crate::meter::{GuardAnswer, Meter};
use serde_json::{json, Value};
use std::time::{Duration, Instant, SystemTime};

/// What the operator asked the proxy to enforce.
#[derive(Clone, Debug, Default)]
pub struct Enforcement {
    /// Tools authorized (`POST /v1/authorize`) before they are forwarded.
    pub paid_tools: Vec<String>,
    /// Ask the guard check before each call.
    pub guard: bool,
    /// Longest a `throttle` answer delays a call.
    pub max_throttle: Duration,
}

/// Decides one `tools/call` request: `Ok` with the call to track (forward it), or `Err` with
/// the answer to send the client instead.
pub fn gate_call(
    meter: &Meter,
    rules: &Enforcement,
    request: &Value,
    tool: &str,
    session: &str,
    agent: Option<&str>,
    customer: Option<&str>,
) -> Result<PendingCall, Value> {
    let refuse = |text: String, terms: Option<Value>| {
        meter
            .stats()
            .calls_refused
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        refusal(request, &text, terms)
    };
    if meter.is_killed(session) {
        return Err(refuse(
            format!("mcp-meter stopped session {session} (a hard limit was reached); start a new session"),
            None,
        ));
    }
    if rules.guard {
        match meter.guard(agent, tool, session) {
            GuardAnswer::Block(reason) => {
                return Err(refuse(format!("mcp-meter blocked {tool}: {reason}"), None))
            }
            GuardAnswer::Throttle(wait) => std::thread::sleep(wait.min(rules.max_throttle)),
            GuardAnswer::Allow => {}
        }
    }
    // Made before the call and reused on every retry of its event: the authorization's nonce.
    let key = uuid();
    if rules.paid_tools.iter().any(|t| t == tool) {
        let Some(customer) = customer else {
            return Err(refuse(
                format!("{tool} is a paid tool and the call names no customer to charge"),
                None,
            ));
        };
        if let Err(refused) = meter.authorize(&key, customer, tool, agent, session) {
            return Err(refuse(refused.message, refused.terms));
        }
    }
    Ok(PendingCall {
        tool: tool.to_string(),
        started: Instant::now(),
        occurred_at: SystemTime::now(),
        session: session.to_string(),
        cancelled: false,
        key,
        customer: customer.map(str::to_string),
    })
}

/// The tool result a refused call is answered with.
pub fn refusal(request: &Value, text: &str, terms: Option<Value>) -> Value {
    let mut result = json!({"content": [{"type": "text", "text": text}], "isError": true});
    if let Some(terms) = terms {
        result["content"][0]["text"] = json!(format!("{text}\n{terms}"));
        result["_meta"] = json!({"mcp-meter/payment": terms});
    }
    json!({"jsonrpc": "2.0", "id": request["id"], "result": result})
}
