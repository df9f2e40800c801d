//! The shared state ports, each named for what it holds, each implemented by both adapters with
//! the same atomic semantics: `memory` serves the embedded mode, `redis` the distributed one
//! (any number of ingestors sharing it).
//!
//! - [`LimitCounters`]: hard-limit counters, the kill list, each agent's sessions.
//! - [`MarginBoard`]: the margin levels the margin guard puts and `GET /v1/guard/check` views.
//! - [`RateLimiter`]: each API key's token bucket.
//! - [`CustomerBalances`]: prepaid wallets, authorizations (nonce, reservation) and the
//!   settlement of each event key, once.
//! - [`StateBackend`]: what they share: `ping` for `/readyz`, `kind` for people.
//! - [`StatePorts`]: the three ports of one store, as a process hands them out.
//! - [`memory::MemoryState`]: in-process, one lock.
//! - [`redis::RedisState`]: one Lua script per batch (COMPARE_AND_INCREMENT), so concurrent
//!   ingestors never admit past a limit.

pub mod memory;
pub mod redis;

use crate::error::ErrorKind;
/// Counters stay exact in Redis's Lua (doubles printed with 14 significant digits) up to this;
/// config validation refuses larger limits.
pub use schemas::config::MAX_LIMIT;
use schemas::credits::{Decision, WalletGrant};
use schemas::guard::{GuardView, MarginState};
use std::sync::Arc;

/// One counter a batch charges: the amount each event adds, in the events' order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Charge {
    /// The counter's key, unique per tenant, limited thing and window (the caller builds it).
    pub key: String,
    /// The most the counter may reach; at most [`MAX_LIMIT`].
    pub limit: i64,
    /// When the window ends and the counter may be forgotten (ms since the epoch).
    pub expires_at_ms: i64,
    /// What each event adds (1 per call for a calls limit, µUSD for a spend limit).
    pub amounts: Vec<i64>,
}

/// A failure of the guard state. The Redis adapter turns its driver's errors into this.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Redis did not answer or refused; `kind` says whether trying again can help.
    #[error("redis {context}: {detail}")]
    Failed {
        context: &'static str,
        kind: ErrorKind,
        detail: String,
    },
    #[error("redis {context}: unexpected answer: {detail}")]
    BadAnswer {
        context: &'static str,
        detail: String,
    },
    /// The tenant's wallets are not in the state (a new process, or Redis lost its data):
    /// load them from the store ([`CustomerBalances::load_ledger`]) and ask again.
    #[error("the wallets of tenant `{0}` are not loaded")]
    WalletsNotLoaded(String),
}

impl StateError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            StateError::Failed { kind, .. } => *kind,
            StateError::BadAnswer { .. } => ErrorKind::Permanent,
            StateError::WalletsNotLoaded(_) => ErrorKind::NotReady,
        }
    }
}

/// The three state ports of one store, as a process hands them out.
#[derive(Clone)]
pub struct StatePorts {
    pub limits: Arc<dyn LimitCounters>,
    pub margins: Arc<dyn MarginBoard>,
    pub rate_limiter: Arc<dyn RateLimiter>,
    pub balances: Arc<dyn CustomerBalances>,
}

impl StatePorts {
    /// Every port served by `store`.
    pub fn of<S: LimitCounters + MarginBoard + RateLimiter + CustomerBalances + 'static>(
        store: Arc<S>,
    ) -> StatePorts {
        StatePorts {
            limits: store.clone(),
            margins: store.clone(),
            rate_limiter: store.clone(),
            balances: store,
        }
    }
}

/// What every state port says of the store behind it (all of a process's state ports are one
/// store: `memory` or `redis`).
#[async_trait::async_trait]
pub trait StateBackend: Send + Sync {
    /// Whether the state answers (for `/readyz`).
    async fn ping(&self) -> Result<(), StateError>;

    /// What stands behind the port, for people: `memory` or `redis`.
    fn kind(&self) -> &'static str;
}

/// Hard limits: usage counters charged atomically, the sessions killed by a breach, and the
/// sessions of each agent (so that an agent's breach can stop them all).
#[async_trait::async_trait]
pub trait LimitCounters: StateBackend {
    /// COMPARE_AND_INCREMENT, atomically over all `charges`: for each, admits the longest
    /// prefix of its amounts that keeps the counter at or below its limit, adds every amount
    /// (a counter is the sum of the calls charged, so the store can rebuild it), and answers
    /// how many amounts were admitted. Events past the prefix breach the limit.
    async fn charge(&self, charges: &[Charge], now_ms: i64) -> Result<Vec<usize>, StateError>;

    /// Marks `sessions` of `tenant` killed until `until_ms` (a later time wins).
    async fn kill_sessions(
        &self,
        tenant: &str,
        sessions: &[String],
        until_ms: i64,
    ) -> Result<(), StateError>;

    /// Those of `sessions` (sorted and distinct) the tenant has killed and not yet released at
    /// `now_ms`, in their order: an ingest answer speaks for the sessions of its request,
    /// however many a tenant has killed.
    async fn killed_among(
        &self,
        tenant: &str,
        sessions: &[String],
        now_ms: i64,
    ) -> Result<Vec<String>, StateError>;

    /// Remembers that `sessions` belong to `agent` until `until_ms`, so that a breach of an
    /// agent limit can kill all of them.
    async fn track_sessions(
        &self,
        tenant: &str,
        agent: &str,
        sessions: &[String],
        until_ms: i64,
    ) -> Result<(), StateError>;

    /// The sessions of `agent` remembered and not yet forgotten at `now_ms`, sorted.
    async fn sessions_of(
        &self,
        tenant: &str,
        agent: &str,
        now_ms: i64,
    ) -> Result<Vec<String>, StateError>;

    /// The tenant's known tool names, at most `max`: answers, for each of `names` (distinct),
    /// whether it is known, adding it first when it is new and the tenant has fewer than `max`,
    /// atomically, so that every ingestor sharing the state keeps one bound. A name refused now
    /// is admitted once the bound is raised.
    async fn admit_tool_names(
        &self,
        tenant: &str,
        names: &[String],
        max: u32,
    ) -> Result<Vec<bool>, StateError>;
}

/// The margin board: the margin guard puts each tenant's levels, a guard check views the ones
/// it needs.
#[async_trait::async_trait]
pub trait MarginBoard: StateBackend {
    /// Replaces all of `tenant`'s margin states in one step (a reader sees the old set or the
    /// new one, never a mix). They are forgotten at `expires_at_ms` unless replaced again, so a
    /// guard that stops computing stops blocking.
    async fn put_margins(
        &self,
        tenant: &str,
        margins: &[MarginState],
        expires_at_ms: i64,
    ) -> Result<(), StateError>;

    /// Every margin state of `tenant` the guard wrote and that has not expired at `now_ms`.
    async fn margins(&self, tenant: &str, now_ms: i64) -> Result<Vec<MarginState>, StateError>;

    /// What a guard check needs, in one round trip: the agent's and the tool's margin states
    /// and the session's kill, for those named.
    async fn view(
        &self,
        tenant: &str,
        agent: Option<&str>,
        tool: Option<&str>,
        session: Option<&str>,
        now_ms: i64,
    ) -> Result<GuardView, StateError>;
}

/// Each API key's request rate: one token bucket per key.
#[async_trait::async_trait]
pub trait RateLimiter: StateBackend {
    /// Token bucket: takes one token from `key`'s bucket, which holds at most `burst` and
    /// refills at `per_second`. `None`: admitted; `Some(ms)`: empty, a token is back in `ms`.
    async fn take_token(
        &self,
        key: &str,
        per_second: f64,
        burst: u32,
        now_ms: i64,
    ) -> Result<Option<u64>, StateError>;
}

/// A spend cap's counter for one customer and window: settled spend in the window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CapCounter {
    /// Unique per tenant, customer, cap and window (the caller builds it).
    pub key: String,
    pub max_spend_micros: i64,
    /// When the window ends and the counter may be forgotten (ms since the epoch).
    pub window_end_ms: i64,
}

/// One `POST /v1/authorize`, quoted and ready to decide.
#[derive(Clone, Debug)]
pub struct AuthorizeAsk<'a> {
    pub tenant: &'a str,
    pub customer: &'a str,
    pub tool: &'a str,
    pub nonce: &'a str,
    pub quote_micros: i64,
    pub max_in_flight: Option<u32>,
    /// Refuse a customer that was never granted credits (the tenant's `prepaid_only`).
    pub prepaid_only: bool,
    pub caps: &'a [CapCounter],
    pub now_ms: i64,
    /// When a reservation made now ends by itself.
    pub expires_at_ms: i64,
    /// How long the nonce's decision is remembered (replays answer it until then).
    pub remember_until_ms: i64,
}

/// What an authorization answered: the nonce's decision, and when the nonce was claimed
/// before, the call it was first asked for (a replay must name the same one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authorization {
    pub decision: Decision,
    /// (customer, tool) of the first ask, when this was a replay.
    pub first_ask: Option<(String, String)>,
}

/// One event's charge: its key is claimed once; on the first claim, its customer's
/// reservation under that key ends, its rated amount is settled (prepaid customers) and added
/// to the customer's cap counters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settlement {
    /// The event's idempotency key (an authorization's nonce, when it had one).
    pub key: String,
    /// Empty: nothing to settle, the key is only claimed (for hard limits).
    pub customer: String,
    pub amount_micros: i64,
    pub caps: Vec<CapCounter>,
    /// Claim the key even when the customer has no wallet, because counters count the call
    /// (the tenant has hard limits or spend caps). Otherwise a call of a customer without a
    /// wallet charges nothing and nothing is remembered of it.
    pub always_claim: bool,
}

/// A customer's wallet figures at one moment. available = granted − settled − reserved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WalletFigures {
    pub prepaid: bool,
    pub granted_micros: i64,
    pub settled_micros: i64,
    pub reserved_micros: i64,
    pub in_flight: usize,
}

impl WalletFigures {
    pub fn available_micros(&self) -> i64 {
        self.granted_micros - self.settled_micros - self.reserved_micros
    }
}

/// What the store knows of one prepaid customer, to rebuild its wallet: its grants (lapsed
/// ones with the usage settled before they lapsed) and its usage settled since the first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WalletSeed {
    pub customer: String,
    /// (grant key, grant)
    pub grants: Vec<(String, WalletGrant)>,
    pub settled_micros: i64,
}

/// Where a tenant's ledger stands in the state. Each load starts a new generation; a
/// forgotten ledger remembers the generation it was forgotten at, so that a seed read before
/// a forget is never loaded after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LedgerMark {
    /// Loaded, in this generation.
    Loaded(u64),
    /// Never loaded (or lost with the state's data).
    Absent,
    /// Loaded in this generation, then forgotten.
    Forgotten(u64),
}

impl LedgerMark {
    /// As the Redis scripts store it: `L<n>`, `F<n>`, or `-` for absent.
    pub fn text(&self) -> String {
        match self {
            LedgerMark::Loaded(n) => format!("L{n}"),
            LedgerMark::Absent => "-".into(),
            LedgerMark::Forgotten(n) => format!("F{n}"),
        }
    }

    pub fn parse(text: Option<&str>) -> Option<LedgerMark> {
        let Some(text) = text else {
            return Some(LedgerMark::Absent);
        };
        let n = text.get(1..)?.parse().ok()?;
        match text.as_bytes().first()? {
            b'L' => Some(LedgerMark::Loaded(n)),
            b'F' => Some(LedgerMark::Forgotten(n)),
            _ => None,
        }
    }

    /// The generation a load from here starts.
    pub fn next(&self) -> u64 {
        match self {
            LedgerMark::Absent => 1,
            LedgerMark::Loaded(n) | LedgerMark::Forgotten(n) => n + 1,
        }
    }
}

/// What `load_ledger` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loaded {
    /// Loaded from the seed.
    Now,
    /// Someone loaded it first; the seed was not needed.
    Already,
    /// It was forgotten (or loaded and forgotten) since the seed was read: read it again.
    Changed,
}

/// A window counter (a spend cap's or a hard limit's) as the stored calls add up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WindowCount {
    /// The counter's key, as settlements and limit charges name it.
    pub key: String,
    pub value: i64,
    /// When the window ends (ms since the epoch).
    pub window_end_ms: i64,
}

/// Everything a tenant's money state holds that the store can give back: what a state that
/// lost it (a new `serve`, a Redis restarted empty) is loaded with.
///
/// The seed counts a set of stored calls, and claims exactly their keys: a settlement of one
/// of them (the request that stored it is still finishing, or a batch is re-sent) then
/// charges nothing more, so a rebuild and the batch that triggered it never both count it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LedgerSeed {
    pub wallets: Vec<WalletSeed>,
    /// The keys of the calls counted, each with when its claim may be forgotten.
    pub charged: Vec<(String, i64)>,
    /// Spend caps' and hard limits' counters of the windows running now.
    pub counters: Vec<WindowCount>,
    /// Sessions killed by a counter past its limit, and until when.
    pub killed: Vec<(String, i64)>,
    /// (agent, session, until): the sessions an agent's breach kills.
    pub agent_sessions: Vec<(String, String, i64)>,
}

/// Prepaid wallets, authorizations and settlements. Every method of a tenant whose ledger is
/// not loaded answers [`StateError::WalletsNotLoaded`]: the caller loads it from the store
/// and asks again, so a state that lost its data never answers from an empty wallet.
#[async_trait::async_trait]
pub trait CustomerBalances: StateBackend {
    /// Where `tenant`'s ledger stands; a rebuild reads it before it reads the store.
    async fn ledger_mark(&self, tenant: &str) -> Result<LedgerMark, StateError>;

    /// Loads `tenant`'s money state from `seed`, all of it or nothing, in one atomic step,
    /// if the ledger still stands where `read_at` says it stood when the seed was read: a
    /// tenant loaded meanwhile (by another ingestor, or a request that came first) keeps what
    /// it has, which is newer than the seed, and one forgotten meanwhile may hold settlements
    /// the seed lacks. Open reservations and remembered nonces are kept (a forgotten ledger
    /// still has them).
    async fn load_ledger(
        &self,
        tenant: &str,
        read_at: &LedgerMark,
        seed: &LedgerSeed,
    ) -> Result<Loaded, StateError>;

    /// Marks `tenant`'s ledger not loaded, so that its next use rebuilds it from the store
    /// (which counts what a failed settlement did not); open reservations and nonces stay.
    async fn forget_ledger(&self, tenant: &str) -> Result<(), StateError>;

    /// Adds a grant to `customer`'s wallet under its key (once; a known key changes nothing).
    async fn add_grant(
        &self,
        tenant: &str,
        customer: &str,
        key: &str,
        grant: WalletGrant,
        now_ms: i64,
    ) -> Result<(), StateError>;

    /// In one atomic step: claims the nonce (a claimed one answers its first decision and the
    /// call it was asked for), decides ([`schemas::credits::decide`]) and, when authorized,
    /// reserves the quote until `expires_at_ms`.
    async fn authorize(&self, ask: &AuthorizeAsk<'_>) -> Result<Authorization, StateError>;

    /// Ends the reservation of `nonce`: `None` if the nonce was never authorized here (or
    /// is forgotten), else whether a reservation was still open.
    async fn release(
        &self,
        tenant: &str,
        nonce: &str,
        now_ms: i64,
    ) -> Result<Option<bool>, StateError>;

    /// Claims each settlement's key until `remember_until_ms` and applies those claimed now.
    /// Answers, per settlement, whether it was charged now (false: charged before; true also
    /// when there was nothing to charge or claim).
    async fn settle(
        &self,
        tenant: &str,
        settlements: &[Settlement],
        now_ms: i64,
        remember_until_ms: i64,
    ) -> Result<Vec<bool>, StateError>;

    /// `customer`'s figures at `now_ms`.
    async fn wallet(
        &self,
        tenant: &str,
        customer: &str,
        now_ms: i64,
    ) -> Result<WalletFigures, StateError>;
}

/// One token bucket step, the rule both adapters follow (the Redis script is its Lua
/// spelling): refill since `last_ms`, then take a token or say when one will be back. Answers
/// the new (tokens, last_ms) and the wait in ms, if any.
pub fn take_from_bucket(
    bucket: Option<(f64, i64)>,
    per_second: f64,
    burst: u32,
    now_ms: i64,
) -> ((f64, i64), Option<u64>) {
    let (mut tokens, mut last) = bucket.unwrap_or((f64::from(burst), now_ms));
    if now_ms > last {
        tokens = (tokens + (now_ms - last) as f64 * per_second / 1000.0).min(f64::from(burst));
        last = now_ms;
    }
    if tokens >= 1.0 {
        ((tokens - 1.0, last), None)
    } else {
        let wait = ((1.0 - tokens) * 1000.0 / per_second).ceil() as u64;
        ((tokens, last), Some(wait.max(1)))
    }
}

/// The admitted prefix of `amounts` on a counter at `current` with `limit`: the one rule both
/// adapters follow (the Redis script is its Lua spelling).
pub fn admitted_prefix(current: i64, limit: i64, amounts: &[i64]) -> usize {
    let mut total = current;
    for (i, amount) in amounts.iter().enumerate() {
        if total + amount > limit {
            return i;
        }
        total += amount;
    }
    amounts.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_gives_its_burst_then_refills_at_its_rate() {
        let mut bucket = None;
        let mut answers = Vec::new();
        for _ in 0..4 {
            let (b, wait) = take_from_bucket(bucket, 2.0, 3, 1000);
            bucket = Some(b);
            answers.push(wait);
        }
        assert_eq!(answers, [None, None, None, Some(500)]);
        // 250 ms later half a token is back: still 250 ms to wait.
        let (b, wait) = take_from_bucket(bucket, 2.0, 3, 1250);
        assert_eq!(wait, Some(250));
        let (b, wait) = take_from_bucket(Some(b), 2.0, 3, 1500);
        assert_eq!(wait, None);
        // A long quiet spell refills to the burst, never beyond.
        let (b, _) = take_from_bucket(Some(b), 2.0, 3, 1_000_000);
        assert_eq!(b.0, 2.0);
    }

    #[test]
    fn the_admitted_prefix_stops_at_the_first_amount_that_does_not_fit() {
        assert_eq!(admitted_prefix(0, 3, &[1, 1, 1, 1, 1]), 3);
        assert_eq!(admitted_prefix(2, 3, &[1, 1]), 1);
        assert_eq!(admitted_prefix(3, 3, &[1]), 0);
        // A smaller amount after a refused one is refused too: the session is already breached.
        assert_eq!(admitted_prefix(0, 10, &[4, 7, 1]), 1);
        assert_eq!(admitted_prefix(0, 10, &[]), 0);
    }
}
