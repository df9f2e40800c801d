//! The sections of the config tree: `[ingest]`, `[sqlite]`, `[clickhouse]`, `[kafka]`,
//! `[aggregator]`, `[redis]`, `[margin_guard]`, `[retention]`. Each field's default is a named
//! function beside its section; every field can be overridden from the environment
//! (see [`super::env`]).

use serde::Deserialize;

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
    /// the aggregator exits, so that a supervisor restarts it as a new group member.
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

/// Charge before the tool runs: how long an authorization holds its quote, and how long an
/// event's charges (its settlement, its hard-limit counts) are remembered so that a re-sent
/// batch is not charged again.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreditsConfig {
    /// Seconds a reservation made by `POST /v1/authorize` holds its quote unless the call's
    /// event settles it or it is released first.
    #[serde(default = "default_reservation_seconds")]
    pub reservation_seconds: u64,
    /// Hours an event key stays charged: a batch re-sent within them (after a lost 202) is
    /// not settled or counted against limits again. The store deduplicates for
    /// `retention.dedup_days` whatever this says.
    #[serde(default = "default_charged_keys_hours")]
    pub charged_keys_hours: u64,
    /// Most milliseconds a ledger rebuild (after Redis lost its data) waits for the
    /// aggregators to store what the bus acknowledged before it; past that, the request that
    /// needed it answers 503 and the next one tries again.
    #[serde(default = "default_rebuild_wait_ms")]
    pub rebuild_wait_ms: u64,
}

/// The customer portal: what signs portal tokens (`POST /v1/portal/tokens`), read-only tokens
/// bound to one tenant and one customer, verified with no state.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortalConfig {
    /// The HMAC-SHA256 key portal tokens are signed with: at least 32 random bytes written as
    /// hex (`openssl rand -hex 32`); every ingestor that should accept a token needs
    /// the same one. Unset: a random key made at
    /// start, so tokens last until a restart and only the process that issued them accepts
    /// them. Changing it revokes every token issued.
    #[serde(default)]
    pub secret: Option<String>,
}

/// Never prints the secret (configs are logged and shown in errors).
impl std::fmt::Debug for PortalConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PortalConfig")
            .field("secret", &self.secret.as_ref().map(|_| "(set)"))
            .finish()
    }
}

/// How the HTTP API reads requests before their handlers run, and where `/metrics` is served.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Longest a request body may take to arrive whole, from the end of its headers; a slower
    /// one is answered 408 and its connection closed. Only an authenticated request's body is
    /// read at all.
    #[serde(default = "default_body_timeout_ms")]
    pub body_timeout_ms: u64,
    /// Largest body of the routes that take a small one (credit grants, authorizations and
    /// their release, portal tokens); ingest's is `ingest.max_body_bytes`.
    #[serde(default = "default_max_small_body_bytes")]
    pub max_small_body_bytes: usize,
    /// Serve `/metrics` on this address only (`127.0.0.1:9464`), not on `listen`. Unset:
    /// `/metrics` is on `listen`, open to whoever reaches it.
    #[serde(default)]
    pub metrics_listen: Option<String>,
}

/// The rate limit of a key with no `rate_limit` of its own, and of every portal token: token
/// buckets, shared through the guard state by every ingestor. Past one a request is answered
/// 429 with Retry-After.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitsConfig {
    /// Sustained requests per second of each API key without a `rate_limit`.
    #[serde(default = "default_key_requests_per_second")]
    pub key_requests_per_second: f64,
    /// Requests each such key may make at once after a quiet spell.
    #[serde(default = "default_key_burst")]
    pub key_burst: u32,
    /// Sustained requests per second of each customer's portal tokens (one bucket per tenant
    /// and customer, however many tokens it holds).
    #[serde(default = "default_portal_requests_per_second")]
    pub portal_requests_per_second: f64,
    /// Requests a customer's portal tokens may make at once after a quiet spell.
    #[serde(default = "default_portal_burst")]
    pub portal_burst: u32,
}

/// How the aggregator batches its inserts and watches its partitions.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregatorConfig {
    /// Most messages in one poll of the events topic (a block, one insert, holds at most
    /// 4,096 offsets of one partition).
    #[serde(default = "default_max_batch_rows")]
    pub max_batch_rows: usize,
    /// Longest a poll waits for more messages after its first.
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

fn default_body_timeout_ms() -> u64 {
    10_000
}
fn default_max_small_body_bytes() -> usize {
    16 * 1024
}
fn default_key_requests_per_second() -> f64 {
    1000.0
}
fn default_key_burst() -> u32 {
    2000
}
fn default_portal_requests_per_second() -> f64 {
    10.0
}
fn default_portal_burst() -> u32 {
    100
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
fn default_reservation_seconds() -> u64 {
    300
}
fn default_charged_keys_hours() -> u64 {
    24
}
fn default_rebuild_wait_ms() -> u64 {
    10_000
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
