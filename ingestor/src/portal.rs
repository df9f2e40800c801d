//! The customer portal's tokens: `POST /v1/portal/tokens` (scope `admin`) signs a read-only
//! token bound to one tenant and one customer, which every read endpoint then answers for
//! that customer only.
//!
//! A token is a customer token (`schemas::token`): `mcpp_` + base64url(claims JSON) + `.` +
//! base64url(HMAC-SHA256 of the claims). Verifying it needs the secret and nothing else, so any
//! ingestor with the same `portal.secret` accepts it and no state is kept. It cannot be revoked
//! one by one: keep them short, or change the secret to revoke them all.

use crate::body::json_body;
use crate::error::{ApiError, ErrorBody};
use crate::state::AppState;
use actix_web::{web, HttpRequest, HttpResponse};
use schemas::config::Scope;
use schemas::token::{CustomerClaims, TokenError};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub use schemas::token::TOKEN_PREFIX;
/// Longest a token may live: 30 days.
pub const MAX_TOKEN_SECONDS: u64 = 30 * 86_400;

/// A verified token: the tenant and the customer it reads for.
#[derive(Debug, PartialEq, Eq)]
pub struct PortalClaims {
    pub tenant: String,
    pub customer: String,
}

/// Signs and verifies portal tokens with one secret.
pub struct PortalSigner {
    key: Vec<u8>,
}

impl PortalSigner {
    /// With `portal.secret`, or a random key when none is configured.
    pub fn new(secret: Option<&str>) -> PortalSigner {
        let key = match secret {
            Some(s) => s.as_bytes().to_vec(),
            None => {
                let mut bytes = vec![0u8; 32];
                getrandom::fill(&mut bytes).expect("the OS gives randomness");
                tracing::warn!(
                    "portal.secret is not set: portal tokens are signed with a random key, so \
they stop working at restart and only this process accepts them"
                );
                bytes
            }
        };
        PortalSigner { key }
    }

    /// A token for `customer` of `tenant`, valid until `expires_at` (seconds since the epoch).
    pub fn issue(&self, tenant: &str, customer: &str, expires_at: i64) -> String {
        let claims = CustomerClaims {
            tenant: tenant.into(),
            customer: customer.into(),
            expires_at,
        };
        schemas::token::sign(&self.key, &claims)
    }

    /// The claims of a token this signer issued and that has not expired at `now` (seconds).
    pub fn verify(&self, token: &str, now: i64) -> Result<PortalClaims, String> {
        match schemas::token::verify(&self.key, token, now) {
            Ok(claims) => Ok(PortalClaims {
                tenant: claims.tenant,
                customer: claims.customer,
            }),
            Err(TokenError::Malformed) => Err(
                "the portal token is malformed: send it exactly as POST /v1/portal/tokens answered it"
                    .to_string(),
            ),
            Err(TokenError::Signature) => Err(
                "the portal token's signature does not match: it was altered, or signed with another \
portal.secret; ask for a new one"
                    .to_string(),
            ),
            Err(TokenError::Expired(at)) => Err(format!(
                "the portal token expired at {}; ask for a new one",
                schemas::event::format_ms(at * 1000)
            )),
        }
    }
}

/// `POST /v1/portal/tokens`
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TokenRequest {
    /// The customer the token reads for, as events name it in `customerId`.
    #[schema(example = "cust-7")]
    pub customer_id: String,
    /// Seconds the token is valid, 1 to 2,592,000 (30 days).
    #[schema(example = 3600, minimum = 1, maximum = 2592000)]
    pub expires_in_seconds: u64,
}

/// A new portal token.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PortalToken {
    /// Send it like a key: `Authorization: Bearer <token>` or `X-API-Key`.
    pub token: String,
    pub customer_id: String,
    /// RFC 3339.
    pub expires_at: String,
}

/// Signs a read-only token for one customer: every read endpoint answers it with that
/// customer's rows only (its sessions, usage, spend, exports and balance); it writes nothing
/// and reads no margin levels; its answers leave out the operator's costs (COGS, gross
/// profit, margin).
#[utoipa::path(
    post, path = "/v1/portal/tokens", tag = "portal", request_body = TokenRequest,
    responses(
        (status = 201, description = "The token", body = PortalToken, example = json!(
            {"token":"mcpp_eyJ0IjoiZGVtbyIsImMiOiJjdXN0LTciLCJlIjoxNzk2MDAwMDAwfQ.c2lnbmF0dXJl","customerId":"cust-7","expiresAt":"2026-12-02T19:00:00.000Z"})),
        (status = 400, description = "A bad customer id or lifetime", body = ErrorBody),
        (status = 401, description = "No API key, or an unknown one", body = ErrorBody),
        (status = 403, description = "The key lacks the `admin` scope", body = ErrorBody),
        crate::error::SmallBodyErrors,
    ),
    security(("api_key" = []), ("bearer" = [])),
)]
pub async fn issue(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: crate::body::Whole,
) -> Result<HttpResponse, ApiError> {
    let caller = state.authenticate(&req, Scope::Admin).await?;
    let body: TokenRequest = json_body(&body)?;
    schemas::credits::valid_customer_id(&body.customer_id).map_err(ApiError::BadRequest)?;
    if !(1..=MAX_TOKEN_SECONDS).contains(&body.expires_in_seconds) {
        return Err(ApiError::BadRequest(format!(
            "expiresInSeconds must be 1 to {MAX_TOKEN_SECONDS} (30 days); got {}",
            body.expires_in_seconds
        )));
    }
    let expires_at = chrono::Utc::now().timestamp() + body.expires_in_seconds as i64;
    let token = state
        .keys
        .portal
        .issue(&caller.tenant.id, &body.customer_id, expires_at);
    Ok(HttpResponse::Created().json(PortalToken {
        token,
        customer_id: body.customer_id,
        expires_at: schemas::event::format_ms(expires_at * 1000),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_verifies_until_it_expires_and_says_why_not() {
        let signer = PortalSigner::new(Some("0123456789abcdef0123456789abcdef"));
        let token = signer.issue("acme", "cust-7", 1_000);
        assert_eq!(
            signer.verify(&token, 999),
            Ok(PortalClaims {
                tenant: "acme".into(),
                customer: "cust-7".into()
            })
        );
        assert!(signer
            .verify(&token, 1_000)
            .unwrap_err()
            .contains("expired"));
        let other = PortalSigner::new(Some("another secret of thirty-two chars!"));
        assert!(other.verify(&token, 999).unwrap_err().contains("signature"));
        assert!(signer
            .verify("mcpp_nonsense", 999)
            .unwrap_err()
            .contains("malformed"));
    }
}
