//! `mcp-meter loadgen`: realistic, seeded usage events pushed at an ingest API, or the same
//! events written as JSONEachRow straight into a ClickHouse table over HTTP (the baseline a
//! user would otherwise have).
//!
//! Events are made before the clock starts, so the figures measure the target, not the
//! generator; each worker thread keeps one connection alive and takes the next request's body
//! from a shared counter until the count or the duration is reached.

use anyhow::Context;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How the events of a stream are spread over agents, sessions and requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// Each event drawn alone: any of 200 agents, 50 sessions each, 12 tools, 40 customers.
    Uniform,
    /// As SDK flushes look: each request comes from one server instance, its calls from 2
    /// agents in 4 sessions (several calls each) of one customer, over 4 of the 12 tools.
    Sdk,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// `POST /v1/ingest/batch`, `--batch-size` events per request.
    Batch,
    /// `POST /v1/ingest/events` with one event per request, as a chatty SDK flushes.
    Events,
    /// `INSERT INTO <table> FORMAT JSONEachRow` on ClickHouse's HTTP interface: the same events
    /// in batches of `--batch-size`, into a table shaped like `mcp_events` (created if missing).
    Clickhouse,
    /// Freshness: post one event per request to `/v1/ingest/events`, each in a session of its
    /// own, then poll `GET /analytics/mcp/sessions/{id}` (every `--poll-ms`) until it answers
    /// 200. The latency reported is from the 202 to the first answer that shows the event.
    Freshness,
    /// `GET /healthz`, one request per event and no body: the bare HTTP baseline that
    /// `--target events` is compared with, the same clients on the same connections.
    Healthz,
}

#[derive(Clone, Debug, clap::Args)]
pub struct LoadgenArgs {
    /// Where the events go.
    #[arg(long, value_enum, default_value = "batch")]
    pub target: Target,
    /// Base URL of the mcp-meter API (`serve` or `ingestor`).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// API key with the `ingest` scope (not needed for `--target clickhouse` or `healthz`); `--target
    /// freshness` also reads sessions back, which needs the `read` scope too.
    #[arg(long)]
    pub key: Option<String>,
    /// Requests in flight at once (one thread and connection each).
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Events per request (1 for `--target events`).
    #[arg(long, default_value_t = 100)]
    pub batch_size: usize,
    /// How events spread over agents, sessions and requests.
    #[arg(long, value_enum, default_value = "uniform")]
    pub workload: Workload,
    /// Events to send in all.
    #[arg(long, default_value_t = 100_000)]
    pub events: u64,
    /// Stop after this many seconds even if events are left.
    #[arg(long)]
    pub duration_seconds: Option<u64>,
    /// Hold this many requests per second in all (open loop) instead of sending each request
    /// as soon as the previous one is answered.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Seed of the event stream: the same seed makes the same events (whose idempotency keys
    /// the ingestor already holds: a re-run with the same seed stores nothing new). Default: a
    /// fresh one, printed so that the run can be repeated.
    #[arg(long)]
    pub seed: Option<u64>,
    /// ClickHouse HTTP interface, for `--target clickhouse`.
    #[arg(long, default_value = "http://127.0.0.1:8123")]
    pub clickhouse_url: String,
    /// `database.table` the baseline inserts into.
    #[arg(long, default_value = "default.loadgen_events")]
    pub clickhouse_table: String,
    /// Pause between two reads of a probe's session, for `--target freshness` (0: none).
    #[arg(long, default_value_t = 2)]
    pub poll_ms: u64,
    /// How long a freshness probe waits for its session before it counts as a miss.
    #[arg(long, default_value_t = 30)]
    pub probe_timeout_seconds: u64,
    /// Print the summary as one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// splitmix64: a small seeded stream, so a run (or a test's data) can be repeated exactly.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// The tools events are spread over.
pub const TOOLS: [&str; 12] = [
    "web_search",
    "fetch_url",
    "summarize",
    "translate",
    "sql_query",
    "send_email",
    "ocr",
    "image_gen",
    "code_exec",
    "calendar",
    "vector_search",
    "weather",
];
const STATUSES: [&str; 4] = ["SUCCESS", "SUCCESS", "SUCCESS", "ERROR"];

/// One generated tool call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub key: String,
    pub tool: &'static str,
    pub agent: String,
    pub customer: String,
    pub session: String,
    /// Seconds since the epoch (whole, so both targets store the same instant).
    pub occurred_at_s: i64,
    pub status: &'static str,
    pub duration_ms: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// What every id loadgen makes starts with, so that its traffic is told apart from real
/// customers, agents and sessions (and never lands on the README's `cust-7`).
pub const ID_PREFIX: &str = "loadgen-";

/// The `n`th event of the stream `seed` (uniform workload), within the last hour before `now_s`.
pub fn event(seed: u64, n: u64, now_s: i64) -> Event {
    let mut rng = Rng(seed.wrapping_mul(0x1000_0000_01b3) ^ n);
    let agent = rng.below(200);
    let tool = TOOLS[rng.below(TOOLS.len() as u64) as usize];
    let session = rng.below(50);
    Event {
        key: format!("{ID_PREFIX}{seed}-{n}"),
        tool,
        agent: format!("{ID_PREFIX}agent-{agent}"),
        customer: format!("{ID_PREFIX}cust-{}", agent % 40),
        session: format!("{ID_PREFIX}sess-{agent}-{session}"),
        ..figures(&mut rng, now_s)
    }
}

/// The `n`th event of the stream `seed` in the SDK-shaped workload, whose requests hold
/// `batch_size` events each: request `n / batch_size` is one server instance's flush.
pub fn sdk_event(seed: u64, n: u64, batch_size: u64, now_s: i64) -> Event {
    let instance = n / batch_size.max(1);
    let mut own = Rng(seed.wrapping_mul(0x1000_0000_01b3) ^ instance ^ (1 << 63));
    let first_tool = own.below(TOOLS.len() as u64);
    let mut rng = Rng(seed.wrapping_mul(0x1000_0000_01b3) ^ n);
    let agent = (instance * 2 + rng.below(2)) % 200;
    let tool = TOOLS[((first_tool + rng.below(4)) % TOOLS.len() as u64) as usize];
    Event {
        key: format!("{ID_PREFIX}{seed}-{n}"),
        tool,
        agent: format!("{ID_PREFIX}agent-{agent}"),
        customer: format!("{ID_PREFIX}cust-{}", instance % 40),
        session: format!("{ID_PREFIX}sess-{instance}-{}", rng.below(4)),
        ..figures(&mut rng, now_s)
    }
}

/// The time, status, duration and tokens of an event, drawn from `rng`; ids are empty.
fn figures(rng: &mut Rng, now_s: i64) -> Event {
    Event {
        key: String::new(),
        tool: "",
        agent: String::new(),
        customer: String::new(),
        session: String::new(),
        occurred_at_s: now_s - 60 - rng.below(3540) as i64,
        status: STATUSES[rng.below(STATUSES.len() as u64) as usize],
        duration_ms: 20 + rng.below(3000),
        input_tokens: rng.below(4000),
        output_tokens: rng.below(1500),
    }
}

impl Event {
    /// The wire event (camelCase, as the Aforo SDKs send it).
    fn write_wire(&self, out: &mut String) {
        let at = chrono::DateTime::from_timestamp(self.occurred_at_s, 0)
            .expect("a valid time")
            .format("%Y-%m-%dT%H:%M:%SZ");
        let _ = write!(
            out,
            r#"{{"idempotencyKey":"{}","metricName":"mcp_server.tool_invocations","productType":"MCP_SERVER","toolName":"{}","agentId":"{}","customerId":"{}","sessionId":"{}","occurredAt":"{at}","executionStatus":"{}","executionDurationMs":{},"metadata":{{"inputTokens":{},"outputTokens":{}}}}}"#,
            self.key,
            self.tool,
            self.agent,
            self.customer,
            self.session,
            self.status,
            self.duration_ms,
            self.input_tokens,
            self.output_tokens
        );
    }

    /// The same event as a JSONEachRow line of the baseline table.
    fn write_row(&self, out: &mut String) {
        let at = chrono::DateTime::from_timestamp(self.occurred_at_s, 0)
            .expect("a valid time")
            .format("%Y-%m-%d %H:%M:%S");
        let _ = writeln!(
            out,
            r#"{{"tenant_id":"loadgen","idempotency_key":"{}","metric_name":"mcp_server.tool_invocations","product_type":"MCP_SERVER","tool_name":"{}","agent_id":"{}","customer_id":"{}","session_id":"{}","occurred_at":"{at}","execution_status":"{}","execution_duration_ms":{},"input_tokens":{},"output_tokens":{}}}"#,
            self.key,
            self.tool,
            self.agent,
            self.customer,
            self.session,
            self.status,
            self.duration_ms,
            self.input_tokens,
            self.output_tokens
        );
    }
}

/// The baseline table: the columns a user would keep for these events, sorted like
/// `mcp_events`. Runs on ClickHouse 18.16 and later.
fn baseline_ddl(table: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {table} (tenant_id String, idempotency_key String, \
metric_name String, product_type String, tool_name String, agent_id String, customer_id String, \
session_id String, occurred_at DateTime, execution_status String, execution_duration_ms Int64, \
input_tokens Int64, output_tokens Int64) ENGINE = MergeTree() PARTITION BY toYYYYMM(occurred_at) \
ORDER BY (tenant_id, occurred_at, idempotency_key)"
    )
}

/// Request bodies with the events each holds, made before the clock starts.
fn bodies(args: &LoadgenArgs, seed: u64, batch_size: usize, now_s: i64) -> Vec<(String, u64)> {
    let mut bodies = Vec::with_capacity((args.events as usize).div_ceil(batch_size));
    let mut n = 0;
    while n < args.events {
        let size = batch_size.min((args.events - n) as usize);
        if args.target == Target::Healthz {
            // A bare GET: one request per event, no body to make.
            bodies.push((String::new(), size as u64));
            n += size as u64;
            continue;
        }
        let mut body = String::with_capacity(size * 360 + 16);
        match args.target {
            Target::Batch => body.push_str(r#"{"events":["#),
            Target::Events | Target::Clickhouse | Target::Freshness | Target::Healthz => {}
        }
        for i in 0..size as u64 {
            let mut e = match args.workload {
                Workload::Uniform => event(seed, n + i, now_s),
                Workload::Sdk => sdk_event(seed, n + i, batch_size as u64, now_s),
            };
            if args.target == Target::Freshness {
                e.session = probe_session(seed, n + i);
            }
            match args.target {
                Target::Clickhouse => e.write_row(&mut body),
                _ => {
                    if i > 0 {
                        body.push(',');
                    }
                    e.write_wire(&mut body);
                }
            }
        }
        if args.target == Target::Batch {
            body.push_str("]}");
        }
        bodies.push((body, size as u64));
        n += size as u64;
    }
    bodies
}

/// The session of freshness probe `n`: its own, so each probe can be looked up alone.
fn probe_session(seed: u64, n: u64) -> String {
    format!("{ID_PREFIX}fresh-{seed}-{n}")
}

/// Reads `url` until it answers 200 (the probe is visible), pausing `poll` between reads.
/// Answers the first status that is not 404, or `None` when the probe was still not visible
/// after `timeout` (a miss).
fn poll_until_visible(
    agent: &ureq::Agent,
    url: &str,
    headers: &[(&str, String)],
    poll: Duration,
    timeout: Duration,
) -> Option<u16> {
    let since = Instant::now();
    loop {
        let (status, _) = answer_of(with_headers(agent.get(url), headers).call());
        if status != 404 {
            return Some(status);
        }
        if since.elapsed() >= timeout {
            return None;
        }
        std::thread::sleep(poll);
    }
}

/// `req` with `headers` added.
fn with_headers<B>(
    mut req: ureq::RequestBuilder<B>,
    headers: &[(&str, String)],
) -> ureq::RequestBuilder<B> {
    for (name, value) in headers {
        req = req.header(*name, value);
    }
    req
}

/// The status and body of an answer, read through so the connection can be kept; status 0
/// when none came.
fn answer_of(answer: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> (u16, Vec<u8>) {
    match answer {
        Ok(mut answer) => {
            let body = answer.body_mut().read_to_vec().unwrap_or_default();
            (answer.status().as_u16(), body)
        }
        Err(_) => (0, Vec::new()),
    }
}

/// The counts of an ingest answer.
#[derive(Default, serde::Deserialize)]
struct Counts {
    #[serde(default)]
    accepted: u64,
    #[serde(default)]
    duplicates: u64,
}

/// What one worker saw.
struct Tally {
    latency_us: hdrhistogram::Histogram<u64>,
    statuses: BTreeMap<u16, u64>,
    events_ok: u64,
    accepted: u64,
    duplicates: u64,
    probe_misses: u64,
}

/// The figures of a run.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    pub target: String,
    /// The seed of the events sent: `--seed` repeats them.
    pub seed: u64,
    pub concurrency: usize,
    pub batch_size: usize,
    pub requests: u64,
    /// Events in requests answered 2xx.
    pub events_ok: u64,
    /// Of those, events the target stored now (for ClickHouse: all of them).
    pub accepted: u64,
    /// Events the ingestor already held (their idempotency key was stored before): an earlier
    /// run with the same seed.
    pub duplicates: u64,
    /// Freshness probes whose session did not appear within `--probe-timeout-seconds`.
    pub probe_misses: u64,
    pub seconds: f64,
    pub events_per_second: f64,
    pub requests_per_second: f64,
    pub latency_ms: BTreeMap<String, f64>,
    /// Answers by HTTP status; 0 counts requests that got no answer.
    pub statuses: BTreeMap<u16, u64>,
}

/// A seed nobody used yet: the clock's nanoseconds and the process id, mixed.
fn fresh_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    // Small enough to type back: 1 to 999,999,999.
    Rng(nanos ^ (u64::from(std::process::id()) << 32)).below(999_999_999) + 1
}

pub fn run(args: &LoadgenArgs) -> anyhow::Result<Summary> {
    anyhow::ensure!(args.concurrency >= 1, "--concurrency must be at least 1");
    let seed = args.seed.unwrap_or_else(fresh_seed);
    if !args.json {
        eprintln!("seed {seed} (--seed {seed} sends the same events again)");
    }
    let batch_size = match args.target {
        Target::Events | Target::Freshness | Target::Healthz => 1,
        _ => args.batch_size.clamp(1, 1000),
    };
    let (url, headers): (String, Vec<(&str, String)>) = match args.target {
        Target::Clickhouse => {
            let base = args.clickhouse_url.trim_end_matches('/');
            let agent = ureq::Agent::new_with_defaults();
            agent
                .post(format!("{base}/"))
                .send(baseline_ddl(&args.clickhouse_table))
                .with_context(|| format!("creating {} on {base}", args.clickhouse_table))?;
            let query = format!("INSERT INTO {} FORMAT JSONEachRow", args.clickhouse_table);
            (
                format!("{base}/?query={}", query.replace(' ', "%20")),
                Vec::new(),
            )
        }
        Target::Healthz => (
            format!("{}/healthz", args.url.trim_end_matches('/')),
            Vec::new(),
        ),
        target => {
            let key = args
                .key
                .clone()
                .context("--key is needed to post to mcp-meter")?;
            let path = if target == Target::Batch {
                "/v1/ingest/batch"
            } else {
                "/v1/ingest/events"
            };
            (
                format!("{}{path}", args.url.trim_end_matches('/')),
                vec![
                    ("X-API-Key", key),
                    ("Content-Type", "application/json".to_string()),
                ],
            )
        }
    };
    // Freshness probes read their session back from here.
    let sessions_url = format!("{}/analytics/mcp/sessions/", args.url.trim_end_matches('/'));
    let poll = Duration::from_millis(args.poll_ms);
    let probe_timeout = Duration::from_secs(args.probe_timeout_seconds);
    let now_s = chrono::Utc::now().timestamp();
    let made = Instant::now();
    let bodies = bodies(args, seed, batch_size, now_s);
    if !args.json {
        eprintln!(
            "made {} events in {} requests in {:.2?}",
            args.events,
            bodies.len(),
            made.elapsed()
        );
    }

    let progress = if args.json {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(args.events)
    };
    progress.set_style(progress_style(args.duration_seconds));
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let tallies = Mutex::new(Vec::new());
    let deadline = args.duration_seconds.map(Duration::from_secs);
    // Open loop: each worker sends one request per `interval`, whatever the answers take.
    let interval = args
        .rate
        .map(|r| Duration::from_secs_f64(args.concurrency as f64 / r.max(1e-9)));
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..args.concurrency {
            scope.spawn(|| {
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .timeout_global(Some(Duration::from_secs(60)))
                    .build()
                    .into();
                let mut tally = Tally {
                    latency_us: hdrhistogram::Histogram::new_with_bounds(1, 60_000_000, 3)
                        .expect("valid bounds"),
                    statuses: BTreeMap::new(),
                    events_ok: 0,
                    accepted: 0,
                    duplicates: 0,
                    probe_misses: 0,
                };
                let mut due = Instant::now();
                loop {
                    if stop.load(Ordering::Relaxed)
                        || deadline.is_some_and(|d| started.elapsed() >= d)
                    {
                        break;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((body, events)) = bodies.get(i).map(|(b, n)| (b, *n)) else {
                        break;
                    };
                    if let Some(interval) = interval {
                        let now = Instant::now();
                        if due > now {
                            std::thread::sleep(due - now);
                        }
                        due += interval;
                    }
                    let sent = Instant::now();
                    let (mut status, answer) = if args.target == Target::Healthz {
                        answer_of(agent.get(&url).call())
                    } else {
                        answer_of(with_headers(agent.post(&url), &headers).send(body.as_bytes()))
                    };
                    let mut took = sent.elapsed();
                    if (200..300).contains(&status) {
                        if matches!(args.target, Target::Clickhouse | Target::Healthz) {
                            tally.accepted += events;
                        } else {
                            let counts: Counts =
                                serde_json::from_slice(&answer).unwrap_or_default();
                            tally.accepted += counts.accepted;
                            tally.duplicates += counts.duplicates;
                        }
                    }
                    if args.target == Target::Freshness && status == 202 {
                        let answered = Instant::now();
                        let url = format!("{sessions_url}{}", probe_session(seed, i as u64));
                        match poll_until_visible(&agent, &url, &headers, poll, probe_timeout) {
                            Some(seen) => status = seen,
                            None => {
                                tally.probe_misses += 1;
                                progress.inc(events);
                                continue;
                            }
                        }
                        took = answered.elapsed();
                    }
                    let _ = tally
                        .latency_us
                        .record((took.as_micros() as u64).clamp(1, 60_000_000));
                    *tally.statuses.entry(status).or_default() += 1;
                    if (200..300).contains(&status) {
                        tally.events_ok += events;
                    }
                    progress.inc(events);
                }
                tallies.lock().expect("tallies").push(tally);
            });
        }
    });
    let seconds = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    progress.finish_and_clear();

    let mut latency =
        hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
    let mut statuses = BTreeMap::new();
    let (mut events_ok, mut accepted, mut duplicates, mut probe_misses) = (0, 0, 0, 0);
    for t in tallies.into_inner().expect("tallies") {
        latency.add(&t.latency_us).expect("same bounds");
        for (s, n) in t.statuses {
            *statuses.entry(s).or_default() += n;
        }
        events_ok += t.events_ok;
        accepted += t.accepted;
        duplicates += t.duplicates;
        probe_misses += t.probe_misses;
    }
    let requests: u64 = statuses.values().sum::<u64>() + probe_misses;
    let ms = |us: u64| us as f64 / 1000.0;
    let latency_ms = BTreeMap::from([
        ("p50".to_string(), ms(latency.value_at_quantile(0.50))),
        ("p90".to_string(), ms(latency.value_at_quantile(0.90))),
        ("p99".to_string(), ms(latency.value_at_quantile(0.99))),
        ("max".to_string(), ms(latency.max())),
    ]);
    Ok(Summary {
        target: format!("{:?}", args.target).to_lowercase(),
        seed,
        concurrency: args.concurrency,
        batch_size,
        requests,
        events_ok,
        accepted,
        duplicates,
        probe_misses,
        seconds,
        events_per_second: events_ok as f64 / seconds,
        requests_per_second: requests as f64 / seconds,
        latency_ms,
        statuses,
    })
}

/// `n thing` or `n things`.
fn count(n: u64, thing: &str) -> String {
    if n == 1 {
        format!("1 {thing}")
    } else {
        format!("{n} {thing}s")
    }
}

/// The bar: elapsed time, events sent, the rate as a whole number, and with `--duration-seconds`
/// the time left before the run stops.
fn progress_style(duration_seconds: Option<u64>) -> indicatif::ProgressStyle {
    let template = match duration_seconds {
        Some(_) => "{elapsed_precise} [{bar:40}] {pos}/{len} events, {rate}, {left} {msg}",
        None => "{elapsed_precise} [{bar:40}] {pos}/{len} events, {rate} {msg}",
    };
    let cap = Duration::from_secs(duration_seconds.unwrap_or(0));
    indicatif::ProgressStyle::with_template(template)
        .expect("a valid template")
        .progress_chars("=> ")
        .with_key(
            "rate",
            |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = w.write_str(&rate_text(state.per_sec()));
            },
        )
        .with_key(
            "left",
            move |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = w.write_str(&time_left_text(cap, state.elapsed()));
            },
        )
}

/// The bar's rate: whole events per second.
fn rate_text(per_second: f64) -> String {
    format!("{per_second:.0} events/s")
}

/// The bar's clock under `--duration-seconds`.
fn time_left_text(cap: Duration, elapsed: Duration) -> String {
    format!(
        "{} s left of {} s",
        cap.saturating_sub(elapsed).as_secs(),
        cap.as_secs()
    )
}

impl Summary {
    /// Why the run failed, when no request succeeded: what the answers were and what to check.
    pub fn failure(&self, url: &str) -> Option<String> {
        if self.requests == 0 || self.events_ok > 0 {
            return None;
        }
        let statuses = self.statuses_text();
        let what = if self.probe_misses == self.requests {
            format!(
                "no freshness probe became visible: is the ingestor's store the one {url} reads, \
and is an aggregator running? (or raise --probe-timeout-seconds)"
            )
        } else if self.statuses.contains_key(&401) {
            "the API refused the key (401): check --key".into()
        } else if self.statuses.contains_key(&403) {
            "the key lacks a scope (403): ingest needs `ingest`, --target freshness also `read`"
                .into()
        } else if self.statuses.contains_key(&0) {
            format!("nothing answered at {url}: is mcp-meter running there (--url)?")
        } else {
            "check the statuses above and the server's log".into()
        };
        Some(format!("every request failed ({statuses}): {what}"))
    }

    fn statuses_text(&self) -> String {
        let mut parts: Vec<String> = self
            .statuses
            .iter()
            .map(|(s, n)| {
                if *s == 0 {
                    format!("no answer x{n}")
                } else {
                    format!("{s} x{n}")
                }
            })
            .collect();
        if self.probe_misses > 0 {
            parts.push(format!("probe missed x{}", self.probe_misses));
        }
        parts.join(", ")
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "target {}: {}, {} per request, seed {}",
            self.target,
            count(self.concurrency as u64, "worker"),
            count(self.batch_size as u64, "event"),
            self.seed
        )?;
        writeln!(
            f,
            "{} taken in {} in {:.2} s: {:.0} events/s, {:.0} requests/s",
            count(self.events_ok, "event"),
            count(self.requests, "request"),
            self.seconds,
            self.events_per_second,
            self.requests_per_second
        )?;
        if self.target != "clickhouse" {
            writeln!(
                f,
                "stored now: {}; duplicates (already stored): {}",
                self.accepted, self.duplicates
            )?;
        }
        let what = if self.target == "freshness" {
            "freshness (202 -> visible in analytics)"
        } else {
            "latency"
        };
        writeln!(
            f,
            "{what}: p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms  max {:.3} ms",
            self.latency_ms["p50"],
            self.latency_ms["p90"],
            self.latency_ms["p99"],
            self.latency_ms["max"]
        )?;
        write!(f, "statuses: {}", self.statuses_text())?;
        if self.duplicates > self.accepted {
            write!(
                f,
                "\nwarning: {} of {} events were duplicates: an earlier run sent seed {}'s events. \
Leave out --seed for fresh ones; the figures above measure deduplication, not ingest.",
                self.duplicates, self.events_ok, self.seed
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn every_id_is_prefixed_and_an_sdk_request_is_one_server_instances_flush() {
        let (seed, now_s, batch) = (42, 1_800_000_000, 100);
        for n in 0..2 * batch {
            for e in [event(seed, n, now_s), sdk_event(seed, n, batch, now_s)] {
                for id in [&e.key, &e.agent, &e.customer, &e.session] {
                    assert!(id.starts_with(ID_PREFIX), "{id}");
                }
                assert!(e.agent.len() <= 36 && e.session.len() <= 64, "{e:?}");
            }
        }
        assert!(probe_session(seed, 3).starts_with(ID_PREFIX));
        // One request of the SDK workload: one customer, 2 agents, 4 sessions, 4 tools, and
        // several calls per session. The uniform one spreads the same 100 events wide.
        let distinct = |events: &[Event], f: fn(&Event) -> String| {
            events.iter().map(f).collect::<HashSet<_>>().len()
        };
        let sdk: Vec<Event> = (batch..2 * batch)
            .map(|n| sdk_event(seed, n, batch, now_s))
            .collect();
        assert_eq!(distinct(&sdk, |e| e.customer.clone()), 1);
        assert!(distinct(&sdk, |e| e.agent.clone()) <= 2);
        assert!(distinct(&sdk, |e| e.session.clone()) <= 4);
        assert!(distinct(&sdk, |e| e.tool.to_string()) <= 4);
        let uniform: Vec<Event> = (0..batch).map(|n| event(seed, n, now_s)).collect();
        assert!(distinct(&uniform, |e| e.session.clone()) > 50);
        // The same seed makes the same events.
        assert_eq!(
            sdk_event(seed, 7, batch, now_s).session,
            sdk_event(seed, 7, batch, now_s).session
        );
    }

    #[test]
    fn the_bar_shows_whole_rates_and_under_a_duration_the_time_left() {
        assert_eq!(rate_text(1234.5678), "1235 events/s");
        assert_eq!(
            time_left_text(Duration::from_secs(60), Duration::from_millis(12_400)),
            "47 s left of 60 s"
        );
        assert_eq!(
            time_left_text(Duration::from_secs(5), Duration::from_secs(9)),
            "0 s left of 5 s"
        );
        // Both templates parse (with_template panics on one it cannot read).
        progress_style(Some(60));
        progress_style(None);
    }

    #[test]
    fn counts_are_singular_for_one() {
        assert_eq!(count(1, "worker"), "1 worker");
        assert_eq!(count(8, "worker"), "8 workers");
        assert_eq!(count(0, "event"), "0 events");
    }

    #[test]
    fn fresh_seeds_differ_and_can_be_typed_back() {
        let (a, b) = (fresh_seed(), fresh_seed());
        assert_ne!(a, b);
        assert!((1..1_000_000_000).contains(&a), "{a}");
    }

    #[test]
    fn the_stream_is_seeded_and_each_event_has_its_own_key() {
        let now = 1_795_181_530;
        assert_eq!(event(7, 3, now), event(7, 3, now));
        assert_ne!(event(7, 3, now), event(8, 3, now));
        let keys: std::collections::HashSet<String> =
            (0..1000).map(|n| event(1, n, now).key).collect();
        assert_eq!(keys.len(), 1000);
        let e = event(1, 0, now);
        assert!((now - 3600..now - 59).contains(&e.occurred_at_s));
    }

    #[test]
    fn both_targets_carry_the_same_event() {
        let e = event(1, 42, 1_795_181_530);
        let (mut wire, mut row) = (String::new(), String::new());
        e.write_wire(&mut wire);
        e.write_row(&mut row);
        let wire: serde_json::Value = serde_json::from_str(&wire).unwrap();
        let row: serde_json::Value = serde_json::from_str(&row).unwrap();
        assert_eq!(wire["idempotencyKey"], row["idempotency_key"]);
        assert_eq!(wire["toolName"], row["tool_name"]);
        assert_eq!(wire["metadata"]["inputTokens"], row["input_tokens"]);
        let at = wire["occurredAt"]
            .as_str()
            .unwrap()
            .replace('T', " ")
            .replace('Z', "");
        assert_eq!(row["occurred_at"], at);
    }
}
