//! The shared guard state of the distributed mode: Redis, through one Lua script per batch so
//! that the compare and the increment of every counter happen as one step for all ingestors.

use super::{Charge, GuardState, StateError};
use redis::aio::ConnectionManager;
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

pub struct RedisState {
    connection: ConnectionManager,
    prefix: String,
    charge: redis::Script,
    extend: redis::Script,
    live: redis::Script,
}

impl RedisState {
    /// Connects to `url` (`redis://host:port/db`); every key starts with `prefix`.
    pub async fn connect(
        url: &str,
        prefix: &str,
        timeout: Duration,
    ) -> Result<RedisState, StateError> {
        let client = redis::Client::open(url).map_err(|source| StateError::Redis {
            context: "open",
            source,
        })?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1);
        let connection = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(|source| StateError::Redis {
                context: "connect",
                source,
            })?;
        Ok(RedisState {
            connection,
            prefix: prefix.to_string(),
            charge: redis::Script::new(COMPARE_AND_INCREMENT),
            extend: redis::Script::new(EXTEND),
            live: redis::Script::new(LIVE),
        })
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
            .map_err(|source| StateError::Redis {
                context: "extend a set",
                source,
            })?;
        Ok(())
    }

    async fn live_members(&self, key: String, now_ms: i64) -> Result<Vec<String>, StateError> {
        let mut members: Vec<String> = self
            .live
            .key(key)
            .arg(now_ms)
            .invoke_async(&mut self.connection.clone())
            .await
            .map_err(|source| StateError::Redis {
                context: "read a set",
                source,
            })?;
        members.sort();
        Ok(members)
    }
}

#[async_trait::async_trait]
impl GuardState for RedisState {
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
            .map_err(|source| StateError::Redis {
                context: "charge",
                source,
            })?;
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
