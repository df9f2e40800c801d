//! The ingestor's Kafka producer. Idempotent with `acks=all`: a message the broker acknowledged
//! is on every in-sync replica, and a retry inside the producer never writes it twice.

use super::brokers;
use crate::error::SinkError;
use crate::sink::{EventSink, TenantBatch, WriteOutcome};
use crate::source::BusError;
use rdkafka::client::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientConfig;
use schemas::config::KafkaConfig;
use schemas::event::{bus_key, BusEventRef};
use std::collections::HashSet;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::oneshot;

/// The delivery reports of one published batch. Every message sent carries a clone of it;
/// whoever brings `remaining` to zero (the last report, or the sender once it has sent
/// everything) tells the waiting request, with the first failure if there was one. One
/// allocation per batch instead of a channel per event.
struct Pending {
    /// Reports still due, plus one held by the sender until it has sent the whole batch.
    remaining: AtomicUsize,
    failure: Mutex<Option<KafkaError>>,
    done: Mutex<Option<oneshot::Sender<Option<KafkaError>>>>,
}

impl Pending {
    fn new() -> (Arc<Pending>, oneshot::Receiver<Option<KafkaError>>) {
        let (done, reports) = oneshot::channel();
        let pending = Pending {
            remaining: AtomicUsize::new(1),
            failure: Mutex::new(None),
            done: Mutex::new(Some(done)),
        };
        (Arc::new(pending), reports)
    }

    fn release(&self) {
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            let failure = self.failure.lock().expect("failure lock").take();
            if let Some(done) = self.done.lock().expect("done lock").take() {
                let _ = done.send(failure); // the request may have given up waiting
            }
        }
    }
}

/// Routes each delivery report to its batch's [`Pending`].
struct Deliveries;

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = Arc<Pending>;

    fn delivery(&self, result: &DeliveryResult<'_>, pending: Arc<Pending>) {
        if let Err((e, _)) = result {
            pending
                .failure
                .lock()
                .expect("failure lock")
                .get_or_insert_with(|| e.clone());
        }
        pending.release();
    }
}

type EventProducer = ThreadedProducer<Deliveries>;

pub struct KafkaSink {
    /// Replaced when it can no longer deliver (see [`KafkaSink::recover`]).
    producer: RwLock<Arc<EventProducer>>,
    config: KafkaConfig,
    /// Publishes that failed in a row, across requests.
    failures: AtomicU32,
    delivery_timeout: Duration,
}

/// Failed publishes in a row after which the producer is rebuilt even without a fatal error.
const REBUILD_AFTER_FAILURES: u32 = 3;

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
        Ok(KafkaSink {
            producer: RwLock::new(Arc::new(create(config)?)),
            config: config.clone(),
            failures: AtomicU32::new(0),
            // librdkafka gives up on a message after message.timeout.ms; a little more here
            // only guards against a report that never comes.
            delivery_timeout: Duration::from_millis(config.delivery_timeout_ms + 1000),
        })
    }

    /// An idempotent producer can end up unable to deliver for good: a fatal error (the broker
    /// fenced it), or a broker restarted without its producer state, refusing every sequence
    /// number that follows. Both would keep ingest at 503 forever, so after a fatal error, or
    /// a few failed publishes in a row, the producer is replaced by a new one (a new producer
    /// id). Safe: the aggregator deduplicates by key whatever the producer.
    fn recover(&self, failed: &Arc<EventProducer>) {
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        let fatal = failed.client().fatal_error();
        if fatal.is_none() && failures < REBUILD_AFTER_FAILURES {
            return;
        }
        let mut current = self.producer.write().expect("producer lock");
        if !Arc::ptr_eq(&current, failed) {
            return; // another request replaced it already
        }
        match create(&self.config) {
            Ok(fresh) => {
                tracing::warn!(?fatal, failures, "replacing the kafka producer");
                crate::metrics::KAFKA.producer_rebuilds.add(1);
                *current = Arc::new(fresh);
                self.failures.store(0, Ordering::Relaxed);
            }
            Err(e) => tracing::error!(error = %e, "cannot create a new kafka producer"),
        }
    }

    async fn send(
        &self,
        producer: &EventProducer,
        batch: &TenantBatch,
    ) -> Result<WriteOutcome, SinkError> {
        let mut outcome = WriteOutcome::default();
        let mut seen = HashSet::with_capacity(batch.events.len());
        let (pending, reports) = Pending::new();
        // librdkafka copies each payload into its own queue, so one buffer serves every event.
        let mut payload = Vec::with_capacity(1024);
        for event in &batch.events {
            // A key repeated inside one request is the same event: send it once.
            if !seen.insert(event.idempotency_key.as_str()) {
                outcome.duplicates += 1;
                continue;
            }
            payload.clear();
            serde_json::to_writer(
                &mut payload,
                &BusEventRef {
                    tenant_id: &batch.tenant_id,
                    event,
                },
            )
            .expect("a rated event serializes");
            let key = bus_key(&batch.tenant_id, &event.idempotency_key);
            pending.remaining.fetch_add(1, Ordering::AcqRel);
            let record = BaseRecord::with_opaque_to(&self.config.events_topic, pending.clone())
                .key(&key[..])
                .payload(&payload);
            if let Err((e, _)) = producer.send(record) {
                // Not queued: no report will come for it (the record and its clone are dropped).
                pending.remaining.fetch_sub(1, Ordering::AcqRel);
                return Err(match e {
                    KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull) => {
                        SinkError::Overloaded {
                            waiting: producer.in_flight_count().max(0) as usize,
                        }
                    }
                    e => SinkError::Unavailable(format!("kafka: {e}")),
                });
            }
            outcome.accepted += 1;
        }
        pending.release(); // everything is sent: the last report may now answer
        match tokio::time::timeout(self.delivery_timeout, reports).await {
            Ok(Ok(None)) => Ok(outcome),
            Ok(Ok(Some(e))) => Err(SinkError::Unavailable(format!(
                "kafka did not take the events: {e}"
            ))),
            Ok(Err(_)) => Err(SinkError::Unavailable("kafka producer stopped".into())),
            Err(_) => Err(SinkError::Unavailable(
                "kafka did not acknowledge the events in time".into(),
            )),
        }
    }
}

fn create(config: &KafkaConfig) -> Result<EventProducer, BusError> {
    producer_config(config)?
        .create_with_context(Deliveries)
        .map_err(|source| BusError::retriable("create a producer", source))
}

#[async_trait::async_trait]
impl EventSink for KafkaSink {
    /// Returns once every event's delivery report is in. On any failure the whole batch is
    /// answered as not stored: some of it may be, and the client's retry is deduplicated.
    async fn publish(&self, batch: TenantBatch) -> Result<WriteOutcome, SinkError> {
        let producer = self.producer.read().expect("producer lock").clone();
        match self.send(&producer, &batch).await {
            Ok(outcome) => {
                self.failures.store(0, Ordering::Relaxed);
                Ok(outcome)
            }
            Err(SinkError::Unavailable(e)) => {
                crate::metrics::KAFKA.delivery_errors.add(1);
                self.recover(&producer);
                Err(SinkError::Unavailable(e))
            }
            Err(other) => Err(other),
        }
    }

    /// The events topic's metadata answers within a second.
    async fn ready(&self) -> Result<(), SinkError> {
        use rdkafka::producer::Producer;
        let producer = self.producer.read().expect("producer lock").clone();
        let topic = self.config.events_topic.clone();
        let brokers = self.config.brokers.clone().unwrap_or_default();
        tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(Some(&topic), Duration::from_secs(1))
                .map(|_| ())
                .map_err(|e| {
                    SinkError::Unavailable(format!(
                        "kafka metadata from {brokers} (kafka.brokers): {e}"
                    ))
                })
        })
        .await
        .map_err(|e| SinkError::Unavailable(format!("kafka metadata check panicked: {e}")))?
    }

    fn kind(&self) -> &'static str {
        "kafka"
    }
}
