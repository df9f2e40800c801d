//! Hard limits at ingest: charge each call against its tenant's limits, kill what breaches.
//!
//! Usage that already happened is always accepted, stored and billed; a limit decides only
//! whether the session may go on. Charges are applied after the events are durable, so a
//! request answered 503 (and retried) is not counted twice.

use crate::auth::Tenant;
use backends::state::{Charge, LimitCounters, StateError};
use schemas::config::{LimitConfig, LimitSubject};
use schemas::event::RatedEvent;
use std::collections::{BTreeMap, BTreeSet, HashSet};

/// The tool names of `events`' calls that the tenant may not add, being at its
/// `max_tool_names`: the events naming them are refused before they are published. Names this
/// process saw admitted are known without asking; the others are asked of the state in one
/// round trip, in the order the batch names them. Without the state nothing is refused (every
/// limit fails open) and nothing is remembered.
pub async fn refused_tool_names(
    counters: &dyn LimitCounters,
    tenant: &Tenant,
    events: &[RatedEvent],
) -> HashSet<String> {
    let unknown: Vec<String> = {
        let known = tenant
            .known_tool_names
            .lock()
            .expect("known tool names lock");
        let mut seen = HashSet::new();
        events
            .iter()
            .filter(|e| e.is_call() && !e.tool_name.is_empty())
            .map(|e| &e.tool_name)
            .filter(|name| !known.contains(*name) && seen.insert(*name))
            .cloned()
            .collect()
    };
    if unknown.is_empty() {
        return HashSet::new();
    }
    match counters
        .admit_tool_names(&tenant.id, &unknown, tenant.max_tool_names)
        .await
    {
        Ok(admitted) => {
            let mut known = tenant
                .known_tool_names
                .lock()
                .expect("known tool names lock");
            let mut refused = HashSet::new();
            for (name, ok) in unknown.into_iter().zip(admitted) {
                if ok {
                    known.insert(name);
                } else {
                    refused.insert(name);
                }
            }
            refused
        }
        Err(e) => {
            crate::guard::warn_state_unavailable(&e);
            HashSet::new()
        }
    }
}

/// Why an event naming `name` was refused, and how to lift it.
pub fn refused_tool_message(tenant: &Tenant, name: &str) -> String {
    format!(
        "toolName `{name}` is new and tenant `{}` already has its limit of {} distinct tool names (max_tool_names); name one of its known tools, or raise max_tool_names under the tenant's [[tenants]] entry in the config",
        tenant.id, tenant.max_tool_names
    )
}

/// Whose counter a charge is.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Subject {
    Session(String),
    Agent(String),
}

/// One subject's calls in a batch, in order: what each adds to a calls counter (1), to a spend
/// counter (its revenue), and its position in the batch.
type SubjectCalls = (Vec<i64>, Vec<i64>, Vec<usize>);

/// What a limit's counter counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Measure {
    Calls,
    Spend,
}

/// The counter of limit number `n` of `tenant`, for the subject `id` in the window starting
/// at `start_ms`.
pub fn counter_key(
    tenant: &str,
    n: usize,
    limit: &LimitConfig,
    start_ms: i64,
    what: Measure,
    id: &str,
) -> String {
    let per = match limit.per {
        LimitSubject::Session => "session",
        LimitSubject::Agent => "agent",
    };
    let what = match what {
        Measure::Calls => "calls",
        Measure::Spend => "spend",
    };
    format!(
        "limit:{tenant}:{n}:{per}:{}:{start_ms}:{what}:{id}",
        limit.window.as_str()
    )
}

/// What a batch charges, computed before it is published.
#[derive(Debug, Default)]
pub struct Plan {
    charges: Vec<Charge>,
    /// Per charge, the batch position of the event behind each amount.
    events: Vec<Vec<usize>>,
    subjects: Vec<Subject>,
    /// agent → its sessions in this batch, remembered until the end of its longest window.
    agent_sessions: BTreeMap<String, (BTreeSet<String>, i64)>,
}

impl Plan {
    /// Every counter the batch's calls charge under `limits` at `now_ms`. Heartbeats are not
    /// calls and charge nothing; a call without the limited id (no session, no agent) is not
    /// limited by that limit.
    pub fn new(tenant: &str, limits: &[LimitConfig], events: &[RatedEvent], now_ms: i64) -> Plan {
        let mut plan = Plan::default();
        for (n, limit) in limits.iter().enumerate() {
            let (start, end) = limit.window.bounds(now_ms);
            let mut by_subject: BTreeMap<&str, SubjectCalls> = BTreeMap::new();
            for (i, e) in events.iter().enumerate().filter(|(_, e)| e.is_call()) {
                let id = match limit.per {
                    LimitSubject::Session => &e.session_id,
                    LimitSubject::Agent => &e.agent_id,
                };
                if id.is_empty() {
                    continue;
                }
                let (calls, spend, positions) = by_subject.entry(id).or_default();
                calls.push(1);
                spend.push(e.revenue_micros);
                positions.push(i);
                if limit.per == LimitSubject::Agent && !e.session_id.is_empty() {
                    let (sessions, until) = plan.agent_sessions.entry(id.to_string()).or_default();
                    sessions.insert(e.session_id.clone());
                    *until = (*until).max(end);
                }
            }
            for (id, (calls, spend, positions)) in by_subject {
                let key = |what: Measure| counter_key(tenant, n, limit, start, what, id);
                let subject = match limit.per {
                    LimitSubject::Session => Subject::Session(id.to_string()),
                    LimitSubject::Agent => Subject::Agent(id.to_string()),
                };
                if let Some(max) = limit.max_calls {
                    plan.charges.push(Charge {
                        key: key(Measure::Calls),
                        limit: max,
                        expires_at_ms: end,
                        amounts: calls,
                    });
                    plan.events.push(positions.clone());
                    plan.subjects.push(subject.clone());
                }
                if let Some(max) = limit.max_spend_micros {
                    plan.charges.push(Charge {
                        key: key(Measure::Spend),
                        limit: max,
                        expires_at_ms: end,
                        amounts: spend,
                    });
                    plan.events.push(positions);
                    plan.subjects.push(subject);
                }
            }
        }
        plan
    }

    /// Keeps only the amounts of events `charge` accepts (those charged for the first time: a
    /// re-sent event was counted when it first came). Counters left with nothing are dropped.
    pub fn keep_only(&mut self, charge: impl Fn(usize) -> bool) {
        let mut kept = 0;
        for i in 0..self.charges.len() {
            let (amounts, events) = (&self.charges[i].amounts, &self.events[i]);
            let (amounts, events): (Vec<i64>, Vec<usize>) = amounts
                .iter()
                .zip(events)
                .filter(|(_, e)| charge(**e))
                .map(|(a, e)| (*a, *e))
                .unzip();
            if amounts.is_empty() {
                continue;
            }
            self.charges.swap(kept, i);
            self.subjects.swap(kept, i);
            self.charges[kept].amounts = amounts;
            self.events[kept] = events;
            kept += 1;
        }
        self.charges.truncate(kept);
        self.subjects.truncate(kept);
        self.events.truncate(kept);
    }

    /// Charges the counters in one atomic step and kills what breached: the session, or every
    /// session of the agent. Kills last until the breached window ends.
    pub async fn apply(
        self,
        guard: &dyn LimitCounters,
        tenant: &str,
        now_ms: i64,
    ) -> Result<(), StateError> {
        for (agent, (sessions, until)) in &self.agent_sessions {
            let sessions: Vec<String> = sessions.iter().cloned().collect();
            guard
                .track_sessions(tenant, agent, &sessions, *until)
                .await?;
        }
        if self.charges.is_empty() {
            return Ok(());
        }
        let admitted = guard.charge(&self.charges, now_ms).await?;
        for ((charge, subject), n) in self.charges.iter().zip(&self.subjects).zip(admitted) {
            if n == charge.amounts.len() {
                continue;
            }
            let sessions = match subject {
                Subject::Session(s) => vec![s.clone()],
                Subject::Agent(a) => guard.sessions_of(tenant, a, now_ms).await?,
            };
            tracing::info!(?subject, admitted = n, of = charge.amounts.len(), key = %charge.key, "hard limit breached");
            guard
                .kill_sessions(tenant, &sessions, charge.expires_at_ms)
                .await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemas::config::LimitWindow;

    const AT: i64 = 1_795_181_530_000; // 2026-11-20T13:32:10Z

    fn event(session: &str, agent: &str, revenue: i64) -> RatedEvent {
        RatedEvent {
            session_id: session.into(),
            agent_id: agent.into(),
            revenue_micros: revenue,
            ..RatedEvent::sample_call("k", AT)
        }
    }

    fn limit(per: LimitSubject, calls: Option<i64>, spend: Option<i64>) -> LimitConfig {
        LimitConfig {
            per,
            window: LimitWindow::Hour,
            max_calls: calls,
            max_spend_micros: spend,
        }
    }

    #[test]
    fn each_subject_gets_its_own_counter_per_limit_and_window() {
        let events = [
            event("s1", "a", 10),
            event("s2", "a", 20),
            event("s1", "b", 30),
            event("", "a", 40),
        ];
        let limits = [
            limit(LimitSubject::Session, Some(5), None),
            limit(LimitSubject::Agent, Some(9), Some(100)),
        ];
        let plan = Plan::new("t", &limits, &events, AT);
        let summary: Vec<(String, Vec<i64>)> = plan
            .charges
            .iter()
            .map(|c| (c.key.clone(), c.amounts.clone()))
            .collect();
        assert_eq!(
            summary,
            vec![
                (
                    "limit:t:0:session:hour:1795179600000:calls:s1".to_string(),
                    vec![1, 1]
                ),
                (
                    "limit:t:0:session:hour:1795179600000:calls:s2".to_string(),
                    vec![1]
                ),
                (
                    "limit:t:1:agent:hour:1795179600000:calls:a".to_string(),
                    vec![1, 1, 1]
                ),
                (
                    "limit:t:1:agent:hour:1795179600000:spend:a".to_string(),
                    vec![10, 20, 40]
                ),
                (
                    "limit:t:1:agent:hour:1795179600000:calls:b".to_string(),
                    vec![1]
                ),
                (
                    "limit:t:1:agent:hour:1795179600000:spend:b".to_string(),
                    vec![30]
                ),
            ]
        );
        assert!(plan
            .charges
            .iter()
            .all(|c| c.expires_at_ms == 1_795_183_200_000));
        let a_sessions: Vec<&String> = plan.agent_sessions["a"].0.iter().collect();
        assert_eq!(a_sessions, ["s1", "s2"]);
    }

    #[test]
    fn heartbeats_charge_nothing() {
        let mut hb = event("s1", "a", 0);
        hb.metric_name = schemas::event::HEARTBEAT_METRIC.into();
        let plan = Plan::new(
            "t",
            &[limit(LimitSubject::Session, Some(1), None)],
            &[hb],
            AT,
        );
        assert!(plan.charges.is_empty());
    }
}
