//! The in-process guard state of `serve`: the same semantics as Redis, under one lock.

use super::{
    admitted_prefix, take_from_bucket, Charge, LimitCounters, MarginBoard, RateLimiter,
    StateBackend, StateError,
};
use schemas::guard::{subject_field, GuardView, MarginState, SubjectKind};
use std::collections::HashMap;
use std::sync::Mutex;

#[derive(Default)]
pub struct MemoryState {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// key → (value, expires_at_ms)
    counters: HashMap<String, (i64, i64)>,
    /// When ended windows are next swept out of `counters`.
    next_prune_ms: i64,
    /// tenant → session → killed until (ms)
    killed: HashMap<String, HashMap<String, i64>>,
    /// (tenant, agent) → session → remembered until (ms)
    agent_sessions: HashMap<(String, String), HashMap<String, i64>>,
    /// rate-limit key → (tokens, last refill ms); one per configured key, so bounded.
    buckets: HashMap<String, (f64, i64)>,
    /// tenant → (forgotten at ms, field → margin state)
    margins: HashMap<String, (i64, HashMap<String, MarginState>)>,
}

/// How often ended windows are swept out: often enough to bound memory, rarely enough that no
/// ingest request pays for a scan of every counter.
const PRUNE_EVERY_MS: i64 = 60_000;

impl MemoryState {
    pub fn new() -> MemoryState {
        MemoryState::default()
    }
}

/// Adds members with a time, keeping the later time of a member already there.
fn extend(set: &mut HashMap<String, i64>, members: &[String], until_ms: i64) {
    for m in members {
        let until = set.entry(m.clone()).or_insert(until_ms);
        *until = (*until).max(until_ms);
    }
}

/// Drops members whose time has passed; answers the rest, sorted.
fn live(set: &mut HashMap<String, i64>, now_ms: i64) -> Vec<String> {
    set.retain(|_, until| *until > now_ms);
    let mut members: Vec<String> = set.keys().cloned().collect();
    members.sort();
    members
}

#[async_trait::async_trait]
impl LimitCounters for MemoryState {
    async fn charge(&self, charges: &[Charge], now_ms: i64) -> Result<Vec<usize>, StateError> {
        let mut inner = self.inner.lock().expect("guard state lock");
        if now_ms >= inner.next_prune_ms {
            inner.counters.retain(|_, (_, expires)| *expires > now_ms);
            inner.next_prune_ms = now_ms + PRUNE_EVERY_MS;
        }
        let mut admitted = Vec::with_capacity(charges.len());
        for c in charges {
            let (value, expires) = inner
                .counters
                .entry(c.key.clone())
                .or_insert((0, c.expires_at_ms));
            // A counter whose window ended but was not swept yet starts over, as if forgotten.
            if *expires <= now_ms {
                *value = 0;
            }
            let n = admitted_prefix(*value, c.limit, &c.amounts);
            *value += c.amounts[..n].iter().sum::<i64>();
            *expires = c.expires_at_ms;
            admitted.push(n);
        }
        Ok(admitted)
    }

    async fn kill_sessions(
        &self,
        tenant: &str,
        sessions: &[String],
        until_ms: i64,
    ) -> Result<(), StateError> {
        let mut inner = self.inner.lock().expect("guard state lock");
        extend(
            inner.killed.entry(tenant.to_string()).or_default(),
            sessions,
            until_ms,
        );
        Ok(())
    }

    async fn killed_sessions(&self, tenant: &str, now_ms: i64) -> Result<Vec<String>, StateError> {
        let mut inner = self.inner.lock().expect("guard state lock");
        Ok(inner
            .killed
            .get_mut(tenant)
            .map(|set| live(set, now_ms))
            .unwrap_or_default())
    }

    async fn track_sessions(
        &self,
        tenant: &str,
        agent: &str,
        sessions: &[String],
        until_ms: i64,
    ) -> Result<(), StateError> {
        let mut inner = self.inner.lock().expect("guard state lock");
        let key = (tenant.to_string(), agent.to_string());
        extend(
            inner.agent_sessions.entry(key).or_default(),
            sessions,
            until_ms,
        );
        Ok(())
    }

    async fn sessions_of(
        &self,
        tenant: &str,
        agent: &str,
        now_ms: i64,
    ) -> Result<Vec<String>, StateError> {
        let mut inner = self.inner.lock().expect("guard state lock");
        let key = (tenant.to_string(), agent.to_string());
        Ok(inner
            .agent_sessions
            .get_mut(&key)
            .map(|set| live(set, now_ms))
            .unwrap_or_default())
    }
}

#[async_trait::async_trait]
impl MarginBoard for MemoryState {
    async fn put_margins(
        &self,
        tenant: &str,
        margins: &[MarginState],
        expires_at_ms: i64,
    ) -> Result<(), StateError> {
        let by_field = margins.iter().map(|m| (m.field(), m.clone())).collect();
        let mut inner = self.inner.lock().expect("guard state lock");
        inner
            .margins
            .insert(tenant.to_string(), (expires_at_ms, by_field));
        Ok(())
    }

    async fn view(
        &self,
        tenant: &str,
        agent: Option<&str>,
        tool: Option<&str>,
        session: Option<&str>,
        now_ms: i64,
    ) -> Result<GuardView, StateError> {
        let inner = self.inner.lock().expect("guard state lock");
        let margins = inner
            .margins
            .get(tenant)
            .filter(|(expires, _)| *expires > now_ms)
            .map(|(_, m)| m);
        let margin = |kind: SubjectKind, id: Option<&str>| {
            let field = subject_field(kind, id?);
            margins?.get(&field).cloned()
        };
        Ok(GuardView {
            agent: margin(SubjectKind::Agent, agent),
            tool: margin(SubjectKind::Tool, tool),
            session_killed_until_ms: session.and_then(|s| {
                let until = *inner.killed.get(tenant)?.get(s)?;
                (until > now_ms).then_some(until)
            }),
        })
    }
}

#[async_trait::async_trait]
impl RateLimiter for MemoryState {
    async fn take_token(
        &self,
        key: &str,
        per_second: f64,
        burst: u32,
        now_ms: i64,
    ) -> Result<Option<u64>, StateError> {
        let mut inner = self.inner.lock().expect("guard state lock");
        // The key is copied once, when its bucket is made, not on every request.
        let Some(bucket) = inner.buckets.get_mut(key) else {
            let (bucket, wait) = take_from_bucket(None, per_second, burst, now_ms);
            inner.buckets.insert(key.to_string(), bucket);
            return Ok(wait);
        };
        let (next, wait) = take_from_bucket(Some(*bucket), per_second, burst, now_ms);
        *bucket = next;
        Ok(wait)
    }
}

#[async_trait::async_trait]
impl StateBackend for MemoryState {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn ping(&self) -> Result<(), StateError> {
        Ok(())
    }
}
