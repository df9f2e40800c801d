//! [`AppState`]: the ports and settings every handler shares, and [`AppState::authenticate`],
//! which every handler calls first.

use crate::{auth, error, guard};
use actix_web::HttpMessage;
use backends::sink::EventSink;
use backends::state::{CustomerBalances, LimitCounters, MarginBoard, RateLimiter};
use backends::store::{AnalyticsStore, CreditLedger};
use schemas::config::{CreditsConfig, HttpConfig, IngestConfig, Scope};
use std::sync::Arc;

/// What every handler shares.
pub struct AppState {
    pub keys: auth::Keyring,
    pub sink: Arc<dyn EventSink>,
    pub analytics: Arc<dyn AnalyticsStore>,
    /// Hard-limit counters, the kill list, each agent's sessions.
    pub limits: Arc<dyn LimitCounters>,
    /// The margin levels guard checks read.
    pub margins: Arc<dyn MarginBoard>,
    /// Each API key's token bucket.
    pub rate_limiter: Arc<dyn RateLimiter>,
    /// Until when (ms) rate limits are not asked for, the guard state having failed to answer
    /// one: a request then does not pay a failing round trip only to be let through.
    pub rate_limits_skipped_until: std::sync::atomic::AtomicI64,
    /// Prepaid wallets, authorizations, settlements.
    pub balances: Arc<dyn CustomerBalances>,
    /// Grants, durable in the store: what wallets are rebuilt from.
    pub ledger: Arc<dyn CreditLedger>,
    /// What the store still lacks of the bus (distributed): a rebuild waits for it. `None`
    /// when the sink answers only once the store has the events (embedded).
    pub backlog: Option<Arc<dyn backends::backlog::Backlog>>,
    /// Tenants whose settlement failed (the guard state did not answer): their ledger is
    /// rebuilt from the store before its next use, which counts the calls that failed.
    pub stale_ledgers: Arc<std::sync::Mutex<std::collections::HashSet<Arc<str>>>>,
    /// When a ledger rebuild of each tenant last failed in this process (ms).
    pub rebuild_failures: std::sync::Mutex<std::collections::HashMap<Arc<str>, i64>>,
    /// One ledger rebuild per tenant at a time in this process.
    pub rebuilds:
        std::sync::Mutex<std::collections::HashMap<Arc<str>, Arc<tokio::sync::Mutex<()>>>>,
    pub credits: CreditsConfig,
    /// Permits for ingest requests in flight (`ingest.max_in_flight_requests`).
    pub in_flight: tokio::sync::Semaphore,
    /// How often the margin guard recomputes levels: what a throttled caller is told to wait.
    pub guard_recompute_seconds: u64,
    pub ingest: IngestConfig,
    /// Body timeouts and caps of the routes that take a body.
    pub http: HttpConfig,
    /// The addresses bound for `http.metrics_listen`, set once the server is bound: requests
    /// arriving there get `/metrics` only, and `/metrics` is served nowhere else.
    pub metrics_addrs: std::sync::OnceLock<Vec<std::net::SocketAddr>>,
    /// The metric families of the other components this process runs, rendered after the
    /// API's own by `/metrics`.
    pub metric_families: Vec<fn(&mut String)>,
}

/// How long rate limits go unasked after the guard state failed to answer one (ms).
pub const RATE_LIMITS_RETRY_MS: i64 = 1000;

/// A request's caller, found by its route's door before the body was read; the handler's
/// [`AppState::authenticate`] takes it from the request instead of charging the rate limit
/// again.
pub(crate) struct Authenticated {
    pub scope: Scope,
    pub caller: Arc<auth::Caller>,
}

impl AppState {
    /// The request's caller for `scope`, once its rate limit (its key's, or its customer's for
    /// a portal token) admits the request. Without the guard state the limit is not enforced
    /// (fail open), as with hard limits; after a failure it is not asked for again for
    /// [`RATE_LIMITS_RETRY_MS`].
    pub async fn authenticate(
        &self,
        req: &actix_web::HttpRequest,
        scope: Scope,
    ) -> Result<Arc<auth::Caller>, error::ApiError> {
        if let Some(done) = req.extensions().get::<Authenticated>() {
            if done.scope == scope {
                return Ok(done.caller.clone());
            }
        }
        let caller = self.keys.authenticate(req, scope)?;
        let (bucket, limit) = (&caller.rate_limit.bucket, caller.rate_limit.config);
        let now_ms = chrono::Utc::now().timestamp_millis();
        let skipped_until = &self.rate_limits_skipped_until;
        if now_ms < skipped_until.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(caller);
        }
        match self
            .rate_limiter
            .take_token(bucket, limit.requests_per_second, limit.burst, now_ms)
            .await
        {
            Ok(None) => Ok(caller),
            Ok(Some(wait_ms)) => Err(error::ApiError::RateLimited {
                holder: match caller.customer {
                    Some(_) => "this customer's portal tokens are",
                    None => "this API key is",
                },
                per_second: limit.requests_per_second,
                burst: limit.burst,
                retry_after_seconds: wait_ms.div_ceil(1000),
            }),
            Err(e) => {
                guard::warn_state_unavailable(&e);
                skipped_until.store(
                    now_ms + RATE_LIMITS_RETRY_MS,
                    std::sync::atomic::Ordering::Relaxed,
                );
                Ok(caller)
            }
        }
    }

    /// The caller of `req` as a reader, with `scope` (`read` or `export`): what every read
    /// endpoint takes.
    pub async fn reader(
        &self,
        req: &actix_web::HttpRequest,
        scope: Scope,
    ) -> Result<auth::Reader, error::ApiError> {
        Ok(self.authenticate(req, scope).await?.reader())
    }
}
