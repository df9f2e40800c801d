//! `GET /analytics/mcp/...`: usage read back from the rollups, always the caller's tenant only.

use crate::auth::Grant;
use crate::error::ApiError;
use crate::AppState;
use actix_web::{web, HttpRequest, HttpResponse};
use backends::store::SessionQuery;
use schemas::analytics::{ByAgentReport, ByToolReport, DateRange, SessionsReport, SummaryReport};
use schemas::config::Scope;
use serde::Deserialize;

/// Sessions returned when a request names no `limit`, and the most it may ask for.
const DEFAULT_SESSIONS: usize = 100;
const MAX_SESSIONS: usize = 1000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RangeParams {
    /// First day, `YYYY-MM-DD` (or RFC 3339), inclusive; default 30 days before `to`.
    from: Option<String>,
    /// Last day, inclusive; default today (UTC).
    to: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SessionParams {
    from: Option<String>,
    to: Option<String>,
    /// Only this agent's sessions.
    agent_id: Option<String>,
    /// Most sessions returned (1 to 1000, default 100).
    limit: Option<usize>,
}

/// The caller's tenant (with the `read` scope) and the range it asks about.
fn tenant_and_range(
    state: &AppState,
    req: &HttpRequest,
    from: Option<&str>,
    to: Option<&str>,
) -> Result<(Grant, DateRange), ApiError> {
    let grant = state.keys.authorize(req, Scope::Read)?;
    let range = DateRange::parse(from, to, chrono::Utc::now().date_naive())
        .map_err(ApiError::BadRequest)?;
    Ok((grant, range))
}

/// `GET /analytics/mcp/revenue/by-tool`
pub async fn by_tool(
    state: web::Data<AppState>,
    req: HttpRequest,
    q: web::Query<RangeParams>,
) -> Result<HttpResponse, ApiError> {
    let (grant, range) = tenant_and_range(&state, &req, q.from.as_deref(), q.to.as_deref())?;
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

/// `GET /analytics/mcp/by-agent`
pub async fn by_agent(
    state: web::Data<AppState>,
    req: HttpRequest,
    q: web::Query<RangeParams>,
) -> Result<HttpResponse, ApiError> {
    let (grant, range) = tenant_and_range(&state, &req, q.from.as_deref(), q.to.as_deref())?;
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

/// `GET /analytics/mcp/summary`
pub async fn summary(
    state: web::Data<AppState>,
    req: HttpRequest,
    q: web::Query<RangeParams>,
) -> Result<HttpResponse, ApiError> {
    let (grant, range) = tenant_and_range(&state, &req, q.from.as_deref(), q.to.as_deref())?;
    let summary = state.analytics.summary(&grant.tenant.id, range).await?;
    Ok(HttpResponse::Ok().json(SummaryReport {
        from: range.from_str_day(),
        to: range.to_str_day(),
        summary,
    }))
}

/// `GET /analytics/mcp/sessions`
pub async fn sessions(
    state: web::Data<AppState>,
    req: HttpRequest,
    q: web::Query<SessionParams>,
) -> Result<HttpResponse, ApiError> {
    let (grant, range) = tenant_and_range(&state, &req, q.from.as_deref(), q.to.as_deref())?;
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

/// `GET /analytics/mcp/sessions/{sessionId}`
pub async fn session(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let grant = state.keys.authorize(&req, Scope::Read)?;
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
