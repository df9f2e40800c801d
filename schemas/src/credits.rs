//! Charge before the tool runs: prepaid credit grants, balances, and the authorize decision.
//!
//! A customer (the event's `customerId`) with grants is prepaid: its balance is what its
//! grants still count for, minus its settled usage, minus its open reservations. One without
//! grants is postpaid: authorizations check its caps and in-flight count only, unless its
//! tenant is prepaid only, which refuses it.
//!
//! The rules here are pure and both state adapters follow them (the Redis scripts are their
//! Lua spelling): [`granted_micros`] says what grants count for, [`decide`] what an
//! authorization answers.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `POST /v1/customers/{customerId}/credits`: a prepaid grant.
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrantRequest {
    /// µUSD added to the balance; more than 0.
    #[schema(example = 5000000, minimum = 1, maximum = 10_000_000_000_000_i64)]
    pub amount_micros: i64,
    /// One grant per key and tenant: the same body again answers the first grant, never a
    /// second; another body under the key is refused (409).
    #[schema(example = "grant-42", min_length = 1, max_length = 255)]
    pub idempotency_key: String,
    /// When what the grant has not paid for lapses (RFC 3339); absent: never.
    #[serde(default)]
    #[schema(value_type = Option<String>, example = "2027-01-01T00:00:00Z")]
    pub expires_at: Option<DateTime<Utc>>,
    /// For people: why it was granted (an order number, a promotion).
    #[serde(default)]
    #[schema(max_length = 1000)]
    pub note: Option<String>,
}

/// The longest grant key and note accepted, in characters.
pub const MAX_GRANT_KEY_CHARS: usize = 255;
pub const MAX_GRANT_NOTE_CHARS: usize = 1000;

/// A recorded grant, as the store keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreditGrant {
    pub customer_id: String,
    pub idempotency_key: String,
    pub amount_micros: i64,
    pub granted_at_ms: i64,
    pub expires_at_ms: Option<i64>,
    pub note: String,
}

impl GrantRequest {
    /// The grant this request records at `now_ms`, or what to fix.
    pub fn validate(self, customer_id: &str, now_ms: i64) -> Result<CreditGrant, String> {
        valid_customer_id(customer_id)?;
        if self.amount_micros <= 0 || self.amount_micros > crate::config::MAX_LIMIT {
            return Err(format!(
                "amountMicros must be 1 to {} µUSD (got {})",
                crate::config::MAX_LIMIT,
                self.amount_micros
            ));
        }
        let key_chars = self.idempotency_key.chars().count();
        if key_chars == 0 || key_chars > MAX_GRANT_KEY_CHARS {
            return Err(format!(
                "idempotencyKey must be 1 to {MAX_GRANT_KEY_CHARS} characters (got {key_chars})"
            ));
        }
        crate::event::check_text("idempotencyKey", &self.idempotency_key, MAX_GRANT_KEY_CHARS)?;
        let note = self.note.unwrap_or_default();
        if note.chars().count() > MAX_GRANT_NOTE_CHARS {
            return Err(format!(
                "note must be at most {MAX_GRANT_NOTE_CHARS} characters"
            ));
        }
        let expires_at_ms = self.expires_at.map(|t| t.timestamp_millis());
        if expires_at_ms.is_some_and(|e| e <= now_ms) {
            return Err("expiresAt is in the past; give a later time or leave it out".into());
        }
        Ok(CreditGrant {
            customer_id: customer_id.to_string(),
            idempotency_key: self.idempotency_key,
            amount_micros: self.amount_micros,
            granted_at_ms: now_ms,
            expires_at_ms,
            note,
        })
    }
}

/// A customer id as events bound it (at most 64 characters, no control character), and not
/// empty: the same rule wherever a customer is named.
pub fn valid_customer_id(customer_id: &str) -> Result<(), String> {
    if customer_id.is_empty() {
        return Err("customerId must be 1 to 64 characters (got 0)".into());
    }
    crate::event::check_text("customerId", customer_id, crate::event::MAX_CUSTOMER_ID_LEN)
}

/// A grant as a wallet holds it: what it adds, when it lapses, and once it has lapsed, the
/// customer's settled usage at that moment (what it could have paid for).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WalletGrant {
    pub amount_micros: i64,
    pub expires_at_ms: Option<i64>,
    pub settled_at_expiry: Option<i64>,
}

impl WalletGrant {
    fn expired(&self, now_ms: i64) -> bool {
        self.expires_at_ms.is_some_and(|e| e <= now_ms)
    }
}

/// Records, for every grant that lapsed by `now_ms` and was not yet seen lapsed, the settled
/// usage at that moment. Called before every change of `settled`, so a settlement after the
/// expiry is never paid by the lapsed grant.
pub fn freeze_expired<'a>(
    grants: impl IntoIterator<Item = &'a mut WalletGrant>,
    settled: i64,
    now_ms: i64,
) {
    for g in grants {
        if g.expired(now_ms) && g.settled_at_expiry.is_none() {
            g.settled_at_expiry = Some(settled);
        }
    }
}

/// What the grants count for at `now_ms`: every unexpired grant in full, and of each lapsed
/// grant the part usage consumed before it lapsed. Usage consumes grants in the order they
/// lapse (a lapsed grant lapsed before every live one), so a grant's lapse takes away only what
/// it had not paid for. `grants` must have been frozen at `now_ms` ([`freeze_expired`]).
pub fn granted_micros<'a>(grants: impl IntoIterator<Item = &'a WalletGrant>, now_ms: i64) -> i64 {
    let mut live = 0;
    let mut lapsed: Vec<(i64, i64, i64)> = Vec::new();
    for g in grants {
        if g.expired(now_ms) {
            lapsed.push((
                g.expires_at_ms.unwrap_or(i64::MAX),
                g.amount_micros,
                g.settled_at_expiry.unwrap_or(0),
            ));
        } else {
            live += g.amount_micros;
        }
    }
    lapsed.sort();
    let mut consumed = 0i64;
    for (_, amount, settled_then) in lapsed {
        consumed += (settled_then - consumed).clamp(0, amount);
    }
    live + consumed
}

/// Why an authorization was refused: the `reason` of a 402.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RefusalReason {
    /// The tenant takes prepaid calls only and the customer was never granted credits.
    NoCredits,
    /// The prepaid balance does not cover the quote; a grant lifts it.
    InsufficientBalance,
    /// The customer's spend in a cap's window would pass the cap.
    SpendCap,
    /// The customer has as many authorized calls in flight as allowed.
    TooManyInFlight,
}

impl RefusalReason {
    /// Every reason, in a fixed order (what `/metrics` counts by).
    pub const ALL: [RefusalReason; 4] = [
        RefusalReason::NoCredits,
        RefusalReason::InsufficientBalance,
        RefusalReason::SpendCap,
        RefusalReason::TooManyInFlight,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RefusalReason::NoCredits => "no_credits",
            RefusalReason::InsufficientBalance => "insufficient_balance",
            RefusalReason::SpendCap => "spend_cap",
            RefusalReason::TooManyInFlight => "too_many_in_flight",
        }
    }

    pub fn parse(text: &str) -> Option<RefusalReason> {
        RefusalReason::ALL.into_iter().find(|r| r.as_str() == text)
    }
}

/// One spend cap as an authorization checks it: the customer's spend in the window (settled
/// plus reserved), the cap, and when the window ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapState {
    pub spent_micros: i64,
    pub max_spend_micros: i64,
    pub window_end_ms: i64,
}

/// What a customer's wallet looks like when an authorization asks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WalletView {
    /// Whether the customer has grants (prepaid) or not (postpaid: no balance check).
    pub prepaid: bool,
    pub available_micros: i64,
    /// Open reservations' expiries, one per call in flight.
    pub in_flight_expiries_ms: Vec<i64>,
    pub caps: Vec<CapState>,
}

/// What an authorization answered: stored under its nonce, so a replay answers the same.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Authorized {
        quote_micros: i64,
        expires_at_ms: i64,
    },
    Refused {
        reason: RefusalReason,
        quote_micros: i64,
        /// The balance available then; `None` for a postpaid customer, which has none.
        available_micros: Option<i64>,
        retry_after_seconds: Option<u64>,
    },
}

/// The one rule of `POST /v1/authorize`, after the nonce is claimed: under `prepaid_only`, a
/// customer never granted credits is refused first (nothing else could let it pay); then caps
/// (a cap binds whoever pays), then the calls in flight, then the balance of a prepaid
/// customer. Waiting helps a cap (its window ends) and an in-flight limit (the earliest
/// reservation ends); it does not help a missing grant or a balance, which only a grant lifts.
pub fn decide(
    wallet: &WalletView,
    quote_micros: i64,
    max_in_flight: Option<u32>,
    prepaid_only: bool,
    now_ms: i64,
    expires_at_ms: i64,
) -> Decision {
    let refuse = |reason, wait_until_ms: Option<i64>| Decision::Refused {
        reason,
        quote_micros,
        available_micros: wallet.prepaid.then_some(wallet.available_micros),
        retry_after_seconds: wait_until_ms.map(|t| ((t - now_ms).max(1) as u64).div_ceil(1000)),
    };
    if prepaid_only && !wallet.prepaid {
        return refuse(RefusalReason::NoCredits, None);
    }
    if let Some(cap) = wallet
        .caps
        .iter()
        .find(|c| c.spent_micros + quote_micros > c.max_spend_micros)
    {
        return refuse(RefusalReason::SpendCap, Some(cap.window_end_ms));
    }
    if max_in_flight.is_some_and(|max| wallet.in_flight_expiries_ms.len() >= max as usize) {
        let earliest = wallet.in_flight_expiries_ms.iter().min().copied();
        return refuse(RefusalReason::TooManyInFlight, earliest);
    }
    if wallet.prepaid && wallet.available_micros < quote_micros {
        return refuse(RefusalReason::InsufficientBalance, None);
    }
    Decision::Authorized {
        quote_micros,
        expires_at_ms,
    }
}

/// `POST /v1/authorize`: ask to run one call. The server quotes it from the rate plan; the
/// client sends no amount.
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizeRequest {
    /// Claimed once per tenant: a retry or a replay answers the first decision. Report the
    /// call's usage event with this as its `idempotencyKey` to settle it.
    #[schema(
        example = "5f0c6d1e-8a7b-4c1d-9e2f-3a4b5c6d7e8f",
        min_length = 1,
        max_length = 255
    )]
    pub nonce: String,
    #[schema(example = "cust-7", min_length = 1, max_length = 64)]
    pub customer_id: String,
    #[schema(example = "search")]
    pub tool_name: String,
    #[serde(default)]
    pub agent_id: Option<String>,
    #[serde(default)]
    pub session_id: Option<String>,
    /// Units of the call (default 1).
    #[serde(default)]
    #[schema(value_type = Option<f64>)]
    pub quantity: Option<serde_json::Number>,
    #[serde(default)]
    pub estimated_input_tokens: Option<i64>,
    #[serde(default)]
    pub estimated_output_tokens: Option<i64>,
    #[serde(default)]
    pub estimated_duration_ms: Option<i64>,
}

/// The answer to an authorization: `200` when `authorized`, `402 Payment Required` otherwise,
/// with machine-readable terms.
#[derive(Clone, Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizeAnswer {
    pub authorized: bool,
    pub nonce: String,
    /// What the call is quoted at, from the tenant's rate plan.
    pub quote_micros: i64,
    /// Authorized: when the reservation ends unless settled or released first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// Refused: why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<RefusalReason>,
    /// Refused: the balance available then (prepaid customers only: a postpaid customer has
    /// no balance, and this is absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub available_micros: Option<i64>,
    /// Refused: seconds after which asking again can pass (absent: waiting does not help).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_seconds: Option<u64>,
    /// Refused: what happened and what lifts it, for people.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl AuthorizeAnswer {
    pub fn of(nonce: &str, decision: &Decision) -> AuthorizeAnswer {
        match *decision {
            Decision::Authorized {
                quote_micros,
                expires_at_ms,
            } => AuthorizeAnswer {
                authorized: true,
                nonce: nonce.to_string(),
                quote_micros,
                expires_at: Some(crate::event::format_ms(expires_at_ms)),
                reason: None,
                available_micros: None,
                retry_after_seconds: None,
                message: None,
            },
            Decision::Refused {
                reason,
                quote_micros,
                available_micros,
                retry_after_seconds,
            } => {
                let message = match reason {
                    RefusalReason::NoCredits => format!(
                        "the customer has no credits: this tenant takes prepaid calls only (prepaid_only) and the customer was never granted any; grant credits with POST /v1/customers/{{customerId}}/credits (a key with the admin scope), then authorize the call ({quote_micros} µUSD) again"
                    ),
                    RefusalReason::InsufficientBalance => format!(
                        "the call is quoted at {quote_micros} µUSD and the customer's balance has {} µUSD available; a credit grant lifts it",
                        available_micros.unwrap_or(0)
                    ),
                    RefusalReason::SpendCap => format!(
                        "the call ({quote_micros} µUSD) would take the customer past a spend cap; the cap's window starts over in {} s",
                        retry_after_seconds.unwrap_or(0)
                    ),
                    RefusalReason::TooManyInFlight => "the customer has as many authorized calls in flight as allowed; settle or release one, or wait for a reservation to end".to_string(),
                };
                AuthorizeAnswer {
                    authorized: false,
                    nonce: nonce.to_string(),
                    quote_micros,
                    expires_at: None,
                    reason: Some(reason),
                    available_micros,
                    retry_after_seconds,
                    message: Some(message),
                }
            }
        }
    }
}

/// `GET /v1/customers/{customerId}/balance`: available = granted − settled − reserved, exactly.
#[derive(Clone, Debug, Serialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Balance {
    pub customer_id: String,
    /// What the grants count for: unexpired grants in full, lapsed ones for what they paid.
    pub granted_micros: i64,
    /// Usage settled since the first grant (rated revenue of the customer's calls).
    pub settled_micros: i64,
    /// Quotes held by open authorizations.
    pub reserved_micros: i64,
    pub available_micros: i64,
    /// Calls authorized and not yet settled or released.
    pub in_flight: usize,
    pub grants: Vec<GrantView>,
}

/// A balance holds no cost of the operator's: a customer reads it as the tenant does.
impl crate::analytics::ForCustomer for Balance {
    type Customer = Balance;
    fn for_customer(self) -> Balance {
        self
    }
}

/// One grant as the API shows it.
#[derive(Clone, Debug, Serialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct GrantView {
    pub idempotency_key: String,
    pub amount_micros: i64,
    pub granted_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    pub expired: bool,
    pub note: String,
}

impl GrantView {
    pub fn of(g: &CreditGrant, now_ms: i64) -> GrantView {
        GrantView {
            idempotency_key: g.idempotency_key.clone(),
            amount_micros: g.amount_micros,
            granted_at: crate::event::format_ms(g.granted_at_ms),
            expires_at: g.expires_at_ms.map(crate::event::format_ms),
            expired: g.expires_at_ms.is_some_and(|e| e <= now_ms),
            note: g.note.clone(),
        }
    }
}

/// `201` to a grant: the grant recorded for the key (the first) and the balance after it.
#[derive(Clone, Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct GrantAnswer {
    pub grant: GrantView,
    pub balance: Balance,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(amount: i64, expires: Option<i64>) -> WalletGrant {
        WalletGrant {
            amount_micros: amount,
            expires_at_ms: expires,
            settled_at_expiry: None,
        }
    }

    #[test]
    fn a_lapsed_grant_keeps_what_it_paid_for_and_loses_the_rest() {
        let mut grants = [grant(10, Some(100)), grant(10, None)];
        freeze_expired(&mut grants, 4, 50);
        assert_eq!(granted_micros(&grants, 50), 20);
        // At 100 the first grant lapses having paid for 4 of its 10.
        freeze_expired(&mut grants, 4, 150);
        assert_eq!(granted_micros(&grants, 150), 14);
        // Usage after the lapse is paid by the live grant only.
        freeze_expired(&mut grants, 9, 200);
        assert_eq!(granted_micros(&grants, 200), 14);
    }

    #[test]
    fn usage_consumes_grants_in_the_order_they_lapse() {
        let mut grants = [grant(5, Some(300)), grant(5, Some(100)), grant(5, None)];
        // 7 settled before either lapsed: the grant lapsing at 100 paid 5, the one at 300 paid 2.
        freeze_expired(&mut grants, 7, 400);
        assert_eq!(granted_micros(&grants, 400), 5 + 5 + 2);
        // Usage beyond every grant (a debt) is consumed up to each grant's amount only.
        let mut debt = [grant(5, Some(100))];
        freeze_expired(&mut debt, 9, 100);
        assert_eq!(granted_micros(&debt, 100), 5);
    }

    #[test]
    fn decide_checks_caps_then_in_flight_then_balance() {
        let wallet = WalletView {
            prepaid: true,
            available_micros: 100,
            in_flight_expiries_ms: vec![5_000, 3_000],
            caps: vec![CapState {
                spent_micros: 50,
                max_spend_micros: 200,
                window_end_ms: 10_000,
            }],
        };
        let at = 1_000;
        assert_eq!(
            decide(&wallet, 100, None, false, at, 301_000),
            Decision::Authorized {
                quote_micros: 100,
                expires_at_ms: 301_000
            }
        );
        let refused = |d: Decision| match d {
            Decision::Refused {
                reason,
                retry_after_seconds,
                ..
            } => (reason, retry_after_seconds),
            other => panic!("authorized: {other:?}"),
        };
        assert_eq!(
            refused(decide(&wallet, 101, None, false, at, 0)),
            (RefusalReason::InsufficientBalance, None)
        );
        assert_eq!(
            refused(decide(&wallet, 100, Some(2), false, at, 0)),
            (RefusalReason::TooManyInFlight, Some(2))
        );
        assert_eq!(
            refused(decide(&wallet, 151, Some(2), false, at, 0)),
            (RefusalReason::SpendCap, Some(9))
        );
        // A prepaid-only tenant's granted customer is judged as before.
        assert!(matches!(
            decide(&wallet, 100, None, true, at, 0),
            Decision::Authorized { .. }
        ));
        let postpaid = WalletView {
            prepaid: false,
            available_micros: -5,
            ..wallet
        };
        assert!(matches!(
            decide(&postpaid, 100, None, false, at, 0),
            Decision::Authorized { .. }
        ));
        // Under prepaid_only a customer never granted credits is refused before anything
        // else, and waiting does not help.
        assert_eq!(
            refused(decide(&postpaid, 151, Some(2), true, at, 0)),
            (RefusalReason::NoCredits, None)
        );
    }

    #[test]
    fn grants_are_validated_with_what_to_fix() {
        let req = |amount: i64, key: &str| GrantRequest {
            amount_micros: amount,
            idempotency_key: key.into(),
            expires_at: None,
            note: None,
        };
        assert!(req(0, "k")
            .validate("c", 1)
            .unwrap_err()
            .contains("amountMicros"));
        assert!(req(-5, "k")
            .validate("c", 1)
            .unwrap_err()
            .contains("amountMicros"));
        assert!(req(5, "")
            .validate("c", 1)
            .unwrap_err()
            .contains("idempotencyKey"));
        assert!(req(5, "k")
            .validate("", 1)
            .unwrap_err()
            .contains("customerId"));
        let g = req(5, "k").validate("c", 7).unwrap();
        assert_eq!((g.amount_micros, g.granted_at_ms), (5, 7));
    }
}
