// The metered server as a stdio child: what a desktop MCP client launches. When its stdin ends
// it closes the meter (flushing every event) and prints its handler runs on stderr.

import { StdioServerTransport } from "@modelcontextprotocol/sdk/server/stdio.js";
import { meteredServer, runs } from "./tools.js";

const { server, meter } = meteredServer();
const transport = new StdioServerTransport();
let closing = false;
const close = async () => {
  if (closing) return;
  closing = true;
  await meter?.close(10_000);
  process.stderr.write(`RUNS ${JSON.stringify(runs)} STATS ${JSON.stringify(meter?.stats() ?? {})}\n`);
  process.exit(0);
};
transport.onclose = () => void close();
process.stdin.on("end", () => void close());
await server.connect(transport);
