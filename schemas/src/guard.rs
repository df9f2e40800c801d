//! The margin guard's vocabulary: levels, thresholds, the state the guard writes, and the one
//! decision `GET /v1/guard/check` answers with.
//!
//! Margins are compared exactly: thresholds are whole basis points and the comparison is done
//! in integers, so a margin of exactly 10% is never "below 10%" by a rounding accident.

use crate::event::format_ms;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use utoipa::ToSchema;

/// How healthy a margin is, worst last.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema,
)]
pub enum MarginLevel {
    /// At or above the warn threshold, or nothing to judge yet.
    #[serde(rename = "OK")]
    Ok,
    /// L1: below the warn threshold (default 20%).
    #[serde(rename = "L1_WARN")]
    Warn,
    /// L2: below the throttle threshold (default 10%).
    #[serde(rename = "L2_THROTTLE")]
    Throttle,
    /// L3: below the block threshold (default 0%: every call loses money).
    #[serde(rename = "L3_BLOCK")]
    Block,
}

impl MarginLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            MarginLevel::Ok => "OK",
            MarginLevel::Warn => "L1_WARN",
            MarginLevel::Throttle => "L2_THROTTLE",
            MarginLevel::Block => "L3_BLOCK",
        }
    }

    /// What a caller should do before a tool call at this level.
    pub fn action(self) -> GuardAction {
        match self {
            MarginLevel::Ok | MarginLevel::Warn => GuardAction::Allow,
            MarginLevel::Throttle => GuardAction::Throttle,
            MarginLevel::Block => GuardAction::Block,
        }
    }
}

/// What `GET /v1/guard/check` tells the caller to do with the call it is about to make.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum GuardAction {
    /// Run the call.
    Allow,
    /// Slow down: run the call no sooner than `retryAfterSeconds` from now.
    Throttle,
    /// Do not run the call.
    Block,
}

/// One tenant's thresholds, in basis points of margin (2000 = 20%).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MarginThresholds {
    pub warn_below_bp: i64,
    pub throttle_below_bp: i64,
    pub block_below_bp: i64,
}

impl Default for MarginThresholds {
    /// The levels the README documents: warn under 20%, throttle under 10%, block under 0%.
    fn default() -> MarginThresholds {
        MarginThresholds {
            warn_below_bp: 2000,
            throttle_below_bp: 1000,
            block_below_bp: 0,
        }
    }
}

impl MarginThresholds {
    /// The level of (revenue − COGS) / revenue. Without revenue there is no margin: a subject
    /// that only costs money is blocked, one with neither revenue nor cost is OK.
    pub fn level(&self, revenue_micros: i64, cogs_micros: i64) -> MarginLevel {
        if revenue_micros <= 0 {
            return if cogs_micros > 0 {
                MarginLevel::Block
            } else {
                MarginLevel::Ok
            };
        }
        // margin < t  ⇔  (revenue − cogs) · 10⁴ < t_bp · revenue, since revenue > 0.
        let profit_bp = (i128::from(revenue_micros) - i128::from(cogs_micros)) * 10_000;
        let below = |bp: i64| profit_bp < i128::from(bp) * i128::from(revenue_micros);
        if below(self.block_below_bp) {
            MarginLevel::Block
        } else if below(self.throttle_below_bp) {
            MarginLevel::Throttle
        } else if below(self.warn_below_bp) {
            MarginLevel::Warn
        } else {
            MarginLevel::Ok
        }
    }
}

/// What the guard computes for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SubjectKind {
    Agent,
    Tool,
}

impl SubjectKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SubjectKind::Agent => "agent",
            SubjectKind::Tool => "tool",
        }
    }
}

/// The key a subject's state is kept under inside its tenant (`agent:<id>`, `tool:<name>`).
pub fn subject_field(kind: SubjectKind, id: &str) -> String {
    format!("{}:{id}", kind.as_str())
}

/// One agent's or tool's margin over the guard's window, as the guard last computed it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MarginState {
    pub subject: SubjectKind,
    /// The agent id or the tool name.
    pub id: String,
    pub level: MarginLevel,
    /// (revenue − COGS) / revenue to four decimals; `null` without revenue.
    pub margin: Option<f64>,
    pub revenue_micros: i64,
    pub cogs_micros: i64,
    /// Days of usage the figures cover, today (UTC) included.
    pub window_days: u32,
    /// When the guard computed this (RFC 3339 on the wire, milliseconds in memory).
    #[serde(
        rename = "computedAt",
        serialize_with = "rfc3339",
        deserialize_with = "from_rfc3339"
    )]
    #[schema(value_type = String, format = DateTime)]
    pub computed_at_ms: i64,
}

impl MarginState {
    pub fn field(&self) -> String {
        subject_field(self.subject, &self.id)
    }

    /// Why this state has its level, in words an operator can act on.
    fn reason(&self) -> String {
        let margin = match self.margin {
            Some(m) => format!("margin {:.2}%", m * 100.0),
            None => "no revenue".to_string(),
        };
        format!(
            "{} `{}`: {margin} over the last {} day(s) (revenue {} µUSD, COGS {} µUSD)",
            self.subject.as_str(),
            self.id,
            self.window_days,
            self.revenue_micros,
            self.cogs_micros
        )
    }
}

fn rfc3339<S: Serializer>(ms: &i64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_ms(*ms))
}

fn from_rfc3339<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    let text = String::deserialize(d)?;
    chrono::DateTime::parse_from_rfc3339(&text)
        .map(|t| t.timestamp_millis())
        .map_err(serde::de::Error::custom)
}

/// `GET /v1/guard/states`: every margin state the guard last wrote for a tenant, agents and
/// tools apart, each ordered by id. A subject without usage in the guard's window has none.
#[derive(Clone, Debug, PartialEq, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct GuardStates {
    pub agents: Vec<MarginState>,
    pub tools: Vec<MarginState>,
}

impl GuardStates {
    /// Splits states by subject and orders each by id.
    pub fn of(mut states: Vec<MarginState>) -> GuardStates {
        states.sort_by(|a, b| a.id.cmp(&b.id));
        let (agents, tools) = states
            .into_iter()
            .partition(|s| s.subject == SubjectKind::Agent);
        GuardStates { agents, tools }
    }
}

/// What the guard state holds for one check: the agent's and the tool's margin states, and
/// until when the session is killed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GuardView {
    pub agent: Option<MarginState>,
    pub tool: Option<MarginState>,
    /// Set while the session is on its tenant's kill list (ms since the epoch).
    pub session_killed_until_ms: Option<i64>,
}

/// The answer of `GET /v1/guard/check`.
#[derive(Clone, Debug, PartialEq, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct GuardCheck {
    /// The worse of the agent's and the tool's margin levels; `L3_BLOCK` for a killed
    /// session, whatever its margins, so level and action never disagree.
    pub level: MarginLevel,
    pub action: GuardAction,
    /// For `throttle` and `block`: seconds to wait before trying again (until the guard's next
    /// computation, or until a killed session's window ends); 0 for `allow`.
    pub retry_after_seconds: u64,
    /// The margin behind `level`: the worse subject's, or the lower of the two when both are OK.
    /// Only for keys with the `read` scope, and absent without revenue.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub margin: Option<f64>,
    /// Why, in words. For keys with `read`, with the figures behind it; for the others (an
    /// SDK's or a proxy's ingest key) the subject and what the guard does, no figure.
    pub reason: String,
    /// True when the guard state could not be read: the answer is `allow`, as a gateway that
    /// fails open would do anyway.
    pub degraded: bool,
    /// True when the session was killed by a hard limit; the action is then `block`.
    pub session_killed: bool,
    /// The figures behind the answer, when the guard has computed them: only for keys with
    /// the `read` scope (margins, revenue and COGS are the operator's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<MarginState>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool: Option<MarginState>,
}

/// Of the agent's and the tool's states, the one that decides: the worse level, and at the same
/// level the lower margin (no revenue counts as lowest).
fn deciding<'a>(
    agent: Option<&'a MarginState>,
    tool: Option<&'a MarginState>,
) -> Option<&'a MarginState> {
    [agent, tool].into_iter().flatten().max_by(|a, b| {
        let m = |s: &MarginState| s.margin.unwrap_or(f64::NEG_INFINITY);
        a.level.cmp(&b.level).then_with(|| m(b).total_cmp(&m(a)))
    })
}

impl GuardCheck {
    /// Decides from what the guard state holds at `now_ms`. `recompute_seconds` is how often
    /// the guard recomputes levels: the earliest a throttle or a margin block may lift.
    pub fn decide(view: GuardView, now_ms: i64, recompute_seconds: u64) -> GuardCheck {
        let worst = deciding(view.agent.as_ref(), view.tool.as_ref());
        let level = worst.map(|s| s.level).unwrap_or(MarginLevel::Ok);
        let margin = worst.and_then(|s| s.margin);
        let mut check = GuardCheck {
            level,
            action: level.action(),
            retry_after_seconds: match level.action() {
                GuardAction::Allow => 0,
                _ => recompute_seconds.max(1),
            },
            margin,
            reason: match worst {
                Some(s) => format!("{}: {}", s.level.as_str(), s.reason()),
                None => "no margin figures for this agent or tool yet".to_string(),
            },
            degraded: false,
            session_killed: false,
            agent: None,
            tool: None,
        };
        if let Some(until) = view.session_killed_until_ms.filter(|u| *u > now_ms) {
            check.level = MarginLevel::Block;
            check.action = GuardAction::Block;
            check.session_killed = true;
            check.retry_after_seconds = ((until - now_ms) as u64).div_ceil(1000);
            check.reason = format!(
                "the session was killed by a hard limit until {}",
                format_ms(until)
            );
        }
        check.agent = view.agent;
        check.tool = view.tool;
        check
    }

    /// The answer for a key without the `read` scope, which SDKs and proxies hold, often on a
    /// machine the end user reaches: what to do and when to retry, and a reason that names the
    /// subject but no margin, revenue or COGS. Every field is named, so a field added to the
    /// answer is decided here too.
    pub fn without_figures(self) -> GuardCheck {
        let reason = if self.session_killed || self.degraded {
            self.reason
        } else {
            match deciding(self.agent.as_ref(), self.tool.as_ref()) {
                Some(s) => format!(
                    "{}: {} `{}` is {} by the operator's margin guard",
                    s.level.as_str(),
                    s.subject.as_str(),
                    s.id,
                    match s.level {
                        MarginLevel::Ok | MarginLevel::Warn => "allowed",
                        MarginLevel::Throttle => "throttled",
                        MarginLevel::Block => "blocked",
                    }
                ),
                None => "the operator's margin guard has no level for this agent or tool yet"
                    .to_string(),
            }
        };
        GuardCheck {
            level: self.level,
            action: self.action,
            retry_after_seconds: self.retry_after_seconds,
            margin: None,
            reason,
            degraded: self.degraded,
            session_killed: self.session_killed,
            agent: None,
            tool: None,
        }
    }

    /// The answer when the guard state cannot be read: fail open, and say so.
    pub fn degraded(why: &str) -> GuardCheck {
        GuardCheck {
            level: MarginLevel::Ok,
            action: GuardAction::Allow,
            retry_after_seconds: 0,
            margin: None,
            reason: format!("guard state unavailable, failing open: {why}"),
            degraded: true,
            session_killed: false,
            agent: None,
            tool: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_795_181_530_000; // 2026-11-20T13:32:10Z

    fn state(subject: SubjectKind, id: &str, revenue: i64, cogs: i64) -> MarginState {
        MarginState {
            subject,
            id: id.into(),
            level: MarginThresholds::default().level(revenue, cogs),
            margin: crate::analytics::margin(revenue, cogs),
            revenue_micros: revenue,
            cogs_micros: cogs,
            window_days: 7,
            computed_at_ms: NOW - 4_000,
        }
    }

    #[test]
    fn levels_fall_exactly_at_their_thresholds() {
        let t = MarginThresholds::default();
        assert_eq!(t.level(100, 80), MarginLevel::Ok); // exactly 20%: not below
        assert_eq!(t.level(100_000, 80_001), MarginLevel::Warn); // 19.999%
        assert_eq!(t.level(100, 90), MarginLevel::Warn); // exactly 10%
        assert_eq!(t.level(100_000, 90_001), MarginLevel::Throttle);
        assert_eq!(t.level(100, 100), MarginLevel::Throttle); // exactly 0%
        assert_eq!(t.level(100, 101), MarginLevel::Block);
        assert_eq!(t.level(0, 1), MarginLevel::Block);
        assert_eq!(t.level(0, 0), MarginLevel::Ok);
        // Huge sums stay exact: i128 products.
        assert_eq!(
            t.level(4_000_000_000_000_000_000, 3_400_000_000_000_000_000),
            MarginLevel::Warn
        );
        let strict = MarginThresholds {
            warn_below_bp: 5000,
            throttle_below_bp: 4000,
            block_below_bp: -500,
        };
        assert_eq!(strict.level(100, 55), MarginLevel::Warn); // 45%
        assert_eq!(strict.level(100, 65), MarginLevel::Throttle); // 35%
        assert_eq!(strict.level(100, 104), MarginLevel::Throttle); // -4% is above -5%
        assert_eq!(strict.level(100, 106), MarginLevel::Block);
    }

    #[test]
    fn the_worse_subject_decides_and_a_killed_session_blocks() {
        let view = GuardView {
            agent: Some(state(SubjectKind::Agent, "a", 1000, 850)), // 15% warn
            tool: Some(state(SubjectKind::Tool, "web", 1000, 950)), // 5% throttle
            session_killed_until_ms: None,
        };
        let check = GuardCheck::decide(view.clone(), NOW, 10);
        assert_eq!(check.level, MarginLevel::Throttle);
        assert_eq!(check.action, GuardAction::Throttle);
        assert_eq!(check.retry_after_seconds, 10);
        assert_eq!(check.margin, Some(0.05));
        assert!(check
            .reason
            .starts_with("L2_THROTTLE: tool `web`: margin 5.00%"));

        let killed = GuardView {
            session_killed_until_ms: Some(NOW + 1_500),
            ..view.clone()
        };
        let check = GuardCheck::decide(killed, NOW, 10);
        assert_eq!(check.action, GuardAction::Block);
        assert_eq!(check.level, MarginLevel::Block, "level and action agree");
        assert!(check.session_killed);
        assert_eq!(check.retry_after_seconds, 2);
        // A kill whose window has ended no longer blocks.
        let released = GuardView {
            session_killed_until_ms: Some(NOW),
            ..view
        };
        assert_eq!(
            GuardCheck::decide(released, NOW, 10).action,
            GuardAction::Throttle
        );
    }

    #[test]
    fn without_figures_keeps_the_decision_and_drops_every_figure() {
        let view = GuardView {
            agent: Some(state(SubjectKind::Agent, "a", 1000, 850)),
            tool: Some(state(SubjectKind::Tool, "web", 1000, 950)),
            session_killed_until_ms: None,
        };
        let full = GuardCheck::decide(view.clone(), NOW, 10);
        let bare = full.clone().without_figures();
        assert_eq!(
            (bare.level, bare.action, bare.retry_after_seconds),
            (full.level, full.action, full.retry_after_seconds)
        );
        assert_eq!(
            serde_json::to_string(&bare).unwrap(),
            r#"{"level":"L2_THROTTLE","action":"throttle","retryAfterSeconds":10,"reason":"L2_THROTTLE: tool `web` is throttled by the operator's margin guard","degraded":false,"sessionKilled":false}"#
        );
        let killed = GuardView {
            session_killed_until_ms: Some(NOW + 1_500),
            ..view
        };
        let bare = GuardCheck::decide(killed, NOW, 10).without_figures();
        assert!(bare.session_killed);
        assert!(bare
            .reason
            .starts_with("the session was killed by a hard limit"));
    }

    #[test]
    fn nothing_known_is_allowed() {
        let check = GuardCheck::decide(GuardView::default(), NOW, 10);
        assert_eq!(check.action, GuardAction::Allow);
        assert_eq!(check.retry_after_seconds, 0);
        assert_eq!(check.margin, None);
    }

    #[test]
    fn margin_state_round_trips_through_its_stored_json() {
        let s = state(SubjectKind::Tool, "web_search", 7550, 1529);
        let text = serde_json::to_string(&s).unwrap();
        assert_eq!(
            text,
            r#"{"subject":"tool","id":"web_search","level":"OK","margin":0.7975,"revenueMicros":7550,"cogsMicros":1529,"windowDays":7,"computedAt":"2026-11-20T13:32:06.000Z"}"#
        );
        assert_eq!(serde_json::from_str::<MarginState>(&text).unwrap(), s);
    }
}
