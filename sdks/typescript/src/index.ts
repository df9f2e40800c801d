// mcp-meter-sdk: meter an MCP server (the official TypeScript SDK) into mcp-meter.
//
// - wrapper.ts: `withMetering`, what a user calls.
// - queue.ts: batching, retries with the same keys, the bounded queue.
// - transport.ts: HTTP to mcp-meter (Node's fetch), Retry-After.

export { withMetering } from "./wrapper.js";
export type { MeteringOptions, MeteringHandle, ToolExtra, TokenCounts, PaymentTerms } from "./wrapper.js";
export type { QueueStats, UsageEvent } from "./queue.js";
