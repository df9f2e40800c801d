//! The usage event: its wire form (camelCase, Aforo-compatible), validation, and the rated row.
//!
//! Parsing is two-step so that a bad event fails alone: a batch is split into raw JSON values,
//! then each one is read into a [`WireEvent`] and checked by [`validate`]. The checks follow the
//! Aforo ingestor's limits, which its SDKs mirror client-side; string lengths are counted in
//! UTF-16 code units, as those SDKs (and Java's `String.length()`) count them.

use crate::money::Quantity;
use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Number;
use sha2::{Digest, Sha256};
use std::fmt;

/// The metric of a session heartbeat: refreshes a session, never billed, never a tool call.
pub const HEARTBEAT_METRIC: &str = "system.session.heartbeat";
/// The product type an event has when it names none.
pub const DEFAULT_PRODUCT_TYPE: &str = "MCP_SERVER";
/// Most events in one request, as the Aforo SDKs assume.
pub const MAX_BATCH_EVENTS: usize = 1000;

pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;
pub const MAX_METRIC_NAME_LEN: usize = 255;
pub const MAX_PRODUCT_TYPE_LEN: usize = 20;
pub const MAX_TOOL_NAME_LEN: usize = 64;
pub const MAX_AGENT_ID_LEN: usize = 36;
pub const MAX_CUSTOMER_ID_LEN: usize = 64;
pub const MAX_SESSION_ID_LEN: usize = 64;
pub const MAX_SESSION_BOUNDARY_LEN: usize = 32;
/// A tool call that ran longer than a week is a clock or unit error, not usage.
pub const MAX_EXECUTION_DURATION_MS: i64 = 7 * 24 * 3600 * 1000;
/// Token counts above this are a unit error (a trillion tokens in one call).
pub const MAX_TOKENS: i64 = 1_000_000_000_000;

/// One event as it arrives. Every field is optional here so that [`validate`] can say exactly
/// which one is missing or wrong; unknown top-level fields are ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WireEvent {
    pub idempotency_key: Option<String>,
    pub metric_name: Option<String>,
    pub product_type: Option<String>,
    pub tool_name: Option<String>,
    pub agent_id: Option<String>,
    pub customer_id: Option<String>,
    pub session_id: Option<String>,
    pub occurred_at: Option<String>,
    pub quantity: Option<Number>,
    pub execution_status: Option<String>,
    pub execution_duration_ms: Option<Number>,
    pub session_boundary: Option<String>,
    pub metadata: Option<Box<RawValue>>,
}

/// The outcome of a tool call, as the SDKs report it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ExecutionStatus {
    Success,
    Partial,
    Timeout,
    Error,
    ValidationFailed,
    Failed,
    Failure,
    Cancelled,
    Pending,
    Blocked,
    HitlRequired,
}

impl ExecutionStatus {
    pub const ALL: [ExecutionStatus; 11] = [
        Self::Success,
        Self::Partial,
        Self::Timeout,
        Self::Error,
        Self::ValidationFailed,
        Self::Failed,
        Self::Failure,
        Self::Cancelled,
        Self::Pending,
        Self::Blocked,
        Self::HitlRequired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Success => "SUCCESS",
            Self::Partial => "PARTIAL",
            Self::Timeout => "TIMEOUT",
            Self::Error => "ERROR",
            Self::ValidationFailed => "VALIDATION_FAILED",
            Self::Failed => "FAILED",
            Self::Failure => "FAILURE",
            Self::Cancelled => "CANCELLED",
            Self::Pending => "PENDING",
            Self::Blocked => "BLOCKED",
            Self::HitlRequired => "HITL_REQUIRED",
        }
    }

    /// Reads a status the way the SDKs normalise it: trimmed, any case.
    pub fn parse(text: &str) -> Option<ExecutionStatus> {
        let wanted = text.trim();
        Self::ALL
            .into_iter()
            .find(|s| s.as_str().eq_ignore_ascii_case(wanted))
    }

    /// Whether the call counts as an error in analytics: it ran (or tried to) and failed.
    /// Cancelled, blocked, pending and human-in-the-loop calls did not fail, and a partial
    /// result is still a result.
    pub fn is_error(self) -> bool {
        matches!(
            self,
            Self::Timeout | Self::Error | Self::ValidationFailed | Self::Failed | Self::Failure
        )
    }
}

impl fmt::Display for ExecutionStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The time window an event's `occurredAt` must fall in, relative to when it was received.
#[derive(Clone, Copy, Debug)]
pub struct TimeBounds {
    pub received_at_ms: i64,
    pub max_age_ms: i64,
    pub max_future_skew_ms: i64,
}

/// Limits that come from config rather than from the wire contract.
#[derive(Clone, Copy, Debug)]
pub struct EventLimits {
    pub max_metadata_bytes: usize,
}

/// An event that passed validation, before rating.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidEvent {
    pub idempotency_key: String,
    /// For a derived key, the key the previous derivation gave the same bytes: see
    /// [`RatedEvent::legacy_idempotency_key`].
    pub legacy_idempotency_key: Option<String>,
    pub occurred_at_ms: i64,
    pub metric_name: String,
    pub product_type: String,
    pub tool_name: String,
    pub agent_id: String,
    pub customer_id: String,
    pub session_id: String,
    pub execution_status: ExecutionStatus,
    pub execution_duration_ms: i64,
    pub session_boundary: String,
    pub quantity: Quantity,
    pub input_tokens: i64,
    pub output_tokens: i64,
    /// The event's `metadata` object as it was sent, if any.
    pub metadata: Option<String>,
}

impl ValidEvent {
    pub fn is_heartbeat(&self) -> bool {
        self.metric_name == HEARTBEAT_METRIC
    }
}

/// A validated event with its price stamped: the row every store keeps.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RatedEvent {
    pub idempotency_key: String,
    /// When the key was derived from the content, the key the previous derivation (SHA-256 of
    /// the bytes, `sha256:`) gave: a retry of an event stored before the canonical derivation
    /// existed is a duplicate of it. Stores look it up and never store it. Not needed once no
    /// store holds `sha256:` keys younger than `retention.dedup_days`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub legacy_idempotency_key: Option<String>,
    pub occurred_at_ms: i64,
    pub received_at_ms: i64,
    pub metric_name: String,
    pub product_type: String,
    pub tool_name: String,
    pub agent_id: String,
    pub customer_id: String,
    pub session_id: String,
    pub execution_status: ExecutionStatus,
    pub execution_duration_ms: i64,
    pub session_boundary: String,
    pub quantity_micros: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub revenue_micros: i64,
    pub cogs_micros: i64,
    pub rate_plan_version: u32,
    pub metadata: Option<String>,
}

impl RatedEvent {
    /// A successful call of tool `search` by agent `agent` in session `session`: 100 ms, 10
    /// input and 20 output tokens, 5000 µUSD revenue, 1000 µUSD COGS. For tests, examples and
    /// benchmarks, which change the fields they are about with `..RatedEvent::sample_call(..)`.
    pub fn sample_call(idempotency_key: &str, occurred_at_ms: i64) -> RatedEvent {
        RatedEvent {
            idempotency_key: idempotency_key.into(),
            legacy_idempotency_key: None,
            occurred_at_ms,
            received_at_ms: occurred_at_ms,
            metric_name: "mcp_server.tool_invocations".into(),
            product_type: DEFAULT_PRODUCT_TYPE.into(),
            tool_name: "search".into(),
            agent_id: "agent".into(),
            customer_id: String::new(),
            session_id: "session".into(),
            execution_status: ExecutionStatus::Success,
            execution_duration_ms: 100,
            session_boundary: String::new(),
            quantity_micros: crate::money::SCALE,
            input_tokens: 10,
            output_tokens: 20,
            revenue_micros: 5000,
            cogs_micros: 1000,
            rate_plan_version: 1,
            metadata: None,
        }
    }

    pub fn is_heartbeat(&self) -> bool {
        self.metric_name == HEARTBEAT_METRIC
    }

    /// Whether this row counts as a tool call (and is billed): everything but heartbeats.
    pub fn is_call(&self) -> bool {
        !self.is_heartbeat()
    }
}

/// One message on the events topic, as the ingestor writes it: `{"tenantId", "event"}`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BusEventRef<'a> {
    pub tenant_id: &'a str,
    pub event: &'a RatedEvent,
}

/// One message on the events topic, as the aggregator reads it.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BusEvent {
    pub tenant_id: String,
    pub event: RatedEvent,
}

/// The Kafka key of an event: a hash of (tenant, idempotency key), so that one key always lands
/// on one partition and is deduplicated by one consumer, in order. 16 bytes of SHA-256 of
/// `tenant NUL key` (NUL cannot occur in either: control characters are refused).
pub fn bus_key(tenant_id: &str, idempotency_key: &str) -> [u8; 16] {
    let mut hasher = Sha256::new();
    hasher.update(tenant_id.as_bytes());
    hasher.update([0u8]);
    hasher.update(idempotency_key.as_bytes());
    let digest = hasher.finalize();
    let mut key = [0u8; 16];
    key.copy_from_slice(&digest[..16]);
    key
}

/// Reads one event from its JSON text; the error names the field that could not be read.
pub fn parse_event(raw: &str) -> Result<WireEvent, String> {
    // serde reads a struct from an array too (`[..]` as fields in order); an event is an object.
    if !raw.trim_start().starts_with('{') {
        return Err(format!(
            "an event must be a JSON object, not `{}`",
            truncate_for_message(raw.trim())
        ));
    }
    match serde_json::from_str::<WireEvent>(raw) {
        Ok(event) => Ok(event),
        // The plain parse is the fast path; on failure, parse again to learn which field broke.
        Err(plain) => {
            let mut de = serde_json::Deserializer::from_str(raw);
            match serde_path_to_error::deserialize::<_, WireEvent>(&mut de) {
                Err(e) if !e.path().to_string().is_empty() && e.path().to_string() != "." => Err(
                    format!("{}: {}", e.path(), strip_position(&e.inner().to_string())),
                ),
                _ => Err(describe_shape_error(&plain)),
            }
        }
    }
}

fn describe_shape_error(e: &serde_json::Error) -> String {
    let text = strip_position(&e.to_string());
    if text.starts_with("invalid type") {
        format!("an event must be a JSON object ({text})")
    } else {
        text
    }
}

/// serde_json appends "at line 1 column 57"; inside one event of a batch that position
/// misleads more than it helps, since the event index is reported beside the message.
fn strip_position(text: &str) -> String {
    match text.rfind(" at line ") {
        Some(i) => text[..i].to_string(),
        None => text.to_string(),
    }
}

/// Checks a parsed event against the contract. `raw` is the event's JSON text, from which the
/// idempotency key is derived when the client sent none.
pub fn validate(
    event: WireEvent,
    raw: &str,
    bounds: TimeBounds,
    limits: EventLimits,
) -> Result<ValidEvent, String> {
    let metric_name = required("metricName", event.metric_name, MAX_METRIC_NAME_LEN)?;
    let is_heartbeat = metric_name == HEARTBEAT_METRIC;
    let product_type = optional("productType", event.product_type, MAX_PRODUCT_TYPE_LEN)?
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| DEFAULT_PRODUCT_TYPE.to_string());
    let tool_name = optional("toolName", event.tool_name, MAX_TOOL_NAME_LEN)?.unwrap_or_default();
    if tool_name.is_empty() && product_type == DEFAULT_PRODUCT_TYPE && !is_heartbeat {
        return Err("toolName is required for productType MCP_SERVER".into());
    }
    let agent_id = optional("agentId", event.agent_id, MAX_AGENT_ID_LEN)?.unwrap_or_default();
    let customer_id =
        optional("customerId", event.customer_id, MAX_CUSTOMER_ID_LEN)?.unwrap_or_default();
    let session_id =
        optional("sessionId", event.session_id, MAX_SESSION_ID_LEN)?.unwrap_or_default();
    let session_boundary = optional(
        "sessionBoundary",
        event.session_boundary,
        MAX_SESSION_BOUNDARY_LEN,
    )?
    .unwrap_or_default();
    if is_heartbeat && session_id.is_empty() {
        return Err("sessionId is required on a heartbeat (system.session.heartbeat)".into());
    }

    let timed = event.occurred_at.is_some();
    let occurred_at_ms = match event.occurred_at {
        None => bounds.received_at_ms,
        Some(text) => parse_occurred_at(&text, bounds)?,
    };

    let quantity = match event.quantity {
        None => Quantity::ONE,
        Some(n) => Quantity::parse(&n.to_string()).map_err(|e| format!("quantity {e}"))?,
    };
    let execution_status = match event.execution_status {
        None => ExecutionStatus::Success,
        Some(text) => ExecutionStatus::parse(&text).ok_or_else(|| {
            format!(
                "executionStatus `{}` is not one of {}",
                truncate_for_message(&text),
                ExecutionStatus::ALL.map(|s| s.as_str()).join(", ")
            )
        })?,
    };
    let execution_duration_ms = match event.execution_duration_ms {
        None => 0,
        Some(n) => whole_number("executionDurationMs", &n, MAX_EXECUTION_DURATION_MS)?,
    };

    let (metadata, input_tokens, output_tokens) = match event.metadata {
        None => (None, 0, 0),
        Some(raw_metadata) => {
            let text = raw_metadata.get();
            if text.len() > limits.max_metadata_bytes {
                return Err(format!(
                    "metadata is {} bytes; the limit is {} bytes",
                    text.len(),
                    limits.max_metadata_bytes
                ));
            }
            if !text.starts_with('{') {
                return Err("metadata must be a JSON object".into());
            }
            let tokens: MetadataTokens =
                serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_str(text))
                    .map_err(|e| {
                        let path = e.path().to_string();
                        let at = if path == "." {
                            String::new()
                        } else {
                            format!(".{path}")
                        };
                        format!("metadata{at}: {}", strip_position(&e.inner().to_string()))
                    })?;
            let input = match tokens.input_tokens {
                None => 0,
                Some(n) => whole_number("metadata.inputTokens", &n, MAX_TOKENS)?,
            };
            let output = match tokens.output_tokens {
                None => 0,
                Some(n) => whole_number("metadata.outputTokens", &n, MAX_TOKENS)?,
            };
            (Some(text.to_string()), input, output)
        }
    };

    let (idempotency_key, legacy_idempotency_key) = match optional(
        "idempotencyKey",
        event.idempotency_key,
        MAX_IDEMPOTENCY_KEY_LEN,
    )? {
        Some(key) if !key.is_empty() => (key, None),
        _ if timed => (
            derived_idempotency_key(raw),
            Some(legacy_derived_idempotency_key(raw)),
        ),
        // Without a key or a time, two identical calls would have identical content: the
        // instant of receipt tells them apart (and a retry of such an event is a new call).
        _ => (received_idempotency_key(raw, bounds.received_at_ms), None),
    };

    Ok(ValidEvent {
        idempotency_key,
        legacy_idempotency_key,
        occurred_at_ms,
        metric_name,
        product_type,
        tool_name,
        agent_id,
        customer_id,
        session_id,
        execution_status,
        execution_duration_ms,
        session_boundary,
        quantity,
        input_tokens,
        output_tokens,
        metadata,
    })
}

/// The key of an event sent without one but with `occurredAt`: `sha256v2:` and the SHA-256 of
/// its canonical JSON ([`canonical_json`]), so the same event is deduplicated however it is
/// spaced or its fields ordered. SDKs should send `idempotencyKey`: two calls with equal content
/// and the same `occurredAt` are one event here.
pub fn derived_idempotency_key(raw: &str) -> String {
    match serde_json::from_str::<serde_json::Value>(raw) {
        Ok(value) => {
            let mut canonical = String::with_capacity(raw.len());
            canonical_json(&value, &mut canonical);
            hex_key("sha256v2:", canonical.as_bytes())
        }
        // Validation parsed the text already; this only keeps the function total.
        Err(_) => hex_key("sha256v2:", raw.as_bytes()),
    }
}

/// The key of an event sent with neither `idempotencyKey` nor `occurredAt`: its content's key
/// and the millisecond it was received, so two real calls with equal content are two events.
pub fn received_idempotency_key(raw: &str, received_at_ms: i64) -> String {
    format!("received:{received_at_ms}:{}", derived_idempotency_key(raw))
}

/// Whether `event` leaves its identity to the server's clock: no `idempotencyKey` and no
/// `occurredAt`. Each such event is a call of its own; a retry of it is counted again.
pub fn keyed_by_receipt(event: &WireEvent) -> bool {
    event.idempotency_key.as_deref().is_none_or(str::is_empty) && event.occurred_at.is_none()
}

/// The first derivation, from the bytes as sent: kept so that retries of events stored with it
/// are still recognised (see [`RatedEvent::legacy_idempotency_key`]).
pub fn legacy_derived_idempotency_key(raw: &str) -> String {
    hex_key("sha256:", raw.as_bytes())
}

fn hex_key(prefix: &str, bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = Sha256::digest(bytes);
    let mut key = String::with_capacity(prefix.len() + 64);
    key.push_str(prefix);
    for byte in digest {
        key.push(HEX[usize::from(byte >> 4)] as char);
        key.push(HEX[usize::from(byte & 15)] as char);
    }
    key
}

/// One text per JSON value, after RFC 8785: no whitespace, object members sorted by name,
/// strings escaped the one way serde_json does, numbers in their shortest form (an integral
/// float as an integer, so `1.0` and `1` are one number).
pub fn canonical_json(value: &serde_json::Value, out: &mut String) {
    use serde_json::Value;
    match value {
        Value::Null | Value::Bool(_) | Value::String(_) => out.push_str(&value.to_string()),
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => out.push_str(&i.to_string()),
            (_, Some(u), _) => out.push_str(&u.to_string()),
            (_, _, Some(f)) if f.fract() == 0.0 && f.abs() < 1e15 => {
                out.push_str(&(f as i64).to_string())
            }
            (_, _, Some(f)) => out.push_str(&f.to_string()),
            _ => out.push_str(&n.to_string()),
        },
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical_json(item, out);
            }
            out.push(']');
        }
        Value::Object(members) => {
            let mut names: Vec<&String> = members.keys().collect();
            names.sort_unstable();
            out.push('{');
            for (i, name) in names.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(name.clone()).to_string());
                out.push(':');
                canonical_json(&members[name], out);
            }
            out.push('}');
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct MetadataTokens {
    input_tokens: Option<Number>,
    output_tokens: Option<Number>,
}

fn required(field: &str, value: Option<String>, max_len: usize) -> Result<String, String> {
    match optional(field, value, max_len)? {
        Some(v) if !v.trim().is_empty() => Ok(v),
        _ => Err(format!("{field} is required")),
    }
}

fn optional(field: &str, value: Option<String>, max_len: usize) -> Result<Option<String>, String> {
    let Some(value) = value else { return Ok(None) };
    check_text(field, &value, max_len)?;
    Ok(Some(value))
}

/// The one rule for every id and name a client sends (in events, grants, authorizations,
/// portal tokens): at most `max_len` characters, counted in UTF-16 units as the SDKs count,
/// and no control character.
pub fn check_text(field: &str, value: &str, max_len: usize) -> Result<(), String> {
    // A UTF-8 string never has more UTF-16 units than bytes, so most strings skip the count.
    if value.len() > max_len {
        let units = value.encode_utf16().count();
        if units > max_len {
            return Err(format!(
                "{field} is {units} characters; the limit is {max_len}"
            ));
        }
    }
    if let Some(c) = value.chars().find(|c| c.is_control()) {
        return Err(format!(
            "{field} contains the control character U+{:04X}; remove it",
            c as u32
        ));
    }
    Ok(())
}

/// A name a client chose (an MCP client's name, a session id it sent) made to pass
/// [`check_text`] without merging it with another: control characters become `?`, and a value
/// over `max_len` keeps a prefix and ends with `~` and 16 hex digits of its SHA-256, so two
/// long values that share the prefix stay two. A value that passes is kept as it is.
pub fn fit_text(value: &str, max_len: usize) -> std::borrow::Cow<'_, str> {
    if check_text("", value, max_len).is_ok() {
        return std::borrow::Cow::Borrowed(value);
    }
    let clean: String = value
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if clean.encode_utf16().count() <= max_len {
        return std::borrow::Cow::Owned(clean);
    }
    let digest = Sha256::digest(value.as_bytes());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    let suffix = format!("~{hex}");
    let mut kept = String::new();
    let mut units = 0;
    for c in clean.chars() {
        units += c.len_utf16();
        if units > max_len - suffix.len() {
            break;
        }
        kept.push(c);
    }
    kept.push_str(&suffix);
    std::borrow::Cow::Owned(kept)
}

fn parse_occurred_at(text: &str, bounds: TimeBounds) -> Result<i64, String> {
    let at = DateTime::parse_from_rfc3339(text).map_err(|_| {
        format!(
            "occurredAt `{}` is not an RFC 3339 timestamp like 2026-11-21T10:00:00.000Z",
            truncate_for_message(text)
        )
    })?;
    let ms = at.timestamp_millis();
    if ms < bounds.received_at_ms - bounds.max_age_ms {
        return Err(format!(
            "occurredAt {text} is more than {} days old; late usage must arrive within that window",
            bounds.max_age_ms / 86_400_000
        ));
    }
    if ms > bounds.received_at_ms + bounds.max_future_skew_ms {
        return Err(format!(
            "occurredAt {text} is more than {} seconds in the future; check the client's clock",
            bounds.max_future_skew_ms / 1000
        ));
    }
    Ok(ms)
}

/// A non-negative whole number, also when sent as `542.0`.
fn whole_number(field: &str, n: &Number, max: i64) -> Result<i64, String> {
    let value = if let Some(i) = n.as_i64() {
        Some(i)
    } else if let Some(f) = n.as_f64() {
        (f.fract() == 0.0 && f.abs() < 9.0e15).then_some(f as i64)
    } else {
        None
    };
    match value {
        Some(v) if (0..=max).contains(&v) => Ok(v),
        Some(v) if v < 0 => Err(format!("{field} must be 0 or more (got {n})")),
        Some(_) => Err(format!("{field} must be at most {max} (got {n})")),
        None => Err(format!("{field} must be a whole number (got {n})")),
    }
}

fn truncate_for_message(text: &str) -> String {
    let mut cut: String = text.chars().take(40).collect();
    if cut.len() < text.len() {
        cut.push('…');
    }
    cut.chars().filter(|c| !c.is_control()).collect()
}

/// Milliseconds since the epoch as RFC 3339 UTC with milliseconds, the wire's time format.
pub fn format_ms(ms: i64) -> String {
    Utc.timestamp_millis_opt(ms)
        .single()
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_795_000_000_000; // 2026-11-18T11:06:40Z
    const SEED: &str = r#"{"metricName":"mcp_server.tool_invocations","productType":"MCP_SERVER","toolName":"web_search","sessionId":"sess_abc123","agentId":"agent_gpt4o_prod","executionDurationMs":542,"metadata":{"inputTokens":1200,"outputTokens":450}}"#;

    fn bounds() -> TimeBounds {
        TimeBounds {
            received_at_ms: NOW,
            max_age_ms: 35 * 86_400_000,
            max_future_skew_ms: 300_000,
        }
    }

    fn check(raw: &str) -> Result<ValidEvent, String> {
        let limits = EventLimits {
            max_metadata_bytes: 1024,
        };
        validate(parse_event(raw)?, raw, bounds(), limits)
    }

    fn with(field: &str, value: &str) -> String {
        let mut v: serde_json::Value = serde_json::from_str(SEED).unwrap();
        v[field] = serde_json::from_str(value).unwrap();
        v.to_string()
    }

    #[test]
    fn the_seed_event_is_valid_with_defaults_filled_in() {
        let e = check(SEED).unwrap();
        assert_eq!(e.tool_name, "web_search");
        assert_eq!(e.quantity, Quantity::ONE);
        assert_eq!(e.execution_status, ExecutionStatus::Success);
        assert_eq!(e.occurred_at_ms, NOW);
        assert_eq!((e.input_tokens, e.output_tokens), (1200, 450));
        assert_eq!(e.execution_duration_ms, 542);
        // Neither a key nor a time: keyed by the instant it was received.
        assert_eq!(
            e.idempotency_key,
            format!("received:{NOW}:{}", derived_idempotency_key(SEED))
        );
        assert_eq!(e.legacy_idempotency_key, None);
        // With a time, by its content.
        let timed = timed(SEED);
        let e = check(&timed).unwrap();
        assert!(e.idempotency_key.starts_with("sha256v2:"));
        assert_eq!(e.idempotency_key, check(&timed).unwrap().idempotency_key);
        assert_eq!(
            e.legacy_idempotency_key,
            Some(legacy_derived_idempotency_key(&timed))
        );
    }

    /// `raw` with `occurredAt` set to NOW.
    fn timed(raw: &str) -> String {
        raw.replacen('{', &format!("{{\"occurredAt\":\"{}\",", format_ms(NOW)), 1)
    }

    /// Swagger's "Try it out" sends the fields in its own order and pretty-printed; a client
    /// may add a space. Without an idempotencyKey (and with occurredAt) those are still one
    /// event.
    #[test]
    fn the_derived_key_ignores_spacing_field_order_and_number_spelling() {
        let key = |raw: &str| check(&timed(raw)).unwrap().idempotency_key;
        let reordered = r#"{
  "metadata": { "outputTokens": 450, "inputTokens": 1200 },
  "executionDurationMs": 542.0,
  "agentId": "agent_gpt4o_prod",
  "sessionId": "sess_abc123",
  "toolName": "web_search",
  "productType": "MCP_SERVER",
  "metricName": "mcp_server.tool_invocations"
}"#;
        assert_eq!(key(SEED), key(reordered));
        assert_eq!(key(SEED), key(&SEED.replace(",", ", ")));
        // Other content is another event; so is another value inside metadata.
        assert_ne!(key(SEED), key(&SEED.replace("542", "543")));
        assert_ne!(key(SEED), key(&SEED.replace("450", "451")));
        // The legacy key is still the bytes' own, so stored events keep catching their retries.
        assert_ne!(
            check(&timed(reordered)).unwrap().legacy_idempotency_key,
            check(&timed(SEED)).unwrap().legacy_idempotency_key
        );
        let mut canonical = String::new();
        canonical_json(
            &serde_json::from_str(r#"{"b":[1.0,2.5,"x\"y"],"a":null}"#).unwrap(),
            &mut canonical,
        );
        assert_eq!(canonical, r#"{"a":null,"b":[1,2.5,"x\"y"]}"#);
    }

    #[test]
    fn missing_required_fields_are_named() {
        let err = check(r#"{"toolName":"x"}"#).unwrap_err();
        assert_eq!(err, "metricName is required");
        let err = check(r#"{"metricName":"m"}"#).unwrap_err();
        assert_eq!(err, "toolName is required for productType MCP_SERVER");
        // Other products need no tool.
        assert!(check(r#"{"metricName":"m","productType":"API"}"#).is_ok());
    }

    #[test]
    fn wrong_types_name_the_field() {
        let err = check(&with("quantity", r#""two""#)).unwrap_err();
        assert!(err.starts_with("quantity: invalid type: string"), "{err}");
        let err = check(&with("toolName", "42")).unwrap_err();
        assert!(err.starts_with("toolName: invalid type: integer"), "{err}");
        let err = check("[1]").unwrap_err();
        assert!(err.contains("must be a JSON object"), "{err}");
    }

    #[test]
    fn lengths_count_utf16_units_like_the_sdks() {
        assert!(check(&with("agentId", &format!("\"{}\"", "a".repeat(36)))).is_ok());
        let err = check(&with("agentId", &format!("\"{}\"", "a".repeat(37)))).unwrap_err();
        assert_eq!(err, "agentId is 37 characters; the limit is 36");
        // 18 emoji are 36 UTF-16 units (72 bytes): at the limit.
        assert!(check(&with("agentId", &format!("\"{}\"", "😀".repeat(18)))).is_ok());
        assert!(check(&with("agentId", &format!("\"{}\"", "😀".repeat(19)))).is_err());
        // 36 two-byte characters are 36 units: allowed although 72 bytes.
        assert!(check(&with("agentId", &format!("\"{}\"", "é".repeat(36)))).is_ok());
    }

    #[test]
    fn a_fitted_name_passes_the_check_and_stays_apart_from_others() {
        assert_eq!(fit_text("claude-code", 36), "claude-code");
        assert_eq!(fit_text("a\u{0}b", 36), "a?b");
        let long_a = format!("{}a", "😀".repeat(40));
        let long_b = format!("{}b", "😀".repeat(40));
        for max in [36, 64] {
            let (a, b) = (fit_text(&long_a, max), fit_text(&long_b, max));
            assert!(check_text("agentId", &a, max).is_ok(), "{a}");
            assert_ne!(a, b, "two long names sharing a prefix stay two");
            assert!(a.starts_with("😀") && a.contains('~'), "{a}");
        }
    }

    #[test]
    fn control_characters_are_refused() {
        let err = check(&with("sessionId", r#""a\u0000b""#)).unwrap_err();
        assert_eq!(
            err,
            "sessionId contains the control character U+0000; remove it"
        );
    }

    #[test]
    fn numbers_are_range_checked() {
        assert!(check(&with("quantity", "0"))
            .unwrap_err()
            .contains("greater than 0"));
        assert!(check(&with("quantity", "-1")).is_err());
        assert_eq!(
            check(&with("quantity", "1.0")).unwrap().quantity,
            Quantity::ONE
        );
        // Python's json.dumps(0.000001) is `1e-06`: the smallest quantity, in any spelling.
        for tiny in ["1e-06", "0.000001", "1E-6", "0.1e-5"] {
            assert_eq!(
                check(&with("quantity", tiny)).unwrap().quantity.scaled(),
                1,
                "{tiny}"
            );
        }
        assert_eq!(
            check(&with("quantity", "1e9")).unwrap().quantity,
            Quantity::MAX
        );
        let err = check(&with("quantity", "1e-07")).unwrap_err();
        assert!(err.contains("more than 6 decimal places"), "{err}");
        assert_eq!(
            check(&with("quantity", "1.23456789e2"))
                .unwrap()
                .quantity
                .scaled(),
            123_456_789
        );
        let err = check(&with("quantity", "1.234567891e2")).unwrap_err();
        assert!(err.contains("more than 6 decimal places"), "{err}");
        let err = check(&with("quantity", "2e9")).unwrap_err();
        assert!(err.contains("at most 1000000000"), "{err}");
        assert!(check(&with("executionDurationMs", "-5"))
            .unwrap_err()
            .contains("0 or more"));
        assert!(check(&with("executionDurationMs", "1.5"))
            .unwrap_err()
            .contains("whole number"));
        assert_eq!(
            check(&with("executionDurationMs", "542.0"))
                .unwrap()
                .execution_duration_ms,
            542
        );
        assert!(check(&with("executionDurationMs", "1e300")).is_err());
        let err = check(&with("metadata", r#"{"inputTokens":-3}"#)).unwrap_err();
        assert_eq!(err, "metadata.inputTokens must be 0 or more (got -3)");
        let err = check(&with("metadata", r#"{"inputTokens":"12"}"#)).unwrap_err();
        assert_eq!(
            err,
            "metadata.inputTokens: invalid type: string \"12\", expected a JSON number"
        );
        let err = check(&with("metadata", r#"[1,2]"#)).unwrap_err();
        assert_eq!(err, "metadata must be a JSON object");
        let err = check(&with(
            "metadata",
            &format!(r#"{{"x":"{}"}}"#, "y".repeat(2000)),
        ))
        .unwrap_err();
        assert!(err.starts_with("metadata is 2008 bytes"), "{err}");
    }

    #[test]
    fn timestamps_must_be_rfc3339_and_recent() {
        let at = |t: &str| check(&with("occurredAt", &format!("\"{t}\"")));
        assert_eq!(at("2026-11-18T11:06:40Z").unwrap().occurred_at_ms, NOW);
        assert_eq!(
            at("2026-11-18T12:06:40.000+01:00").unwrap().occurred_at_ms,
            NOW
        );
        assert!(at("yesterday").unwrap_err().contains("RFC 3339"));
        assert!(at("2026-09-01T00:00:00Z")
            .unwrap_err()
            .contains("35 days old"));
        assert!(at("2026-11-18T11:20:00Z").unwrap_err().contains("future"));
    }

    #[test]
    fn statuses_are_the_eleven_in_any_case() {
        assert_eq!(
            check(&with("executionStatus", r#"" timeout ""#))
                .unwrap()
                .execution_status,
            ExecutionStatus::Timeout
        );
        let err = check(&with("executionStatus", r#""EXPLODED""#)).unwrap_err();
        assert!(
            err.starts_with("executionStatus `EXPLODED` is not one of SUCCESS"),
            "{err}"
        );
        assert!(ExecutionStatus::Timeout.is_error());
        assert!(!ExecutionStatus::Cancelled.is_error());
    }

    #[test]
    fn heartbeats_need_a_session_but_no_tool() {
        let hb = r#"{"metricName":"system.session.heartbeat","sessionId":"s1","sessionBoundary":"HEARTBEAT","quantity":1}"#;
        assert!(check(hb).unwrap().is_heartbeat());
        let err = check(r#"{"metricName":"system.session.heartbeat"}"#).unwrap_err();
        assert!(err.starts_with("sessionId is required on a heartbeat"));
    }

    #[test]
    fn unknown_fields_are_ignored_and_keys_kept() {
        let e =
            check(&with("idempotencyKey", r#""k-1""#).replace('{', r#"{"extra":[1],"#)).unwrap();
        assert_eq!(e.idempotency_key, "k-1");
    }

    #[test]
    fn bus_keys_separate_tenants_and_keys() {
        assert_eq!(bus_key("t", "k"), bus_key("t", "k"));
        assert_ne!(bus_key("t", "k"), bus_key("u", "k"));
        assert_ne!(bus_key("ab", "c"), bus_key("a", "bc"));
    }

    #[test]
    fn bus_events_read_back_what_was_written() {
        let e = crate::event::RatedEvent::sample_call("k", NOW);
        let text = serde_json::to_string(&BusEventRef {
            tenant_id: "t",
            event: &e,
        })
        .unwrap();
        assert!(
            text.starts_with(r#"{"tenantId":"t","event":{"idempotencyKey":"k""#),
            "{text}"
        );
        let back: BusEvent = serde_json::from_str(&text).unwrap();
        assert_eq!((back.tenant_id.as_str(), back.event), ("t", e));
    }

    #[test]
    fn time_formats_as_rfc3339_millis() {
        assert_eq!(format_ms(NOW), "2026-11-18T11:06:40.000Z");
    }
}
