// An MCP server as lenient as JavaScript: it reads each message with JSON.parse, which takes
// what serde_json refuses (a lone surrogate "\ud800", 1e400 as Infinity), and runs every
// tools/call it reads, whatever its id or tool name. It answers each with the id as a
// JavaScript peer writes it back (JSON.stringify: 1.0 is 1, 9007199254740993 is
// 9007199254740992). Put behind `mcp-meter proxy`, it shows what the proxy let through.
//
//   node lenient_server.mjs http PORT     Streamable HTTP on 127.0.0.1:PORT/mcp (JSON answers)
//   node lenient_server.mjs stdio         one message (or batch) per line
//
// Each tool run appends the tool's name and a newline to the file PEER_RUNS.

import { appendFileSync } from "node:fs";
import { createServer } from "node:http";
import { createInterface } from "node:readline";

const runs = process.env.PEER_RUNS;

/** The answers to one body or line; `undefined` when it is not JSON JavaScript reads. */
function answer(text) {
  let request;
  try {
    request = JSON.parse(text);
  } catch {
    return undefined;
  }
  const answers = [];
  for (const message of Array.isArray(request) ? request : [request]) {
    if (message === null || typeof message !== "object") continue;
    let result;
    if (message.method === "initialize") {
      result = { protocolVersion: message.params?.protocolVersion ?? "2025-11-25", capabilities: { tools: {} }, serverInfo: { name: "lenient", version: "1" } };
    } else if (message.method === "tools/list") {
      result = { tools: [{ name: "premium", inputSchema: { type: "object" } }, { name: "free", inputSchema: { type: "object" } }] };
    } else if (message.method === "tools/call") {
      appendFileSync(runs, `${message.params?.name}\n`);
      result = { content: [{ type: "text", text: "ran" }] };
    } else {
      continue;
    }
    if ("id" in message) answers.push({ jsonrpc: "2.0", id: message.id, result });
  }
  return Array.isArray(request) ? answers : answers[0] ?? null;
}

const [mode, port] = process.argv.slice(2);
if (mode === "http") {
  createServer((req, res) => {
    let body = "";
    req.setEncoding("utf8");
    req.on("data", (chunk) => (body += chunk));
    req.on("end", () => {
      const answers = answer(body);
      if (answers === undefined) {
        res.writeHead(400, { "content-type": "application/json" });
        return void res.end(JSON.stringify({ jsonrpc: "2.0", id: null, error: { code: -32700, message: "Parse error" } }));
      }
      if (answers === null || (Array.isArray(answers) && answers.length === 0)) {
        res.writeHead(202);
        return void res.end();
      }
      res.writeHead(200, { "content-type": "application/json" });
      res.end(JSON.stringify(answers));
    });
  }).listen(Number(port), "127.0.0.1");
} else {
  createInterface({ input: process.stdin }).on("line", (line) => {
    const answers = answer(line);
    if (answers) process.stdout.write(`${JSON.stringify(answers)}\n`);
  });
}
