//! The SQLite commit path alone: one transaction of raw rows and rollups, as a group commit
//! writes it, without HTTP in front.
//!
//!     cargo bench -p backends --bench sqlite_commit

use backends::sink::TenantBatch;
use backends::store::{sqlite, StoreWriter};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use schemas::config::SqliteConfig;
use schemas::event::RatedEvent;

const NOW_MS: i64 = 1_795_181_530_000;

/// `n` events with keys from `first`, spread over 200 agents, 12 tools and 10,000 sessions.
fn batch(first: u64, n: u64) -> TenantBatch {
    let events = (first..first + n)
        .map(|i| RatedEvent {
            tool_name: format!("tool_{}", i % 12),
            agent_id: format!("agent_{}", i % 200),
            customer_id: format!("cust_{}", i % 40),
            session_id: format!("sess_{}", i % 10_000),
            metadata: Some(r#"{"inputTokens":1200,"outputTokens":450}"#.into()),
            ..RatedEvent::sample_call(&format!("bench-{i}"), NOW_MS - (i as i64 % 3_600_000))
        })
        .collect();
    TenantBatch::new("bench".into(), events)
}

fn commit(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("sqlite_commit");
    group.sample_size(20);
    for size in [100u64, 1000, 10_000] {
        let dir = tempfile::tempdir().unwrap();
        let (mut writer, _) = sqlite::open(dir.path(), &SqliteConfig::default()).unwrap();
        let mut next = 0;
        group.throughput(Throughput::Elements(size));
        group.bench_function(format!("{size}_events"), |b| {
            b.iter_batched(
                || {
                    next += size;
                    batch(next, size)
                },
                |batch| runtime.block_on(writer.write(&[batch])).unwrap(),
                BatchSize::LargeInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, commit);
criterion_main!(benches);
