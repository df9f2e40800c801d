//! Measures the by-tool analytics query over a large tenant, on ClickHouse and on SQLite.
//!
//! Writes the same seeded events (one tenant, 30 days, 50 tools, 200 agents, 20,000 sessions)
//! into a fresh ClickHouse database and a fresh SQLite file through each store's own writer,
//! in commits of 20,000, then times `revenue_by_tool` over the 30 days several times on each.
//!
//!     cargo run --release --example store_by_tool -- --clickhouse-url http://127.0.0.1:8123
//!
//! Prints write rates and the query's median and spread. Then times the hourly series per tool
//! over the same 30 days both ways an hourly answer can be had: from the hourly rollup
//! (`series_rows`, what `/analytics/mcp/timeseries?interval=hour` reads) and from the raw rows
//! (one GROUP BY over `mcp_events`), and checks that the two agree. Documented in
//! docs/BENCHMARKS.md.

use backends::sink::TenantBatch;
use backends::store::clickhouse::{
    migrations, ClickHouseAnalytics, ClickHouseWriter, HttpRunner, SqlRunner,
};
use backends::store::{sqlite, AnalyticsStore, StoreWriter, Viewer};
use clap::Parser;
use schemas::analytics::{DateRange, GroupBy, Interval, SeriesQuery, SeriesRow};
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

/// Runs `query` `runs` times; answers the sorted times and the last answer.
async fn timed<T, F, Fut>(runs: usize, mut query: F) -> anyhow::Result<(Vec<Duration>, T)>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let mut times = Vec::new();
    let mut last = None;
    for _ in 0..runs {
        let started = Instant::now();
        last = Some(query().await?);
        times.push(started.elapsed());
    }
    times.sort();
    Ok((times, last.expect("at least one run")))
}

/// The hourly series per tool from the raw rows, in `series_rows`' order and figures.
fn sqlite_raw_series(
    path: &std::path::Path,
    start_ms: i64,
    end_ms: i64,
) -> anyhow::Result<Vec<SeriesRow>> {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let errors: Vec<String> = ExecutionStatus::ALL
        .into_iter()
        .filter(|s| s.is_error())
        .map(|s| format!("'{}'", s.as_str()))
        .collect();
    let sql = format!(
        "SELECT tool_name, (occurred_at_ms / 3600000) * 3600000, COUNT(*),
                SUM(execution_status IN ({})), SUM(revenue_micros), SUM(cogs_micros),
                SUM(input_tokens), SUM(output_tokens), SUM(execution_duration_ms),
                MAX(execution_duration_ms)
         FROM mcp_events WHERE tenant_id = 'bench' AND occurred_at_ms >= ?1 AND occurred_at_ms < ?2
             AND metric_name != '{}'
         GROUP BY 1, 2 ORDER BY 1, 2",
        errors.join(", "),
        schemas::event::HEARTBEAT_METRIC
    );
    let mut stmt = conn.prepare(&sql)?;
    let rows = stmt
        .query_map([start_ms, end_ms], |r| {
            Ok(SeriesRow {
                key: r.get(0)?,
                start_ms: r.get(1)?,
                figures: schemas::analytics::UsageFigures {
                    calls: r.get(2)?,
                    errors: r.get(3)?,
                    revenue_micros: r.get(4)?,
                    cogs_micros: r.get(5)?,
                    input_tokens: r.get(6)?,
                    output_tokens: r.get(7)?,
                    duration_ms_sum: r.get(8)?,
                    duration_ms_max: r.get(9)?,
                },
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// The same from ClickHouse's raw rows: the answer's text (compared with the rollup's rows
/// by their count and total calls).
fn clickhouse_raw_series(start_ms: i64, end_ms: i64) -> String {
    format!(
        "SELECT tool_name, toInt64(toUnixTimestamp(toStartOfHour(occurred_at))) * 1000 AS h, \
count(), sum(is_error), sum(revenue_micros), sum(cogs_micros), sum(input_tokens), \
sum(output_tokens), sum(execution_duration_ms), max(execution_duration_ms) FROM mcp_events \
WHERE tenant_id = 'bench' AND occurred_at >= toDateTime({}, 'UTC') \
AND occurred_at < toDateTime({}, 'UTC') AND is_call = 1 GROUP BY tool_name, h ORDER BY tool_name, h",
        start_ms / 1000,
        end_ms / 1000
    )
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
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

        // Hourly series per tool over the 30 days: the rollup against the raw rows.
        let query = SeriesQuery::new(range, Interval::Hour, Some(GroupBy::Tool))
            .map_err(anyhow::Error::msg)?;
        let (start_ms, end_ms) = range.bounds_ms();
        let viewer = Viewer::tenant("bench");
        let ch_reader = ClickHouseAnalytics::new(db.clone());
        let (ch_rollup, ch_rows) = timed(args.runs, || async {
            Ok(ch_reader.series_rows(&viewer, query).await?)
        })
        .await?;
        let raw_sql = clickhouse_raw_series(start_ms, end_ms);
        let (ch_raw, ch_text) =
            timed(args.runs, || async { Ok(db.tab_separated(&raw_sql).await?) }).await?;
        anyhow::ensure!(
            ch_text.lines().count() == ch_rows.len(),
            "clickhouse: the raw rows give {} buckets, the rollup {}",
            ch_text.lines().count(),
            ch_rows.len()
        );
        let (sq_rollup, sq_rows) = timed(args.runs, || async {
            Ok(sqlite_reader.series_rows(&viewer, query).await?)
        })
        .await?;
        let path = dir.path().join(sqlite::DB_FILE);
        let (sq_raw, sq_raw_rows) =
            timed(args.runs, || async { sqlite_raw_series(&path, start_ms, end_ms) }).await?;
        anyhow::ensure!(sq_raw_rows == sq_rows, "sqlite: the raw rows and the rollup differ");
        anyhow::ensure!(sq_rows == ch_rows, "sqlite and clickhouse rollups differ");
        for (name, rollup, raw) in [("clickhouse 18.16", &ch_rollup, &ch_raw), ("sqlite", &sq_rollup, &sq_raw)] {
            let (a, b) = (ms(rollup[rollup.len() / 2]), ms(raw[raw.len() / 2]));
            println!(
                "{name}: hourly series per tool ({} buckets): rollup median {a:.1} ms, raw rows median {b:.1} ms, raw / rollup {:.1}x",
                sq_rows.len(),
                b / a
            );
        }
        server
            .execute(&format!("DROP DATABASE {}", ch.database))
            .await
            .ok();
        Ok(())
    })
}
