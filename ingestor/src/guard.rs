//! `GET /v1/guard/check`, the pre-execution hook, and the health endpoints.
//!
//! The check reads the guard state only (one round trip to Redis, or a lock in memory), never
//! the store, so SDKs and gateways can call it before every tool call. When the state cannot
//! be read it answers `allow` with `degraded: true`: the same thing a gateway that fails open
//! on a timeout does, but said out loud.

use crate::error::ApiError;
use crate::AppState;
use actix_web::{web, HttpRequest, HttpResponse};
use schemas::config::Scope;
use schemas::guard::GuardCheck;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicI64, Ordering};

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CheckParams {
    /// The agent about to call a tool.
    agent_id: Option<String>,
    /// The tool about to be called.
    tool_name: Option<String>,
    /// The session the call belongs to; a killed session is blocked.
    session_id: Option<String>,
}

/// `GET /v1/guard/check?agentId=&toolName=&sessionId=` (any of them; at least one).
pub async fn check(
    state: web::Data<AppState>,
    req: HttpRequest,
    q: web::Query<CheckParams>,
) -> Result<HttpResponse, ApiError> {
    let grant = state.keys.authorize(&req, Scope::Ingest)?;
    let (agent, tool, session) = (
        named(&q.agent_id),
        named(&q.tool_name),
        named(&q.session_id),
    );
    if agent.is_none() && tool.is_none() && session.is_none() {
        return Err(ApiError::BadRequest(
            "name what is about to run: at least one of agentId, toolName, sessionId".into(),
        ));
    }
    let now_ms = chrono::Utc::now().timestamp_millis();
    let answer = match state
        .guard
        .view(&grant.tenant.id, agent, tool, session, now_ms)
        .await
    {
        Ok(view) => GuardCheck::decide(view, now_ms, state.guard_recompute_seconds),
        Err(e) => {
            warn_state_unavailable(&e);
            GuardCheck::degraded(&e.to_string())
        }
    };
    Ok(HttpResponse::Ok().json(answer))
}

fn named(v: &Option<String>) -> Option<&str> {
    v.as_deref().filter(|s| !s.is_empty())
}

/// Logs that the guard state is unavailable at most every few seconds: during an outage every
/// request would say so.
pub(crate) fn warn_state_unavailable(e: &backends::state::StateError) {
    static LAST_MS: AtomicI64 = AtomicI64::new(0);
    const EVERY_MS: i64 = 5_000;
    let now = chrono::Utc::now().timestamp_millis();
    let last = LAST_MS.load(Ordering::Relaxed);
    if now - last >= EVERY_MS
        && LAST_MS
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        tracing::warn!(error = %e, "guard state unavailable: limits are not enforced and guard checks fail open until it is back");
    }
}

/// `GET /healthz`: the process answers.
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "status": "ok" }))
}

#[derive(Serialize)]
struct Dependency {
    name: &'static str,
    ready: bool,
    /// What the process does without it.
    without_it: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// `GET /readyz`: each dependency's state. The guard state is not needed to accept usage, so
/// its loss answers 200 with `status: degraded` (a load balancer keeps sending events) and
/// names it.
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let guard = state.guard.ping().await;
    let dependencies = [Dependency {
        name: state.guard.kind(),
        ready: guard.is_ok(),
        without_it: "ingest goes on; hard limits are not enforced and guard checks answer allow with degraded: true",
        error: guard.err().map(|e| e.to_string()),
    }];
    let degraded: Vec<&str> = dependencies
        .iter()
        .filter(|d| !d.ready)
        .map(|d| d.name)
        .collect();
    let status = if degraded.is_empty() {
        "ready"
    } else {
        "degraded"
    };
    HttpResponse::Ok().json(serde_json::json!({
        "status": status,
        "degraded": degraded,
        "dependencies": dependencies,
    }))
}
