//! The guard state's COMPARE_AND_INCREMENT, kill list and margin states, the same tests on both
//! twins: in memory, and on the real Redis that `scripts/test` starts.

use backends::state::memory::MemoryState;
use backends::state::redis::RedisState;
use backends::state::{Charge, LimitCounters, MarginBoard, RateLimiter, StateBackend};
use schemas::guard::{MarginLevel, MarginState, SubjectKind};
use std::sync::Arc;
use std::time::Duration;

const HOUR: i64 = 3_600_000;

/// Redis expires keys by its own clock, so every test works around the real now.
fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

async fn redis() -> RedisState {
    let url = std::env::var("MCP_METER_TEST_REDIS_URL")
        .expect("MCP_METER_TEST_REDIS_URL is not set: run scripts/test, which starts Redis");
    let prefix = format!("test:{}:{}:", std::process::id(), rand_suffix());
    let state = RedisState::new(&url, &prefix, Duration::from_secs(5)).unwrap();
    state.ping().await.unwrap();
    state
}

fn rand_suffix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as i64
}

fn calls(key: &str, limit: i64, n: usize) -> Charge {
    Charge {
        key: key.into(),
        limit,
        expires_at_ms: now() + HOUR,
        amounts: vec![1; n],
    }
}

/// 50 concurrent batches of 10 calls for one session against a calls limit of N: exactly N are
/// admitted, every batch that met the limit kills the session, and the kill is listed after.
async fn exactly_n_admitted_under_concurrency(state: Arc<dyn LimitCounters>) {
    let at = now();
    const N: i64 = 137;
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let state = state.clone();
        tasks.push(tokio::spawn(async move {
            let admitted = state
                .charge(&[calls("calls:session:s1", N, 10)], at)
                .await
                .unwrap()[0];
            if admitted < 10 {
                state
                    .kill_sessions("t", &["s1".to_string()], at + HOUR)
                    .await
                    .unwrap();
            }
            admitted
        }));
    }
    let mut total = 0;
    let mut breached = 0;
    for t in tasks {
        let admitted = t.await.unwrap();
        total += admitted as i64;
        breached += usize::from(admitted < 10);
    }
    assert_eq!(total, N, "exactly the limit is admitted");
    assert_eq!(
        breached,
        50 - (N as usize / 10),
        "every batch past the limit saw the breach"
    );
    assert_eq!(
        state
            .killed_among("t", &names(&["s0", "s1"]), at)
            .await
            .unwrap(),
        vec!["s1".to_string()]
    );
    // From then on, nothing more is admitted in this window.
    assert_eq!(
        state
            .charge(&[calls("calls:session:s1", N, 1)], at)
            .await
            .unwrap(),
        vec![0]
    );
    // Other tenants see no kills.
    assert!(state
        .killed_among("other", &names(&["s1"]), at)
        .await
        .unwrap()
        .is_empty());
}

/// Spend amounts are admitted as a prefix and all added; several counters are charged in one
/// atomic step.
async fn spend_prefix_and_many_counters(state: Arc<dyn LimitCounters>) {
    let at = now();
    let spend = Charge {
        key: "spend:agent:a1".into(),
        limit: 10_000,
        expires_at_ms: at + HOUR,
        amounts: vec![5000, 3000, 4000, 1000],
    };
    let answer = state
        .charge(&[spend.clone(), calls("calls:agent:a1", 2, 4)], at)
        .await
        .unwrap();
    assert_eq!(answer, vec![2, 2]);
    // Every amount counts, admitted or not (the counter is the sum of the calls stored, which
    // a rebuild from the store gives back): at 13000, even 1 more is past the limit.
    let more = Charge {
        amounts: vec![1],
        ..spend
    };
    assert_eq!(state.charge(&[more], at).await.unwrap(), vec![0]);
}

/// Kills end when their window does; a later kill extends an earlier one.
async fn kills_expire(state: Arc<dyn LimitCounters>) {
    let at = now();
    state
        .kill_sessions("t2", &["a".into(), "b".into()], at + HOUR)
        .await
        .unwrap();
    state
        .kill_sessions("t2", &["b".into()], at + 2 * HOUR)
        .await
        .unwrap();
    state
        .kill_sessions("t2", &["b".into()], at + HOUR / 2)
        .await
        .unwrap();
    assert_eq!(
        state
            .killed_among("t2", &names(&["a", "b", "c"]), at)
            .await
            .unwrap(),
        vec!["a", "b"]
    );
    assert_eq!(
        state
            .killed_among("t2", &names(&["a", "b", "c"]), at + HOUR + 1)
            .await
            .unwrap(),
        vec!["b"]
    );
    assert!(state
        .killed_among("t2", &names(&["a", "b", "c"]), at + 2 * HOUR)
        .await
        .unwrap()
        .is_empty());
}

/// An agent's sessions are remembered per agent and tenant, and forgotten with their window.
async fn agent_sessions(state: Arc<dyn LimitCounters>) {
    let at = now();
    state
        .track_sessions("t", "a1", &["s2".into(), "s1".into()], at + HOUR)
        .await
        .unwrap();
    state
        .track_sessions("t", "a1", &["s3".into()], at + 2 * HOUR)
        .await
        .unwrap();
    state
        .track_sessions("t", "a2", &["s9".into()], at + HOUR)
        .await
        .unwrap();
    state
        .track_sessions("u", "a1", &["x".into()], at + HOUR)
        .await
        .unwrap();
    assert_eq!(
        state.sessions_of("t", "a1", at).await.unwrap(),
        vec!["s1", "s2", "s3"]
    );
    assert_eq!(
        state.sessions_of("t", "a1", at + HOUR).await.unwrap(),
        vec!["s3"]
    );
    assert!(state
        .sessions_of("t", "nobody", at)
        .await
        .unwrap()
        .is_empty());
}

/// 40 concurrent batches, each naming 5 of 60 tool names (seeded, overlapping), against a
/// bound of 25: exactly 25 distinct names are ever admitted, a name is admitted to every batch
/// once it is known, and the bound is the tenant's alone.
async fn tool_names_bounded_under_concurrency(state: Arc<dyn LimitCounters>) {
    const MAX: u32 = 25;
    let mut seed: u64 = 0x7001;
    let mut batches = Vec::new();
    for _ in 0..40 {
        let mut names: Vec<String> = Vec::new();
        while names.len() < 5 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let name = format!("tool-{}", (seed >> 33) % 60);
            if !names.contains(&name) {
                names.push(name);
            }
        }
        batches.push(names);
    }
    let tasks: Vec<_> = batches
        .iter()
        .cloned()
        .map(|names| {
            let state = state.clone();
            tokio::spawn(async move {
                let known = state.admit_tool_names("t", &names, MAX).await.unwrap();
                names.into_iter().zip(known).collect::<Vec<_>>()
            })
        })
        .collect();
    let mut admitted = std::collections::BTreeSet::new();
    let mut refused = std::collections::BTreeSet::new();
    for t in tasks {
        for (name, known) in t.await.unwrap() {
            if known {
                admitted.insert(name);
            } else {
                refused.insert(name);
            }
        }
    }
    assert_eq!(
        admitted.len(),
        MAX as usize,
        "exactly the bound: {admitted:?}"
    );
    // Asked again, every admitted name is known and every other is refused.
    let all: Vec<String> = (0..60).map(|n| format!("tool-{n}")).collect();
    let known = state.admit_tool_names("t", &all, MAX).await.unwrap();
    for (name, known) in all.iter().zip(known) {
        assert_eq!(known, admitted.contains(name), "{name}");
    }
    // A name refused before is admitted once the bound is raised.
    let late = refused.iter().next().unwrap().clone();
    assert!(!admitted.contains(&late));
    assert_eq!(
        state
            .admit_tool_names("t", std::slice::from_ref(&late), MAX + 1)
            .await
            .unwrap(),
        [true]
    );
    // Another tenant has its own bound.
    assert_eq!(
        state.admit_tool_names("other", &all[..3], 2).await.unwrap(),
        [true, true, false]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_bounds_tool_names_under_concurrency() {
    tool_names_bounded_under_concurrency(Arc::new(MemoryState::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_bounds_tool_names_under_concurrency() {
    tool_names_bounded_under_concurrency(Arc::new(redis().await)).await;
}

#[tokio::test]
async fn memory_remembers_an_agents_sessions() {
    agent_sessions(Arc::new(MemoryState::new())).await;
}

#[tokio::test]
async fn redis_remembers_an_agents_sessions() {
    agent_sessions(Arc::new(redis().await)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_admits_exactly_the_limit_under_concurrency() {
    exactly_n_admitted_under_concurrency(Arc::new(MemoryState::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_admits_exactly_the_limit_under_concurrency() {
    exactly_n_admitted_under_concurrency(Arc::new(redis().await)).await;
}

#[tokio::test]
async fn memory_charges_spend_as_a_prefix_across_counters() {
    spend_prefix_and_many_counters(Arc::new(MemoryState::new())).await;
}

#[tokio::test]
async fn redis_charges_spend_as_a_prefix_across_counters() {
    spend_prefix_and_many_counters(Arc::new(redis().await)).await;
}

#[tokio::test]
async fn memory_kills_expire_with_their_window() {
    kills_expire(Arc::new(MemoryState::new())).await;
}

#[tokio::test]
async fn redis_kills_expire_with_their_window() {
    kills_expire(Arc::new(redis().await)).await;
}

#[tokio::test]
async fn a_window_is_its_own_counter_on_both() {
    let memory = MemoryState::new();
    let redis = redis().await;
    for state in [&memory as &dyn LimitCounters, &redis] {
        let at = now();
        // Callers name the window in the key: a full window does not spill into the next one.
        assert_eq!(
            state
                .charge(&[calls("calls:s:w1", 1, 1)], at)
                .await
                .unwrap(),
            vec![1]
        );
        assert_eq!(
            state
                .charge(&[calls("calls:s:w1", 1, 1)], at)
                .await
                .unwrap(),
            vec![0]
        );
        assert_eq!(
            state
                .charge(&[calls("calls:s:w2", 1, 1)], at)
                .await
                .unwrap(),
            vec![1]
        );
    }
}

#[tokio::test]
async fn an_unreachable_redis_is_an_error_not_a_hang() {
    let state = RedisState::new("redis://127.0.0.1:1", "x:", Duration::from_millis(500)).unwrap();
    let started = std::time::Instant::now();
    assert!(state.ping().await.is_err());
    assert!(state
        .view("t", Some("a"), Some("web"), Some("s"), now())
        .await
        .is_err());
    assert!(started.elapsed() < Duration::from_secs(10));
}

fn margin(subject: SubjectKind, id: &str, level: MarginLevel, at: i64) -> MarginState {
    MarginState {
        subject,
        id: id.into(),
        level,
        margin: Some(0.05),
        revenue_micros: 1000,
        cogs_micros: 950,
        window_days: 7,
        computed_at_ms: at,
    }
}

/// A put replaces the tenant's whole set; a view reads the named agent and tool and the
/// session's kill; other tenants and expired sets read as nothing.
async fn margins_and_views<S: LimitCounters + MarginBoard>(state: Arc<S>) {
    let at = now();
    let web = margin(SubjectKind::Tool, "web", MarginLevel::Throttle, at);
    let agent = margin(SubjectKind::Agent, "web", MarginLevel::Warn, at);
    state
        .put_margins("t", &[web.clone(), agent.clone()], at + HOUR)
        .await
        .unwrap();
    state
        .kill_sessions("t", &["s1".into()], at + HOUR)
        .await
        .unwrap();
    let view = state
        .view("t", Some("web"), Some("web"), Some("s1"), at)
        .await
        .unwrap();
    assert_eq!(
        view.agent.as_ref(),
        Some(&agent),
        "agent and tool ids do not collide"
    );
    assert_eq!(view.tool.as_ref(), Some(&web));
    assert_eq!(view.session_killed_until_ms, Some(at + HOUR));
    let partial = state.view("t", None, Some("web"), None, at).await.unwrap();
    assert_eq!((partial.agent, partial.tool.is_some()), (None, true));
    let unknown = state
        .view("t", Some("nobody"), Some("other"), Some("s2"), at)
        .await
        .unwrap();
    assert_eq!(unknown, Default::default());
    assert_eq!(
        state
            .view("u", Some("web"), Some("web"), Some("s1"), at)
            .await
            .unwrap(),
        Default::default(),
        "another tenant sees nothing"
    );
    // The next computation replaces the set: a subject it no longer lists is gone.
    let recovered = margin(SubjectKind::Tool, "web", MarginLevel::Ok, at + 1);
    state
        .put_margins("t", std::slice::from_ref(&recovered), at + HOUR)
        .await
        .unwrap();
    let view = state
        .view("t", Some("web"), Some("web"), None, at)
        .await
        .unwrap();
    assert_eq!((view.agent, view.tool), (None, Some(recovered)));
}

#[tokio::test]
async fn memory_keeps_margin_states_per_tenant() {
    margins_and_views(Arc::new(MemoryState::new())).await;
}

#[tokio::test]
async fn redis_keeps_margin_states_per_tenant() {
    margins_and_views(Arc::new(redis().await)).await;
}

/// Token buckets: the burst, then one token per 1/rate; buckets are per key. The caller's clock
/// drives the refill, so both twins answer the same waits.
async fn token_buckets(state: Arc<dyn RateLimiter>) {
    let at = now();
    let mut waits = Vec::new();
    for _ in 0..4 {
        waits.push(state.take_token("rate:t:sdk", 4.0, 3, at).await.unwrap());
    }
    assert_eq!(waits, [None, None, None, Some(250)]);
    assert_eq!(
        state.take_token("rate:t:other", 4.0, 3, at).await.unwrap(),
        None
    );
    assert_eq!(
        state
            .take_token("rate:t:sdk", 4.0, 3, at + 100)
            .await
            .unwrap(),
        Some(150)
    );
    assert_eq!(
        state
            .take_token("rate:t:sdk", 4.0, 3, at + 250)
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        state
            .take_token("rate:t:sdk", 4.0, 3, at + 250)
            .await
            .unwrap(),
        Some(250)
    );
}

#[tokio::test]
async fn memory_token_buckets_give_the_burst_then_the_rate() {
    token_buckets(Arc::new(MemoryState::new())).await;
}

#[tokio::test]
async fn redis_token_buckets_give_the_burst_then_the_rate() {
    token_buckets(Arc::new(redis().await)).await;
}

/// Fifty concurrent requests against a burst of 20 on one bucket: exactly 20 admitted.
async fn buckets_are_exact_under_concurrency(state: Arc<dyn RateLimiter>) {
    let at = now();
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let state = state.clone();
            tokio::spawn(async move {
                state
                    .take_token("rate:t:busy", 0.001, 20, at)
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut admitted = 0;
    for t in tasks {
        admitted += usize::from(t.await.unwrap().is_none());
    }
    assert_eq!(admitted, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_buckets_are_exact_under_concurrency() {
    buckets_are_exact_under_concurrency(Arc::new(MemoryState::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_buckets_are_exact_under_concurrency() {
    buckets_are_exact_under_concurrency(Arc::new(redis().await)).await;
}

#[tokio::test]
async fn margin_states_are_forgotten_when_they_expire() {
    let memory = MemoryState::new();
    let redis = redis().await;
    for state in [&memory as &dyn MarginBoard, &redis] {
        let at = now();
        let web = margin(SubjectKind::Tool, "web", MarginLevel::Block, at);
        state.put_margins("t", &[web], at + 300).await.unwrap();
        assert!(state
            .view("t", None, Some("web"), None, now())
            .await
            .unwrap()
            .tool
            .is_some());
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(
            state
                .view("t", None, Some("web"), None, now())
                .await
                .unwrap()
                .tool,
            None
        );
    }
}

fn names(sessions: &[&str]) -> Vec<String> {
    sessions.iter().map(|s| s.to_string()).collect()
}
