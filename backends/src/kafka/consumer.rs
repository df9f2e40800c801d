//! The aggregator's Kafka consumer: a group member that never commits on its own.

use super::brokers;
use super::off_runtime;
use super::producer::{producer_config, Renewing};
use crate::metrics::LogThrottle;
use crate::sink::BusPosition;
use crate::source::{BusError, BusMessage, Content, EventSource, Poison, Polled};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, ClientContext, Message, Offset, TopicPartitionList};
use schemas::config::KafkaConfig;
use schemas::event::BusEvent;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Notes the partitions taken away in a rebalance, for the aggregator to forget.
struct Context {
    topic: String,
    revoked: Arc<Mutex<Vec<i32>>>,
}

/// Longest pause between two reconnection tries to a broker (librdkafka's default is 10 s):
/// after a broker restart, reading resumes within a second.
const RECONNECT_BACKOFF_MAX: Duration = Duration::from_millis(1000);
/// Longest time between two heartbeats (with sessions shorter than 3 s: a third of one): a
/// member hears within a second that the group went on without it, and stops reading what it
/// no longer holds.
const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(1000);

/// The header that marks a cut marker ([`EventSource::cut`]); such a record has no key and no
/// payload.
pub const CUT_HEADER: &str = "mcp-meter-cut";

impl ClientContext for Context {}

impl ConsumerContext for Context {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(list) = rebalance {
            let partitions: Vec<i32> = list
                .elements_for_topic(&self.topic)
                .iter()
                .map(|e| e.partition())
                .collect();
            if consumer.assignment_lost() {
                tracing::warn!(?partitions,
                    "the group went on without this member (its session expired, or the broker restarted and forgot it): \
its partitions are another member's now");
            } else {
                tracing::info!(?partitions, "partitions revoked");
            }
            self.revoked
                .lock()
                .expect("revoked lock")
                .extend(partitions);
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance {
            let partitions: Vec<i32> = list
                .elements_for_topic(&self.topic)
                .iter()
                .map(|e| e.partition())
                .collect();
            tracing::info!(?partitions, "partitions assigned");
        }
    }
}

pub struct KafkaSource {
    /// Shared with the blocking pool: `seek` and `end_offset` wait on the broker for seconds
    /// and must not hold the runtime that the margin guard and the lag monitor share.
    consumer: Arc<StreamConsumer<Context>>,
    /// Sends dead letters and cut markers.
    producer: Renewing<FutureProducer>,
    config: KafkaConfig,
    revoked: Arc<Mutex<Vec<i32>>>,
    delivery_timeout: Duration,
    /// One warning per ERROR_LOG_INTERVAL while the broker keeps failing.
    errors: LogThrottle,
}

/// How often a consumer error that keeps coming back is logged.
const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(30);

/// A new member of the aggregators' group, not yet subscribed.
fn member(
    config: &KafkaConfig,
    revoked: &Arc<Mutex<Vec<i32>>>,
) -> Result<StreamConsumer<Context>, BusError> {
    let context = Context {
        topic: config.events_topic.clone(),
        revoked: revoked.clone(),
    };
    let heartbeat = HEARTBEAT_INTERVAL.min(Duration::from_millis(config.session_timeout_ms / 3));
    ClientConfig::new()
        .set("bootstrap.servers", brokers(config)?)
        .set("group.id", &config.consumer_group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", config.session_timeout_ms.to_string())
        .set(
            "max.poll.interval.ms",
            config.max_poll_interval_ms.to_string(),
        )
        // How soon a member hears that the group went on without it (liveness only: the
        // store refuses a block it writes late).
        .set("heartbeat.interval.ms", heartbeat.as_millis().to_string())
        .set(
            "reconnect.backoff.max.ms",
            RECONNECT_BACKOFF_MAX.as_millis().to_string(),
        )
        // A fetch the broker holds open waiting for data adds its whole wait to freshness
        // (tansu holds it the full time): keep it short; idle fetches are cheap.
        .set("fetch.wait.max.ms", "50")
        // Prefetch at most 32 MiB, half librdkafka's default: with the default 25,000 rows
        // per insert this holds the aggregator under 110 MiB at full speed (64 MiB and 50,000
        // rows: 160-180 MiB for the same rows/s; 16 MiB: half the rows/s). See BENCHMARKS.
        .set("queued.max.messages.kbytes", "32768")
        .create_with_context(context)
        .map_err(|source| BusError::retriable("create a consumer", source))
}

impl KafkaSource {
    /// Joins the consumer group and subscribes to the events topic.
    pub fn new(config: &KafkaConfig) -> Result<KafkaSource, BusError> {
        let revoked = Arc::new(Mutex::new(Vec::new()));
        let consumer = Arc::new(member(config, &revoked)?);
        let producer = Renewing::new(config, |config| {
            producer_config(config)?
                .create()
                .map_err(|source| BusError::retriable("create the aggregator's producer", source))
        })?;
        let source = KafkaSource {
            consumer,
            producer,
            config: config.clone(),
            revoked,
            delivery_timeout: Duration::from_millis(config.delivery_timeout_ms + 1000),
            errors: LogThrottle::new(ERROR_LOG_INTERVAL),
        };
        source.subscribe()?;
        Ok(source)
    }

    fn subscribe(&self) -> Result<(), BusError> {
        self.consumer
            .subscribe(&[&self.config.events_topic])
            .map_err(|source| BusError::retriable("subscribe", source))
    }

    fn take_revoked(&self) -> Vec<i32> {
        std::mem::take(&mut *self.revoked.lock().expect("revoked lock"))
    }

    /// Appends a cut marker to each of `partitions` with `producer`. Every marker is queued
    /// first, so that they travel together; then each is waited for.
    async fn append_cuts(
        &self,
        producer: &FutureProducer,
        partitions: &[i32],
    ) -> Result<(), BusError> {
        let mut deliveries = Vec::with_capacity(partitions.len());
        for &partition in partitions {
            let headers = OwnedHeaders::new().insert(Header {
                key: CUT_HEADER,
                value: Some("1"),
            });
            let record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&self.config.events_topic)
                .partition(partition)
                .headers(headers);
            let delivery = producer
                .send_result(record)
                .map_err(|(source, _)| BusError::retriable("append a cut marker", source))?;
            deliveries.push(delivery);
        }
        for delivery in deliveries {
            match tokio::time::timeout(self.delivery_timeout, delivery).await {
                Ok(Ok(Ok(_))) => {}
                Ok(Ok(Err((source, _)))) => {
                    return Err(BusError::retriable("append a cut marker", source))
                }
                Ok(Err(_)) => return Err(BusError::retriable("append a cut marker", "cancelled")),
                Err(_) => return Err(BusError::retriable("append a cut marker", "timed out")),
            }
        }
        Ok(())
    }
}

/// Reads a message as an event or a cut marker, or says why it is neither.
fn read(message: &rdkafka::message::BorrowedMessage<'_>) -> Content {
    let poison = |reason: String| {
        Content::Poison(Poison {
            reason,
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec),
        })
    };
    let cut = message
        .headers()
        .is_some_and(|headers| headers.iter().any(|h| h.key == CUT_HEADER));
    if cut && message.key().is_none() && message.payload().is_none() {
        return Content::Cut;
    }
    let Some(payload) = message.payload() else {
        return poison("the message has no payload".into());
    };
    match serde_json::from_slice::<BusEvent>(payload) {
        Ok(event) => Content::Event(event),
        Err(e) => poison(format!("the payload is not a rated event: {e}")),
    }
}

#[async_trait::async_trait]
impl EventSource for KafkaSource {
    fn topic(&self) -> &str {
        &self.config.events_topic
    }

    async fn end_offset(&self, partition: i32) -> Result<i64, BusError> {
        let (consumer, topic) = (self.consumer.clone(), self.config.events_topic.clone());
        let (_, high) = off_runtime(move || {
            consumer.fetch_watermarks(&topic, partition, Duration::from_secs(10))
        })
        .await?
        .map_err(|source| BusError::retriable("read the end offset of a partition", source))?;
        Ok(high)
    }

    async fn poll(
        &mut self,
        max: usize,
        idle: Duration,
        fill: Duration,
    ) -> Result<Polled, BusError> {
        let mut polled = Polled::default();
        let mut deadline = tokio::time::Instant::now() + idle;
        while polled.messages.len() < max {
            let message = match tokio::time::timeout_at(deadline, self.consumer.recv()).await {
                Err(_) => break,
                // Errors reach consumers as events: all brokers down during a restart, a
                // transport failure. librdkafka reconnects and resumes by itself, so they are
                // logged (at most once per ERROR_LOG_INTERVAL) and polling goes on; exiting
                // would stall partitions.
                Ok(Err(e)) => {
                    if let Some(held_back) = self.errors.due(chrono::Utc::now().timestamp_millis())
                    {
                        tracing::warn!(error = %e, brokers = self.config.brokers.as_deref().unwrap_or_default(),
                            similar_errors_since_last_line = held_back,
                            "kafka consumer error; still polling (check kafka.brokers and the broker)");
                    }
                    continue;
                }
                Ok(Ok(message)) => message,
            };
            if polled.messages.is_empty() {
                deadline = tokio::time::Instant::now() + fill;
            }
            polled.messages.push(BusMessage {
                position: BusPosition {
                    partition: message.partition(),
                    offset: message.offset(),
                },
                content: read(&message),
            });
        }
        // A rebalance during this poll took partitions away: their messages belong to the
        // new owner now, which starts from what the store holds.
        polled.revoked = self.take_revoked();
        if !polled.revoked.is_empty() {
            let revoked = &polled.revoked;
            polled
                .messages
                .retain(|m| !revoked.contains(&m.position.partition));
        }
        Ok(polled)
    }

    async fn dead_letter(&self, position: BusPosition, poison: &Poison) -> Result<(), BusError> {
        let partition = position.partition.to_string();
        let offset = position.offset.to_string();
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "mcp-meter-reason",
                value: Some(poison.reason.as_str()),
            })
            .insert(Header {
                key: "mcp-meter-source-topic",
                value: Some(self.config.events_topic.as_str()),
            })
            .insert(Header {
                key: "mcp-meter-source-partition",
                value: Some(partition.as_str()),
            })
            .insert(Header {
                key: "mcp-meter-source-offset",
                value: Some(offset.as_str()),
            });
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&self.config.dead_letter_topic).headers(headers);
        if let Some(key) = &poison.key {
            record = record.key(key.as_slice());
        }
        if let Some(payload) = &poison.payload {
            record = record.payload(payload.as_slice());
        }
        let producer = self.producer.current();
        let sent = producer
            .send(record, self.delivery_timeout)
            .await
            .map(|_| ())
            .map_err(|(source, _)| BusError::retriable("send to the dead-letter topic", source));
        self.producer.count(&producer, &sent);
        sent
    }

    async fn cut(&self, partitions: &[i32]) -> Result<(), BusError> {
        let producer = self.producer.current();
        let appended = self.append_cuts(&producer, partitions).await;
        self.producer.count(&producer, &appended);
        appended
    }

    async fn seek(&self, position: BusPosition) -> Result<(), BusError> {
        let (consumer, topic) = (self.consumer.clone(), self.config.events_topic.clone());
        off_runtime(move || {
            consumer.seek(
                &topic,
                position.partition,
                Offset::Offset(position.offset),
                Duration::from_secs(5),
            )
        })
        .await?
        .map_err(|source| BusError::retriable("seek", source))
    }

    fn commit(&self, next: &[BusPosition]) {
        let mut list = TopicPartitionList::new();
        for p in next {
            if let Err(e) = list.add_partition_offset(
                &self.config.events_topic,
                p.partition,
                Offset::Offset(p.offset),
            ) {
                tracing::warn!(error = %e, "offset commit skipped");
                return;
            }
        }
        if let Err(e) = self.consumer.commit(&list, CommitMode::Async) {
            tracing::warn!(error = %e, "offset commit failed (a hint only; nothing is lost)");
        }
    }

    fn assignment(&self) -> Vec<i32> {
        match self.consumer.assignment() {
            Ok(list) => list
                .elements_for_topic(&self.config.events_topic)
                .iter()
                .map(|e| e.partition())
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    async fn rejoin(&mut self) -> Result<Vec<i32>, BusError> {
        let held = self.assignment();
        // The old member leaves first (closing it sends LeaveGroup and waits for the broker),
        // so the group never counts both; the close blocks, so it runs off the runtime.
        let fresh = Arc::new(member(&self.config, &self.revoked)?);
        let old = std::mem::replace(&mut self.consumer, fresh);
        let _ = off_runtime(move || drop(old)).await;
        self.subscribe()?;
        // Whatever the closed member reported revoked is covered by `held`.
        let _ = self.take_revoked();
        Ok(held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeating_error_is_logged_once_per_interval_with_the_count_held_back() {
        let throttle = LogThrottle::new(Duration::from_secs(30));
        let start = 1_796_000_000_000;
        assert_eq!(throttle.due(start), Some(0), "the first line goes out");
        // A broker down for a minute, errors every half second: 120 errors.
        let admitted: Vec<(u64, u64)> = (1..120u64)
            .filter_map(|i| {
                let at = start + 500 * i as i64;
                throttle.due(at).map(|held| (i, held))
            })
            .collect();
        assert_eq!(
            admitted,
            vec![(60, 59)],
            "one more line at 30 s, saying 59 were held back"
        );
    }
}
