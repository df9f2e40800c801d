//! Kafka (rdkafka) adapters of the bus ports.
//!
//! - [`KafkaSink`]: the ingestor's [`crate::sink::EventSink`]: an idempotent producer with
//!   `acks=all`; `publish` returns once every event's delivery report is in.
//! - [`KafkaSource`]: the aggregator's [`crate::source::EventSource`]: a consumer group member
//!   that commits only what it is told, plus the dead-letter producer.
//! - [`KafkaProbe`]: the lag monitor's [`crate::source::TopicProbe`], outside the group.
//! - [`create_topics`]: what `mcp-meter migrate` does on the Kafka side.

mod consumer;
mod probe;
mod producer;

pub use consumer::KafkaSource;
pub use probe::KafkaProbe;
pub use producer::KafkaSink;

use crate::source::BusError;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientConfig;
use schemas::config::KafkaConfig;
use std::time::Duration;

/// The brokers of a config that must have them.
fn brokers(config: &KafkaConfig) -> Result<&str, BusError> {
    config.brokers.as_deref().ok_or(BusError::Failed {
        context: "config",
        detail: "kafka.brokers is not set (MCP_METER_KAFKA_BROKERS)".into(),
    })
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
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers(config)?)
        .create()
        .map_err(|source| BusError::Kafka {
            context: "create an admin client",
            source,
        })?;
    let replication = || TopicReplication::Fixed(config.replication_factor);
    let topics = [
        NewTopic::new(&config.events_topic, config.partitions, replication()),
        NewTopic::new(&config.dead_letter_topic, config.partitions, replication()),
    ];
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_topics(&topics, &options)
        .await
        .map_err(|source| BusError::Kafka {
            context: "create topics",
            source,
        })?;
    results
        .into_iter()
        .map(|result| match result {
            Ok(topic) => Ok((topic, TopicOutcome::Created)),
            Err((topic, RDKafkaErrorCode::TopicAlreadyExists)) => {
                Ok((topic, TopicOutcome::AlreadyExisted))
            }
            Err((topic, code)) => Err(BusError::Failed {
                context: "create topics",
                detail: format!("{topic}: {code}"),
            }),
        })
        .collect()
}
