//! The lag monitor's view of the events topic: a consumer outside the group that only reads
//! watermarks and, on demand, one record's timestamp. It assigns partitions to itself and never
//! subscribes, so it never joins the aggregators' group nor takes a partition from them.

use super::{brokers, unreachable};
use crate::source::{BusError, TopicProbe};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use schemas::config::KafkaConfig;
use schemas::event::BusEvent;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long one broker question may take before the probe reports the broker unreachable.
const BROKER_TIMEOUT: Duration = Duration::from_secs(3);

pub struct KafkaProbe {
    /// Locked because `written_at_ms` assigns and polls it, and two assignments at once would
    /// mix their records.
    consumer: Mutex<BaseConsumer>,
    topic: String,
    brokers: String,
}

impl KafkaProbe {
    pub fn new(config: &KafkaConfig) -> Result<KafkaProbe, BusError> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers(config)?)
            // librdkafka refuses `assign` without a group id. This one is the probe's own, and
            // the probe never subscribes or commits under it.
            .set("group.id", format!("{}-lag-probe", config.consumer_group))
            .set("enable.auto.commit", "false")
            // One record is all it reads: fetch little per partition.
            .set("max.partition.fetch.bytes", "65536")
            .set("fetch.wait.max.ms", "50")
            .create()
            .map_err(|source| BusError::retriable("create the lag probe", source))?;
        Ok(KafkaProbe {
            consumer: Mutex::new(consumer),
            topic: config.events_topic.clone(),
            brokers: brokers(config)?.to_string(),
        })
    }
}

impl TopicProbe for KafkaProbe {
    fn end_offsets(&self) -> Result<Vec<(i32, i64)>, BusError> {
        let consumer = self.consumer.lock().expect("probe lock");
        let metadata = consumer
            .fetch_metadata(Some(&self.topic), BROKER_TIMEOUT)
            .map_err(|e| unreachable(&self.brokers, BROKER_TIMEOUT, &e.to_string()))?;
        let mut partitions: Vec<i32> = metadata
            .topics()
            .iter()
            .filter(|t| t.name() == self.topic)
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        partitions.sort_unstable();
        partitions
            .into_iter()
            .map(|p| {
                let (_, high) = consumer
                    .fetch_watermarks(&self.topic, p, BROKER_TIMEOUT)
                    .map_err(|source| {
                        BusError::retriable("read the end offset of a partition", source)
                    })?;
                Ok((p, high))
            })
            .collect()
    }

    fn written_at_ms(&self, partition: i32, offset: i64) -> Result<Option<i64>, BusError> {
        let consumer = self.consumer.lock().expect("probe lock");
        let mut list = TopicPartitionList::new();
        list.add_partition_offset(&self.topic, partition, Offset::Offset(offset))
            .map_err(|source| BusError::retriable("read a record's time", source))?;
        consumer
            .assign(&list)
            .map_err(|source| BusError::retriable("read a record's time", source))?;
        let deadline = Instant::now() + BROKER_TIMEOUT;
        let mut found = None;
        while Instant::now() < deadline {
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) if m.partition() == partition && m.offset() >= offset => {
                    // The producer's create time when the broker keeps it; otherwise when the
                    // ingestor received the event.
                    found = m.timestamp().to_millis().or_else(|| {
                        m.payload()
                            .and_then(|p| serde_json::from_slice::<BusEvent>(p).ok())
                            .map(|b| b.event.received_at_ms)
                    });
                    break;
                }
                Some(Ok(_)) | None => continue,
                Some(Err(source)) => {
                    let _ = consumer.unassign();
                    return Err(BusError::retriable("read a record's time", source));
                }
            }
        }
        let _ = consumer.unassign();
        Ok(found)
    }
}
