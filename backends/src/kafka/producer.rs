//! The ingestor's Kafka producer. Idempotent with `acks=all`: a message the broker acknowledged
//! is on every in-sync replica, and a retry inside the producer never writes it twice.

use super::brokers;
use crate::error::SinkError;
use crate::sink::{EventSink, TenantBatch, WriteOutcome};
use crate::source::BusError;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::ClientConfig;
use schemas::config::KafkaConfig;
use schemas::event::{bus_key, BusEventRef};
use std::collections::HashSet;
use std::time::Duration;

pub struct KafkaSink {
    producer: FutureProducer,
    topic: String,
    delivery_timeout: Duration,
}

/// The producer settings both the ingestor and the dead-letter path use.
pub(super) fn producer_config(config: &KafkaConfig) -> Result<ClientConfig, BusError> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers(config)?)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", config.linger_ms.to_string())
        .set("message.timeout.ms", config.delivery_timeout_ms.to_string());
    Ok(c)
}

impl KafkaSink {
    pub fn new(config: &KafkaConfig) -> Result<KafkaSink, BusError> {
        let producer = producer_config(config)?
            .create()
            .map_err(|source| BusError::Kafka {
                context: "create a producer",
                source,
            })?;
        Ok(KafkaSink {
            producer,
            topic: config.events_topic.clone(),
            // librdkafka gives up on a message after message.timeout.ms; a little more here
            // only guards against a report that never comes.
            delivery_timeout: Duration::from_millis(config.delivery_timeout_ms + 1000),
        })
    }
}

#[async_trait::async_trait]
impl EventSink for KafkaSink {
    /// Returns once every event's delivery report is in. On any failure the whole batch is
    /// answered as not stored: some of it may be, and the client's retry is deduplicated.
    async fn publish(&self, batch: TenantBatch) -> Result<WriteOutcome, SinkError> {
        let mut outcome = WriteOutcome::default();
        let mut seen = HashSet::with_capacity(batch.events.len());
        let mut deliveries = Vec::with_capacity(batch.events.len());
        for event in &batch.events {
            // A key repeated inside one request is the same event: send it once.
            if !seen.insert(event.idempotency_key.as_str()) {
                outcome.duplicates += 1;
                continue;
            }
            let payload = serde_json::to_vec(&BusEventRef {
                tenant_id: &batch.tenant_id,
                event,
            })
            .expect("a rated event serializes");
            let key = bus_key(&batch.tenant_id, &event.idempotency_key);
            let record = FutureRecord::to(&self.topic)
                .key(&key[..])
                .payload(&payload);
            match self.producer.send_result(record) {
                Ok(delivery) => deliveries.push(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    return Err(SinkError::Overloaded {
                        waiting: self.producer.in_flight_count().max(0) as usize,
                    })
                }
                Err((e, _)) => return Err(SinkError::Unavailable(format!("kafka: {e}"))),
            }
            outcome.accepted += 1;
        }
        for delivery in deliveries {
            match tokio::time::timeout(self.delivery_timeout, delivery).await {
                Ok(Ok(Ok(_))) => {}
                Ok(Ok(Err((e, _)))) => {
                    return Err(SinkError::Unavailable(format!(
                        "kafka did not take the events: {e}"
                    )))
                }
                Ok(Err(_)) => return Err(SinkError::Unavailable("kafka producer stopped".into())),
                Err(_) => {
                    return Err(SinkError::Unavailable(
                        "kafka did not acknowledge the events in time".into(),
                    ))
                }
            }
        }
        Ok(outcome)
    }
}
