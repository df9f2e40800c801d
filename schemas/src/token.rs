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

/// Fewest random bytes a signing secret carries.
pub const MIN_SECRET_BYTES: usize = 32;

/// Fewest distinct byte values among a secret's bytes: 32 random bytes take about 30; fewer
/// than 16 means a pattern (`aaaa…`, `0123…` repeated), not randomness.
const MIN_DISTINCT_BYTES: usize = 16;

/// Checks that a signing secret is at least [`MIN_SECRET_BYTES`] random bytes written as hex,
/// as `openssl rand -hex 32` prints them (64 digits or more), saying what to write instead.
/// Hex only: words are not hex, so a passphrase cannot pass for random bytes. The HMAC key is
/// the text as written.
pub fn check_secret(text: &str) -> Result<(), String> {
    let make = "make one with `openssl rand -hex 32`";
    if let Some(other) = text.chars().find(|c| !c.is_ascii_hexdigit()) {
        return Err(format!(
            "must be random bytes written as hex (0-9, a-f), not {other:?}; {make}"
        ));
    }
    if text.len() < 2 * MIN_SECRET_BYTES || !text.len().is_multiple_of(2) {
        return Err(format!(
            "has {} hex digits; it needs an even number, at least {} ({MIN_SECRET_BYTES} bytes); \
{make}",
            text.len(),
            2 * MIN_SECRET_BYTES
        ));
    }
    let distinct = (0..text.len())
        .step_by(2)
        .map(|i| text[i..i + 2].to_ascii_lowercase())
        .collect::<std::collections::HashSet<_>>()
        .len();
    if distinct < MIN_DISTINCT_BYTES {
        return Err(format!(
            "is not random: its {} bytes take only {distinct} distinct values; {make}",
            text.len() / 2
        ));
    }
    Ok(())
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

    #[test]
    fn a_secret_is_32_random_bytes_in_hex() {
        // What `openssl rand -hex 32` prints, in either case.
        let random = "5f1c0e9a4b7d2c8e3a6f9b1d4e7c0a2f5b8d1e4a7c0f3b6d9e2a5c8f1b4d7e0a";
        check_secret(random).unwrap();
        check_secret(&random.to_ascii_uppercase()).unwrap();
        let refused = |text: &str| check_secret(text).unwrap_err();
        // 32 identical characters: neither long enough nor random.
        assert!(refused(&"a".repeat(32)).contains("has 32 hex digits"));
        assert!(refused(&"a".repeat(64)).contains("only 1 distinct values"));
        assert!(refused(&"0123456789abcdef".repeat(4)).contains("only 8 distinct"));
        // A passphrase, even one whose letters happen to be base64.
        assert!(refused("thisismysecretpasswordthisismysecretpasswordabcd").contains("not 't'"));
        assert!(refused("Xw8kQ2n7Rr1vB6yT0pL4sD9fG3hJ5kZ8cV2bN7mQ1aE=").contains("as hex"));
        assert!(refused(&"f".repeat(65)).contains("an even number"));
        assert!(refused("").contains("has 0 hex digits"));
    }
}
