//! The shared guard state of the distributed mode: Redis, through one Lua script per batch so
//! that the compare and the increment of every counter happen as one step for all ingestors.

use super::{Charge, LimitCounters, MarginBoard, RateLimiter, StateBackend, StateError};
use crate::error::ErrorKind;
use redis::aio::ConnectionManager;
use schemas::guard::{subject_field, GuardView, MarginState, SubjectKind};
use std::time::Duration;

/// COMPARE_AND_INCREMENT. KEYS: the counters. ARGV, per key: limit, expires_at_ms, n, then n
/// amounts. Answers per key how many amounts (a prefix) were admitted; admitted amounts are
/// added and the key expires at its window's end. The same rule as `admitted_prefix`.
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
  a = a + n
  if admitted > 0 then
    redis.call('SET', key, string.format('%d', total))
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

pub struct RedisState {
    connection: ConnectionManager,
    prefix: String,
    charge: redis::Script,
    extend: redis::Script,
    live: redis::Script,
    put_margins: redis::Script,
    take_token: redis::Script,
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
        let connection = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|source| redis_error("configure", source))?;
        Ok(RedisState {
            connection,
            prefix: prefix.to_string(),
            charge: redis::Script::new(COMPARE_AND_INCREMENT),
            extend: redis::Script::new(EXTEND),
            live: redis::Script::new(LIVE),
            put_margins: redis::Script::new(PUT_MARGINS),
            take_token: redis::Script::new(TAKE_TOKEN),
        })
    }

    fn margins_key(&self, tenant: &str) -> String {
        format!("{}margins:{tenant}", self.prefix)
    }

    fn killed_key(&self, tenant: &str) -> String {
        format!("{}killed:{tenant}", self.prefix)
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
        if admitted.len() != charges.len() {
            return Err(StateError::BadAnswer {
                context: "charge",
                detail: format!("{} answers for {} counters", admitted.len(), charges.len()),
            });
        }
        Ok(admitted)
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

    async fn killed_sessions(&self, tenant: &str, now_ms: i64) -> Result<Vec<String>, StateError> {
        self.live_members(self.killed_key(tenant), now_ms).await
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
