//! Charge before the tool runs: prepaid grants, balances, authorizations, and the settlement
//! of ingested events.
//!
//! `POST /v1/customers/{customerId}/credits` records a grant in the store (durable), then adds
//! it to the wallet in the guard state. `POST /v1/authorize` quotes the call from the tenant's
//! rate plan and decides in one atomic step of the state (claim the nonce, caps, in-flight,
//! balance, reserve). Every ingested call is settled once per event key ([`settlements`],
//! then `CustomerBalances::settle` after the batch is durable): its reservation ends and its
//! rated revenue is charged, whatever the quote was.
//!
//! The state may not hold a tenant's wallets (a new `serve`, a Redis that lost its data): it
//! then says so, and [`on_wallets`] rebuilds them from the store's grants and raw usage before
//! asking again.

use crate::auth::Tenant;
use crate::body::json_body;
use crate::error::{ApiError, ReadErrors, SmallBodyErrors};
use crate::state::AppState;
use actix_web::{web, HttpRequest, HttpResponse};
use backends::state::{
    Authorization, AuthorizeAsk, CapCounter, LedgerMark, Loaded, Settlement, StateError,
    WalletFigures,
};
use schemas::analytics::Viewed;
use schemas::config::{LimitWindow, Scope};
use schemas::credits::{
    valid_customer_id, AuthorizeAnswer, AuthorizeRequest, Balance, Decision, GrantAnswer,
    GrantRequest, GrantView, WalletGrant,
};
use schemas::event::{parse_event, validate, EventLimits, RatedEvent, TimeBounds};
use serde::Serialize;
use std::collections::HashMap;
use std::future::Future;
use utoipa::ToSchema;

/// The longest nonce accepted: an event's idempotency key, which settles it, is as long.
const MAX_NONCE_CHARS: usize = 255;

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Runs `op` against the tenant's ledger; when the state does not hold it, loads it from the
/// store first ([`rebuild`]) and runs it again. A ledger marked stale (a settlement of this
/// process failed while the state was away) is forgotten first, so that it is rebuilt.
pub async fn on_wallets<T, F, Fut>(state: &AppState, tenant: &Tenant, op: F) -> Result<T, ApiError>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<T, StateError>>,
{
    forget_if_stale(state, tenant).await?;
    match op().await {
        Err(StateError::WalletsNotLoaded(_)) => {
            rebuild(state, tenant).await?;
            Ok(op().await?)
        }
        other => Ok(other?),
    }
}

async fn forget_if_stale(state: &AppState, tenant: &Tenant) -> Result<(), StateError> {
    let stale = state
        .stale_ledgers
        .lock()
        .expect("stale ledgers lock")
        .contains(&tenant.id);
    if stale {
        state.balances.forget_ledger(&tenant.id).await?;
        tracing::info!(tenant = %tenant.id, "ledger forgotten after a failed settlement");
        state
            .stale_ledgers
            .lock()
            .expect("stale ledgers lock")
            .remove(&tenant.id);
    }
    Ok(())
}

/// Loads the tenant's ledger from the store unless it is loaded. One rebuild per tenant at a
/// time in this process (the others wait for it and find the ledger loaded); across
/// processes the state loads the first seed and refuses one read before the ledger was
/// forgotten, which is then read again.
async fn rebuild(state: &AppState, tenant: &Tenant) -> Result<(), ApiError> {
    let lock = state
        .rebuilds
        .lock()
        .expect("rebuild locks")
        .entry(tenant.id.clone())
        .or_default()
        .clone();
    let _one_at_a_time = lock.lock().await;
    // Requests that waited for a rebuild that just failed (the aggregators behind) fail at
    // once rather than each waiting as long again, one after another.
    let failed_at = *state
        .rebuild_failures
        .lock()
        .expect("rebuild failures lock")
        .get(&tenant.id)
        .unwrap_or(&0);
    if now_ms() - failed_at < REBUILD_RETRY_AFTER_MS {
        return Err(ApiError::Store(backends::error::StoreError::NotReady(
            format!(
                "the ledger of tenant `{}` is being rebuilt from the store; try again shortly",
                tenant.id
            ),
        )));
    }
    let rebuilt = load_from_store(state, tenant).await;
    let mut failures = state
        .rebuild_failures
        .lock()
        .expect("rebuild failures lock");
    match &rebuilt {
        // The store behind the bus: the next request would wait as long again.
        Err(ApiError::Store(e)) if e.kind() == backends::error::ErrorKind::NotReady => {
            failures.insert(tenant.id.clone(), now_ms());
        }
        _ => {
            failures.remove(&tenant.id);
        }
    }
    rebuilt
}

/// How long after a failed rebuild another is tried (liveness only: a rebuild that runs is
/// exact whenever it runs).
const REBUILD_RETRY_AFTER_MS: i64 = 1_000;

async fn load_from_store(state: &AppState, tenant: &Tenant) -> Result<(), ApiError> {
    for _ in 0..REBUILD_ATTEMPTS {
        let read_at = state.balances.ledger_mark(&tenant.id).await?;
        if matches!(read_at, LedgerMark::Loaded(_)) {
            return Ok(());
        }
        if let Some(backlog) = &state.backlog {
            let wait = std::time::Duration::from_millis(state.credits.rebuild_wait_ms);
            backlog.drain(wait).await?;
        }
        let seed = crate::rebuild::ledger_seed(state, tenant, now_ms()).await?;
        let loaded = state
            .balances
            .load_ledger(&tenant.id, &read_at, &seed)
            .await?;
        tracing::info!(
            tenant = %tenant.id,
            ?loaded,
            wallets = seed.wallets.len(),
            charged_keys = seed.charged.len(),
            counters = seed.counters.len(),
            "ledger loaded from the store"
        );
        if loaded != Loaded::Changed {
            return Ok(());
        }
    }
    Err(ApiError::State(StateError::WalletsNotLoaded(
        tenant.id.to_string(),
    )))
}

/// Seeds read per rebuild: each is refused only when the ledger was forgotten while it was
/// read, which takes a settlement failing meanwhile.
const REBUILD_ATTEMPTS: usize = 3;

/// The key of spend cap number `n` of `tenant` for `customer`, in the window starting at
/// `start_ms`.
pub fn cap_key(
    tenant: &str,
    n: usize,
    window: LimitWindow,
    start_ms: i64,
    customer: &str,
) -> String {
    format!("cap:{tenant}:{n}:{}:{start_ms}:{customer}", window.as_str())
}

/// The cap counters of `customer` at `now_ms`, one per configured cap.
fn cap_counters(tenant: &Tenant, customer: &str, now_ms: i64) -> Vec<CapCounter> {
    tenant
        .customer_caps
        .iter()
        .enumerate()
        .map(|(n, cap)| {
            let (start, end) = cap.window.bounds(now_ms);
            CapCounter {
                key: cap_key(&tenant.id, n, cap.window, start, customer),
                max_spend_micros: cap.max_spend_micros,
                window_end_ms: end,
            }
        })
        .collect()
}

/// What a durable batch charges once per event key: the settlements, and the position in the
/// batch of the event each one is for.
#[derive(Debug, Default)]
pub struct BatchCharges {
    pub events: Vec<usize>,
    pub settlements: Vec<Settlement>,
}

impl BatchCharges {
    /// The events at `positions` were stored before (the store said so): they charge nothing
    /// more, however long ago they came; their settlement only ends a reservation still open
    /// under their key.
    pub fn stored_before(&mut self, positions: &std::collections::HashSet<usize>) {
        for (event, settlement) in self.events.iter().zip(&mut self.settlements) {
            if positions.contains(event) {
                settlement.amount_micros = 0;
                settlement.caps.clear();
            }
        }
    }
}

/// Each call's settlement (when it names a customer) and its key's claim (when hard limits
/// count it). Empty when nothing would be charged.
pub fn settlements(tenant: &Tenant, events: &[RatedEvent], now_ms: i64) -> BatchCharges {
    let limited = !tenant.limits.is_empty();
    let capped = !tenant.customer_caps.is_empty();
    // A batch names few customers: their counters are made once, not once per call.
    let mut caps_of: HashMap<&str, Vec<CapCounter>> = HashMap::new();
    let mut charges = BatchCharges::default();
    for (i, e) in events.iter().enumerate() {
        let customer = e.customer_id.as_str();
        if !e.is_call() || (!limited && customer.is_empty()) {
            continue;
        }
        let caps = if capped && !customer.is_empty() {
            caps_of
                .entry(customer)
                .or_insert_with(|| cap_counters(tenant, customer, now_ms))
                .clone()
        } else {
            Vec::new()
        };
        charges.events.push(i);
        charges.settlements.push(Settlement {
            key: e.idempotency_key.clone(),
            customer: e.customer_id.clone(),
            amount_micros: e.revenue_micros,
            caps,
            always_claim: limited || (capped && !customer.is_empty()),
        });
    }
    charges
}

/// Until when a nonce's decision and an event key's charge are remembered.
fn remember_until_ms(state: &AppState, now_ms: i64) -> i64 {
    now_ms + state.credits.charged_keys_hours as i64 * 3_600_000
}

/// Settles a durable batch's calls, once per event key. Answers, per settlement, whether it was
/// charged now; `None` when the guard state is down (usage is stored already: nothing is
/// refused, nothing is charged now, and the tenant's ledger is rebuilt from the store at its
/// next use, which counts these calls).
pub async fn settle(
    state: &AppState,
    tenant: &Tenant,
    settlements: &[Settlement],
    now_ms: i64,
) -> Option<Vec<bool>> {
    if settlements.is_empty() {
        return Some(Vec::new());
    }
    let until = remember_until_ms(state, now_ms);
    // Failed attempts count against SETTLE_ATTEMPTS; a rebuild that loaded the ledger does not
    // (the settlement is then tried again), up to as many rebuilds.
    let (mut failures, mut rebuilds) = (0, 0);
    loop {
        if let Err(e) = forget_if_stale(state, tenant).await {
            crate::guard::warn_state_unavailable(&e);
            return None;
        }
        let e = match state
            .balances
            .settle(&tenant.id, settlements, now_ms, until)
            .await
        {
            Ok(claimed) => {
                if failures > 0 {
                    // An attempt failed: it may have been applied without its answer (its
                    // claims then hide calls from the limit counters). The store knows.
                    forget_soon(state, tenant).await;
                }
                return Some(claimed);
            }
            Err(StateError::WalletsNotLoaded(_)) => match rebuild(state, tenant).await {
                Ok(()) if rebuilds < SETTLE_ATTEMPTS => {
                    rebuilds += 1;
                    continue;
                }
                // Not loaded: the rebuild that succeeds later counts these stored calls.
                Ok(()) => return None,
                Err(ApiError::State(e)) => e,
                Err(e) => {
                    crate::guard::warn_state_unavailable(&e);
                    return None;
                }
            },
            Err(e) => e,
        };
        crate::guard::warn_state_unavailable(&e);
        failures += 1;
        // A connection Redis dropped (it restarted) is back by the next attempt.
        if e.kind() != backends::error::ErrorKind::Retriable || failures == SETTLE_ATTEMPTS {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100 * u64::from(failures))).await;
    }
    // The calls are stored: the rebuild that follows counts them. Until the state answers
    // again, nothing of them is charged.
    forget_soon(state, tenant).await;
    None
}

/// Settlement attempts per request: a connection the state dropped (Redis restarted) is back
/// by the second.
const SETTLE_ATTEMPTS: u32 = 3;

/// Forgets the tenant's ledger in the state now, or, when the state does not answer, as soon
/// as it does (a task retries every half second; this process's own next use of the tenant
/// forgets it first too): every ingestor then rebuilds it from the store.
pub(crate) async fn forget_soon(state: &AppState, tenant: &Tenant) {
    if state.balances.forget_ledger(&tenant.id).await.is_ok() {
        return;
    }
    let newly = state
        .stale_ledgers
        .lock()
        .expect("stale ledgers lock")
        .insert(tenant.id.clone());
    if !newly {
        return;
    }
    let (balances, stale, tenant) = (
        state.balances.clone(),
        state.stale_ledgers.clone(),
        tenant.id.clone(),
    );
    actix_web::rt::spawn(async move {
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            if !stale.lock().expect("stale ledgers lock").contains(&tenant) {
                return;
            }
            if balances.forget_ledger(&tenant).await.is_ok() {
                tracing::info!(%tenant, "ledger forgotten after a failed settlement");
                stale.lock().expect("stale ledgers lock").remove(&tenant);
                return;
            }
        }
    });
}

fn customer_of(path: &str) -> Result<&str, ApiError> {
    valid_customer_id(path).map_err(ApiError::BadRequest)?;
    Ok(path)
}

async fn balance_of(
    state: &AppState,
    tenant: &Tenant,
    customer: &str,
    now_ms: i64,
) -> Result<Balance, ApiError> {
    let figures: WalletFigures = on_wallets(state, tenant, || {
        state.balances.wallet(&tenant.id, customer, now_ms)
    })
    .await?;
    let grants = state.ledger.grants(&tenant.id, Some(customer)).await?;
    Ok(Balance {
        customer_id: customer.to_string(),
        granted_micros: figures.granted_micros,
        settled_micros: figures.settled_micros,
        reserved_micros: figures.reserved_micros,
        available_micros: figures.available_micros(),
        in_flight: figures.in_flight,
        grants: grants.iter().map(|g| GrantView::of(g, now_ms)).collect(),
    })
}

/// Adds prepaid credit to a customer's balance. A repeated `idempotencyKey` with the same body
/// answers the first grant and adds nothing; with another body, 409.
#[utoipa::path(
    post, path = "/v1/customers/{customerId}/credits", tag = "credits",
    params(("customerId" = String, Path, description = "The payer: the events' `customerId`")),
    request_body(content = GrantRequest, content_type = "application/json"),
    responses(
        (status = 201, description = "The grant recorded under the key (the first one) and the balance after it", body = GrantAnswer),
        (status = 409, description = "The key was used for another grant (another customer, amount, expiry or note)", body = crate::error::ErrorBody),
        ReadErrors,
        SmallBodyErrors,
    ),
    security(("api_key" = []), ("bearer" = [])),
)]
pub async fn grant(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
    body: crate::body::Whole,
) -> Result<HttpResponse, ApiError> {
    let caller = state.authenticate(&req, Scope::Admin).await?;
    let tenant = &caller.tenant.id;
    let customer = customer_of(&path)?;
    let now = now_ms();
    let request: GrantRequest = json_body(&body)?;
    let wanted = request
        .validate(customer, now)
        .map_err(ApiError::BadRequest)?;
    let recorded = state.ledger.record_grant(tenant, &wanted).await?;
    if recorded.customer_id != customer {
        return Err(ApiError::Conflict(format!(
            "idempotencyKey `{}` was used for a grant to another customer; use a new key",
            recorded.idempotency_key
        )));
    }
    // A replay answers the first grant only when it asks for the same one: a key sent again
    // with another amount is a mistake to show, not a grant to drop silently.
    let first = (
        recorded.amount_micros,
        recorded.expires_at_ms,
        &recorded.note,
    );
    if first != (wanted.amount_micros, wanted.expires_at_ms, &wanted.note) {
        return Err(ApiError::Conflict(format!(
            "idempotencyKey `{}` was used for a grant of {} µUSD{} with another body; send the same body to repeat it, or use a new key",
            recorded.idempotency_key,
            recorded.amount_micros,
            recorded
                .expires_at_ms
                .map(|e| format!(" expiring {}", schemas::event::format_ms(e)))
                .unwrap_or_default()
        )));
    }
    let wallet_grant = WalletGrant {
        amount_micros: recorded.amount_micros,
        expires_at_ms: recorded.expires_at_ms,
        settled_at_expiry: None,
    };
    on_wallets(&state, &caller.tenant, || {
        state.balances.add_grant(
            tenant,
            customer,
            &recorded.idempotency_key,
            wallet_grant,
            now,
        )
    })
    .await?;
    let balance = balance_of(&state, &caller.tenant, customer, now).await?;
    Ok(HttpResponse::Created().json(GrantAnswer {
        grant: GrantView::of(&recorded, now),
        balance,
    }))
}

/// A customer's prepaid balance: available = granted − settled − reserved, exactly.
#[utoipa::path(
    get, path = "/v1/customers/{customerId}/balance", tag = "credits",
    params(("customerId" = String, Path, description = "The payer: the events' `customerId`")),
    responses(
        (status = 200, description = "The balance and its grants (the same in both views: a balance holds no cost)", body = Viewed<Balance, Balance>),
        ReadErrors,
    ),
    security(("api_key" = []), ("bearer" = []), ("portal_token" = [])),
)]
pub async fn balance(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let reader = state.reader(&req, Scope::Read).await?;
    let customer = customer_of(&path)?;
    reader.customer(Some(customer.to_string()))?;
    let balance = balance_of(&state, &reader.tenant, customer, now_ms()).await?;
    Ok(reader.answer(balance))
}

/// The call `request` describes, priced from the tenant's rate plan as its usage event would
/// be: the same validation, the same rating.
fn quote(tenant: &Tenant, request: &AuthorizeRequest, now_ms: i64) -> Result<i64, ApiError> {
    let mut event = serde_json::json!({
        "idempotencyKey": request.nonce,
        "metricName": "mcp_server.tool_invocations",
        "customerId": request.customer_id,
        "toolName": request.tool_name,
        "metadata": {
            "inputTokens": request.estimated_input_tokens.unwrap_or(0),
            "outputTokens": request.estimated_output_tokens.unwrap_or(0),
        },
        "executionDurationMs": request.estimated_duration_ms.unwrap_or(0),
    });
    for (field, value) in [
        ("agentId", &request.agent_id),
        ("sessionId", &request.session_id),
    ] {
        if let Some(value) = value {
            event[field] = value.as_str().into();
        }
    }
    if let Some(quantity) = &request.quantity {
        event["quantity"] = serde_json::Value::Number(quantity.clone());
    }
    let raw = event.to_string();
    let bounds = TimeBounds {
        received_at_ms: now_ms,
        max_age_ms: 0,
        max_future_skew_ms: 0,
    };
    let limits = EventLimits {
        max_metadata_bytes: usize::MAX,
    };
    let rated = parse_event(&raw)
        .and_then(|wire| validate(wire, &raw, bounds, limits))
        .and_then(|valid| tenant.rate_plans.rate(valid, now_ms))
        .map_err(|e| {
            ApiError::BadRequest(e.replace("executionDurationMs", "estimatedDurationMs"))
        })?;
    Ok(rated.revenue_micros)
}

/// Asks to run one call before it runs. The server quotes it from the rate plan, then in one
/// atomic step claims the nonce, checks the customer's spend caps, calls in flight and (for a
/// prepaid customer) balance, and reserves the quote. The same nonce again answers the first
/// decision and reserves nothing more.
#[utoipa::path(
    post, path = "/v1/authorize", tag = "credits",
    request_body(content = AuthorizeRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "Authorized: run the call, then report its event with the nonce as idempotencyKey (or release it)", body = AuthorizeAnswer, example = json!(
            {"authorized":true,"nonce":"5f0c6d1e","quoteMicros":2000,"expiresAt":"2026-12-02T10:05:00.000Z"})),
        (status = 409, description = "The nonce was asked for another call (customer, tool or quote)", body = crate::error::ErrorBody),
        (status = 402, description = "Refused, with machine-readable terms; the call must not run. `reason` is `no_credits` (the tenant is `prepaid_only` and the customer was never granted credits: grant them), `spend_cap`, `too_many_in_flight` or `insufficient_balance`", body = AuthorizeAnswer, example = json!(
            {"authorized":false,"nonce":"5f0c6d1e","quoteMicros":2000,"reason":"insufficient_balance","availableMicros":500,"message":"the call is quoted at 2000 µUSD and the customer's balance has 500 µUSD available; a credit grant lifts it"})),
        ReadErrors,
        SmallBodyErrors,
    ),
    security(("api_key" = []), ("bearer" = [])),
)]
pub async fn authorize(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: crate::body::Whole,
) -> Result<HttpResponse, ApiError> {
    let caller = state.authenticate(&req, Scope::Ingest).await?;
    let tenant = &caller.tenant;
    let request: AuthorizeRequest = json_body(&body)?;
    let nonce_chars = request.nonce.chars().count();
    if nonce_chars == 0 || nonce_chars > MAX_NONCE_CHARS {
        return Err(ApiError::BadRequest(format!(
            "nonce must be 1 to {MAX_NONCE_CHARS} characters (got {nonce_chars}); use the call's event idempotencyKey"
        )));
    }
    schemas::event::check_text("nonce", &request.nonce, MAX_NONCE_CHARS)
        .map_err(ApiError::BadRequest)?;
    valid_customer_id(&request.customer_id).map_err(ApiError::BadRequest)?;
    let now = now_ms();
    let quote_micros = quote(tenant, &request, now)?;
    let caps = cap_counters(tenant, &request.customer_id, now);
    let ask = AuthorizeAsk {
        tenant: &tenant.id,
        customer: &request.customer_id,
        tool: &request.tool_name,
        nonce: &request.nonce,
        quote_micros,
        max_in_flight: tenant.max_in_flight_per_customer,
        prepaid_only: tenant.prepaid_only,
        caps: &caps,
        now_ms: now,
        expires_at_ms: now + state.credits.reservation_seconds as i64 * 1000,
        remember_until_ms: remember_until_ms(&state, now),
    };
    let Authorization {
        decision,
        first_ask,
    } = on_wallets(&state, tenant, || state.balances.authorize(&ask)).await?;
    if let Some((customer, tool)) = first_ask {
        let first_quote = match decision {
            Decision::Authorized { quote_micros, .. } | Decision::Refused { quote_micros, .. } => {
                quote_micros
            }
        };
        if (customer.as_str(), tool.as_str(), first_quote)
            != (&*request.customer_id, &*request.tool_name, quote_micros)
        {
            return Err(ApiError::Conflict(format!(
                "nonce `{}` was asked for another call (customer `{customer}`, tool `{tool}`, quoted at {first_quote} µUSD); a nonce names one call: use a new one for this",
                request.nonce
            )));
        }
    }
    let answer = AuthorizeAnswer::of(&request.nonce, &decision);
    Ok(match decision {
        Decision::Authorized { .. } => HttpResponse::Ok().json(answer),
        Decision::Refused { reason, .. } => {
            crate::metrics::METRICS.payment_refused(reason);
            HttpResponse::PaymentRequired().json(answer)
        }
    })
}

/// The answer to a release.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReleaseAnswer {
    pub nonce: String,
    /// Whether a reservation was open and ended now (false: it was settled, released or had
    /// expired before, or the authorization was refused).
    pub released: bool,
}

/// The tool did not run: the authorization's reservation ends.
#[utoipa::path(
    post, path = "/v1/authorize/{nonce}/release", tag = "credits",
    params(("nonce" = String, Path, description = "The authorization's nonce")),
    responses(
        (status = 200, description = "The reservation is over", body = ReleaseAnswer),
        (status = 404, description = "No authorization with this nonce (or it is forgotten)", body = crate::error::ErrorBody),
        ReadErrors,
        SmallBodyErrors,
    ),
    security(("api_key" = []), ("bearer" = [])),
)]
pub async fn release(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let caller = state.authenticate(&req, Scope::Ingest).await?;
    let tenant = &caller.tenant;
    let nonce = path.as_str();
    let now = now_ms();
    match on_wallets(&state, tenant, || {
        state.balances.release(&tenant.id, nonce, now)
    })
    .await?
    {
        None => Err(ApiError::NotFound(format!(
            "no authorization with nonce `{nonce}`; POST /v1/authorize makes one"
        ))),
        Some(released) => Ok(HttpResponse::Ok().json(ReleaseAnswer {
            nonce: nonce.to_string(),
            released,
        })),
    }
}
