//! `[[tenants]]`: each tenant's API keys and their scopes and rate limits, rate plans, hard
//! limits and margin thresholds.

use crate::guard::MarginThresholds;
use crate::rating::RatePlan;
use serde::Deserialize;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// The tenant's id: letters, digits, `_`, `-`, `.`; at most 64 characters.
    pub id: String,
    #[serde(default)]
    pub api_keys: Vec<ApiKeyConfig>,
    #[serde(default)]
    pub rate_plans: Vec<RatePlan>,
    /// Hard limits: a call past one is still stored and billed, and kills its session.
    #[serde(default)]
    pub limits: Vec<LimitConfig>,
    /// Spend caps per customer (the event's `customerId`), checked by `POST /v1/authorize`:
    /// settled and reserved spend in the window plus the call's quote must stay within.
    #[serde(default)]
    pub customer_caps: Vec<CustomerCapConfig>,
    /// Most authorized calls in flight per customer (reserved and not yet settled or
    /// released); absent: no limit.
    #[serde(default)]
    pub max_in_flight_per_customer: Option<u32>,
    /// Refuse `POST /v1/authorize` for a customer that was never granted credits, instead of
    /// treating it as postpaid (caps only): no customer id runs paid calls by accident.
    #[serde(default)]
    pub prepaid_only: bool,
    /// Most distinct tool names the tenant's calls may name, ever: an event naming a new one
    /// past it is refused (its own error in the ingest answer), so a client that invents names
    /// cannot grow the store and the analytics without bound.
    #[serde(default = "default_max_tool_names")]
    pub max_tool_names: u32,
    /// Margin levels of the tenant's agents and tools (defaults: 20%, 10%, 0%).
    #[serde(default)]
    pub margin_guard: MarginThresholdsConfig,
}

/// The most a limit may allow per window: ten million USD in µUSD (or as many calls). Keeps
/// every counter exact in Redis's Lua, whose numbers print with 14 significant digits.
pub const MAX_LIMIT: i64 = 10_000_000_000_000;

/// One hard limit: calls or spend per session or per agent, per window.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitConfig {
    /// What each counter follows: every `session`, or every `agent` (all its sessions).
    pub per: LimitSubject,
    /// The window counters start over in: `hour`, `day` or `month` (UTC).
    pub window: LimitWindow,
    /// Most calls per subject and window.
    #[serde(default)]
    pub max_calls: Option<i64>,
    /// Most revenue (what the agent is charged) per subject and window, in µUSD.
    #[serde(default)]
    pub max_spend_micros: Option<i64>,
}

/// A customer's spend cap: at most `max_spend_micros` of revenue per window (UTC).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomerCapConfig {
    /// `hour`, `day` or `month`.
    pub window: LimitWindow,
    /// Most revenue (settled plus reserved) per customer and window, in µUSD.
    pub max_spend_micros: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitSubject {
    Session,
    Agent,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitWindow {
    Hour,
    Day,
    Month,
}

impl LimitWindow {
    /// The UTC window holding `at_ms`: its first millisecond and the first after it.
    pub fn bounds(self, at_ms: i64) -> (i64, i64) {
        use chrono::{Datelike, TimeZone, Utc};
        const HOUR: i64 = 3_600_000;
        const DAY: i64 = 86_400_000;
        match self {
            LimitWindow::Hour => {
                let start = at_ms.div_euclid(HOUR) * HOUR;
                (start, start + HOUR)
            }
            LimitWindow::Day => {
                let start = at_ms.div_euclid(DAY) * DAY;
                (start, start + DAY)
            }
            LimitWindow::Month => {
                let at = Utc
                    .timestamp_millis_opt(at_ms)
                    .single()
                    .expect("a valid time");
                let first = |y: i32, m: u32| {
                    Utc.with_ymd_and_hms(y, m, 1, 0, 0, 0)
                        .single()
                        .expect("a month start")
                        .timestamp_millis()
                };
                let (y, m) = (at.year(), at.month());
                let next = if m == 12 {
                    first(y + 1, 1)
                } else {
                    first(y, m + 1)
                };
                (first(y, m), next)
            }
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            LimitWindow::Hour => "hour",
            LimitWindow::Day => "day",
            LimitWindow::Month => "month",
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// A label for people (`sdk-prod`, `finance-export`); never sent by clients.
    pub name: String,
    /// SHA-256 of the key, lower-case hex (`mcp-meter keys new` prints both).
    pub sha256: String,
    /// What the key may do.
    pub scopes: Vec<Scope>,
    /// Most requests this key may make, as a token bucket; none: unlimited.
    #[serde(default)]
    pub rate_limit: Option<RateLimitConfig>,
}

/// A token bucket: `burst` requests at once, refilled at `requests_per_second`. Past it a
/// request is answered 429 with Retry-After. Shared through Redis by every ingestor.
#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Sustained requests per second (may be fractional: 0.5 is one every two seconds).
    pub requests_per_second: f64,
    /// Requests that may come at once after a quiet spell; at least 1.
    pub burst: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Post usage events and heartbeats.
    Ingest,
    /// Read analytics.
    Read,
    /// Pull billing exports.
    Export,
    /// Everything.
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Ingest => "ingest",
            Scope::Read => "read",
            Scope::Export => "export",
            Scope::Admin => "admin",
        }
    }
}

/// A tenant's margin thresholds, as fractions (0.20 = 20%) in whole basis points: a margin
/// below one puts the agent or tool at that level.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MarginThresholdsConfig {
    /// L1 WARN below this margin.
    #[serde(default = "default_warn_below")]
    pub warn_below: f64,
    /// L2 THROTTLE below this margin.
    #[serde(default = "default_throttle_below")]
    pub throttle_below: f64,
    /// L3 BLOCK below this margin.
    #[serde(default)]
    pub block_below: f64,
}

impl MarginThresholdsConfig {
    /// The thresholds in basis points; `Err` names the setting that is not a whole basis point
    /// from -1 to 1.
    pub fn thresholds(&self) -> Result<MarginThresholds, String> {
        let bp = |name: &str, v: f64| {
            let scaled = v * 10_000.0;
            if !(-1.0..=1.0).contains(&v) || (scaled - scaled.round()).abs() > 1e-6 {
                return Err(format!(
                    "margin_guard.{name} must be a fraction from -1 to 1 in whole basis points, like 0.2 or 0.125 (got {v})"
                ));
            }
            Ok(scaled.round() as i64)
        };
        let t = MarginThresholds {
            warn_below_bp: bp("warn_below", self.warn_below)?,
            throttle_below_bp: bp("throttle_below", self.throttle_below)?,
            block_below_bp: bp("block_below", self.block_below)?,
        };
        if !(t.block_below_bp <= t.throttle_below_bp && t.throttle_below_bp <= t.warn_below_bp) {
            return Err(format!(
                "margin_guard thresholds must satisfy block_below <= throttle_below <= warn_below (got {}, {}, {})",
                self.block_below, self.throttle_below, self.warn_below
            ));
        }
        Ok(t)
    }
}

fn default_max_tool_names() -> u32 {
    1000
}

fn default_warn_below() -> f64 {
    0.20
}
fn default_throttle_below() -> f64 {
    0.10
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_windows_are_utc_hours_days_and_months() {
        let at = 1_795_181_530_000; // 2026-11-20T13:32:10Z
        let hour = LimitWindow::Hour.bounds(at);
        assert_eq!(hour, (1_795_179_600_000, 1_795_183_200_000));
        assert_eq!(
            LimitWindow::Day.bounds(at),
            (1_795_132_800_000, 1_795_219_200_000)
        );
        let (start, end) = LimitWindow::Month.bounds(at);
        assert_eq!(start, 1_793_491_200_000); // 2026-11-01
        assert_eq!(end, 1_796_083_200_000); // 2026-12-01
                                            // December ends at the next year's first day; January 2027 ends on 1 February.
        assert_eq!(
            LimitWindow::Month.bounds(1_798_675_200_000).1,
            1_798_761_600_000
        );
        assert_eq!(
            LimitWindow::Month.bounds(1_798_761_600_005).1,
            1_801_440_000_000
        );
    }
}
