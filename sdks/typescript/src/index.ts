// mcp-meter-sdk: meter an MCP server (the official TypeScript SDK) into mcp-meter.
//
// - wrapper.ts: `withMetering`, what a user calls: admission, one event per call, the billing rule.
// - queue.ts: batching, retries with the same keys, the bounded queue.
// - transport.ts: HTTP to mcp-meter (Node's fetch), Retry-After.
// - kills.ts: the sessions mcp-meter said to stop, merged from each answer for its batch's sessions.
// - sessions.ts: the open sessions, ended by their connection, by idleness or by their number.
// - exit.ts: the meters' last delivery before the process ends (beforeExit, SIGINT/TERM/HUP).

export { withMetering } from "./wrapper.js";
export type { MeteringOptions, MeteringHandle, ToolExtra, TokenCounts, PaymentTerms } from "./wrapper.js";
export type { QueueStats, UsageEvent } from "./queue.js";
