// A short session over stdio: one call to a server this spawns, then the end such a session
// has. `stdin`: the client closes the server's stdin and waits for it to end by itself;
// `SIGTERM`: the server gets SIGTERM with its stdin still open. The client is the official
// MCP client on a transport of this file's own, so that it sees how the process ended (the
// SDK's StdioClientTransport sends SIGTERM itself 2 s after closing stdin). Prints one JSON
// line: the answer, the exit code or signal, how long the end took, the server's stderr.
//
//   node dist/test/e2e/once.js stdin|SIGTERM <tool> <arguments as JSON> <command> [args...]

import { spawn } from "node:child_process";
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { ReadBuffer, serializeMessage } from "@modelcontextprotocol/sdk/shared/stdio.js";
import type { Transport } from "@modelcontextprotocol/sdk/shared/transport.js";

const [end, tool, args, command, ...rest] = process.argv.slice(2);
const server = spawn(command, rest, { stdio: ["pipe", "pipe", "pipe"] });
let stderr = "";
server.stderr.on("data", (chunk) => (stderr += chunk));
const ended = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
  server.on("close", (code, signal) => resolve({ code, signal })),
);

const buffer = new ReadBuffer();
const transport: Transport = {
  async start() {
    server.stdout.on("data", (chunk: Buffer) => {
      buffer.append(chunk);
      for (let message = buffer.readMessage(); message; message = buffer.readMessage()) transport.onmessage?.(message);
    });
  },
  async send(message) {
    server.stdin.write(serializeMessage(message));
  },
  async close() {
    transport.onclose?.();
  },
};

const client = new Client({ name: "once-agent", version: "1.0.0" });
await client.connect(transport);
const answer = await client.callTool({ name: tool, arguments: JSON.parse(args) });
const endStarted = Date.now();
if (end === "stdin") server.stdin.end();
else server.kill("SIGTERM");
// A server that has not ended after 20 s is killed; the output says so by its signal.
const stuck = setTimeout(() => server.kill("SIGKILL"), 20_000);
const { code, signal } = await ended;
clearTimeout(stuck);
console.log(JSON.stringify({ answer, code, signal, endMs: Date.now() - endStarted, stderr }));
process.exit(0);
