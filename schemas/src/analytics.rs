//! What analytics answer: date ranges and the rows every store fills the same way.
//!
//! Stores return integer sums; everything derived (margin, averages) is computed here, once, so
//! two stores holding the same sums answer byte-identical JSON.

use crate::event::{format_ms, RatedEvent};
use chrono::{DateTime, NaiveDate};
use serde::ser::SerializeStruct;
use serde::{Serialize, Serializer};
use utoipa::ToSchema;

/// An inclusive range of UTC days; analytics read daily rollups, so a day is their grain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DateRange {
    pub from: NaiveDate,
    pub to: NaiveDate,
}

/// Longest range one request may ask for.
pub const MAX_RANGE_DAYS: i64 = 366 * 3;
/// Days shown when a request names no `from`.
pub const DEFAULT_RANGE_DAYS: i64 = 30;

impl DateRange {
    /// Reads `from` and `to` as `YYYY-MM-DD` or RFC 3339 (its UTC day); both ends inclusive.
    /// Without `to`, the range ends `today`; without `from`, it spans 30 days.
    pub fn parse(
        from: Option<&str>,
        to: Option<&str>,
        today: NaiveDate,
    ) -> Result<DateRange, String> {
        let to = match to {
            Some(t) => parse_day("to", t)?,
            None => today,
        };
        let from = match from {
            Some(f) => parse_day("from", f)?,
            None => to - chrono::Days::new(DEFAULT_RANGE_DAYS as u64 - 1),
        };
        if from > to {
            return Err(format!("from {from} is after to {to}"));
        }
        if (to - from).num_days() >= MAX_RANGE_DAYS {
            return Err(format!(
                "the range {from} to {to} is longer than {MAX_RANGE_DAYS} days; ask for less"
            ));
        }
        Ok(DateRange { from, to })
    }

    pub fn from_str_day(&self) -> String {
        self.from.format("%Y-%m-%d").to_string()
    }

    pub fn to_str_day(&self) -> String {
        self.to.format("%Y-%m-%d").to_string()
    }

    /// The first millisecond of `from` and the first millisecond after `to`.
    pub fn bounds_ms(&self) -> (i64, i64) {
        let start = |d: NaiveDate| {
            d.and_hms_opt(0, 0, 0)
                .expect("midnight")
                .and_utc()
                .timestamp_millis()
        };
        (start(self.from), start(self.to) + 86_400_000)
    }
}

fn parse_day(name: &str, text: &str) -> Result<NaiveDate, String> {
    if let Ok(day) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Ok(day);
    }
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.naive_utc().date())
        .map_err(|_| {
            format!("{name} `{text}` is not a date like 2026-11-21 (or an RFC 3339 timestamp)")
        })
}

/// The UTC day of a millisecond timestamp, as stored in rollups (`YYYY-MM-DD`).
pub fn day_of_ms(ms: i64) -> String {
    DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d").to_string())
        .unwrap_or_default()
}

/// The sums every analytics row carries. Serialized with the figures derived from them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UsageFigures {
    pub calls: i64,
    pub errors: i64,
    pub revenue_micros: i64,
    pub cogs_micros: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub duration_ms_sum: i64,
    pub duration_ms_max: i64,
}

impl UsageFigures {
    /// Adds one stored call to the sums. Heartbeats are not calls: callers leave them out.
    pub fn record(&mut self, e: &RatedEvent) {
        self.calls += 1;
        self.errors += i64::from(e.execution_status.is_error());
        self.revenue_micros += e.revenue_micros;
        self.cogs_micros += e.cogs_micros;
        self.input_tokens += e.input_tokens;
        self.output_tokens += e.output_tokens;
        self.duration_ms_sum += e.execution_duration_ms;
        self.duration_ms_max = self.duration_ms_max.max(e.execution_duration_ms);
    }

    /// Adds another row's sums, as a rollup merge does.
    pub fn merge(&mut self, other: &UsageFigures) {
        self.calls += other.calls;
        self.errors += other.errors;
        self.revenue_micros += other.revenue_micros;
        self.cogs_micros += other.cogs_micros;
        self.input_tokens += other.input_tokens;
        self.output_tokens += other.output_tokens;
        self.duration_ms_sum += other.duration_ms_sum;
        self.duration_ms_max = self.duration_ms_max.max(other.duration_ms_max);
    }

    /// (revenue − COGS) / revenue, to four decimals; `None` without revenue.
    pub fn margin(&self) -> Option<f64> {
        margin(self.revenue_micros, self.cogs_micros)
    }

    pub fn avg_duration_ms(&self) -> Option<i64> {
        (self.calls > 0).then(|| {
            crate::money::div_round_half_even(self.duration_ms_sum as i128, self.calls as i128)
                as i64
        })
    }
}

/// (revenue − COGS) / revenue, to four decimals; `None` without revenue.
pub fn margin(revenue_micros: i64, cogs_micros: i64) -> Option<f64> {
    (revenue_micros != 0).then(|| {
        let exact = (revenue_micros as f64 - cogs_micros as f64) / revenue_micros as f64;
        (exact * 10_000.0).round() / 10_000.0
    })
}

impl Serialize for UsageFigures {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("UsageFigures", 11)?;
        st.serialize_field("calls", &self.calls)?;
        st.serialize_field("errors", &self.errors)?;
        st.serialize_field("revenueMicros", &self.revenue_micros)?;
        st.serialize_field("cogsMicros", &self.cogs_micros)?;
        st.serialize_field(
            "grossProfitMicros",
            &(self.revenue_micros - self.cogs_micros),
        )?;
        st.serialize_field("margin", &self.margin())?;
        st.serialize_field("inputTokens", &self.input_tokens)?;
        st.serialize_field("outputTokens", &self.output_tokens)?;
        st.serialize_field("durationMsSum", &self.duration_ms_sum)?;
        st.serialize_field("avgDurationMs", &self.avg_duration_ms())?;
        st.serialize_field("maxDurationMs", &self.duration_ms_max)?;
        st.end()
    }
}

/// What [`UsageFigures`] serializes to, for the OpenAPI document.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = UsageFigures)]
#[allow(dead_code)]
struct UsageFiguresSchema {
    /// Tool calls (heartbeats are not calls).
    calls: i64,
    /// Calls whose status was TIMEOUT, ERROR, VALIDATION_FAILED, FAILED or FAILURE.
    errors: i64,
    /// What the calls were priced, µUSD.
    revenue_micros: i64,
    /// What the calls cost, µUSD.
    cogs_micros: i64,
    /// revenueMicros − cogsMicros.
    gross_profit_micros: i64,
    /// (revenue − COGS) / revenue to four decimals; null without revenue.
    margin: Option<f64>,
    input_tokens: i64,
    output_tokens: i64,
    duration_ms_sum: i64,
    /// durationMsSum / calls, rounded half to even; null without calls.
    avg_duration_ms: Option<i64>,
    max_duration_ms: i64,
}

impl utoipa::PartialSchema for UsageFigures {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        UsageFiguresSchema::schema()
    }
}

impl ToSchema for UsageFigures {
    fn name() -> std::borrow::Cow<'static, str> {
        "UsageFigures".into()
    }
}

/// The figures a customer reads of its own usage (a portal token's answers): what it used and
/// what it was charged, and nothing of what the calls cost the operator. This type has no cost
/// field, so no answer built from it can show one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SpendFigures {
    /// Tool calls (heartbeats are not calls).
    pub calls: i64,
    /// Calls whose status was TIMEOUT, ERROR, VALIDATION_FAILED, FAILED or FAILURE.
    pub errors: i64,
    /// What the calls were charged, µUSD.
    pub revenue_micros: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub duration_ms_sum: i64,
    /// durationMsSum / calls, rounded half to even; null without calls.
    pub avg_duration_ms: Option<i64>,
    pub max_duration_ms: i64,
}

/// A row or a report as its customer reads it: the same shape with [`SpendFigures`] in place
/// of [`UsageFigures`].
pub trait ForCustomer {
    type Customer: Serialize;
    fn for_customer(self) -> Self::Customer;
}

impl<T: ForCustomer> ForCustomer for Vec<T> {
    type Customer = Vec<T::Customer>;
    fn for_customer(self) -> Vec<T::Customer> {
        self.into_iter().map(T::for_customer).collect()
    }
}

/// An answer as its reader is allowed to see it, tagged by `view`: a tenant key reads the
/// tenant's rows with the operator's costs (`T`); a portal token reads its customer's rows in
/// the customer's type (`C`), which has no cost field.
#[derive(Clone, Debug, PartialEq, Serialize, ToSchema)]
#[serde(tag = "view", rename_all = "lowercase")]
pub enum Viewed<T, C> {
    /// Read with one of the tenant's API keys: every customer's rows, with COGS, gross profit
    /// and margin.
    Tenant(T),
    /// Read with a portal token: its customer's rows only, without the operator's costs.
    Customer(C),
}

impl<T: ForCustomer> Viewed<T, T::Customer> {
    /// `answer` for a tenant key, or for a portal token when `customer` is set.
    pub fn of(answer: T, customer: bool) -> Self {
        match customer {
            false => Viewed::Tenant(answer),
            true => Viewed::Customer(answer.for_customer()),
        }
    }
}

/// One tool's usage over a range (`/analytics/mcp/revenue/by-tool`).
#[derive(Clone, Debug, PartialEq, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ToolUsage<F = UsageFigures> {
    pub tool_name: String,
    #[serde(flatten)]
    pub figures: F,
    /// Distinct sessions that called the tool in the range.
    pub sessions: i64,
}

/// One customer's usage over a range (`/analytics/mcp/by-customer`).
#[derive(Clone, Debug, PartialEq, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CustomerUsage<F = UsageFigures> {
    /// The customer the calls named; `null` for the calls that named none (never in a
    /// customer's view, nor under a `customerId` filter).
    pub customer_id: Option<String>,
    #[serde(flatten)]
    pub figures: F,
    /// Distinct sessions with calls of the customer in the range.
    pub sessions: i64,
}

impl<F> CustomerUsage<F> {
    /// The name this row is ordered and paged by: its customer id, the empty text for calls
    /// that named none (no customer id is empty, so it is no one's name).
    pub fn name(&self) -> &str {
        self.customer_id.as_deref().unwrap_or("")
    }
}

/// One agent's usage on one day.
#[derive(Clone, Debug, PartialEq, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DayUsage<F = UsageFigures> {
    pub date: String,
    #[serde(flatten)]
    pub figures: F,
    pub sessions: i64,
}

/// One agent's usage over a range, with its daily series (`/analytics/mcp/by-agent`).
#[derive(Clone, Debug, PartialEq, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentUsage<F = UsageFigures> {
    pub agent_id: String,
    #[serde(flatten)]
    pub figures: F,
    pub sessions: i64,
    pub daily: Vec<DayUsage<F>>,
}

/// A tenant's usage over a range (`/analytics/mcp/summary`).
#[derive(Clone, Debug, PartialEq, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsageSummary<F = UsageFigures> {
    #[serde(flatten)]
    pub figures: F,
    pub sessions: i64,
    pub tools: i64,
    pub agents: i64,
}

/// One session (`/analytics/mcp/sessions`).
#[derive(Clone, Debug, PartialEq, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionUsage<F = UsageFigures> {
    pub session_id: String,
    pub agent_id: String,
    #[serde(serialize_with = "ser_ms")]
    #[schema(value_type = String, format = DateTime)]
    pub first_seen: i64,
    #[serde(serialize_with = "ser_ms")]
    #[schema(value_type = String, format = DateTime)]
    pub last_seen: i64,
    /// Whether a `SESSION_END` heartbeat closed it.
    pub ended: bool,
    /// Distinct tools called in the session.
    pub tools: i64,
    #[serde(flatten)]
    pub figures: F,
}

/// One session with its per-tool breakdown (`/analytics/mcp/sessions/{sessionId}`).
#[derive(Clone, Debug, PartialEq, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionDetail<F = UsageFigures> {
    #[serde(flatten)]
    pub session: SessionUsage<F>,
    /// One page of the session's tools (`limit`, `cursor`), highest revenue first, then by
    /// name; `tools` counts them all.
    pub by_tool: Vec<SessionToolUsage<F>>,
    /// The `cursor` of the next page of `byTool`; `null` on the last. Stores leave it unset
    /// and the API fills it.
    pub next_cursor: Option<String>,
    /// Until when the session is on its tenant's kill list (a hard limit or the margin guard
    /// stopped it); `null` when it is not. From the guard state, not the store: stores leave
    /// it unset and the API fills it.
    #[serde(rename = "killedUntil", serialize_with = "ser_opt_ms")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub killed_until_ms: Option<i64>,
}

/// One tool's share of a session.
#[derive(Clone, Debug, PartialEq, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionToolUsage<F = UsageFigures> {
    pub tool_name: String,
    #[serde(flatten)]
    pub figures: F,
}

/// `GET /analytics/mcp/revenue/by-tool`: the days covered, then one page of rows, one per
/// tool, highest revenue first, then by name.
#[derive(Clone, Debug, PartialEq, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ByToolReport<F = UsageFigures> {
    pub from: String,
    pub to: String,
    pub tools: Vec<ToolUsage<F>>,
    /// The `cursor` of the next page; `null` on the last.
    pub next_cursor: Option<String>,
}

/// `GET /analytics/mcp/by-customer`: the days covered, then one page of rows, one per
/// customer, highest revenue first, then by customer id (the calls without one first).
#[derive(Clone, Debug, PartialEq, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ByCustomerReport<F = UsageFigures> {
    pub from: String,
    pub to: String,
    pub customers: Vec<CustomerUsage<F>>,
    /// The `cursor` of the next page; `null` on the last.
    pub next_cursor: Option<String>,
}

/// `GET /analytics/mcp/by-agent`
#[derive(Clone, Debug, PartialEq, Serialize, ToSchema)]
pub struct ByAgentReport<F = UsageFigures> {
    pub from: String,
    pub to: String,
    pub agents: Vec<AgentUsage<F>>,
}

/// `GET /analytics/mcp/summary`
#[derive(Clone, Debug, PartialEq, Serialize, ToSchema)]
pub struct SummaryReport<F = UsageFigures> {
    pub from: String,
    pub to: String,
    #[serde(flatten)]
    pub summary: UsageSummary<F>,
}

/// `GET /analytics/mcp/sessions`
#[derive(Clone, Debug, PartialEq, Serialize, ToSchema)]
pub struct SessionsReport<F = UsageFigures> {
    pub from: String,
    pub to: String,
    pub sessions: Vec<SessionUsage<F>>,
}

/// How long one point of a time series is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Interval {
    /// UTC hours, read from the hourly rollup; a range of at most [`MAX_HOURLY_DAYS`].
    Hour,
    /// UTC days, read from the daily rollup.
    Day,
}

/// Longest range an hourly series may cover: 31 days is 744 points per series.
pub const MAX_HOURLY_DAYS: i64 = 31;

/// What a time series is split by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum GroupBy {
    Tool,
    Agent,
    Customer,
}

impl GroupBy {
    /// The rollup column that holds the group's name.
    pub fn column(self) -> &'static str {
        match self {
            GroupBy::Tool => "tool_name",
            GroupBy::Agent => "agent_id",
            GroupBy::Customer => "customer_id",
        }
    }
}

/// What `GET /analytics/mcp/timeseries` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeriesQuery {
    pub range: DateRange,
    pub interval: Interval,
    /// `None`: one series of the totals.
    pub group_by: Option<GroupBy>,
}

impl SeriesQuery {
    /// Checks that an hourly series stays within [`MAX_HOURLY_DAYS`].
    pub fn new(
        range: DateRange,
        interval: Interval,
        group_by: Option<GroupBy>,
    ) -> Result<SeriesQuery, String> {
        let days = (range.to - range.from).num_days() + 1;
        if interval == Interval::Hour && days > MAX_HOURLY_DAYS {
            return Err(format!(
                "interval=hour covers at most {MAX_HOURLY_DAYS} days (asked {days}: {} to {}); \
narrow from/to or use interval=day",
                range.from_str_day(),
                range.to_str_day()
            ));
        }
        Ok(SeriesQuery {
            range,
            interval,
            group_by,
        })
    }
}

/// One bucket of a series, as stores read it: the group's name, the bucket's first
/// millisecond, the sums. Stores answer these ordered by group, then bucket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeriesRow {
    pub key: String,
    pub start_ms: i64,
    pub figures: UsageFigures,
}

/// One point: a bucket with usage (buckets without are left out).
#[derive(Clone, Debug, PartialEq, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SeriesPoint<F = UsageFigures> {
    /// The bucket's first instant (RFC 3339, UTC).
    #[serde(serialize_with = "ser_ms")]
    #[schema(value_type = String, format = DateTime)]
    pub start: i64,
    #[serde(flatten)]
    pub figures: F,
}

/// One group's series with its totals over the range.
#[derive(Clone, Debug, PartialEq, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Series<F = UsageFigures> {
    /// The tool, agent or customer; `null` for the totals when nothing is grouped.
    pub key: Option<String>,
    #[serde(flatten)]
    pub figures: F,
    pub points: Vec<SeriesPoint<F>>,
}

/// `GET /analytics/mcp/timeseries`
#[derive(Clone, Debug, PartialEq, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TimeSeriesReport<F = UsageFigures> {
    pub from: String,
    pub to: String,
    pub interval: Interval,
    pub group_by: Option<GroupBy>,
    pub series: Vec<Series<F>>,
}

impl ForCustomer for UsageFigures {
    type Customer = SpendFigures;
    fn for_customer(self) -> SpendFigures {
        SpendFigures {
            calls: self.calls,
            errors: self.errors,
            revenue_micros: self.revenue_micros,
            input_tokens: self.input_tokens,
            output_tokens: self.output_tokens,
            duration_ms_sum: self.duration_ms_sum,
            avg_duration_ms: self.avg_duration_ms(),
            max_duration_ms: self.duration_ms_max,
        }
    }
}

/// Each row and report in its customer's type, field by field: a struct literal names every
/// field, so a field added to a row does not compile until it is listed here.
macro_rules! for_customer {
    ($($row:ident { $($same:ident),* ; $($mapped:ident),* })*) => {$(
        impl ForCustomer for $row {
            type Customer = $row<SpendFigures>;
            fn for_customer(self) -> $row<SpendFigures> {
                $row { $($same: self.$same,)* $($mapped: self.$mapped.for_customer(),)* }
            }
        }
    )*};
}

for_customer! {
    ToolUsage { tool_name, sessions; figures }
    CustomerUsage { customer_id, sessions; figures }
    DayUsage { date, sessions; figures }
    AgentUsage { agent_id, sessions; figures, daily }
    UsageSummary { sessions, tools, agents; figures }
    SessionUsage { session_id, agent_id, first_seen, last_seen, ended, tools; figures }
    SessionDetail { killed_until_ms, next_cursor; session, by_tool }
    SessionToolUsage { tool_name; figures }
    SeriesPoint { start; figures }
    Series { key; figures, points }
    ByToolReport { from, to, next_cursor; tools }
    ByCustomerReport { from, to, next_cursor; customers }
    ByAgentReport { from, to; agents }
    SummaryReport { from, to; summary }
    SessionsReport { from, to; sessions }
    TimeSeriesReport { from, to, interval, group_by; series }
}

fn ser_ms<S: Serializer>(ms: &i64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_ms(*ms))
}

fn ser_opt_ms<S: Serializer>(ms: &Option<i64>, s: S) -> Result<S::Ok, S::Error> {
    match ms {
        Some(ms) => s.serialize_str(&format_ms(*ms)),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn day(s: &str) -> NaiveDate {
        NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap()
    }

    #[test]
    fn ranges_default_to_thirty_days_ending_today() {
        let r = DateRange::parse(None, None, day("2026-11-21")).unwrap();
        assert_eq!(
            (r.from_str_day(), r.to_str_day()),
            ("2026-10-23".into(), "2026-11-21".into())
        );
    }

    #[test]
    fn ranges_accept_days_and_timestamps_and_refuse_nonsense() {
        let today = day("2026-11-21");
        let r =
            DateRange::parse(Some("2026-11-01T23:30:00-02:00"), Some("2026-11-05"), today).unwrap();
        assert_eq!(r.from, day("2026-11-02")); // its UTC day
        assert!(DateRange::parse(Some("11/01/2026"), None, today)
            .unwrap_err()
            .contains("not a date"));
        assert!(
            DateRange::parse(Some("2026-11-06"), Some("2026-11-05"), today)
                .unwrap_err()
                .contains("after")
        );
        assert!(DateRange::parse(Some("2000-01-01"), None, today)
            .unwrap_err()
            .contains("longer"));
        assert_eq!(r.bounds_ms().1 - r.bounds_ms().0, 4 * 86_400_000);
    }

    #[test]
    fn figures_serialize_with_derived_margin_and_average() {
        let f = UsageFigures {
            calls: 2,
            errors: 1,
            revenue_micros: 7550,
            cogs_micros: 1529,
            input_tokens: 1,
            output_tokens: 2,
            duration_ms_sum: 1085,
            duration_ms_max: 542,
        };
        let json = serde_json::to_string(&f).unwrap();
        assert_eq!(
            json,
            r#"{"calls":2,"errors":1,"revenueMicros":7550,"cogsMicros":1529,"grossProfitMicros":6021,"margin":0.7975,"inputTokens":1,"outputTokens":2,"durationMsSum":1085,"avgDurationMs":542,"maxDurationMs":542}"#
        );
        assert_eq!(margin(0, 5), None);
        assert_eq!(margin(100, 150), Some(-0.5));
    }
}
