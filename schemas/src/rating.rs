//! Rating: prices and costs from the tenant's own rate plan, never from the client.
//!
//! A tenant has versioned rate plans; the one in effect at an event's `occurredAt` rates it. A
//! plan names, per tool (with a `*` default), a price (what the agent pays: revenue) and a cost
//! (what the call costs the operator: COGS). Each is a [`Charge`] of four components. All four
//! are summed exactly at a scale of 10⁻¹² µUSD and rounded once per event, half to even.

use crate::event::{RatedEvent, ValidEvent};
use crate::money::{div_round_half_even, Rate, SCALE};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The tool key that rates every tool the plan does not name.
pub const DEFAULT_TOOL: &str = "*";

/// One side of a tool's rate: the price or the cost of a call.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Charge {
    /// µUSD per unit of `quantity` (one call is quantity 1).
    #[serde(default)]
    pub per_call: Rate,
    /// µUSD per input token (`metadata.inputTokens`); may be fractional.
    #[serde(default)]
    pub per_input_token: Rate,
    /// µUSD per output token (`metadata.outputTokens`); may be fractional.
    #[serde(default)]
    pub per_output_token: Rate,
    /// µUSD per second of `executionDurationMs`; may be fractional.
    #[serde(default)]
    pub per_second: Rate,
}

/// What one tool's calls are priced at and cost.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolRate {
    #[serde(default)]
    pub price: Charge,
    #[serde(default)]
    pub cost: Charge,
}

/// One version of a tenant's rate plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RatePlan {
    /// Stamped on every event it rates (`rate_plan_version`); unique and increasing per tenant.
    pub version: u32,
    /// Events that occurred at or after this instant use this version, until the next one
    /// starts. Absent: in effect since the beginning.
    #[serde(default)]
    pub effective_from: Option<DateTime<Utc>>,
    /// Rates by tool name; `"*"` rates every tool not listed and must be present.
    pub tools: BTreeMap<String, ToolRate>,
}

impl RatePlan {
    pub fn rate_for(&self, tool_name: &str) -> &ToolRate {
        self.tools
            .get(tool_name)
            .or_else(|| self.tools.get(DEFAULT_TOOL))
            .expect("validated plans have a `*` rate")
    }

    fn effective_from_ms(&self) -> i64 {
        self.effective_from
            .map(|t| t.timestamp_millis())
            .unwrap_or(i64::MIN)
    }
}

/// The usage figures that rates apply to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    /// Millionths of a unit (`Quantity::scaled`).
    pub quantity_scaled: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub duration_ms: i64,
}

impl Charge {
    /// The charge for `usage` in µUSD: the exact sum of every component, rounded once half to
    /// even. `None` if it does not fit an `i64` (a rate or quantity far beyond any real bill).
    pub fn amount_micros(&self, usage: Usage) -> Option<i64> {
        // Every term is brought to 10⁻¹² µUSD: rates carry 10⁻⁶ µUSD, a quantity 10⁻⁶ units,
        // a duration 10⁻³ seconds.
        let scale = SCALE as i128;
        let total = self.per_call.scaled() as i128 * usage.quantity_scaled as i128
            + self.per_input_token.scaled() as i128 * usage.input_tokens as i128 * scale
            + self.per_output_token.scaled() as i128 * usage.output_tokens as i128 * scale
            + self.per_second.scaled() as i128 * usage.duration_ms as i128 * 1000;
        i64::try_from(div_round_half_even(total, scale * scale)).ok()
    }
}

/// A tenant's rate plans, ordered by version.
#[derive(Clone, Debug, Default)]
pub struct RatePlans {
    plans: Vec<RatePlan>,
}

impl RatePlans {
    /// `plans` must have passed config validation (unique versions, `*` in each).
    pub fn new(mut plans: Vec<RatePlan>) -> RatePlans {
        plans.sort_by_key(|p| p.version);
        RatePlans { plans }
    }

    /// The plan in effect at `occurred_at_ms`: the latest version that had started by then.
    pub fn plan_at(&self, occurred_at_ms: i64) -> Option<&RatePlan> {
        self.plans
            .iter()
            .rev()
            .find(|p| p.effective_from_ms() <= occurred_at_ms)
    }

    /// Prices an event and stamps it. Heartbeats are never billed: zero amounts, version 0.
    pub fn rate(&self, event: ValidEvent, received_at_ms: i64) -> Result<RatedEvent, String> {
        let (revenue_micros, cogs_micros, rate_plan_version) = if event.is_heartbeat() {
            (0, 0, 0)
        } else {
            let plan = self.plan_at(event.occurred_at_ms).ok_or_else(|| {
                "no rate plan is in effect at occurredAt; the earliest plan starts later"
                    .to_string()
            })?;
            let rate = plan.rate_for(&event.tool_name);
            let usage = Usage {
                quantity_scaled: event.quantity.scaled(),
                input_tokens: event.input_tokens,
                output_tokens: event.output_tokens,
                duration_ms: event.execution_duration_ms,
            };
            let too_large = || "the event's amount exceeds the largest billable amount".to_string();
            let revenue = rate.price.amount_micros(usage).ok_or_else(too_large)?;
            let cogs = rate.cost.amount_micros(usage).ok_or_else(too_large)?;
            (revenue, cogs, plan.version)
        };
        Ok(RatedEvent {
            idempotency_key: event.idempotency_key,
            legacy_idempotency_key: event.legacy_idempotency_key,
            occurred_at_ms: event.occurred_at_ms,
            received_at_ms,
            metric_name: event.metric_name,
            product_type: event.product_type,
            tool_name: event.tool_name,
            agent_id: event.agent_id,
            customer_id: event.customer_id,
            session_id: event.session_id,
            execution_status: event.execution_status,
            execution_duration_ms: event.execution_duration_ms,
            session_boundary: event.session_boundary,
            quantity_micros: event.quantity.scaled(),
            input_tokens: event.input_tokens,
            output_tokens: event.output_tokens,
            revenue_micros,
            cogs_micros,
            rate_plan_version,
            metadata: event.metadata,
        })
    }
}

/// The plan `serve` gives its demo tenant: every tool at the same rates.
pub fn demo_rate_plan() -> RatePlan {
    let micros = Rate::from_micros;
    let mut tools = BTreeMap::new();
    tools.insert(
        DEFAULT_TOOL.to_string(),
        ToolRate {
            price: Charge {
                per_call: micros(5000),
                per_input_token: micros(1),
                per_output_token: micros(3),
                per_second: Rate::ZERO,
            },
            cost: Charge {
                per_call: micros(200),
                per_input_token: "0.5".parse().expect("literal"),
                per_output_token: "1.5".parse().expect("literal"),
                per_second: micros(100),
            },
        },
    );
    RatePlan {
        version: 1,
        effective_from: None,
        tools,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{ExecutionStatus, HEARTBEAT_METRIC};
    use crate::money::Quantity;

    fn usage(quantity: i64, input: i64, output: i64, ms: i64) -> Usage {
        Usage {
            quantity_scaled: quantity * SCALE,
            input_tokens: input,
            output_tokens: output,
            duration_ms: ms,
        }
    }

    fn charge(call: &str, input: &str, output: &str, second: &str) -> Charge {
        Charge {
            per_call: call.parse().unwrap(),
            per_input_token: input.parse().unwrap(),
            per_output_token: output.parse().unwrap(),
            per_second: second.parse().unwrap(),
        }
    }

    fn seed() -> ValidEvent {
        ValidEvent {
            idempotency_key: "k".into(),
            legacy_idempotency_key: None,
            occurred_at_ms: 1_000,
            metric_name: "mcp_server.tool_invocations".into(),
            product_type: "MCP_SERVER".into(),
            tool_name: "web_search".into(),
            agent_id: "agent_gpt4o_prod".into(),
            customer_id: String::new(),
            session_id: "sess_abc123".into(),
            execution_status: ExecutionStatus::Success,
            execution_duration_ms: 542,
            session_boundary: String::new(),
            quantity: Quantity::ONE,
            input_tokens: 1200,
            output_tokens: 450,
            metadata: None,
        }
    }

    #[test]
    fn the_seed_event_on_the_demo_plan_is_7550_revenue_1529_cogs() {
        let plans = RatePlans::new(vec![demo_rate_plan()]);
        let rated = plans.rate(seed(), 2_000).unwrap();
        assert_eq!(rated.revenue_micros, 7550); // 5000 + 1200×1 + 450×3
        assert_eq!(rated.cogs_micros, 1529); // 200 + 600 + 675 + 54.2 = 1529.2
        assert_eq!(rated.rate_plan_version, 1);
        assert_eq!(rated.received_at_ms, 2_000);
    }

    #[test]
    fn each_component_charges_alone() {
        assert_eq!(
            charge("7", "0", "0", "0").amount_micros(usage(3, 9, 9, 9)),
            Some(21)
        );
        assert_eq!(
            charge("0", "2", "0", "0").amount_micros(usage(3, 9, 9, 9)),
            Some(18)
        );
        assert_eq!(
            charge("0", "0", "5", "0").amount_micros(usage(3, 9, 8, 9)),
            Some(40)
        );
        // 100 µUSD/s for 2.5 s.
        assert_eq!(
            charge("0", "0", "0", "100").amount_micros(usage(1, 0, 0, 2500)),
            Some(250)
        );
    }

    #[test]
    fn fractional_quantity_scales_the_per_call_rate() {
        let q = Usage {
            quantity_scaled: 2_500_000,
            ..usage(0, 0, 0, 0)
        };
        assert_eq!(charge("3", "0", "0", "0").amount_micros(q), Some(8)); // 7.5 → 8 (even)
        let q = Usage {
            quantity_scaled: 1_500_000,
            ..q
        };
        assert_eq!(charge("3", "0", "0", "0").amount_micros(q), Some(4)); // 4.5 → 4 (even)
    }

    #[test]
    fn fractions_are_summed_exactly_then_rounded_once() {
        // 0.3 + 0.3 per token on separate components would round to 0 each; summed: 0.6 → 1.
        assert_eq!(
            charge("0", "0.3", "0.3", "0").amount_micros(usage(1, 1, 1, 0)),
            Some(1)
        );
        // One token at 0.5 is a tie: rounds to the even 0; three tokens at 0.5 is 1.5 → 2.
        assert_eq!(
            charge("0", "0.5", "0", "0").amount_micros(usage(1, 1, 0, 0)),
            Some(0)
        );
        assert_eq!(
            charge("0", "0.5", "0", "0").amount_micros(usage(1, 3, 0, 0)),
            Some(2)
        );
        // 0.000001 µUSD/token × 10⁶ tokens = exactly 1.
        assert_eq!(
            charge("0", "0.000001", "0", "0").amount_micros(usage(1, 1_000_000, 0, 0)),
            Some(1)
        );
        // 1 ms at 0.001 µUSD/s is 10⁻⁶ µUSD: rounds to 0, never drifts.
        assert_eq!(
            charge("0", "0", "0", "0.001").amount_micros(usage(1, 0, 0, 1)),
            Some(0)
        );
        // 1529.5 rounds up to the even 1530.
        assert_eq!(
            charge("0", "0", "0", "1529.5").amount_micros(usage(1, 0, 0, 1000)),
            Some(1530)
        );
    }

    #[test]
    fn an_amount_beyond_i64_is_refused_not_wrapped() {
        let huge = charge("9000000000000", "0", "0", "0");
        assert_eq!(huge.amount_micros(usage(1_000_000_000, 0, 0, 0)), None);
    }

    #[test]
    fn the_plan_in_effect_at_occurred_at_rates_the_event() {
        let mut v2 = demo_rate_plan();
        v2.version = 2;
        v2.effective_from = Some("1970-01-01T00:00:05Z".parse().unwrap());
        v2.tools.insert(
            "web_search".into(),
            ToolRate {
                price: charge("1", "0", "0", "0"),
                cost: Charge::default(),
            },
        );
        let plans = RatePlans::new(vec![v2, demo_rate_plan()]);
        let before = plans.rate(seed(), 0).unwrap();
        assert_eq!((before.rate_plan_version, before.revenue_micros), (1, 7550));
        let after = plans
            .rate(
                ValidEvent {
                    occurred_at_ms: 5_000,
                    ..seed()
                },
                0,
            )
            .unwrap();
        assert_eq!((after.rate_plan_version, after.revenue_micros), (2, 1));
        let other_tool = plans
            .rate(
                ValidEvent {
                    occurred_at_ms: 5_000,
                    tool_name: "other".into(),
                    ..seed()
                },
                0,
            )
            .unwrap();
        assert_eq!(other_tool.revenue_micros, 7550); // the `*` rate of v2
    }

    #[test]
    fn an_event_before_every_plan_fails_with_a_reason() {
        let mut late = demo_rate_plan();
        late.effective_from = Some("1970-01-01T00:00:05Z".parse().unwrap());
        let err = RatePlans::new(vec![late]).rate(seed(), 0).unwrap_err();
        assert!(err.starts_with("no rate plan is in effect"));
    }

    #[test]
    fn heartbeats_are_never_billed() {
        let plans = RatePlans::new(vec![demo_rate_plan()]);
        let hb = ValidEvent {
            metric_name: HEARTBEAT_METRIC.into(),
            ..seed()
        };
        let rated = plans.rate(hb, 0).unwrap();
        assert_eq!((rated.revenue_micros, rated.cogs_micros), (0, 0));
        assert!(!rated.is_call());
    }
}
