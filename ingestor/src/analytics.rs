//! `GET /analytics/mcp/...`: usage read back from the rollups, always the caller's tenant only
//! (and one customer only, for a portal token or a read that names one with `customerId`).

use crate::auth::Reader;
use crate::error::{ApiError, ErrorBody, ReadErrors};
use crate::state::AppState;
use actix_web::{web, HttpRequest, HttpResponse};
use backends::store::{page_by_revenue_then_name, PageCursor, SessionQuery, Viewer};
use schemas::analytics::{
    ByAgentReport, ByCustomerReport, ByToolReport, DateRange, GroupBy, Interval, SeriesQuery,
    SessionDetail, SessionsReport, SpendFigures, SummaryReport, TimeSeriesReport, UsageFigures,
    Viewed,
};
use schemas::config::Scope;
use schemas::credits::valid_customer_id;
use serde::Deserialize;
use utoipa::IntoParams;

/// Rows of a list (sessions, tools) returned when a request names no `limit`, and the most it
/// may ask for: a tenant's clients name its tools and sessions, so a list has no bound of its
/// own.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[into_params(parameter_in = Query)]
pub struct RangeParams {
    /// First day, `YYYY-MM-DD` (or RFC 3339), inclusive; default 30 days before `to`.
    #[param(format = Date)]
    from: Option<String>,
    /// Last day, inclusive; default today (UTC). At most 1098 days after `from`.
    #[param(format = Date)]
    to: Option<String>,
    /// Only this customer's calls (a portal token may name its own customer only).
    customer_id: Option<String>,
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
    /// Only this customer's sessions: those whose every call names it (a portal token may
    /// name its own customer only).
    customer_id: Option<String>,
    /// Most sessions returned (1 to 1000, default 100).
    #[param(minimum = 1, maximum = 1000)]
    #[serde(default, deserialize_with = "limit_param")]
    limit: Option<usize>,
}

/// A ranged list read a page at a time: tools (`revenue/by-tool`) or customers (`by-customer`).
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[into_params(parameter_in = Query)]
pub struct PageParams {
    /// First day, `YYYY-MM-DD` (or RFC 3339), inclusive; default 30 days before `to`.
    #[param(format = Date)]
    from: Option<String>,
    /// Last day, inclusive; default today (UTC). At most 1098 days after `from`.
    #[param(format = Date)]
    to: Option<String>,
    /// Only this customer's calls (a portal token may name its own customer only).
    customer_id: Option<String>,
    /// Most rows returned (1 to 1000, default 100).
    #[param(minimum = 1, maximum = 1000)]
    #[serde(default, deserialize_with = "limit_param")]
    limit: Option<usize>,
    /// The `nextCursor` of the previous page, as it was given; absent for the first page.
    cursor: Option<String>,
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct SessionToolsParams {
    /// Most of the session's tools returned in `byTool` (1 to 1000, default 100).
    #[param(minimum = 1, maximum = 1000)]
    #[serde(default, deserialize_with = "limit_param")]
    limit: Option<usize>,
    /// The `nextCursor` of the previous page of `byTool`, as it was given; absent for the first.
    cursor: Option<String>,
}

/// `limit` as a whole number, or an error that names it.
fn limit_param<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    let Some(text) = Option::<String>::deserialize(d)? else {
        return Ok(None);
    };
    text.parse().map(Some).map_err(|_| {
        serde::de::Error::custom(format!(
            "limit `{text}` is not a whole number; give 1 to {MAX_PAGE}"
        ))
    })
}

/// A list's `limit`, [`DEFAULT_PAGE`] when absent, or what to fix.
fn page_limit(limit: Option<usize>) -> Result<usize, ApiError> {
    let limit = limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit must be 1 to {MAX_PAGE} (got {limit})"
        )));
    }
    Ok(limit)
}

/// One page of a list of tools or customers in the order stores answer it (revenue, then
/// name): at most `limit` rows after `cursor`, and the next page's cursor.
fn page_of<T>(
    rows: Vec<T>,
    key: impl Fn(&T) -> (i64, &str),
    limit: Option<usize>,
    cursor: Option<&str>,
) -> Result<(Vec<T>, Option<String>), ApiError> {
    let limit = page_limit(limit)?;
    let after = match cursor {
        None => None,
        Some(text) => Some(PageCursor::parse(text).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "cursor `{text}` is not one this API gave: pass the previous page's nextCursor as it is, or leave cursor out for the first page"
            ))
        })?),
    };
    let (page, next) = page_by_revenue_then_name(rows, key, after.as_ref(), limit);
    Ok((page, next.map(|c| c.encode())))
}

/// The caller as a reader (with the `read` scope), the rows it reads and the range it asks
/// about. A `customerId` narrows the rows through the same filter as a portal token's
/// customer (`Reader::customer`: a token may name its own customer only), while the answer
/// keeps the reader's view: a tenant key filtering on a customer still reads the costs.
async fn read_of_range(
    state: &AppState,
    req: &HttpRequest,
    (from, to): (Option<&str>, Option<&str>),
    customer_id: Option<&str>,
) -> Result<(Reader, Viewer, DateRange), ApiError> {
    let reader = state.reader(req, Scope::Read).await?;
    if let Some(customer) = customer_id {
        valid_customer_id(customer).map_err(ApiError::BadRequest)?;
    }
    let viewer = Viewer {
        tenant: reader.viewer.tenant.clone(),
        customer: reader.customer(customer_id.map(str::to_string))?,
    };
    let range = DateRange::parse(from, to, chrono::Utc::now().date_naive())
        .map_err(ApiError::BadRequest)?;
    Ok((reader, viewer, range))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[into_params(parameter_in = Query)]
pub struct SeriesParams {
    /// First day, `YYYY-MM-DD` (or RFC 3339), inclusive; default 30 days before `to`.
    #[param(format = Date)]
    from: Option<String>,
    /// Last day, inclusive; default today (UTC). At most 31 days after `from` for hours.
    #[param(format = Date)]
    to: Option<String>,
    /// `hour` or `day` (default).
    #[param(inline)]
    interval: Option<Interval>,
    /// `tool`, `agent` or `customer`; without it, one series of the totals.
    #[param(inline)]
    group_by: Option<GroupBy>,
    /// Only this customer's calls (a portal token may name its own customer only).
    customer_id: Option<String>,
}

/// Revenue, COGS and usage per tool over a range of days, highest revenue first, then by name,
/// a page at a time: `limit` rows (default 100), then ask again with `cursor` = `nextCursor`
/// until it is `null`.
#[utoipa::path(
    get, path = "/analytics/mcp/revenue/by-tool", tag = "analytics", params(PageParams),
    responses(
        (status = 200, description = "One page of rows, one per tool, and the next page's cursor", body = Viewed<ByToolReport<UsageFigures>, ByToolReport<SpendFigures>>, example = json!(
            {"view":"tenant","from":"2026-11-21","to":"2026-11-21","tools":[{"toolName":"web_search","calls":1,"errors":0,"revenueMicros":7550,"cogsMicros":1529,"grossProfitMicros":6021,"margin":0.7975,"inputTokens":1200,"outputTokens":450,"durationMsSum":542,"avgDurationMs":542,"maxDurationMs":542,"sessions":1}],"nextCursor":null})),
        ReadErrors,
    ),
    security(("api_key" = []), ("bearer" = []), ("portal_token" = [])),
)]
pub async fn by_tool(
    state: web::Data<AppState>,
    req: HttpRequest,
    q: web::Query<PageParams>,
) -> Result<HttpResponse, ApiError> {
    let (reader, viewer, range) = read_of_range(
        &state,
        &req,
        (q.from.as_deref(), q.to.as_deref()),
        q.customer_id.as_deref(),
    )
    .await?;
    let tools = state.analytics.revenue_by_tool(&viewer, range).await?;
    let (tools, next_cursor) = page_of(
        tools,
        |t| (t.figures.revenue_micros, &t.tool_name),
        q.limit,
        q.cursor.as_deref(),
    )?;
    Ok(reader.answer(ByToolReport {
        from: range.from_str_day(),
        to: range.to_str_day(),
        tools,
        next_cursor,
    }))
}

/// Revenue, COGS and usage per customer over a range of days, highest revenue first, then by
/// customer id, a page at a time like by-tool. The calls that named no customer are one row of
/// their own, `customerId: null`, ordered as the empty id. A portal token reads its own
/// customer's row only.
#[utoipa::path(
    get, path = "/analytics/mcp/by-customer", tag = "analytics", params(PageParams),
    responses(
        (status = 200, description = "One page of rows, one per customer, and the next page's cursor", body = Viewed<ByCustomerReport<UsageFigures>, ByCustomerReport<SpendFigures>>, example = json!(
            {"view":"tenant","from":"2026-11-21","to":"2026-11-21","customers":[{"customerId":"cust_acme","calls":1,"errors":0,"revenueMicros":7550,"cogsMicros":1529,"grossProfitMicros":6021,"margin":0.7975,"inputTokens":1200,"outputTokens":450,"durationMsSum":542,"avgDurationMs":542,"maxDurationMs":542,"sessions":1}],"nextCursor":null})),
        ReadErrors,
    ),
    security(("api_key" = []), ("bearer" = []), ("portal_token" = [])),
)]
pub async fn by_customer(
    state: web::Data<AppState>,
    req: HttpRequest,
    q: web::Query<PageParams>,
) -> Result<HttpResponse, ApiError> {
    let (reader, viewer, range) = read_of_range(
        &state,
        &req,
        (q.from.as_deref(), q.to.as_deref()),
        q.customer_id.as_deref(),
    )
    .await?;
    let customers = state.analytics.usage_by_customer(&viewer, range).await?;
    let (customers, next_cursor) = page_of(
        customers,
        |c| (c.figures.revenue_micros, c.name()),
        q.limit,
        q.cursor.as_deref(),
    )?;
    Ok(reader.answer(ByCustomerReport {
        from: range.from_str_day(),
        to: range.to_str_day(),
        customers,
        next_cursor,
    }))
}

/// Usage per agent over a range of days, with a daily series, highest revenue first.
#[utoipa::path(
    get, path = "/analytics/mcp/by-agent", tag = "analytics", params(RangeParams),
    responses(
        (status = 200, description = "One row per agent", body = Viewed<ByAgentReport<UsageFigures>, ByAgentReport<SpendFigures>>, example = json!(
            {"view":"tenant","from":"2026-11-21","to":"2026-11-21","agents":[{"agentId":"agent_gpt4o_prod","calls":1,"errors":0,"revenueMicros":7550,"cogsMicros":1529,"grossProfitMicros":6021,"margin":0.7975,"inputTokens":1200,"outputTokens":450,"durationMsSum":542,"avgDurationMs":542,"maxDurationMs":542,"sessions":1,"daily":[{"date":"2026-11-21","calls":1,"errors":0,"revenueMicros":7550,"cogsMicros":1529,"grossProfitMicros":6021,"margin":0.7975,"inputTokens":1200,"outputTokens":450,"durationMsSum":542,"avgDurationMs":542,"maxDurationMs":542,"sessions":1}]}]})),
        ReadErrors,
    ),
    security(("api_key" = []), ("bearer" = []), ("portal_token" = [])),
)]
pub async fn by_agent(
    state: web::Data<AppState>,
    req: HttpRequest,
    q: web::Query<RangeParams>,
) -> Result<HttpResponse, ApiError> {
    let (reader, viewer, range) = read_of_range(
        &state,
        &req,
        (q.from.as_deref(), q.to.as_deref()),
        q.customer_id.as_deref(),
    )
    .await?;
    let agents = state.analytics.usage_by_agent(&viewer, range).await?;
    Ok(reader.answer(ByAgentReport {
        from: range.from_str_day(),
        to: range.to_str_day(),
        agents,
    }))
}

/// The tenant's totals over a range of days.
#[utoipa::path(
    get, path = "/analytics/mcp/summary", tag = "analytics", params(RangeParams),
    responses(
        (status = 200, description = "Totals, distinct sessions, tools and agents", body = Viewed<SummaryReport<UsageFigures>, SummaryReport<SpendFigures>>, example = json!(
            {"view":"tenant","from":"2026-11-21","to":"2026-11-21","calls":1,"errors":0,"revenueMicros":7550,"cogsMicros":1529,"grossProfitMicros":6021,"margin":0.7975,"inputTokens":1200,"outputTokens":450,"durationMsSum":542,"avgDurationMs":542,"maxDurationMs":542,"sessions":1,"tools":1,"agents":1})),
        ReadErrors,
    ),
    security(("api_key" = []), ("bearer" = []), ("portal_token" = [])),
)]
pub async fn summary(
    state: web::Data<AppState>,
    req: HttpRequest,
    q: web::Query<RangeParams>,
) -> Result<HttpResponse, ApiError> {
    let (reader, viewer, range) = read_of_range(
        &state,
        &req,
        (q.from.as_deref(), q.to.as_deref()),
        q.customer_id.as_deref(),
    )
    .await?;
    let summary = state.analytics.summary(&viewer, range).await?;
    Ok(reader.answer(SummaryReport {
        from: range.from_str_day(),
        to: range.to_str_day(),
        summary,
    }))
}

/// Usage per hour or per day, one series per tool, agent or customer (or one of the totals),
/// highest revenue first. Buckets without usage are left out.
#[utoipa::path(
    get, path = "/analytics/mcp/timeseries", tag = "analytics", params(SeriesParams),
    responses(
        (status = 200, description = "One series per group", body = Viewed<TimeSeriesReport<UsageFigures>, TimeSeriesReport<SpendFigures>>, example = json!(
            {"view":"tenant","from":"2026-11-21","to":"2026-11-21","interval":"hour","groupBy":"tool","series":[{"key":"web_search","calls":1,"errors":0,"revenueMicros":7550,"cogsMicros":1529,"grossProfitMicros":6021,"margin":0.7975,"inputTokens":1200,"outputTokens":450,"durationMsSum":542,"avgDurationMs":542,"maxDurationMs":542,"points":[{"start":"2026-11-21T09:00:00.000Z","calls":1,"errors":0,"revenueMicros":7550,"cogsMicros":1529,"grossProfitMicros":6021,"margin":0.7975,"inputTokens":1200,"outputTokens":450,"durationMsSum":542,"avgDurationMs":542,"maxDurationMs":542}]}]})),
        ReadErrors,
    ),
    security(("api_key" = []), ("bearer" = []), ("portal_token" = [])),
)]
pub async fn timeseries(
    state: web::Data<AppState>,
    req: HttpRequest,
    q: web::Query<SeriesParams>,
) -> Result<HttpResponse, ApiError> {
    let (reader, viewer, range) = read_of_range(
        &state,
        &req,
        (q.from.as_deref(), q.to.as_deref()),
        q.customer_id.as_deref(),
    )
    .await?;
    let interval = q.interval.unwrap_or(Interval::Day);
    let query = SeriesQuery::new(range, interval, q.group_by).map_err(ApiError::BadRequest)?;
    let rows = state.analytics.series_rows(&viewer, query).await?;
    Ok(reader.answer(TimeSeriesReport {
        from: range.from_str_day(),
        to: range.to_str_day(),
        interval,
        group_by: q.group_by,
        series: backends::store::assemble_series(rows, q.group_by.is_some()),
    }))
}

/// Sessions active in a range of days, most recently active first.
#[utoipa::path(
    get, path = "/analytics/mcp/sessions", tag = "analytics", params(SessionParams),
    responses(
        (status = 200, description = "Sessions", body = Viewed<SessionsReport<UsageFigures>, SessionsReport<SpendFigures>>, example = json!(
            {"view":"tenant","from":"2026-11-21","to":"2026-11-21","sessions":[{"sessionId":"sess_abc123","agentId":"agent_gpt4o_prod","firstSeen":"2026-11-21T09:30:00.000Z","lastSeen":"2026-11-21T09:30:00.000Z","ended":false,"tools":1,"calls":1,"errors":0,"revenueMicros":7550,"cogsMicros":1529,"grossProfitMicros":6021,"margin":0.7975,"inputTokens":1200,"outputTokens":450,"durationMsSum":542,"avgDurationMs":542,"maxDurationMs":542}]})),
        ReadErrors,
    ),
    security(("api_key" = []), ("bearer" = []), ("portal_token" = [])),
)]
pub async fn sessions(
    state: web::Data<AppState>,
    req: HttpRequest,
    q: web::Query<SessionParams>,
) -> Result<HttpResponse, ApiError> {
    let (reader, viewer, range) = read_of_range(
        &state,
        &req,
        (q.from.as_deref(), q.to.as_deref()),
        q.customer_id.as_deref(),
    )
    .await?;
    let query = SessionQuery {
        range,
        agent_id: q.agent_id.clone(),
        limit: page_limit(q.limit)?,
    };
    let sessions = state.analytics.sessions(&viewer, query).await?;
    Ok(reader.answer(SessionsReport {
        from: range.from_str_day(),
        to: range.to_str_day(),
        sessions,
    }))
}

/// One session with its per-tool breakdown, a page of tools at a time: `limit` tools in
/// `byTool` (default 100), highest revenue first, then by name; ask again with `cursor` =
/// `nextCursor` until it is `null`.
#[utoipa::path(
    get, path = "/analytics/mcp/sessions/{sessionId}", tag = "analytics",
    params(("sessionId" = String, Path, description = "The session's id, as the SDK sent it"), SessionToolsParams),
    responses(
        (status = 200, description = "The session", body = Viewed<SessionDetail<UsageFigures>, SessionDetail<SpendFigures>>, example = json!(
            {"view":"tenant","sessionId":"sess_abc123","agentId":"agent_gpt4o_prod","firstSeen":"2026-11-21T09:30:00.000Z","lastSeen":"2026-11-21T09:30:00.000Z","ended":false,"tools":1,"calls":1,"errors":0,"revenueMicros":7550,"cogsMicros":1529,"grossProfitMicros":6021,"margin":0.7975,"inputTokens":1200,"outputTokens":450,"durationMsSum":542,"avgDurationMs":542,"maxDurationMs":542,"byTool":[{"toolName":"web_search","calls":1,"errors":0,"revenueMicros":7550,"cogsMicros":1529,"grossProfitMicros":6021,"margin":0.7975,"inputTokens":1200,"outputTokens":450,"durationMsSum":542,"avgDurationMs":542,"maxDurationMs":542}],"nextCursor":null,"killedUntil":null})),
        (status = 404, description = "The tenant (or the portal token's customer) has no such session", body = ErrorBody),
        ReadErrors,
    ),
    security(("api_key" = []), ("bearer" = []), ("portal_token" = [])),
)]
pub async fn session(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
    q: web::Query<SessionToolsParams>,
) -> Result<HttpResponse, ApiError> {
    let reader = state.reader(&req, Scope::Read).await?;
    let session_id = path.into_inner();
    match state.analytics.session(&reader.viewer, &session_id).await? {
        Some(mut detail) => {
            let (by_tool, next_cursor) = page_of(
                std::mem::take(&mut detail.by_tool),
                |t| (t.figures.revenue_micros, &t.tool_name),
                q.limit,
                q.cursor.as_deref(),
            )?;
            (detail.by_tool, detail.next_cursor) = (by_tool, next_cursor);
            let now_ms = chrono::Utc::now().timestamp_millis();
            // Without the guard state the answer still stands, without the kill.
            detail.killed_until_ms = match state
                .margins
                .view(&reader.tenant.id, None, None, Some(&session_id), now_ms)
                .await
            {
                Ok(view) => view.session_killed_until_ms,
                Err(e) => {
                    crate::guard::warn_state_unavailable(&e);
                    None
                }
            };
            Ok(reader.answer(detail))
        }
        None => Err(ApiError::NotFound(format!(
            "no session `{session_id}` for this {}",
            if reader.is_customer() {
                "customer"
            } else {
                "tenant"
            }
        ))),
    }
}
