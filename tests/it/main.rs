//! The integration tests: one crate, one link step, a module per subject. They talk to the
//! services `scripts/test` starts (addresses from `MCP_METER_TEST_*`), each in a database,
//! topic or key prefix of its own, and fail under `CI=true` when a service is missing.

mod common;

mod aforo_sdk;
mod bad_input;
mod cli;
mod clickhouse;
mod credits;
mod customers;
mod dashboard;
mod deploy;
mod distributed;
mod docs;
mod exports;
mod hardening;
mod http;
mod isolation;
mod ledger_model;
mod limits;
mod loadgen;
mod margin_guard;
mod openapi;
mod ops;
mod overload;
mod proxy;
mod proxy_delivery;
mod proxy_peers;
mod proxy_security;
mod rate_limits;
mod schemathesis;
mod shutdown;
mod tidy;
mod typescript_sdk;
