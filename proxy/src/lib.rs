//! `mcp-meter proxy`: meters the `tools/call` traffic of an MCP server it stands in front of,
//! for servers whose code cannot change, in any language. It speaks MCP on both sides and
//! enforces before forwarding.
//!
//! - [`wire`]: what passes from a client: parsed, or refused with a JSON-RPC error, never
//!   forwarded unread; `tools/call` ids every peer matches.
//! - [`calls`]: the billing rule, pure: JSON-RPC messages to usage events (a call matched with
//!   its answer by id within one exchange).
//! - [`meter`]: delivery to mcp-meter (batches, retries with the same keys, a bounded queue that
//!   never drops the batch on the wire), the kill list, the guard check, authorizations and
//!   releases.
//! - [`enforce`]: the door: what a call must pass before it is forwarded, the refusal it gets
//!   instead, and what each end of a call does (report, release, wait for the next round).
//! - [`stdio`]: the stdio transport: a child server, relayed line by line.
//! - [`http`]: the Streamable HTTP transport: a reverse proxy, streaming answers as they come.
//! - [`sse`]: the messages of an answer read as it streams past.
//! - [`ops`]: the proxy's own `/healthz` and `/metrics`.

pub mod calls;
pub mod enforce;
pub mod http;
pub mod meter;
pub mod ops;
pub mod sse;
pub mod stdio;
pub mod wire;
