//! Group commit over the real SQLite writer: requests share commits, each answers only after
//! its own commit, and a full queue answers at once instead of growing.

use aggregator::group_commit::{GroupCommit, GroupCommitConfig};
use backends::error::{SinkError, StoreError};
use backends::sink::{EventSink, TenantBatch, WriteOutcome};
use backends::store::{sqlite, StoreWriter};
use schemas::config::SqliteConfig;
use schemas::event::RatedEvent;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};

fn event(key: String) -> RatedEvent {
    RatedEvent::sample_call(&key, 1_795_132_800_000)
}

/// Wraps the real writer: counts commits, and holds the first one until the test lets it go,
/// so that the queue fills deterministically rather than by timing.
struct Gated {
    inner: sqlite::SqliteWriter,
    gate: Option<mpsc::Receiver<()>>,
    entered: Arc<AtomicUsize>,
    committed_events: Arc<AtomicUsize>,
    commits: Arc<Mutex<Vec<usize>>>,
}

#[async_trait::async_trait]
impl StoreWriter for Gated {
    async fn write(&mut self, batches: &[TenantBatch]) -> Result<Vec<WriteOutcome>, StoreError> {
        self.entered.fetch_add(1, Ordering::SeqCst);
        if let Some(gate) = self.gate.take() {
            gate.recv().unwrap();
        }
        let out = self.inner.write(batches).await?;
        let events: usize = batches.iter().map(|b| b.events.len()).sum();
        self.committed_events.fetch_add(events, Ordering::SeqCst);
        self.commits.lock().unwrap().push(batches.len());
        Ok(out)
    }
}

struct Rig {
    sink: Arc<GroupCommit>,
    entered: Arc<AtomicUsize>,
    committed_events: Arc<AtomicUsize>,
    commits: Arc<Mutex<Vec<usize>>>,
    release: mpsc::Sender<()>,
    _dir: tempfile::TempDir,
}

fn rig(queue_capacity_batches: usize) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let (writer, _) = sqlite::open(dir.path(), &SqliteConfig::default()).unwrap();
    let (release, gate) = mpsc::channel();
    let rig_counters = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(Mutex::new(Vec::new())),
    );
    let gated = Gated {
        inner: writer,
        gate: Some(gate),
        entered: rig_counters.0.clone(),
        committed_events: rig_counters.1.clone(),
        commits: rig_counters.2.clone(),
    };
    let config = GroupCommitConfig {
        max_commit_events: 100_000,
        queue_capacity_batches,
    };
    let (sink, _handle) = GroupCommit::start(gated, config).unwrap();
    Rig {
        sink: Arc::new(sink),
        entered: rig_counters.0,
        committed_events: rig_counters.1,
        commits: rig_counters.2,
        release,
        _dir: dir,
    }
}

fn batch(n: usize, prefix: &str) -> TenantBatch {
    TenantBatch::new(
        "t".into(),
        (0..n).map(|i| event(format!("{prefix}-{i}"))).collect(),
    )
}

async fn until(condition: impl Fn() -> bool) {
    while !condition() {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_share_one_commit_and_answer_after_it() {
    let rig = rig(1024);
    let sink = rig.sink.clone();
    let first = tokio::spawn(async move { sink.publish(batch(3, "first")).await });
    until(|| rig.entered.load(Ordering::SeqCst) == 1).await;
    // The first commit is held at the gate; these 49 requests queue up behind it.
    let mut waiting = Vec::new();
    for r in 0..49 {
        let sink = rig.sink.clone();
        let committed = rig.committed_events.clone();
        waiting.push(tokio::spawn(async move {
            let outcome = sink.publish(batch(10, &format!("r{r}"))).await;
            (outcome, committed.load(Ordering::SeqCst))
        }));
    }
    until(|| rig.sink.queued() == 49).await;
    rig.release.send(()).unwrap();
    assert_eq!(first.await.unwrap().unwrap().counts(), (3, 0));
    for w in waiting {
        let (outcome, committed_when_answered) = w.await.unwrap();
        assert_eq!(outcome.unwrap().counts(), (10, 0));
        assert_eq!(
            committed_when_answered,
            3 + 490,
            "answered only after its commit"
        );
    }
    assert_eq!(
        *rig.commits.lock().unwrap(),
        vec![1, 49],
        "49 requests, one commit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_overloaded_at_once_and_loses_nothing_queued() {
    let rig = rig(2);
    let mut held = Vec::new();
    let sink = rig.sink.clone();
    held.push(tokio::spawn(
        async move { sink.publish(batch(1, "h0")).await },
    ));
    until(|| rig.entered.load(Ordering::SeqCst) == 1).await;
    for r in 1..3 {
        let sink = rig.sink.clone();
        held.push(tokio::spawn(async move {
            sink.publish(batch(1, &format!("h{r}"))).await
        }));
    }
    until(|| rig.sink.queued() == 2).await;
    let refused = rig.sink.publish(batch(1, "late")).await;
    assert!(
        matches!(refused, Err(SinkError::Overloaded { .. })),
        "{refused:?}"
    );
    rig.release.send(()).unwrap();
    for h in held {
        assert_eq!(
            h.await.unwrap().unwrap().accepted,
            1,
            "queued work is not lost"
        );
    }
}
