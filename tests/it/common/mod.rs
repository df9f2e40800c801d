//! A real `serve` in-process for tests: its own data directory, port 0, graceful stop on drop.

pub mod chdb;
pub mod distributed;

use mcp_meter::{sha256_hex, Embedded};
use schemas::config::Config;
use serde_json::Value;

/// Tenant `acme`: every scope; an ingest-only key; a read-only key. Tenant `globex`: all.
pub const ACME: &str = "test-key-acme-admin";
pub const ACME_INGEST: &str = "test-key-acme-ingest";
pub const ACME_READ: &str = "test-key-acme-read";
pub const GLOBEX: &str = "test-key-globex-admin";
pub const INITECH: &str = "test-key-initech-admin";

pub const SEED: &str = r#"{"metricName":"mcp_server.tool_invocations","productType":"MCP_SERVER","toolName":"web_search","sessionId":"sess_abc123","agentId":"agent_gpt4o_prod","executionDurationMs":542,"metadata":{"inputTokens":1200,"outputTokens":450}}"#;

pub fn config(data_dir: &std::path::Path) -> Config {
    let config = Config::from_toml(&config_text(data_dir)).unwrap();
    config.validate().unwrap();
    config
}

/// The test tenants as config text, to which a test may append sections.
pub fn config_text(data_dir: &std::path::Path) -> String {
    config_text_with(data_dir, "")
}

/// The same, with `initech_extra` (keys and then tables of tenant `initech`: limits, caps)
/// right after its keys.
pub fn config_text_with(data_dir: &std::path::Path, initech_extra: &str) -> String {
    let plan = r#"
[[tenants.rate_plans]]
version = 1
[tenants.rate_plans.tools."*"]
price = { per_call = 5000, per_input_token = 1, per_output_token = 3 }
cost = { per_call = 200, per_input_token = 0.5, per_output_token = 1.5, per_second = 100 }
"#;
    format!(
        r#"
listen = "127.0.0.1:0"
data_dir = "{dir}"

[[tenants]]
id = "acme"
api_keys = [
  {{ name = "admin", sha256 = "{acme}", scopes = ["admin"] }},
  {{ name = "sdk", sha256 = "{ingest}", scopes = ["ingest"] }},
  {{ name = "analyst", sha256 = "{read}", scopes = ["read"] }},
]
{plan}
[[tenants]]
id = "globex"
api_keys = [{{ name = "admin", sha256 = "{globex}", scopes = ["ingest", "read", "export"] }}]
{plan}
[[tenants]]
id = "initech"
api_keys = [{{ name = "admin", sha256 = "{initech}", scopes = ["admin"] }}]
{initech_extra}
{plan}
"#,
        dir = data_dir.display(),
        acme = sha256_hex(ACME),
        ingest = sha256_hex(ACME_INGEST),
        read = sha256_hex(ACME_READ),
        globex = sha256_hex(GLOBEX),
        initech = sha256_hex(INITECH),
    )
}

/// The interpreter of the venv `scripts/test` builds (the Aforo SDK, chDB). Tests that need it
/// fail without it: a peer that was never run proves nothing.
pub fn test_python() -> String {
    std::env::var("MCP_METER_TEST_PYTHON")
        .expect("MCP_METER_TEST_PYTHON is not set: run scripts/test, which builds the test venv")
}

/// The ClickHouse server `scripts/test` starts.
pub fn clickhouse_url() -> String {
    std::env::var("MCP_METER_TEST_CLICKHOUSE_URL").expect(
        "MCP_METER_TEST_CLICKHOUSE_URL is not set: run scripts/test, which starts ClickHouse",
    )
}

/// A database name no other test uses.
pub fn unique_database(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{prefix}_{}_{nanos}", std::process::id())
}

/// The test config on ClickHouse: a fresh database, migrated.
pub fn clickhouse_config(data_dir: &std::path::Path, database: &str) -> Config {
    let mut c = config(data_dir);
    c.store = schemas::config::StoreKind::Clickhouse;
    c.clickhouse.url = clickhouse_url();
    c.clickhouse.database = database.to_string();
    let lines = actix_web::rt::System::new()
        .block_on(mcp_meter::migrate_clickhouse(&c))
        .unwrap();
    assert_eq!(
        lines.len(),
        backends::store::clickhouse::migrations::MIGRATIONS.len()
    );
    c
}

/// HTTP calls to a running mcp-meter, answering (status, JSON body).
pub struct Client {
    pub base: String,
    agent: ureq::Agent,
}

impl Client {
    pub fn new(base: &str) -> Client {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(std::time::Duration::from_secs(30)))
            .build()
            .into();
        Client {
            base: base.trim_end_matches('/').to_string(),
            agent,
        }
    }
}

pub struct Server {
    pub client: Client,
    pub dir: tempfile::TempDir,
    handle: Option<actix_web::dev::ServerHandle>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::ops::Deref for Server {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

impl Server {
    pub fn start() -> Server {
        Server::start_with(|_| {})
    }

    pub fn start_with(tweak: impl FnOnce(&mut Config)) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config(dir.path());
        tweak(&mut config);
        Server::start_in(dir, config)
    }

    pub fn start_in(dir: tempfile::TempDir, config: Config) -> Server {
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            actix_web::rt::System::new().block_on(async move {
                let embedded = Embedded::start(&config).await.unwrap();
                tx.send((embedded.addr, embedded.handle())).unwrap();
                embedded.run().await.unwrap();
            })
        });
        let (addr, handle) = rx.recv().unwrap();
        Server {
            client: Client::new(&format!("http://{addr}")),
            dir,
            handle: Some(handle),
            thread: Some(thread),
        }
    }

    /// Stops the server the way SIGTERM does and waits until the writer has finished.
    pub fn stop(mut self) -> tempfile::TempDir {
        self.shutdown();
        let dir = tempfile::tempdir().unwrap();
        std::mem::replace(&mut self.dir, dir)
    }

    fn shutdown(&mut self) {
        if let Some(handle) = self.handle.take() {
            actix_web::rt::System::new().block_on(handle.stop(true));
        }
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }
}

impl Client {
    /// POSTs `body` as JSON with `key` in X-API-Key (and any extra headers).
    pub fn post(&self, path: &str, key: &str, body: &str) -> (u16, Value) {
        self.post_with(
            path,
            Some(key),
            body,
            &[("Content-Type", "application/json")],
        )
    }

    pub fn post_with(
        &self,
        path: &str,
        key: Option<&str>,
        body: &str,
        headers: &[(&str, &str)],
    ) -> (u16, Value) {
        let mut req = self.agent.post(format!("{}{path}", self.base));
        if let Some(key) = key {
            req = req.header("X-API-Key", key);
        }
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        read(req.send(body.as_bytes()))
    }

    /// POSTs JSON; `None` when no answer came (connection refused or cut off).
    pub fn try_post(&self, path: &str, key: &str, body: &str) -> Option<(u16, Value)> {
        let mut answer = self
            .agent
            .post(format!("{}{path}", self.base))
            .header("X-API-Key", key)
            .header("Content-Type", "application/json")
            .send(body.as_bytes())
            .ok()?;
        let status = answer.status().as_u16();
        let text = answer.body_mut().read_to_string().ok()?;
        Some((
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    }

    /// GETs with `key` as a Bearer token.
    pub fn get(&self, path: &str, key: &str) -> (u16, Value) {
        self.get_with(path, key, &[])
    }

    /// GETs and returns the body as sent, for tests of its exact bytes.
    pub fn get_text(&self, path: &str, key: &str) -> (u16, String) {
        let mut answer = self
            .agent
            .get(format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {key}"))
            .call()
            .unwrap();
        let text = answer.body_mut().read_to_string().unwrap();
        (answer.status().as_u16(), text)
    }

    /// GETs without a key; `None` when no answer came (a process that is down or restarting).
    pub fn try_get_text(&self, path: &str) -> Option<(u16, String)> {
        let mut answer = self.agent.get(format!("{}{path}", self.base)).call().ok()?;
        let text = answer.body_mut().read_to_string().ok()?;
        Some((answer.status().as_u16(), text))
    }

    pub fn get_with(&self, path: &str, key: &str, headers: &[(&str, &str)]) -> (u16, Value) {
        let mut req = self
            .agent
            .get(format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {key}"));
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        read(req.call())
    }
}

fn read(answer: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> (u16, Value) {
    let mut answer = answer.expect("the server answers");
    let status = answer.status().as_u16();
    let text = answer.body_mut().read_to_string().unwrap();
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, value)
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// `SEED` with `occurredAt` set to now (its content, time included, is then its identity),
/// and that time.
pub fn timed_seed() -> (String, String) {
    let at = schemas::event::format_ms(chrono::Utc::now().timestamp_millis());
    let seed = SEED.replacen('{', &format!("{{\"occurredAt\":\"{at}\","), 1);
    (seed, at)
}

/// A tool-call event with its own idempotency key.
pub fn call(key: &str, tool: &str, agent: &str, session: &str) -> Value {
    serde_json::json!({
        "idempotencyKey": key,
        "metricName": "mcp_server.tool_invocations",
        "toolName": tool,
        "agentId": agent,
        "sessionId": session,
        "executionDurationMs": 1000,
        "metadata": {"inputTokens": 10, "outputTokens": 10},
    })
}

/// On the test plan `call` is priced 5000 + 10 + 30 and costs 200 + 5 + 15 + 100.
pub const CALL_REVENUE: i64 = 5040;
pub const CALL_COGS: i64 = 320;

pub fn batch(events: &[Value]) -> String {
    serde_json::json!({ "events": events }).to_string()
}

/// Posters sending batches of 50 fresh events as fast as they are answered, until stopped;
/// they count the events answered 202 and the requests refused or cut off.
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    answered: std::sync::Arc<std::sync::atomic::AtomicU64>,
    refused: std::sync::Arc<std::sync::atomic::AtomicU64>,
    posters: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    pub fn start(base: &str, key: &'static str, posters: usize) -> Load {
        use std::sync::atomic::Ordering;
        let load = Load {
            stop: Default::default(),
            answered: Default::default(),
            refused: Default::default(),
            posters: Vec::new(),
        };
        let posters = (0..posters)
            .map(|poster| {
                let (stop, answered, refused) = (
                    load.stop.clone(),
                    load.answered.clone(),
                    load.refused.clone(),
                );
                let client = Client::new(base);
                std::thread::spawn(move || {
                    let mut n = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let events: Vec<Value> = (0..50)
                            .map(|i| {
                                call(
                                    &format!("p{poster}-{n}-{i}"),
                                    "t",
                                    "a",
                                    &format!("s{poster}"),
                                )
                            })
                            .collect();
                        n += 1;
                        match client.try_post("/v1/ingest/batch", key, &batch(&events)) {
                            Some((202, body)) => {
                                answered.fetch_add(
                                    body["accepted"].as_u64().unwrap(),
                                    Ordering::Relaxed,
                                );
                            }
                            // Refused or cut off (the server stopping): a client would retry.
                            _ => {
                                refused.fetch_add(1, Ordering::Relaxed);
                                std::thread::sleep(std::time::Duration::from_millis(20));
                            }
                        }
                    }
                })
            })
            .collect();
        Load { posters, ..load }
    }

    /// Events answered 202 so far.
    pub fn answered(&self) -> u64 {
        self.answered.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stops the posters and answers (events answered 202, requests refused or cut off).
    pub fn stop(self) -> (u64, u64) {
        use std::sync::atomic::Ordering;
        self.stop.store(true, Ordering::Relaxed);
        for p in self.posters {
            p.join().unwrap();
        }
        (
            self.answered.load(Ordering::Relaxed),
            self.refused.load(Ordering::Relaxed),
        )
    }
}

/// A seeded xorshift generator: the same seed gives the same stream of numbers on every run.
/// The value of one sample line (`name{labels} value`) of Prometheus text, if present.
pub fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

pub fn xorshift(mut seed: u64) -> impl FnMut() -> u64 {
    move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    }
}
