//! `GET /v1/exports/billing`: what finance invoices from, one line per customer, agent and tool
//! over a calendar month, then the period's totals, as CSV or JSON.
//!
//! The answer is streamed: lines are read from the store a page at a time and written as they
//! come, so a month of millions of lines never sits whole in memory. The totals are summed from
//! the lines themselves and come last; an export without its totals line was cut short.

use crate::error::ApiError;
use crate::AppState;
use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use backends::store::AnalyticsStore;
use schemas::analytics::UsageFigures;
use schemas::billing::{
    csv_record, json_line, BillingKey, BillingPeriod, BillingQuery, JsonFigures, CSV_HEADER,
};
use schemas::config::Scope;
use serde::Deserialize;
use std::sync::Arc;

/// Lines read from the store per page.
const PAGE_LINES: usize = 2000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Csv,
    Json,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BillingParams {
    /// The month, `YYYY-MM` (UTC).
    period: String,
    /// `csv` (default) or `json`.
    format: Option<Format>,
    /// Only this customer's lines.
    customer_id: Option<String>,
    /// Only this agent's lines.
    agent_id: Option<String>,
}

/// Where a streamed export is.
enum Step {
    Start,
    /// Lines go on after this key (`None`: from the first).
    Lines(Option<BillingKey>),
    Totals,
    Done,
}

struct Export {
    analytics: Arc<dyn AnalyticsStore>,
    tenant: Arc<str>,
    query: BillingQuery,
    period: String,
    format: Format,
    totals: UsageFigures,
    /// Lines written so far (JSON needs commas between them).
    written: usize,
    step: Step,
}

impl Export {
    /// The next chunk of the body, or `None` when it is complete.
    async fn next_chunk(&mut self) -> Option<Result<web::Bytes, ApiError>> {
        loop {
            match std::mem::replace(&mut self.step, Step::Done) {
                Step::Start => {
                    self.step = Step::Lines(None);
                    let head = match self.format {
                        Format::Csv => CSV_HEADER.to_string(),
                        Format::Json => format!(
                            "{{\"period\":\"{}\",\"currency\":\"USD\",\"lines\":[",
                            self.period
                        ),
                    };
                    return Some(Ok(head.into()));
                }
                Step::Lines(after) => {
                    let page = self
                        .analytics
                        .billing_page(&self.tenant, &self.query, after.as_ref(), PAGE_LINES)
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
                            Format::Csv => chunk.push_str(&csv_record(
                                &self.period,
                                Some(&line.key),
                                &line.figures,
                            )),
                            Format::Json => {
                                if self.written > 0 {
                                    chunk.push(',');
                                }
                                chunk.push_str(&json_line(line));
                            }
                        }
                        self.written += 1;
                    }
                    return Some(Ok(chunk.into()));
                }
                Step::Totals => {
                    let tail = match self.format {
                        Format::Csv => csv_record(&self.period, None, &self.totals),
                        Format::Json => format!(
                            "],\"lineCount\":{},\"totals\":{}}}",
                            self.written,
                            serde_json::to_string(&JsonFigures(&self.totals))
                                .expect("figures serialize")
                        ),
                    };
                    return Some(Ok(tail.into()));
                }
                Step::Done => return None,
            }
        }
    }
}

/// `GET /v1/exports/billing?period=YYYY-MM&format=csv|json&customerId=&agentId=`
pub async fn billing(
    state: web::Data<AppState>,
    req: HttpRequest,
    q: web::Query<BillingParams>,
) -> Result<HttpResponse, ApiError> {
    let grant = state.keys.authorize(&req, Scope::Export)?;
    let q = q.into_inner();
    let period = BillingPeriod::parse(&q.period).map_err(ApiError::BadRequest)?;
    let format = q.format.unwrap_or(Format::Csv);
    let non_empty = |v: Option<String>| v.filter(|s| !s.is_empty());
    let export = Export {
        analytics: state.analytics.clone(),
        tenant: grant.tenant.id.clone(),
        query: BillingQuery {
            range: period.range(),
            customer_id: non_empty(q.customer_id),
            agent_id: non_empty(q.agent_id),
        },
        period: period.as_string(),
        format,
        totals: UsageFigures::default(),
        written: 0,
        step: Step::Start,
    };
    let (content_type, extension) = match format {
        Format::Csv => ("text/csv; charset=utf-8", "csv"),
        Format::Json => ("application/json", "json"),
    };
    let file = format!("billing-{}-{}.{extension}", grant.tenant.id, export.period);
    let body = futures_util::stream::unfold(export, |mut export| async move {
        let chunk = export.next_chunk().await?;
        Some((chunk, export))
    });
    Ok(HttpResponse::Ok()
        .content_type(content_type)
        .insert_header((
            header::CONTENT_DISPOSITION,
            format!("attachment; filename=\"{file}\""),
        ))
        .streaming(body))
}
