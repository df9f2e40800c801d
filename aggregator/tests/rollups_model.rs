//! The embedded store's rollups against an oracle of this test's own: seeded random sequences
//! of commits through the real group commit and SQLite writer (keys repeated inside and across
//! batches, heartbeats that end sessions, three tenants, two days), reads, commits the store
//! refuses, and restarts after rows were stored by another process. Every read equals the
//! oracle's sums of the unique events; at the end each rollup table equals its rebuild from the
//! raw rows.
//!
//! 12 seeds from the clock; `MCP_METER_TEST_ROLLUPS_SEED=<n>` starts there and
//! `MCP_METER_TEST_ROLLUPS_RUNS` sets how many. A failure prints its seed and the shortest
//! sequence of steps found that still fails (`schemas::search::shrink`).

use aggregator::group_commit::{GroupCommit, GroupCommitConfig};
use backends::sink::{EventSink, TenantBatch};
use backends::store::{sqlite, AnalyticsStore, StoreWriter, Viewer};
use schemas::analytics::{DateRange, UsageFigures};
use schemas::config::SqliteConfig;
use schemas::event::{ExecutionStatus, RatedEvent, HEARTBEAT_METRIC};
use schemas::search::{env_number, listing, shrink, Failure};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::time::Duration;

const TENANTS: [&str; 3] = ["t0", "t1", "t2"];
/// 2026-11-20 and 2026-11-21, 00:00 UTC.
const DAYS_MS: [i64; 2] = [1_795_132_800_000, 1_795_219_200_000];

#[derive(Clone, Debug)]
enum Step {
    /// One request: its tenant and events.
    Commit(usize, Vec<RatedEvent>),
    /// A summary of one tenant, and the detail of one session.
    Read(usize, String),
    /// A request whose commit the store refuses (a rollup write fails): nothing of it stays.
    Refused(usize, Vec<RatedEvent>),
    /// The process is stopped, another stores rows, and the store is opened again.
    Restart(usize, Vec<RatedEvent>),
}

fn xorshift(mut state: u64) -> impl FnMut() -> u64 {
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    }
}

fn steps(seed: u64) -> Vec<Step> {
    let mut next = xorshift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut keys = 0u64;
    let mut events = |next: &mut dyn FnMut() -> u64, n: u64| -> Vec<RatedEvent> {
        (0..n)
            .map(|_| {
                // One key in five is an earlier one: a retry, in this batch or another.
                let key = if keys > 0 && next().is_multiple_of(5) {
                    next() % keys
                } else {
                    keys += 1;
                    keys - 1
                };
                event(key)
            })
            .collect()
    };
    let count = 10 + next() % 30;
    (0..count)
        .map(|_| match next() % 10 {
            0..=5 => {
                let n = 1 + next() % 40;
                Step::Commit((next() % 3) as usize, events(&mut next, n))
            }
            6 | 7 => Step::Read((next() % 3) as usize, format!("s{}", next() % 6)),
            8 => {
                let n = 1 + next() % 20;
                Step::Refused((next() % 3) as usize, events(&mut next, n))
            }
            _ => {
                let n = 1 + next() % 20;
                Step::Restart((next() % 3) as usize, events(&mut next, n))
            }
        })
        .collect()
}

/// The event a key stands for: the same key always makes the same event, as a retry does.
fn event(key: u64) -> RatedEvent {
    let mut r = xorshift(key.wrapping_mul(2_654_435_761) | 1);
    let at = DAYS_MS[(r() % 2) as usize] + (r() % 86_400_000) as i64;
    let session = format!("s{}", r() % 6);
    let heartbeat = r().is_multiple_of(8);
    RatedEvent {
        tool_name: if heartbeat {
            String::new()
        } else {
            format!("tool_{}", r() % 4)
        },
        agent_id: format!("agent_{}", r() % 3),
        customer_id: format!("cust_{}", r() % 2),
        session_id: session,
        metric_name: if heartbeat {
            HEARTBEAT_METRIC.into()
        } else {
            "mcp_server.tool_invocations".into()
        },
        session_boundary: if heartbeat && r().is_multiple_of(2) {
            "SESSION_END".into()
        } else {
            String::new()
        },
        execution_status: if r().is_multiple_of(7) {
            ExecutionStatus::Error
        } else {
            ExecutionStatus::Success
        },
        execution_duration_ms: (r() % 900) as i64,
        input_tokens: (r() % 1000) as i64,
        output_tokens: (r() % 1000) as i64,
        revenue_micros: if heartbeat { 0 } else { (r() % 9000) as i64 },
        cogs_micros: if heartbeat { 0 } else { (r() % 4000) as i64 },
        ..RatedEvent::sample_call(&format!("k{key}"), at)
    }
}

/// The unique events stored, per tenant and key: what every read must add up to.
#[derive(Default)]
struct Oracle {
    stored: Vec<BTreeMap<String, RatedEvent>>,
}

impl Oracle {
    /// Records a request's events; answers how many were new.
    fn store(&mut self, tenant: usize, events: &[RatedEvent]) -> usize {
        if self.stored.is_empty() {
            self.stored = vec![BTreeMap::new(); TENANTS.len()];
        }
        events
            .iter()
            .filter(|e| {
                self.stored[tenant]
                    .insert(e.idempotency_key.clone(), (*e).clone())
                    .is_none()
            })
            .count()
    }

    fn calls(&self, tenant: usize) -> impl Iterator<Item = &RatedEvent> {
        self.stored
            .get(tenant)
            .into_iter()
            .flat_map(|m| m.values())
            .filter(|e| e.is_call())
    }

    /// (figures, distinct sessions, tools, agents) over both days.
    fn summary(&self, tenant: usize) -> (UsageFigures, usize, usize, usize) {
        let mut figures = UsageFigures::default();
        let (mut sessions, mut tools, mut agents) =
            (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
        for e in self.calls(tenant) {
            figures.record(e);
            sessions.insert(&e.session_id);
            tools.insert(&e.tool_name);
            agents.insert(&e.agent_id);
        }
        (figures, sessions.len(), tools.len(), agents.len())
    }

    /// (calls, revenue, first seen, last seen, ended) of one session, if it has any row.
    fn session(&self, tenant: usize, session: &str) -> Option<(i64, i64, i64, i64, bool)> {
        let rows: Vec<&RatedEvent> = self
            .stored
            .get(tenant)?
            .values()
            .filter(|e| e.session_id == session)
            .collect();
        if rows.is_empty() {
            return None;
        }
        let calls: Vec<&&RatedEvent> = rows.iter().filter(|e| e.is_call()).collect();
        Some((
            calls.len() as i64,
            calls.iter().map(|e| e.revenue_micros).sum(),
            rows.iter().map(|e| e.occurred_at_ms).min().unwrap(),
            rows.iter().map(|e| e.occurred_at_ms).max().unwrap(),
            rows.iter()
                .any(|e| e.is_heartbeat() && e.session_boundary == "SESSION_END"),
        ))
    }
}

struct Running {
    sink: GroupCommit,
    writer: std::thread::JoinHandle<()>,
    analytics: sqlite::SqliteAnalytics,
}

fn start(dir: &Path) -> Running {
    let (writer, analytics) = sqlite::open(dir, &SqliteConfig::default()).unwrap();
    let config = GroupCommitConfig {
        max_commit_events: 100,
        queue_capacity_batches: 64,
    };
    let (sink, writer) = GroupCommit::start(writer, config).unwrap();
    Running {
        sink,
        writer,
        analytics,
    }
}

fn range() -> DateRange {
    let today = chrono::NaiveDate::from_ymd_opt(2026, 11, 21).unwrap();
    DateRange::parse(Some("2026-11-20"), Some("2026-11-21"), today).unwrap()
}

fn db(dir: &Path) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(dir.join(sqlite::DB_FILE)).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn
}

async fn read(
    running: &Running,
    oracle: &Oracle,
    tenant: usize,
    session: &str,
) -> Result<(), String> {
    let viewer = Viewer::tenant(TENANTS[tenant]);
    let summary = running
        .analytics
        .summary(&viewer, range())
        .await
        .map_err(|e| format!("summary: {e}"))?;
    let got = (
        summary.figures,
        summary.sessions as usize,
        summary.tools as usize,
        summary.agents as usize,
    );
    if got != oracle.summary(tenant) {
        return Err(format!(
            "{} summary {got:?}, the oracle's {:?}",
            TENANTS[tenant],
            oracle.summary(tenant)
        ));
    }
    let detail = running
        .analytics
        .session(&viewer, session)
        .await
        .map_err(|e| format!("session: {e}"))?
        .map(|d| {
            let s = d.session;
            (
                s.figures.calls,
                s.figures.revenue_micros,
                s.first_seen,
                s.last_seen,
                s.ended,
            )
        });
    let expected = oracle.session(tenant, session);
    if detail != expected {
        return Err(format!(
            "{} session {session}: {detail:?}, the oracle's {expected:?}",
            TENANTS[tenant]
        ));
    }
    Ok(())
}

/// Each rollup table against its rebuild from the raw rows.
fn rollups_equal_their_rebuild(dir: &Path) -> Result<(), String> {
    let conn = db(dir);
    let checks = [
        (
            "mcp_daily_stats",
            "SELECT tenant_id, day, customer_id, agent_id, tool_name, calls, errors,
                    quantity_micros, revenue_micros, cogs_micros, input_tokens, output_tokens,
                    duration_ms_sum, duration_ms_max FROM mcp_daily_stats",
            "SELECT tenant_id, strftime('%Y-%m-%d', occurred_at_ms / 1000, 'unixepoch'),
                    customer_id, agent_id, tool_name, count(*),
                    sum(execution_status IN ('TIMEOUT','ERROR','VALIDATION_FAILED','FAILED','FAILURE')),
                    sum(quantity_micros), sum(revenue_micros), sum(cogs_micros), sum(input_tokens),
                    sum(output_tokens), sum(execution_duration_ms), max(execution_duration_ms)
             FROM mcp_events WHERE metric_name != 'system.session.heartbeat'
             GROUP BY 1, 2, 3, 4, 5",
        ),
        (
            "mcp_hourly_stats",
            "SELECT tenant_id, hour_ms, customer_id, agent_id, tool_name, calls, revenue_micros
             FROM mcp_hourly_stats",
            "SELECT tenant_id, occurred_at_ms / 3600000 * 3600000, customer_id, agent_id,
                    tool_name, count(*), sum(revenue_micros)
             FROM mcp_events WHERE metric_name != 'system.session.heartbeat'
             GROUP BY 1, 2, 3, 4, 5",
        ),
        (
            "mcp_daily_sessions",
            "SELECT tenant_id, day, customer_id, agent_id, tool_name, session_id
             FROM mcp_daily_sessions",
            "SELECT DISTINCT tenant_id, strftime('%Y-%m-%d', occurred_at_ms / 1000, 'unixepoch'),
                    customer_id, agent_id, tool_name, session_id
             FROM mcp_events WHERE metric_name != 'system.session.heartbeat' AND session_id != ''",
        ),
        (
            "mcp_session_summary",
            "SELECT tenant_id, session_id, tool_name, agent_id, first_seen_ms, last_seen_ms,
                    ended, calls, revenue_micros FROM mcp_session_summary",
            "SELECT tenant_id, session_id,
                    CASE WHEN metric_name = 'system.session.heartbeat' THEN '' ELSE tool_name END,
                    max(agent_id), min(occurred_at_ms), max(occurred_at_ms),
                    max(metric_name = 'system.session.heartbeat' AND session_boundary = 'SESSION_END'),
                    sum(metric_name != 'system.session.heartbeat'), sum(revenue_micros)
             FROM mcp_events WHERE session_id != '' GROUP BY 1, 2, 3",
        ),
    ];
    let rows = |sql: &str| -> BTreeSet<String> {
        let mut statement = conn.prepare(sql).unwrap();
        let columns = statement.column_count();
        statement
            .query_map([], |row| {
                Ok((0..columns)
                    .map(|i| format!("{:?}", row.get_ref(i).unwrap()))
                    .collect::<Vec<_>>()
                    .join("|"))
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    for (table, stored, rebuilt) in checks {
        let (stored, rebuilt) = (rows(stored), rows(rebuilt));
        if stored != rebuilt {
            let missing: Vec<_> = rebuilt.difference(&stored).take(3).collect();
            let extra: Vec<_> = stored.difference(&rebuilt).take(3).collect();
            return Err(format!(
                "{table} differs from its rebuild: missing {missing:?}, extra {extra:?}"
            ));
        }
    }
    Ok(())
}

async fn run_steps(steps: &[Step]) -> Result<(), Failure> {
    let dir = tempfile::tempdir().unwrap();
    let mut running = start(dir.path());
    let mut oracle = Oracle::default();
    for (n, step) in steps.iter().enumerate() {
        let at = |e: String| (n, format!("{step:?}: {e}"));
        match step {
            Step::Commit(tenant, events) => {
                let batch = TenantBatch::new(TENANTS[*tenant].into(), events.clone());
                let outcome = running
                    .sink
                    .publish(batch)
                    .await
                    .map_err(|e| at(e.to_string()))?;
                let new = oracle.store(*tenant, events);
                if outcome.accepted != new {
                    return Err(at(format!(
                        "{} accepted, {new} new to the oracle",
                        outcome.accepted
                    )));
                }
            }
            Step::Read(tenant, session) => read(&running, &oracle, *tenant, session)
                .await
                .map_err(at)?,
            Step::Refused(tenant, events) => {
                let conn = db(dir.path());
                conn.execute_batch(
                    "CREATE TRIGGER refuse BEFORE INSERT ON mcp_daily_stats
                     BEGIN SELECT RAISE(ABORT, 'refused by test'); END;",
                )
                .unwrap();
                let batch = TenantBatch::new(TENANTS[*tenant].into(), events.clone());
                let refused = running.sink.publish(batch).await;
                conn.execute_batch("DROP TRIGGER refuse").unwrap();
                // Only a batch with a new call writes mcp_daily_stats; any other is stored.
                let new_call = events.iter().any(|e| {
                    e.is_call()
                        && !oracle
                            .stored
                            .get(*tenant)
                            .is_some_and(|m| m.contains_key(&e.idempotency_key))
                });
                match refused {
                    Ok(_) if new_call => {
                        return Err(at("a commit whose rollup write failed was answered".into()))
                    }
                    Ok(_) => {
                        oracle.store(*tenant, events);
                    }
                    Err(e) if !e.to_string().contains("refused by test") => {
                        return Err(at(format!("refused for another reason: {e}")))
                    }
                    Err(_) => {}
                }
            }
            Step::Restart(tenant, events) => {
                let Running { sink, writer, .. } = running;
                drop(sink);
                writer.join().unwrap();
                // Another process stores rows, then the store is opened again.
                {
                    let (mut other, _) =
                        sqlite::open(dir.path(), &SqliteConfig::default()).unwrap();
                    let batch = TenantBatch::new(TENANTS[*tenant].into(), events.clone());
                    let outcomes = other.write(&[batch]).await.map_err(|e| at(e.to_string()))?;
                    let new = oracle.store(*tenant, events);
                    if outcomes[0].accepted != new {
                        return Err(at(format!(
                            "{} accepted, {new} new to the oracle",
                            outcomes[0].accepted
                        )));
                    }
                }
                running = start(dir.path());
            }
        }
    }
    // What the last step left: after it, as the shrinker counts.
    let end = |e: String| (steps.len(), e);
    for tenant in 0..TENANTS.len() {
        read(&running, &oracle, tenant, "s0").await.map_err(end)?;
    }
    let Running { sink, writer, .. } = running;
    drop(sink);
    writer.join().unwrap();
    rollups_equal_their_rebuild(dir.path()).map_err(end)
}

/// One sequence on a runtime of its own, so that the shared shrinker can run it again.
fn run(steps: &[Step]) -> Result<(), Failure> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(run_steps(steps))
}

#[test]
fn rollups_equal_the_oracle_through_refused_commits_and_restarts() {
    let first = env_number(
        "MCP_METER_TEST_ROLLUPS_SEED",
        chrono::Utc::now().timestamp() as u64,
    );
    let seeds: Vec<u64> = (first..first + env_number("MCP_METER_TEST_ROLLUPS_RUNS", 12)).collect();
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for &seed in &seeds {
        let steps = steps(seed);
        for step in &steps {
            *counts
                .entry(match step {
                    Step::Commit(..) => "commits",
                    Step::Read(..) => "reads",
                    Step::Refused(..) => "refused commits",
                    Step::Restart(..) => "restarts after another process stored rows",
                })
                .or_default() += 1;
        }
        if let Err(failure) = run(&steps) {
            let (shortest, (at, why)) = shrink(steps, failure, run);
            panic!(
                "seed {seed} (replay with MCP_METER_TEST_ROLLUPS_SEED={seed} \
                 MCP_METER_TEST_ROLLUPS_RUNS=1): at step {at} of the shortest failing sequence: \
                 {why}\n{}",
                listing(&shortest)
            );
        }
    }
    println!("seeds {seeds:?} passed: {counts:?}");
}
