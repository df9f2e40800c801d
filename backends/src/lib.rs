//! The ports mcp-meter's processes talk through, and the adapters behind them.
//!
//! A port is a small trait; an adapter implements it for one technology. Adapters never import
//! each other or the app crates, and only the binary picks which adapter a process uses.
//!
//! - [`sink`]: [`sink::EventSink`], where the ingestor hands rated batches and waits until they
//!   are durable (embedded: the group-commit writer; distributed: Kafka).
//! - [`source`]: [`source::EventSource`], where the aggregator consumes published batches.
//! - [`kafka`]: the Kafka adapters of both bus ports, and topic creation.
//! - [`store`]: [`store::StoreWriter`], one transaction over many batches, and
//!   [`store::AnalyticsStore`], the read side; adapters [`store::sqlite`], [`store::clickhouse`].
//! - [`state`]: [`state::LimitCounters`], [`state::MarginBoard`], [`state::RateLimiter`]: the
//!   shared state, one small port per thing held; adapters [`state::memory`] and
//!   [`state::redis`].
//! - [`metrics`]: counters, gauges, histograms in Prometheus text format, the Kafka adapters'
//!   families, and [`metrics::LogThrottle`] for errors that repeat.
//! - [`backlog`]: [`backlog::Backlog`], whether the store holds all the bus acknowledged (a
//!   ledger rebuild waits for it).
//! - [`error`]: [`error::ErrorKind`] and the errors of the sink and the store; every port error
//!   says its kind.

pub mod backlog;
pub mod error;
pub mod kafka;
pub mod metrics;
pub mod sink;
pub mod source;
pub mod state;
pub mod store;
