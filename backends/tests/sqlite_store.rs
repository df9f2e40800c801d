//! The SQLite store against a real database file: dedup, rollups, atomicity, analytics.

use backends::sink::{TenantBatch, WriteOutcome};
use backends::store::{sqlite, AnalyticsStore, SessionQuery, StoreWriter, Viewer};
use schemas::analytics::{DateRange, UsageFigures};
use schemas::config::SqliteConfig;
use schemas::event::{ExecutionStatus, RatedEvent, HEARTBEAT_METRIC};

/// 2026-11-20T00:00:00Z
const DAY0: i64 = 1_795_132_800_000;
const HOUR: i64 = 3_600_000;

fn event(key: &str, tool: &str, agent: &str, session: &str, at: i64) -> RatedEvent {
    RatedEvent {
        tool_name: tool.into(),
        agent_id: agent.into(),
        customer_id: "cust".into(),
        session_id: session.into(),
        ..RatedEvent::sample_call(key, at)
    }
}

fn heartbeat(key: &str, session: &str, at: i64, boundary: &str) -> RatedEvent {
    RatedEvent {
        metric_name: HEARTBEAT_METRIC.into(),
        tool_name: String::new(),
        agent_id: String::new(),
        session_boundary: boundary.into(),
        revenue_micros: 0,
        cogs_micros: 0,
        rate_plan_version: 0,
        ..event(key, "", "", session, at)
    }
}

fn batch(tenant: &str, events: Vec<RatedEvent>) -> TenantBatch {
    TenantBatch::new(tenant.into(), events)
}

fn range() -> DateRange {
    DateRange::parse(Some("2026-11-19"), Some("2026-11-22"), day0()).unwrap()
}

fn day0() -> chrono::NaiveDate {
    chrono::NaiveDate::from_ymd_opt(2026, 11, 20).unwrap()
}

fn open() -> (
    tempfile::TempDir,
    sqlite::SqliteWriter,
    sqlite::SqliteAnalytics,
) {
    let dir = tempfile::tempdir().unwrap();
    let (w, r) = sqlite::open(dir.path(), &SqliteConfig::default()).unwrap();
    (dir, w, r)
}

#[tokio::test]
async fn duplicates_in_and_across_commits_are_stored_once_and_counted() {
    let (_dir, mut w, r) = open();
    let first = w
        .write(&[
            batch(
                "t1",
                vec![
                    event("a", "search", "ag", "s1", DAY0),
                    event("a", "search", "ag", "s1", DAY0),
                ],
            ),
            batch("t1", vec![event("b", "search", "ag", "s1", DAY0)]),
        ])
        .await
        .unwrap();
    // The positions of the duplicates are said: the repeat at 1 inside the first batch.
    let repeated = |positions: &[usize]| Some(positions.to_vec());
    assert_eq!(
        first,
        vec![
            WriteOutcome {
                accepted: 1,
                duplicates: 1,
                repeated: repeated(&[1]),
            },
            WriteOutcome {
                accepted: 1,
                duplicates: 0,
                repeated: repeated(&[]),
            }
        ]
    );
    // The same keys again, and the same key for another tenant, which is a different event.
    let second = w
        .write(&[
            batch(
                "t1",
                vec![
                    event("a", "search", "ag", "s1", DAY0),
                    event("b", "x", "ag", "s1", DAY0),
                ],
            ),
            batch("t2", vec![event("a", "search", "ag", "s1", DAY0)]),
        ])
        .await
        .unwrap();
    assert_eq!(
        second[0],
        WriteOutcome {
            accepted: 0,
            duplicates: 2,
            repeated: repeated(&[0, 1]),
        }
    );
    assert_eq!(second[1].counts(), (1, 0));

    let summary = r.summary(&Viewer::tenant("t1"), range()).await.unwrap();
    assert_eq!(summary.figures.calls, 2);
    assert_eq!(summary.figures.revenue_micros, 10_000);
    assert_eq!(
        r.summary(&Viewer::tenant("t2"), range())
            .await
            .unwrap()
            .figures
            .calls,
        1
    );
}

#[tokio::test]
async fn rollups_equal_the_sums_of_the_raw_rows() {
    let (dir, mut w, r) = open();
    let mut all = Vec::new();
    for i in 0..500i64 {
        let mut e = event(
            &format!("k{i}"),
            ["search", "fetch", "summarize"][(i % 3) as usize],
            ["agent-a", "agent-b"][(i % 2) as usize],
            &format!("s{}", i % 7),
            DAY0 + (i % 48) * HOUR,
        );
        e.revenue_micros = 1000 + i;
        e.cogs_micros = 300 + 2 * i;
        e.execution_duration_ms = i * 3;
        e.input_tokens = i;
        if i % 10 == 0 {
            e.execution_status = ExecutionStatus::Timeout;
        }
        all.push(e);
    }
    for chunk in all.chunks(37) {
        w.write(&[batch("t", chunk.to_vec())]).await.unwrap();
    }
    w.write(&[batch(
        "t",
        vec![heartbeat("hb1", "s1", DAY0 + 50 * HOUR, "HEARTBEAT")],
    )])
    .await
    .unwrap();

    let mut expected = UsageFigures::default();
    all.iter().for_each(|e| expected.record(e));
    let summary = r.summary(&Viewer::tenant("t"), range()).await.unwrap();
    assert_eq!(summary.figures, expected, "heartbeats must not count");
    assert_eq!((summary.sessions, summary.tools, summary.agents), (7, 3, 2));

    let tools = r
        .revenue_by_tool(&Viewer::tenant("t"), range())
        .await
        .unwrap();
    assert_eq!(tools.len(), 3);
    for t in &tools {
        let mut want = UsageFigures::default();
        all.iter()
            .filter(|e| e.tool_name == t.tool_name)
            .for_each(|e| want.record(e));
        assert_eq!(t.figures, want, "{}", t.tool_name);
        assert_eq!(t.sessions, 7);
    }
    assert!(tools
        .windows(2)
        .all(|p| p[0].figures.revenue_micros >= p[1].figures.revenue_micros));

    let agents = r
        .usage_by_agent(&Viewer::tenant("t"), range())
        .await
        .unwrap();
    for a in &agents {
        let mut want = UsageFigures::default();
        all.iter()
            .filter(|e| e.agent_id == a.agent_id)
            .for_each(|e| want.record(e));
        assert_eq!(a.figures, want);
        assert_eq!(a.daily.len(), 2, "two days of events");
        let mut days = UsageFigures::default();
        a.daily.iter().for_each(|d| days.merge(&d.figures));
        assert_eq!(days, want);
    }

    // The raw table holds exactly the unique events.
    let conn = rusqlite::Connection::open(dir.path().join(sqlite::DB_FILE)).unwrap();
    let (rows, revenue): (i64, i64) = conn
        .query_row(
            "SELECT COUNT(*), SUM(revenue_micros) FROM mcp_events WHERE tenant_id = 't'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((rows, revenue), (501, expected.revenue_micros));
}

#[tokio::test]
async fn ranges_cut_on_utc_days() {
    let (_dir, mut w, r) = open();
    w.write(&[batch(
        "t",
        vec![
            event("a", "x", "ag", "s", DAY0 - 1), // 2026-11-19 23:59:59.999
            event("b", "x", "ag", "s", DAY0),     // 2026-11-20 00:00
            event("c", "x", "ag", "s", DAY0 + 24 * HOUR), // 2026-11-21
        ],
    )])
    .await
    .unwrap();
    let day = |d: &str| DateRange::parse(Some(d), Some(d), day0()).unwrap();
    assert_eq!(
        r.summary(&Viewer::tenant("t"), day("2026-11-19"))
            .await
            .unwrap()
            .figures
            .calls,
        1
    );
    assert_eq!(
        r.summary(&Viewer::tenant("t"), day("2026-11-20"))
            .await
            .unwrap()
            .figures
            .calls,
        1
    );
    assert_eq!(
        r.summary(&Viewer::tenant("t"), range())
            .await
            .unwrap()
            .figures
            .calls,
        3
    );
}

#[tokio::test]
async fn sessions_follow_heartbeats_and_stay_per_tenant() {
    let (_dir, mut w, r) = open();
    w.write(&[
        batch(
            "t",
            vec![
                event("a", "search", "agent-a", "s1", DAY0 + HOUR),
                event("b", "fetch", "agent-a", "s1", DAY0 + 2 * HOUR),
                heartbeat("h1", "s1", DAY0 + 3 * HOUR, "HEARTBEAT"),
                event("c", "search", "agent-b", "s2", DAY0 + HOUR),
            ],
        ),
        batch("other", vec![event("z", "search", "agent-z", "s9", DAY0)]),
    ])
    .await
    .unwrap();
    w.write(&[batch(
        "t",
        vec![heartbeat("h2", "s1", DAY0 + 4 * HOUR, "SESSION_END")],
    )])
    .await
    .unwrap();

    let q = SessionQuery {
        range: range(),
        agent_id: None,
        limit: 10,
    };
    let sessions = r.sessions(&Viewer::tenant("t"), q.clone()).await.unwrap();
    assert_eq!(
        sessions
            .iter()
            .map(|s| s.session_id.as_str())
            .collect::<Vec<_>>(),
        ["s1", "s2"]
    );
    let s1 = &sessions[0];
    assert_eq!(
        (s1.first_seen, s1.last_seen),
        (DAY0 + HOUR, DAY0 + 4 * HOUR)
    );
    assert!(s1.ended);
    assert_eq!(
        (s1.tools, s1.figures.calls, s1.agent_id.as_str()),
        (2, 2, "agent-a")
    );

    let only_b = SessionQuery {
        agent_id: Some("agent-b".into()),
        ..q
    };
    assert_eq!(
        r.sessions(&Viewer::tenant("t"), only_b)
            .await
            .unwrap()
            .len(),
        1
    );

    let detail = r
        .session(&Viewer::tenant("t"), "s1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(detail.by_tool.len(), 2);
    assert!(
        r.session(&Viewer::tenant("t"), "s9")
            .await
            .unwrap()
            .is_none(),
        "another tenant's session"
    );
    assert!(r
        .session(&Viewer::tenant("other"), "s1")
        .await
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn a_failed_commit_stores_nothing() {
    let (dir, mut w, _r) = open();
    w.write(&[batch("t", vec![event("a", "x", "ag", "s", DAY0)])])
        .await
        .unwrap();
    // Make the rollup upsert fail after the raw insert of the same transaction succeeded.
    let conn = rusqlite::Connection::open(dir.path().join(sqlite::DB_FILE)).unwrap();
    conn.execute_batch(
        "CREATE TRIGGER refuse BEFORE INSERT ON mcp_session_summary
         BEGIN SELECT RAISE(ABORT, 'refused by test'); END;",
    )
    .unwrap();
    let err = w
        .write(&[batch("t", vec![event("b", "x", "ag", "new-session", DAY0)])])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("refused by test"), "{err}");
    let rows: i64 = conn
        .query_row("SELECT COUNT(*) FROM mcp_events", [], |r| r.get(0))
        .unwrap();
    let calls: i64 = conn
        .query_row("SELECT SUM(calls) FROM mcp_daily_stats", [], |r| r.get(0))
        .unwrap();
    assert_eq!(
        (rows, calls),
        (1, 1),
        "the failed commit left nothing behind"
    );
}

/// Retention deletes raw rows past `raw_days` in chunks; their keys leave with them, keys
/// inside the window still catch retries, and the rollups analytics read do not change.
#[tokio::test]
async fn retention_drops_old_raw_rows_and_their_keys_and_keeps_the_rollups() {
    use backends::store::{Retention, RetentionCutoffs};
    let (dir, mut w, r) = open();
    const DAY: i64 = 24 * HOUR;
    let old_at = DAY0 - 90 * DAY;
    // More than one delete chunk of old rows, and a few recent ones.
    let old: Vec<RatedEvent> = (0..12_000)
        .map(|i| event(&format!("old-{i}"), "search", "ag", "s-old", old_at + i))
        .collect();
    let recent: Vec<RatedEvent> = (0..3)
        .map(|i| event(&format!("new-{i}"), "search", "ag", "s-new", DAY0 + i))
        .collect();
    w.write(&[batch("t1", old), batch("t1", recent.clone())])
        .await
        .unwrap();
    let old_range = DateRange::parse(Some("2026-08-21"), Some("2026-08-23"), day0()).unwrap();
    let old_summary = r.summary(&Viewer::tenant("t1"), old_range).await.unwrap();
    let recent_summary = r.summary(&Viewer::tenant("t1"), range()).await.unwrap();
    assert_eq!(old_summary.figures.calls, 12_000);

    let config = schemas::config::RetentionConfig {
        dedup_days: 40,
        raw_days: Some(60),
        interval_seconds: 3600,
    };
    let cutoffs = RetentionCutoffs::at(DAY0 + HOUR, &config);
    let retention = sqlite::retention(dir.path());
    let planned = retention.apply(cutoffs, true).await.unwrap();
    assert_eq!(planned.len(), 1);
    assert_eq!(planned[0].rows, 12_000, "{planned:?}");
    let raw = || {
        rusqlite::Connection::open(dir.path().join(sqlite::DB_FILE))
            .unwrap()
            .query_row("SELECT count(*) FROM mcp_events", [], |row| {
                row.get::<_, i64>(0)
            })
            .unwrap()
    };
    assert_eq!(raw(), 12_003, "a dry run drops nothing");

    let dropped = retention.apply(cutoffs, false).await.unwrap();
    assert_eq!(dropped[0].rows, 12_000);
    assert_eq!(raw(), 3);
    assert!(retention.apply(cutoffs, false).await.unwrap().is_empty());

    // The rollups are untouched: analytics answer as before, old days included.
    assert_eq!(
        r.summary(&Viewer::tenant("t1"), old_range).await.unwrap(),
        old_summary
    );
    assert_eq!(
        r.summary(&Viewer::tenant("t1"), range()).await.unwrap(),
        recent_summary
    );
    // Keys inside the window still catch a retry; an expired key is gone with its row.
    let again = w
        .write(&[batch(
            "t1",
            vec![
                recent[0].clone(),
                event("old-7", "search", "ag", "s-old", old_at),
            ],
        )])
        .await
        .unwrap();
    assert_eq!(again[0].counts(), (1, 1));
}
