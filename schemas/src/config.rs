//! The config tree: one TOML file, `MCP_METER_*` environment overrides, one [`Config::validate`].
//!
//! Precedence, lowest first: the defaults named below, the file, the environment
//! ([`ENV_OVERRIDES`]), then command-line flags. Reading the file and the environment is the
//! binary's job; this module only parses text and applies values it is handed.

use crate::guard::MarginThresholds;
use crate::rating::{RatePlan, DEFAULT_TOOL};
use serde::Deserialize;
use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address the HTTP API listens on.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Directory for the embedded store (`mcp-meter.sqlite`).
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Where `serve` keeps events and answers analytics from.
    #[serde(default)]
    pub store: StoreKind,
    #[serde(default)]
    pub ingest: IngestConfig,
    #[serde(default)]
    pub sqlite: SqliteConfig,
    #[serde(default)]
    pub clickhouse: ClickHouseConfig,
    #[serde(default)]
    pub kafka: KafkaConfig,
    #[serde(default)]
    pub aggregator: AggregatorConfig,
    #[serde(default)]
    pub redis: RedisConfig,
    #[serde(default)]
    pub margin_guard: MarginGuardConfig,
    #[serde(default)]
    pub retention: RetentionConfig,
    /// Every tenant, with its API keys and rate plans.
    #[serde(default)]
    pub tenants: Vec<TenantConfig>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    /// Largest request body accepted; a larger one is answered 413.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// Most events in one request (the wire contract allows at most 1000).
    #[serde(default = "default_max_batch_events")]
    pub max_batch_events: usize,
    /// Oldest `occurredAt` accepted, in days before receipt.
    #[serde(default = "default_max_event_age_days")]
    pub max_event_age_days: u32,
    /// Furthest `occurredAt` accepted ahead of the server's clock, in seconds.
    #[serde(default = "default_max_future_skew_seconds")]
    pub max_future_skew_seconds: u32,
    /// Largest `metadata` object of one event, in bytes of JSON.
    #[serde(default = "default_max_metadata_bytes")]
    pub max_metadata_bytes: usize,
    /// Ingest requests handled at once by this process; past it a request is answered 503 with
    /// Retry-After before its body is read, which bounds memory at about this many bodies.
    #[serde(default = "default_max_in_flight_requests")]
    pub max_in_flight_requests: usize,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqliteConfig {
    /// Most events one group commit writes in a transaction.
    #[serde(default = "default_max_commit_events")]
    pub max_commit_events: usize,
    /// Batches that may wait for the writer; beyond this, ingest answers 429 with Retry-After.
    #[serde(default = "default_queue_capacity_batches")]
    pub queue_capacity_batches: usize,
    /// Connections that serve analytics reads, beside the one writer.
    #[serde(default = "default_read_connections")]
    pub read_connections: usize,
}

/// The store behind the embedded pipeline.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// SQLite in `data_dir`: no services needed.
    #[default]
    Sqlite,
    /// A ClickHouse server (`[clickhouse]`), migrated with `mcp-meter migrate`.
    Clickhouse,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClickHouseConfig {
    /// HTTP interface of the server.
    #[serde(default = "default_clickhouse_url")]
    pub url: String,
    /// Database holding mcp-meter's tables; `mcp-meter migrate` creates it.
    #[serde(default = "default_clickhouse_database")]
    pub database: String,
    #[serde(default = "default_clickhouse_user")]
    pub user: String,
    #[serde(default)]
    pub password: String,
    /// Check row types against the table schema on insert. Needs a server that speaks
    /// RowBinaryWithNamesAndTypes (24.10 or newer); leave off for older servers such as 18.16.
    #[serde(default)]
    pub validation: bool,
    /// Longest wait for one request to ClickHouse.
    #[serde(default = "default_clickhouse_timeout_ms")]
    pub request_timeout_ms: u64,
}

/// The bus of the distributed mode (`mcp-meter ingestor`, `mcp-meter aggregator`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers, `host:port[,host:port...]`. Required by `ingestor` and `aggregator`;
    /// when set, `mcp-meter migrate` creates the topics too.
    #[serde(default)]
    pub brokers: Option<String>,
    /// Rated events, one message per event, keyed by a hash of (tenant, idempotency key).
    #[serde(default = "default_events_topic")]
    pub events_topic: String,
    /// Messages the aggregator cannot read, with the reason in a header.
    #[serde(default = "default_dead_letter_topic")]
    pub dead_letter_topic: String,
    /// Partitions of the events topic (created by `migrate`): the most aggregators that can
    /// share the work.
    #[serde(default = "default_partitions")]
    pub partitions: i32,
    #[serde(default = "default_replication_factor")]
    pub replication_factor: i32,
    /// Consumer group of the aggregators.
    #[serde(default = "default_consumer_group")]
    pub consumer_group: String,
    /// Longest the ingestor waits for a batch's delivery reports before answering 503.
    #[serde(default = "default_delivery_timeout_ms")]
    pub delivery_timeout_ms: u64,
    /// How long the producer lets a batch of messages fill before sending it.
    #[serde(default = "default_linger_ms")]
    pub linger_ms: u64,
    /// How long the group waits for a silent aggregator before giving its partitions away.
    #[serde(default = "default_session_timeout_ms")]
    pub session_timeout_ms: u64,
    /// Longest an aggregator may go between polls (a ClickHouse outage counts); past 80% of it
    /// the aggregator exits rather than write partitions it may no longer own.
    #[serde(default = "default_max_poll_interval_ms")]
    pub max_poll_interval_ms: u64,
}

/// The shared guard state of the distributed mode (hard-limit counters, the kill list).
/// `serve` keeps it in memory; `ingestor` needs it when any tenant has limits.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:port/db`.
    #[serde(default)]
    pub url: Option<String>,
    /// Prefix of every key mcp-meter writes, so that one Redis can serve several deployments.
    #[serde(default = "default_redis_key_prefix")]
    pub key_prefix: String,
    /// Longest wait for one Redis request; past it ingest goes on without enforcing.
    #[serde(default = "default_redis_timeout_ms")]
    pub request_timeout_ms: u64,
}

/// The margin guard: how often it recomputes every tenant's margin levels, over how many days.
/// It runs in `serve`, and in `aggregator` when `redis.url` is set (where ingestors read it).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MarginGuardConfig {
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Seconds between two computations; also what a throttled caller is told to wait.
    #[serde(default = "default_margin_interval_seconds")]
    pub interval_seconds: u64,
    /// Days of usage the margins cover, today (UTC) included.
    #[serde(default = "default_margin_window_days")]
    pub window_days: u32,
}

/// A tenant's margin thresholds, as fractions (0.20 = 20%) in whole basis points: a margin
/// below one puts the agent or tool at that level.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MarginThresholdsConfig {
    /// L1 WARN below this margin.
    #[serde(default = "default_warn_below")]
    pub warn_below: f64,
    /// L2 THROTTLE below this margin.
    #[serde(default = "default_throttle_below")]
    pub throttle_below: f64,
    /// L3 BLOCK below this margin.
    #[serde(default)]
    pub block_below: f64,
}

impl MarginThresholdsConfig {
    /// The thresholds in basis points; `Err` names the setting that is not a whole basis point
    /// from -1 to 1.
    pub fn thresholds(&self) -> Result<MarginThresholds, String> {
        let bp = |name: &str, v: f64| {
            let scaled = v * 10_000.0;
            if !(-1.0..=1.0).contains(&v) || (scaled - scaled.round()).abs() > 1e-6 {
                return Err(format!(
                    "margin_guard.{name} must be a fraction from -1 to 1 in whole basis points, like 0.2 or 0.125 (got {v})"
                ));
            }
            Ok(scaled.round() as i64)
        };
        let t = MarginThresholds {
            warn_below_bp: bp("warn_below", self.warn_below)?,
            throttle_below_bp: bp("throttle_below", self.throttle_below)?,
            block_below_bp: bp("block_below", self.block_below)?,
        };
        if !(t.block_below_bp <= t.throttle_below_bp && t.throttle_below_bp <= t.warn_below_bp) {
            return Err(format!(
                "margin_guard thresholds must satisfy block_below <= throttle_below <= warn_below (got {}, {}, {})",
                self.block_below, self.throttle_below, self.warn_below
            ));
        }
        Ok(t)
    }
}

/// How the aggregator batches its inserts.
/// How long raw rows and dedup keys are kept. Rollups (what analytics read) are kept forever.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// Days a stored idempotency key still catches a retry (by the day it arrived). At least
    /// `ingest.max_event_age_days`: a retry older than that is refused at ingest anyway.
    #[serde(default = "default_dedup_days")]
    pub dedup_days: u32,
    /// Days raw events are kept (by `occurredAt`); absent keeps them forever. At least
    /// `dedup_days`: in SQLite a raw row is its own dedup key.
    #[serde(default)]
    pub raw_days: Option<u32>,
    /// How often `serve` and `aggregator` apply it.
    #[serde(default = "default_retention_interval_seconds")]
    pub interval_seconds: u64,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregatorConfig {
    /// Most messages in one ClickHouse insert.
    #[serde(default = "default_max_batch_rows")]
    pub max_batch_rows: usize,
    /// Longest a message waits for its batch to fill before the batch is inserted anyway.
    #[serde(default = "default_max_batch_wait_ms")]
    pub max_batch_wait_ms: u64,
    /// Longest pause between retries of a failed insert.
    #[serde(default = "default_max_retry_backoff_ms")]
    pub max_retry_backoff_ms: u64,
    /// Where the aggregator serves `/metrics` and `/healthz`.
    #[serde(default = "default_aggregator_listen")]
    pub listen: String,
    /// How often the aggregator measures lag (end offsets against stored floors), whether or
    /// not it inserts anything.
    #[serde(default = "default_lag_check_interval_ms")]
    pub lag_check_interval_ms: u64,
    /// How long a partition may keep unstored records with its stored floor unmoved before it
    /// counts as stalled: `/healthz` answers 503, and an aggregator that owns no partition (or
    /// owns the stalled one and is idle) rejoins the group, then exits non-zero if that did not
    /// help within the same time again. Longer than `kafka.session_timeout_ms`, which a
    /// normal rebalance after a crash takes.
    #[serde(default = "default_stall_timeout_ms")]
    pub stall_timeout_ms: u64,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// The tenant's id: letters, digits, `_`, `-`, `.`; at most 64 characters.
    pub id: String,
    #[serde(default)]
    pub api_keys: Vec<ApiKeyConfig>,
    #[serde(default)]
    pub rate_plans: Vec<RatePlan>,
    /// Hard limits: a call past one is still stored and billed, and kills its session.
    #[serde(default)]
    pub limits: Vec<LimitConfig>,
    /// Margin levels of the tenant's agents and tools (defaults: 20%, 10%, 0%).
    #[serde(default)]
    pub margin_guard: MarginThresholdsConfig,
}

/// The most a limit may allow per window: ten million USD in µUSD (or as many calls). Keeps
/// every counter exact in Redis's Lua, whose numbers print with 14 significant digits.
pub const MAX_LIMIT: i64 = 10_000_000_000_000;

/// One hard limit: calls or spend per session or per agent, per window.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitConfig {
    /// What each counter follows: every `session`, or every `agent` (all its sessions).
    pub per: LimitSubject,
    /// The window counters start over in: `hour`, `day` or `month` (UTC).
    pub window: LimitWindow,
    /// Most calls per subject and window.
    #[serde(default)]
    pub max_calls: Option<i64>,
    /// Most revenue (what the agent is charged) per subject and window, in µUSD.
    #[serde(default)]
    pub max_spend_micros: Option<i64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitSubject {
    Session,
    Agent,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitWindow {
    Hour,
    Day,
    Month,
}

impl LimitWindow {
    /// The UTC window holding `at_ms`: its first millisecond and the first after it.
    pub fn bounds(self, at_ms: i64) -> (i64, i64) {
        use chrono::{Datelike, TimeZone, Utc};
        const HOUR: i64 = 3_600_000;
        const DAY: i64 = 86_400_000;
        match self {
            LimitWindow::Hour => {
                let start = at_ms.div_euclid(HOUR) * HOUR;
                (start, start + HOUR)
            }
            LimitWindow::Day => {
                let start = at_ms.div_euclid(DAY) * DAY;
                (start, start + DAY)
            }
            LimitWindow::Month => {
                let at = Utc
                    .timestamp_millis_opt(at_ms)
                    .single()
                    .expect("a valid time");
                let first = |y: i32, m: u32| {
                    Utc.with_ymd_and_hms(y, m, 1, 0, 0, 0)
                        .single()
                        .expect("a month start")
                        .timestamp_millis()
                };
                let (y, m) = (at.year(), at.month());
                let next = if m == 12 {
                    first(y + 1, 1)
                } else {
                    first(y, m + 1)
                };
                (first(y, m), next)
            }
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            LimitWindow::Hour => "hour",
            LimitWindow::Day => "day",
            LimitWindow::Month => "month",
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// A label for people (`sdk-prod`, `finance-export`); never sent by clients.
    pub name: String,
    /// SHA-256 of the key, lower-case hex (`mcp-meter keys new` prints both).
    pub sha256: String,
    /// What the key may do.
    pub scopes: Vec<Scope>,
    /// Most requests this key may make, as a token bucket; none: unlimited.
    #[serde(default)]
    pub rate_limit: Option<RateLimitConfig>,
}

/// A token bucket: `burst` requests at once, refilled at `requests_per_second`. Past it a
/// request is answered 429 with Retry-After. Shared through Redis by every ingestor.
#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Sustained requests per second (may be fractional: 0.5 is one every two seconds).
    pub requests_per_second: f64,
    /// Requests that may come at once after a quiet spell; at least 1.
    pub burst: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Post usage events and heartbeats.
    Ingest,
    /// Read analytics.
    Read,
    /// Pull billing exports.
    Export,
    /// Everything.
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Ingest => "ingest",
            Scope::Read => "read",
            Scope::Export => "export",
            Scope::Admin => "admin",
        }
    }
}

/// The addresses a `listen` setting stands for: `127.0.0.1:8080`, `[::1]:8080`, or a host name
/// that resolves, as `localhost:8080`. `Err` says what is wrong with it.
pub fn listen_addresses(listen: &str) -> Result<Vec<SocketAddr>, String> {
    use std::net::ToSocketAddrs;
    if let Ok(addr) = listen.parse::<SocketAddr>() {
        return Ok(vec![addr]);
    }
    let Some((host, port)) = listen.rsplit_once(':') else {
        return Err(format!(
            "`{listen}` has no port: write host:port, like 127.0.0.1:8080 or localhost:8080"
        ));
    };
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(format!(
            "`{listen}` is not host:port, like 127.0.0.1:8080 or localhost:8080"
        ));
    }
    match listen.to_socket_addrs() {
        Ok(addrs) => {
            let addrs: Vec<SocketAddr> = addrs.collect();
            if addrs.is_empty() {
                Err(format!("`{listen}`: host `{host}` resolves to no address"))
            } else {
                Ok(addrs)
            }
        }
        Err(e) => Err(format!("`{listen}`: host `{host}` does not resolve ({e})")),
    }
}

fn default_listen() -> String {
    "127.0.0.1:8080".into()
}
fn default_data_dir() -> PathBuf {
    PathBuf::from("./data")
}
fn default_clickhouse_url() -> String {
    "http://127.0.0.1:8123".into()
}
fn default_clickhouse_database() -> String {
    "mcp_meter".into()
}
fn default_clickhouse_user() -> String {
    "default".into()
}
fn default_clickhouse_timeout_ms() -> u64 {
    30_000
}
fn default_events_topic() -> String {
    "mcp-meter.events".into()
}
fn default_dead_letter_topic() -> String {
    "mcp-meter.events.dead-letter".into()
}
fn default_partitions() -> i32 {
    6
}
fn default_replication_factor() -> i32 {
    1
}
fn default_consumer_group() -> String {
    "mcp-meter-aggregator".into()
}
fn default_delivery_timeout_ms() -> u64 {
    5_000
}
fn default_linger_ms() -> u64 {
    2
}
fn default_session_timeout_ms() -> u64 {
    10_000
}
fn default_max_poll_interval_ms() -> u64 {
    300_000
}
fn default_max_batch_rows() -> usize {
    25_000
}
fn default_max_batch_wait_ms() -> u64 {
    200
}
fn default_max_retry_backoff_ms() -> u64 {
    5_000
}
fn default_lag_check_interval_ms() -> u64 {
    2_000
}
fn default_stall_timeout_ms() -> u64 {
    30_000
}
fn default_dedup_days() -> u32 {
    40
}
fn default_retention_interval_seconds() -> u64 {
    3600
}
fn default_aggregator_listen() -> String {
    "127.0.0.1:9091".into()
}
fn default_redis_key_prefix() -> String {
    "mcp-meter:".into()
}
fn default_redis_timeout_ms() -> u64 {
    200
}
fn default_true() -> bool {
    true
}
fn default_margin_interval_seconds() -> u64 {
    10
}
fn default_margin_window_days() -> u32 {
    7
}
fn default_warn_below() -> f64 {
    0.20
}
fn default_throttle_below() -> f64 {
    0.10
}
fn default_max_body_bytes() -> usize {
    8 * 1024 * 1024
}
fn default_max_batch_events() -> usize {
    crate::event::MAX_BATCH_EVENTS
}
fn default_max_event_age_days() -> u32 {
    35
}
fn default_max_future_skew_seconds() -> u32 {
    300
}
fn default_max_metadata_bytes() -> usize {
    16 * 1024
}
fn default_max_in_flight_requests() -> usize {
    256
}
fn default_max_commit_events() -> usize {
    20_000
}
fn default_queue_capacity_batches() -> usize {
    1024
}
fn default_read_connections() -> usize {
    4
}

impl Default for Config {
    fn default() -> Config {
        toml::from_str("").expect("an empty config takes every default")
    }
}

impl Default for IngestConfig {
    fn default() -> IngestConfig {
        toml::from_str("").expect("an empty section takes every default")
    }
}

impl Default for ClickHouseConfig {
    fn default() -> ClickHouseConfig {
        toml::from_str("").expect("an empty section takes every default")
    }
}

impl Default for KafkaConfig {
    fn default() -> KafkaConfig {
        toml::from_str("").expect("an empty section takes every default")
    }
}

impl Default for RedisConfig {
    fn default() -> RedisConfig {
        toml::from_str("").expect("an empty section takes every default")
    }
}

impl Default for MarginGuardConfig {
    fn default() -> MarginGuardConfig {
        toml::from_str("").expect("an empty section takes every default")
    }
}

impl Default for MarginThresholdsConfig {
    fn default() -> MarginThresholdsConfig {
        toml::from_str("").expect("an empty section takes every default")
    }
}

impl Default for AggregatorConfig {
    fn default() -> AggregatorConfig {
        toml::from_str("").expect("an empty section takes every default")
    }
}

impl Default for RetentionConfig {
    fn default() -> RetentionConfig {
        toml::from_str("").expect("an empty section takes every default")
    }
}

impl Default for SqliteConfig {
    fn default() -> SqliteConfig {
        toml::from_str("").expect("an empty section takes every default")
    }
}

/// Every problem found in a config, reported together.
#[derive(Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the config has {} problem(s):", self.problems.len())?;
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

type Setter = fn(&mut Config, &str) -> Result<(), String>;

/// Every environment variable that overrides the file, with the setting it overrides.
/// `MCP_METER_LISTEN`, `MCP_METER_DATA_DIR`, `MCP_METER_CONFIG` and `MCP_METER_DEMO_KEY` are
/// read by the command line (they are flags too); `MCP_METER_LOG` sets the log filter.
pub const ENV_OVERRIDES: &[(&str, &str, Setter)] = &[
    ("MCP_METER_REDIS_URL", "redis.url", |c, v| {
        c.redis.url = Some(v.to_string());
        Ok(())
    }),
    ("MCP_METER_REDIS_KEY_PREFIX", "redis.key_prefix", |c, v| {
        c.redis.key_prefix = v.to_string();
        Ok(())
    }),
    (
        "MCP_METER_REDIS_REQUEST_TIMEOUT_MS",
        "redis.request_timeout_ms",
        |c, v| parse_into(&mut c.redis.request_timeout_ms, v),
    ),
    ("MCP_METER_KAFKA_BROKERS", "kafka.brokers", |c, v| {
        c.kafka.brokers = Some(v.to_string());
        Ok(())
    }),
    (
        "MCP_METER_KAFKA_EVENTS_TOPIC",
        "kafka.events_topic",
        |c, v| {
            c.kafka.events_topic = v.to_string();
            Ok(())
        },
    ),
    (
        "MCP_METER_KAFKA_DEAD_LETTER_TOPIC",
        "kafka.dead_letter_topic",
        |c, v| {
            c.kafka.dead_letter_topic = v.to_string();
            Ok(())
        },
    ),
    ("MCP_METER_KAFKA_PARTITIONS", "kafka.partitions", |c, v| {
        parse_into(&mut c.kafka.partitions, v)
    }),
    (
        "MCP_METER_KAFKA_REPLICATION_FACTOR",
        "kafka.replication_factor",
        |c, v| parse_into(&mut c.kafka.replication_factor, v),
    ),
    (
        "MCP_METER_KAFKA_CONSUMER_GROUP",
        "kafka.consumer_group",
        |c, v| {
            c.kafka.consumer_group = v.to_string();
            Ok(())
        },
    ),
    (
        "MCP_METER_KAFKA_DELIVERY_TIMEOUT_MS",
        "kafka.delivery_timeout_ms",
        |c, v| parse_into(&mut c.kafka.delivery_timeout_ms, v),
    ),
    ("MCP_METER_KAFKA_LINGER_MS", "kafka.linger_ms", |c, v| {
        parse_into(&mut c.kafka.linger_ms, v)
    }),
    (
        "MCP_METER_KAFKA_SESSION_TIMEOUT_MS",
        "kafka.session_timeout_ms",
        |c, v| parse_into(&mut c.kafka.session_timeout_ms, v),
    ),
    (
        "MCP_METER_KAFKA_MAX_POLL_INTERVAL_MS",
        "kafka.max_poll_interval_ms",
        |c, v| parse_into(&mut c.kafka.max_poll_interval_ms, v),
    ),
    (
        "MCP_METER_AGGREGATOR_MAX_BATCH_ROWS",
        "aggregator.max_batch_rows",
        |c, v| parse_into(&mut c.aggregator.max_batch_rows, v),
    ),
    (
        "MCP_METER_AGGREGATOR_MAX_BATCH_WAIT_MS",
        "aggregator.max_batch_wait_ms",
        |c, v| parse_into(&mut c.aggregator.max_batch_wait_ms, v),
    ),
    (
        "MCP_METER_AGGREGATOR_LISTEN",
        "aggregator.listen",
        |c, v| {
            c.aggregator.listen = v.to_string();
            Ok(())
        },
    ),
    (
        "MCP_METER_AGGREGATOR_MAX_RETRY_BACKOFF_MS",
        "aggregator.max_retry_backoff_ms",
        |c, v| parse_into(&mut c.aggregator.max_retry_backoff_ms, v),
    ),
    (
        "MCP_METER_AGGREGATOR_LAG_CHECK_INTERVAL_MS",
        "aggregator.lag_check_interval_ms",
        |c, v| parse_into(&mut c.aggregator.lag_check_interval_ms, v),
    ),
    (
        "MCP_METER_AGGREGATOR_STALL_TIMEOUT_MS",
        "aggregator.stall_timeout_ms",
        |c, v| parse_into(&mut c.aggregator.stall_timeout_ms, v),
    ),
    (
        "MCP_METER_RETENTION_DEDUP_DAYS",
        "retention.dedup_days",
        |c, v| parse_into(&mut c.retention.dedup_days, v),
    ),
    (
        "MCP_METER_RETENTION_RAW_DAYS",
        "retention.raw_days",
        |c, v| {
            c.retention.raw_days = match v {
                "" | "keep" => None,
                days => Some(
                    days.parse()
                        .map_err(|_| format!("`{days}` is not a number of days or `keep`"))?,
                ),
            };
            Ok(())
        },
    ),
    (
        "MCP_METER_RETENTION_INTERVAL_SECONDS",
        "retention.interval_seconds",
        |c, v| parse_into(&mut c.retention.interval_seconds, v),
    ),
    (
        "MCP_METER_MARGIN_GUARD_ENABLED",
        "margin_guard.enabled",
        |c, v| parse_into(&mut c.margin_guard.enabled, v),
    ),
    (
        "MCP_METER_MARGIN_GUARD_INTERVAL_SECONDS",
        "margin_guard.interval_seconds",
        |c, v| parse_into(&mut c.margin_guard.interval_seconds, v),
    ),
    (
        "MCP_METER_MARGIN_GUARD_WINDOW_DAYS",
        "margin_guard.window_days",
        |c, v| parse_into(&mut c.margin_guard.window_days, v),
    ),
    ("MCP_METER_STORE", "store", |c, v| {
        c.store = match v.trim() {
            "sqlite" => StoreKind::Sqlite,
            "clickhouse" => StoreKind::Clickhouse,
            other => {
                return Err(format!(
                    "`{other}` is not a store: use sqlite or clickhouse"
                ))
            }
        };
        Ok(())
    }),
    ("MCP_METER_CLICKHOUSE_URL", "clickhouse.url", |c, v| {
        c.clickhouse.url = v.to_string();
        Ok(())
    }),
    (
        "MCP_METER_CLICKHOUSE_DATABASE",
        "clickhouse.database",
        |c, v| {
            c.clickhouse.database = v.to_string();
            Ok(())
        },
    ),
    ("MCP_METER_CLICKHOUSE_USER", "clickhouse.user", |c, v| {
        c.clickhouse.user = v.to_string();
        Ok(())
    }),
    (
        "MCP_METER_CLICKHOUSE_PASSWORD",
        "clickhouse.password",
        |c, v| {
            c.clickhouse.password = v.to_string();
            Ok(())
        },
    ),
    (
        "MCP_METER_CLICKHOUSE_VALIDATION",
        "clickhouse.validation",
        |c, v| parse_into(&mut c.clickhouse.validation, v),
    ),
    (
        "MCP_METER_CLICKHOUSE_REQUEST_TIMEOUT_MS",
        "clickhouse.request_timeout_ms",
        |c, v| parse_into(&mut c.clickhouse.request_timeout_ms, v),
    ),
    (
        "MCP_METER_INGEST_MAX_BODY_BYTES",
        "ingest.max_body_bytes",
        |c, v| parse_into(&mut c.ingest.max_body_bytes, v),
    ),
    (
        "MCP_METER_INGEST_MAX_BATCH_EVENTS",
        "ingest.max_batch_events",
        |c, v| parse_into(&mut c.ingest.max_batch_events, v),
    ),
    (
        "MCP_METER_INGEST_MAX_EVENT_AGE_DAYS",
        "ingest.max_event_age_days",
        |c, v| parse_into(&mut c.ingest.max_event_age_days, v),
    ),
    (
        "MCP_METER_INGEST_MAX_FUTURE_SKEW_SECONDS",
        "ingest.max_future_skew_seconds",
        |c, v| parse_into(&mut c.ingest.max_future_skew_seconds, v),
    ),
    (
        "MCP_METER_INGEST_MAX_METADATA_BYTES",
        "ingest.max_metadata_bytes",
        |c, v| parse_into(&mut c.ingest.max_metadata_bytes, v),
    ),
    (
        "MCP_METER_INGEST_MAX_IN_FLIGHT_REQUESTS",
        "ingest.max_in_flight_requests",
        |c, v| parse_into(&mut c.ingest.max_in_flight_requests, v),
    ),
    (
        "MCP_METER_SQLITE_MAX_COMMIT_EVENTS",
        "sqlite.max_commit_events",
        |c, v| parse_into(&mut c.sqlite.max_commit_events, v),
    ),
    (
        "MCP_METER_SQLITE_QUEUE_CAPACITY_BATCHES",
        "sqlite.queue_capacity_batches",
        |c, v| parse_into(&mut c.sqlite.queue_capacity_batches, v),
    ),
    (
        "MCP_METER_SQLITE_READ_CONNECTIONS",
        "sqlite.read_connections",
        |c, v| parse_into(&mut c.sqlite.read_connections, v),
    ),
];

fn parse_into<T: std::str::FromStr>(slot: &mut T, value: &str) -> Result<(), String> {
    *slot = value
        .trim()
        .parse()
        .map_err(|_| format!("`{value}` is not a valid value"))?;
    Ok(())
}

impl Config {
    /// Parses a config file's text; the error names the offending key and line.
    /// Parses a config file. TOML parsing stops at the first syntax error, misspelt setting or
    /// wrong type, so that one comes alone, saying so; [`Config::validate`] then reports every
    /// remaining problem at once.
    pub fn from_toml(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| {
            format!(
                "{}\n(parsing stops at the first error like this one: fix it and run again; once \
the file parses, every other problem is reported together)",
                e.to_string().trim_end()
            )
        })
    }

    /// Applies the [`ENV_OVERRIDES`] that `lookup` finds, reporting every bad value at once.
    pub fn apply_env(
        &mut self,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        for (var, setting, set) in ENV_OVERRIDES {
            if let Some(value) = lookup(var) {
                if let Err(e) = set(self, &value) {
                    problems.push(format!("{var} (overrides {setting}): {e}"));
                }
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { problems })
        }
    }

    /// Checks everything at once and reports every problem found, each saying what to fix.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        if let Err(e) = listen_addresses(&self.listen) {
            problems.push(format!("listen {e}"));
        }
        let i = &self.ingest;
        if i.max_batch_events == 0 || i.max_batch_events > crate::event::MAX_BATCH_EVENTS {
            problems.push(format!(
                "ingest.max_batch_events must be 1 to {} (got {})",
                crate::event::MAX_BATCH_EVENTS,
                i.max_batch_events
            ));
        }
        if i.max_body_bytes < 1024 {
            problems.push(format!(
                "ingest.max_body_bytes must be at least 1024 (got {})",
                i.max_body_bytes
            ));
        }
        if i.max_in_flight_requests == 0 {
            problems.push("ingest.max_in_flight_requests must be at least 1".into());
        }
        if i.max_event_age_days == 0 {
            problems.push("ingest.max_event_age_days must be at least 1".into());
        }
        let s = &self.sqlite;
        if s.max_commit_events == 0 {
            problems.push("sqlite.max_commit_events must be at least 1".into());
        }
        if s.queue_capacity_batches == 0 {
            problems.push("sqlite.queue_capacity_batches must be at least 1".into());
        }
        if s.read_connections == 0 {
            problems.push("sqlite.read_connections must be at least 1".into());
        }

        let ch = &self.clickhouse;
        if !(ch.url.starts_with("http://") || ch.url.starts_with("https://")) {
            problems.push(format!(
                "clickhouse.url `{}` must be an http:// or https:// URL of the HTTP interface",
                ch.url
            ));
        }
        let identifier = |s: &str| {
            !s.is_empty()
                && !s.starts_with(|c: char| c.is_ascii_digit())
                && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        };
        if !identifier(&ch.database) {
            problems.push(format!(
                "clickhouse.database `{}` must be letters, digits and `_`, not starting with a digit",
                ch.database
            ));
        }
        if ch.request_timeout_ms == 0 {
            problems.push("clickhouse.request_timeout_ms must be at least 1".into());
        }

        let k = &self.kafka;
        if k.brokers.as_deref().is_some_and(|b| b.trim().is_empty()) {
            problems.push("kafka.brokers is empty; give host:port of at least one broker".into());
        }
        if k.partitions < 1 || k.replication_factor < 1 {
            problems
                .push("kafka.partitions and kafka.replication_factor must be at least 1".into());
        }
        if k.events_topic.is_empty() || k.events_topic == k.dead_letter_topic {
            problems.push(
                "kafka.events_topic and kafka.dead_letter_topic must be two different names".into(),
            );
        }
        if k.delivery_timeout_ms == 0 {
            problems.push("kafka.delivery_timeout_ms must be at least 1".into());
        }
        let a = &self.aggregator;
        if let Err(e) = listen_addresses(&a.listen) {
            problems.push(format!("aggregator.listen {e}"));
        }
        if a.max_batch_rows == 0 || a.max_batch_wait_ms == 0 {
            problems.push(
                "aggregator.max_batch_rows and aggregator.max_batch_wait_ms must be at least 1"
                    .into(),
            );
        }
        if a.lag_check_interval_ms == 0 || a.lag_check_interval_ms >= a.stall_timeout_ms {
            problems.push(format!(
                "aggregator.lag_check_interval_ms ({}) must be at least 1 and below aggregator.stall_timeout_ms ({})",
                a.lag_check_interval_ms, a.stall_timeout_ms
            ));
        }
        if a.stall_timeout_ms <= k.session_timeout_ms {
            problems.push(format!(
                "aggregator.stall_timeout_ms ({}) must be longer than kafka.session_timeout_ms ({}): \
a group needs that long to notice a crashed member, and a shorter stall timeout would rejoin during every normal rebalance",
                a.stall_timeout_ms, k.session_timeout_ms
            ));
        }

        let r = &self.retention;
        if r.dedup_days < self.ingest.max_event_age_days {
            problems.push(format!(
                "retention.dedup_days ({}) must be at least ingest.max_event_age_days ({}): \
a retry of an event ingest still accepts must still find its key",
                r.dedup_days, self.ingest.max_event_age_days
            ));
        }
        if let Some(raw) = r.raw_days.filter(|raw| *raw < r.dedup_days) {
            problems.push(format!(
                "retention.raw_days ({raw}) must be at least retention.dedup_days ({}): \
in the embedded store a raw row is its own dedup key; leave raw_days out to keep raw rows",
                r.dedup_days
            ));
        }
        if r.interval_seconds == 0 {
            problems.push("retention.interval_seconds must be at least 1".into());
        }

        let g = &self.margin_guard;
        if g.interval_seconds == 0 {
            problems.push("margin_guard.interval_seconds must be at least 1".into());
        }
        if !(1..=crate::analytics::MAX_RANGE_DAYS as u32).contains(&g.window_days) {
            problems.push(format!(
                "margin_guard.window_days must be 1 to {} (got {})",
                crate::analytics::MAX_RANGE_DAYS,
                g.window_days
            ));
        }

        let mut tenant_ids = HashSet::new();
        let mut key_hashes = HashSet::new();
        for (n, t) in self.tenants.iter().enumerate() {
            let at = format!("tenants[{n}] (`{}`)", t.id);
            if !valid_tenant_id(&t.id) {
                problems.push(format!(
                    "{at}: id must be 1 to 64 letters, digits, `_`, `-` or `.`"
                ));
            }
            if !tenant_ids.insert(t.id.as_str()) {
                problems.push(format!("{at}: id is used by another tenant"));
            }
            if t.api_keys.is_empty() {
                problems.push(format!("{at}: has no api_keys, so nobody can use it"));
            }
            for (k, key) in t.api_keys.iter().enumerate() {
                let kat = format!("{at}.api_keys[{k}] (`{}`)", key.name);
                let hex_ok = key.sha256.len() == 64
                    && key
                        .sha256
                        .bytes()
                        .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
                if !hex_ok {
                    problems.push(format!(
                        "{kat}: sha256 must be 64 lower-case hex digits (`mcp-meter keys new` prints one)"
                    ));
                } else if !key_hashes.insert(key.sha256.as_str()) {
                    problems.push(format!("{kat}: the same key is configured twice"));
                }
                if key.scopes.is_empty() {
                    problems.push(format!(
                        "{kat}: scopes is empty; give at least one of ingest, read, export, admin"
                    ));
                }
                if let Some(r) = key.rate_limit {
                    if !(r.requests_per_second > 0.0 && r.requests_per_second <= 1e6)
                        || r.burst == 0
                    {
                        problems.push(format!(
                            "{kat}: rate_limit needs requests_per_second above 0 (at most 1000000) and a burst of at least 1"
                        ));
                    }
                }
            }
            if t.rate_plans.is_empty() {
                problems.push(format!(
                    "{at}: has no rate_plans; events could not be priced"
                ));
            }
            for (l, limit) in t.limits.iter().enumerate() {
                let lat = format!("{at}.limits[{l}]");
                if limit.max_calls.is_none() && limit.max_spend_micros.is_none() {
                    problems.push(format!("{lat}: set max_calls, max_spend_micros or both"));
                }
                for (name, value) in [
                    ("max_calls", limit.max_calls),
                    ("max_spend_micros", limit.max_spend_micros),
                ] {
                    if value.is_some_and(|v| !(1..=MAX_LIMIT).contains(&v)) {
                        problems.push(format!("{lat}: {name} must be 1 to {MAX_LIMIT}"));
                    }
                }
            }
            if let Err(e) = t.margin_guard.thresholds() {
                problems.push(format!("{at}: {e}"));
            }
            let mut versions = HashSet::new();
            let mut ordered: Vec<&RatePlan> = t.rate_plans.iter().collect();
            ordered.sort_by_key(|p| p.version);
            for p in &t.rate_plans {
                let pat = format!("{at}.rate_plans version {}", p.version);
                if p.version == 0 {
                    problems.push(format!("{pat}: versions start at 1 (0 marks heartbeats)"));
                }
                if !versions.insert(p.version) {
                    problems.push(format!("{pat}: version is used twice"));
                }
                if !p.tools.contains_key(DEFAULT_TOOL) {
                    problems.push(format!(
                        "{pat}: has no `\"*\"` tool rate for tools it does not name"
                    ));
                }
                for name in p.tools.keys() {
                    if name.encode_utf16().count() > crate::event::MAX_TOOL_NAME_LEN {
                        problems.push(format!("{pat}: tool `{name}` is longer than 64 characters"));
                    }
                }
            }
            for pair in ordered.windows(2) {
                let (a, b) = (pair[0], pair[1]);
                let starts = |p: &RatePlan| p.effective_from.map(|t| t.timestamp_millis());
                if starts(b).unwrap_or(i64::MIN) <= starts(a).unwrap_or(i64::MIN) {
                    problems.push(format!(
                        "{at}.rate_plans: version {} must start (effective_from) after version {}",
                        b.version, a.version
                    ));
                }
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { problems })
        }
    }
}

fn valid_tenant_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
listen = "127.0.0.1:9000"

[[tenants]]
id = "acme"

[[tenants.api_keys]]
name = "sdk"
sha256 = "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"
scopes = ["ingest", "read"]

[[tenants.rate_plans]]
version = 1
[tenants.rate_plans.tools."*"]
price = { per_call = 5000, per_input_token = 1 }
cost = { per_call = 200, per_input_token = 0.5, per_second = "100" }
"#;

    #[test]
    fn a_full_config_parses_and_validates() {
        let c = Config::from_toml(GOOD).unwrap();
        c.validate().unwrap();
        assert_eq!(
            c.tenants[0].api_keys[0].scopes,
            vec![Scope::Ingest, Scope::Read]
        );
        let star = &c.tenants[0].rate_plans[0].tools["*"];
        assert_eq!(star.cost.per_input_token.scaled(), 500_000);
        assert_eq!(c.ingest.max_batch_events, 1000);
    }

    #[test]
    fn unknown_keys_are_refused_with_their_name() {
        let err = Config::from_toml("lissten = \"x\"").unwrap_err();
        assert!(err.contains("unknown field `lissten`"), "{err}");
        let err =
            Config::from_toml(&GOOD.replace("per_call = 5000", "per_cal = 5000")).unwrap_err();
        assert!(err.contains("unknown field `per_cal`"), "{err}");
    }

    #[test]
    fn validate_reports_every_problem_at_once() {
        let bad = GOOD
            .replace("127.0.0.1:9000", "nowhere")
            .replace("2c26b46b", "XYZ")
            .replace("[\"ingest\", \"read\"]", "[]")
            .replace("tools.\"*\"", "tools.\"web\"");
        let err = Config::from_toml(&bad).unwrap().validate().unwrap_err();
        assert_eq!(err.problems.len(), 4, "{err}");
        let text = err.to_string();
        assert!(text.contains("listen `nowhere` has no port"), "{text}");
        assert!(text.contains("sha256 must be 64 lower-case hex"));
        assert!(text.contains("scopes is empty"));
        assert!(text.contains("no `\"*\"` tool rate"));
    }

    #[test]
    fn plan_versions_must_be_unique_and_start_in_order() {
        let two = format!(
            "{GOOD}\n[[tenants.rate_plans]]\nversion = 1\neffective_from = \"2026-01-01T00:00:00Z\"\n[tenants.rate_plans.tools.\"*\"]\n"
        );
        let err = Config::from_toml(&two).unwrap().validate().unwrap_err();
        assert!(err.to_string().contains("version is used twice"), "{err}");
    }

    #[test]
    fn limit_windows_are_utc_hours_days_and_months() {
        let at = 1_795_181_530_000; // 2026-11-20T13:32:10Z
        let hour = LimitWindow::Hour.bounds(at);
        assert_eq!(hour, (1_795_179_600_000, 1_795_183_200_000));
        assert_eq!(
            LimitWindow::Day.bounds(at),
            (1_795_132_800_000, 1_795_219_200_000)
        );
        let (start, end) = LimitWindow::Month.bounds(at);
        assert_eq!(start, 1_793_491_200_000); // 2026-11-01
        assert_eq!(end, 1_796_083_200_000); // 2026-12-01
                                            // December ends at the next year's first day; January 2027 ends on 1 February.
        assert_eq!(
            LimitWindow::Month.bounds(1_798_675_200_000).1,
            1_798_761_600_000
        );
        assert_eq!(
            LimitWindow::Month.bounds(1_798_761_600_005).1,
            1_801_440_000_000
        );
    }

    #[test]
    fn limits_need_a_maximum_within_range() {
        let text = GOOD.to_string()
            + "\n[[tenants.limits]]\nper = \"session\"\nwindow = \"day\"\n\n[[tenants.limits]]\nper = \"agent\"\nwindow = \"hour\"\nmax_calls = 0\n";
        let err = Config::from_toml(&text).unwrap().validate().unwrap_err();
        assert_eq!(err.problems.len(), 2, "{err}");
        assert!(err.problems[0].ends_with("set max_calls, max_spend_micros or both"));
        assert!(err.problems[1].contains("max_calls must be 1 to"));
    }

    #[test]
    fn margin_thresholds_are_whole_basis_points_in_order() {
        let t = Config::from_toml(GOOD).unwrap().tenants[0]
            .margin_guard
            .thresholds()
            .unwrap();
        assert_eq!(t, MarginThresholds::default());
        let custom = GOOD.to_string()
            + "\n[tenants.margin_guard]\nwarn_below = 0.35\nthrottle_below = 0.125\nblock_below = -0.05\n";
        let t = Config::from_toml(&custom).unwrap().tenants[0]
            .margin_guard
            .thresholds()
            .unwrap();
        assert_eq!(
            (t.warn_below_bp, t.throttle_below_bp, t.block_below_bp),
            (3500, 1250, -500)
        );
        let bad = GOOD.to_string()
            + "\n[tenants.margin_guard]\nwarn_below = 0.05\nthrottle_below = 0.10001\n";
        let err = Config::from_toml(&bad).unwrap().validate().unwrap_err();
        assert_eq!(err.problems.len(), 1, "{err}");
        assert!(
            err.problems[0].contains("throttle_below must be a fraction"),
            "{err}"
        );
        let unordered = GOOD.to_string() + "\n[tenants.margin_guard]\nwarn_below = 0.05\n";
        let err = Config::from_toml(&unordered)
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(
            err.problems[0].contains("block_below <= throttle_below <= warn_below"),
            "{err}"
        );
    }

    #[test]
    fn environment_overrides_apply_and_bad_values_are_named() {
        let mut c = Config::default();
        c.apply_env(|v| (v == "MCP_METER_INGEST_MAX_BATCH_EVENTS").then(|| "10".to_string()))
            .unwrap();
        assert_eq!(c.ingest.max_batch_events, 10);
        let err = c
            .apply_env(|v| {
                v.starts_with("MCP_METER_SQLITE")
                    .then(|| "lots".to_string())
            })
            .unwrap_err();
        assert_eq!(err.problems.len(), 3);
        assert!(err.problems[0].starts_with(
            "MCP_METER_SQLITE_MAX_COMMIT_EVENTS (overrides sqlite.max_commit_events)"
        ));
    }

    #[test]
    fn retention_keeps_keys_as_long_as_ingest_accepts_retries() {
        let ok = Config::from_toml("[retention]\ndedup_days = 35\nraw_days = 400").unwrap();
        assert!(ok.validate().is_ok());
        assert_eq!(Config::default().retention.dedup_days, 40);
        assert_eq!(Config::default().retention.raw_days, None);
        let bad = Config::from_toml("[retention]\ndedup_days = 30\nraw_days = 20").unwrap();
        let err = bad.validate().unwrap_err();
        assert!(
            err.problems[0].starts_with(
                "retention.dedup_days (30) must be at least ingest.max_event_age_days (35)"
            ),
            "{err}"
        );
        assert!(
            err.problems[1]
                .starts_with("retention.raw_days (20) must be at least retention.dedup_days (30)"),
            "{err}"
        );
        let mut c = Config::default();
        c.apply_env(|v| (v == "MCP_METER_RETENTION_RAW_DAYS").then(|| "90".to_string()))
            .unwrap();
        assert_eq!(c.retention.raw_days, Some(90));
        c.apply_env(|v| (v == "MCP_METER_RETENTION_RAW_DAYS").then(|| "keep".to_string()))
            .unwrap();
        assert_eq!(c.retention.raw_days, None);
    }
}
