//! The distributed mode for tests: real `mcp-meter ingestor` and `aggregator` processes, the
//! ClickHouse and tansu that `scripts/test` starts, or a tansu of the test's own to restart.

use super::{clickhouse_url, config_text_with, unique_database, Client};
use schemas::config::Config;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The broker `scripts/test` starts.
pub fn kafka_brokers() -> String {
    std::env::var("MCP_METER_TEST_KAFKA_BROKERS")
        .expect("MCP_METER_TEST_KAFKA_BROKERS is not set: run scripts/test, which starts tansu")
}

/// A test's own corner of the shared services: a ClickHouse database, topics and a consumer
/// group named after it, migrated, and the config file the processes read.
pub struct Setup {
    pub name: String,
    pub dir: tempfile::TempDir,
    pub file: PathBuf,
    pub config: Config,
}

impl Setup {
    /// `extra` is appended to the `[kafka]` section (e.g. `delivery_timeout_ms = 2000`), and
    /// may add sections after it.
    pub fn new(prefix: &str, brokers: &str, partitions: i32, extra: &str) -> Setup {
        Setup::on(&clickhouse_url(), "", prefix, brokers, partitions, extra)
    }

    /// The same on a ClickHouse of the caller's choice; `clickhouse_extra` is appended to the
    /// `[clickhouse]` section.
    pub fn on(
        clickhouse: &str,
        clickhouse_extra: &str,
        prefix: &str,
        brokers: &str,
        partitions: i32,
        extra: &str,
    ) -> Setup {
        Setup::with_tenant(
            clickhouse,
            clickhouse_extra,
            prefix,
            brokers,
            partitions,
            "",
            extra,
        )
    }

    /// The same, with `tenant_extra` in tenant `initech`'s table ([`config_text_with`]).
    pub fn with_tenant(
        clickhouse: &str,
        clickhouse_extra: &str,
        prefix: &str,
        brokers: &str,
        partitions: i32,
        tenant_extra: &str,
        extra: &str,
    ) -> Setup {
        let name = unique_database(prefix);
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "{}\n[clickhouse]\nurl = \"{clickhouse}\"\ndatabase = \"{name}\"\n{clickhouse_extra}\n\n\
[kafka]\nbrokers = \"{brokers}\"\n\
events_topic = \"{name}.events\"\ndead_letter_topic = \"{name}.dead-letter\"\n\
consumer_group = \"{name}\"\npartitions = {partitions}\nsession_timeout_ms = 6000\n{extra}\n",
            config_text_with(dir.path(), tenant_extra),
        );
        let file = dir.path().join("mcp-meter.toml");
        std::fs::write(&file, &text).unwrap();
        let config = Config::from_toml(&text).unwrap();
        config.validate().unwrap();
        actix_web::rt::System::new().block_on(async {
            mcp_meter::migrate_clickhouse(&config).await.unwrap();
            mcp_meter::migrate_kafka(&config).await.unwrap();
        });
        Setup {
            name,
            dir,
            file,
            config,
        }
    }

    /// Runs SQL in this setup's ClickHouse database and answers TabSeparated.
    pub fn sql(&self, sql: &str) -> String {
        use backends::store::clickhouse::{HttpRunner, SqlRunner};
        let runner = HttpRunner::new(&self.config.clickhouse);
        actix_web::rt::System::new()
            .block_on(runner.tab_separated(sql))
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    pub fn ingestor(&self) -> (Proc, Client) {
        let mut command = Command::new(env!("CARGO_BIN_EXE_mcp-meter"));
        command
            .args(["ingestor", "--listen", "127.0.0.1:0", "--config"])
            .arg(&self.file)
            .env("MCP_METER_LOG", "info");
        let (child, base) = spawn_with_url(command, |l| {
            let rest = l.strip_prefix("mcp-meter ingestor: ")?;
            Some(rest.split(' ').next()?.to_string())
        });
        (
            Proc {
                child,
                what: "ingestor",
                port: 0,
            },
            Client::new(&base),
        )
    }

    /// An aggregator process; its `/metrics` listens on a port of its own (`Proc::metrics_url`).
    /// Two ingestor processes on this setup, and a client for each.
    pub fn two_ingestors(&self) -> ([Proc; 2], [Client; 2]) {
        let (a, client_a) = self.ingestor();
        let (b, client_b) = self.ingestor();
        ([a, b], [client_a, client_b])
    }

    pub fn aggregator(&self) -> Proc {
        let port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_mcp-meter"))
            .args(["aggregator", "--config"])
            .arg(&self.file)
            .env("MCP_METER_LOG", "info")
            .env("MCP_METER_AGGREGATOR_LISTEN", format!("127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        Proc {
            child,
            what: "aggregator",
            port,
        }
    }
}

/// Spawns `command` and reads its stdout until `find` picks its base URL out of a line; the
/// rest of stdout is drained in the background.
pub fn spawn_with_url(
    mut command: Command,
    find: impl Fn(&str) -> Option<String>,
) -> (Child, String) {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let base = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|l| find(&l))
        .expect("the process printed its URL");
    std::thread::spawn(move || lines.for_each(drop));
    (child, base)
}

/// The base URL in `serve`'s banner line `  POST <base>/v1/ingest/batch`.
pub fn serve_base(line: &str) -> Option<String> {
    let url = line.trim().strip_prefix("POST ")?.trim();
    Some(url.strip_suffix("/v1/ingest/batch")?.to_string())
}

/// A child process, killed when dropped.
pub struct Proc {
    child: Child,
    what: &'static str,
    /// The aggregator's metrics port (0 for an ingestor).
    port: u16,
}

/// `kill -SIGNAL pid`, which must succeed (`what` names the process in the failure).
fn send_signal(pid: u32, signal: &str, what: &str) {
    let status = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {signal} {what}");
}

impl Proc {
    /// A child of the test's own, `what` for failures' messages; killed when dropped.
    pub fn of(child: Child, what: &'static str) -> Proc {
        Proc {
            child,
            what,
            port: 0,
        }
    }

    pub fn signal(&self, signal: &str) {
        send_signal(self.child.id(), signal, self.what);
    }

    /// SIGKILL, as a crash.
    pub fn crash(&mut self) {
        self.signal("-KILL");
        self.child.wait().unwrap();
    }

    /// SIGTERM, and the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.signal("-TERM");
        self.child.wait().unwrap()
    }

    pub fn metrics_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The exit status, if the process has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().unwrap()
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port nothing listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A tansu broker of a test's own, which it may restart; storage survives restarts.
pub struct Tansu {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl Tansu {
    pub fn start() -> Tansu {
        let port = free_port();
        let mut tansu = Tansu {
            child: None,
            port,
            dir: tempfile::tempdir().unwrap(),
        };
        tansu.spawn();
        tansu
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Everything the broker logged, over all its restarts.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tansu.log")).unwrap_or_default()
    }

    /// tansu 0.6.0 panics in its idempotent-producer check ("more or less than one row") on a
    /// produce whose producer epoch it does not know: librdkafka bumps an idempotent producer's
    /// epoch on its own after requests time out in flight, which Kafka accepts and tansu does
    /// not. Our producers are replaced after a few such failures; the panic can leave the broker
    /// failing every produce until it is restarted (README, "Tests"). Restarts it when its log
    /// shows more such panics than `seen` (which it then updates); answers whether it did.
    pub fn restart_after_panic(&mut self, seen: &mut usize) -> bool {
        let panics = self.log().matches("more or less than one row").count();
        if panics <= *seen {
            return false;
        }
        *seen = panics;
        eprintln!("tansu panicked in its idempotent-producer check; restarting it again");
        self.crash_and_restart();
        true
    }

    /// SIGKILL, as a crash, then a start on the same port and storage.
    pub fn crash_and_restart(&mut self) {
        self.crash();
        self.spawn();
    }

    /// SIGKILL, as a crash; `start_again` brings it back.
    pub fn crash(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            child.wait().unwrap();
        }
    }

    /// Starts the broker again on the same port and storage.
    pub fn start_again(&mut self) {
        self.spawn();
    }

    fn spawn(&mut self) {
        let binary = std::env::var("MCP_METER_TEST_TANSU")
            .expect("MCP_METER_TEST_TANSU is not set: run scripts/test, which installs tansu");
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let storage = format!("sqlite:///{}/tansu.db", self.dir.path().display());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("tansu.log"))
            .unwrap();
        self.child = Some(
            Command::new(binary)
                .args([
                    "broker",
                    "--listener-url",
                    &url,
                    "--advertised-listener-url",
                    &url,
                ])
                .args(["--storage-engine", &storage])
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
        assert!(
            wait_until(Duration::from_secs(10), || std::net::TcpStream::connect((
                "127.0.0.1",
                self.port
            ))
            .is_ok()),
            "tansu did not start"
        );
    }

    /// SIGSTOP (`-STOP`) or SIGCONT (`-CONT`) to the broker.
    pub fn signal(&self, signal: &str) {
        send_signal(
            self.child.as_ref().expect("tansu is running").id(),
            signal,
            "tansu",
        );
    }

    /// Stops the broker (SIGTERM) and starts it again on the same port and storage.
    pub fn restart(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            child.wait().unwrap();
        }
        self.spawn();
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Polls `condition` every 20 ms until it holds or `timeout` passes; answers whether it held.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A Redis of a test's own, which it may stop and start again on the same port (empty: no
/// persistence, as after a Redis crash without AOF).
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let port = free_port();
        let mut redis = RedisServer {
            child: None,
            port,
            dir: tempfile::tempdir().unwrap(),
        };
        redis.spawn();
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let binary = std::env::var("MCP_METER_TEST_REDIS_SERVER").expect(
            "MCP_METER_TEST_REDIS_SERVER is not set: run scripts/test, which installs redis-server",
        );
        let port = self.port.to_string();
        self.child = Some(
            Command::new(binary)
                .args(["--bind", "127.0.0.1", "--port", &port, "--save", ""])
                .args(["--appendonly", "no", "--dir"])
                .arg(self.dir.path())
                .arg("--logfile")
                .arg(self.dir.path().join("redis.log"))
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let pong = || {
            use std::io::{Read, Write};
            let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
                return false;
            };
            let mut answer = [0u8; 7];
            s.write_all(b"PING\r\n").is_ok()
                && s.read_exact(&mut answer).is_ok()
                && &answer == b"+PONG\r\n"
        };
        assert!(
            wait_until(Duration::from_secs(10), pong),
            "redis-server did not start"
        );
    }

    /// SIGKILL: Redis is gone, with everything it held.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            child.wait().unwrap();
        }
    }

    /// Starts it again on the same port, empty.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "stop it first");
        self.spawn();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A ClickHouse server of a test's own (started by `scripts/lib/clickhouse.sh`, as
/// `scripts/test` starts the shared one), which the test may pause with SIGSTOP.
pub struct ClickHouseServer {
    pid: u32,
    url: String,
    _dir: tempfile::TempDir,
}

impl ClickHouseServer {
    pub fn start() -> ClickHouseServer {
        let dir = tempfile::tempdir().unwrap();
        let root = env!("CARGO_MANIFEST_DIR");
        let output = Command::new("bash")
            .arg("-c")
            .arg(
                "source scripts/lib/services.sh && source scripts/lib/clickhouse.sh && \
                 start_clickhouse \"$1\" >&2 && echo \"$CLICKHOUSE_PID $CLICKHOUSE_URL\"",
            )
            .arg("start_clickhouse")
            .arg(dir.path())
            .current_dir(root)
            .stderr(Stdio::inherit())
            .output()
            .unwrap();
        let out = String::from_utf8(output.stdout).unwrap();
        assert!(
            output.status.success(),
            "clickhouse-server did not start: {out}"
        );
        let (pid, url) = out.trim().split_once(' ').expect("pid and url");
        ClickHouseServer {
            pid: pid.parse().unwrap(),
            url: url.to_string(),
            _dir: dir,
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// SIGSTOP (`-STOP`) or SIGCONT (`-CONT`).
    pub fn signal(&self, signal: &str) {
        send_signal(self.pid, signal, "clickhouse-server");
    }
}

impl Drop for ClickHouseServer {
    fn drop(&mut self) {
        self.signal("-CONT");
        let _ = Command::new("kill")
            .args(["-KILL", &self.pid.to_string()])
            .status();
    }
}
