//! The ingestor's Kafka producer. Idempotent with `acks=all`: a message the broker acknowledged
//! is on every in-sync replica, and a retry inside the producer never writes it twice.

use super::brokers;
use crate::error::SinkError;
use crate::sink::{EventSink, TenantBatch, WriteOutcome};
use crate::source::BusError;
use rdkafka::client::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{
    BaseRecord, DeliveryResult, FutureProducer, Producer, ProducerContext, ThreadedProducer,
};
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

/// A producer that a new one (with a new producer id) replaces when it can no longer deliver.
///
/// An idempotent producer can end up unable to deliver for good: a fatal error (the broker
/// fenced it), or a broker that refuses every sequence number that follows. The second comes
/// after requests time out in flight (a broker paused, killed or partitioned): librdkafka then
/// bumps the producer's epoch on its own, which Kafka accepts, and a broker that does not (tansu
/// 0.6.0) or that lost its producer state refuses every produce carrying it. Either would keep
/// ingest at 503, or an aggregator's blocks waiting for their cut markers, for ever. So after a
/// fatal error, or [`RENEW_AFTER_FAILURES`] failed deliveries in a row, the producer is replaced.
/// Safe: the aggregator deduplicates by key whatever the producer, and a cut marker sent twice
/// cuts an empty block.
pub(super) struct Renewing<P> {
    current: RwLock<Arc<Sending<P>>>,
    create: fn(&KafkaConfig) -> Result<P, BusError>,
    config: KafkaConfig,
}

/// One producer and the deliveries it failed in a row, across callers: the failures of a
/// producer already replaced never count against its successor, nor its late successes for it.
pub(super) struct Sending<P> {
    producer: P,
    failures: AtomicU32,
}

impl<P> std::ops::Deref for Sending<P> {
    type Target = P;
    fn deref(&self) -> &P {
        &self.producer
    }
}

impl<P> Sending<P> {
    fn new(producer: P) -> Arc<Sending<P>> {
        Arc::new(Sending {
            producer,
            failures: AtomicU32::new(0),
        })
    }
}

/// Failed deliveries in a row after which the producer is replaced even without a fatal error.
const RENEW_AFTER_FAILURES: u32 = 3;

/// A producer's fatal error, if it had one (after which it delivers nothing more).
pub(super) trait FatalError {
    fn fatal(&self) -> Option<(RDKafkaErrorCode, String)>;
}

impl FatalError for EventProducer {
    fn fatal(&self) -> Option<(RDKafkaErrorCode, String)> {
        self.client().fatal_error()
    }
}

impl FatalError for FutureProducer {
    fn fatal(&self) -> Option<(RDKafkaErrorCode, String)> {
        self.client().fatal_error()
    }
}

impl<P: FatalError> Renewing<P> {
    pub(super) fn new(
        config: &KafkaConfig,
        create: fn(&KafkaConfig) -> Result<P, BusError>,
    ) -> Result<Renewing<P>, BusError> {
        Ok(Renewing {
            current: RwLock::new(Sending::new(create(config)?)),
            create,
            config: config.clone(),
        })
    }

    /// The producer to send with; hand it back to [`Renewing::count`] (or `delivered`,
    /// `failed`) with the outcome of its delivery.
    pub(super) fn current(&self) -> Arc<Sending<P>> {
        self.current.read().expect("producer lock").clone()
    }

    /// Counts the delivery `result` of `used`: [`Renewing::delivered`] or [`Renewing::failed`].
    pub(super) fn count<T, E>(&self, used: &Arc<Sending<P>>, result: &Result<T, E>) {
        match result {
            Ok(_) => self.delivered(used),
            Err(_) => self.failed(used),
        }
    }

    pub(super) fn delivered(&self, used: &Sending<P>) {
        used.failures.store(0, Ordering::Relaxed);
    }

    /// Counts a failed delivery of `used`, and replaces it after a fatal error or a few
    /// failures in a row (unless another caller replaced it already).
    pub(super) fn failed(&self, used: &Arc<Sending<P>>) {
        let failures = used.failures.fetch_add(1, Ordering::Relaxed) + 1;
        let fatal = used.fatal();
        if fatal.is_none() && failures < RENEW_AFTER_FAILURES {
            return;
        }
        let mut current = self.current.write().expect("producer lock");
        if !Arc::ptr_eq(&current, used) {
            return;
        }
        match (self.create)(&self.config) {
            Ok(fresh) => {
                tracing::warn!(?fatal, failures, "replacing the kafka producer");
                crate::metrics::KAFKA.producer_rebuilds.add(1);
                *current = Sending::new(fresh);
            }
            Err(e) => tracing::error!(error = %e, "cannot create a new kafka producer"),
        }
    }
}

pub struct KafkaSink {
    producer: Renewing<EventProducer>,
    config: KafkaConfig,
    delivery_timeout: Duration,
}

/// The producer settings both the ingestor and the aggregator (dead letters, cut markers) use.
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
            producer: Renewing::new(config, create)?,
            config: config.clone(),
            // librdkafka gives up on a message after message.timeout.ms; a little more here
            // only guards against a report that never comes.
            delivery_timeout: Duration::from_millis(config.delivery_timeout_ms + 1000),
        })
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
        let producer = self.producer.current();
        match self.send(&producer, &batch).await {
            Ok(outcome) => {
                self.producer.delivered(&producer);
                Ok(outcome)
            }
            Err(SinkError::Unavailable(e)) => {
                crate::metrics::KAFKA.delivery_errors.add(1);
                self.producer.failed(&producer);
                Err(SinkError::Unavailable(e))
            }
            Err(other) => Err(other),
        }
    }

    /// The events topic's metadata answers within a second.
    async fn ready(&self) -> Result<(), SinkError> {
        use rdkafka::producer::Producer;
        let producer = self.producer.current();
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
