//! Measures the by-tool analytics query over a large tenant, on ClickHouse and on SQLite.
//!
//! Writes the same seeded events (one tenant, 30 days, 50 tools, 200 agents, 20,000 sessions)
//! into a fresh ClickHouse database and a fresh SQLite file through each store's own writer,
//! in commits of 20,000, then times `revenue_by_tool` over the 30 days several times on each.
//!
//!     cargo run --release --example store_by_tool -- --clickhouse-url http://127.0.0.1:8123
//!
//! Prints write rates and the query's median and spread. Documented in docs/BENCHMARKS.md.

use backends::sink::TenantBatch;
use backends::store::clickhouse::{
    migrations, ClickHouseAnalytics, ClickHouseWriter, HttpRunner, SqlRunner,
};
use backends::store::{sqlite, AnalyticsStore, StoreWriter, Viewer};
use clap::Parser;
use schemas::analytics::DateRange;
use schemas::event::{ExecutionStatus, RatedEvent};
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    clickhouse_url: String,
    #[arg(long, default_value_t = 1_000_000)]
    events: usize,
    #[arg(long, default_value_t = 9)]
    runs: usize,
    #[arg(long, default_value_t = 20_000)]
    commit_events: usize,
}

const DAY_MS: i64 = 86_400_000;

fn event(i: usize, end_ms: i64) -> RatedEvent {
    let n = i as i64;
    RatedEvent {
        received_at_ms: end_ms,
        tool_name: format!("tool_{}", (n * 31) % 50),
        agent_id: format!("agent_{}", (n * 17) % 200),
        customer_id: format!("cust_{}", n % 20),
        session_id: format!("sess_{}", (n * 13) % 20_000),
        execution_status: if n % 23 == 0 {
            ExecutionStatus::Error
        } else {
            ExecutionStatus::Success
        },
        execution_duration_ms: (n * 37) % 5000,
        input_tokens: (n * 101) % 4000,
        output_tokens: (n * 53) % 2000,
        revenue_micros: 5000 + (n * 101) % 4000,
        cogs_micros: 200 + (n * 7) % 3000,
        ..RatedEvent::sample_call(&format!("bench-{i}"), end_ms - (n * 7919) % (30 * DAY_MS))
    }
}

async fn load(writer: &mut dyn StoreWriter, args: &Args, end_ms: i64) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut i = 0;
    while i < args.events {
        let n = args.commit_events.min(args.events - i);
        let batch = TenantBatch::new(
            "bench".into(),
            (i..i + n).map(|j| event(j, end_ms)).collect(),
        );
        writer.write(&[batch]).await?;
        i += n;
    }
    Ok(started.elapsed())
}

async fn time_query(
    store: &dyn AnalyticsStore,
    range: DateRange,
    runs: usize,
) -> anyhow::Result<(Vec<Duration>, i64)> {
    let mut times = Vec::new();
    let mut calls = 0;
    for _ in 0..runs {
        let started = Instant::now();
        let tools = store
            .revenue_by_tool(&Viewer::tenant("bench"), range)
            .await?;
        times.push(started.elapsed());
        calls = tools.iter().map(|t| t.figures.calls).sum();
    }
    times.sort();
    Ok((times, calls))
}

fn report(name: &str, times: &[Duration], calls: i64) {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{name}: by-tool over {calls} calls: median {:.1} ms (min {:.1}, max {:.1}, {} runs)",
        ms(times[times.len() / 2]),
        ms(times[0]),
        ms(times[times.len() - 1]),
        times.len()
    );
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    actix_web::rt::System::new().block_on(async move {
        let end_ms = chrono::Utc::now().timestamp_millis();
        let today = chrono::Utc::now().date_naive();
        let range = DateRange {
            from: today - chrono::Days::new(30),
            to: today,
        };

        let mut ch = schemas::config::ClickHouseConfig {
            url: args.clickhouse_url.clone(),
            ..Default::default()
        };
        ch.database = format!("bench_by_tool_{}", std::process::id());
        let (server, db) = (HttpRunner::server(&ch), HttpRunner::new(&ch));
        migrations::migrate(&server, &db, &ch.database).await?;
        let took = load(&mut ClickHouseWriter::new(db.clone()), &args, end_ms).await?;
        println!(
            "clickhouse: wrote {} events in {:.1} s ({:.0} events/s)",
            args.events,
            took.as_secs_f64(),
            args.events as f64 / took.as_secs_f64()
        );

        let dir = tempfile::tempdir()?;
        let (mut writer, sqlite_reader) = sqlite::open(dir.path(), &Default::default())?;
        let took = load(&mut writer, &args, end_ms).await?;
        println!(
            "sqlite:     wrote {} events in {:.1} s ({:.0} events/s)",
            args.events,
            took.as_secs_f64(),
            args.events as f64 / took.as_secs_f64()
        );

        let (times, calls) =
            time_query(&ClickHouseAnalytics::new(db.clone()), range, args.runs).await?;
        report("clickhouse 18.16", &times, calls);
        let (times, calls) = time_query(&sqlite_reader, range, args.runs).await?;
        report("sqlite", &times, calls);
        server
            .execute(&format!("DROP DATABASE {}", ch.database))
            .await
            .ok();
        Ok(())
    })
}
