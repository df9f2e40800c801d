//! Customer tokens: who a caller is, signed by whoever holds a secret. The portal hands them
//! to customers (`POST /v1/portal/tokens`); a gateway in front of `mcp-meter proxy` signs the
//! same tokens to name the payer of a call.
//!
//! A token is `mcpp_` + base64url(claims JSON) + `.` + base64url(HMAC-SHA256(secret, claims
//! JSON)), unpadded; the claims are `{"t": tenant, "c": customer, "e": expiry}`, the expiry in
//! seconds since the epoch. Verifying needs the secret and nothing else.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// What every token starts with, so a key and a token are told apart at a glance.
pub const TOKEN_PREFIX: &str = "mcpp_";

/// What a token says: whose it is and until when.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct CustomerClaims {
    #[serde(rename = "t")]
    pub tenant: String,
    #[serde(rename = "c")]
    pub customer: String,
    /// Seconds since the epoch.
    #[serde(rename = "e")]
    pub expires_at: i64,
}

/// Why a token is not accepted.
#[derive(Debug, PartialEq, Eq)]
pub enum TokenError {
    /// Not a token at all.
    Malformed,
    /// Altered, or signed with another secret.
    Signature,
    /// Its expiry (seconds since the epoch) has passed.
    Expired(i64),
}

fn mac(secret: &[u8]) -> Hmac<Sha256> {
    Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length")
}

/// The token of `claims` under `secret`.
pub fn sign(secret: &[u8], claims: &CustomerClaims) -> String {
    let claims = serde_json::to_vec(claims).expect("claims serialize");
    let mut mac = mac(secret);
    mac.update(&claims);
    let signature = mac.finalize().into_bytes();
    format!(
        "{TOKEN_PREFIX}{}.{}",
        URL_SAFE_NO_PAD.encode(&claims),
        URL_SAFE_NO_PAD.encode(signature)
    )
}

/// The claims of a token signed with `secret` that has not expired at `now` (seconds). The
/// signature is checked (in constant time) before anything in the claims is read.
pub fn verify(secret: &[u8], token: &str, now: i64) -> Result<CustomerClaims, TokenError> {
    let body = token
        .strip_prefix(TOKEN_PREFIX)
        .ok_or(TokenError::Malformed)?;
    let (claims, signature) = body.split_once('.').ok_or(TokenError::Malformed)?;
    let claims = URL_SAFE_NO_PAD
        .decode(claims)
        .map_err(|_| TokenError::Malformed)?;
    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|_| TokenError::Malformed)?;
    let mut mac = mac(secret);
    mac.update(&claims);
    mac.verify_slice(&signature)
        .map_err(|_| TokenError::Signature)?;
    let claims: CustomerClaims =
        serde_json::from_slice(&claims).map_err(|_| TokenError::Malformed)?;
    if claims.expires_at <= now {
        return Err(TokenError::Expired(claims.expires_at));
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_verifies_until_it_expires_and_not_once_altered() {
        let secret = b"0123456789abcdef0123456789abcdef";
        let claims = CustomerClaims {
            tenant: "acme".into(),
            customer: "cust-7".into(),
            expires_at: 1_000,
        };
        let token = sign(secret, &claims);
        assert_eq!(verify(secret, &token, 999), Ok(claims));
        assert_eq!(
            verify(secret, &token, 1_000),
            Err(TokenError::Expired(1_000))
        );
        // Another customer's claims under this token's signature.
        let (_, signature) = token.split_once('.').unwrap();
        let forged = format!(
            "{TOKEN_PREFIX}{}.{signature}",
            URL_SAFE_NO_PAD.encode(br#"{"t":"acme","c":"cust-8","e":1000}"#)
        );
        assert_eq!(verify(secret, &forged, 999), Err(TokenError::Signature));
        assert_eq!(
            verify(b"another secret", &token, 999),
            Err(TokenError::Signature)
        );
        assert_eq!(
            verify(secret, "mcpp_nonsense", 999),
            Err(TokenError::Malformed)
        );
    }
}
