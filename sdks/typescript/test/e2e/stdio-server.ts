// The metered server as a stdio child: what a desktop MCP client launches. It does nothing at
// its end but print its handler runs on stderr as the process exits: delivering what the meter
// holds when the client closes stdin is withMetering's own job.

import { StdioServerTransport } from "@modelcontextprotocol/sdk/server/stdio.js";
import { meteredServer, runs } from "./tools.js";

const { server, meter } = meteredServer();
process.on("exit", () => process.stderr.write(`RUNS ${JSON.stringify(runs)} STATS ${JSON.stringify(meter?.stats() ?? {})}\n`));
await server.connect(new StdioServerTransport());
