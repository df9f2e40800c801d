//! The aggregator's Kafka consumer: a group member that never commits on its own.

use super::brokers;
use super::off_runtime;
use super::producer::producer_config;
use crate::metrics::LogThrottle;
use crate::sink::BusPosition;
use crate::source::{BusError, BusMessage, EventSource, Poison, Polled};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, ClientContext, Message, Offset, TopicPartitionList};
use schemas::config::KafkaConfig;
use schemas::event::BusEvent;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Notes the partitions taken away in a rebalance, for the aggregator to forget, and the ones
/// taken over from another member, which are not written before their [`TAKEOVER_GRACE`].
struct Context {
    topic: String,
    revoked: Arc<Mutex<Vec<i32>>>,
    /// Per partition taken over: nothing of it is written before this instant.
    takeovers: Takeovers,
    /// What this member held until the last revoke (empty when its assignment was lost: the
    /// group went on without it, and another member may have held anything since).
    held: Mutex<Vec<i32>>,
}

type Takeovers = Arc<Mutex<HashMap<i32, Instant>>>;

/// How long a member waits, after it was given a partition it did not hold just before, until
/// it writes any of it. A rebalance moves a partition only once its holder gave it up between
/// two batches, except when the group goes on without a member: its session ran out while the
/// broker was away, and tansu hands every partition to whoever rejoins first while the others
/// still hold theirs, writing the batch in hand, until they notice (librdkafka's
/// assignment_lost, checked before every insert: `still_member`) or poll again (which revokes
/// them). The new holder waits for the former one to notice (a reconnection: at most
/// RECONNECT_BACKOFF_MAX with librdkafka's jitter; a heartbeat: HEARTBEAT_INTERVAL) or to end
/// its batch, with room to spare. A partition that comes back to the member that held it just
/// before (most rebalances) has no wait.
pub const TAKEOVER_GRACE: Duration = Duration::from_secs(5);
/// Longest pause between two reconnection tries to a broker (librdkafka's default is 10 s).
const RECONNECT_BACKOFF_MAX: Duration = Duration::from_millis(1000);
/// Longest time between two heartbeats (with sessions shorter than 3 s: a third of one).
const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(1000);

impl ClientContext for Context {}

impl ConsumerContext for Context {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(list) = rebalance {
            let partitions: Vec<i32> = list
                .elements_for_topic(&self.topic)
                .iter()
                .map(|e| e.partition())
                .collect();
            let lost = consumer.assignment_lost();
            if lost {
                tracing::warn!(?partitions,
                    "the group went on without this member (its session expired, or the broker restarted and forgot it): \
its partitions are lost, and nothing more of them is written");
            } else {
                tracing::info!(?partitions, "partitions revoked");
            }
            // A grace still running is kept: if the partition comes back to this member, its
            // former holder may still not have noticed.
            *self.held.lock().expect("held lock") =
                if lost { Vec::new() } else { partitions.clone() };
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
            let held = std::mem::take(&mut *self.held.lock().expect("held lock"));
            let taken: Vec<i32> = partitions
                .iter()
                .copied()
                .filter(|p| !held.contains(p))
                .collect();
            tracing::info!(?partitions, taken_over = ?taken, "partitions assigned");
            let until = Instant::now() + TAKEOVER_GRACE;
            let mut takeovers = self.takeovers.lock().expect("takeovers lock");
            for p in taken {
                takeovers.insert(p, until);
            }
        }
    }
}

pub struct KafkaSource {
    /// Shared with the blocking pool: `seek` and `end_offset` wait on the broker for seconds
    /// and must not hold the runtime that the margin guard and the lag monitor share.
    consumer: Arc<StreamConsumer<Context>>,
    dead_letters: FutureProducer,
    config: KafkaConfig,
    revoked: Arc<Mutex<Vec<i32>>>,
    takeovers: Takeovers,
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
    takeovers: &Takeovers,
) -> Result<StreamConsumer<Context>, BusError> {
    let context = Context {
        topic: config.events_topic.clone(),
        revoked: revoked.clone(),
        takeovers: takeovers.clone(),
        held: Mutex::new(Vec::new()),
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
        // Bounds on how soon a member hears that the group went on without it (TAKEOVER_GRACE).
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
        let takeovers = Takeovers::default();
        let consumer = Arc::new(member(config, &revoked, &takeovers)?);
        let dead_letters = producer_config(config)?
            .create()
            .map_err(|source| BusError::retriable("create the dead-letter producer", source))?;
        let source = KafkaSource {
            consumer,
            dead_letters,
            config: config.clone(),
            revoked,
            takeovers,
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
}

/// Reads a message as an event, or says why it cannot be one.
fn read(message: &rdkafka::message::BorrowedMessage<'_>) -> Result<BusEvent, Poison> {
    let poison = |reason: String| Poison {
        reason,
        key: message.key().map(<[u8]>::to_vec),
        payload: message.payload().map(<[u8]>::to_vec),
    };
    let payload = message
        .payload()
        .ok_or_else(|| poison("the message has no payload".into()))?;
    serde_json::from_slice::<BusEvent>(payload)
        .map_err(|e| poison(format!("the payload is not a rated event: {e}")))
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
        // Partitions taken over from another member: their first batch waits out the grace.
        let now = Instant::now();
        let until = {
            let mut takeovers = self.takeovers.lock().expect("takeovers lock");
            takeovers.retain(|_, until| *until > now);
            polled
                .messages
                .iter()
                .filter_map(|m| takeovers.get(&m.position.partition))
                .max()
                .copied()
        };
        if let Some(until) = until {
            let wait = until - now;
            tracing::info!(
                wait_ms = wait.as_millis() as u64,
                "partitions taken over: waiting before their first write, so that a member that \
has not yet noticed it lost them stops writing first"
            );
            tokio::time::sleep(wait).await;
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
        self.dead_letters
            .send(record, self.delivery_timeout)
            .await
            .map(|_| ())
            .map_err(|(source, _)| BusError::retriable("send to the dead-letter topic", source))
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

    fn still_member(&self) -> bool {
        !self.consumer.assignment_lost()
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
        let fresh = Arc::new(member(&self.config, &self.revoked, &self.takeovers)?);
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
