//! The `mcp-meter` binary's wiring: the only place that picks adapters for the ports.
//!
//! - [`load_config`]: file, environment and flags into one validated `Config`.
//! - [`demo`]: the tenant `serve` runs when no config file is given.
//! - [`Embedded`]: `serve`, everything in one process: the HTTP API, group commit into the store.
//! - [`Ingestor`], [`run_aggregator`]: the two processes of the distributed mode.
//! - [`migrate_clickhouse`], [`migrate_kafka`]: `mcp-meter migrate`.
//! - [`retention_store`]: where `mcp-meter retention` and the schedules drop expired data.
//! - [`loadgen`]: `mcp-meter loadgen`, the load generator the benchmarks use.

pub mod loadgen;

use anyhow::Context;
use backends::backlog::{Backlog, BusBacklog};
use backends::kafka;
use backends::sink::EventSink;
use backends::state::memory::MemoryState;
use backends::state::redis::RedisState;
use backends::state::{MarginBoard, StateBackend, StatePorts};
use backends::store::clickhouse::ClickHouseRetention;
use backends::store::clickhouse::{
    self, migrations, ClickHouseAnalytics, ClickHouseLedger, ClickHouseWriter, HttpRunner,
};
use backends::store::{sqlite, AnalyticsStore, CreditLedger, Retention};
use schemas::config::{ApiKeyConfig, Config, Scope, StoreKind, TenantConfig};
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Command-line values that override the file and the environment table.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
}

/// Reads the config file (if any), applies `MCP_METER_*` overrides and then the flags, and
/// validates the result, reporting every problem at once.
pub fn load_config(
    file: Option<&Path>,
    env: impl Fn(&str) -> Option<String>,
    flags: &Overrides,
) -> anyhow::Result<Config> {
    let text = match file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the config file {}", path.display()))?;
            Config::from_toml(&text)
                .map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))?;
            text
        }
        None => String::new(),
    };
    let mut config = Config::from_toml_and_env(&text, env)?;
    if let Some(listen) = &flags.listen {
        config.listen = listen.clone();
    }
    if let Some(dir) = &flags.data_dir {
        config.data_dir = dir.clone();
    }
    config.validate()?;
    Ok(config)
}

/// The demo tenant of a `serve` started without a config file.
pub mod demo {
    use super::*;

    pub const TENANT: &str = "demo";

    /// Adds tenant `demo` with one admin key and the demo rate plan. The key is printed at
    /// start, so the demo refuses to listen beyond loopback.
    pub fn add_tenant(config: &mut Config, key: &str) -> anyhow::Result<()> {
        let addrs = schemas::config::listen_addresses(&config.listen)
            .map_err(|e| anyhow::anyhow!("listen {e}"))?;
        anyhow::ensure!(
            addrs.iter().all(|a| a.ip().is_loopback()),
            "without --config, serve runs a demo tenant whose key is printed on the console, so it \
             only listens on loopback; got {}. Pass --config with your tenants and keys to listen there",
            config.listen
        );
        config.tenants.push(TenantConfig {
            id: TENANT.into(),
            api_keys: vec![ApiKeyConfig {
                name: "demo".into(),
                sha256: sha256_hex(key),
                scopes: vec![Scope::Admin],
                rate_limit: None,
            }],
            rate_plans: vec![schemas::rating::demo_rate_plan()],
            limits: Vec::new(),
            customer_caps: Vec::new(),
            max_in_flight_per_customer: None,
            prepaid_only: false,
            max_tool_names: 1000,
            margin_guard: Default::default(),
        });
        config.validate()?;
        Ok(())
    }
}

/// A new random API key: `mcpm_` and 64 hex digits (256 bits).
pub fn new_api_key() -> anyhow::Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no randomness for a key: {e}"))?;
    Ok(format!("mcpm_{}", hex(&bytes)))
}

pub fn sha256_hex(key: &str) -> String {
    hex(&Sha256::digest(key.as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `mcp-meter migrate`: creates the ClickHouse database and applies every migration not yet
/// applied. Returns one line per migration file.
pub async fn migrate_clickhouse(config: &Config) -> anyhow::Result<Vec<String>> {
    // A migration may copy a whole table (0009 on ClickHouse 18.16): give statements an hour.
    let ch = &schemas::config::ClickHouseConfig {
        request_timeout_ms: config.clickhouse.request_timeout_ms.max(3_600_000),
        ..config.clickhouse.clone()
    };
    let outcomes = migrations::migrate(&HttpRunner::server(ch), &HttpRunner::new(ch), &ch.database)
        .await
        .with_context(|| {
            format!(
                "migrating ClickHouse database `{}` at {}",
                ch.database, ch.url
            )
        })?;
    let mut lines: Vec<String> = outcomes
        .into_iter()
        .map(|(m, outcome)| {
            let what = match outcome {
                migrations::Outcome::Applied => "applied",
                migrations::Outcome::AlreadyApplied => "already applied",
            };
            format!("{} {what}", m.name)
        })
        .collect();
    let topic = &config.kafka.events_topic;
    let kept = migrations::keep_untagged_offsets(&HttpRunner::new(ch), topic)
        .await
        .context("keeping the stored offsets of the events topic")?;
    if kept > 0 {
        lines.push(format!(
            "offsets of {kept} partition(s) recorded before offsets were per topic kept as topic {topic}'s"
        ));
    }
    Ok(lines)
}

/// `mcp-meter migrate`, Kafka side: creates the events and dead-letter topics. Returns one line
/// per topic.
pub async fn migrate_kafka(config: &Config) -> anyhow::Result<Vec<String>> {
    let k = &config.kafka;
    let outcomes = kafka::create_topics(k).await.with_context(|| {
        format!(
            "creating Kafka topics at {}",
            k.brokers.as_deref().unwrap_or("?")
        )
    })?;
    Ok(outcomes
        .into_iter()
        .map(|(topic, outcome)| {
            let what = match outcome {
                kafka::TopicOutcome::Created => "created",
                kafka::TopicOutcome::AlreadyExisted => "already existed",
            };
            format!("{topic} {what} ({} partitions)", k.partitions)
        })
        .collect())
}

/// Retention over the store of kind `store`: the SQLite file in `data_dir`, or the configured
/// ClickHouse database (which must be migrated).
pub async fn retention_store(
    config: &Config,
    store: StoreKind,
) -> anyhow::Result<Arc<dyn Retention>> {
    Ok(match store {
        StoreKind::Sqlite => {
            let path = config.data_dir.join(sqlite::DB_FILE);
            anyhow::ensure!(
                path.exists(),
                "no embedded store at {}: give the data directory `serve` uses (--data-dir)",
                path.display()
            );
            Arc::new(sqlite::retention(&config.data_dir))
        }
        StoreKind::Clickhouse => {
            let runner = HttpRunner::new(&config.clickhouse);
            clickhouse::check_ready(&runner, &config.clickhouse).await?;
            Arc::new(ClickHouseRetention::new(runner))
        }
    })
}

/// Binds the HTTP API over the given ports.
fn http_api(
    config: &Config,
    sink: Arc<dyn EventSink>,
    analytics: Arc<dyn AnalyticsStore>,
    ledger: Arc<dyn CreditLedger>,
    backlog: Option<Arc<dyn Backlog>>,
    state: StatePorts,
    metric_families: Vec<fn(&mut String)>,
) -> anyhow::Result<(actix_web::dev::Server, SocketAddr)> {
    let state = actix_web::web::Data::new(ingestor::state::AppState {
        keys: ingestor::auth::Keyring::new(
            &config.tenants,
            ingestor::portal::PortalSigner::new(config.portal.secret.as_deref()),
            &config.rate_limits,
        ),
        sink,
        analytics,
        limits: state.limits,
        margins: state.margins,
        rate_limiter: state.rate_limiter,
        rate_limits_skipped_until: Default::default(),
        balances: state.balances,
        ledger,
        backlog,
        stale_ledgers: Default::default(),
        rebuilds: Default::default(),
        rebuild_failures: Default::default(),
        credits: config.credits.clone(),
        guard_recompute_seconds: config.margin_guard.interval_seconds,
        in_flight: tokio::sync::Semaphore::new(config.ingest.max_in_flight_requests),
        ingest: config.ingest.clone(),
        http: config.http.clone(),
        metrics_addrs: Default::default(),
        metric_families,
    });
    let app_state = state.clone();
    // Only a process with a metrics listener tells its requests apart by address.
    let metrics_listener = config.http.metrics_listen.is_some();
    let mut server = actix_web::HttpServer::new(move || {
        // The last wrapped runs first: bodies are held before anything else, and every
        // answer (a metrics listener's 404 included) is recorded and gets its headers.
        actix_web::App::new()
            .wrap(actix_web::middleware::Condition::new(
                metrics_listener,
                actix_web::middleware::from_fn(ingestor::ops::split_metrics_listener),
            ))
            .wrap(actix_web::middleware::from_fn(
                ingestor::ops::security_headers,
            ))
            .wrap(actix_web::middleware::from_fn(
                ingestor::ops::record_request,
            ))
            .wrap(actix_web::middleware::from_fn(
                ingestor::body::hold_unread_body,
            ))
            .configure(ingestor::routes(state.clone()))
    })
    .bind(&config.listen)
    .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = *server.addrs().first().context("bound to no address")?;
    let api_addrs = server.addrs().len();
    if let Some(metrics) = &config.http.metrics_listen {
        server = server
            .bind(metrics)
            .with_context(|| format!("cannot listen on http.metrics_listen {metrics}"))?;
        let metrics_addrs = server.addrs()[api_addrs..].to_vec();
        for a in &metrics_addrs {
            tracing::info!(
                "/metrics on http://{a} (http.metrics_listen), not on the API's address"
            );
        }
        app_state
            .metrics_addrs
            .set(metrics_addrs)
            .expect("set once, before the server runs");
    }
    Ok((server.run(), addr))
}

/// The Redis guard state. Redis being down does not stop a process from starting: ingest goes
/// on without it and `/readyz` says so, as it would if Redis went down later.
async fn redis_state(config: &Config, url: &str) -> anyhow::Result<RedisState> {
    let state = RedisState::new(
        url,
        &config.redis.key_prefix,
        Duration::from_millis(config.redis.request_timeout_ms),
    )
    .with_context(|| format!("redis.url `{url}`"))?;
    if let Err(e) = state.ping().await {
        tracing::warn!(error = %e, url, "Redis is unreachable; starting anyway, limits and the guard check fail open until it is back");
    }
    Ok(state)
}

/// The margin guard over `analytics` into `state`, if the config enables it.
fn margin_guard(
    config: &Config,
    analytics: Arc<dyn AnalyticsStore>,
    state: Arc<dyn MarginBoard>,
) -> Option<aggregator::margin_guard::MarginGuard> {
    let g = &config.margin_guard;
    if !g.enabled {
        return None;
    }
    let tenants = config
        .tenants
        .iter()
        .map(|t| {
            let thresholds = t
                .margin_guard
                .thresholds()
                .expect("thresholds checked by Config::validate");
            (t.id.clone(), thresholds)
        })
        .collect();
    let guard_config = aggregator::margin_guard::GuardConfig {
        interval: Duration::from_secs(g.interval_seconds),
        window_days: g.window_days,
        tenants,
    };
    Some(aggregator::margin_guard::MarginGuard::new(
        analytics,
        state,
        guard_config,
    ))
}

/// `mcp-meter ingestor`: the HTTP API, publishing to Kafka and reading analytics from ClickHouse.
pub struct Ingestor {
    server: actix_web::dev::Server,
    pub addr: SocketAddr,
}

impl Ingestor {
    /// Checks ClickHouse, connects the producer and binds the API. Call inside an actix runtime.
    pub async fn start(config: &Config) -> anyhow::Result<Ingestor> {
        let ch = &config.clickhouse;
        let runner = HttpRunner::new(ch);
        clickhouse::check_ready(&runner, ch).await?;
        // A broker that is down does not stop the ingestor from starting: it answers 503 with
        // Retry-After until the broker is back, and /readyz names it. Say so now, not at the
        // first event.
        if let Err(e) = kafka::check_brokers(&config.kafka).await {
            tracing::warn!(error = %e, "starting anyway: ingest answers 503 until a broker answers");
        }
        let sink: Arc<dyn EventSink> = Arc::new(kafka::KafkaSink::new(&config.kafka)?);
        let analytics: Arc<dyn AnalyticsStore> = Arc::new(ClickHouseAnalytics::new(runner.clone()));
        let ledger: Arc<dyn CreditLedger> = Arc::new(ClickHouseLedger::new(runner.clone()));
        let backlog: Arc<dyn Backlog> = Arc::new(BusBacklog::new(
            Arc::new(kafka::KafkaProbe::new(&config.kafka)?),
            Arc::new(ClickHouseWriter::for_topic(
                runner,
                &config.kafka.events_topic,
            )),
        ));
        let state = match &config.redis.url {
            Some(url) => StatePorts::of(Arc::new(redis_state(config, url).await?)),
            None => {
                anyhow::ensure!(
                    config.tenants.iter().all(|t| t.limits.is_empty()
                        && t.customer_caps.is_empty()
                        && t.max_in_flight_per_customer.is_none()),
                    "hard limits, customer caps and in-flight limits need the shared guard state: set redis.url (MCP_METER_REDIS_URL)"
                );
                StatePorts::of(Arc::new(MemoryState::new()))
            }
        };
        let families: Vec<fn(&mut String)> = vec![|out| backends::metrics::KAFKA.render(out)];
        let (server, addr) = http_api(
            config,
            sink,
            analytics,
            ledger,
            Some(backlog),
            state,
            families,
        )?;
        Ok(Ingestor { server, addr })
    }

    /// Serves until SIGINT or SIGTERM; in-flight requests finish first.
    pub async fn run(self) -> anyhow::Result<()> {
        self.server.await.context("the HTTP server failed")
    }

    pub fn handle(&self) -> actix_web::dev::ServerHandle {
        self.server.handle()
    }
}

/// `mcp-meter aggregator`: consumes the events topic into ClickHouse until `shutdown`.
pub async fn run_aggregator(
    config: &Config,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<aggregator::consumer::Progress> {
    let ch = &config.clickhouse;
    let runner = HttpRunner::new(ch);
    clickhouse::check_ready(&runner, ch).await?;
    if let Err(e) = kafka::check_brokers(&config.kafka).await {
        tracing::warn!(error = %e, "starting anyway: events are consumed once a broker answers");
    }
    let mut source = kafka::KafkaSource::new(&config.kafka)?;
    let mut writer = ClickHouseWriter::for_topic(runner.clone(), &config.kafka.events_topic);
    // The margin guard writes where ingestors read: Redis. Without it there is no one to tell.
    match &config.redis.url {
        Some(url) => {
            let state = Arc::new(redis_state(config, url).await?);
            let analytics = Arc::new(ClickHouseAnalytics::new(runner));
            if let Some(guard) = margin_guard(config, analytics, state) {
                tokio::spawn(guard.run(shutdown.clone()));
            }
        }
        None if config.margin_guard.enabled => {
            tracing::info!("margin guard off: it needs redis.url to share levels with ingestors");
        }
        None => {}
    }
    let retention = aggregator::retention::RetentionSchedule::new(
        Arc::new(ClickHouseRetention::new(HttpRunner::new(ch))),
        config.retention.clone(),
    );
    tokio::spawn(retention.run(shutdown.clone()));
    let a = &config.aggregator;
    let status = Arc::new(aggregator::lag::ConsumerStatus::default());
    let (monitor, lag) = aggregator::lag::LagMonitor::new(
        kafka::KafkaProbe::new(&config.kafka)?,
        ClickHouseWriter::for_topic(HttpRunner::new(ch), &config.kafka.events_topic),
        status.clone(),
        aggregator::lag::LagConfig {
            interval: Duration::from_millis(a.lag_check_interval_ms),
            stall_timeout: Duration::from_millis(a.stall_timeout_ms),
            store: format!("ClickHouse at {} (clickhouse.url)", ch.url),
        },
    );
    tokio::spawn(monitor.run(shutdown.clone()));
    let ops = actix_web::HttpServer::new(move || {
        actix_web::App::new()
            .app_data(actix_web::web::Data::new(lag.clone()))
            .route("/metrics", actix_web::web::get().to(aggregator_metrics))
            .route("/healthz", actix_web::web::get().to(aggregator_health))
            .route("/readyz", actix_web::web::get().to(aggregator_readiness))
    })
    .workers(1)
    .disable_signals()
    .bind(&a.listen)
    .with_context(|| format!("aggregator.listen: cannot listen on {}", a.listen))?
    .run();
    let ops_handle = ops.handle();
    actix_web::rt::spawn(ops);
    let consumer = aggregator::consumer::ConsumerConfig {
        max_batch_rows: a.max_batch_rows,
        max_batch_wait: std::time::Duration::from_millis(a.max_batch_wait_ms),
        max_retry_backoff: std::time::Duration::from_millis(a.max_retry_backoff_ms),
        give_up_after: std::time::Duration::from_millis(config.kafka.max_poll_interval_ms * 8 / 10),
    };
    let progress =
        aggregator::consumer::run(&mut source, &mut writer, &consumer, &status, shutdown).await;
    ops_handle.stop(true).await;
    Ok(progress?)
}

/// The aggregator's `/metrics`: the process's families and the lag monitor's.
async fn aggregator_metrics(
    lag: actix_web::web::Data<aggregator::lag::LagView>,
) -> actix_web::HttpResponse {
    let mut out = String::with_capacity(8 * 1024);
    aggregator::metrics::METRICS.render_consumer(&mut out);
    aggregator::metrics::METRICS.render_margin_guard(&mut out);
    backends::metrics::KAFKA.render_rebuilds(&mut out);
    lag.render_metrics(&mut out);
    actix_web::HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(out)
}

/// The aggregator's `/healthz`: the last lag check; 503 while a partition is stalled or the
/// broker or ClickHouse has been out of reach for the stall timeout.
async fn aggregator_health(
    lag: actix_web::web::Data<aggregator::lag::LagView>,
) -> actix_web::HttpResponse {
    let report = lag.report();
    ingestor::ops::probe_answer(report.is_healthy(), report)
}

/// The aggregator's `/readyz`: whether the last lag check read both the broker and ClickHouse;
/// 503 naming the one it could not read (or that no check has run yet).
async fn aggregator_readiness(
    lag: actix_web::web::Data<aggregator::lag::LagView>,
) -> actix_web::HttpResponse {
    let report = lag.report();
    let ready = report.is_ready();
    ingestor::ops::probe_answer(
        ready,
        serde_json::json!({
            "status": if ready { "ready" } else { "unavailable" },
            "measuredAt": report.measured_at,
            "error": report.error,
        }),
    )
}

/// `serve`: the whole pipeline in one process.
pub struct Embedded {
    server: actix_web::dev::Server,
    /// Where the API listens (the port is real even when the config asked for port 0).
    pub addr: SocketAddr,
    /// Where events are kept, for people: a file path or a ClickHouse URL and database.
    pub store: String,
    writer: std::thread::JoinHandle<()>,
    stop_guard: tokio::sync::watch::Sender<bool>,
}

/// What `serve` reads and maintains its store through, besides the writer.
struct StoreReaders {
    analytics: Arc<dyn AnalyticsStore>,
    ledger: Arc<dyn CreditLedger>,
    retention: Arc<dyn Retention>,
}

impl Embedded {
    /// Opens the store, starts the group-commit writer and binds the API. Call inside an actix
    /// runtime; [`Embedded::run`] then serves until SIGINT or SIGTERM.
    pub async fn start(config: &Config) -> anyhow::Result<Embedded> {
        let group = aggregator::group_commit::GroupCommitConfig {
            max_commit_events: config.sqlite.max_commit_events,
            queue_capacity_batches: config.sqlite.queue_capacity_batches,
        };
        let (sink, writer, readers, store) = match config.store {
            StoreKind::Sqlite => {
                let (writer, analytics) = sqlite::open(&config.data_dir, &config.sqlite)
                    .with_context(|| {
                        format!("cannot open the store in {}", config.data_dir.display())
                    })?;
                let (sink, handle) = aggregator::group_commit::GroupCommit::start(writer, group)
                    .context("cannot start the store writer")?;
                let path = config.data_dir.join(sqlite::DB_FILE);
                let readers = StoreReaders {
                    analytics: Arc::new(analytics),
                    ledger: Arc::new(sqlite::ledger(&config.data_dir)),
                    retention: Arc::new(sqlite::retention(&config.data_dir)),
                };
                (sink, handle, readers, path.display().to_string())
            }
            StoreKind::Clickhouse => {
                let ch = &config.clickhouse;
                let runner = HttpRunner::new(ch);
                clickhouse::check_ready(&runner, ch).await?;
                let (sink, handle) = aggregator::group_commit::GroupCommit::start(
                    ClickHouseWriter::new(runner.clone()),
                    group,
                )
                .context("cannot start the store writer")?;
                let name = format!("ClickHouse {} database {}", ch.url, ch.database);
                let readers = StoreReaders {
                    analytics: Arc::new(ClickHouseAnalytics::new(runner.clone())),
                    ledger: Arc::new(ClickHouseLedger::new(runner.clone())),
                    retention: Arc::new(ClickHouseRetention::new(runner)),
                };
                (sink, handle, readers, name)
            }
        };
        let StoreReaders {
            analytics,
            ledger,
            retention,
        } = readers;
        let state = StatePorts::of(Arc::new(MemoryState::new()));
        let (stop_guard, guard_shutdown) = tokio::sync::watch::channel(false);
        if let Some(guard) = margin_guard(config, analytics.clone(), state.margins.clone()) {
            actix_web::rt::spawn(guard.run(guard_shutdown.clone()));
        }
        let retention =
            aggregator::retention::RetentionSchedule::new(retention, config.retention.clone());
        actix_web::rt::spawn(retention.run(guard_shutdown));
        let families: Vec<fn(&mut String)> = vec![
            |out| aggregator::metrics::METRICS.render_group_commit(out),
            |out| aggregator::metrics::METRICS.render_margin_guard(out),
        ];
        let (server, addr) = http_api(
            config,
            Arc::new(sink),
            analytics,
            ledger,
            None,
            state,
            families,
        )?;
        Ok(Embedded {
            server,
            addr,
            store,
            writer,
            stop_guard,
        })
    }

    /// Serves until a signal stops the server, then lets the writer commit what is queued.
    pub async fn run(self) -> anyhow::Result<()> {
        self.server.await.context("the HTTP server failed")?;
        let _ = self.stop_guard.send(true);
        // The server has dropped its app state, and with it the last sender into the writer's
        // queue: the writer commits what is still queued, answers it, and ends.
        tokio::task::spawn_blocking(move || self.writer.join())
            .await
            .context("waiting for the store writer")?
            .map_err(|_| anyhow::anyhow!("the store writer panicked"))?;
        Ok(())
    }

    pub fn handle(&self) -> actix_web::dev::ServerHandle {
        self.server.handle()
    }
}
