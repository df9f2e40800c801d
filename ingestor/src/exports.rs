//! `GET /v1/exports/billing`: what finance invoices from, one line per customer, agent and tool
//! over a calendar month, then the period's totals, as CSV or JSON.
//!
//! The answer is streamed: lines are read from the store a page at a time and written as they
//! come, so a month of millions of lines never sits whole in memory. The totals are summed from
//! the lines themselves and come last; an export without its totals line was cut short.

use crate::auth::Reader;
use crate::error::{ApiError, ErrorBody};
use crate::state::AppState;
use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use backends::store::{AnalyticsStore, Viewer};
use schemas::analytics::{UsageFigures, Viewed};
use schemas::billing::{
    csv_record, json_line, BillingFigures, BillingKey, BillingPeriod, BillingQuery,
    BillingSpendFigures, ExportFigures,
};
use schemas::config::Scope;
use schemas::openapi::BillingExport;
use serde::Deserialize;
use std::marker::PhantomData;
use std::sync::Arc;
use utoipa::{IntoParams, ToSchema};

/// Lines read from the store per page.
const PAGE_LINES: usize = 2000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Csv,
    Json,
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[into_params(parameter_in = Query)]
pub struct BillingParams {
    /// The month, `YYYY-MM` (UTC).
    #[param(
        pattern = "^(19[7-9][0-9]|[2-9][0-9]{3})-(0[1-9]|1[0-2])$",
        example = "2026-11"
    )]
    period: String,
    /// `csv` (default) or `json`.
    #[serde(default, deserialize_with = "format_param")]
    format: Option<Format>,
    /// Only this customer's lines.
    customer_id: Option<String>,
    /// Only this agent's lines.
    agent_id: Option<String>,
}

/// `format` as `csv` or `json`, or an error that names it.
fn format_param<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Format>, D::Error> {
    match Option::<String>::deserialize(d)?.as_deref() {
        None => Ok(None),
        Some("csv") => Ok(Some(Format::Csv)),
        Some("json") => Ok(Some(Format::Json)),
        Some(other) => Err(serde::de::Error::custom(format!(
            "format `{other}` is not one of csv, json"
        ))),
    }
}

/// Where a streamed export is.
enum Step {
    Start,
    /// Lines go on after this key (`None`: from the first).
    Lines(Option<BillingKey>),
    Totals,
    Done,
}

/// An export being streamed, with the figures `F` its reader sees.
struct Export<F> {
    analytics: Arc<dyn AnalyticsStore>,
    viewer: Viewer,
    query: BillingQuery,
    period: String,
    format: Format,
    totals: UsageFigures,
    /// Lines written so far (JSON needs commas between them).
    written: usize,
    step: Step,
    figures: PhantomData<F>,
}

impl<F: ExportFigures + 'static> Export<F> {
    /// The next chunk of the body, or `None` when it is complete.
    async fn next_chunk(&mut self) -> Option<Result<web::Bytes, ApiError>> {
        loop {
            match std::mem::replace(&mut self.step, Step::Done) {
                Step::Start => {
                    self.step = Step::Lines(None);
                    let head = match self.format {
                        Format::Csv => F::CSV_HEADER.to_string(),
                        Format::Json => format!(
                            "{{\"view\":\"{}\",\"period\":\"{}\",\"currency\":\"USD\",\"lines\":[",
                            F::VIEW,
                            self.period
                        ),
                    };
                    return Some(Ok(head.into()));
                }
                Step::Lines(after) => {
                    let page = self
                        .analytics
                        .billing_page(&self.viewer, &self.query, after.as_ref(), PAGE_LINES)
                        .await;
                    let lines = match page {
                        Ok(lines) => lines,
                        Err(e) => {
                            tracing::error!(error = %e, "billing export cut short");
                            return Some(Err(e.into()));
                        }
                    };
                    if lines.len() < PAGE_LINES {
                        self.step = Step::Totals;
                    } else {
                        self.step = Step::Lines(lines.last().map(|l| l.key.clone()));
                    }
                    if lines.is_empty() {
                        continue;
                    }
                    let mut chunk = String::with_capacity(lines.len() * 200);
                    for line in &lines {
                        self.totals.merge(&line.figures);
                        match self.format {
                            Format::Csv => chunk.push_str(&csv_record::<F>(
                                &self.period,
                                Some(&line.key),
                                &line.figures,
                            )),
                            Format::Json => {
                                if self.written > 0 {
                                    chunk.push(',');
                                }
                                chunk.push_str(&json_line::<F>(line));
                            }
                        }
                        self.written += 1;
                    }
                    return Some(Ok(chunk.into()));
                }
                Step::Totals => {
                    let tail = match self.format {
                        Format::Csv => csv_record::<F>(&self.period, None, &self.totals),
                        Format::Json => format!(
                            "],\"lineCount\":{},\"totals\":{}}}",
                            self.written,
                            serde_json::to_string(&F::from(&self.totals))
                                .expect("figures serialize")
                        ),
                    };
                    return Some(Ok(tail.into()));
                }
                Step::Done => return None,
            }
        }
    }

    /// The whole export as a streamed 200.
    fn respond(self, tenant: &str) -> HttpResponse {
        let (content_type, extension) = match self.format {
            Format::Csv => ("text/csv; charset=utf-8", "csv"),
            Format::Json => ("application/json", "json"),
        };
        let file = format!("billing-{tenant}-{}.{extension}", self.period);
        let body = futures_util::stream::unfold(self, |mut export| async move {
            let chunk = export.next_chunk().await?;
            Some((chunk, export))
        });
        HttpResponse::Ok()
            .content_type(content_type)
            .insert_header((
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{file}\""),
            ))
            .streaming(body)
    }
}

/// Invoice lines of a calendar month: one per customer, agent and tool, then the period's
/// totals (equal to `/analytics/mcp/summary` over the same days). Streamed.
#[utoipa::path(
    get, path = "/v1/exports/billing", tag = "exports", params(BillingParams),
    responses(
        (status = 200, description = "The export, as CSV (RFC 4180, header row, `line` = usage or total) or JSON",
            content(
                (String = "text/csv", example = "period,line,customer_id,agent_id,tool_name,calls,errors,input_tokens,output_tokens,duration_ms,revenue_micros,revenue_usd,cogs_micros,cogs_usd\r\n2026-11,usage,cust_acme,agent_gpt4o_prod,web_search,1,0,1200,450,542,7550,0.007550,1529,0.001529\r\n2026-11,total,,,,1,0,1200,450,542,7550,0.007550,1529,0.001529\r\n"),
                (Viewed<BillingExport<BillingFigures>, BillingExport<BillingSpendFigures>> = "application/json", example = json!(
                    {"view":"tenant","period":"2026-11","currency":"USD","lines":[{"customerId":"cust_acme","agentId":"agent_gpt4o_prod","toolName":"web_search","calls":1,"errors":0,"inputTokens":1200,"outputTokens":450,"durationMs":542,"revenueMicros":7550,"revenueUsd":"0.007550","cogsMicros":1529,"cogsUsd":"0.001529"}],"lineCount":1,"totals":{"calls":1,"errors":0,"inputTokens":1200,"outputTokens":450,"durationMs":542,"revenueMicros":7550,"revenueUsd":"0.007550","cogsMicros":1529,"cogsUsd":"0.001529"}})),
            ),
            headers(("Content-Disposition" = String, description = "attachment; filename=billing-TENANT-PERIOD.csv (or .json)"))),
        (status = 400, description = "Bad parameters; `message` says which and how to fix them", body = ErrorBody),
        (status = 401, description = "No API key, or an unknown one", body = ErrorBody),
        (status = 403, description = "The key lacks the `export` scope, or X-Tenant-Id names another tenant", body = ErrorBody),
        (status = 429, description = "This API key is over its rate limit", body = ErrorBody,
            headers(("Retry-After" = u32, description = "Seconds until the key may send again"))),
        (status = 503, description = "The store is unavailable; retry after `Retry-After` seconds", body = ErrorBody,
            headers(("Retry-After" = u32, description = "Seconds to wait"))),
    ),
    security(("api_key" = []), ("bearer" = []), ("portal_token" = [])),
)]
pub async fn billing(
    state: web::Data<AppState>,
    req: HttpRequest,
    q: web::Query<BillingParams>,
) -> Result<HttpResponse, ApiError> {
    let reader = state.reader(&req, Scope::Export).await?;
    let q = q.into_inner();
    let period = BillingPeriod::parse(&q.period).map_err(ApiError::BadRequest)?;
    let non_empty = |v: Option<String>| v.filter(|s| !s.is_empty());
    let query = BillingQuery {
        range: period.range(),
        customer_id: reader.customer(non_empty(q.customer_id))?,
        agent_id: non_empty(q.agent_id),
    };
    fn export<F>(
        state: &AppState,
        reader: &Reader,
        query: BillingQuery,
        period: String,
        format: Format,
    ) -> Export<F> {
        Export {
            analytics: state.analytics.clone(),
            viewer: reader.viewer.clone(),
            query,
            period,
            format,
            totals: UsageFigures::default(),
            written: 0,
            step: Step::Start,
            figures: PhantomData,
        }
    }
    let (period, format) = (period.as_string(), q.format.unwrap_or(Format::Csv));
    let tenant = &reader.tenant.id;
    Ok(match reader.is_customer() {
        false => export::<BillingFigures>(&state, &reader, query, period, format).respond(tenant),
        true => {
            export::<BillingSpendFigures>(&state, &reader, query, period, format).respond(tenant)
        }
    })
}
