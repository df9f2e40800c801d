//! The margin guard: every interval, each tenant's margin per agent and per tool over the
//! window, read from the rollups and written to the guard state, where `GET /v1/guard/check`
//! reads it without touching the store.
//!
//! Every round replaces a tenant's whole set, so a recovered subject goes back to OK and one
//! with no usage in the window disappears. The set expires a few intervals after it was
//! written: a guard that stops computing stops blocking rather than block on stale figures.
//! Several aggregators may run the guard at once; they compute the same levels from the same
//! rollups, so whichever writes last is right.

use crate::metrics::METRICS;
use backends::error::StoreError;
use backends::state::{MarginBoard, StateError};
use backends::store::{AnalyticsStore, Viewer};
use schemas::analytics::{margin, AgentUsage, DateRange, ToolUsage};
use schemas::guard::{MarginLevel, MarginState, MarginThresholds, SubjectKind};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// What the guard is told to do.
#[derive(Clone, Debug)]
pub struct GuardConfig {
    /// Between two rounds.
    pub interval: Duration,
    /// Days of usage a margin covers, today (UTC) included.
    pub window_days: u32,
    /// Every tenant with its thresholds.
    pub tenants: Vec<(String, MarginThresholds)>,
}

/// States outlive their round by this many intervals (and at least a minute), so one slow or
/// failed round does not drop every level.
const STATE_LIFETIME_INTERVALS: u32 = 3;
const MIN_STATE_LIFETIME: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error("reading margins: {0}")]
    Store(#[from] StoreError),
    #[error("writing margin levels: {0}")]
    State(#[from] StateError),
}

/// What one round found, summed over tenants.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Round {
    /// Subjects at each level, in `MarginLevel` order (OK, L1, L2, L3).
    pub subjects_by_level: [usize; 4],
    /// Tenants whose levels could not be computed or written this round.
    pub failed_tenants: usize,
}

pub struct MarginGuard {
    analytics: Arc<dyn AnalyticsStore>,
    state: Arc<dyn MarginBoard>,
    config: GuardConfig,
    /// The level each subject had last round, to log changes: (tenant, field) → level.
    last_levels: HashMap<(String, String), MarginLevel>,
}

impl MarginGuard {
    pub fn new(
        analytics: Arc<dyn AnalyticsStore>,
        state: Arc<dyn MarginBoard>,
        config: GuardConfig,
    ) -> MarginGuard {
        MarginGuard {
            analytics,
            state,
            config,
            last_levels: HashMap::new(),
        }
    }

    /// Computes and writes every tenant's levels as of `now_ms`. A tenant that fails is logged
    /// and counted; the others go on.
    pub async fn round(&mut self, now_ms: i64) -> Round {
        let mut round = Round::default();
        let mut first_error = None;
        let lifetime = (self.config.interval * STATE_LIFETIME_INTERVALS).max(MIN_STATE_LIFETIME);
        let expires_at_ms = now_ms + lifetime.as_millis() as i64;
        for (tenant, thresholds) in self.config.tenants.clone() {
            match self
                .tenant_round(&tenant, &thresholds, now_ms, expires_at_ms)
                .await
            {
                Ok(states) => {
                    for s in &states {
                        round.subjects_by_level[s.level as usize] += 1;
                        let before = self
                            .last_levels
                            .insert((tenant.clone(), s.field()), s.level)
                            .unwrap_or(MarginLevel::Ok);
                        if before != s.level {
                            tracing::info!(
                                tenant, subject = %s.field(), from = before.as_str(), to = s.level.as_str(),
                                margin = ?s.margin, "margin level changed"
                            );
                        }
                    }
                }
                Err(e) => {
                    round.failed_tenants += 1;
                    first_error.get_or_insert((tenant, e));
                }
            }
        }
        for (gauge, n) in METRICS.guard_subjects.iter().zip(round.subjects_by_level) {
            gauge.set(n as i64);
        }
        // One line per round, not per tenant: when Redis or the store is down, all fail alike.
        if let Some((tenant, error)) = first_error {
            METRICS.guard_rounds_failed.add(1);
            tracing::warn!(
                failed = round.failed_tenants, of = self.config.tenants.len(), first = tenant, %error,
                "margin guard round failed; levels already written stay until they expire"
            );
        }
        round
    }

    async fn tenant_round(
        &self,
        tenant: &str,
        thresholds: &MarginThresholds,
        now_ms: i64,
        expires_at_ms: i64,
    ) -> Result<Vec<MarginState>, GuardError> {
        let range = window(now_ms, self.config.window_days);
        let viewer = Viewer::tenant(tenant);
        let tools = self.analytics.revenue_by_tool(&viewer, range).await?;
        let agents = self.analytics.usage_by_agent(&viewer, range).await?;
        let states = margin_states(&tools, &agents, thresholds, self.config.window_days, now_ms);
        self.state
            .put_margins(tenant, &states, expires_at_ms)
            .await?;
        Ok(states)
    }

    /// Runs a round every interval until `shutdown` turns true.
    pub async fn run(mut self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut ticks = tokio::time::interval(self.config.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {
                    let now_ms = chrono::Utc::now().timestamp_millis();
                    let round = self.round(now_ms).await;
                    tracing::debug!(?round, "margin guard round");
                }
                _ = shutdown.changed() => {
                    if *shutdown.borrow() {
                        return;
                    }
                }
            }
        }
    }
}

/// The window of `window_days` UTC days ending today.
fn window(now_ms: i64, window_days: u32) -> DateRange {
    let today = chrono::DateTime::from_timestamp_millis(now_ms)
        .expect("a valid clock")
        .date_naive();
    DateRange {
        from: today - chrono::Days::new(u64::from(window_days.max(1)) - 1),
        to: today,
    }
}

/// Every tool's and agent's state from its sums over the window.
pub fn margin_states(
    tools: &[ToolUsage],
    agents: &[AgentUsage],
    thresholds: &MarginThresholds,
    window_days: u32,
    now_ms: i64,
) -> Vec<MarginState> {
    let state = |subject, id: &str, revenue, cogs| MarginState {
        subject,
        id: id.to_string(),
        level: thresholds.level(revenue, cogs),
        margin: margin(revenue, cogs),
        revenue_micros: revenue,
        cogs_micros: cogs,
        window_days,
        computed_at_ms: now_ms,
    };
    let tools = tools.iter().map(|t| {
        state(
            SubjectKind::Tool,
            &t.tool_name,
            t.figures.revenue_micros,
            t.figures.cogs_micros,
        )
    });
    let agents = agents.iter().map(|a| {
        state(
            SubjectKind::Agent,
            &a.agent_id,
            a.figures.revenue_micros,
            a.figures.cogs_micros,
        )
    });
    tools.chain(agents).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemas::analytics::UsageFigures;

    #[test]
    fn the_window_ends_today_and_spans_its_days() {
        let at = 1_795_181_530_000; // 2026-11-20T13:32:10Z
        let w = window(at, 7);
        assert_eq!(
            (w.from_str_day(), w.to_str_day()),
            ("2026-11-14".into(), "2026-11-20".into())
        );
        let w = window(at, 1);
        assert_eq!(w.from, w.to);
    }

    #[test]
    fn each_tool_and_agent_gets_its_level() {
        let figures = |revenue, cogs| UsageFigures {
            calls: 1,
            revenue_micros: revenue,
            cogs_micros: cogs,
            ..Default::default()
        };
        let tools = [ToolUsage {
            tool_name: "web".into(),
            figures: figures(1000, 950),
            sessions: 1,
        }];
        let agents = [AgentUsage {
            agent_id: "a".into(),
            sessions: 1,
            figures: figures(1000, 1001),
            daily: Vec::new(),
        }];
        let states = margin_states(&tools, &agents, &MarginThresholds::default(), 7, 5);
        let summary: Vec<(String, MarginLevel, Option<f64>)> = states
            .iter()
            .map(|s| (s.field(), s.level, s.margin))
            .collect();
        assert_eq!(
            summary,
            vec![
                ("tool:web".into(), MarginLevel::Throttle, Some(0.05)),
                ("agent:a".into(), MarginLevel::Block, Some(-0.001)),
            ]
        );
    }
}
