//! The store-writing side of mcp-meter: what turns published batches into stored rows.
//!
//! - [`group_commit`]: the embedded mode's bus. Ingest requests hand it batches; a single
//!   writer thread commits every batch waiting at that moment in one transaction and answers
//!   each request after its commit. Implements `backends::sink::EventSink`.
//!
//! This crate knows nothing of HTTP.

pub mod group_commit;
