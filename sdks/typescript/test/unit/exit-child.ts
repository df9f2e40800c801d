// A metered server in a process of its own, for exit.test.ts: one call over an in-memory
// connection, then the process ends as MCP_METER_EXIT_CHILD says. Does nothing without it
// (`node --test` runs every file under test/).
//
//   drain           nothing left to do: Node's event loop empties (beforeExit)
//   signal          a timer keeps it alive until a signal; no listener of the program's own
//   signal-handled  the program listens for SIGTERM itself and exits 7 after 300 ms

import { McpServer } from "@modelcontextprotocol/sdk/server/mcp.js";
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { InMemoryTransport } from "@modelcontextprotocol/sdk/inMemory.js";
import { withMetering } from "../../src/index.js";

const scenario = process.env.MCP_METER_EXIT_CHILD;
if (scenario) {
  const server = new McpServer({ name: "exit-child", version: "1.0.0" });
  const meter = withMetering(server, {
    url: process.env.MCP_METER_URL!,
    apiKey: "k",
    // Only an exit hook can deliver the call: the interval is far away.
    flushIntervalMs: 600_000,
    exitFlushMs: Number(process.env.EXIT_FLUSH_MS ?? 5000),
    onError: (e) => process.stderr.write(`metering: ${e.message}\n`),
  });
  server.registerTool("echo", {}, async () => ({ content: [{ type: "text", text: "hi" }] }));
  const client = new Client({ name: "exit-agent", version: "1.0.0" });
  const [a, b] = InMemoryTransport.createLinkedPair();
  await Promise.all([server.connect(a), client.connect(b)]);
  await client.callTool({ name: "echo", arguments: {} });
  process.on("exit", () => process.stderr.write(`STATS ${JSON.stringify(meter.stats())}\n`));
  if (scenario === "signal") setInterval(() => {}, 1000);
  if (scenario === "signal-handled") {
    setInterval(() => {}, 1000);
    process.on("SIGTERM", () => setTimeout(() => process.exit(7), 300));
  }
  process.stdout.write("CALLED\n");
}
