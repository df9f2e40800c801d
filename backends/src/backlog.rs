//! [`Backlog`]: whether the store holds everything the bus acknowledged. A rebuild of the
//! guard state's ledger reads the store; in the distributed mode the store lags the bus, so the
//! rebuild first waits until every record acknowledged before it began is stored. Otherwise a
//! call settled before Redis lost its data, and stored only after the rebuild read the store,
//! would be counted by neither.

use crate::error::StoreError;
use crate::source::TopicProbe;
use crate::store::StoredOffsets;
use std::sync::Arc;
use std::time::Duration;

#[async_trait::async_trait]
pub trait Backlog: Send + Sync {
    /// Returns once every record the bus held when it was called is stored; `NotReady` when
    /// that takes longer than `wait`.
    async fn drain(&self, wait: Duration) -> Result<(), StoreError>;
}

/// The backlog of a Kafka topic consumed into a store: each partition's end offset, read
/// first, against the floor the store recorded (everything up to it is stored).
pub struct BusBacklog {
    probe: Arc<dyn TopicProbe>,
    offsets: Arc<dyn StoredOffsets>,
}

impl BusBacklog {
    pub fn new(probe: Arc<dyn TopicProbe>, offsets: Arc<dyn StoredOffsets>) -> BusBacklog {
        BusBacklog { probe, offsets }
    }
}

/// The partitions whose floor is still below `ends` (the offset the next record gets).
fn behind(ends: &[(i32, i64)], floors: &std::collections::HashMap<i32, i64>) -> Vec<i32> {
    ends.iter()
        .filter(|(p, end)| floors.get(p).copied().unwrap_or(-1) + 1 < *end)
        .map(|(p, _)| *p)
        .collect()
}

#[async_trait::async_trait]
impl Backlog for BusBacklog {
    async fn drain(&self, wait: Duration) -> Result<(), StoreError> {
        let probe = self.probe.clone();
        let ends = tokio::task::spawn_blocking(move || probe.end_offsets())
            .await
            .map_err(|e| StoreError::WorkerGone(format!("the bus probe failed: {e}")))?
            .map_err(|e| {
                StoreError::NotReady(format!("the bus cannot say its end offsets: {e}"))
            })?;
        let partitions: Vec<i32> = ends.iter().map(|(p, _)| *p).collect();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let floors = self.offsets.stored_offsets(&partitions).await?;
            let late = behind(&ends, &floors);
            if late.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(StoreError::NotReady(format!(
                    "the store is behind the bus on partitions {late:?} after {} ms; the ledger is rebuilt once the aggregators catch up",
                    wait.as_millis()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partition_is_behind_until_its_floor_reaches_the_record_before_its_end() {
        let ends = [(0, 10), (1, 0), (2, 5)];
        let floors = [(0, 8), (2, 4)].into_iter().collect();
        // Partition 0 still lacks offset 9; 1 is empty; 2 has stored offset 4, its last.
        assert_eq!(behind(&ends, &floors), vec![0]);
        let floors = [(0, 9), (2, 4)].into_iter().collect();
        assert!(behind(&ends, &floors).is_empty());
    }
}
