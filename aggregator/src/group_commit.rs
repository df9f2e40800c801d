//! Group commit: many concurrent ingest requests share one durable transaction.
//!
//! Every request sends its batch and a reply channel into a bounded queue and waits. The writer
//! thread takes the first waiting batch, then every other batch already queued (up to
//! `max_commit_events`), writes them all in one transaction, and only after the commit returns
//! answers each request with its own outcome. So each request still answers only after its
//! events are durable, while the cost of a commit (its fsync) is shared by everyone waiting.
//! A full queue answers `Overloaded` at once instead of letting memory grow.

use crate::metrics::METRICS;
use backends::error::SinkError;
use backends::sink::{EventSink, TenantBatch, WriteOutcome};
use backends::store::StoreWriter;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// How the writer batches commits.
#[derive(Clone, Copy, Debug)]
pub struct GroupCommitConfig {
    /// Most events one transaction writes; further batches wait for the next commit.
    pub max_commit_events: usize,
    /// Batches that may wait; beyond this `publish` answers `Overloaded`.
    pub queue_capacity_batches: usize,
}

/// How often a commit that failed with a passing error (a busy database) is tried again
/// before its requests are told to retry.
const COMMIT_ATTEMPTS: u32 = 5;

struct Job {
    batch: TenantBatch,
    reply: oneshot::Sender<Result<WriteOutcome, SinkError>>,
}

/// The embedded [`EventSink`]: publish returns once the batch is committed to the store.
pub struct GroupCommit {
    queue: mpsc::Sender<Job>,
}

impl GroupCommit {
    /// Starts the writer thread. It runs until every clone of the returned sink is dropped,
    /// then commits what is still queued and ends; join the handle to wait for that.
    pub fn start<W: StoreWriter + 'static>(
        writer: W,
        config: GroupCommitConfig,
    ) -> std::io::Result<(GroupCommit, JoinHandle<()>)> {
        let (queue, jobs) = mpsc::channel(config.queue_capacity_batches);
        let handle = std::thread::Builder::new()
            .name("group-commit".into())
            .spawn(move || run(writer, jobs, config.max_commit_events))?;
        Ok((GroupCommit { queue }, handle))
    }

    /// Batches waiting for the writer (not counting the ones it is committing).
    pub fn queued(&self) -> usize {
        self.queue.max_capacity() - self.queue.capacity()
    }
}

#[async_trait::async_trait]
impl EventSink for GroupCommit {
    async fn publish(&self, batch: TenantBatch) -> Result<WriteOutcome, SinkError> {
        if batch.events.is_empty() {
            return Ok(WriteOutcome::default());
        }
        let (reply, answer) = oneshot::channel();
        self.queue
            .try_send(Job { batch, reply })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => SinkError::Overloaded {
                    waiting: self.queue.max_capacity(),
                },
                mpsc::error::TrySendError::Closed(_) => {
                    SinkError::Unavailable("the store writer has stopped".into())
                }
            })?;
        // The writer drops `reply` only if it dies mid-commit; the batch may or may not be
        // stored then, so the client is told to retry, which its idempotency keys make safe.
        answer.await.unwrap_or_else(|_| {
            Err(SinkError::Unavailable(
                "the store writer stopped during the commit".into(),
            ))
        })
    }

    async fn ready(&self) -> Result<(), SinkError> {
        if self.queue.is_closed() {
            return Err(SinkError::Unavailable(
                "the store writer has stopped".into(),
            ));
        }
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "store-writer"
    }
}

fn run<W: StoreWriter>(writer: W, jobs: mpsc::Receiver<Job>, max_commit_events: usize) {
    // The writer gets a runtime of its own: a SQLite commit blocks this thread, and a ClickHouse
    // insert is async; neither may stall the runtime that serves HTTP.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime builds");
    runtime.block_on(write_loop(writer, jobs, max_commit_events));
}

async fn write_loop<W: StoreWriter>(
    mut writer: W,
    mut jobs: mpsc::Receiver<Job>,
    max_commit_events: usize,
) {
    // `None`: every sender is gone and the queue is drained, so nothing can be lost by ending.
    while let Some(first) = jobs.recv().await {
        let mut events = first.batch.events.len();
        let mut group = vec![first];
        while events < max_commit_events {
            match jobs.try_recv() {
                Ok(job) => {
                    events += job.batch.events.len();
                    group.push(job);
                }
                Err(_) => break,
            }
        }
        let (batches, replies): (Vec<TenantBatch>, Vec<_>) =
            group.into_iter().map(|j| (j.batch, j.reply)).unzip();
        let started = Instant::now();
        match commit(&mut writer, &batches).await {
            Ok(outcomes) => {
                tracing::debug!(
                    batches = batches.len(),
                    events,
                    elapsed_us = started.elapsed().as_micros() as u64,
                    "group commit"
                );
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    // A requester that went away (client disconnected) needs no answer; its
                    // events are stored all the same.
                    let _ = reply.send(Ok(outcome));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, batches = batches.len(), events, "group commit failed");
                for reply in replies {
                    let _ = reply.send(Err(SinkError::Unavailable(e.to_string())));
                }
            }
        }
    }
}

async fn commit<W: StoreWriter>(
    writer: &mut W,
    batches: &[TenantBatch],
) -> Result<Vec<WriteOutcome>, backends::error::StoreError> {
    let mut attempt = 1;
    loop {
        let started = std::time::Instant::now();
        let written = writer.write(batches).await;
        match &written {
            Ok(_) => METRICS.store_commit_latency.observe(started.elapsed()),
            Err(_) => METRICS.store_commit_failures.add(1),
        }
        match written {
            Err(e) if e.is_retriable() && attempt < COMMIT_ATTEMPTS => {
                tracing::warn!(error = %e, attempt, "commit failed, retrying");
                tokio::time::sleep(Duration::from_millis(20 << attempt)).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}
