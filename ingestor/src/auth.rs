//! Who is calling: the API key decides the tenant, never a header or a field.
//!
//! Keys are configured as SHA-256 hex; a presented key is hashed and looked up, so the
//! process never holds a usable key. A portal token (`mcpp_…`, [`crate::portal`]) is sent the
//! same way and verified by its signature: it reads for one customer of its tenant.

use crate::error::ApiError;
use crate::portal::{PortalSigner, TOKEN_PREFIX};
use actix_web::HttpRequest;
use backends::store::Viewer;
use schemas::analytics::{ForCustomer, Viewed};
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
    /// Authorizations refuse customers never granted credits (no postpaid customer).
    pub prepaid_only: bool,
    /// Most distinct tool names the tenant's calls may name.
    pub max_tool_names: u32,
    /// The tool names this process saw the state admit: known for good, so the calls of
    /// known tools never wait on the state for them. At most `max_tool_names`.
    pub known_tool_names: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// What one key may do, and for whom. Built once per key; requests share it.
pub struct Caller {
    pub tenant: Arc<Tenant>,
    scopes: Vec<Scope>,
    /// The key's own `rate_limit`, or `rate_limits.key_*`; for a portal token, its customer's
    /// bucket (`rate_limits.portal_*`).
    pub rate_limit: RateLimit,
    /// Set for a portal token: every read answers for this customer only.
    pub customer: Option<String>,
}

/// A key's rate limit and the name of its bucket in the guard state.
pub struct RateLimit {
    pub config: RateLimitConfig,
    pub bucket: String,
}

/// What a portal token may do: read and export, its customer's rows only.
const PORTAL_SCOPES: [Scope; 2] = [Scope::Read, Scope::Export];

impl Caller {
    /// Whether the key holds `scope` (`admin` holds every scope).
    pub fn allows(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope) || self.scopes.contains(&Scope::Admin)
    }

    /// Refuses a portal token where only the tenant's own keys may go, saying why.
    pub fn not_portal(&self, what: &str) -> Result<(), ApiError> {
        match self.customer {
            Some(_) => Err(ApiError::Forbidden(format!(
                "a portal token reads its customer's usage, spend and balance only; {what} needs \
one of the tenant's API keys"
            ))),
            None => Ok(()),
        }
    }

    /// This caller as a reader: whose rows it reads, and in which view.
    pub fn reader(&self) -> Reader {
        Reader {
            tenant: self.tenant.clone(),
            viewer: Viewer {
                tenant: self.tenant.id.to_string(),
                customer: self.customer.clone(),
            },
        }
    }
}

/// What every read endpoint takes: the caller's view (its tenant, or its tenant and one
/// customer for a portal token). Stores filter on the view; answers are built in its type, so
/// a customer's answer has no cost field to leak.
pub struct Reader {
    pub tenant: Arc<Tenant>,
    pub viewer: Viewer,
}

impl Reader {
    /// Whether this is a customer's view (a portal token's).
    pub fn is_customer(&self) -> bool {
        self.viewer.customer.is_some()
    }

    /// `answer` as a 200 in this view: the tenant's type, or the customer's, tagged by `view`.
    pub fn answer<T: ForCustomer + serde::Serialize>(&self, answer: T) -> actix_web::HttpResponse {
        actix_web::HttpResponse::Ok().json(Viewed::of(answer, self.is_customer()))
    }

    /// The customer a request may read: its portal token's, whatever it asked; or what it
    /// asked. A portal token asking for another customer is refused, saying whose it is.
    pub fn customer(&self, asked: Option<String>) -> Result<Option<String>, ApiError> {
        match (&self.viewer.customer, asked) {
            (Some(own), Some(asked)) if *own != asked => Err(ApiError::Forbidden(format!(
                "this portal token reads customer `{own}` only, not `{asked}`"
            ))),
            (Some(own), _) => Ok(Some(own.clone())),
            (None, asked) => Ok(asked),
        }
    }
}

/// Every configured key, by its SHA-256, and what verifies portal tokens.
pub struct Keyring {
    by_hash: HashMap<[u8; 32], Arc<Caller>>,
    tenants: HashMap<String, Arc<Tenant>>,
    pub portal: PortalSigner,
    /// Each customer's portal tokens share one bucket with this limit.
    portal_rate_limit: RateLimitConfig,
}

impl Keyring {
    /// `tenants` must have passed `Config::validate`.
    pub fn new(
        tenants: &[TenantConfig],
        portal: PortalSigner,
        defaults: &schemas::config::RateLimitsConfig,
    ) -> Keyring {
        let key_default = RateLimitConfig {
            requests_per_second: defaults.key_requests_per_second,
            burst: defaults.key_burst,
        };
        let mut by_hash = HashMap::new();
        let mut by_id = HashMap::new();
        for t in tenants {
            let tenant = Arc::new(Tenant {
                id: t.id.as_str().into(),
                rate_plans: RatePlans::new(t.rate_plans.clone()),
                limits: t.limits.clone(),
                customer_caps: t.customer_caps.clone(),
                max_in_flight_per_customer: t.max_in_flight_per_customer,
                prepaid_only: t.prepaid_only,
                max_tool_names: t.max_tool_names,
                known_tool_names: Default::default(),
            });
            by_id.insert(t.id.clone(), tenant.clone());
            for key in &t.api_keys {
                let mut hash = [0u8; 32];
                for (i, byte) in hash.iter_mut().enumerate() {
                    *byte = u8::from_str_radix(&key.sha256[2 * i..2 * i + 2], 16)
                        .expect("validated as 64 hex digits");
                }
                by_hash.insert(
                    hash,
                    Arc::new(Caller {
                        tenant: tenant.clone(),
                        scopes: key.scopes.clone(),
                        rate_limit: RateLimit {
                            config: key.rate_limit.unwrap_or(key_default),
                            bucket: format!("rate:{}:{}", t.id, key.name),
                        },
                        customer: None,
                    }),
                );
            }
        }
        Keyring {
            by_hash,
            tenants: by_id,
            portal,
            portal_rate_limit: RateLimitConfig {
                requests_per_second: defaults.portal_requests_per_second,
                burst: defaults.portal_burst,
            },
        }
    }

    /// The caller of a portal token: its tenant, read and export scopes, its customer.
    fn portal_caller(&self, token: &str) -> Result<Arc<Caller>, ApiError> {
        let claims = self
            .portal
            .verify(token, chrono::Utc::now().timestamp())
            .map_err(ApiError::Unauthorized)?;
        let tenant = self.tenants.get(&claims.tenant).ok_or_else(|| {
            ApiError::Unauthorized("the portal token's tenant is no longer configured".into())
        })?;
        Ok(Arc::new(Caller {
            tenant: tenant.clone(),
            scopes: PORTAL_SCOPES.to_vec(),
            // Keys' buckets start `rate:`: a customer's never shares one with a key.
            rate_limit: RateLimit {
                config: self.portal_rate_limit,
                bucket: format!("rate-portal:{}:{}", claims.tenant, claims.customer),
            },
            customer: Some(claims.customer),
        }))
    }

    /// Finds the caller's caller and checks it allows `scope`.
    pub fn authenticate(&self, req: &HttpRequest, scope: Scope) -> Result<Arc<Caller>, ApiError> {
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
        .ok_or_else(|| {
            ApiError::Unauthorized(
                "no API key: send it in the X-API-Key header or as Authorization: Bearer <key>"
                    .into(),
            )
        })?;
        let caller = if key.starts_with(TOKEN_PREFIX) {
            self.portal_caller(key)?
        } else {
            let hash: [u8; 32] = Sha256::digest(key.as_bytes()).into();
            self.by_hash
                .get(&hash)
                .ok_or_else(|| ApiError::Unauthorized("the API key is not recognized".into()))?
                .clone()
        };
        if let Some(claimed) = headers.get("x-tenant-id") {
            if claimed.as_bytes() != caller.tenant.id.as_bytes() {
                return Err(ApiError::Forbidden(format!(
                    "X-Tenant-Id `{}` does not match this API key's tenant; the key alone selects the tenant",
                    String::from_utf8_lossy(claimed.as_bytes())
                )));
            }
        }
        if !caller.allows(scope) {
            let holder = match caller.customer {
                Some(_) => "a portal token reads and exports only; it",
                None => "this API key",
            };
            return Err(ApiError::Forbidden(format!(
                "{holder} lacks the `{}` scope",
                scope.as_str()
            )));
        }
        Ok(caller)
    }
}
