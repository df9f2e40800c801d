//! Measures what a gateway or SDK asks before each tool call, one request at a time over a
//! kept-alive connection, against a running `serve` or `ingestor`: `GET /v1/guard/check`, or
//! with `--authorize CUSTOMER` `POST /v1/authorize` (a fresh nonce each time; each authorization
//! is released afterwards, untimed, as a finished call would settle it, so the customer's calls
//! in flight stay at one).
//!
//!     cargo run --release --example guard_check -- --url http://127.0.0.1:8080 --key KEY
//!
//! Alternates each request with a `GET /healthz` on the same connection, the bare HTTP round
//! trip, so that both see the same machine noise; prints p50/p90/p99/max of each, and the
//! request's cost over the round trip. Documented in docs/BENCHMARKS.md.

use clap::Parser;
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    /// Base URL of the API.
    #[arg(long)]
    url: String,
    /// An API key with the `ingest` scope.
    #[arg(long)]
    key: String,
    /// Checks measured (as many `/healthz` beside them).
    #[arg(long, default_value_t = 10_000)]
    requests: usize,
    /// Requests of each kind sent first and not measured.
    #[arg(long, default_value_t = 500)]
    warmup: usize,
    /// What is checked.
    #[arg(
        long,
        default_value = "agentId=agent_1&toolName=tool_1&sessionId=sess_1"
    )]
    query: String,
    /// Measure `POST /v1/authorize` for this customer instead of the guard check (give it a
    /// balance first).
    #[arg(long)]
    authorize: Option<String>,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let check_url = format!(
        "{}/v1/guard/check?{}",
        args.url.trim_end_matches('/'),
        args.query
    );
    let health_url = format!("{}/healthz", args.url.trim_end_matches('/'));
    let base = args.url.trim_end_matches('/');
    let time = |url: &str, key: bool| -> anyhow::Result<(Duration, String)> {
        let started = Instant::now();
        let mut req = agent.get(url);
        if key {
            req = req.header("X-API-Key", &args.key);
        }
        let mut answer = req.call()?;
        let body = answer.body_mut().read_to_string()?;
        let took = started.elapsed();
        anyhow::ensure!(answer.status() == 200, "{url}: {} {body}", answer.status());
        Ok((took, body))
    };
    let post = |path: &str, body: &str| -> anyhow::Result<(Duration, String)> {
        let started = Instant::now();
        let mut answer = agent
            .post(format!("{base}{path}"))
            .header("X-API-Key", &args.key)
            .header("Content-Type", "application/json")
            .send(body)?;
        let text = answer.body_mut().read_to_string()?;
        let took = started.elapsed();
        anyhow::ensure!(answer.status() == 200, "{path}: {} {text}", answer.status());
        Ok((took, text))
    };
    let run = std::process::id();
    // One request of the kind measured; `n` makes each authorization's nonce new.
    let ask = |n: usize| -> anyhow::Result<(Duration, String)> {
        let Some(customer) = &args.authorize else {
            return time(&check_url, true);
        };
        let nonce = format!("bench-{run}-{n}");
        let body = format!(
            r#"{{"nonce":"{nonce}","customerId":"{customer}","toolName":"tool_1","agentId":"agent_1","sessionId":"sess_1"}}"#
        );
        let answer = post("/v1/authorize", &body)?;
        post(&format!("/v1/authorize/{nonce}/release"), "")?;
        Ok(answer)
    };
    let (_, sample) = ask(0)?;
    println!("answers: {sample}");
    for n in 0..args.warmup {
        ask(n + 1)?;
        time(&health_url, false)?;
    }
    let mut checks = Vec::with_capacity(args.requests);
    let mut health = Vec::with_capacity(args.requests);
    let started = Instant::now();
    for n in 0..args.requests {
        checks.push(ask(args.warmup + 1 + n)?.0);
        health.push(time(&health_url, false)?.0);
    }
    let wall = started.elapsed();
    checks.sort();
    health.sort();
    let line = |name: &str, d: &[Duration]| {
        let ms = |p| percentile(d, p).as_secs_f64() * 1000.0;
        println!(
            "{name:>14}: p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms  max {:.3} ms",
            ms(50.0),
            ms(90.0),
            ms(99.0),
            d[d.len() - 1].as_secs_f64() * 1000.0
        );
    };
    println!(
        "{} checks and {} /healthz, alternating, in {wall:.2?}",
        checks.len(),
        health.len()
    );
    line(
        if args.authorize.is_some() {
            "authorize"
        } else {
            "guard check"
        },
        &checks,
    );
    line("/healthz", &health);
    let ratio = |p| percentile(&checks, p).as_secs_f64() / percentile(&health, p).as_secs_f64();
    println!(
        "asked / healthz: p50 {:.2}x  p99 {:.2}x",
        ratio(50.0),
        ratio(99.0)
    );
    Ok(())
}
