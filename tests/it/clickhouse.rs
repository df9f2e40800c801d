//! The ClickHouse store against the real ClickHouse 18.16 that `scripts/test` starts, and
//! against chDB (ClickHouse 26): migrations, dedup, and conformance with the SQLite store.

use crate::common::*;
use backends::sink::{TenantBatch, WriteOutcome};
use backends::store::clickhouse::{
    migrations, ClickHouseAnalytics, ClickHouseWriter, HttpRunner, SqlRunner,
};
use backends::store::{AnalyticsStore, SessionQuery, StoreWriter, Viewer};
use schemas::analytics::{DateRange, GroupBy, Interval, SeriesQuery};
use schemas::billing::BillingQuery;
use schemas::event::{ExecutionStatus, RatedEvent};
use serde_json::{json, Value};

fn runtime() -> actix_web::rt::SystemRunner {
    actix_web::rt::System::new()
}

fn config_for(database: &str) -> schemas::config::ClickHouseConfig {
    schemas::config::ClickHouseConfig {
        url: clickhouse_url(),
        database: database.to_string(),
        ..Default::default()
    }
}

#[test]
fn migrations_apply_once_when_run_twice_or_concurrently() {
    let database = unique_database("migrate");
    let ch = config_for(&database);
    runtime().block_on(async {
        let (server, db) = (HttpRunner::server(&ch), HttpRunner::new(&ch));
        // Two processes' worth of migrate at once on a fresh database.
        let (a, b) = tokio::join!(
            migrations::migrate(&server, &db, &database),
            migrations::migrate(&server, &db, &database)
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(a.len(), migrations::MIGRATIONS.len());
        assert_eq!(b.len(), migrations::MIGRATIONS.len());
        let again = migrations::migrate(&server, &db, &database).await.unwrap();
        assert!(again
            .iter()
            .all(|(_, o)| *o == migrations::Outcome::AlreadyApplied));
        let tables = db.tab_separated("SHOW TABLES").await.unwrap();
        for table in [
            "mcp_events",
            "mcp_daily_stats",
            "mcp_daily_stats_mv",
            "mcp_session_summary",
            "mcp_session_summary_mv",
            "mcp_event_keys",
            "mcp_event_keys_mv",
        ] {
            assert!(
                tables.lines().any(|t| t == table),
                "{table} missing: {tables}"
            );
        }
        let versions = db
            .tab_separated("SELECT count(DISTINCT version) FROM mcp_schema_migrations")
            .await
            .unwrap();
        assert_eq!(versions.trim(), migrations::MIGRATIONS.len().to_string());
    });
}

#[test]
fn a_migration_edited_after_it_was_applied_is_refused() {
    let database = unique_database("tamper");
    let ch = config_for(&database);
    runtime().block_on(async {
        let (server, db) = (HttpRunner::server(&ch), HttpRunner::new(&ch));
        migrations::migrate(&server, &db, &database).await.unwrap();
        db.execute(
            "INSERT INTO mcp_schema_migrations VALUES (2, '0002_daily_stats.sql', 'bogus', now())",
        )
        .await
        .unwrap();
        let err = migrations::migrate(&server, &db, &database)
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("0002_daily_stats.sql was changed after it was applied"),
            "{err}"
        );
    });
}

#[test]
fn serve_refuses_an_unmigrated_or_unreachable_clickhouse() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = crate::common::config(dir.path());
    c.store = schemas::config::StoreKind::Clickhouse;
    c.clickhouse = config_for(&unique_database("never_migrated"));
    let err = runtime()
        .block_on(mcp_meter::Embedded::start(&c))
        .err()
        .unwrap();
    assert!(
        format!("{err:#}").contains("is not migrated: run `mcp-meter migrate`"),
        "{err:#}"
    );
    c.clickhouse.url = "http://127.0.0.1:1".into();
    let err = runtime()
        .block_on(mcp_meter::Embedded::start(&c))
        .err()
        .unwrap();
    assert!(format!("{err:#}").contains("is unreachable"), "{err:#}");
}

/// One block of two raw rows of tenant `tenant` (one INSERT, so one block), sent as the writer
/// sends it to a server that deduplicates `how`.
fn raw_block(tenant: &str, keys: [&str; 2], how: migrations::Deduplication) -> String {
    let settings = match how {
        migrations::Deduplication::Window => format!("SETTINGS {}", migrations::DEDUPLICATE_VIEWS),
        migrations::Deduplication::Replicated => String::new(),
    };
    let row = |key: &str| {
        format!(
            "('{tenant}', '{key}', toDateTime(1795132800, 'UTC'), 1795132800000, 1795132800000, \
'mcp_server.tool_invocations', 'MCP_SERVER', 'web_search', 'agent', 'cust', 'sess', 'SUCCESS', 1, \
0, 5, '', 1000000, 1, 2, 700, 300, 1, '')"
        )
    };
    format!(
        "INSERT INTO mcp_events (tenant_id, idempotency_key, occurred_at, occurred_at_ms, \
received_at_ms, metric_name, product_type, tool_name, agent_id, customer_id, session_id, \
execution_status, is_call, is_error, execution_duration_ms, session_boundary, quantity_micros, \
input_tokens, output_tokens, revenue_micros, cogs_micros, rate_plan_version, metadata) {settings} \
VALUES {}, {}",
        row(keys[0]),
        row(keys[1])
    )
}

/// Rows, stored keys and rolled-up revenue of `tenant`.
async fn stored_and_rolled_up(runner: &dyn SqlRunner, tenant: &str) -> String {
    runner
        .tab_separated(&format!(
            "SELECT (SELECT count() FROM mcp_events WHERE tenant_id = '{tenant}'), \
(SELECT count() FROM mcp_event_keys WHERE tenant_id = '{tenant}'), \
(SELECT sumMerge(revenue_micros) FROM mcp_daily_stats WHERE tenant_id = '{tenant}')"
        ))
        .await
        .unwrap()
}

/// A block inserted twice is stored once, and the views it feeds count it once: on 18.16 as a
/// ReplicatedMergeTree on the test run's ZooKeeper, on chDB (current ClickHouse) with the
/// deduplication window.
#[test]
fn events_drop_a_block_inserted_twice_and_their_views_count_it_once() {
    let (_dir, server, chdb) = both_engines("dedup_block");
    runtime().block_on(async {
        for (runner, how) in [
            (
                &server as &dyn SqlRunner,
                migrations::Deduplication::Replicated,
            ),
            (&chdb as &dyn SqlRunner, migrations::Deduplication::Window),
        ] {
            assert_eq!(
                migrations::events_deduplication(runner).await.unwrap(),
                Some(how)
            );
            for _ in 0..3 {
                runner
                    .execute(&raw_block("t", ["k1", "k2"], how))
                    .await
                    .unwrap();
            }
            // The same keys in another block are another block: the writer's key lookup, not
            // the block id, keeps them out.
            runner
                .execute(&raw_block("t", ["k3", "k1"], how))
                .await
                .unwrap();
            assert_eq!(
                stored_and_rolled_up(runner, "t").await.trim(),
                "4\t4\t2800",
                "{how:?}"
            );
        }
    });
}

/// A database migrated before 0009 holds a plain MergeTree with rows: `migrate` copies them into
/// a ReplicatedMergeTree and swaps it in by name. Nothing is lost, nothing is rolled up again,
/// and the views then follow the new table.
#[test]
fn migrate_makes_an_existing_events_table_replicated_keeping_its_rows_and_rollups() {
    let database = unique_database("replicate");
    let ch = config_for(&database);
    runtime().block_on(async {
        let (server, db) = (HttpRunner::server(&ch), HttpRunner::new(&ch));
        // The schema as migrations 1 to 8 left it.
        server
            .execute(&format!("CREATE DATABASE {database}"))
            .await
            .unwrap();
        db.execute(&format!(
            "CREATE TABLE {} (version UInt32, name String, checksum String, applied_at \
DateTime('UTC')) ENGINE = ReplacingMergeTree() ORDER BY version",
            migrations::MIGRATIONS_TABLE
        ))
        .await
        .unwrap();
        for m in &migrations::MIGRATIONS[..8] {
            for statement in migrations::statements(m.sql) {
                db.execute(&statement).await.unwrap();
            }
            db.execute(&format!(
                "INSERT INTO {} VALUES ({}, '{}', '{}', now())",
                migrations::MIGRATIONS_TABLE,
                m.version,
                m.name,
                migrations::checksum(m.sql)
            ))
            .await
            .unwrap();
        }
        assert_eq!(migrations::events_deduplication(&db).await.unwrap(), None);
        // Rows as a writer of that version inserted them (no block end yet).
        db.execute(&raw_block(
            "t",
            ["old-1", "old-2"],
            migrations::Deduplication::Replicated,
        ))
        .await
        .unwrap();
        let before = stored_and_rolled_up(&db, "t").await;
        assert_eq!(before.trim(), "2\t2\t1400");

        let outcomes = migrations::migrate(&server, &db, &database).await.unwrap();
        assert_eq!(outcomes.last().unwrap().1, migrations::Outcome::Applied);
        assert_eq!(
            migrations::events_deduplication(&db).await.unwrap(),
            Some(migrations::Deduplication::Replicated)
        );
        assert_eq!(stored_and_rolled_up(&db, "t").await, before);
        let tables = db.tab_separated("SHOW TABLES").await.unwrap();
        assert!(!tables.contains("mcp_events_"), "{tables}");

        // The views follow the new table: a new batch is rolled up once, a block sent twice is
        // stored once.
        let batch = TenantBatch::new("t".into(), vec![rated("new-1", "s")]);
        let mut writer = ClickHouseWriter::new(HttpRunner::new(&ch));
        writer.write(&[batch]).await.unwrap();
        for _ in 0..2 {
            let how = migrations::Deduplication::Replicated;
            db.execute(&raw_block("t", ["raw-1", "raw-2"], how))
                .await
                .unwrap();
        }
        assert_eq!(stored_and_rolled_up(&db, "t").await.trim(), "5\t5\t2900");
    });
}

fn rated(key: &str, session: &str) -> RatedEvent {
    RatedEvent {
        session_id: session.into(),
        input_tokens: 1,
        output_tokens: 2,
        revenue_micros: 100,
        cogs_micros: 40,
        metadata: Some(r#"{"note":"tab\there, quote ' and backslash \\"}"#.into()),
        ..RatedEvent::sample_call(key, 1_795_132_800_000)
    }
}

/// A fresh database of the same name, migrated, on the ClickHouse 18.16 server and on chDB.
fn both_engines(prefix: &str) -> (tempfile::TempDir, HttpRunner, chdb::Chdb) {
    let database = unique_database(prefix);
    let dir = tempfile::tempdir().unwrap();
    let config = clickhouse_config(dir.path(), &database);
    let chdb = chdb::Chdb::start(&database);
    runtime()
        .block_on(migrations::migrate(&chdb, &chdb, &database))
        .unwrap();
    (dir, HttpRunner::new(&config.clickhouse), chdb)
}

/// The writer on ClickHouse 18.16 (HTTP) and on chDB (ClickHouse 26, in-process), through the
/// same `SqlRunner`: each key stored once within and across writes, every character of a
/// string read back as written, and both engines holding the same rows byte for byte.
#[test]
fn the_writer_stores_each_key_once_within_and_across_writes() {
    let (_dir, server, chdb) = both_engines("writer");
    runtime().block_on(async {
        let on_server = write_and_check(&server).await;
        let on_chdb = write_and_check(&chdb).await;
        assert_eq!(
            on_server, on_chdb,
            "chDB {} holds what 18.16 holds",
            chdb.version
        );
    });
}

/// Blocks, as the aggregator writes them, on ClickHouse 18.16 (the replicated form) and on chDB
/// (the window form): a block is stored once however often it is sent; a block that starts
/// below its partition's floor stores nothing, even rows the store lacks (a writer that looked
/// its keys up late); the floor moves with the rows, and with a recorded end; rows the table
/// refuses (a check of its own) are set apart before anything is inserted.
#[test]
fn a_block_is_stored_once_and_never_below_its_partitions_floor() {
    let (_dir, server, chdb) = both_engines("blocks");
    runtime().block_on(async {
        for runner in [&server as &dyn SqlRunner, &chdb] {
            check_blocks(runner).await;
        }
    });
}

/// Partition 2's floor, as `writer` reads it.
async fn floor_of(writer: &dyn backends::store::StoredOffsets) -> Option<i64> {
    writer.stored_offsets(&[2]).await.unwrap().get(&2).copied()
}

async fn check_blocks(runner: &dyn SqlRunner) {
    use backends::sink::BusPosition;
    use backends::store::{Block, BlockWriter, StoredOffsets};
    let block = |first: i64, last: i64, keys: &[(&str, i64)]| Block {
        partition: 2,
        first,
        last,
        batches: vec![TenantBatch {
            positions: keys
                .iter()
                .map(|(_, offset)| BusPosition {
                    partition: 2,
                    offset: *offset,
                })
                .collect(),
            ..TenantBatch::new(
                "t".into(),
                keys.iter().map(|(k, _)| rated(k, "s")).collect(),
            )
        }],
    };
    let mut writer = ClickHouseWriter::for_topic(runner, "events");
    assert_eq!(floor_of(&writer).await, None);
    let x = block(0, 9, &[("a", 0), ("b", 3), ("a", 5), ("c", 8)]);
    let write = writer.write_block(&x).await.unwrap();
    assert_eq!(write.outcomes[0].counts(), (3, 1));
    assert_eq!(floor_of(&writer).await, Some(9));
    // The same block again (a retry, a second writer): nothing more.
    writer.write_block(&x).await.unwrap();
    writer
        .write_block(&block(10, 19, &[("d", 12)]))
        .await
        .unwrap();
    assert_eq!(floor_of(&writer).await, Some(19));
    // A late writer of 0..=9 with a key the store lacks: the server refuses its block.
    writer.write_block(&block(0, 9, &[("e", 4)])).await.unwrap();
    assert_eq!(stored_and_rolled_up(runner, "t").await.trim(), "4\t4\t400");
    // A block that stored no row records its end; below it nothing is stored either.
    writer.record_offsets(&[(2, 25)]).await.unwrap();
    assert_eq!(floor_of(&writer).await, Some(25));
    writer
        .write_block(&block(20, 25, &[("f", 21)]))
        .await
        .unwrap();
    assert_eq!(stored_and_rolled_up(runner, "t").await.trim(), "4\t4\t400");
    // A row the table refuses is set apart; the rest of its block is stored.
    runner
        .execute("ALTER TABLE mcp_events ADD COLUMN refusal UInt8 MATERIALIZED throwIf(idempotency_key = 'h')")
        .await
        .unwrap();
    let write = writer
        .write_block(&block(26, 30, &[("g", 26), ("h", 27), ("i", 28)]))
        .await
        .unwrap();
    let refused: Vec<BusPosition> = write.refused.iter().map(|(p, _)| *p).collect();
    assert_eq!(
        refused,
        [BusPosition {
            partition: 2,
            offset: 27
        }]
    );
    assert_eq!(write.outcomes[0].counts(), (2, 0));
    assert_eq!(floor_of(&writer).await, Some(30));
    assert_eq!(stored_and_rolled_up(runner, "t").await.trim(), "6\t6\t600");
}

/// Writes the same batches through `runner`, checks what was stored, and answers every stored
/// row as TabSeparated text.
async fn write_and_check(runner: &dyn SqlRunner) -> String {
    let mut writer = ClickHouseWriter::for_topic(runner, "events");
    let batch = |tenant: &str, keys: &[&str]| {
        TenantBatch::new(
            tenant.into(),
            keys.iter().map(|k| rated(k, "s'1")).collect(),
        )
    };
    let first = writer
        .write(&[batch("t1", &["a", "b", "a"]), batch("t1", &["b", "c"])])
        .await
        .unwrap();
    assert_eq!(
        first.iter().map(WriteOutcome::counts).collect::<Vec<_>>(),
        vec![(2, 1), (1, 1)]
    );
    let mut from_the_bus = batch("t2", &["a"]);
    from_the_bus.events[0].metadata = Some("line\nbreak, tab\t, back\\slash, \u{8}, ünï 🙂".into());
    from_the_bus.positions = vec![backends::sink::BusPosition {
        partition: 3,
        offset: 41,
    }];
    let second = writer
        .write(&[batch("t1", &["a", "c", "d"]), from_the_bus.clone()])
        .await
        .unwrap();
    assert_eq!(
        second.iter().map(WriteOutcome::counts).collect::<Vec<_>>(),
        vec![(1, 2), (1, 0)]
    );
    let raw = runner
        .tab_separated("SELECT tenant_id, count(), sum(revenue_micros) FROM mcp_events GROUP BY tenant_id ORDER BY tenant_id")
        .await
        .unwrap();
    assert_eq!(raw, "t1\t4\t400\nt2\t1\t100\n");
    let stored = runner
        .tab_separated("SELECT metadata, occurred_at, kafka_partition, kafka_offset, kafka_topic FROM mcp_events WHERE tenant_id = 't2'")
        .await
        .unwrap();
    let mut row = backends::store::clickhouse::tsv::rows(&stored, "test")
        .next()
        .unwrap();
    assert_eq!(Some(row.string().unwrap()), from_the_bus.events[0].metadata);
    assert_eq!(row.string().unwrap(), "2026-11-20 00:00:00");
    assert_eq!((row.int().unwrap(), row.int().unwrap()), (3, 41));
    assert_eq!(row.string().unwrap(), "events");

    let analytics = ClickHouseAnalytics::new(runner);
    let day = chrono::NaiveDate::from_ymd_opt(2026, 11, 20).unwrap();
    let range = DateRange { from: day, to: day };
    let summary = analytics
        .summary(&Viewer::tenant("t1"), range)
        .await
        .unwrap();
    assert_eq!(
        (
            summary.figures.calls,
            summary.figures.revenue_micros,
            summary.sessions
        ),
        (4, 400, 1)
    );
    let session = analytics
        .session(&Viewer::tenant("t1"), "s'1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(session.session.figures.calls, 4);
    runner
        .tab_separated("SELECT * FROM mcp_events ORDER BY tenant_id, idempotency_key")
        .await
        .unwrap()
}

/// Retention drops whole partitions: a day of dedup keys past `dedup_days`, a month of raw
/// rows wholly past `raw_days`. Keys inside the window still catch retries, expired keys are
/// gone, and the rollups (what analytics read) are untouched.
#[test]
fn retention_drops_expired_key_and_raw_partitions_and_keeps_the_rollups() {
    use backends::store::clickhouse::ClickHouseRetention;
    use backends::store::{Retention, RetentionCutoffs};
    const DAY0: i64 = 1_795_132_800_000; // 2026-11-20
    const DAY: i64 = 86_400_000;
    let database = unique_database("retention");
    let dir = tempfile::tempdir().unwrap();
    let config = clickhouse_config(dir.path(), &database);
    let runner = HttpRunner::new(&config.clickhouse);
    runtime().block_on(async {
        let mut writer = ClickHouseWriter::new(runner.clone());
        let at = |key: &str, ms: i64| RatedEvent {
            received_at_ms: ms,
            ..RatedEvent::sample_call(key, ms)
        };
        let old: Vec<RatedEvent> = (0..50)
            .map(|i| at(&format!("old-{i}"), DAY0 - 90 * DAY + i))
            .collect();
        let recent: Vec<RatedEvent> = (0..5).map(|i| at(&format!("new-{i}"), DAY0 + i)).collect();
        writer
            .write(&[
                TenantBatch::new("t1".into(), old),
                TenantBatch::new("t1".into(), recent.clone()),
            ])
            .await
            .unwrap();
        let analytics = ClickHouseAnalytics::new(runner.clone());
        let day = |d: i64| {
            chrono::DateTime::from_timestamp_millis(d)
                .unwrap()
                .date_naive()
        };
        let everything = DateRange {
            from: day(DAY0 - 90 * DAY),
            to: day(DAY0),
        };
        let before = analytics
            .summary(&Viewer::tenant("t1"), everything)
            .await
            .unwrap();
        assert_eq!(before.figures.calls, 55);

        let retention = ClickHouseRetention::new(runner.clone());
        let cutoffs = RetentionCutoffs::at(
            DAY0 + 3_600_000,
            &schemas::config::RetentionConfig {
                dedup_days: 40,
                raw_days: Some(60),
                interval_seconds: 60,
            },
        );
        let planned = retention.apply(cutoffs, true).await.unwrap();
        let shown: Vec<(&str, String, u64)> = planned
            .iter()
            .map(|d| (d.table, d.what.clone(), d.rows))
            .collect();
        assert_eq!(
            shown,
            vec![
                (
                    "mcp_event_keys",
                    "partition 20260822: dedup keys of events that arrived on 2026-08-22"
                        .to_string(),
                    50
                ),
                (
                    "mcp_events",
                    "partition 202608: raw events that occurred in 2026-08".to_string(),
                    50
                ),
            ]
        );
        let count = |table: &str| {
            let runner = runner.clone();
            let sql = format!("SELECT count() FROM {table}");
            async move { runner.tab_separated(&sql).await.unwrap().trim().to_string() }
        };
        assert_eq!(count("mcp_events").await, "55", "a dry run drops nothing");

        assert_eq!(retention.apply(cutoffs, false).await.unwrap(), planned);
        assert_eq!(count("mcp_events").await, "5");
        assert_eq!(count("mcp_event_keys").await, "5");
        assert!(retention.apply(cutoffs, false).await.unwrap().is_empty());
        assert_eq!(
            analytics
                .summary(&Viewer::tenant("t1"), everything)
                .await
                .unwrap(),
            before
        );

        let again = writer
            .write(&[TenantBatch::new(
                "t1".into(),
                vec![recent[0].clone(), at("old-3", DAY0 - 90 * DAY)],
            )])
            .await
            .unwrap();
        assert_eq!(again[0].counts(), (1, 1));
    });
}

/// An event stored under the first key derivation (`sha256:` of its bytes) is a duplicate of a
/// retry that now carries the canonical key and, as its legacy key, that same hash.
#[test]
fn the_writer_finds_events_stored_under_their_legacy_key() {
    let database = unique_database("legacy");
    let dir = tempfile::tempdir().unwrap();
    let config = clickhouse_config(dir.path(), &database);
    let runner = HttpRunner::new(&config.clickhouse);
    runtime().block_on(async {
        let mut writer = ClickHouseWriter::new(runner.clone());
        let old = rated("sha256:0123", "s");
        let retry = RatedEvent {
            legacy_idempotency_key: Some("sha256:0123".into()),
            ..rated("sha256v2:4567", "s")
        };
        let other = RatedEvent {
            legacy_idempotency_key: Some("sha256:89ab".into()),
            ..rated("sha256v2:cdef", "s")
        };
        writer
            .write(&[TenantBatch::new("t1".into(), vec![old])])
            .await
            .unwrap();
        let outcome = writer
            .write(&[TenantBatch::new("t1".into(), vec![retry, other])])
            .await
            .unwrap();
        assert_eq!(outcome[0].counts(), (1, 1));
        let keys = runner
            .tab_separated("SELECT idempotency_key FROM mcp_events ORDER BY idempotency_key")
            .await
            .unwrap();
        assert_eq!(
            keys, "sha256:0123\nsha256v2:cdef\n",
            "legacy keys are looked up, never stored"
        );
    });
}

/// `migrate` keeps the floors recorded before offsets were per topic as the configured topic's,
/// once.
#[test]
fn floors_recorded_before_offsets_were_per_topic_are_kept_for_the_configured_topic() {
    use backends::sink::BusPosition;
    use backends::store::StoredOffsets;
    let database = unique_database("topics");
    let ch = config_for(&database);
    let runner = HttpRunner::new(&ch);
    runtime().block_on(async {
        migrations::migrate(&HttpRunner::server(&ch), &runner, &database)
            .await
            .unwrap();
        // What an aggregator of the previous version left: floors without a topic, and a row
        // above them (stored, its floor not yet recorded).
        runner
            .execute("INSERT INTO mcp_kafka_offsets (kafka_partition, max_offset) VALUES (0, 41), (1, 7), (0, 40)")
            .await
            .unwrap();
        let untagged = TenantBatch {
            positions: vec![BusPosition { partition: 0, offset: 42 }],
            ..TenantBatch::new("t1".into(), vec![rated("k42", "s")])
        };
        ClickHouseWriter::new(runner.clone()).write(std::slice::from_ref(&untagged)).await.unwrap();

        assert_eq!(migrations::keep_untagged_offsets(&runner, "events").await.unwrap(), 2);
        assert_eq!(migrations::keep_untagged_offsets(&runner, "events").await.unwrap(), 0);
        assert_eq!(migrations::keep_untagged_offsets(&runner, "other").await.unwrap(), 0);

        let events = ClickHouseWriter::for_topic(runner.clone(), "events");
        let other = ClickHouseWriter::for_topic(runner.clone(), "other");
        let floors = events.stored_offsets(&[0, 1, 2]).await.unwrap();
        assert_eq!(floors, [(0, 41), (1, 7)].into_iter().collect());
        assert!(other.stored_offsets(&[0, 1, 2]).await.unwrap().is_empty());

        // From now on each topic records and reads its own.
        other.record_offsets(&[(0, 3)]).await.unwrap();
        events.record_offsets(&[(0, 42)]).await.unwrap();
        assert_eq!(other.stored_offsets(&[0]).await.unwrap()[&0], 3);
        assert_eq!(events.stored_offsets(&[0]).await.unwrap()[&0], 42);
    });
}

/// An aggregator batch can hold far more keys than one query may list (ClickHouse refuses more
/// than 50,000 syntax-tree nodes, and the writer splits its lookups at 100,000 keys): a write of
/// 110,000 keys of one tenant and 10,000 of another is deduplicated exactly, keys with quotes,
/// backslashes and commas included.
#[test]
fn the_writer_deduplicates_writes_larger_than_one_lookup() {
    let database = unique_database("writer_big");
    let dir = tempfile::tempdir().unwrap();
    let config = clickhouse_config(dir.path(), &database);
    let runner = HttpRunner::new(&config.clickhouse);
    let key = |i: usize| match i % 4 {
        0 => format!("k-{i}"),
        1 => format!("k'{i}"),
        2 => format!("k\\{i}"),
        _ => format!("k,{i}"),
    };
    let batch = |tenant: &str, keys: std::ops::Range<usize>| {
        TenantBatch::new(tenant.into(), keys.map(|i| rated(&key(i), "s")).collect())
    };
    runtime().block_on(async {
        let mut writer = ClickHouseWriter::new(runner.clone());
        let first = writer
            .write(&[batch("t1", 0..110_000), batch("t2", 0..10_000)])
            .await
            .unwrap();
        assert_eq!(first[0].counts(), (110_000, 0));
        assert_eq!(first[1].counts(), (10_000, 0));
        // Again, with five new keys each: only those are stored.
        let again = writer
            .write(&[batch("t1", 0..110_005), batch("t2", 0..10_005)])
            .await
            .unwrap();
        assert_eq!(again[0].counts(), (5, 110_000));
        assert_eq!(again[1].counts(), (5, 10_000));
        let stored = runner
            .tab_separated("SELECT tenant_id, count(), uniqExact(idempotency_key) FROM mcp_events GROUP BY tenant_id ORDER BY tenant_id")
            .await
            .unwrap();
        assert_eq!(stored, "t1\t110005\t110005\nt2\t10005\t10005\n");
    });
}

/// The seeded stream the conformance data comes from, the same on every run.
struct Rng(mcp_meter::loadgen::Rng);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0.below(n)
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len() as u64) as usize]
    }
}

const TENANT_KEYS: [&str; 3] = [ACME, GLOBEX, INITECH];
const EVENTS: usize = 12_000;

/// A seeded stream over the last 30 days: several tenants, tools, agents, customers and
/// sessions, every status, tokens, durations, heartbeats, events without a session, and 5%
/// repeats of earlier keys (as a retrying client sends them). Per tenant, in order.
fn stream(now_ms: i64) -> Vec<Vec<Value>> {
    let mut rng = Rng(mcp_meter::loadgen::Rng(20261121));
    let tools = &mcp_meter::loadgen::TOOLS[..8];
    let agents = [
        "agent_gpt4o_prod",
        "agent_claude",
        "agent_gemini",
        "agent_llama",
        "agent_mistral",
        "agent_qwen",
        "agent_batch",
        "agent_eval",
    ];
    let customers = ["cust_a", "cust_b", "cust_c", "cust_d", ""];
    let statuses = ExecutionStatus::ALL.map(|s| s.as_str());
    let mut per_tenant: Vec<Vec<Value>> = vec![Vec::new(); TENANT_KEYS.len()];
    for i in 0..EVENTS {
        let t = rng.below(TENANT_KEYS.len() as u64) as usize;
        let events = &mut per_tenant[t];
        if !events.is_empty() && rng.below(100) < 5 {
            let earlier = events[rng.below(events.len() as u64) as usize].clone();
            events.push(earlier);
            continue;
        }
        // Whole seconds keep occurredAt exact through every store; spread over 30 days.
        let at_ms = now_ms - 60_000 - (rng.below(30 * 86_400) as i64) * 1000;
        let occurred_at = chrono::DateTime::from_timestamp_millis(at_ms)
            .unwrap()
            .to_rfc3339();
        let session = format!("sess_{t}_{}", rng.below(150));
        let event = if rng.below(100) < 4 {
            let boundary = if rng.below(4) == 0 {
                "SESSION_END"
            } else {
                "HEARTBEAT"
            };
            json!({
                "idempotencyKey": format!("hb-{i}"), "metricName": "system.session.heartbeat",
                "customerId": "system", "sessionId": session, "sessionBoundary": boundary,
                "occurredAt": occurred_at, "quantity": 1,
            })
        } else {
            let mut e = json!({
                "idempotencyKey": format!("evt-{i}"),
                "metricName": "mcp_server.tool_invocations",
                "toolName": rng.pick(tools),
                "agentId": rng.pick(&agents),
                "customerId": rng.pick(&customers),
                "occurredAt": occurred_at,
                "executionStatus": rng.pick(&statuses),
                "executionDurationMs": rng.below(20_000),
                "metadata": {"inputTokens": rng.below(5000), "outputTokens": rng.below(3000), "note": "it's \\ fine"},
            });
            if rng.below(10) > 0 {
                e["sessionId"] = json!(session);
            }
            if rng.below(20) == 0 {
                e["quantity"] = json!(2.5);
            }
            e
        };
        events.push(event);
    }
    per_tenant
}

#[test]
fn every_analytics_endpoint_answers_byte_identical_json_from_sqlite_and_clickhouse() {
    let database = unique_database("conformance");
    // One portal secret: a token issued by one server reads on the other.
    let secret =
        Some("c7d2e9b04a61f3580e2b7d9c14a6f08e3b5d7c9a1e2f4b6d8c0a3e5f7b9d1c2e".to_string());
    let sqlite = Server::start_with(|c| c.portal.secret = secret.clone());
    let ch_dir = tempfile::tempdir().unwrap();
    let mut ch_config = clickhouse_config(ch_dir.path(), &database);
    ch_config.portal.secret = secret;
    let clickhouse = Server::start_in(ch_dir, ch_config.clone());

    let now_ms = chrono::Utc::now().timestamp_millis();
    let per_tenant = stream(now_ms);
    let total: usize = per_tenant.iter().map(Vec::len).sum();
    assert!(total >= 10_000);
    let mut accepted = 0;
    for (t, events) in per_tenant.iter().enumerate() {
        for chunk in events.chunks(500) {
            let body = batch(chunk);
            let (s1, a1) = sqlite.post("/v1/ingest/batch", TENANT_KEYS[t], &body);
            let (s2, a2) = clickhouse.post("/v1/ingest/batch", TENANT_KEYS[t], &body);
            assert_eq!((s1, s2), (202, 202), "{a1} {a2}");
            assert_eq!(a1, a2, "both stores count accepted and duplicates alike");
            assert_eq!(a1["failed"], 0, "{a1}");
            accepted += a1["accepted"].as_u64().unwrap();
        }
    }
    assert!(accepted < total as u64, "the stream has duplicates");

    let today = chrono::Utc::now().date_naive();
    let day = |back: u64| {
        (today - chrono::Days::new(back))
            .format("%Y-%m-%d")
            .to_string()
    };
    let ranges = [
        String::new(),
        format!("?from={}&to={}", day(31), day(0)),
        format!("?from={}&to={}", day(7), day(3)),
        format!("?from={}&to={}", day(12), day(12)),
        format!("?from={}", day(400)),
    ];
    let mut compared = 0;
    let mut compare = |path: &str, key: &str| {
        let (s1, b1) = sqlite.get_text(path, key);
        let (s2, b2) = clickhouse.get_text(path, key);
        assert_eq!((s1, &b1), (s2, &b2), "{path} differs");
        compared += 1;
        b1
    };
    for key in TENANT_KEYS {
        for range in &ranges {
            compare(&format!("/analytics/mcp/revenue/by-tool{range}"), key);
            compare(&format!("/analytics/mcp/by-agent{range}"), key);
            compare(&format!("/analytics/mcp/summary{range}"), key);
            let sep = if range.is_empty() { "?" } else { "&" };
            // Every page of the tools, two at a time, cursor after cursor.
            let first = format!("/analytics/mcp/revenue/by-tool{range}{sep}limit=2");
            let mut page = compare(&first, key);
            while let Some(cursor) = serde_json::from_str::<Value>(&page).unwrap()["nextCursor"]
                .as_str()
                .map(str::to_string)
            {
                page = compare(&format!("{first}&cursor={cursor}"), key);
            }
            // Every page of the customers, two at a time; then each read narrowed to one.
            compare(&format!("/analytics/mcp/by-customer{range}"), key);
            let first = format!("/analytics/mcp/by-customer{range}{sep}limit=2");
            let mut page = compare(&first, key);
            while let Some(cursor) = serde_json::from_str::<Value>(&page).unwrap()["nextCursor"]
                .as_str()
                .map(str::to_string)
            {
                page = compare(&format!("{first}&cursor={cursor}"), key);
            }
            for read in [
                "revenue/by-tool",
                "by-agent",
                "by-customer",
                "summary",
                "sessions",
                "timeseries",
            ] {
                compare(
                    &format!("/analytics/mcp/{read}{range}{sep}customerId=cust_b"),
                    key,
                );
            }
            compare(&format!("/analytics/mcp/sessions{range}"), key);
            compare(&format!("/analytics/mcp/sessions{range}{sep}limit=7"), key);
            compare(
                &format!("/analytics/mcp/sessions{range}{sep}agentId=agent_claude"),
                key,
            );
            // Series by day and by hour (the hourly rollup; over 31 days both answer 400).
            for interval in ["day", "hour"] {
                for group in ["", "&groupBy=tool", "&groupBy=agent", "&groupBy=customer"] {
                    compare(
                        &format!("/analytics/mcp/timeseries{range}{sep}interval={interval}{group}"),
                        key,
                    );
                }
            }
        }
        // Billing exports of this month and the last, both formats, with and without filters.
        let months = [
            today.format("%Y-%m").to_string(),
            (today - chrono::Months::new(1)).format("%Y-%m").to_string(),
        ];
        for period in &months {
            for query in [
                "",
                "&format=json",
                "&customerId=cust_b",
                "&agentId=agent_claude&format=json",
            ] {
                compare(&format!("/v1/exports/billing?period={period}{query}"), key);
            }
        }
        let sessions: Value =
            serde_json::from_str(&compare("/analytics/mcp/sessions?limit=1000", key)).unwrap();
        let ids: Vec<String> = sessions["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["sessionId"].as_str().unwrap().to_string())
            .collect();
        assert!(ids.len() > 100, "{} sessions", ids.len());
        for id in ids
            .iter()
            .step_by(5)
            .chain(["no_such_session".to_string()].iter())
        {
            compare(&format!("/analytics/mcp/sessions/{id}"), key);
            compare(&format!("/analytics/mcp/sessions/{id}?limit=1"), key);
        }
    }
    // A portal token (one customer) reads the same on both stores, wherever it was issued.
    let month = today.format("%Y-%m").to_string();
    for (key, customer) in [(ACME, "cust_b"), (INITECH, "cust_a"), (ACME, "")] {
        let (status, answer) = sqlite.post(
            "/v1/portal/tokens",
            key,
            &json!({"customerId": customer, "expiresInSeconds": 600}).to_string(),
        );
        if customer.is_empty() {
            assert_eq!(status, 400, "a token names a customer: {answer}");
            continue;
        }
        let token = answer["token"].as_str().unwrap().to_string();
        for path in [
            "/analytics/mcp/summary".to_string(),
            "/analytics/mcp/revenue/by-tool".to_string(),
            "/analytics/mcp/by-agent".to_string(),
            "/analytics/mcp/by-customer".to_string(),
            format!("/analytics/mcp/summary?customerId={customer}"),
            "/analytics/mcp/sessions?limit=1000".to_string(),
            "/analytics/mcp/timeseries?groupBy=customer".to_string(),
            "/analytics/mcp/timeseries?interval=hour&groupBy=tool".to_string(),
            format!("/v1/exports/billing?period={month}"),
        ] {
            let answer = compare(&path, &token);
            assert!(!answer.contains("cust_c"), "{path}: {answer}");
        }
        let sessions: Value =
            serde_json::from_str(&compare("/analytics/mcp/sessions?limit=1000", &token)).unwrap();
        for s in sessions["sessions"].as_array().unwrap().iter().take(5) {
            compare(
                &format!(
                    "/analytics/mcp/sessions/{}",
                    s["sessionId"].as_str().unwrap()
                ),
                &token,
            );
        }
    }
    eprintln!(
        "conformance: {total} events posted, {accepted} unique, {compared} answers compared byte for byte"
    );
    let acme_summary: Value =
        serde_json::from_str(&sqlite.get_text("/analytics/mcp/summary", ACME).1).unwrap();
    assert!(acme_summary["calls"].as_i64().unwrap() > 2000);
    assert!(acme_summary["errors"].as_i64().unwrap() > 0);
    assert!(acme_summary["sessions"].as_i64().unwrap() > 100);

    // The same raw rows on current ClickHouse (chDB): every migration, every query, same answers.
    let chdb = chdb::Chdb::start(&database);
    let server = HttpRunner::new(&ch_config.clickhouse);
    runtime().block_on(async {
        let outcomes = migrations::migrate(&chdb, &chdb, &database).await.unwrap();
        assert!(outcomes
            .iter()
            .all(|(_, o)| *o == migrations::Outcome::Applied));
        let rows = server
            .tab_separated("SELECT * FROM mcp_events")
            .await
            .unwrap();
        chdb.execute(&format!(
            "INSERT INTO mcp_events FORMAT TabSeparated\n{rows}"
        ))
        .await
        .unwrap();
        let count = "SELECT count(), sum(revenue_micros) FROM mcp_events";
        let on_chdb = chdb.tab_separated(count).await.unwrap();
        assert_eq!(on_chdb, server.tab_separated(count).await.unwrap());
        assert!(on_chdb.starts_with(&format!("{accepted}\t")), "{on_chdb}");
        let (old, new) = (
            ClickHouseAnalytics::new(server.clone()),
            ClickHouseAnalytics::new(&chdb),
        );
        let mut checked = 0;
        for tenant in ["acme", "globex", "initech"] {
            // Ranges ending today; the shortest holds yesterday too, so that it has events
            // however soon after midnight (UTC) the test runs.
            for back in [31, 7, 1] {
                let range = DateRange {
                    from: today - chrono::Days::new(back),
                    to: today,
                };
                assert!(!old
                    .revenue_by_tool(&Viewer::tenant(tenant), range)
                    .await
                    .unwrap()
                    .is_empty());
                assert_eq!(
                    json(
                        &old.revenue_by_tool(&Viewer::tenant(tenant), range)
                            .await
                            .unwrap()
                    ),
                    json(
                        &new.revenue_by_tool(&Viewer::tenant(tenant), range)
                            .await
                            .unwrap()
                    )
                );
                assert_eq!(
                    json(
                        &old.usage_by_agent(&Viewer::tenant(tenant), range)
                            .await
                            .unwrap()
                    ),
                    json(
                        &new.usage_by_agent(&Viewer::tenant(tenant), range)
                            .await
                            .unwrap()
                    )
                );
                assert_eq!(
                    json(&old.summary(&Viewer::tenant(tenant), range).await.unwrap()),
                    json(&new.summary(&Viewer::tenant(tenant), range).await.unwrap())
                );
                let customers = old
                    .usage_by_customer(&Viewer::tenant(tenant), range)
                    .await
                    .unwrap();
                assert!(customers.iter().any(|c| c.customer_id.is_none()));
                assert_eq!(
                    json(&customers),
                    json(
                        &new.usage_by_customer(&Viewer::tenant(tenant), range)
                            .await
                            .unwrap()
                    )
                );
                // Pages of 7 lines walk the keyset; they add up to the one-page answer.
                let query = BillingQuery {
                    range,
                    customer_id: None,
                    agent_id: None,
                };
                let whole = old
                    .billing_page(&Viewer::tenant(tenant), &query, None, 100_000)
                    .await
                    .unwrap();
                assert!(whole.len() > 7, "{} lines", whole.len());
                let mut paged = Vec::new();
                loop {
                    let after = paged
                        .last()
                        .map(|l: &schemas::billing::BillingLine| l.key.clone());
                    let page = new
                        .billing_page(&Viewer::tenant(tenant), &query, after.as_ref(), 7)
                        .await
                        .unwrap();
                    let done = page.len() < 7;
                    paged.extend(page);
                    if done {
                        break;
                    }
                }
                assert_eq!(paged, whole, "chDB's pages equal 18.16's whole answer");
                for agent in [None, Some("agent_claude".to_string())] {
                    let q = SessionQuery {
                        range,
                        agent_id: agent,
                        limit: 50,
                    };
                    assert_eq!(
                        json(
                            &old.sessions(&Viewer::tenant(tenant), q.clone())
                                .await
                                .unwrap()
                        ),
                        json(&new.sessions(&Viewer::tenant(tenant), q).await.unwrap())
                    );
                }
                checked += 7;
            }
            // Series from both rollups, and a customer's view of the rest.
            let range = DateRange {
                from: today - chrono::Days::new(20),
                to: today,
            };
            for interval in [Interval::Day, Interval::Hour] {
                for group in [None, Some(GroupBy::Tool), Some(GroupBy::Customer)] {
                    let q = SeriesQuery::new(range, interval, group).unwrap();
                    let rows = old.series_rows(&Viewer::tenant(tenant), q).await.unwrap();
                    assert!(!rows.is_empty(), "{interval:?} {group:?}");
                    assert_eq!(
                        rows,
                        new.series_rows(&Viewer::tenant(tenant), q).await.unwrap(),
                        "{interval:?} {group:?}"
                    );
                    checked += 1;
                }
            }
            let customer = Viewer {
                tenant: tenant.to_string(),
                customer: Some("cust_b".into()),
            };
            assert_eq!(
                json(&old.summary(&customer, range).await.unwrap()),
                json(&new.summary(&customer, range).await.unwrap())
            );
            assert_eq!(
                json(&old.usage_by_customer(&customer, range).await.unwrap()),
                json(&new.usage_by_customer(&customer, range).await.unwrap())
            );
            let q = SessionQuery {
                range,
                agent_id: None,
                limit: 1000,
            };
            assert_eq!(
                json(&old.sessions(&customer, q.clone()).await.unwrap()),
                json(&new.sessions(&customer, q).await.unwrap())
            );
            checked += 3;
            for id in ["sess_0_1", "sess_1_2", "sess_2_3", "nope"] {
                let found = old
                    .session(&Viewer::tenant(tenant), id)
                    .await
                    .unwrap()
                    .is_some();
                assert_eq!(
                    found,
                    id.starts_with(&format!(
                        "sess_{}_",
                        ["acme", "globex", "initech"]
                            .iter()
                            .position(|t| *t == tenant)
                            .unwrap()
                    ))
                );
                assert_eq!(
                    json(&old.session(&Viewer::tenant(tenant), id).await.unwrap()),
                    json(&new.session(&Viewer::tenant(tenant), id).await.unwrap())
                );
                checked += 1;
            }
        }
        eprintln!(
            "chDB {}: {checked} answers equal to ClickHouse 18.16's",
            chdb.version
        );
    });
}

/// Any analytics answer as JSON text, for comparison.
fn json<T: serde::Serialize>(answer: &T) -> String {
    serde_json::to_string(answer).unwrap()
}

/// The grants ledger on ClickHouse 18.16 and on chDB: a key is recorded once (a repeat answers
/// the first grant), and the usage a rebuilt wallet counts is summed by received time, in all
/// and before each lapse. Both engines answer the same seeds.
#[test]
fn the_grants_ledger_records_each_key_once_and_sums_usage_by_received_time() {
    let (_dir, server, chdb) = both_engines("ledger");
    runtime().block_on(async {
        let on_server = ledger_seeds(&server).await;
        let on_chdb = ledger_seeds(&chdb).await;
        assert_eq!(on_server, on_chdb, "chDB {} answers as 18.16", chdb.version);
    });
}

async fn ledger_seeds(runner: &dyn SqlRunner) -> Vec<backends::state::WalletSeed> {
    use backends::store::clickhouse::ClickHouseLedger;
    use backends::store::{wallet_seeds, CreditLedger};
    use schemas::credits::CreditGrant;
    const T0: i64 = 1_795_132_800_000;
    let ledger = ClickHouseLedger::new(runner);
    let grant = |key: &str, amount: i64, at: i64, expires: Option<i64>| CreditGrant {
        customer_id: "c'1".into(),
        idempotency_key: key.into(),
        amount_micros: amount,
        granted_at_ms: at,
        expires_at_ms: expires,
        note: "tab\there".into(),
    };
    let first = grant("g1", 1000, T0, Some(T0 + 10_000));
    assert_eq!(ledger.record_grant("t", &first).await.unwrap(), first);
    let repeat = grant("g1", 9999, T0 + 5, None);
    assert_eq!(ledger.record_grant("t", &repeat).await.unwrap(), first);
    ledger
        .record_grant("t", &grant("g2", 500, T0 + 1, None))
        .await
        .unwrap();
    // Usage received before the first grant, before its lapse, and after it.
    let mut writer = ClickHouseWriter::for_topic(runner, "events");
    let events: Vec<RatedEvent> = [(T0 - 1, "u0"), (T0 + 100, "u1"), (T0 + 20_000, "u2")]
        .iter()
        .map(|(at, key)| RatedEvent {
            customer_id: "c'1".into(),
            received_at_ms: *at,
            ..rated(key, "s")
        })
        .collect();
    writer
        .write(&[TenantBatch::new("t".into(), events)])
        .await
        .unwrap();
    assert_eq!(ledger.grants("t", None).await.unwrap().len(), 2);
    assert_eq!(ledger.grants("other", None).await.unwrap().len(), 0);
    assert_eq!(
        ledger
            .usage_since("t", "c'1", T0, &[T0 + 10_000])
            .await
            .unwrap(),
        (200, vec![100])
    );
    // A rebuild reads the calls after a moment one by one and the store sums what came before;
    // wherever that moment falls (before the lapse, after it, after every call), the wallet
    // is the same.
    let mut seeds = Vec::new();
    for recent_since in [T0 - 10, T0 + 50, T0 + 15_000, T0 + 40_000] {
        let recent = ledger.calls_since("t", recent_since).await.unwrap();
        let groups = ledger
            .call_groups("t", T0 - 10, recent_since)
            .await
            .unwrap();
        let counted: i64 = recent.iter().map(|c| c.revenue_micros).sum::<i64>()
            + groups.iter().map(|g| g.revenue_micros).sum::<i64>();
        assert_eq!(
            counted, 300,
            "every call since T0 - 10, split at {recent_since}"
        );
        seeds.push(
            wallet_seeds(&ledger, "t", T0 + 30_000, recent_since, &recent)
                .await
                .unwrap(),
        );
    }
    assert!(seeds.windows(2).all(|w| w[0] == w[1]), "{seeds:?}");
    seeds.pop().unwrap()
}
