// A metered server in a process of its own, for exit.test.ts: one call over an in-memory
// connection, then the process ends as MCP_METER_EXIT_CHILD says. Does nothing without it
// (`node --test` runs every file under test/).
//
//   drain           nothing left to do: Node's event loop empties (beforeExit)
//   signal          a timer keeps it alive until a signal; no listener of the program's own
//   signal-handled  the program listens for SIGTERM itself and exits 7 after 300 ms
//   user-flush      as signal, with a flush of the user's own (20 s) under way
//   signal-exit     as signal, with a listener that acts as signal-exit's (v4) does: it runs its
//                   handlers and re-raises only when its kind are the only listeners left
//   two-copies      as signal, with a second copy of exit.js holding a hook of its own
//   hup-reload      the program handles SIGHUP (a reload), calls again, then closes and exits 0

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
  if (["signal", "user-flush", "signal-exit", "two-copies"].includes(scenario)) setInterval(() => {}, 1000);
  if (scenario === "user-flush") void meter.flush(20_000);
  if (scenario === "signal-exit") {
    // signal-exit 4.1's protocol: a count of its listeners on a shared emitter; each of them
    // acts only when the signal's listeners are that many.
    const emitter = ((globalThis as Record<symbol, { count: number }>)[Symbol.for("signal-exit emitter")] ??= { count: 0 });
    emitter.count += 1;
    const listener = () => {
      if (process.listeners("SIGTERM").length !== emitter.count) return;
      process.removeListener("SIGTERM", listener);
      emitter.count -= 1;
      process.stderr.write("SIGNAL-EXIT ran its handlers\n");
      process.kill(process.pid, "SIGTERM");
    };
    process.on("SIGTERM", listener);
  }
  if (scenario === "two-copies") {
    const other = (await import(new URL("../../src/exit.js?second-copy", import.meta.url).href)) as typeof import("../../src/exit.js");
    other.beforeProcessEnds(async () => void process.stderr.write("SECOND COPY's hook ran\n"));
  }
  if (scenario === "hup-reload") {
    process.on("SIGHUP", () => {
      setTimeout(async () => {
        await client.callTool({ name: "echo", arguments: {} });
        await meter.close(2000);
        process.exit(0);
      }, 300);
    });
    setInterval(() => {}, 1000);
  }
  if (scenario === "signal-handled") {
    setInterval(() => {}, 1000);
    process.on("SIGTERM", () => setTimeout(() => process.exit(7), 300));
  }
  process.stdout.write("CALLED\n");
}
