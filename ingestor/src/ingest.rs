//! `POST /v1/ingest/batch` and `POST /v1/ingest/events`: authenticate, validate, rate, publish,
//! and answer 202 only once the sink says the events are durable.

use crate::auth::{Caller, Tenant};
use crate::body::{body_error, Whole};
use crate::credits;
use crate::error::{ApiError, IngestErrors};
use crate::limits;
use crate::metrics::METRICS;
use crate::state::AppState;
use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use backends::sink::TenantBatch;
use schemas::config::Scope;
use schemas::event::{
    keyed_by_receipt, parse_event, validate, EventLimits, RatedEvent, TimeBounds,
};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::collections::HashSet;
use std::sync::Arc;
use utoipa::ToSchema;

/// The answer to an ingest request, as the Aforo SDKs read it.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct IngestAnswer {
    /// Events stored by this request.
    pub accepted: usize,
    /// Events whose idempotency key was already stored; nothing changed for them.
    pub duplicates: usize,
    /// Events refused; each is listed in `errors`.
    pub failed: usize,
    pub errors: Vec<EventError>,
    /// The sessions this request's events name that the client must stop (killed by a hard
    /// limit, until its window ends). Only those: a tenant may have thousands killed, and each
    /// client asks about its own sessions.
    pub killed_session_ids: Vec<String>,
    /// Events accepted with something to fix, each with what (absent when none): an event
    /// with neither `idempotencyKey` nor `occurredAt` is keyed by the instant it was received,
    /// so a retry of it is counted again.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<EventError>,
}

/// Why one event of a request was refused.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventError {
    /// The event's position in the request, from 0.
    pub index: usize,
    pub message: String,
}

/// The warning of an event keyed by the instant it was received.
const KEYED_BY_RECEIPT: &str = "no idempotencyKey and no occurredAt: stored as one call received now; a retry of this event would be counted again: send an idempotencyKey (or at least occurredAt)";

#[derive(Deserialize)]
struct BatchBody<'a> {
    #[serde(borrow)]
    events: Option<Vec<&'a RawValue>>,
}

/// Usage events, `{"events":[Event, ...]}` (1 to 1000). Answered 202 only once every accepted
/// event is durable; a bad event fails alone, listed in `errors`.
#[utoipa::path(
    post, path = "/v1/ingest/batch", tag = "ingest",
    request_body(content = schemas::openapi::EventBatchSchema, content_type = "application/json"),
    responses(
        (status = 202, description = "Durable; with per-event errors and the sessions to stop", body = IngestAnswer, example = json!(
            {"accepted":1,"duplicates":0,"failed":1,"errors":[{"index":1,"message":"executionDurationMs must be 0 or more (got -5)"}],"killedSessionIds":[]})),
        IngestErrors,
    ),
    security(("api_key" = []), ("bearer" = [])),
)]
pub async fn batch(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: Whole,
) -> Result<HttpResponse, ApiError> {
    let caller = state.authenticate(&req, Scope::Ingest).await?;
    match first_byte(&body) {
        Some(b'{') => {}
        Some(b'[') => return Err(ApiError::BadRequest(
            "POST /v1/ingest/batch takes an object {\"events\":[...]}; send a bare array to /v1/ingest/events".into(),
        )),
        _ => return Err(ApiError::BadRequest(
            "POST /v1/ingest/batch takes a JSON object {\"events\":[...]}".into(),
        )),
    }
    let parsed: BatchBody = serde_json::from_slice(&body).map_err(|e| body_error(&e))?;
    let events = parsed.events.ok_or_else(|| {
        ApiError::BadRequest("the body has no `events` array; send {\"events\":[...]}".into())
    })?;
    ingest(&state, caller, events).await
}

/// One event object, or a JSON array of 1 to 1000 events: what the Aforo SDKs post. Answered
/// like `/v1/ingest/batch`.
#[utoipa::path(
    post, path = "/v1/ingest/events", tag = "ingest",
    request_body(content = schemas::openapi::EventOrEvents, content_type = "application/json"),
    responses(
        (status = 202, description = "Durable; with per-event errors and the sessions to stop", body = IngestAnswer, example = json!(
            {"accepted":1,"duplicates":0,"failed":0,"errors":[],"killedSessionIds":[]})),
        IngestErrors,
    ),
    security(("api_key" = []), ("bearer" = [])),
)]
pub async fn events(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: Whole,
) -> Result<HttpResponse, ApiError> {
    let caller = state.authenticate(&req, Scope::Ingest).await?;
    let events: Vec<&RawValue> = match first_byte(&body) {
        Some(b'[') => serde_json::from_slice(&body).map_err(|e| body_error(&e))?,
        Some(b'{') => vec![serde_json::from_slice(&body).map_err(|e| body_error(&e))?],
        _ => {
            return Err(ApiError::BadRequest(
                "the body must be one event object or a JSON array of events".into(),
            ))
        }
    };
    ingest(&state, caller, events).await
}

async fn ingest(
    state: &AppState,
    caller: Arc<Caller>,
    events: Vec<&RawValue>,
) -> Result<HttpResponse, ApiError> {
    let max = state.ingest.max_batch_events;
    if events.is_empty() {
        return Err(ApiError::BadRequest(format!(
            "the request has no events; send 1 to {max}"
        )));
    }
    if events.len() > max {
        return Err(ApiError::BadRequest(format!(
            "the request has {} events; the limit is {max}: split it into several requests",
            events.len()
        )));
    }
    let received_at_ms = chrono::Utc::now().timestamp_millis();
    let bounds = TimeBounds {
        received_at_ms,
        max_age_ms: i64::from(state.ingest.max_event_age_days) * 86_400_000,
        max_future_skew_ms: i64::from(state.ingest.max_future_skew_seconds) * 1000,
    };
    let limits = EventLimits {
        max_metadata_bytes: state.ingest.max_metadata_bytes,
    };
    let mut rated: Vec<RatedEvent> = Vec::with_capacity(events.len());
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    for (index, raw) in events.iter().enumerate() {
        let raw = raw.get();
        let mut by_receipt = false;
        let event = parse_event(raw)
            .and_then(|wire| {
                by_receipt = keyed_by_receipt(&wire);
                validate(wire, raw, bounds, limits)
            })
            .and_then(|valid| caller.tenant.rate_plans.rate(valid, received_at_ms));
        match event {
            Ok(mut event) => {
                if by_receipt {
                    // Two such events in one request share the instant: their place tells
                    // them apart.
                    event.idempotency_key.push_str(&format!(":{index}"));
                    warnings.push(EventError {
                        index,
                        message: KEYED_BY_RECEIPT.into(),
                    });
                }
                rated.push(event);
            }
            Err(message) => errors.push(EventError { index, message }),
        }
    }
    let tenant = &caller.tenant;
    let refused = limits::refused_tool_names(state.limits.as_ref(), tenant, &rated).await;
    if !refused.is_empty() {
        // The rated events are those of the request without an error, in its order.
        let failed: HashSet<usize> = errors.iter().map(|e| e.index).collect();
        let positions = (0..events.len()).filter(|i| !failed.contains(i));
        let mut kept = Vec::with_capacity(rated.len());
        for (event, index) in rated.into_iter().zip(positions) {
            if event.is_call() && refused.contains(&event.tool_name) {
                errors.push(EventError {
                    index,
                    message: limits::refused_tool_message(tenant, &event.tool_name),
                });
            } else {
                kept.push(event);
            }
        }
        rated = kept;
        errors.sort_by_key(|e| e.index);
        let refused_at: HashSet<usize> = errors.iter().map(|e| e.index).collect();
        warnings.retain(|w| !refused_at.contains(&w.index));
    }
    let named = named_sessions(tenant, &rated);
    let mut plan = limits::Plan::new(&tenant.id, &tenant.limits, &rated, received_at_ms);
    let mut charges = credits::settlements(tenant, &rated, received_at_ms);
    let outcome = state
        .sink
        .publish(TenantBatch::new(tenant.id.clone(), rated))
        .await?;
    // Where the sink says which events were stored before (a store writer), those charge
    // nothing, however long ago they came; elsewhere the claim of each key decides.
    if let Some(repeated) = outcome.repeated.as_ref().filter(|r| !r.is_empty()) {
        let repeated: HashSet<usize> = repeated.iter().copied().collect();
        charges.stored_before(&repeated);
        plan.keep_only(|event| !repeated.contains(&event));
    }
    METRICS.ingest_events_accepted.add(outcome.accepted as u64);
    METRICS
        .ingest_events_duplicate
        .add(outcome.duplicates as u64);
    METRICS.ingest_events_failed.add(errors.len() as u64);
    Ok(HttpResponse::Accepted().json(IngestAnswer {
        accepted: outcome.accepted,
        duplicates: outcome.duplicates,
        failed: errors.len(),
        errors,
        killed_session_ids: enforce(state, tenant, plan, &charges, &named, received_at_ms).await,
        warnings,
    }))
}

/// The sessions `events` name, sorted and distinct, whose kills their answer lists; none when
/// the tenant has no limit (only limits kill sessions).
fn named_sessions(tenant: &Tenant, events: &[RatedEvent]) -> Vec<String> {
    if tenant.limits.is_empty() {
        return Vec::new();
    }
    let mut named: Vec<String> = events
        .iter()
        .filter(|e| !e.session_id.is_empty())
        .map(|e| e.session_id.clone())
        .collect();
    named.sort();
    named.dedup();
    named
}

/// Charges the durable batch once per event key: settles its calls (their reservations end,
/// their revenue is charged to their customers), counts those charged for the first time
/// against the tenant's limits, and answers the sessions of `named` the client must stop. A
/// batch re-sent after a lost 202 is charged nothing more. The guard state being down never
/// fails ingest: the usage is stored already, and the answer lists no kills until the state is
/// back.
async fn enforce(
    state: &AppState,
    tenant: &Tenant,
    mut plan: limits::Plan,
    charges: &credits::BatchCharges,
    named: &[String],
    now_ms: i64,
) -> Vec<String> {
    let Some(charged_now) = credits::settle(state, tenant, &charges.settlements, now_ms).await
    else {
        return Vec::new();
    };
    // Only limits kill sessions: a tenant without any needs no round trip to the state.
    if tenant.limits.is_empty() {
        return Vec::new();
    }
    let first_time: HashSet<usize> = charges
        .events
        .iter()
        .zip(&charged_now)
        .filter(|(_, now)| **now)
        .map(|(event, _)| *event)
        .collect();
    plan.keep_only(|event| first_time.contains(&event));
    let guard = state.limits.as_ref();
    let answer = async {
        plan.apply(guard, &tenant.id, now_ms).await?;
        if named.is_empty() {
            return Ok(Vec::new());
        }
        guard.killed_among(&tenant.id, named, now_ms).await
    };
    match answer.await {
        Ok(killed) => killed,
        Err(e) => {
            // The keys are claimed but their limit charges may not have landed: the ledger
            // is rebuilt from the store, whose counters count these calls.
            crate::guard::warn_state_unavailable(&e);
            credits::forget_soon(state, tenant).await;
            Vec::new()
        }
    }
}

/// Refuses a Content-Type other than JSON (`application/json` or `…+json`); none is JSON.
pub(crate) fn json_content_type(req: &HttpRequest) -> Result<(), ApiError> {
    if let Some(content_type) = req.headers().get(header::CONTENT_TYPE) {
        let text = content_type.to_str().unwrap_or("");
        let mime = text
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if mime != "application/json" && !mime.ends_with("+json") {
            return Err(ApiError::UnsupportedMediaType(text.to_string()));
        }
    }
    Ok(())
}

fn first_byte(body: &[u8]) -> Option<u8> {
    body.iter().copied().find(|b| !b.is_ascii_whitespace())
}
