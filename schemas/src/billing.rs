//! The billing export's vocabulary: the period asked for, one line per customer, agent and tool,
//! and their CSV and JSON spellings. Pure: the HTTP side streams these as pages arrive.

use crate::analytics::{DateRange, UsageFigures};
use crate::money::micros_to_usd;
use chrono::{Datelike, NaiveDate};
use serde::Serialize;
use utoipa::ToSchema;

/// A calendar month (UTC), `YYYY-MM`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BillingPeriod {
    first_day: NaiveDate,
}

impl BillingPeriod {
    pub fn parse(text: &str) -> Result<BillingPeriod, String> {
        let bad = || format!("period `{text}` is not a month like 2026-11 (YYYY-MM)");
        let (year, month) = text.split_once('-').ok_or_else(bad)?;
        if year.len() != 4 || month.len() != 2 {
            return Err(bad());
        }
        let year: i32 = year.parse().map_err(|_| bad())?;
        let month: u32 = month.parse().map_err(|_| bad())?;
        let first_day = NaiveDate::from_ymd_opt(year, month, 1).ok_or_else(bad)?;
        if year < 1970 {
            return Err(bad());
        }
        Ok(BillingPeriod { first_day })
    }

    /// Its days, first to last, as analytics ranges are given.
    pub fn range(&self) -> DateRange {
        let next = self
            .first_day
            .checked_add_months(chrono::Months::new(1))
            .expect("a month after a valid one");
        DateRange {
            from: self.first_day,
            to: next.pred_opt().expect("the day before a month's first"),
        }
    }

    pub fn as_string(&self) -> String {
        format!("{:04}-{:02}", self.first_day.year(), self.first_day.month())
    }
}

/// Which lines an export holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BillingQuery {
    pub range: DateRange,
    /// Only this customer's lines.
    pub customer_id: Option<String>,
    /// Only this agent's lines.
    pub agent_id: Option<String>,
}

/// What orders lines, and where the next page starts (after this key).
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct BillingKey {
    pub customer_id: String,
    pub agent_id: String,
    pub tool_name: String,
}

/// One customer's use of one tool by one agent over the period.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BillingLine {
    pub key: BillingKey,
    pub figures: UsageFigures,
}

/// The CSV columns, in order. `line` is `usage` for a line, `total` for the period's totals.
pub const CSV_HEADER: &str = "period,line,customer_id,agent_id,tool_name,calls,errors,\
input_tokens,output_tokens,duration_ms,revenue_micros,revenue_usd,cogs_micros,cogs_usd\r\n";

/// The columns a customer's own export has (a portal token's): the operator's costs left out.
pub const CSV_HEADER_WITHOUT_COSTS: &str = "period,line,customer_id,agent_id,tool_name,calls,\
errors,input_tokens,output_tokens,duration_ms,revenue_micros,revenue_usd\r\n";

/// The figures an export shows, one spelling for its JSON fields and its CSV columns: the
/// operator's ([`BillingFigures`], with COGS) or a customer's ([`BillingSpendFigures`],
/// without).
pub trait ExportFigures: Serialize + for<'a> From<&'a UsageFigures> {
    /// The header row of a CSV export.
    const CSV_HEADER: &'static str;
    /// Whose view these figures are, as a JSON export's `view` says it.
    const VIEW: &'static str;
    /// The figures' CSV columns, in the header's order.
    fn csv_columns(self) -> Vec<String>;
}

/// One CSV record (RFC 4180: CRLF, fields quoted when they hold a comma, quote or line break)
/// with the figures `F` shows. Totals have empty customer, agent and tool.
pub fn csv_record<F: ExportFigures>(
    period: &str,
    key: Option<&BillingKey>,
    figures: &UsageFigures,
) -> String {
    let (kind, customer, agent, tool) = match key {
        Some(k) => ("usage", &*k.customer_id, &*k.agent_id, &*k.tool_name),
        None => ("total", "", "", ""),
    };
    let mut out = String::with_capacity(160);
    for field in [period, kind, customer, agent, tool] {
        push_csv_field(&mut out, field);
        out.push(',');
    }
    out.push_str(&F::from(figures).csv_columns().join(","));
    out.push_str("\r\n");
    out
}

/// A text field of a CSV record. One a spreadsheet would take for a formula (it begins with
/// `=`, `+`, `-`, `@`, a tab or a carriage return: a client's `clientInfo.name` of
/// `=HYPERLINK(…)` becomes an agent id) is neutralized as OWASP advises: a `'` before it, so it
/// reads as text. Then RFC 4180 quoting.
fn push_csv_field(out: &mut String, field: &str) {
    let neutralized;
    let field = if field.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        neutralized = format!("'{field}");
        neutralized.as_str()
    } else {
        field
    };
    if field.contains([',', '"', '\r', '\n']) {
        out.push('"');
        out.push_str(&field.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(field);
    }
}

// The one spelling of an export's figures: the JSON fields, and the CSV columns in the same
// order, µUSD and decimal USD strings side by side.
/// The figures of a customer's own export line or totals (a portal token's): its usage and
/// what it was charged, without the operator's costs.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BillingSpendFigures {
    pub calls: i64,
    pub errors: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    /// Sum of the calls' durations.
    pub duration_ms: i64,
    pub revenue_micros: i64,
    /// revenueMicros as decimal USD with six decimals, e.g. `"0.007550"`.
    pub revenue_usd: String,
}

impl From<&UsageFigures> for BillingSpendFigures {
    fn from(f: &UsageFigures) -> BillingSpendFigures {
        BillingSpendFigures {
            calls: f.calls,
            errors: f.errors,
            input_tokens: f.input_tokens,
            output_tokens: f.output_tokens,
            duration_ms: f.duration_ms_sum,
            revenue_micros: f.revenue_micros,
            revenue_usd: micros_to_usd(f.revenue_micros),
        }
    }
}

impl ExportFigures for BillingSpendFigures {
    const CSV_HEADER: &'static str = CSV_HEADER_WITHOUT_COSTS;
    const VIEW: &'static str = "customer";
    fn csv_columns(self) -> Vec<String> {
        let f = &self;
        let numbers = [
            f.calls,
            f.errors,
            f.input_tokens,
            f.output_tokens,
            f.duration_ms,
        ];
        let mut columns: Vec<String> = numbers.iter().map(i64::to_string).collect();
        columns.extend([self.revenue_micros.to_string(), self.revenue_usd]);
        columns
    }
}

/// The figures of a billing line or of the period's totals, for the operator: the customer's
/// figures, then what the calls cost.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BillingFigures {
    #[serde(flatten)]
    pub spend: BillingSpendFigures,
    pub cogs_micros: i64,
    /// cogsMicros as decimal USD with six decimals.
    pub cogs_usd: String,
}

impl From<&UsageFigures> for BillingFigures {
    fn from(f: &UsageFigures) -> BillingFigures {
        BillingFigures {
            spend: f.into(),
            cogs_micros: f.cogs_micros,
            cogs_usd: micros_to_usd(f.cogs_micros),
        }
    }
}

impl ExportFigures for BillingFigures {
    const CSV_HEADER: &'static str = CSV_HEADER;
    const VIEW: &'static str = "tenant";
    fn csv_columns(self) -> Vec<String> {
        let mut columns = self.spend.csv_columns();
        columns.extend([self.cogs_micros.to_string(), self.cogs_usd]);
        columns
    }
}

// A line of a JSON export: its key, then its figures.
/// One customer's use of one tool by one agent over the period.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExportLine<'a, F> {
    /// Empty for events that named no customer.
    pub customer_id: &'a str,
    pub agent_id: &'a str,
    pub tool_name: &'a str,
    #[serde(flatten)]
    pub figures: F,
}

/// One line as JSON, with the figures `F` shows.
pub fn json_line<F: ExportFigures>(line: &BillingLine) -> String {
    serde_json::to_string(&ExportLine {
        customer_id: &line.key.customer_id,
        agent_id: &line.key.agent_id,
        tool_name: &line.key.tool_name,
        figures: F::from(&line.figures),
    })
    .expect("a billing line serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_period_is_a_whole_calendar_month() {
        let p = BillingPeriod::parse("2026-02").unwrap();
        assert_eq!(
            (p.range().from_str_day(), p.range().to_str_day()),
            ("2026-02-01".into(), "2026-02-28".into())
        );
        let dec = BillingPeriod::parse("2026-12").unwrap().range();
        assert_eq!(dec.to_str_day(), "2026-12-31");
        assert_eq!(
            BillingPeriod::parse("2028-02").unwrap().range().to.day(),
            29
        );
        for bad in [
            "2026-13",
            "2026-1",
            "26-11",
            "2026/11",
            "2026-11-01",
            "",
            "1969-12",
        ] {
            let err = BillingPeriod::parse(bad).unwrap_err();
            assert!(err.contains("is not a month like 2026-11"), "{bad}: {err}");
        }
    }

    #[test]
    fn csv_records_quote_what_needs_quoting_and_end_in_crlf() {
        let f = UsageFigures {
            calls: 3,
            errors: 1,
            revenue_micros: 15_120,
            cogs_micros: 960,
            input_tokens: 30,
            output_tokens: 30,
            duration_ms_sum: 3000,
            duration_ms_max: 1000,
        };
        let key = BillingKey {
            customer_id: "acme, inc".into(),
            agent_id: "say \"hi\"".into(),
            tool_name: "web".into(),
        };
        assert_eq!(
            csv_record::<BillingFigures>("2026-11", Some(&key), &f),
            "2026-11,usage,\"acme, inc\",\"say \"\"hi\"\"\",web,3,1,30,30,3000,15120,0.015120,960,0.000960\r\n"
        );
        assert_eq!(
            csv_record::<BillingFigures>("2026-11", None, &f),
            "2026-11,total,,,,3,1,30,30,3000,15120,0.015120,960,0.000960\r\n"
        );
        assert_eq!(CSV_HEADER.matches(',').count(), 13);
        assert_eq!(CSV_HEADER_WITHOUT_COSTS.matches(',').count(), 11);
        assert_eq!(
            csv_record::<BillingSpendFigures>("p", None, &f),
            "p,total,,,,3,1,30,30,3000,15120,0.015120\r\n"
        );
    }

    #[test]
    fn a_field_a_spreadsheet_would_run_as_a_formula_is_neutralized() {
        let f = UsageFigures::default();
        for (agent, cell) in [
            (
                "=HYPERLINK(\"http://x\",\"y\")",
                "\"'=HYPERLINK(\"\"http://x\"\",\"\"y\"\")\"",
            ),
            ("+1", "'+1"),
            ("-2+3", "'-2+3"),
            ("@SUM(A1)", "'@SUM(A1)"),
            ("\tx", "'\tx"),
            ("agent-7", "agent-7"),
        ] {
            let key = BillingKey {
                customer_id: "c".into(),
                agent_id: agent.into(),
                tool_name: "t".into(),
            };
            let record = csv_record::<BillingFigures>("2026-11", Some(&key), &f);
            assert!(
                record.starts_with(&format!("2026-11,usage,c,{cell},t,")),
                "{agent}: {record}"
            );
        }
    }

    #[test]
    fn json_lines_carry_micros_and_usd_strings() {
        let line = BillingLine {
            key: BillingKey {
                customer_id: "c".into(),
                agent_id: "a".into(),
                tool_name: "t".into(),
            },
            figures: UsageFigures {
                calls: 1,
                revenue_micros: 1_234_567,
                ..Default::default()
            },
        };
        assert_eq!(
            json_line::<BillingFigures>(&line),
            r#"{"customerId":"c","agentId":"a","toolName":"t","calls":1,"errors":0,"inputTokens":0,"outputTokens":0,"durationMs":0,"revenueMicros":1234567,"revenueUsd":"1.234567","cogsMicros":0,"cogsUsd":"0.000000"}"#
        );
    }
}
