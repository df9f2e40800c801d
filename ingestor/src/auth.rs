//! Who is calling: the API key decides the tenant, never a header or a field.
//!
//! Keys are configured as SHA-256 hex; a presented key is hashed and looked up, so the
//! process never holds a usable key.

use crate::error::ApiError;
use actix_web::HttpRequest;
use schemas::config::{RateLimitConfig, Scope, TenantConfig};
use schemas::rating::RatePlans;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Arc;

/// What the ingestor knows of one tenant.
pub struct Tenant {
    pub id: Arc<str>,
    pub rate_plans: RatePlans,
    pub limits: Vec<schemas::config::LimitConfig>,
    /// Spend caps per customer, checked by authorizations, counted by settlements.
    pub customer_caps: Vec<schemas::config::CustomerCapConfig>,
    pub max_in_flight_per_customer: Option<u32>,
}

/// What one key may do, and for whom. Built once per key; requests share it.
pub struct Grant {
    pub tenant: Arc<Tenant>,
    scopes: Vec<Scope>,
    pub rate_limit: Option<RateLimit>,
}

/// A key's rate limit and the name of its bucket in the guard state.
pub struct RateLimit {
    pub config: RateLimitConfig,
    pub bucket: String,
}

impl Grant {
    fn allows(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope) || self.scopes.contains(&Scope::Admin)
    }
}

/// Every configured key, by its SHA-256.
pub struct Keyring {
    by_hash: HashMap<[u8; 32], Arc<Grant>>,
}

impl Keyring {
    /// `tenants` must have passed `Config::validate`.
    pub fn new(tenants: &[TenantConfig]) -> Keyring {
        let mut by_hash = HashMap::new();
        for t in tenants {
            let tenant = Arc::new(Tenant {
                id: t.id.as_str().into(),
                rate_plans: RatePlans::new(t.rate_plans.clone()),
                limits: t.limits.clone(),
                customer_caps: t.customer_caps.clone(),
                max_in_flight_per_customer: t.max_in_flight_per_customer,
            });
            for key in &t.api_keys {
                let mut hash = [0u8; 32];
                for (i, byte) in hash.iter_mut().enumerate() {
                    *byte = u8::from_str_radix(&key.sha256[2 * i..2 * i + 2], 16)
                        .expect("validated as 64 hex digits");
                }
                by_hash.insert(
                    hash,
                    Arc::new(Grant {
                        tenant: tenant.clone(),
                        scopes: key.scopes.clone(),
                        rate_limit: key.rate_limit.map(|config| RateLimit {
                            config,
                            bucket: format!("rate:{}:{}", t.id, key.name),
                        }),
                    }),
                );
            }
        }
        Keyring { by_hash }
    }

    /// Finds the caller's grant and checks it allows `scope`.
    pub fn authorize(&self, req: &HttpRequest, scope: Scope) -> Result<Arc<Grant>, ApiError> {
        let headers = req.headers();
        let key = match headers.get("x-api-key") {
            Some(v) => v.to_str().ok(),
            None => headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| {
                    v.strip_prefix("Bearer ")
                        .or_else(|| v.strip_prefix("bearer "))
                }),
        }
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .ok_or(ApiError::Unauthorized(
            "no API key: send it in the X-API-Key header or as Authorization: Bearer <key>",
        ))?;
        let hash: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let grant = self
            .by_hash
            .get(&hash)
            .ok_or(ApiError::Unauthorized("the API key is not recognized"))?;
        if let Some(claimed) = headers.get("x-tenant-id") {
            if claimed.as_bytes() != grant.tenant.id.as_bytes() {
                return Err(ApiError::Forbidden(format!(
                    "X-Tenant-Id `{}` does not match this API key's tenant; the key alone selects the tenant",
                    String::from_utf8_lossy(claimed.as_bytes())
                )));
            }
        }
        if !grant.allows(scope) {
            return Err(ApiError::Forbidden(format!(
                "this API key lacks the `{}` scope",
                scope.as_str()
            )));
        }
        Ok(grant.clone())
    }
}
