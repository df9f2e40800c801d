//! The in-process guard state of `serve`: the same semantics as Redis, under one lock.

use super::{
    admitted_prefix, take_from_bucket, Authorization, AuthorizeAsk, Charge, CustomerBalances,
    LedgerMark, LedgerSeed, LimitCounters, Loaded, MarginBoard, RateLimiter, Settlement,
    StateBackend, StateError, WalletFigures, WalletSeed,
};
use schemas::credits::{
    decide, freeze_expired, granted_micros, CapState, Decision, WalletGrant, WalletView,
};
use schemas::guard::{subject_field, GuardView, MarginState, SubjectKind};
use std::collections::{HashMap, HashSet};
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
    /// tenant → its wallets, nonces and charged keys; present once loaded from the store.
    credits: HashMap<String, TenantCredits>,
    /// tenant → its known tool names, bounded by the tenant's `max_tool_names`.
    tool_names: HashMap<String, HashSet<String>>,
}

/// One tenant's part of `CustomerBalances`: the same keys as in Redis.
#[derive(Default)]
struct TenantCredits {
    /// Where the ledger stands (Redis: the loaded mark). A tenant absent from the map was
    /// never loaded.
    mark: Option<LedgerMark>,
    /// customer → wallet
    wallets: HashMap<String, Wallet>,
    /// nonce → (customer, tool, first decision, remembered until ms)
    nonces: HashMap<String, (String, String, Decision, i64)>,
    /// event key → charged, remembered until ms
    charged: HashMap<String, i64>,
}

/// One customer's wallet: the same fields as the Redis hash.
#[derive(Default)]
struct Wallet {
    /// (grant key, grant); non-empty for a prepaid customer.
    grants: Vec<(String, WalletGrant)>,
    /// Usage settled since the first grant.
    settled: i64,
    /// nonce → (quote, expires_at_ms)
    reservations: HashMap<String, (i64, i64)>,
}

impl Wallet {
    fn from_seed(seed: &WalletSeed) -> Wallet {
        Wallet {
            grants: seed.grants.clone(),
            settled: seed.settled_micros,
            reservations: HashMap::new(),
        }
    }

    /// Ends lapsed reservations and freezes lapsed grants: what every step does first.
    fn tidy(&mut self, now_ms: i64) {
        self.reservations
            .retain(|_, (_, expires)| *expires > now_ms);
        freeze_expired(self.grants.iter_mut().map(|(_, g)| g), self.settled, now_ms);
    }

    fn figures(&mut self, now_ms: i64) -> WalletFigures {
        self.tidy(now_ms);
        WalletFigures {
            prepaid: !self.grants.is_empty(),
            granted_micros: granted_micros(self.grants.iter().map(|(_, g)| g), now_ms),
            settled_micros: self.settled,
            reserved_micros: self.reservations.values().map(|(q, _)| q).sum(),
            in_flight: self.reservations.len(),
        }
    }
}

/// How often ended windows are swept out: often enough to bound memory, rarely enough that no
/// ingest request pays for a scan of every counter.
const PRUNE_EVERY_MS: i64 = 60_000;

impl MemoryState {
    pub fn new() -> MemoryState {
        MemoryState::default()
    }
}

impl Inner {
    /// Sweeps out ended windows, forgotten nonces and charged keys, at most once a minute.
    fn prune(&mut self, now_ms: i64) {
        if now_ms < self.next_prune_ms {
            return;
        }
        self.counters.retain(|_, (_, expires)| *expires > now_ms);
        for credits in self.credits.values_mut() {
            credits.nonces.retain(|_, (_, _, _, until)| *until > now_ms);
            credits.charged.retain(|_, until| *until > now_ms);
            // A wallet with no grant and no open reservation holds nothing (Redis deletes the
            // emptied hash likewise).
            credits.wallets.retain(|_, w| {
                !w.grants.is_empty() || w.reservations.values().any(|(_, e)| *e > now_ms)
            });
        }
        self.next_prune_ms = now_ms + PRUNE_EVERY_MS;
    }

    /// The tenant's credits, or `WalletsNotLoaded`.
    fn credits(&mut self, tenant: &str) -> Result<&mut TenantCredits, StateError> {
        self.credits
            .get_mut(tenant)
            .filter(|c| matches!(c.mark, Some(LedgerMark::Loaded(_))))
            .ok_or_else(|| StateError::WalletsNotLoaded(tenant.to_string()))
    }
}

/// A counter's value at `now_ms` (0 once its window ended).
fn counter_value(counters: &HashMap<String, (i64, i64)>, key: &str, now_ms: i64) -> i64 {
    match counters.get(key) {
        Some((value, expires)) if *expires > now_ms => *value,
        _ => 0,
    }
}

/// The counter `key` of the window ending at `expires_at_ms`, ready to add to: a counter whose
/// window ended but was not swept yet starts over, as if forgotten. Hard limits and spend caps
/// count alike.
fn window_counter<'a>(
    counters: &'a mut HashMap<String, (i64, i64)>,
    key: &str,
    expires_at_ms: i64,
    now_ms: i64,
) -> &'a mut i64 {
    let (value, expires) = counters
        .entry(key.to_string())
        .or_insert((0, expires_at_ms));
    if *expires <= now_ms {
        *value = 0;
    }
    *expires = expires_at_ms;
    value
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
        inner.prune(now_ms);
        let mut admitted = Vec::with_capacity(charges.len());
        for c in charges {
            let value = window_counter(&mut inner.counters, &c.key, c.expires_at_ms, now_ms);
            let n = admitted_prefix(*value, c.limit, &c.amounts);
            *value += c.amounts.iter().sum::<i64>();
            admitted.push(n);
        }
        Ok(admitted)
    }

    async fn admit_tool_names(
        &self,
        tenant: &str,
        names: &[String],
        max: u32,
    ) -> Result<Vec<bool>, StateError> {
        let mut inner = self.inner.lock().expect("guard state lock");
        let known = inner.tool_names.entry(tenant.to_string()).or_default();
        Ok(names
            .iter()
            .map(|name| {
                known.contains(name) || (known.len() < max as usize && known.insert(name.clone()))
            })
            .collect())
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

    async fn killed_among(
        &self,
        tenant: &str,
        sessions: &[String],
        now_ms: i64,
    ) -> Result<Vec<String>, StateError> {
        let mut inner = self.inner.lock().expect("guard state lock");
        let Some(set) = inner.killed.get_mut(tenant) else {
            return Ok(Vec::new());
        };
        set.retain(|_, until| *until > now_ms);
        Ok(sessions
            .iter()
            .filter(|s| set.contains_key(*s))
            .cloned()
            .collect())
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

    async fn margins(&self, tenant: &str, now_ms: i64) -> Result<Vec<MarginState>, StateError> {
        let inner = self.inner.lock().expect("guard state lock");
        Ok(inner
            .margins
            .get(tenant)
            .filter(|(expires, _)| *expires > now_ms)
            .map(|(_, m)| m.values().cloned().collect())
            .unwrap_or_default())
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
impl CustomerBalances for MemoryState {
    async fn ledger_mark(&self, tenant: &str) -> Result<LedgerMark, StateError> {
        let inner = self.inner.lock().expect("guard state lock");
        Ok(inner
            .credits
            .get(tenant)
            .and_then(|c| c.mark.clone())
            .unwrap_or(LedgerMark::Absent))
    }

    async fn load_ledger(
        &self,
        tenant: &str,
        read_at: &LedgerMark,
        seed: &LedgerSeed,
    ) -> Result<Loaded, StateError> {
        let mut inner = self.inner.lock().expect("guard state lock");
        let credits = inner.credits.entry(tenant.to_string()).or_default();
        let mark = credits.mark.clone().unwrap_or(LedgerMark::Absent);
        if matches!(mark, LedgerMark::Loaded(_)) {
            return Ok(Loaded::Already);
        }
        if mark != *read_at {
            return Ok(Loaded::Changed);
        }
        let mut wallets: HashMap<String, Wallet> = seed
            .wallets
            .iter()
            .map(|w| (w.customer.clone(), Wallet::from_seed(w)))
            .collect();
        for (customer, old) in credits.wallets.drain() {
            if !old.reservations.is_empty() {
                wallets.entry(customer).or_default().reservations = old.reservations;
            }
        }
        credits.wallets = wallets;
        credits.charged.extend(seed.charged.iter().cloned());
        credits.mark = Some(LedgerMark::Loaded(mark.next()));
        for c in &seed.counters {
            inner
                .counters
                .insert(c.key.clone(), (c.value, c.window_end_ms));
        }
        for (session, until) in &seed.killed {
            extend(
                inner.killed.entry(tenant.to_string()).or_default(),
                std::slice::from_ref(session),
                *until,
            );
        }
        for (agent, session, until) in &seed.agent_sessions {
            extend(
                inner
                    .agent_sessions
                    .entry((tenant.to_string(), agent.clone()))
                    .or_default(),
                std::slice::from_ref(session),
                *until,
            );
        }
        Ok(Loaded::Now)
    }

    async fn forget_ledger(&self, tenant: &str) -> Result<(), StateError> {
        let mut inner = self.inner.lock().expect("guard state lock");
        if let Some(credits) = inner.credits.get_mut(tenant) {
            if let Some(LedgerMark::Loaded(n)) = credits.mark {
                credits.mark = Some(LedgerMark::Forgotten(n));
            }
        }
        Ok(())
    }

    async fn add_grant(
        &self,
        tenant: &str,
        customer: &str,
        key: &str,
        grant: WalletGrant,
        now_ms: i64,
    ) -> Result<(), StateError> {
        let mut inner = self.inner.lock().expect("guard state lock");
        let wallet = inner
            .credits(tenant)?
            .wallets
            .entry(customer.to_string())
            .or_default();
        wallet.tidy(now_ms);
        if !wallet.grants.iter().any(|(k, _)| k == key) {
            wallet.grants.push((key.to_string(), grant));
        }
        Ok(())
    }

    async fn authorize(&self, ask: &AuthorizeAsk<'_>) -> Result<Authorization, StateError> {
        let mut inner = self.inner.lock().expect("guard state lock");
        let now = ask.now_ms;
        inner.credits(ask.tenant)?;
        inner.prune(now);
        let Inner {
            counters, credits, ..
        } = &mut *inner;
        let credits = credits.get_mut(ask.tenant).expect("checked above");
        if let Some((customer, tool, decision, until)) = credits.nonces.get(ask.nonce) {
            if *until > now {
                return Ok(Authorization {
                    decision: decision.clone(),
                    first_ask: Some((customer.clone(), tool.clone())),
                });
            }
        }
        let spent: Vec<i64> = ask
            .caps
            .iter()
            .map(|c| counter_value(counters, &c.key, now))
            .collect();
        // A wallet is made only when there is something to keep in it (a reservation): an
        // authorization refused for a customer nobody granted anything keeps nothing of it.
        let mut fresh = Wallet::default();
        let wallet = credits.wallets.get_mut(ask.customer).unwrap_or(&mut fresh);
        let figures = wallet.figures(now);
        let view = WalletView {
            prepaid: figures.prepaid,
            available_micros: figures.available_micros(),
            in_flight_expiries_ms: wallet.reservations.values().map(|(_, e)| *e).collect(),
            caps: ask
                .caps
                .iter()
                .zip(spent)
                .map(|(c, spent)| CapState {
                    spent_micros: spent + figures.reserved_micros,
                    max_spend_micros: c.max_spend_micros,
                    window_end_ms: c.window_end_ms,
                })
                .collect(),
        };
        let decision = decide(
            &view,
            ask.quote_micros,
            ask.max_in_flight,
            ask.prepaid_only,
            now,
            ask.expires_at_ms,
        );
        if let Decision::Authorized {
            quote_micros,
            expires_at_ms,
        } = decision
        {
            credits
                .wallets
                .entry(ask.customer.to_string())
                .or_default()
                .reservations
                .insert(ask.nonce.to_string(), (quote_micros, expires_at_ms));
        }
        credits.nonces.insert(
            ask.nonce.to_string(),
            (
                ask.customer.to_string(),
                ask.tool.to_string(),
                decision.clone(),
                ask.remember_until_ms,
            ),
        );
        Ok(Authorization {
            decision,
            first_ask: None,
        })
    }

    async fn release(
        &self,
        tenant: &str,
        nonce: &str,
        now_ms: i64,
    ) -> Result<Option<bool>, StateError> {
        let mut inner = self.inner.lock().expect("guard state lock");
        let credits = inner.credits(tenant)?;
        let customer = match credits.nonces.get(nonce) {
            Some((customer, _, _, until)) if *until > now_ms => customer,
            _ => return Ok(None),
        };
        let Some(wallet) = credits.wallets.get_mut(customer) else {
            return Ok(Some(false));
        };
        wallet.tidy(now_ms);
        Ok(Some(wallet.reservations.remove(nonce).is_some()))
    }

    async fn settle(
        &self,
        tenant: &str,
        settlements: &[Settlement],
        now_ms: i64,
        remember_until_ms: i64,
    ) -> Result<Vec<bool>, StateError> {
        let mut inner = self.inner.lock().expect("guard state lock");
        inner.credits(tenant)?;
        inner.prune(now_ms);
        let Inner {
            counters, credits, ..
        } = &mut *inner;
        let credits = credits.get_mut(tenant).expect("checked above");
        let mut claimed = Vec::with_capacity(settlements.len());
        for s in settlements {
            if !s.always_claim && !credits.wallets.contains_key(&s.customer) {
                // Nothing to charge: no wallet, no counter. Remember nothing.
                claimed.push(true);
                continue;
            }
            if credits
                .charged
                .get(&s.key)
                .is_some_and(|until| *until > now_ms)
            {
                // Charged before (or counted by a rebuild): a reservation still open under the
                // key is for this very call, and ends.
                if let Some(wallet) = credits.wallets.get_mut(&s.customer) {
                    wallet.reservations.remove(&s.key);
                }
                claimed.push(false);
                continue;
            }
            credits.charged.insert(s.key.clone(), remember_until_ms);
            claimed.push(true);
            if s.customer.is_empty() {
                continue;
            }
            if let Some(wallet) = credits.wallets.get_mut(&s.customer) {
                wallet.tidy(now_ms);
                wallet.reservations.remove(&s.key);
                if !wallet.grants.is_empty() {
                    wallet.settled += s.amount_micros;
                }
            }
            for cap in &s.caps {
                *window_counter(counters, &cap.key, cap.window_end_ms, now_ms) += s.amount_micros;
            }
        }
        Ok(claimed)
    }

    async fn wallet(
        &self,
        tenant: &str,
        customer: &str,
        now_ms: i64,
    ) -> Result<WalletFigures, StateError> {
        let mut inner = self.inner.lock().expect("guard state lock");
        Ok(inner
            .credits(tenant)?
            .wallets
            .get_mut(customer)
            .map(|w| w.figures(now_ms))
            .unwrap_or_default())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::CapCounter;

    /// Authorizations for customers nobody granted anything keep no wallet: a refusal keeps
    /// only its nonce (until it is forgotten), and a postpaid reservation's wallet goes once
    /// the reservation has ended.
    #[tokio::test]
    async fn authorizations_keep_nothing_for_customers_with_nothing_to_keep() {
        let state = MemoryState::new();
        state
            .load_ledger("t", &LedgerMark::Absent, &LedgerSeed::default())
            .await
            .unwrap();
        let cap = [CapCounter {
            key: "cap".into(),
            max_spend_micros: 10,
            window_end_ms: 10_000,
        }];
        for n in 0..1000 {
            let (customer, nonce) = (format!("invented-{n}"), format!("n{n}"));
            let ask = AuthorizeAsk {
                tenant: "t",
                customer: &customer,
                tool: "search",
                nonce: &nonce,
                quote_micros: 100,
                max_in_flight: None,
                prepaid_only: false,
                caps: &cap,
                now_ms: 1_000,
                expires_at_ms: 2_000,
                remember_until_ms: 5_000,
            };
            let answer = state.authorize(&ask).await.unwrap();
            assert!(matches!(answer.decision, Decision::Refused { .. }));
        }
        let postpaid = AuthorizeAsk {
            tenant: "t",
            customer: "postpaid",
            tool: "search",
            nonce: "p1",
            quote_micros: 1,
            max_in_flight: None,
            prepaid_only: false,
            caps: &[],
            now_ms: 1_000,
            expires_at_ms: 2_000,
            remember_until_ms: 5_000,
        };
        let answer = state.authorize(&postpaid).await.unwrap();
        assert!(matches!(answer.decision, Decision::Authorized { .. }));
        let wallets = |state: &MemoryState| state.inner.lock().unwrap().credits["t"].wallets.len();
        assert_eq!(wallets(&state), 1, "only the reservation's");
        // After the reservation ended and the nonces were forgotten, nothing is left.
        let mut inner = state.inner.lock().unwrap();
        inner.next_prune_ms = 0;
        inner.prune(6_000);
        drop(inner);
        assert_eq!(wallets(&state), 0);
        assert!(state.inner.lock().unwrap().credits["t"].nonces.is_empty());
    }
}
