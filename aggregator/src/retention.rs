//! Retention on a schedule: every `retention.interval_seconds`, what lies past the cutoffs is
//! dropped from the store (`backends::store::Retention`). `serve` runs it beside its writer,
//! each `aggregator` beside its consumer; dropping is idempotent, so several may run at once.

use backends::store::{Dropped, Retention, RetentionCutoffs};
use schemas::config::RetentionConfig;
use std::sync::Arc;
use std::time::Duration;

pub struct RetentionSchedule {
    store: Arc<dyn Retention>,
    config: RetentionConfig,
}

impl RetentionSchedule {
    pub fn new(store: Arc<dyn Retention>, config: RetentionConfig) -> RetentionSchedule {
        RetentionSchedule { store, config }
    }

    /// One round at `now_ms`: drops what is due and says what went.
    pub async fn round(&self, now_ms: i64) -> Result<Vec<Dropped>, backends::error::StoreError> {
        let cutoffs = RetentionCutoffs::at(now_ms, &self.config);
        let dropped = self.store.apply(cutoffs, false).await?;
        for d in &dropped {
            tracing::info!(table = d.table, what = %d.what, rows = d.rows, "retention dropped");
        }
        Ok(dropped)
    }

    /// Rounds until `shutdown` turns true, the first at once.
    pub async fn run(self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut ticks = tokio::time::interval(Duration::from_secs(self.config.interval_seconds));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {
                    if let Err(e) = self.round(chrono::Utc::now().timestamp_millis()).await {
                        tracing::warn!(error = %e, "retention round failed; the next round tries again");
                    }
                }
                _ = shutdown.changed() => {
                    if *shutdown.borrow() {
                        return;
                    }
                }
            }
        }
    }
}
