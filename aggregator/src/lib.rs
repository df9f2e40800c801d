//! The store-writing side of mcp-meter: what turns published batches into stored rows.
//!
//! - [`consumer`]: the distributed mode's writer: the events topic into ClickHouse, exactly
//!   once, with the consistency contract spelled out step by step.
//! - [`group_commit`]: the embedded mode's bus. Ingest requests hand it batches; a single
//!   writer thread commits every batch waiting at that moment in one transaction and answers
//!   each request after its commit. Implements `backends::sink::EventSink`.
//! - [`lag`]: lag measured on a timer (end offsets against stored floors), the aggregator's
//!   health, and what to do when the group leaves partitions with unstored records unconsumed.
//! - [`margin_guard`]: every interval, each tenant's margin levels per agent and per tool,
//!   from the rollups into the guard state.
//! - [`metrics`]: this crate's metric families, rendered by the processes that run each part.
//! - [`retention`]: every interval, dedup keys and raw rows past their retention dropped.
//!
//! This crate knows nothing of HTTP.

pub mod consumer;
pub mod group_commit;
pub mod lag;
pub mod margin_guard;
pub mod metrics;
pub mod retention;
