//! The shared guard state of the distributed mode: Redis, through one Lua script per batch so
//! that the compare and the increment of every counter happen as one step for all ingestors.

use super::{
    Authorization, AuthorizeAsk, Charge, CustomerBalances, LedgerMark, LedgerSeed, LimitCounters,
    Loaded, MarginBoard, RateLimiter, Settlement, StateBackend, StateError, WalletFigures,
};
use crate::error::ErrorKind;
use redis::aio::ConnectionManager;
use schemas::credits::{Decision, RefusalReason, WalletGrant};
use schemas::guard::{subject_field, GuardView, MarginState, SubjectKind};
use std::time::Duration;

/// COMPARE_AND_INCREMENT. KEYS: the counters. ARGV, per key: limit, expires_at_ms, n, then n
/// amounts. Answers per key how many amounts (a prefix) were admitted (the same rule as
/// `admitted_prefix`); every amount is added and the key expires at its window's end.
const COMPARE_AND_INCREMENT: &str = r#"
local result = {}
local a = 1
for i, key in ipairs(KEYS) do
  local limit = tonumber(ARGV[a])
  local expires_at = ARGV[a + 1]
  local n = tonumber(ARGV[a + 2])
  a = a + 3
  local total = tonumber(redis.call('GET', key) or '0')
  local admitted = 0
  for j = 0, n - 1 do
    local amount = tonumber(ARGV[a + j])
    if total + amount > limit then break end
    total = total + amount
    admitted = admitted + 1
  end
  local sum = tonumber(redis.call('GET', key) or '0')
  for j = 0, n - 1 do sum = sum + tonumber(ARGV[a + j]) end
  a = a + n
  if n > 0 then
    redis.call('SET', key, string.format('%d', sum))
    redis.call('PEXPIREAT', key, expires_at)
  end
  result[i] = admitted
end
return result
"#;

/// Adds members to a sorted set scored by when they expire (the kill list of a tenant, the
/// sessions of an agent). KEYS[1]: the set. ARGV: until_ms, members... A later time wins.
const EXTEND: &str = r#"
for i = 2, #ARGV do
  local current = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[i]) or '0')
  if tonumber(ARGV[1]) > current then
    redis.call('ZADD', KEYS[1], ARGV[1], ARGV[i])
  end
end
return 0
"#;

/// KEYS[1]: a set of [`EXTEND`]. ARGV[1]: now_ms. Drops expired members, answers the rest.
const LIVE: &str = r#"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
return redis.call('ZRANGE', KEYS[1], 0, -1)
"#;

/// KEYS[1]: a set of [`EXTEND`]. ARGV[1]: now_ms, then members. Drops expired members, answers
/// those of ARGV that are left.
const LIVE_AMONG: &str = r#"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local found = {}
for i = 2, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    found[#found + 1] = ARGV[i]
  end
end
return found
"#;

/// Replaces a tenant's margin states. KEYS[1]: the hash. ARGV: expires_at_ms, then field and
/// JSON pairs. One script, so a guard check never reads half of an update.
const PUT_MARGINS: &str = r#"
redis.call('DEL', KEYS[1])
for i = 2, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
if #ARGV > 1 then
  redis.call('PEXPIREAT', KEYS[1], ARGV[1])
end
return 0
"#;

/// Token bucket, the Lua spelling of `take_from_bucket`. KEYS[1]: the bucket. ARGV: per
/// second, burst, now_ms. Answers 0 when a token was taken, else the ms until one is back. The
/// bucket is forgotten once it would be full again.
const TAKE_TOKEN: &str = r#"
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
local b = redis.call('HMGET', KEYS[1], 't', 'ts')
local tokens = tonumber(b[1]) or burst
local last = tonumber(b[2]) or now
if now > last then
  tokens = math.min(burst, tokens + (now - last) * rate / 1000)
  last = now
end
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait = math.max(1, math.ceil((1 - tokens) * 1000 / rate))
end
redis.call('HSET', KEYS[1], 't', string.format('%.17g', tokens), 'ts', string.format('%d', last))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
return wait
"#;

/// How long a ledger load may take: one script writes a tenant's whole seed (about 1 s for
/// 300,000 recent calls), and timing it out would only make the next request load it again.
const LOAD_TIMEOUT: Duration = Duration::from_secs(30);

pub struct RedisState {
    connection: ConnectionManager,
    prefix: String,
    charge: redis::Script,
    admit_tool_names: redis::Script,
    extend: redis::Script,
    live: redis::Script,
    live_among: redis::Script,
    put_margins: redis::Script,
    take_token: redis::Script,
    load_ledger: redis::Script,
    forget_ledger: redis::Script,
    /// For ledger loads, whose one script may outlast `request_timeout_ms`.
    load_connection: ConnectionManager,
    add_grant: redis::Script,
    authorize: redis::Script,
    release: redis::Script,
    settle: redis::Script,
    wallet: redis::Script,
}

impl RedisState {
    /// A client of `url` (`redis://host:port/db`); every key starts with `prefix`. Connects
    /// on first use and reconnects by itself, so Redis may be down when this is called: each
    /// request then fails within `timeout` until Redis is back.
    pub fn new(url: &str, prefix: &str, timeout: Duration) -> Result<RedisState, StateError> {
        let client = redis::Client::open(url).map_err(|source| redis_error("open", source))?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1);
        let connection = ConnectionManager::new_lazy_with_config(client.clone(), config)
            .map_err(|source| redis_error("configure", source))?;
        let patient = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(LOAD_TIMEOUT.max(timeout)))
            .set_number_of_retries(1);
        let load_connection = ConnectionManager::new_lazy_with_config(client, patient)
            .map_err(|source| redis_error("configure", source))?;
        Ok(RedisState {
            connection,
            prefix: prefix.to_string(),
            charge: redis::Script::new(COMPARE_AND_INCREMENT),
            admit_tool_names: redis::Script::new(ADMIT_TOOL_NAMES),
            extend: redis::Script::new(EXTEND),
            live: redis::Script::new(LIVE),
            live_among: redis::Script::new(LIVE_AMONG),
            put_margins: redis::Script::new(PUT_MARGINS),
            take_token: redis::Script::new(TAKE_TOKEN),
            load_ledger: redis::Script::new(LOAD_LEDGER),
            forget_ledger: redis::Script::new(FORGET_LEDGER),
            load_connection,
            add_grant: redis::Script::new(ADD_GRANT),
            authorize: wallet_script(AUTHORIZE),
            release: wallet_script(RELEASE),
            settle: wallet_script(SETTLE),
            wallet: wallet_script(WALLET),
        })
    }

    fn loaded_key(&self, tenant: &str) -> String {
        format!("{}credits-loaded:{tenant}", self.prefix)
    }

    /// An event key's claim: present while the key counts as charged.
    fn charged_key(&self, tenant: &str, key: &str) -> String {
        format!("{}charged:{tenant}:{key}", self.prefix)
    }

    fn wallet_prefix(&self, tenant: &str) -> String {
        format!("{}wallet:{tenant}:", self.prefix)
    }

    fn wallet_key(&self, tenant: &str, customer: &str) -> String {
        format!("{}{customer}", self.wallet_prefix(tenant))
    }

    fn margins_key(&self, tenant: &str) -> String {
        format!("{}margins:{tenant}", self.prefix)
    }

    fn killed_key(&self, tenant: &str) -> String {
        format!("{}killed:{tenant}", self.prefix)
    }

    fn tool_names_key(&self, tenant: &str) -> String {
        format!("{}tool-names:{tenant}", self.prefix)
    }

    fn agent_key(&self, tenant: &str, agent: &str) -> String {
        format!("{}agent-sessions:{tenant}:{agent}", self.prefix)
    }

    async fn extend_set(
        &self,
        key: String,
        members: &[String],
        until_ms: i64,
    ) -> Result<(), StateError> {
        if members.is_empty() {
            return Ok(());
        }
        let mut invocation = self.extend.key(key);
        invocation.arg(until_ms);
        for m in members {
            invocation.arg(m);
        }
        invocation
            .invoke_async::<i64>(&mut self.connection.clone())
            .await
            .map_err(|source| redis_error("extend a set", source))?;
        Ok(())
    }

    async fn live_members(&self, key: String, now_ms: i64) -> Result<Vec<String>, StateError> {
        let mut members: Vec<String> = self
            .live
            .key(key)
            .arg(now_ms)
            .invoke_async(&mut self.connection.clone())
            .await
            .map_err(|source| redis_error("read a set", source))?;
        members.sort();
        Ok(members)
    }
}

#[async_trait::async_trait]
impl LimitCounters for RedisState {
    async fn charge(&self, charges: &[Charge], _now_ms: i64) -> Result<Vec<usize>, StateError> {
        if charges.is_empty() {
            return Ok(Vec::new());
        }
        let mut invocation = self.charge.prepare_invoke();
        for c in charges {
            invocation.key(format!("{}{}", self.prefix, c.key));
            invocation
                .arg(c.limit)
                .arg(c.expires_at_ms)
                .arg(c.amounts.len());
            for amount in &c.amounts {
                invocation.arg(*amount);
            }
        }
        let admitted: Vec<usize> = invocation
            .invoke_async(&mut self.connection.clone())
            .await
            .map_err(|source| redis_error("charge", source))?;
        one_answer_each("charge", admitted, charges.len(), "counters")
    }

    async fn kill_sessions(
        &self,
        tenant: &str,
        sessions: &[String],
        until_ms: i64,
    ) -> Result<(), StateError> {
        self.extend_set(self.killed_key(tenant), sessions, until_ms)
            .await
    }

    async fn killed_among(
        &self,
        tenant: &str,
        sessions: &[String],
        now_ms: i64,
    ) -> Result<Vec<String>, StateError> {
        let mut invocation = self.live_among.key(self.killed_key(tenant));
        invocation.arg(now_ms);
        for s in sessions {
            invocation.arg(s);
        }
        invocation
            .invoke_async(&mut self.connection.clone())
            .await
            .map_err(|source| redis_error("read a set", source))
    }

    async fn track_sessions(
        &self,
        tenant: &str,
        agent: &str,
        sessions: &[String],
        until_ms: i64,
    ) -> Result<(), StateError> {
        self.extend_set(self.agent_key(tenant, agent), sessions, until_ms)
            .await
    }

    async fn sessions_of(
        &self,
        tenant: &str,
        agent: &str,
        now_ms: i64,
    ) -> Result<Vec<String>, StateError> {
        self.live_members(self.agent_key(tenant, agent), now_ms)
            .await
    }

    async fn admit_tool_names(
        &self,
        tenant: &str,
        names: &[String],
        max: u32,
    ) -> Result<Vec<bool>, StateError> {
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let mut invocation = self.admit_tool_names.prepare_invoke();
        invocation.key(self.tool_names_key(tenant)).arg(max);
        for name in names {
            invocation.arg(name);
        }
        let known: Vec<i64> = invocation
            .invoke_async(&mut self.connection.clone())
            .await
            .map_err(|source| redis_error("admit tool names", source))?;
        let known = one_answer_each("admit tool names", known, names.len(), "names")?;
        Ok(known.into_iter().map(|k| k == 1).collect())
    }
}

#[async_trait::async_trait]
impl MarginBoard for RedisState {
    async fn put_margins(
        &self,
        tenant: &str,
        margins: &[MarginState],
        expires_at_ms: i64,
    ) -> Result<(), StateError> {
        let mut invocation = self.put_margins.key(self.margins_key(tenant));
        invocation.arg(expires_at_ms);
        for m in margins {
            let json = serde_json::to_string(m).expect("a margin state serializes");
            invocation.arg(m.field()).arg(json);
        }
        invocation
            .invoke_async::<i64>(&mut self.connection.clone())
            .await
            .map_err(|source| redis_error("put margins", source))?;
        Ok(())
    }

    async fn margins(&self, tenant: &str, _now_ms: i64) -> Result<Vec<MarginState>, StateError> {
        // The hash expires as a whole (PEXPIREAT), so what is there is current.
        let states: Vec<String> = redis::cmd("HVALS")
            .arg(self.margins_key(tenant))
            .query_async(&mut self.connection.clone())
            .await
            .map_err(|source| redis_error("read margins", source))?;
        states
            .into_iter()
            .filter_map(|json| parse_margin(Some(json)).transpose())
            .collect()
    }

    async fn view(
        &self,
        tenant: &str,
        agent: Option<&str>,
        tool: Option<&str>,
        session: Option<&str>,
        now_ms: i64,
    ) -> Result<GuardView, StateError> {
        let margins = self.margins_key(tenant);
        let mut pipe = redis::pipe();
        for (kind, id) in [(SubjectKind::Agent, agent), (SubjectKind::Tool, tool)] {
            if let Some(id) = id {
                pipe.cmd("HGET").arg(&margins).arg(subject_field(kind, id));
            }
        }
        if let Some(session) = session {
            pipe.cmd("ZSCORE").arg(self.killed_key(tenant)).arg(session);
        }
        let mut answers: std::vec::IntoIter<Option<String>> = pipe
            .query_async::<Vec<Option<String>>>(&mut self.connection.clone())
            .await
            .map_err(|source| redis_error("guard view", source))?
            .into_iter();
        // Answers come in the order asked; a name not given asked nothing.
        let mut next = |asked: bool| asked.then(|| answers.next().flatten()).flatten();
        let agent_state = parse_margin(next(agent.is_some()))?;
        let tool_state = parse_margin(next(tool.is_some()))?;
        let killed_until = next(session.is_some())
            .and_then(|score| score.parse::<f64>().ok())
            .map(|until| until as i64)
            .filter(|until| *until > now_ms);
        Ok(GuardView {
            agent: agent_state,
            tool: tool_state,
            session_killed_until_ms: killed_until,
        })
    }
}

#[async_trait::async_trait]
impl RateLimiter for RedisState {
    async fn take_token(
        &self,
        key: &str,
        per_second: f64,
        burst: u32,
        now_ms: i64,
    ) -> Result<Option<u64>, StateError> {
        let wait: u64 = self
            .take_token
            .key(format!("{}{key}", self.prefix))
            .arg(per_second)
            .arg(burst)
            .arg(now_ms)
            .invoke_async(&mut self.connection.clone())
            .await
            .map_err(|source| redis_error("rate limit", source))?;
        Ok((wait > 0).then_some(wait))
    }
}

/// A wallet script: the shared functions, then its body.
fn wallet_script(body: &str) -> redis::Script {
    redis::Script::new(&format!("{WALLET_LUA}\n{body}"))
}

/// A grant as a wallet hash field's value (see `WALLET_LUA`).
fn grant_value(g: &WalletGrant) -> String {
    format!(
        "{} {} {}",
        g.amount_micros,
        g.expires_at_ms.unwrap_or(0),
        g.settled_at_expiry.unwrap_or(-1)
    )
}

/// A nonce's record as `AUTHORIZE` stores it: its customer's line, its tool's line, then the
/// decision (ids and names have no control character, so no line break).
fn parse_stored(stored: &str) -> Result<(String, String, Decision), StateError> {
    let bad = || StateError::BadAnswer {
        context: "authorize",
        detail: format!("a stored decision is not readable: {stored:?}"),
    };
    let mut lines = stored.splitn(3, '\n');
    let (Some(customer), Some(tool), Some(decision)) = (lines.next(), lines.next(), lines.next())
    else {
        return Err(bad());
    };
    let parts: Vec<&str> = decision.split(' ').collect();
    let int = |i: usize| {
        parts
            .get(i)
            .and_then(|p| p.parse::<i64>().ok())
            .ok_or_else(bad)
    };
    match parts.first() {
        Some(&"A") => Ok(Decision::Authorized {
            quote_micros: int(1)?,
            expires_at_ms: int(2)?,
        }),
        Some(&"R") => Ok(Decision::Refused {
            reason: parts
                .get(1)
                .and_then(|r| RefusalReason::parse(r))
                .ok_or_else(bad)?,
            quote_micros: int(2)?,
            available_micros: match parts.get(3) {
                Some(&"-") => None,
                _ => Some(int(3)?),
            },
            retry_after_seconds: u64::try_from(int(4)?).ok(),
        }),
        _ => Err(bad()),
    }
    .map(|decision| (customer.to_string(), tool.to_string(), decision))
}

#[async_trait::async_trait]
impl CustomerBalances for RedisState {
    async fn ledger_mark(&self, tenant: &str) -> Result<LedgerMark, StateError> {
        let text: Option<String> = redis::cmd("GET")
            .arg(self.loaded_key(tenant))
            .query_async(&mut self.connection.clone())
            .await
            .map_err(|source| redis_error("read a ledger mark", source))?;
        LedgerMark::parse(text.as_deref()).ok_or_else(|| StateError::BadAnswer {
            context: "read a ledger mark",
            detail: format!("{text:?}"),
        })
    }

    async fn load_ledger(
        &self,
        tenant: &str,
        read_at: &LedgerMark,
        seed: &LedgerSeed,
    ) -> Result<Loaded, StateError> {
        let mut invocation = self.load_ledger.key(self.loaded_key(tenant));
        invocation
            .arg(read_at.text())
            .arg(seed.wallets.len())
            .arg(seed.charged.len())
            .arg(seed.counters.len())
            .arg(seed.killed.len())
            .arg(seed.agent_sessions.len());
        for w in &seed.wallets {
            invocation.key(self.wallet_key(tenant, &w.customer));
            invocation.arg(w.settled_micros).arg(w.grants.len());
            for (key, grant) in &w.grants {
                invocation.arg(format!("g:{key}")).arg(grant_value(grant));
            }
        }
        for (key, until) in &seed.charged {
            invocation.key(self.charged_key(tenant, key)).arg(until);
        }
        for c in &seed.counters {
            invocation.key(format!("{}{}", self.prefix, c.key));
            invocation.arg(c.value).arg(c.window_end_ms);
        }
        for (session, until) in &seed.killed {
            invocation
                .key(self.killed_key(tenant))
                .arg(session)
                .arg(until);
        }
        for (agent, session, until) in &seed.agent_sessions {
            invocation.key(self.agent_key(tenant, agent));
            invocation.arg(session).arg(until);
        }
        invocation.arg(read_at.next());
        // One script, however large the seed: it may take longer than a request may wait.
        let answer: i64 = invocation
            .invoke_async(&mut self.load_connection.clone())
            .await
            .map_err(|source| redis_error("load a ledger", source))?;
        Ok(match answer {
            1 => Loaded::Now,
            0 => Loaded::Already,
            _ => Loaded::Changed,
        })
    }

    async fn forget_ledger(&self, tenant: &str) -> Result<(), StateError> {
        self.forget_ledger
            .key(self.loaded_key(tenant))
            .invoke_async::<i64>(&mut self.connection.clone())
            .await
            .map_err(|source| redis_error("forget a ledger", source))?;
        Ok(())
    }

    async fn add_grant(
        &self,
        tenant: &str,
        customer: &str,
        key: &str,
        grant: WalletGrant,
        _now_ms: i64,
    ) -> Result<(), StateError> {
        let answer: i64 = self
            .add_grant
            .key(self.loaded_key(tenant))
            .key(self.wallet_key(tenant, customer))
            .arg(format!("g:{key}"))
            .arg(grant_value(&grant))
            .invoke_async(&mut self.connection.clone())
            .await
            .map_err(|source| redis_error("add a grant", source))?;
        if answer < 0 {
            return Err(StateError::WalletsNotLoaded(tenant.to_string()));
        }
        Ok(())
    }

    async fn authorize(&self, ask: &AuthorizeAsk<'_>) -> Result<Authorization, StateError> {
        let mut invocation = self.authorize.prepare_invoke();
        invocation
            .key(self.loaded_key(ask.tenant))
            .key(format!("{}nonce:{}:{}", self.prefix, ask.tenant, ask.nonce))
            .key(self.wallet_key(ask.tenant, ask.customer));
        invocation
            .arg(ask.now_ms)
            .arg(ask.quote_micros)
            .arg(ask.expires_at_ms)
            .arg(ask.max_in_flight.map_or(-1, i64::from))
            .arg(ask.remember_until_ms)
            .arg(ask.nonce)
            .arg(format!("{}\n{}", ask.customer, ask.tool))
            .arg(u8::from(ask.prepaid_only));
        for cap in ask.caps {
            invocation.key(format!("{}{}", self.prefix, cap.key));
            invocation.arg(cap.max_spend_micros).arg(cap.window_end_ms);
        }
        let answer: Vec<String> = invocation
            .invoke_async(&mut self.connection.clone())
            .await
            .map_err(|source| redis_error("authorize", source))?;
        match answer.as_slice() {
            [status] if status == "unloaded" => {
                Err(StateError::WalletsNotLoaded(ask.tenant.to_string()))
            }
            [status, stored] => {
                let (customer, tool, decision) = parse_stored(stored)?;
                Ok(Authorization {
                    decision,
                    first_ask: (status == "replay").then_some((customer, tool)),
                })
            }
            other => Err(StateError::BadAnswer {
                context: "authorize",
                detail: format!("{other:?}"),
            }),
        }
    }

    async fn release(
        &self,
        tenant: &str,
        nonce: &str,
        now_ms: i64,
    ) -> Result<Option<bool>, StateError> {
        let answer: i64 = self
            .release
            .key(self.loaded_key(tenant))
            .key(format!("{}nonce:{tenant}:{nonce}", self.prefix))
            .arg(now_ms)
            .arg(self.wallet_prefix(tenant))
            .arg(nonce)
            .invoke_async(&mut self.connection.clone())
            .await
            .map_err(|source| redis_error("release", source))?;
        match answer {
            -2 => Err(StateError::WalletsNotLoaded(tenant.to_string())),
            -1 => Ok(None),
            n => Ok(Some(n > 0)),
        }
    }

    async fn settle(
        &self,
        tenant: &str,
        settlements: &[Settlement],
        now_ms: i64,
        remember_until_ms: i64,
    ) -> Result<Vec<bool>, StateError> {
        if settlements.is_empty() {
            return Ok(Vec::new());
        }
        let mut invocation = self.settle.key(self.loaded_key(tenant));
        invocation.arg(now_ms).arg(remember_until_ms);
        for s in settlements {
            invocation
                .key(self.charged_key(tenant, &s.key))
                .key(self.wallet_key(tenant, &s.customer));
            invocation
                .arg(&s.key)
                .arg(s.amount_micros)
                .arg(u8::from(!s.customer.is_empty()))
                .arg(u8::from(s.always_claim))
                .arg(s.caps.len());
            for cap in &s.caps {
                invocation.key(format!("{}{}", self.prefix, cap.key));
                invocation.arg(cap.window_end_ms);
            }
        }
        let answer: Vec<i64> = invocation
            .invoke_async(&mut self.connection.clone())
            .await
            .map_err(|source| redis_error("settle", source))?;
        if answer.first() == Some(&-1) {
            return Err(StateError::WalletsNotLoaded(tenant.to_string()));
        }
        if answer.len() != settlements.len() {
            return Err(StateError::BadAnswer {
                context: "settle",
                detail: format!(
                    "{} answers for {} settlements",
                    answer.len(),
                    settlements.len()
                ),
            });
        }
        Ok(answer.into_iter().map(|claimed| claimed == 1).collect())
    }

    async fn wallet(
        &self,
        tenant: &str,
        customer: &str,
        now_ms: i64,
    ) -> Result<WalletFigures, StateError> {
        let answer: Vec<i64> = self
            .wallet
            .key(self.loaded_key(tenant))
            .key(self.wallet_key(tenant, customer))
            .arg(now_ms)
            .invoke_async(&mut self.connection.clone())
            .await
            .map_err(|source| redis_error("read a wallet", source))?;
        match answer.as_slice() {
            [-1] => Err(StateError::WalletsNotLoaded(tenant.to_string())),
            [prepaid, granted, settled, reserved, in_flight] => Ok(WalletFigures {
                prepaid: *prepaid == 1,
                granted_micros: *granted,
                settled_micros: *settled,
                reserved_micros: *reserved,
                in_flight: *in_flight as usize,
            }),
            other => Err(StateError::BadAnswer {
                context: "read a wallet",
                detail: format!("{other:?}"),
            }),
        }
    }
}

#[async_trait::async_trait]
impl StateBackend for RedisState {
    fn kind(&self) -> &'static str {
        "redis"
    }

    async fn ping(&self) -> Result<(), StateError> {
        redis::cmd("PING")
            .query_async::<String>(&mut self.connection.clone())
            .await
            .map_err(|source| redis_error("ping", source))?;
        Ok(())
    }
}

fn parse_margin(json: Option<String>) -> Result<Option<MarginState>, StateError> {
    json.map(|json| {
        serde_json::from_str(&json).map_err(|e| StateError::BadAnswer {
            context: "guard view",
            detail: format!("a margin state is not readable: {e}"),
        })
    })
    .transpose()
}

/// A redis driver error as the state port's error: a connection or a timeout may pass later; a
/// refused command or a bad URL will not.
fn redis_error(context: &'static str, e: redis::RedisError) -> StateError {
    let kind = if e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
    {
        ErrorKind::Retriable
    } else {
        ErrorKind::Permanent
    };
    StateError::Failed {
        context,
        kind,
        detail: e.to_string(),
    }
}

/// A script's answers, one per item asked about, or the mismatch as a bad answer.
fn one_answer_each<T>(
    context: &'static str,
    answers: Vec<T>,
    asked: usize,
    items: &str,
) -> Result<Vec<T>, StateError> {
    if answers.len() != asked {
        return Err(StateError::BadAnswer {
            context,
            detail: format!("{} answers for {asked} {items}", answers.len()),
        });
    }
    Ok(answers)
}

/// A tenant's known tool names, at most ARGV[1]. KEYS[1]: the set. ARGV: max, then the names.
/// Answers per name 1 (known, or added now) or 0 (new, and the set is full).
const ADMIT_TOOL_NAMES: &str = r#"
local max = tonumber(ARGV[1])
local count = redis.call('SCARD', KEYS[1])
local known = {}
for i = 2, #ARGV do
  if redis.call('SISMEMBER', KEYS[1], ARGV[i]) == 1 then
    known[i - 1] = 1
  elseif count < max then
    redis.call('SADD', KEYS[1], ARGV[i])
    count = count + 1
    known[i - 1] = 1
  else
    known[i - 1] = 0
  end
end
return known
"#;

/// What every wallet script shares. A wallet is one hash: `s` the usage settled since the
/// first grant (present only for a prepaid customer), `g:<key>` a grant as "amount
/// expires_at_ms settled_at_expiry" (0: never expires; -1: not lapsed yet), `r:<nonce>` a
/// reservation as "quote expires_at_ms". `open_wallet` ends lapsed reservations and freezes
/// lapsed grants, as `Wallet::tidy` does in memory; `granted` is `schemas::credits::granted_micros`.
const WALLET_LUA: &str = r#"
local function fmt(n) return string.format('%d', n) end
local function open_wallet(key, now)
  local h = redis.call('HGETALL', key)
  local w = {prepaid = false, settled = 0, grants = {}, reserved = 0, expiries = {}}
  for i = 1, #h, 2 do
    local f, v = h[i], h[i + 1]
    local kind = string.sub(f, 1, 2)
    if f == 's' then
      w.prepaid = true
      w.settled = tonumber(v)
    elseif kind == 'g:' then
      local a, e, z = string.match(v, '^(%S+) (%S+) (%S+)$')
      table.insert(w.grants, {field = f, amount = tonumber(a), expires = tonumber(e), frozen = tonumber(z)})
    elseif kind == 'r:' then
      local q, e = string.match(v, '^(%S+) (%S+)$')
      if tonumber(e) <= now then
        redis.call('HDEL', key, f)
      else
        w.reserved = w.reserved + tonumber(q)
        table.insert(w.expiries, tonumber(e))
      end
    end
  end
  for _, g in ipairs(w.grants) do
    if g.expires > 0 and g.expires <= now and g.frozen < 0 then
      g.frozen = w.settled
      redis.call('HSET', key, g.field, fmt(g.amount) .. ' ' .. fmt(g.expires) .. ' ' .. fmt(g.frozen))
    end
  end
  return w
end
local function granted(w, now)
  local lapsed = {}
  local live = 0
  for _, g in ipairs(w.grants) do
    if g.expires > 0 and g.expires <= now then
      table.insert(lapsed, g)
    else
      live = live + g.amount
    end
  end
  table.sort(lapsed, function(a, b) return a.expires < b.expires end)
  local consumed = 0
  for _, g in ipairs(lapsed) do
    local c = math.min(math.max(g.frozen - consumed, 0), g.amount)
    consumed = consumed + c
  end
  return live + consumed
end
"#;

/// Loads a tenant's ledger from the store's view, all of it or nothing. KEYS[1]: the ledger's
/// mark (`L<n>` loaded in generation n, `F<n>` forgotten after it, absent); then the wallets,
/// the claims, the counters, the kill list once per kill, an agent's sessions once per
/// session. ARGV: the mark when the seed was read (`-`: absent), the five counts, then per
/// wallet settled, n and n grant fields and values; per claim until; per counter value and
/// window end; per kill session and until; per agent session session and until; last the new
/// generation. Answers 1 when loaded now, 0 when the tenant was loaded already (what it holds
/// is newer than the seed), 2 when the mark moved since the seed was read. A wallet that is there
/// (its ledger was forgotten) keeps its open reservations.
const LOAD_LEDGER: &str = r#"
local mark = redis.call('GET', KEYS[1])
if mark and string.sub(mark, 1, 1) == 'L' then return 0 end
if (mark or '-') ~= ARGV[1] then return 2 end
local counts = {tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])}
local k, a = 2, 7
for _ = 1, counts[1] do
  local n = tonumber(ARGV[a + 1])
  local old = redis.call('HGETALL', KEYS[k])
  redis.call('DEL', KEYS[k])
  for i = 1, #old, 2 do
    if string.sub(old[i], 1, 2) == 'r:' then redis.call('HSET', KEYS[k], old[i], old[i + 1]) end
  end
  redis.call('HSET', KEYS[k], 's', ARGV[a])
  for j = 0, n - 1 do
    redis.call('HSET', KEYS[k], ARGV[a + 2 + 2 * j], ARGV[a + 3 + 2 * j])
  end
  k, a = k + 1, a + 2 + 2 * n
end
for _ = 1, counts[2] do
  redis.call('SET', KEYS[k], '1', 'PXAT', ARGV[a])
  k, a = k + 1, a + 1
end
for _ = 1, counts[3] do
  redis.call('SET', KEYS[k], ARGV[a], 'PXAT', ARGV[a + 1])
  k, a = k + 1, a + 2
end
for _ = 1, counts[4] + counts[5] do
  local current = tonumber(redis.call('ZSCORE', KEYS[k], ARGV[a]) or '0')
  if tonumber(ARGV[a + 1]) > current then
    redis.call('ZADD', KEYS[k], ARGV[a + 1], ARGV[a])
  end
  k, a = k + 1, a + 2
end
redis.call('SET', KEYS[1], 'L' .. ARGV[a])
return 1
"#;

/// KEYS[1]: a ledger's mark. A loaded ledger (`L<n>`) becomes forgotten (`F<n>`).
const FORGET_LEDGER: &str = r#"
local mark = redis.call('GET', KEYS[1])
if mark and string.sub(mark, 1, 1) == 'L' then
  redis.call('SET', KEYS[1], 'F' .. string.sub(mark, 2))
end
return 0
"#;

/// KEYS: the loaded mark, the wallet. ARGV: the grant's field and value. -1: not loaded.
const ADD_GRANT: &str = r#"
local mark = redis.call('GET', KEYS[1])
if not mark or string.sub(mark, 1, 1) ~= 'L' then return -1 end
redis.call('HSETNX', KEYS[2], 's', '0')
return redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2])
"#;

/// The decision of `schemas::credits::decide`, in one step with the nonce's claim and the
/// reservation. KEYS: the loaded mark, the nonce, the wallet, then the cap counters. ARGV:
/// now, quote, expires_at, max_in_flight (-1: none), remember_until, nonce, "customer\ntool",
/// prepaid_only (1: refuse a customer never granted credits, whose wallet has no `s`), then
/// per cap: max, window_end. Answers {'unloaded'}, or {'replay' | 'new', stored}, where
/// stored is "customer\ntool\n" then "A quote expires_at" or "R reason quote available
/// retry_after" (available `-` for a postpaid customer, retry_after -1 for none).
const AUTHORIZE: &str = r#"
local mark = redis.call('GET', KEYS[1])
if not mark or string.sub(mark, 1, 1) ~= 'L' then return {'unloaded'} end
local prior = redis.call('GET', KEYS[2])
if prior then return {'replay', prior} end
local now = tonumber(ARGV[1])
local quote = tonumber(ARGV[2])
local max_in_flight = tonumber(ARGV[4])
local w = open_wallet(KEYS[3], now)
local available = granted(w, now) - w.settled - w.reserved
local function refuse(reason, until_ms)
  local retry = -1
  if until_ms then retry = math.ceil(math.max(until_ms - now, 1) / 1000) end
  local shown = '-'
  if w.prepaid then shown = fmt(available) end
  return 'R ' .. reason .. ' ' .. fmt(quote) .. ' ' .. shown .. ' ' .. fmt(retry)
end
local decision = nil
if ARGV[8] == '1' and not w.prepaid then
  decision = refuse('no_credits', nil)
end
for i = 4, #KEYS do
  if decision then break end
  local j = 9 + (i - 4) * 2
  local spent = tonumber(redis.call('GET', KEYS[i]) or '0') + w.reserved
  if spent + quote > tonumber(ARGV[j]) then
    decision = refuse('spend_cap', tonumber(ARGV[j + 1]))
    break
  end
end
if not decision and max_in_flight >= 0 and #w.expiries >= max_in_flight then
  local earliest = nil
  for _, e in ipairs(w.expiries) do
    if not earliest or e < earliest then earliest = e end
  end
  decision = refuse('too_many_in_flight', earliest)
end
if not decision and w.prepaid and available < quote then
  decision = refuse('insufficient_balance', nil)
end
if not decision then
  decision = 'A ' .. fmt(quote) .. ' ' .. ARGV[3]
  redis.call('HSET', KEYS[3], 'r:' .. ARGV[6], fmt(quote) .. ' ' .. ARGV[3])
end
local stored = ARGV[7] .. '\n' .. decision
redis.call('SET', KEYS[2], stored)
redis.call('PEXPIREAT', KEYS[2], ARGV[5])
return {'new', stored}
"#;

/// KEYS: the loaded mark, the nonce. ARGV: now, the tenant's wallet key prefix, the nonce.
/// Answers -2 (not loaded), -1 (unknown nonce), 0 (no open reservation) or 1 (released).
const RELEASE: &str = r#"
local mark = redis.call('GET', KEYS[1])
if not mark or string.sub(mark, 1, 1) ~= 'L' then return -2 end
local stored = redis.call('GET', KEYS[2])
if not stored then return -1 end
local customer = string.match(stored, '^([^\n]*)\n')
local wallet = ARGV[2] .. customer
open_wallet(wallet, tonumber(ARGV[1]))
return redis.call('HDEL', wallet, 'r:' .. ARGV[3])
"#;

/// Claims and settles. KEYS: the loaded mark, then per settlement its claim, its wallet and
/// its cap counters. ARGV: now, remember_until, then per settlement: key, amount,
/// has_customer (0/1), always_claim (0/1), n caps, then n window ends. Answers {-1} when not
/// loaded, else per settlement 1 (charged now, or nothing to charge) or 0 (charged before).
const SETTLE: &str = r#"
local mark = redis.call('GET', KEYS[1])
if not mark or string.sub(mark, 1, 1) ~= 'L' then return {-1} end
local now = tonumber(ARGV[1])
local result = {}
local k = 2
local a = 3
local i = 1
while a <= #ARGV do
  local key, amount, has_customer, always = ARGV[a], tonumber(ARGV[a + 1]), ARGV[a + 2], ARGV[a + 3]
  local n = tonumber(ARGV[a + 4])
  local claim, wallet = KEYS[k], KEYS[k + 1]
  if always == '0' and redis.call('EXISTS', wallet) == 0 then
    result[i] = 1
  elseif redis.call('SET', claim, '1', 'NX', 'PXAT', ARGV[2]) then
    result[i] = 1
    if has_customer == '1' then
      for c = 0, n - 1 do
        redis.call('INCRBY', KEYS[k + 2 + c], amount)
        redis.call('PEXPIREAT', KEYS[k + 2 + c], ARGV[a + 5 + c])
      end
      if redis.call('EXISTS', wallet) == 1 then
        local w = open_wallet(wallet, now)
        redis.call('HDEL', wallet, 'r:' .. key)
        if w.prepaid then
          redis.call('HSET', wallet, 's', fmt(w.settled + amount))
        end
      end
    end
  else
    -- Charged before (or counted by a rebuild): a reservation still open under the key is for
    -- this very call, and ends.
    redis.call('HDEL', wallet, 'r:' .. key)
    result[i] = 0
  end
  k = k + 2 + n
  a = a + 5 + n
  i = i + 1
end
return result
"#;

/// KEYS: the loaded mark, the wallet. ARGV: now. Answers {-1} when not loaded, else
/// {prepaid, granted, settled, reserved, in_flight}.
const WALLET: &str = r#"
local mark = redis.call('GET', KEYS[1])
if not mark or string.sub(mark, 1, 1) ~= 'L' then return {-1} end
local now = tonumber(ARGV[1])
local w = open_wallet(KEYS[2], now)
local p = 0
if w.prepaid then p = 1 end
return {p, granted(w, now), w.settled, w.reserved, #w.expiries}
"#;
