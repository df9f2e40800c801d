//! `GET /v1/guard/check`, the pre-execution hook, and `GET /v1/guard/states`, what the margin
//! guard last computed for a tenant.
//!
//! The check reads the guard state only (one round trip to Redis, or a lock in memory), never
//! the store, so SDKs and gateways can call it before every tool call. When the state cannot
//! be read it answers `allow` with `degraded: true`: the same thing a gateway that fails open
//! on a timeout does, but said out loud.

use crate::error::{ApiError, ErrorBody};
use crate::state::AppState;
use actix_web::{web, HttpRequest, HttpResponse};
use backends::metrics::LogThrottle;
use schemas::config::Scope;
use schemas::guard::{GuardCheck, GuardStates};
use serde::Deserialize;
use utoipa::IntoParams;

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[into_params(parameter_in = Query)]
pub struct CheckParams {
    /// The agent about to call a tool.
    agent_id: Option<String>,
    /// The tool about to be called.
    tool_name: Option<String>,
    /// The session the call belongs to; a killed session is blocked.
    session_id: Option<String>,
}

/// Before a tool runs: may it? From the guard state only (margin levels, kills), never the
/// store. Name at least one of agentId, toolName, sessionId. Fail open on a timeout.
///
/// The figures behind the answer (`margin`, `agent`, `tool`, and the margin, revenue and COGS
/// in `reason`) come only with a key that has the `read` scope (or `admin`). An ingest-only
/// key, what SDKs and proxies hold, gets the level, the action, `retryAfterSeconds`,
/// `degraded`, `sessionKilled` and a reason without figures, such as
/// "L2_THROTTLE: tool `tool_1` is throttled by the operator's margin guard".
#[utoipa::path(
    get, path = "/v1/guard/check", tag = "guard", params(CheckParams),
    responses(
        (status = 200, description = "What to do with the call; the figures (`margin`, `agent`, `tool`, and those in `reason`) only for a key with the `read` scope", body = GuardCheck, example = json!(
            {"level":"L2_THROTTLE","action":"throttle","retryAfterSeconds":1,"margin":0.05,"reason":"L2_THROTTLE: tool `tool_1`: margin 5.00% over the last 7 day(s) (revenue 1000 µUSD, COGS 950 µUSD)","degraded":false,"sessionKilled":false,"agent":{"subject":"agent","id":"agent_1","level":"L2_THROTTLE","margin":0.05,"revenueMicros":1000,"cogsMicros":950,"windowDays":7,"computedAt":"2026-11-21T12:15:42.747Z"},"tool":{"subject":"tool","id":"tool_1","level":"L2_THROTTLE","margin":0.05,"revenueMicros":1000,"cogsMicros":950,"windowDays":7,"computedAt":"2026-11-21T12:15:42.747Z"}})),
        (status = 400, description = "Bad parameters; `message` says which and how to fix them", body = ErrorBody),
        (status = 401, description = "No API key, or an unknown one", body = ErrorBody),
        (status = 403, description = "The key lacks the `ingest` scope, or X-Tenant-Id names another tenant", body = ErrorBody),
        (status = 429, description = "This API key is over its rate limit", body = ErrorBody,
            headers(("Retry-After" = u32, description = "Seconds until the key may send again"))),
    ),
    security(("api_key" = []), ("bearer" = [])),
)]
pub async fn check(
    state: web::Data<AppState>,
    req: HttpRequest,
    q: web::Query<CheckParams>,
) -> Result<HttpResponse, ApiError> {
    let caller = state.authenticate(&req, Scope::Ingest).await?;
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
        .margins
        .view(&caller.tenant.id, agent, tool, session, now_ms)
        .await
    {
        Ok(view) => GuardCheck::decide(view, now_ms, state.guard_recompute_seconds),
        Err(e) => {
            warn_state_unavailable(&e);
            GuardCheck::degraded(&e.to_string())
        }
    };
    // Margins, revenue and COGS are the operator's: an ingest key often sits on a machine the
    // end user can reach.
    if caller.allows(Scope::Read) {
        Ok(HttpResponse::Ok().json(answer))
    } else {
        Ok(HttpResponse::Ok().json(answer.without_figures()))
    }
}

/// The current margin levels (OK, L1_WARN, L2_THROTTLE, L3_BLOCK) of the tenant's agents and
/// tools, as the margin guard last wrote them to the guard state. Not for portal tokens:
/// margins are the operator's.
#[utoipa::path(
    get, path = "/v1/guard/states", tag = "guard",
    responses(
        (status = 200, description = "Agents' and tools' margin states", body = GuardStates, example = json!(
            {"agents":[{"subject":"agent","id":"agent_1","level":"OK","margin":0.7975,"revenueMicros":7550,"cogsMicros":1529,"windowDays":7,"computedAt":"2026-11-21T12:15:42.747Z"}],"tools":[{"subject":"tool","id":"web_search","level":"OK","margin":0.7975,"revenueMicros":7550,"cogsMicros":1529,"windowDays":7,"computedAt":"2026-11-21T12:15:42.747Z"}]})),
        (status = 401, description = "No API key, or an unknown one", body = ErrorBody),
        (status = 403, description = "The key lacks the `read` scope, or is a portal token", body = ErrorBody),
        (status = 503, description = "The guard state cannot be read; retry", body = ErrorBody),
    ),
    security(("api_key" = []), ("bearer" = [])),
)]
pub async fn states(
    state: web::Data<AppState>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let caller = state.authenticate(&req, Scope::Read).await?;
    caller.not_portal("reading margin levels")?;
    let now_ms = chrono::Utc::now().timestamp_millis();
    let states = state.margins.margins(&caller.tenant.id, now_ms).await?;
    Ok(HttpResponse::Ok().json(GuardStates::of(states)))
}

fn named(v: &Option<String>) -> Option<&str> {
    v.as_deref().filter(|s| !s.is_empty())
}

/// Logs that the guard state is unavailable at most every few seconds: during an outage every
/// request would say so.
pub(crate) fn warn_state_unavailable(e: &dyn std::fmt::Display) {
    static LINES: LogThrottle = LogThrottle::new(std::time::Duration::from_secs(5));
    crate::metrics::METRICS.guard_state_errors.add(1);
    if LINES.due(chrono::Utc::now().timestamp_millis()).is_some() {
        tracing::warn!(error = %e, "guard state unavailable: limits are not enforced and guard checks fail open until it is back");
    }
}
