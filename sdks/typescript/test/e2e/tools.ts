// The MCP server the end-to-end tests meter: three tools on the official SDK, metered with
// withMetering, counting how often each handler really ran.

import { McpServer } from "@modelcontextprotocol/sdk/server/mcp.js";
import { z } from "zod";
import { withMetering, MeteringHandle } from "../../src/index.js";

export const runs: Record<string, number> = { search: 0, flaky: 0, lookup: 0, premium: 0, slow: 0, progress: 0 };

/** Every call reports 10 input and 20 output tokens. */
export const TOKENS = { inputTokens: 10, outputTokens: 20 };

/** The server, metered by withMetering unless UNMETERED is set (behind `mcp-meter proxy`). */
export function meteredServer(): { server: McpServer; meter?: MeteringHandle } {
  const server = new McpServer({ name: "e2e-server", version: "1.0.0" });
  const meter = process.env.UNMETERED ? undefined : withMetering(server, {
    url: process.env.MCP_METER_URL!,
    apiKey: process.env.MCP_METER_KEY!,
    customerId: () => process.env.MCP_METER_CUSTOMER,
    tokens: () => TOKENS,
    paidTools: ["premium"],
    flushIntervalMs: 100,
    onError: (e) => process.stderr.write(`metering: ${e.message}\n`),
  });
  server.registerTool("search", { inputSchema: { q: z.string() } }, async ({ q }) => {
    runs.search += 1;
    return { content: [{ type: "text", text: `results for ${q}` }] };
  });
  server.registerTool("flaky", { inputSchema: { fail: z.boolean() } }, async ({ fail }) => {
    runs.flaky += 1;
    if (fail) throw new Error("flaky failed");
    return { content: [{ type: "text", text: "ok" }] };
  });
  server.registerTool("lookup", { inputSchema: { error: z.boolean() } }, async ({ error }) => {
    runs.lookup += 1;
    return { content: [{ type: "text", text: error ? "not found" : "found" }], isError: error };
  });
  server.registerTool("slow", {}, async () => {
    runs.slow += 1;
    await new Promise((r) => setTimeout(r, 40));
    return { content: [{ type: "text", text: "slow answer" }] };
  });
  // Streams progress over the answer's SSE stream before its result.
  server.registerTool("progress", {}, async (extra) => {
    runs.progress += 1;
    const token = extra._meta?.progressToken;
    for (let i = 1; i <= 3; i++) {
      if (token !== undefined) {
        await extra.sendNotification({ method: "notifications/progress", params: { progressToken: token, progress: i, total: 3 } });
      }
      await new Promise((r) => setTimeout(r, 5));
    }
    return { content: [{ type: "text", text: "done" }] };
  });
  server.registerTool("premium", {}, async () => {
    runs.premium += 1;
    return { content: [{ type: "text", text: "premium answer" }] };
  });
  return { server, meter };
}
