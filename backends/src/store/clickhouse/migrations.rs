//! The numbered DDL files of `clickhouse-sql/`, built into the binary, and how they are applied.
//!
//! Every statement is idempotent (`IF NOT EXISTS`), and the record of applied versions lives
//! in a ReplacingMergeTree keyed by version, so running `mcp-meter migrate` twice, or from two
//! processes at once, applies each file's effect exactly once. A file changed after it was
//! applied is refused: add a new file instead.

use super::SqlRunner;
use crate::error::StoreError;

/// Where applied migrations are recorded.
pub const MIGRATIONS_TABLE: &str = "mcp_schema_migrations";

#[derive(Debug)]
pub struct Migration {
    pub version: u32,
    pub name: &'static str,
    pub sql: &'static str,
}

macro_rules! migration {
    ($version:expr, $file:literal) => {
        Migration {
            version: $version,
            name: $file,
            sql: include_str!(concat!("../../../../clickhouse-sql/", $file)),
        }
    };
}

/// In order. A new file gets the next number and a line here; a test checks the two agree.
pub const MIGRATIONS: &[Migration] = &[
    migration!(1, "0001_events.sql"),
    migration!(2, "0002_daily_stats.sql"),
    migration!(3, "0003_session_summary.sql"),
    migration!(4, "0004_event_keys.sql"),
    migration!(5, "0005_kafka_offsets.sql"),
    migration!(6, "0006_topic_offsets.sql"),
    migration!(7, "0007_customer_grants.sql"),
    migration!(8, "0008_dashboard_rollups.sql"),
    migration!(9, "0009_deduplicated_events.sql"),
    migration!(10, "0010_partition_floors.sql"),
];

/// The migration done in code: [`deduplicate_events`].
const DEDUPLICATE_EVENTS: u32 = 9;

/// Blocks whose ids a deduplicating table keeps: a block sent again after this many newer
/// blocks is stored again. Today the writer's key lookup and its wait for timed-out inserts
/// keep a late copy out; the window drops copies of recent blocks (a retry, inserts running at
/// the same time).
pub const DEDUPLICATION_WINDOW: u32 = 1000;

/// The tables the materialized views on `mcp_events` write. On a server that deduplicates
/// without replication, an insert's views run even for a block the events table dropped, so
/// each of these drops the block it derives from it too (inserts then send
/// `deduplicate_blocks_in_dependent_materialized_views = 1`, [`DEDUPLICATE_VIEWS`]). A test
/// keeps the list equal to the views in `clickhouse-sql/`.
pub const EVENT_VIEW_TARGETS: [&str; 5] = [
    "mcp_daily_stats",
    "mcp_session_summary",
    "mcp_event_keys",
    "mcp_hourly_stats",
    "mcp_session_customers",
];

/// Tables a view on `mcp_events` writes that need no block check: what they keep (the greatest
/// block end per partition) is the same whether a block is counted once or twice.
pub const IDEMPOTENT_VIEW_TARGETS: [&str; 1] = ["mcp_kafka_floors"];

/// What an insert into `mcp_events` adds on a [`Deduplication::Window`] server, so that its
/// views' tables check their blocks too.
pub const DEDUPLICATE_VIEWS: &str = "deduplicate_blocks_in_dependent_materialized_views = 1";

/// How `mcp_events` drops a block inserted twice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Deduplication {
    /// A MergeTree with `non_replicated_deduplication_window`, its views' tables too (ClickHouse
    /// 24.7 and later).
    Window,
    /// A ReplicatedMergeTree whose block ids live in ZooKeeper (ClickHouse 18.16, and any
    /// version before 24.7).
    Replicated,
}

/// How `mcp_events` deduplicates now, if it does.
pub async fn events_deduplication(
    runner: &dyn SqlRunner,
) -> Result<Option<Deduplication>, StoreError> {
    let answer = runner
        .tab_separated(
            "SELECT engine, create_table_query FROM system.tables \
WHERE database = currentDatabase() AND name = 'mcp_events'",
        )
        .await?;
    let Some(mut row) = super::tsv::rows(&answer, "read the events table's engine").next() else {
        return Ok(None);
    };
    let (engine, query) = (row.string()?, row.string()?);
    Ok(if engine.starts_with("Replicated") {
        Some(Deduplication::Replicated)
    } else if query.contains("non_replicated_deduplication_window") {
        Some(Deduplication::Window)
    } else {
        None
    })
}

/// The first ClickHouse whose views' tables take the block ids of the insert that feeds them
/// (24.7): before it, a view's table checking its own blocks compares what the view derived,
/// and two different batches that roll up alike would drop the second one's rollup.
const WINDOW_SINCE: (u32, u32) = (24, 7);

/// Makes `mcp_events` drop a block inserted twice, the way the server can: the window setting
/// from ClickHouse 24.7, else a ReplicatedMergeTree on the server's ZooKeeper (18.16 and any
/// other), with the rows copied over and the old table swapped out by name (the materialized
/// views follow the name, so nothing they hold is counted again). Run with no writer running:
/// rows written to the old table after the copy stay behind in `mcp_events_unreplicated`,
/// which is kept, and migrate says so.
pub async fn deduplicate_events(
    runner: &dyn SqlRunner,
    database: &str,
) -> Result<Deduplication, StoreError> {
    if let Some(done) = events_deduplication(runner).await? {
        return Ok(done);
    }
    let version = runner.tab_separated("SELECT version()").await?;
    let mut numbers = version
        .trim()
        .split('.')
        .map(|n| n.parse::<u32>().unwrap_or(0));
    let major_minor = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    if major_minor >= WINDOW_SINCE {
        // The views' tables first: the events table's setting is what says it is done.
        for table in EVENT_VIEW_TARGETS.iter().chain(&["mcp_events"]) {
            runner
                .execute(&format!(
                    "ALTER TABLE {table} MODIFY SETTING non_replicated_deduplication_window = \
{DEDUPLICATION_WINDOW}"
                ))
                .await?;
        }
        return Ok(Deduplication::Window);
    }
    if let Err(e) = runner
        .tab_separated("SELECT count() FROM system.zookeeper WHERE path = '/'")
        .await
    {
        return Err(StoreError::NotReady(format!(
            "this ClickHouse ({}) cannot drop a batch inserted twice, which exactly-once storage \
needs: before 24.7 only replicated tables do it safely, and they need a <zookeeper> section (and \
interserver_http_port) in the server's config.xml; or use ClickHouse 24.7 or later, which needs \
nothing. ({e})",
            version.trim()
        )));
    }
    // A plain CREATE of a table no step renames: of two migrates at once, one converts and the
    // other waits for it (the replicated table's name cannot serve: the swap frees it).
    let locked = runner
        .execute("CREATE TABLE mcp_events_conversion (started DateTime) ENGINE = TinyLog")
        .await;
    if let Err(e) = locked {
        let mut last = String::new();
        for _ in 0..600 {
            // While the other migrate renames the tables (not at once before 24.x), reading
            // `system.tables` may fail on a name that moved ("mcp_events_replicated doesn't
            // exist"): not an answer yet, ask again. Only here, where the lock says a
            // conversion is under way; the first check above lets no failed read through.
            match events_deduplication(runner).await {
                Ok(Some(done)) => return Ok(done),
                Ok(None) => {}
                Err(read) => last = format!("; last read: {read}"),
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        return Err(StoreError::NotReady(format!(
            "another migrate has been making mcp_events replicated for a minute, or one stopped \
midway: if none is running, DROP TABLE mcp_events_conversion and mcp_events_replicated (which \
holds only a copy) and migrate again. ({e}{last})"
        )));
    }
    runner
        .execute(&format!(
            "CREATE TABLE mcp_events_replicated AS mcp_events \
ENGINE = ReplicatedMergeTree('/clickhouse/mcp-meter/{database}/mcp_events', 'mcp-meter') \
PARTITION BY toYYYYMM(occurred_at) ORDER BY (tenant_id, occurred_at, idempotency_key) \
SETTINGS replicated_deduplication_window = {DEDUPLICATION_WINDOW}"
        ))
        .await?;
    runner
        .execute("INSERT INTO mcp_events_replicated SELECT * FROM mcp_events")
        .await?;
    runner
        .execute(
            "RENAME TABLE mcp_events TO mcp_events_unreplicated, \
mcp_events_replicated TO mcp_events",
        )
        .await?;
    // Rows a writer added after the copy are in the old table only: say so, and keep it.
    let left_behind = runner
        .tab_separated(
            "SELECT count() FROM mcp_events_unreplicated WHERE (tenant_id, idempotency_key) \
NOT IN (SELECT tenant_id, idempotency_key FROM mcp_events)",
        )
        .await?;
    if left_behind.trim() != "0" {
        return Err(StoreError::NotReady(format!(
            "{} rows were written to mcp_events while it was copied (a writer was running): \
they are in mcp_events_unreplicated, and their rollups are counted already; copy them into \
mcp_events with the aggregators stopped (materialized views would count them again: insert \
them into a table without views, then ATTACH its partitions)",
            left_behind.trim()
        )));
    }
    runner.execute("DROP TABLE mcp_events_unreplicated").await?;
    runner.execute("DROP TABLE mcp_events_conversion").await?;
    Ok(Deduplication::Replicated)
}

/// Keeps the floors recorded before offsets were per topic (`mcp_kafka_offsets`) as floors of
/// `topic`, the configured events topic, and names it as the topic of untagged rows (rows
/// written before then, whose `kafka_topic` is ''). Only while nothing is recorded per topic
/// and no topic is named yet, so running it again (or with another topic later) changes
/// nothing. Returns how many partitions' floors it kept.
pub async fn keep_untagged_offsets(
    runner: &dyn SqlRunner,
    topic: &str,
) -> Result<usize, StoreError> {
    let recorded = runner
        .tab_separated(
            "SELECT (SELECT count() FROM mcp_kafka_topic_offsets), \
(SELECT count() FROM mcp_kafka_untagged_topic), \
(SELECT uniqExact(kafka_partition) FROM mcp_kafka_offsets)",
        )
        .await?;
    let mut row = super::tsv::rows(&recorded, "read recorded offsets")
        .next()
        .ok_or(StoreError::BadAnswer {
            context: "read recorded offsets",
            detail: "no row".into(),
        })?;
    let (per_topic, named, untagged) = (row.int()?, row.int()?, row.int()?);
    if per_topic > 0 || named > 0 {
        return Ok(0);
    }
    let topic = super::queries::quote(topic);
    runner
        .execute(&format!(
            "INSERT INTO mcp_kafka_topic_offsets (kafka_topic, kafka_partition, max_offset) \
SELECT {topic}, kafka_partition, max(max_offset) FROM mcp_kafka_offsets GROUP BY kafka_partition"
        ))
        .await?;
    runner
        .execute(&format!(
            "INSERT INTO mcp_kafka_untagged_topic (kafka_topic) VALUES ({topic})"
        ))
        .await?;
    Ok(untagged as usize)
}

/// `column already exists` on 18.16 (ILLEGAL_COLUMN) and on current servers (DUPLICATE_COLUMN).
const COLUMN_EXISTS_CODES: [u32; 2] = [44, 15];

/// Runs one statement. ClickHouse 18.16 has no `ADD COLUMN IF NOT EXISTS`, so an ADD COLUMN
/// that finds its column already there (a re-run, or another migrate at the same time) counts
/// as done.
async fn apply(runner: &dyn SqlRunner, statement: &str) -> Result<(), StoreError> {
    match runner.execute(statement).await {
        Err(e)
            if statement.contains(" ADD COLUMN ")
                && super::error_code(&e.to_string())
                    .is_some_and(|code| COLUMN_EXISTS_CODES.contains(&code)) =>
        {
            Ok(())
        }
        other => other,
    }
}

/// A file's statements: comment lines dropped, split at `;`. (The DDL has no `;` in strings.)
pub fn statements(sql: &str) -> Vec<String> {
    let text: String = sql
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n");
    text.split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// FNV-1a of a file's text: enough to notice that an applied file was edited.
pub fn checksum(sql: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in sql.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}

/// What `migrate` did with one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    AlreadyApplied,
}

/// Creates `database` (through `server`, which has no database selected) and applies every
/// migration not yet recorded (through `database_runner`). Returns each file's outcome.
pub async fn migrate(
    server: &dyn SqlRunner,
    database_runner: &dyn SqlRunner,
    database: &str,
) -> Result<Vec<(&'static Migration, Outcome)>, StoreError> {
    server
        .execute(&format!("CREATE DATABASE IF NOT EXISTS {database}"))
        .await?;
    database_runner
        .execute(&format!(
            "CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} (version UInt32, name String, \
checksum String, applied_at DateTime('UTC')) ENGINE = ReplacingMergeTree() ORDER BY version"
        ))
        .await?;
    // Every recorded checksum of each version, whether or not the table has merged its rows:
    // a re-run or a concurrent run may have recorded a version twice.
    let recorded = database_runner
        .tab_separated(&format!(
            "SELECT version, checksum FROM {MIGRATIONS_TABLE} GROUP BY version, checksum ORDER BY version"
        ))
        .await?;
    let mut applied: std::collections::HashMap<u32, Vec<String>> = std::collections::HashMap::new();
    for mut row in super::tsv::rows(&recorded, "read applied migrations") {
        applied
            .entry(row.int()? as u32)
            .or_default()
            .push(row.string()?);
    }

    let mut outcomes = Vec::new();
    for m in MIGRATIONS {
        let sum = checksum(m.sql);
        if let Some(recorded) = applied.get(&m.version) {
            if let Some(other) = recorded.iter().find(|r| **r != sum) {
                return Err(StoreError::NotReady(format!(
                    "migration {} was changed after it was applied (checksum {other}, now {sum}); \
                     restore it and put the change in a new file",
                    m.name
                )));
            }
            outcomes.push((m, Outcome::AlreadyApplied));
            continue;
        }
        for statement in statements(m.sql) {
            apply(database_runner, &statement).await?;
        }
        if m.version == DEDUPLICATE_EVENTS {
            let how = deduplicate_events(database_runner, database).await?;
            tracing::info!(?how, "mcp_events drops a block inserted twice");
        }
        database_runner
            .execute(&format!(
                "INSERT INTO {MIGRATIONS_TABLE} (version, name, checksum, applied_at) \
VALUES ({}, '{}', '{sum}', now())",
                m.version, m.name
            ))
            .await?;
        outcomes.push((m, Outcome::Applied));
    }
    Ok(outcomes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_in_the_folder_is_listed_in_order() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../clickhouse-sql");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".sql"))
            .collect();
        files.sort();
        let listed: Vec<&str> = MIGRATIONS.iter().map(|m| m.name).collect();
        assert_eq!(files, listed);
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version as usize, i + 1);
            assert!(m.name.starts_with(&format!("{:04}_", m.version)));
        }
    }

    #[test]
    fn every_view_on_the_events_table_writes_a_listed_table() {
        let mut targets: Vec<String> = MIGRATIONS
            .iter()
            .flat_map(|m| statements(m.sql))
            .filter(|s| s.starts_with("CREATE MATERIALIZED VIEW") && s.contains("FROM mcp_events"))
            .map(|s| {
                let after = &s[s.find(" TO ").expect("a view writes a table") + 4..];
                after.split_whitespace().next().unwrap().to_string()
            })
            .collect();
        targets.sort();
        let mut listed: Vec<&str> = EVENT_VIEW_TARGETS.to_vec();
        listed.extend(IDEMPOTENT_VIEW_TARGETS);
        listed.sort();
        assert_eq!(targets, listed);
    }

    #[test]
    fn statements_split_at_semicolons_without_comments() {
        let sql = "-- a comment; with a semicolon\nCREATE TABLE a (x UInt8) ENGINE = Memory;\n\n-- two\nCREATE TABLE b (x UInt8) ENGINE = Memory;\n";
        assert_eq!(
            statements(sql),
            vec![
                "CREATE TABLE a (x UInt8) ENGINE = Memory",
                "CREATE TABLE b (x UInt8) ENGINE = Memory"
            ]
        );
        assert_eq!(statements(MIGRATIONS[1].sql).len(), 2);
    }

    #[test]
    fn only_the_portable_subset_is_used() {
        for m in MIGRATIONS {
            let upper = statements(m.sql).join(";").to_uppercase();
            for banned in [
                "DATETIME64",
                " TTL ",
                "CODEC(",
                "MAP(",
                " BOOL",
                "LOWCARDINALITY",
                "SIMPLEAGGREGATEFUNCTION",
                "WITH ",
            ] {
                assert!(!upper.contains(banned), "{} uses {banned}", m.name);
            }
        }
    }
}
