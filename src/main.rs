//! `mcp-meter`: usage metering for paid MCP servers.

use anyhow::Context;
use clap::{Parser, Subcommand};
use mcp_meter::{
    demo, load_config, migrate_clickhouse, migrate_kafka, new_api_key, retention_store,
    run_aggregator, sha256_hex, Embedded, Ingestor, Overrides,
};
use schemas::config::{env_overrides, Config, Scope, StoreKind};
use std::io::Write;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "mcp-meter",
    version,
    about = "Usage metering for paid MCP servers"
)]
struct Cli {
    /// Log lines as text for people, or as JSON objects for a log pipeline.
    #[arg(
        long,
        global = true,
        env = "MCP_METER_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run everything in one process: the HTTP API, rating, and the embedded SQLite store.
    #[command(after_long_help = env_help(
        &["MCP_METER_LISTEN", "MCP_METER_DATA_DIR", "MCP_METER_CONFIG", "MCP_METER_DEMO_KEY"],
        SERVE_READS,
    ))]
    Serve {
        /// Address to listen on, host:port (127.0.0.1:8080, localhost:8080; the file's
        /// `listen`).
        #[arg(long, env = "MCP_METER_LISTEN")]
        listen: Option<String>,
        /// Directory for the embedded store (the file's `data_dir`; default ./data).
        #[arg(long, env = "MCP_METER_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// TOML config file with tenants, keys (each with its scopes: ingest, read, export, or
        /// admin, which holds the other three) and rate plans. Without one, `serve` runs a demo
        /// tenant `demo` on loopback only.
        #[arg(long, env = "MCP_METER_CONFIG")]
        config: Option<PathBuf>,
        /// The demo tenant's API key (without --config), of scope `admin`, which holds every
        /// other scope (ingest, read, export). Default: a new random key, printed.
        #[arg(long, env = "MCP_METER_DEMO_KEY", hide_env_values = true)]
        demo_key: Option<String>,
    },
    /// The distributed mode's HTTP API: authenticate, rate, publish to Kafka, answer once the
    /// events are acknowledged; analytics from ClickHouse. Run any number of them.
    #[command(after_long_help = env_help(&["MCP_METER_LISTEN", "MCP_METER_CONFIG"], INGESTOR_READS))]
    Ingestor {
        /// Address the API listens on, host:port (the file's `listen`; default 127.0.0.1:8080).
        #[arg(long, env = "MCP_METER_LISTEN")]
        listen: Option<String>,
        /// TOML config file with tenants, `[kafka]` and `[clickhouse]`.
        #[arg(long, env = "MCP_METER_CONFIG")]
        config: PathBuf,
    },
    /// The distributed mode's writer: consume the events topic into ClickHouse exactly once.
    /// Run up to one per partition; SIGTERM finishes the batch in hand, then exits.
    #[command(after_long_help = env_help(&["MCP_METER_CONFIG"], AGGREGATOR_READS))]
    Aggregator {
        /// TOML config file with `[kafka]`, `[clickhouse]` and `[aggregator]`.
        #[arg(long, env = "MCP_METER_CONFIG")]
        config: PathBuf,
    },
    /// Create the ClickHouse database and apply every migration not yet applied; with
    /// `kafka.brokers` set, create the Kafka topics too. Safe to run again, and from several
    /// processes at once.
    #[command(after_long_help = env_help(&["MCP_METER_CONFIG"], &["clickhouse", "kafka"]))]
    Migrate {
        /// TOML config file (`[clickhouse]`, `[kafka]`); environment overrides apply.
        #[arg(long, env = "MCP_METER_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Drop dedup keys and raw events past `[retention]` now (`serve` and `aggregator` also do
    /// it every `retention.interval_seconds`); rollups are kept. `--dry-run` only lists what
    /// would go.
    #[command(after_long_help = env_help(
        &["MCP_METER_CONFIG", "MCP_METER_DATA_DIR"],
        &["store", "retention", "clickhouse", "ingest"],
    ))]
    Retention {
        /// TOML config file (`[retention]`, `[clickhouse]`); environment overrides apply.
        #[arg(long, env = "MCP_METER_CONFIG")]
        config: Option<PathBuf>,
        /// The embedded store's directory (the file's `data_dir`; default ./data).
        #[arg(long, env = "MCP_METER_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// Which store: `sqlite` (what `serve` uses by default) or `clickhouse` (the distributed
        /// mode's). Default: the file's `store`.
        #[arg(long, value_parser = ["sqlite", "clickhouse"])]
        store: Option<String>,
        /// List what would be dropped, and drop nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Print the OpenAPI document of the HTTP API (what `GET /openapi.json` serves);
    /// `mcp-meter openapi > openapi/openapi.json` updates the checked-in copy.
    Openapi,
    /// Push seeded, realistic usage events at an ingest API (or as JSONEachRow straight into a
    /// ClickHouse table, the baseline) and report events/s, requests/s, latency and statuses.
    Loadgen(mcp_meter::loadgen::LoadgenArgs),
    /// Meter an MCP server whose code you cannot change: stand in front of it, report every
    /// `tools/call` to mcp-meter, and refuse killed sessions, blocked tools and unpaid calls
    /// before they reach it. `--stdio -- COMMAND ARGS…` runs a stdio server as a child (what an
    /// MCP client's config launches).
    #[command(after_long_help = env_help(
        &[
            "MCP_METER_PROXY_LISTEN",
            "MCP_METER_PROXY_METER_URL",
            "MCP_METER_PROXY_API_KEY",
            "MCP_METER_PROXY_CUSTOMER",
            "MCP_METER_PROXY_TENANT",
        ],
        &[],
    ))]
    Proxy(ProxyArgs),
    /// Manage API keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
}

#[derive(clap::Args)]
struct ProxyArgs {
    /// Relay a stdio MCP server: start COMMAND as a child and pass the client's stdin and stdout
    /// through it, line by line.
    #[arg(
        long,
        conflicts_with = "upstream",
        required_unless_present = "upstream"
    )]
    stdio: bool,
    /// Reverse-proxy this Streamable HTTP MCP endpoint (http://HOST:PORT/mcp); the proxy
    /// serves MCP on the same path at --listen.
    #[arg(long, value_name = "URL")]
    upstream: Option<String>,
    /// Where the HTTP proxy listens (host:port), with its /healthz and /metrics beside MCP.
    #[arg(long, env = "MCP_METER_PROXY_LISTEN", default_value = "127.0.0.1:8090")]
    listen: String,
    /// The request header naming each request's payer (HTTP mode); else --customer. It holds a
    /// customer token (mcpp_…) signed with MCP_METER_PROXY_CUSTOMER_SECRET for --tenant: one
    /// a gateway signed, or a portal token when the secret is the server's portal.secret. A
    /// forged, altered or expired token is refused (403), nothing forwarded. The header is the
    /// proxy's: the upstream never sees it.
    #[arg(long, value_name = "HEADER")]
    customer_header: Option<String>,
    /// The tenant customer tokens must name (the tenant of the proxy's API key).
    #[arg(long, env = "MCP_METER_PROXY_TENANT")]
    tenant: Option<String>,
    /// Take --customer-header's value as the customer, unsigned. Only where a gateway you run
    /// sets the header on every request and clients cannot: else any client bills any wallet.
    #[arg(long, requires = "customer_header")]
    trust_customer_header: bool,
    /// The request header naming the agent (HTTP mode); else the client's clientInfo name
    /// (from `initialize`, or each request's `_meta` in MCP 2026-07-28).
    #[arg(long, value_name = "HEADER")]
    agent_header: Option<String>,
    /// The request header naming the session (a gateway's session or conversation id); where a
    /// request has it, it comes before Mcp-Session-Id. Without it, the server's Mcp-Session-Id,
    /// else each client connection is a session (MCP 2026-07-28, stateless servers).
    #[arg(long, value_name = "HEADER")]
    session_header: Option<String>,
    /// A call unanswered this long after its round was forwarded (or an input round the client
    /// never came back to) is reported as TIMEOUT.
    #[arg(long, default_value_t = 600_000)]
    call_timeout_ms: u64,
    /// The mcp-meter (`serve` or an `ingestor`) events go to, e.g. http://127.0.0.1:8080.
    #[arg(long, env = "MCP_METER_PROXY_METER_URL")]
    meter_url: String,
    /// An API key with the `ingest` scope. Prefer the environment variable: a flag is visible
    /// to every process of the machine. The stdio child never sees MCP_METER_PROXY_* variables.
    #[arg(long, env = "MCP_METER_PROXY_API_KEY", hide_env_values = true)]
    api_key: String,
    /// The customer (payer) every call is reported for and authorized against.
    #[arg(long, env = "MCP_METER_PROXY_CUSTOMER")]
    customer: Option<String>,
    /// A tool authorized (`POST /v1/authorize`) before it is forwarded; repeat for each.
    #[arg(long = "paid-tool", value_name = "TOOL")]
    paid_tools: Vec<String>,
    /// Ask `GET /v1/guard/check` before each call: block refuses, throttle delays.
    #[arg(long)]
    guard: bool,
    /// Longest wait for a guard check; then the call goes on (fail open, counted).
    #[arg(long, default_value_t = 50)]
    guard_timeout_ms: u64,
    /// Longest delay a `throttle` answer causes.
    #[arg(long, default_value_t = 5000)]
    max_throttle_ms: u64,
    /// Events per batch sent to mcp-meter (at most 1000).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=1000))]
    max_batch_events: u64,
    /// A batch goes out at least this often.
    #[arg(long, default_value_t = 1000)]
    flush_interval_ms: u64,
    /// Events held while mcp-meter is unreachable; beyond, the oldest is dropped (counted).
    #[arg(long, default_value_t = 10_000)]
    max_queue_events: usize,
    /// After the server exits, the longest wait for queued events to be delivered.
    #[arg(long, default_value_t = 10_000)]
    close_wait_ms: u64,
    /// Serve the proxy's /healthz and /metrics here (host:port); stdout belongs to the protocol.
    #[arg(long)]
    metrics_listen: Option<String>,
    /// The largest request body (HTTP) or line (stdio) a client may send; larger ones are
    /// refused unforwarded.
    #[arg(long, default_value_t = 4 << 20)]
    max_body_bytes: usize,
    /// The longest a client may take to send a request's headers, and then its body (HTTP).
    #[arg(long, default_value_t = 30_000)]
    read_timeout_ms: u64,
    /// Client connections served at once (HTTP); more wait to be accepted.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..))]
    max_connections: u64,
    /// The largest answer (an SSE event, a JSON body, a stdio line) read for its results; a
    /// larger one reaches the client unread and its calls end as unanswered (ERROR).
    #[arg(long, default_value_t = 16 << 20)]
    max_answer_bytes: usize,
    /// The stdio server's command and its arguments, after `--`.
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<String>,
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Print a new random API key, its SHA-256, and the `[[tenants.api_keys]]` block to put in
    /// the config file.
    New {
        /// What the key may do, comma-separated: `ingest` (events, heartbeats, the guard check,
        /// authorize and release), `read` (analytics, balances, margin levels, the dashboard),
        /// `export` (billing exports), `admin` (credit grants, portal tokens, and every other
        /// scope: an admin key can call everything).
        #[arg(
            long,
            value_delimiter = ',',
            value_parser = parse_scope,
            default_value = "ingest"
        )]
        scopes: Vec<Scope>,
        /// The key's label for people (`sdk-prod`, `finance-export`); clients never send it.
        #[arg(long, default_value = "new-key", value_parser = parse_key_name)]
        name: String,
    },
}

/// Every scope, in the order the help lists them.
const SCOPES: [Scope; 4] = [Scope::Ingest, Scope::Read, Scope::Export, Scope::Admin];

fn parse_scope(name: &str) -> Result<Scope, String> {
    SCOPES
        .into_iter()
        .find(|s| s.as_str() == name.trim())
        .ok_or_else(|| {
            let names: Vec<&str> = SCOPES.iter().map(|s| s.as_str()).collect();
            format!("`{name}` is not a scope; give {}", names.join(", "))
        })
}

/// A label that fits in a TOML string as it is printed: no quote, backslash or control
/// character.
fn parse_key_name(name: &str) -> Result<String, String> {
    if name.is_empty()
        || name
            .chars()
            .any(|c| c == '"' || c == '\\' || c.is_control())
    {
        return Err("give a label without quotes, backslashes or control characters".into());
    }
    Ok(name.to_string())
}

/// The environment a subcommand reads: the variables of its own flags (`flag_vars`), the log
/// settings, and the overrides of the config sections it uses (`sections`: `kafka`, `store`, …).
fn env_help(flag_vars: &[&str], sections: &[&str]) -> String {
    let mut help = String::from(if sections.is_empty() {
        "Environment (flags override it):\n"
    } else {
        "Environment (each overrides the config file; flags override both):\n"
    });
    if !flag_vars.is_empty() {
        help.push_str(&format!("  {}  (the flags above)\n", flag_vars.join(", ")));
    }
    help.push_str(
        "  MCP_METER_LOG  log filter, e.g. info or mcp_meter=debug (default info)\n  \
         MCP_METER_LOG_FORMAT  text or json (--log-format)\n",
    );
    for o in env_overrides() {
        if sections.contains(&o.section) {
            help.push_str(&format!("  {:<42} {}\n", o.var, o.setting));
        }
    }
    help
}

/// What `serve` reads: its store, the embedded writer, retention, ingest, the guard, credits,
/// the portal, how requests are read and rate-limited.
const SERVE_READS: &[&str] = &[
    "store",
    "clickhouse",
    "sqlite",
    "retention",
    "ingest",
    "margin_guard",
    "credits",
    "portal",
    "http",
    "rate_limits",
];
/// What an `ingestor` reads: where it publishes, reads analytics, and shares guard state.
const INGESTOR_READS: &[&str] = &[
    "clickhouse",
    "kafka",
    "redis",
    "ingest",
    "margin_guard",
    "credits",
    "portal",
    "http",
    "rate_limits",
];
/// What an `aggregator` reads: the topic, the store, the guard it runs, retention, itself.
const AGGREGATOR_READS: &[&str] = &[
    "clickhouse",
    "kafka",
    "redis",
    "margin_guard",
    "retention",
    "aggregator",
];

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Loadgen(args) => {
            let summary = mcp_meter::loadgen::run(&args)?;
            if args.json {
                println!("{}", serde_json::to_string(&summary)?);
            } else {
                println!("{summary}");
            }
            let target = match args.target {
                mcp_meter::loadgen::Target::Clickhouse => &args.clickhouse_url,
                _ => &args.url,
            };
            match summary.failure(target) {
                Some(why) => anyhow::bail!(why),
                None => Ok(()),
            }
        }
        Command::Proxy(args) => run_proxy(args),
        Command::Openapi => {
            let mut out = std::io::stdout().lock();
            out.write_all(ingestor::openapi::document().as_bytes())?;
            Ok(())
        }
        Command::Keys {
            command: KeysCommand::New { scopes, name },
        } => {
            let key = new_api_key()?;
            let hash = sha256_hex(&key);
            let mut listed: Vec<String> = Vec::new();
            for scope in scopes {
                let quoted = format!("\"{}\"", scope.as_str());
                if !listed.contains(&quoted) {
                    listed.push(quoted);
                }
            }
            println!("key:    {key}");
            println!("sha256: {hash}");
            println!();
            println!("Give the key to its user; put only the hash in the config file, under its [[tenants]]:");
            println!();
            println!("[[tenants.api_keys]]");
            println!("name = \"{name}\"");
            println!("sha256 = \"{hash}\"");
            println!("scopes = [{}]", listed.join(", "));
            Ok(())
        }
        Command::Migrate { config } => {
            init_logging(cli.log_format);
            let cfg = config_or_exit(load_config(
                config.as_deref(),
                |v| std::env::var(v).ok(),
                &Overrides::default(),
            ));
            actix_web::rt::System::new().block_on(async {
                let lines = migrate_clickhouse(&cfg).await?;
                println!(
                    "ClickHouse {} database {}:",
                    cfg.clickhouse.url, cfg.clickhouse.database
                );
                for line in lines {
                    println!("  {line}");
                }
                if let Some(brokers) = &cfg.kafka.brokers {
                    let lines = migrate_kafka(&cfg).await?;
                    println!("Kafka {brokers}:");
                    for line in lines {
                        println!("  {line}");
                    }
                }
                Ok(())
            })
        }
        Command::Retention {
            config,
            data_dir,
            store,
            dry_run,
        } => {
            init_logging(cli.log_format);
            let flags = Overrides {
                listen: None,
                data_dir,
            };
            let cfg = config_or_exit(load_config(
                config.as_deref(),
                |v| std::env::var(v).ok(),
                &flags,
            ));
            let kind = match store.as_deref() {
                Some("clickhouse") => schemas::config::StoreKind::Clickhouse,
                Some(_) => schemas::config::StoreKind::Sqlite,
                None => cfg.store,
            };
            actix_web::rt::System::new().block_on(async {
                let store = retention_store(&cfg, kind).await?;
                let now_ms = chrono::Utc::now().timestamp_millis();
                let cutoffs = backends::store::RetentionCutoffs::at(now_ms, &cfg.retention);
                let dropped = store.apply(cutoffs, dry_run).await?;
                let verb = if dry_run { "would drop" } else { "dropped" };
                let keep = match cfg.retention.raw_days {
                    Some(days) => format!("raw events {days} days"),
                    None => "raw events forever".into(),
                };
                println!(
                    "retention: dedup keys {} days, {keep}; rollups are kept",
                    cfg.retention.dedup_days
                );
                if dropped.is_empty() {
                    println!("nothing to drop");
                }
                for d in &dropped {
                    println!("{verb} {} {} ({} rows)", d.table, d.what, d.rows);
                }
                Ok(())
            })
        }
        Command::Ingestor { listen, config } => {
            init_logging(cli.log_format);
            let flags = Overrides {
                listen,
                data_dir: None,
            };
            let cfg = config_or_exit(load_config(
                Some(&config),
                |v| std::env::var(v).ok(),
                &flags,
            ));
            warn_without_tenants(&cfg);
            actix_web::rt::System::new().block_on(async move {
                let ingestor = Ingestor::start(&cfg).await?;
                let mut out = std::io::stdout().lock();
                let base = format!("http://{}", ingestor.addr);
                let banner = format!(
                    "mcp-meter ingestor: {base} -> kafka topic {}\n{}",
                    cfg.kafka.events_topic,
                    operation_lines(&base, &cfg)
                );
                let _ = out.write_all(banner.as_bytes()).and_then(|()| out.flush());
                drop(out);
                ingestor.run().await
            })
        }
        Command::Aggregator { config } => {
            init_logging(cli.log_format);
            let cfg = config_or_exit(load_config(
                Some(&config),
                |v| std::env::var(v).ok(),
                &Overrides::default(),
            ));
            actix_web::rt::System::new().block_on(async move {
                let (stop, shutdown) = tokio::sync::watch::channel(false);
                tokio::spawn(async move {
                    stop_signal().await;
                    tracing::info!("stopping after the batch in hand");
                    let _ = stop.send(true);
                });
                let progress = run_aggregator(&cfg, shutdown).await?;
                tracing::info!(?progress, "aggregator stopped");
                Ok(())
            })
        }
        Command::Serve {
            listen,
            data_dir,
            config,
            demo_key,
        } => {
            init_logging(cli.log_format);
            let flags = Overrides { listen, data_dir };
            let mut cfg = config_or_exit(load_config(
                config.as_deref(),
                |v| std::env::var(v).ok(),
                &flags,
            ));
            let demo_key = match config {
                Some(_) => {
                    warn_without_tenants(&cfg);
                    None
                }
                None => {
                    let key = match demo_key {
                        Some(k) => k,
                        None => new_api_key()?,
                    };
                    if let Err(e) = demo::add_tenant(&mut cfg, &key) {
                        config_error(e);
                    }
                    Some(key)
                }
            };
            actix_web::rt::System::new().block_on(async move {
                let embedded = Embedded::start(&cfg).await?;
                print_banner(&embedded, &cfg, demo_key.as_deref());
                embedded.run().await
            })
        }
    }
    .context("mcp-meter failed")
}

/// The config, or its error printed alone (see [`config_error`]).
fn config_or_exit(config: anyhow::Result<Config>) -> Config {
    config.unwrap_or_else(|e| config_error(e))
}

/// Prints a config error as its message only and exits with status 2. Returned from `main`,
/// anyhow would add a backtrace whenever RUST_BACKTRACE is set, burying what to fix under
/// frames of our own code.
fn config_error(error: anyhow::Error) -> ! {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "mcp-meter: {error:#}");
    std::process::exit(2)
}

/// A config that parses but serves nobody deserves a word at start: every request would be
/// answered 401. (Validation refuses a tenant without keys today; the warning stays true if
/// that ever loosens.)
fn warn_without_tenants(config: &Config) {
    const KEY_HINT: &str = "`mcp-meter keys new --scopes ingest,read,export` prints one";
    if config.tenants.is_empty() {
        tracing::warn!(
            "the config has no tenant, so every request will be refused (401): add a [[tenants]] \
             with its [[tenants.rate_plans]] and a [[tenants.api_keys]] ({KEY_HINT})"
        );
    }
    for tenant in config.tenants.iter().filter(|t| t.api_keys.is_empty()) {
        tracing::warn!(
            tenant = %tenant.id,
            "the tenant has no API key, so nobody can call for it: add a [[tenants.api_keys]] \
             ({KEY_HINT})"
        );
    }
}

/// SIGTERM or SIGINT.
async fn stop_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("a SIGTERM handler installs");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Logs go to stderr (stdout carries the banner and command output), filtered by
/// `MCP_METER_LOG` (default `info`).
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MCP_METER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes are for a person at a terminal, not for a file or a pipe.
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
    }
}

/// What every API process serves beside the API: its documentation and operations endpoints.
const OPERATIONS: [(&str, &str); 3] = [
    ("GET ", "/docs/ (OpenAPI: /openapi.json)"),
    ("GET ", "/healthz (alive)"),
    ("GET ", "/readyz (each dependency)"),
];

/// The operations lines of the banner: those of [`OPERATIONS`] at `base`, and `/metrics`, at
/// `base` or on `http.metrics_listen` when it has a listener of its own.
fn operation_lines(base: &str, cfg: &Config) -> String {
    let metrics = match &cfg.http.metrics_listen {
        Some(listen) => {
            format!("  GET  http://{listen}/metrics (Prometheus; http.metrics_listen)\n")
        }
        None => format!("  GET  {base}/metrics (Prometheus)\n"),
    };
    endpoint_lines(base, &OPERATIONS) + &metrics
}

/// One banner line per endpoint: `  METHOD base/path`.
fn endpoint_lines(base: &str, endpoints: &[(&str, &str)]) -> String {
    endpoints
        .iter()
        .map(|(method, path)| format!("  {method} {base}{path}\n"))
        .collect()
}

/// Prints where the API listens. Write errors are ignored: a server must not stop because
/// whoever started it closed its stdout.
fn print_banner(e: &Embedded, cfg: &Config, demo_key: Option<&str>) {
    let base = format!("http://{}", e.addr);
    let mut text = match cfg.store {
        StoreKind::Sqlite => format!("mcp-meter serve: embedded mode, store {}\n", e.store),
        // No Kafka and no aggregator: this process writes ClickHouse itself, and keeps limits,
        // kills, margin levels and balances in its own memory (no Redis).
        StoreKind::Clickhouse => format!(
            "mcp-meter serve: one process writing {} directly (no Kafka, no aggregator); limits, \
             kills and balances in this process's memory\n",
            e.store
        ),
    };
    let api = [
        ("POST", "/v1/ingest/batch"),
        ("POST", "/v1/ingest/events"),
        ("GET ", "/v1/guard/check?agentId=&toolName=&sessionId="),
        ("GET ", "/v1/guard/states"),
        ("POST", "/v1/authorize (then /v1/authorize/{nonce}/release)"),
        ("POST", "/v1/customers/{customerId}/credits"),
        ("GET ", "/v1/customers/{customerId}/balance"),
        ("GET ", "/analytics/mcp/summary"),
        ("GET ", "/analytics/mcp/revenue/by-tool"),
        ("GET ", "/analytics/mcp/by-agent"),
        ("GET ", "/analytics/mcp/by-customer"),
        ("GET ", "/analytics/mcp/sessions"),
        ("GET ", "/analytics/mcp/sessions/{sessionId}"),
        (
            "GET ",
            "/analytics/mcp/timeseries?interval=hour|day&groupBy=tool|agent|customer",
        ),
        ("GET ", "/v1/exports/billing?period=YYYY-MM&format=csv|json"),
        ("POST", "/v1/portal/tokens (a customer's read-only token)"),
        (
            "GET ",
            "/dashboard/ (sign in with a read key or a portal token)",
        ),
    ];
    text.push_str(&endpoint_lines(&base, &api));
    text.push_str(&operation_lines(&base, cfg));
    if let Some(key) = demo_key {
        text.push_str(&format!("demo tenant `{}` API key: {key}\n", demo::TENANT));
        text.push_str(
            "  (scope admin, which holds every scope; set MCP_METER_DEMO_KEY to keep the key \
             across restarts; --config for real tenants)\n",
        );
    }
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

/// `mcp-meter proxy`: relays until the server exits (stdio) or a signal (HTTP).
fn run_proxy(args: ProxyArgs) -> anyhow::Result<()> {
    use std::time::Duration;
    init_logging(LogFormat::Text);
    if std::env::args().any(|a| a == "--api-key" || a.starts_with("--api-key=")) {
        tracing::warn!("--api-key shows the key to every process of this machine (ps, /proc); set MCP_METER_PROXY_API_KEY instead");
    }
    if let Some(customer) = &args.customer {
        schemas::credits::valid_customer_id(customer)
            .map_err(|e| anyhow::anyhow!("--customer: {e}"))?;
    }
    let meter = proxy::meter::Meter::start(proxy::meter::MeterConfig {
        url: args.meter_url.trim_end_matches('/').to_string(),
        api_key: args.api_key,
        max_batch_events: args.max_batch_events as usize,
        flush_interval: Duration::from_millis(args.flush_interval_ms),
        max_queue_events: args.max_queue_events.max(1),
        request_timeout: Duration::from_secs(10),
        guard_timeout: Duration::from_millis(args.guard_timeout_ms),
        kill_recheck: Duration::from_secs(60),
    });
    let meter = std::sync::Arc::new(meter);
    if let Some(addr) = &args.metrics_listen {
        let listener = std::net::TcpListener::bind(addr)
            .with_context(|| format!("cannot listen on {addr} for /metrics"))?;
        tracing::info!("/healthz and /metrics on http://{}", listener.local_addr()?);
        proxy::ops::serve(listener, meter.clone());
    }
    let rules = proxy::enforce::Enforcement {
        paid_tools: args.paid_tools,
        guard: args.guard,
        max_throttle: Duration::from_millis(args.max_throttle_ms),
        call_timeout: Duration::from_millis(args.call_timeout_ms.max(1)),
    };
    let door = std::sync::Arc::new(proxy::enforce::Door::new(meter.clone(), rules));
    let close_wait = Duration::from_millis(args.close_wait_ms);
    let Some(upstream) = args.upstream else {
        anyhow::ensure!(
            !args.command.is_empty(),
            "give the stdio server's command after --, e.g. mcp-meter proxy --stdio ... -- npx my-server"
        );
        anyhow::ensure!(
            args.customer_header.is_none(),
            "--customer-header is for HTTP; a stdio proxy serves one client: name its payer with --customer"
        );
        let relay = proxy::stdio::StdioProxy {
            command: args.command,
            customer: args.customer,
            close_wait,
            max_line_bytes: args.max_body_bytes,
            max_answer_bytes: args.max_answer_bytes,
        };
        let code = relay.run(door)?;
        std::process::exit(code);
    };
    let upstream: proxy::http::Uri = upstream.parse().with_context(|| {
        format!("--upstream {upstream} is not a URL like http://127.0.0.1:3000/mcp")
    })?;
    anyhow::ensure!(
        upstream.scheme_str() == Some("http") && upstream.host().is_some(),
        "--upstream must be an http:// URL with a host (https upstreams are not supported)"
    );
    let header = |name: Option<String>| -> anyhow::Result<Option<proxy::http::HeaderName>> {
        name.map(|n| {
            proxy::http::HeaderName::try_from(n.as_str())
                .with_context(|| format!("`{n}` is not a header name"))
        })
        .transpose()
    };
    // The payer header is believed when a signature says so, or when the operator says so.
    let payer_header = header(args.customer_header)?;
    use proxy::http::PayerCheck;
    // The secret only from the environment: a flag would show it to every process.
    let customer_secret = std::env::var("MCP_METER_PROXY_CUSTOMER_SECRET")
        .ok()
        .filter(|s| !s.is_empty());
    let check = match (
        &payer_header,
        customer_secret,
        args.tenant,
        args.trust_customer_header,
    ) {
        (None, Some(_), _, _) => anyhow::bail!(
            "MCP_METER_PROXY_CUSTOMER_SECRET verifies the customer tokens of --customer-header: give --customer-header too"
        ),
        (None, None, _, _) => None,
        (Some(_), Some(_), _, true) => anyhow::bail!(
            "--trust-customer-header takes the header unsigned: unset MCP_METER_PROXY_CUSTOMER_SECRET, or drop the flag to verify tokens"
        ),
        (Some(_), Some(secret), Some(tenant), false) => {
            schemas::token::check_secret(&secret).map_err(|e| {
                anyhow::anyhow!("MCP_METER_PROXY_CUSTOMER_SECRET {e}; it must be the text of the server's portal.secret (or of the gateway's signing secret)")
            })?;
            Some(PayerCheck::Signed {
                secret: secret.into_bytes(),
                tenant,
            })
        }
        (Some(_), Some(_), None, false) => anyhow::bail!(
            "customer tokens name their tenant: give --tenant (MCP_METER_PROXY_TENANT), the tenant of the proxy's API key"
        ),
        (Some(_), None, _, true) => {
            tracing::warn!("--trust-customer-header: the payer is whatever the header says; make sure only your gateway can set it");
            Some(PayerCheck::Trusted)
        }
        (Some(_), None, _, false) => anyhow::bail!(
            "--customer-header trusts no unsigned header: set MCP_METER_PROXY_CUSTOMER_SECRET and --tenant to verify the customer tokens it holds, or pass --trust-customer-header if only a gateway you run can set it"
        ),
    };
    let http = proxy::http::HttpProxy {
        upstream: upstream.clone(),
        payer: proxy::http::Payer {
            fixed: args.customer,
            header: payer_header.zip(check),
        },
        limits: proxy::http::Limits {
            max_body_bytes: args.max_body_bytes,
            read_timeout: Duration::from_millis(args.read_timeout_ms.max(1)),
            max_connections: args.max_connections as usize,
            max_answer_bytes: args.max_answer_bytes,
        },
        agent_header: header(args.agent_header)?,
        session_header: header(args.session_header)?,
    };
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| {
                format!(
                    "cannot listen on {} (--listen, MCP_METER_PROXY_LISTEN)",
                    args.listen
                )
            })?;
        println!(
            "mcp-meter proxy: MCP on http://{}{} -> {upstream}",
            listener.local_addr()?,
            upstream.path()
        );
        // On SIGTERM the calls in flight and the rounds waiting for input end as the billing
        // rule says, then what is queued is delivered.
        proxy::http::serve(listener, http, door, shutdown_signal()).await?;
        anyhow::Ok(())
    })?;
    let left = meter.close(std::time::Instant::now() + close_wait);
    if left > 0 {
        tracing::warn!(
            undelivered = left,
            "events were not delivered before exiting"
        );
    }
    Ok(())
}

/// SIGINT or SIGTERM.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
