//! Kafka (rdkafka) adapters of the bus ports.
//!
//! - `producer.rs`: [`KafkaSink`], the ingestor's [`crate::sink::EventSink`]: an idempotent
//!   producer with `acks=all`; `publish` returns once every event's delivery report is in. A
//!   full local queue (`QueueFull`) answers [`crate::error::SinkError::Overloaded`], which the
//!   ingestor answers 429 with Retry-After; a broker that does not acknowledge in time answers
//!   `Unavailable` (503).
//! - `consumer.rs`: [`KafkaSource`], the aggregator's [`crate::source::EventSource`]: a consumer
//!   group member that commits only what it is told, plus the dead-letter producer.
//! - `probe.rs`: [`KafkaProbe`], the lag monitor's [`crate::source::TopicProbe`], outside the
//!   group.
//! - [`create_topics`]: what `mcp-meter migrate` does on the Kafka side.
//! - [`check_brokers`]: whether a broker answers at the configured address, said in words an
//!   operator can act on.

mod consumer;
mod probe;
mod producer;

pub use consumer::{KafkaSource, CUT_HEADER};
pub use probe::KafkaProbe;
pub use producer::KafkaSink;

use crate::source::BusError;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientConfig;
use schemas::config::KafkaConfig;
use std::time::Duration;

/// The brokers of a config that must have them.
fn brokers(config: &KafkaConfig) -> Result<&str, BusError> {
    config.brokers.as_deref().ok_or_else(|| {
        BusError::permanent(
            "config",
            "kafka.brokers is not set (MCP_METER_KAFKA_BROKERS)",
        )
    })
}

/// How long [`check_brokers`] waits for a broker.
pub const BROKER_CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// Asks the configured brokers for cluster metadata. A broker that is down, or an address
/// nothing listens on, fails within [`BROKER_CHECK_TIMEOUT`] with an error that names the address
/// and what to check (librdkafka itself only retries quietly).
pub async fn check_brokers(config: &KafkaConfig) -> Result<(), BusError> {
    let brokers = brokers(config)?.to_string();
    let client: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .map_err(|source| BusError::retriable("create a client to reach the brokers", source))?;
    off_runtime(move || client.fetch_metadata(None, BROKER_CHECK_TIMEOUT))
        .await?
        .map(|_| ())
        .map_err(|e| unreachable(&brokers, BROKER_CHECK_TIMEOUT, &e.to_string()))
}

/// Runs a call that blocks on the broker on the blocking pool.
pub(super) async fn off_runtime<T: Send + 'static>(
    call: impl FnOnce() -> T + Send + 'static,
) -> Result<T, BusError> {
    tokio::task::spawn_blocking(call)
        .await
        .map_err(|e| BusError::permanent("a blocking broker call", e))
}

/// The error for brokers that do not answer: the address, the setting, what to look at.
pub fn unreachable(brokers: &str, within: Duration, cause: &str) -> BusError {
    // Retriable: the broker may come back; the message says what to check meanwhile.
    BusError::retriable(
        "reach the brokers",
        format!(
            "no Kafka broker answered at {brokers} within {} s ({cause}). Check kafka.brokers \
(MCP_METER_KAFKA_BROKERS): that a broker runs there, listens on that host and port, and that \
this machine can reach it",
            within.as_secs()
        ),
    )
}

/// What became of one topic in [`create_topics`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicOutcome {
    Created,
    AlreadyExisted,
}

/// Creates the events and dead-letter topics, with the configured partitions and replication.
/// A topic that exists already is left as it is.
pub async fn create_topics(config: &KafkaConfig) -> Result<Vec<(String, TopicOutcome)>, BusError> {
    // Creating topics against a missing broker waits out the whole operation timeout, then
    // says only `OperationTimedOut`: ask first, briefly.
    check_brokers(config).await?;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers(config)?)
        .create()
        .map_err(|source| BusError::retriable("create an admin client", source))?;
    let replication = || TopicReplication::Fixed(config.replication_factor);
    let topics = [
        NewTopic::new(&config.events_topic, config.partitions, replication()),
        NewTopic::new(&config.dead_letter_topic, config.partitions, replication()),
    ];
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_topics(&topics, &options)
        .await
        .map_err(|source| BusError::retriable("create topics", source))?;
    results
        .into_iter()
        .map(|result| match result {
            Ok(topic) => Ok((topic, TopicOutcome::Created)),
            Err((topic, RDKafkaErrorCode::TopicAlreadyExists)) => {
                Ok((topic, TopicOutcome::AlreadyExisted))
            }
            Err((topic, code)) => Err(BusError::permanent(
                "create topics",
                format!("{topic}: {code}"),
            )),
        })
        .collect()
}
