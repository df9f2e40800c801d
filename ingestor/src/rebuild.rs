//! What a tenant's money state is rebuilt from when the state lost it (a new `serve`, a Redis
//! restarted empty): [`ledger_seed`] reads the store once and says what every settlement and
//! limit charge would have left, had the state never been lost.
//!
//! The invariant it keeps, for each customer: settled = the rated revenue of its stored calls
//! (each key once), and every window counter = the sum of the stored calls it counts. The
//! calls received within `credits.charged_keys_hours` are read one by one, in one query, and
//! the seed claims exactly their keys: a settlement of one of them (the request that stored it
//! is still finishing, or a batch is re-sent) then charges nothing, so a rebuild and the batch
//! that triggered it never both count it. Older calls are summed by the store.

use crate::auth::Tenant;
use crate::limits::{counter_key, Measure};
use crate::state::AppState;
use backends::error::StoreError;
use backends::state::{LedgerSeed, WindowCount};
use backends::store::{wallet_seeds, CallGroup, StoredCall};
use schemas::config::{LimitSubject, LimitWindow};
use std::collections::{BTreeMap, BTreeSet};

/// The calls a window counts: those received from its start on, summed per customer, agent
/// and session (from the store's sums before `recent_since_ms`, then from the recent calls).
async fn groups_since(
    state: &AppState,
    tenant: &str,
    start_ms: i64,
    recent_since_ms: i64,
    recent: &[StoredCall],
) -> Result<Vec<CallGroup>, StoreError> {
    let mut groups = if start_ms < recent_since_ms {
        state
            .ledger
            .call_groups(tenant, start_ms, recent_since_ms)
            .await?
    } else {
        Vec::new()
    };
    for c in recent.iter().filter(|c| c.received_at_ms >= start_ms) {
        groups.push(CallGroup {
            customer_id: c.customer_id.clone(),
            agent_id: c.agent_id.clone(),
            session_id: c.session_id.clone(),
            calls: 1,
            revenue_micros: c.revenue_micros,
        });
    }
    Ok(groups)
}

/// The tenant's ledger as the store knows it at `now_ms`.
pub async fn ledger_seed(
    state: &AppState,
    tenant: &Tenant,
    now_ms: i64,
) -> Result<LedgerSeed, StoreError> {
    let claim_ms = state.credits.charged_keys_hours as i64 * 3_600_000;
    let recent_since = now_ms - claim_ms;
    let recent = state.ledger.calls_since(&tenant.id, recent_since).await?;
    let wallets = wallet_seeds(
        state.ledger.as_ref(),
        &tenant.id,
        now_ms,
        recent_since,
        &recent,
    )
    .await?;
    let charged = recent
        .iter()
        .map(|c| (c.idempotency_key.clone(), c.received_at_ms + claim_ms))
        .collect();
    // One read per window kind: every cap and limit of that kind counts from its start.
    let mut windows: Vec<(LimitWindow, Vec<CallGroup>)> = Vec::new();
    let kinds = tenant
        .customer_caps
        .iter()
        .map(|c| c.window)
        .chain(tenant.limits.iter().map(|l| l.window));
    for window in kinds {
        if windows.iter().all(|(w, _)| *w != window) {
            let (start, _) = window.bounds(now_ms);
            let groups = groups_since(state, &tenant.id, start, recent_since, &recent).await?;
            windows.push((window, groups));
        }
    }
    let counted = |window: LimitWindow| {
        &windows
            .iter()
            .find(|(w, _)| *w == window)
            .expect("every window read above")
            .1
    };
    let mut seed = LedgerSeed {
        wallets,
        charged,
        ..LedgerSeed::default()
    };
    for (n, cap) in tenant.customer_caps.iter().enumerate() {
        let (start, end) = cap.window.bounds(now_ms);
        let mut spend: BTreeMap<&str, i64> = BTreeMap::new();
        for g in counted(cap.window)
            .iter()
            .filter(|g| !g.customer_id.is_empty())
        {
            *spend.entry(&g.customer_id).or_default() += g.revenue_micros;
        }
        for (customer, value) in spend {
            seed.counters.push(WindowCount {
                key: crate::credits::cap_key(&tenant.id, n, cap.window, start, customer),
                value,
                window_end_ms: end,
            });
        }
    }
    let mut agent_sessions: BTreeMap<&str, (BTreeSet<&str>, i64)> = BTreeMap::new();
    for limit in tenant
        .limits
        .iter()
        .filter(|l| l.per == LimitSubject::Agent)
    {
        let (_, end) = limit.window.bounds(now_ms);
        for g in counted(limit.window) {
            if g.agent_id.is_empty() || g.session_id.is_empty() {
                continue;
            }
            let (sessions, until) = agent_sessions.entry(&g.agent_id).or_default();
            sessions.insert(&g.session_id);
            *until = (*until).max(end);
        }
    }
    for (n, limit) in tenant.limits.iter().enumerate() {
        let (start, end) = limit.window.bounds(now_ms);
        let mut counts: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
        for g in counted(limit.window) {
            let id = match limit.per {
                LimitSubject::Session => &g.session_id,
                LimitSubject::Agent => &g.agent_id,
            };
            if id.is_empty() {
                continue;
            }
            let (calls, spend) = counts.entry(id).or_default();
            *calls += g.calls;
            *spend += g.revenue_micros;
        }
        for (id, (calls, spend)) in counts {
            let measures = [
                (Measure::Calls, calls, limit.max_calls),
                (Measure::Spend, spend, limit.max_spend_micros),
            ];
            for (what, value, max) in measures {
                let Some(max) = max else { continue };
                seed.counters.push(WindowCount {
                    key: counter_key(&tenant.id, n, limit, start, what, id),
                    value,
                    window_end_ms: end,
                });
                if value <= max {
                    continue;
                }
                // Past its limit: a breach killed the session, or every session of the agent.
                match limit.per {
                    LimitSubject::Session => seed.killed.push((id.to_string(), end)),
                    LimitSubject::Agent => {
                        if let Some((sessions, _)) = agent_sessions.get(id) {
                            seed.killed
                                .extend(sessions.iter().map(|s| (s.to_string(), end)));
                        }
                    }
                }
            }
        }
    }
    for (agent, (sessions, until)) in agent_sessions {
        for session in sessions {
            seed.agent_sessions
                .push((agent.to_string(), session.to_string(), until));
        }
    }
    Ok(seed)
}
