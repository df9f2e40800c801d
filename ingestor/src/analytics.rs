//! `GET /analytics/mcp/...`: usage read back from the rollups, always the caller's tenant only.

use crate::auth::Grant;
use crate::error::{ApiError, ErrorBody, ReadErrors};
use crate::AppState;
use actix_web::{web, HttpRequest, HttpResponse};
use backends::store::SessionQuery;
use schemas::analytics::{
    ByAgentReport, ByToolReport, DateRange, SessionDetail, SessionsReport, SummaryReport,
};
use schemas::config::Scope;
use serde::Deserialize;
use std::sync::Arc;
use utoipa::IntoParams;

/// Sessions returned when a request names no `limit`, and the most it may ask for.
const DEFAULT_SESSIONS: usize = 100;
const MAX_SESSIONS: usize = 1000;

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RangeParams {
    /// First day, `YYYY-MM-DD` (or RFC 3339), inclusive; default 30 days before `to`.
    #[param(format = Date)]
    from: Option<String>,
    /// Last day, inclusive; default today (UTC). At most 1098 days after `from`.
    #[param(format = Date)]
    to: Option<String>,
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[into_params(parameter_in = Query)]
pub struct SessionParams {
    /// First day, `YYYY-MM-DD` (or RFC 3339), inclusive; default 30 days before `to`.
    #[param(format = Date)]
    from: Option<String>,
    /// Last day, inclusive; default today (UTC). At most 1098 days after `from`.
    #[param(format = Date)]
    to: Option<String>,
    /// Only this agent's sessions.
    agent_id: Option<String>,
    /// Most sessions returned (1 to 1000, default 100).
    #[param(minimum = 1, maximum = 1000)]
    #[serde(default, deserialize_with = "limit_param")]
    limit: Option<usize>,
}

/// `limit` as a whole number, or an error that names it.
fn limit_param<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    let Some(text) = Option::<String>::deserialize(d)? else {
        return Ok(None);
    };
    text.parse().map(Some).map_err(|_| {
        serde::de::Error::custom(format!(
            "limit `{text}` is not a whole number; give 1 to {MAX_SESSIONS}"
        ))
    })
}

/// The caller's tenant (with the `read` scope) and the range it asks about.
async fn tenant_and_range(
    state: &AppState,
    req: &HttpRequest,
    from: Option<&str>,
    to: Option<&str>,
) -> Result<(Arc<Grant>, DateRange), ApiError> {
    let grant = state.admit(req, Scope::Read).await?;
    let range = DateRange::parse(from, to, chrono::Utc::now().date_naive())
        .map_err(ApiError::BadRequest)?;
    Ok((grant, range))
}

/// Revenue, COGS and usage per tool over a range of days, highest revenue first.
#[utoipa::path(
    get, path = "/analytics/mcp/revenue/by-tool", tag = "analytics", params(RangeParams),
    responses(
        (status = 200, description = "One row per tool", body = ByToolReport, example = json!(
            {"from":"2026-11-21","to":"2026-11-21","tools":[{"toolName":"web_search","calls":1,"errors":0,"revenueMicros":7550,"cogsMicros":1529,"grossProfitMicros":6021,"margin":0.7975,"inputTokens":1200,"outputTokens":450,"durationMsSum":542,"avgDurationMs":542,"maxDurationMs":542,"sessions":1}]})),
        ReadErrors,
    ),
    security(("api_key" = []), ("bearer" = [])),
)]
pub async fn by_tool(
    state: web::Data<AppState>,
    req: HttpRequest,
    q: web::Query<RangeParams>,
) -> Result<HttpResponse, ApiError> {
    let (grant, range) = tenant_and_range(&state, &req, q.from.as_deref(), q.to.as_deref()).await?;
    let tools = state
        .analytics
        .revenue_by_tool(&grant.tenant.id, range)
        .await?;
    Ok(HttpResponse::Ok().json(ByToolReport {
        from: range.from_str_day(),
        to: range.to_str_day(),
        tools,
    }))
}

/// Usage per agent over a range of days, with a daily series, highest revenue first.
#[utoipa::path(
    get, path = "/analytics/mcp/by-agent", tag = "analytics", params(RangeParams),
    responses(
        (status = 200, description = "One row per agent", body = ByAgentReport, example = json!(
            {"from":"2026-11-21","to":"2026-11-21","agents":[{"agentId":"agent_gpt4o_prod","calls":1,"errors":0,"revenueMicros":7550,"cogsMicros":1529,"grossProfitMicros":6021,"margin":0.7975,"inputTokens":1200,"outputTokens":450,"durationMsSum":542,"avgDurationMs":542,"maxDurationMs":542,"sessions":1,"daily":[{"date":"2026-11-21","calls":1,"errors":0,"revenueMicros":7550,"cogsMicros":1529,"grossProfitMicros":6021,"margin":0.7975,"inputTokens":1200,"outputTokens":450,"durationMsSum":542,"avgDurationMs":542,"maxDurationMs":542,"sessions":1}]}]})),
        ReadErrors,
    ),
    security(("api_key" = []), ("bearer" = [])),
)]
pub async fn by_agent(
    state: web::Data<AppState>,
    req: HttpRequest,
    q: web::Query<RangeParams>,
) -> Result<HttpResponse, ApiError> {
    let (grant, range) = tenant_and_range(&state, &req, q.from.as_deref(), q.to.as_deref()).await?;
    let agents = state
        .analytics
        .usage_by_agent(&grant.tenant.id, range)
        .await?;
    Ok(HttpResponse::Ok().json(ByAgentReport {
        from: range.from_str_day(),
        to: range.to_str_day(),
        agents,
    }))
}

/// The tenant's totals over a range of days.
#[utoipa::path(
    get, path = "/analytics/mcp/summary", tag = "analytics", params(RangeParams),
    responses(
        (status = 200, description = "Totals, distinct sessions, tools and agents", body = SummaryReport, example = json!(
            {"from":"2026-11-21","to":"2026-11-21","calls":1,"errors":0,"revenueMicros":7550,"cogsMicros":1529,"grossProfitMicros":6021,"margin":0.7975,"inputTokens":1200,"outputTokens":450,"durationMsSum":542,"avgDurationMs":542,"maxDurationMs":542,"sessions":1,"tools":1,"agents":1})),
        ReadErrors,
    ),
    security(("api_key" = []), ("bearer" = [])),
)]
pub async fn summary(
    state: web::Data<AppState>,
    req: HttpRequest,
    q: web::Query<RangeParams>,
) -> Result<HttpResponse, ApiError> {
    let (grant, range) = tenant_and_range(&state, &req, q.from.as_deref(), q.to.as_deref()).await?;
    let summary = state.analytics.summary(&grant.tenant.id, range).await?;
    Ok(HttpResponse::Ok().json(SummaryReport {
        from: range.from_str_day(),
        to: range.to_str_day(),
        summary,
    }))
}

/// Sessions active in a range of days, most recently active first.
#[utoipa::path(
    get, path = "/analytics/mcp/sessions", tag = "analytics", params(SessionParams),
    responses(
        (status = 200, description = "Sessions", body = SessionsReport, example = json!(
            {"from":"2026-11-21","to":"2026-11-21","sessions":[{"sessionId":"sess_abc123","agentId":"agent_gpt4o_prod","firstSeen":"2026-11-21T09:30:00.000Z","lastSeen":"2026-11-21T09:30:00.000Z","ended":false,"tools":1,"calls":1,"errors":0,"revenueMicros":7550,"cogsMicros":1529,"grossProfitMicros":6021,"margin":0.7975,"inputTokens":1200,"outputTokens":450,"durationMsSum":542,"avgDurationMs":542,"maxDurationMs":542}]})),
        ReadErrors,
    ),
    security(("api_key" = []), ("bearer" = [])),
)]
pub async fn sessions(
    state: web::Data<AppState>,
    req: HttpRequest,
    q: web::Query<SessionParams>,
) -> Result<HttpResponse, ApiError> {
    let (grant, range) = tenant_and_range(&state, &req, q.from.as_deref(), q.to.as_deref()).await?;
    let limit = q.limit.unwrap_or(DEFAULT_SESSIONS);
    if !(1..=MAX_SESSIONS).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit must be 1 to {MAX_SESSIONS} (got {limit})"
        )));
    }
    let query = SessionQuery {
        range,
        agent_id: q.agent_id.clone(),
        limit,
    };
    let sessions = state.analytics.sessions(&grant.tenant.id, query).await?;
    Ok(HttpResponse::Ok().json(SessionsReport {
        from: range.from_str_day(),
        to: range.to_str_day(),
        sessions,
    }))
}

/// One session with its per-tool breakdown.
#[utoipa::path(
    get, path = "/analytics/mcp/sessions/{sessionId}", tag = "analytics",
    params(("sessionId" = String, Path, description = "The session's id, as the SDK sent it")),
    responses(
        (status = 200, description = "The session", body = SessionDetail, example = json!(
            {"sessionId":"sess_abc123","agentId":"agent_gpt4o_prod","firstSeen":"2026-11-21T09:30:00.000Z","lastSeen":"2026-11-21T09:30:00.000Z","ended":false,"tools":1,"calls":1,"errors":0,"revenueMicros":7550,"cogsMicros":1529,"grossProfitMicros":6021,"margin":0.7975,"inputTokens":1200,"outputTokens":450,"durationMsSum":542,"avgDurationMs":542,"maxDurationMs":542,"byTool":[{"toolName":"web_search","calls":1,"errors":0,"revenueMicros":7550,"cogsMicros":1529,"grossProfitMicros":6021,"margin":0.7975,"inputTokens":1200,"outputTokens":450,"durationMsSum":542,"avgDurationMs":542,"maxDurationMs":542}]})),
        (status = 404, description = "The tenant has no such session", body = ErrorBody),
        ReadErrors,
    ),
    security(("api_key" = []), ("bearer" = [])),
)]
pub async fn session(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let grant = state.admit(&req, Scope::Read).await?;
    let session_id = path.into_inner();
    match state
        .analytics
        .session(&grant.tenant.id, &session_id)
        .await?
    {
        Some(detail) => Ok(HttpResponse::Ok().json(detail)),
        None => Err(ApiError::NotFound(format!(
            "no session `{session_id}` for this tenant"
        ))),
    }
}
