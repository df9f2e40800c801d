//! OpenAPI schemas of the bodies whose Rust types are not what the wire shows: the event as a
//! client sends it (read leniently by `WireEvent` so that every mistake gets its own message),
//! and the billing export's JSON (written piece by piece as it streams).
//!
//! These types are never built; they exist for utoipa. A test keeps their limits equal to the
//! ones validation enforces.

#![allow(dead_code)]

use serde::Serialize;
use utoipa::ToSchema;

/// One usage event: one MCP `tools/call`, or a session heartbeat. Unknown fields are ignored.
/// String lengths count UTF-16 code units, as the Aforo SDKs do; control characters are refused.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(
    as = Event,
    example = json!({"metricName": "mcp_server.tool_invocations", "productType": "MCP_SERVER",
        "toolName": "web_search", "sessionId": "sess_abc123", "agentId": "agent_gpt4o_prod",
        "executionDurationMs": 542, "metadata": {"inputTokens": 1200, "outputTokens": 450}})
)]
pub struct EventSchema {
    /// Deduplication key within the tenant; send one (an SDK's call id). Default: SHA-256 of the
    /// event's canonical JSON (members sorted, no whitespace), so two calls with equal content
    /// count once.
    #[schema(max_length = 255)]
    idempotency_key: Option<String>,
    /// `mcp_server.tool_invocations` for a call; `system.session.heartbeat` for a heartbeat.
    #[schema(max_length = 255)]
    metric_name: String,
    /// Default `MCP_SERVER`.
    #[schema(max_length = 20)]
    product_type: Option<String>,
    /// Required for `MCP_SERVER` calls.
    #[schema(max_length = 64)]
    tool_name: Option<String>,
    #[schema(max_length = 36)]
    agent_id: Option<String>,
    #[schema(max_length = 64)]
    customer_id: Option<String>,
    /// Required for a heartbeat.
    #[schema(max_length = 64)]
    session_id: Option<String>,
    /// RFC 3339; default: when it was received. At most `ingest.max_event_age_days` old and
    /// `ingest.max_future_skew_seconds` ahead.
    #[schema(format = DateTime)]
    occurred_at: Option<String>,
    /// Billable units, > 0, at most 10^9 with six decimals; default 1.
    #[schema(exclusive_minimum = 0, maximum = 1_000_000_000)]
    quantity: Option<f64>,
    /// SUCCESS (default), PARTIAL, TIMEOUT, ERROR, VALIDATION_FAILED, FAILED, FAILURE,
    /// CANCELLED, PENDING, BLOCKED or HITL_REQUIRED, in any case.
    execution_status: Option<String>,
    /// Whole milliseconds, 0 to 7 days.
    #[schema(minimum = 0, maximum = 604_800_000)]
    execution_duration_ms: Option<i64>,
    /// `HEARTBEAT` or `SESSION_END` on heartbeats.
    #[schema(max_length = 32)]
    session_boundary: Option<String>,
    /// Free-form, at most `ingest.max_metadata_bytes` of JSON; `inputTokens` and
    /// `outputTokens` (whole numbers) are rated.
    #[schema(value_type = Object)]
    metadata: Option<serde_json::Value>,
}

/// `POST /v1/ingest/batch`: 1 to 1000 events.
#[derive(Serialize, ToSchema)]
#[schema(as = EventBatch)]
pub struct EventBatchSchema {
    #[schema(min_items = 1, max_items = 1000)]
    events: Vec<EventSchema>,
}

/// `POST /v1/ingest/events`: one event, or an array of 1 to 1000.
pub struct EventOrEvents;

impl utoipa::PartialSchema for EventOrEvents {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ArrayBuilder, OneOfBuilder, Ref};
        let event = Ref::from_schema_name("Event");
        OneOfBuilder::new()
            .item(event.clone())
            .item(
                ArrayBuilder::new()
                    .items(event)
                    .min_items(Some(1))
                    .max_items(Some(crate::event::MAX_BATCH_EVENTS)),
            )
            .description(Some("One event, or an array of 1 to 1000."))
            .into()
    }
}

impl ToSchema for EventOrEvents {
    fn name() -> std::borrow::Cow<'static, str> {
        "EventOrEvents".into()
    }

    fn schemas(
        schemas: &mut Vec<(
            String,
            utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>,
        )>,
    ) {
        schemas.push((
            EventSchema::name().into(),
            <EventSchema as utoipa::PartialSchema>::schema(),
        ));
    }
}

/// `GET /v1/exports/billing?format=json`, with the figures `F` its reader sees (after `view`,
/// as every read answer has). `totals` comes last: an answer without it was cut short.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BillingExport<F> {
    /// `YYYY-MM`.
    period: String,
    /// Always `USD`.
    currency: String,
    /// Ordered by customer, agent and tool (bytewise).
    lines: Vec<crate::billing::ExportLine<'static, F>>,
    line_count: i64,
    /// The sums of the lines; equal to `/analytics/mcp/summary` over the period's days.
    totals: F,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::*;
    use utoipa::PartialSchema;

    #[test]
    fn the_documented_limits_are_the_enforced_ones() {
        let schema = serde_json::to_value(EventSchema::schema()).unwrap();
        let max = |field: &str| schema["properties"][field]["maxLength"].as_u64().unwrap() as usize;
        assert_eq!(max("idempotencyKey"), MAX_IDEMPOTENCY_KEY_LEN);
        assert_eq!(max("metricName"), MAX_METRIC_NAME_LEN);
        assert_eq!(max("productType"), MAX_PRODUCT_TYPE_LEN);
        assert_eq!(max("toolName"), MAX_TOOL_NAME_LEN);
        assert_eq!(max("agentId"), MAX_AGENT_ID_LEN);
        assert_eq!(max("customerId"), MAX_CUSTOMER_ID_LEN);
        assert_eq!(max("sessionId"), MAX_SESSION_ID_LEN);
        assert_eq!(max("sessionBoundary"), MAX_SESSION_BOUNDARY_LEN);
        assert_eq!(
            schema["properties"]["executionDurationMs"]["maximum"].as_i64(),
            Some(MAX_EXECUTION_DURATION_MS)
        );
        let batch = serde_json::to_value(EventBatchSchema::schema()).unwrap();
        assert_eq!(
            batch["properties"]["events"]["maxItems"].as_u64(),
            Some(MAX_BATCH_EVENTS as u64)
        );
    }
}
