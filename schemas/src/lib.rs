//! The vocabulary of mcp-meter: wire and row types, validation, rating, config. No IO.
//!
//! Everything here is pure so that every process (embedded `serve`, `ingestor`, `aggregator`)
//! and every store reads and prices events the same way.
//!
//! - [`money`]: integer micro-USD, exact fractional rates, half-even rounding.
//! - [`event`]: the wire event (Aforo-compatible camelCase), its validation, the rated row.
//! - [`rating`]: versioned rate plans and the price and cost of an event.
//! - [`analytics`]: date ranges and the rows analytics answer with.
//! - [`billing`]: the billing export's period, lines, and their CSV and JSON spellings.
//! - [`config`]: the config tree and its validation.
//! - [`openapi`]: OpenAPI schemas of the bodies whose Rust types differ from the wire.
//! - [`guard`]: margin levels and thresholds, the guard's state, the guard check's decision.
//! - [`credits`]: prepaid grants, balances, and the authorize decision (charge before the tool
//!   runs).
//! - [`token`]: customer tokens (the portal's, and the payer a gateway names to the proxy).
//! - [`search`]: what the tests' seeded searches share (shrinking a failing sequence).

pub mod analytics;
pub mod billing;
pub mod config;
pub mod credits;
pub mod event;
pub mod guard;
pub mod money;
pub mod openapi;
pub mod rating;
pub mod search;
pub mod token;
