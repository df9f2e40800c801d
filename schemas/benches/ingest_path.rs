//! What each event costs on its way in, before the store: parse, validate, rate.
//!
//!     cargo bench -p schemas --bench ingest_path

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use schemas::event::{parse_event, validate, EventLimits, TimeBounds};
use schemas::rating::{demo_rate_plan, RatePlans};
use std::hint::black_box;

const NOW_MS: i64 = 1_795_181_530_000;
const SEED: &str = r#"{"idempotencyKey":"evt-1","metricName":"mcp_server.tool_invocations","productType":"MCP_SERVER","toolName":"web_search","sessionId":"sess_abc123","agentId":"agent_gpt4o_prod","customerId":"cust_acme","occurredAt":"2026-11-20T13:00:00Z","executionStatus":"SUCCESS","executionDurationMs":542,"metadata":{"inputTokens":1200,"outputTokens":450}}"#;

fn bounds() -> (TimeBounds, EventLimits) {
    (
        TimeBounds {
            received_at_ms: NOW_MS,
            max_age_ms: 35 * 86_400_000,
            max_future_skew_ms: 300_000,
        },
        EventLimits {
            max_metadata_bytes: 16 * 1024,
        },
    )
}

fn ingest_path(c: &mut Criterion) {
    let (time, limits) = bounds();
    let plans = RatePlans::new(vec![demo_rate_plan()]);
    let mut group = c.benchmark_group("event");
    group.throughput(Throughput::Elements(1));
    group.bench_function("parse", |b| {
        b.iter(|| parse_event(black_box(SEED)).unwrap())
    });
    group.bench_function("parse_validate", |b| {
        b.iter(|| validate(parse_event(black_box(SEED)).unwrap(), SEED, time, limits).unwrap())
    });
    let valid = validate(parse_event(SEED).unwrap(), SEED, time, limits).unwrap();
    group.bench_function("rate", |b| {
        b.iter(|| plans.rate(black_box(valid.clone()), NOW_MS).unwrap())
    });
    group.bench_function("parse_validate_rate", |b| {
        b.iter(|| {
            let valid =
                validate(parse_event(black_box(SEED)).unwrap(), SEED, time, limits).unwrap();
            plans.rate(valid, NOW_MS).unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, ingest_path);
criterion_main!(benches);
