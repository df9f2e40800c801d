// The end-to-end driver: a real MCP client (the official SDK) calls a metered server over stdio
// or Streamable HTTP; mcp-meter is the real `serve` named by MCP_METER_URL. Prints one JSON line
// with what happened, which the Rust test compares with mcp-meter's analytics.
//
//   node dist/test/e2e/drive.js usage stdio|http    100 calls of 3 tools
//   node dist/test/e2e/drive.js kill http          calls until the session is refused
//   node dist/test/e2e/drive.js paid http          the paid tool 4 times
//
// Modes: `stdio` and `http` (the server metered by withMetering), `plain` and `plain-http`
// (unmetered, no proxy: the reference answers), `proxy` and `proxy-http` (unmetered, behind
// `mcp-meter proxy --stdio` or `--upstream`: the binary MCP_METER_BIN, with
// MCP_METER_PROXY_FLAGS added to its flags).

import { createServer } from "node:http";
import { spawn } from "node:child_process";
import { createInterface } from "node:readline";
import type { AddressInfo } from "node:net";
import { randomUUID } from "node:crypto";
import { fileURLToPath } from "node:url";
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StdioClientTransport } from "@modelcontextprotocol/sdk/client/stdio.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";
import { StreamableHTTPServerTransport } from "@modelcontextprotocol/sdk/server/streamableHttp.js";
import { meteredServer, runs } from "./tools.js";

const [scenario, mode] = process.argv.slice(2);

interface Harness {
  client: Client;
  /** Where the client connects (HTTP modes): more clients may connect there too. */
  url?: URL;
  /** What the proxy said on stderr (its lines only), in proxy mode. */
  proxyLog?: () => string[];
  /** Ends the server side: its meter flushed; answers its handler runs. */
  finish(): Promise<Record<string, number>>;
}

async function overStdio(how: "metered" | "plain" | "proxy"): Promise<Harness> {
  const server = [process.execPath, fileURLToPath(new URL("./stdio-server.js", import.meta.url))];
  const env: Record<string, string> = {
    ...(process.env as Record<string, string>),
    ...(how === "metered" ? {} : { UNMETERED: "1" }),
    // The proxy's key, from the environment as its --help asks (a flag shows in `ps`).
    MCP_METER_PROXY_API_KEY: process.env.MCP_METER_KEY ?? "",
  };
  const proxy = ["proxy", "--stdio", ...proxyFlags(env), "--", ...server];
  const transport = new StdioClientTransport({
    command: how === "proxy" ? env.MCP_METER_BIN : server[0],
    args: how === "proxy" ? proxy : server.slice(1),
    env,
    stderr: "pipe",
  });
  let stderr = "";
  transport.stderr?.on("data", (chunk) => (stderr += chunk));
  const client = new Client({ name: "e2e-agent", version: "1.0.0" });
  await client.connect(transport);
  return {
    client,
    proxyLog: () => proxyLines(stderr),
    finish: async () => {
      await client.close();
      const deadline = Date.now() + 15_000;
      while (!stderr.includes("RUNS ") && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
      const line = stderr.split("\n").find((l) => l.startsWith("RUNS "));
      if (!line) throw new Error(`the stdio server did not report its runs: ${stderr}`);
      return JSON.parse(line.slice(5, line.indexOf(" STATS ")));
    },
  };
}

/**
 * The proxy's own lines in what its stderr carried (over stdio the server's stderr passes through
 * it too): its `tracing` lines (`2026-12-07T13:01:37.229261Z  WARN batch{events=1}: proxy::meter:
 * mcp-meter unreachable; ...`, or `mcp_meter:` for the binary's own; no colour codes, since
 * stderr is a pipe), and any line in the form of its banner (`mcp-meter proxy: ...`).
 */
function proxyLines(text: string): string[] {
  const tracing = /^\d{4}-\d{2}-\d{2}T[\d:.]+Z +(TRACE|DEBUG|INFO|WARN|ERROR) /;
  return text.split("\n").filter((l) => tracing.test(l) || l.startsWith("mcp-meter proxy:"));
}

/** The flags every proxy gets: where mcp-meter is, the customer, the test's own. */
function proxyFlags(env: Record<string, string>): string[] {
  return [
    "--meter-url", env.MCP_METER_URL,
    ...(env.MCP_METER_CUSTOMER ? ["--customer", env.MCP_METER_CUSTOMER] : []),
    ...(env.MCP_METER_PROXY_FLAGS ? env.MCP_METER_PROXY_FLAGS.split(" ") : []),
  ];
}

async function overHttp(how: "metered" | "plain" | "proxy"): Promise<Harness> {
  if (how !== "metered") process.env.UNMETERED = "1";
  // A server and a transport per MCP session, as the SDK's Streamable HTTP servers do.
  const sessions = new Map<string, StreamableHTTPServerTransport>();
  const meters: { close(waitMs?: number): Promise<void> }[] = [];
  const http = createServer((req, res) => {
    const id = req.headers["mcp-session-id"];
    const known = typeof id === "string" ? sessions.get(id) : undefined;
    if (known) return void known.handleRequest(req, res);
    const { server, meter } = meteredServer();
    if (meter) meters.push(meter);
    const transport: StreamableHTTPServerTransport = new StreamableHTTPServerTransport({
      sessionIdGenerator: () => randomUUID(),
      onsessioninitialized: (sid) => void sessions.set(sid, transport),
    });
    void server.connect(transport).then(() => transport.handleRequest(req, res));
  });
  const meter = { close: async (waitMs?: number) => void (await Promise.all(meters.map((m) => m.close(waitMs)))) };
  await new Promise<void>((resolve) => http.listen(0, "127.0.0.1", resolve));
  let url = new URL(`http://127.0.0.1:${(http.address() as AddressInfo).port}/mcp`);
  let stop = async () => {};
  let log = "";
  if (how === "proxy") {
    const env = process.env as Record<string, string>;
    const proxy = spawn(env.MCP_METER_BIN, ["proxy", "--upstream", url.href, "--listen", "127.0.0.1:0", ...proxyFlags(env)], {
      stdio: ["ignore", "pipe", "pipe"],
      env: { ...env, MCP_METER_PROXY_API_KEY: env.MCP_METER_KEY },
    });
    proxy.stderr.on("data", (chunk) => (log += chunk));
    const banner = await new Promise<string>((resolve, reject) => {
      createInterface({ input: proxy.stdout }).once("line", resolve);
      proxy.once("exit", (code) => reject(new Error(`the proxy exited (${code}): ${log}`)));
    });
    url = new URL(banner.split(" ")[4]);
    const exited = new Promise((resolve) => proxy.once("exit", resolve));
    stop = async () => {
      proxy.kill("SIGTERM");
      await exited;
    };
  }
  const client = new Client({ name: "e2e-agent", version: "1.0.0" });
  await client.connect(new StreamableHTTPClientTransport(url));
  return {
    client,
    url,
    proxyLog: how === "proxy" ? () => proxyLines(log) : undefined,
    finish: async () => {
      await client.close();
      await stop();
      await meter.close(10_000);
      http.closeAllConnections();
      http.close();
      return { ...runs };
    },
  };
}

if (scenario === "overhead") {
  // The proxy's added latency per call: the same fast tool through two equal servers, one
  // direct and one behind `mcp-meter proxy --upstream`, calls alternating so both see the same
  // noise. No enforcement: what metering alone costs.
  const n = Number(process.env.OVERHEAD_CALLS ?? 3000);
  const direct = await overHttp("plain");
  const proxied = await overHttp("proxy");
  const time = async (h: Harness) => {
    const started = performance.now();
    await h.client.callTool({ name: "search", arguments: { q: "x" } });
    return performance.now() - started;
  };
  for (let i = 0; i < 300; i++) {
    await time(direct);
    await time(proxied);
  }
  const d: number[] = [];
  const p: number[] = [];
  for (let i = 0; i < n; i++) {
    d.push(await time(direct));
    p.push(await time(proxied));
  }
  const pct = (xs: number[], q: number) => [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.ceil(q * xs.length) - 1)];
  const ms = (x: number) => Math.round(x * 1000) / 1000;
  await direct.finish();
  await proxied.finish();
  console.log(JSON.stringify({
    scenario, calls: n,
    directMs: { p50: ms(pct(d, 0.5)), p99: ms(pct(d, 0.99)) },
    proxiedMs: { p50: ms(pct(p, 0.5)), p99: ms(pct(p, 0.99)) },
    addedMs: { p50: ms(pct(p, 0.5) - pct(d, 0.5)), p99: ms(pct(p, 0.99) - pct(d, 0.99)) },
  }));
  process.exit(0);
}

const harness =
  mode === "http"
    ? await overHttp("metered")
    : mode === "plain-http"
      ? await overHttp("plain")
      : mode === "proxy-http"
        ? await overHttp("proxy")
        : await overStdio(mode === "plain" ? "plain" : mode === "proxy" ? "proxy" : "metered");
const { client } = harness;
const errorText = (r: unknown) => JSON.stringify((r as { content?: unknown }).content ?? "");
const out: Record<string, unknown> = { scenario, mode };

if (scenario === "usage") {
  // search succeeds; flaky throws on every other call; lookup answers isError on every fifth.
  const expected: Record<string, { calls: number; errors: number }> = {
    search: { calls: 0, errors: 0 },
    flaky: { calls: 0, errors: 0 },
    lookup: { calls: 0, errors: 0 },
  };
  const answers: string[] = [];
  for (let i = 0; i < 100; i++) {
    const tool = ["search", "flaky", "lookup"][i % 3];
    const fail = tool === "flaky" ? i % 2 === 0 : tool === "lookup" ? i % 5 === 0 : false;
    const args = tool === "search" ? { q: `q${i}` } : tool === "flaky" ? { fail } : { error: fail };
    const result = await client.callTool({ name: tool, arguments: args });
    answers.push(JSON.stringify(result));
    if (Boolean(result.isError) !== fail) throw new Error(`${tool} #${i}: isError ${result.isError}`);
    expected[tool].calls += 1;
    if (fail) expected[tool].errors += 1;
  }
  out.expected = expected;
  out.answers = answers;
} else if (scenario === "kill") {
  // The session limit lets some calls through; the first refusal must not reach the handler.
  let answered = 0;
  let refusedAt = -1;
  for (let i = 0; i < 50 && refusedAt < 0; i++) {
    const result = await client.callTool({ name: "search", arguments: { q: `k${i}` } });
    if (result.isError) {
      if (!/stopped session/.test(errorText(result))) throw new Error(errorText(result));
      refusedAt = i;
    } else answered += 1;
    // Let the batch go out so that its answer (and the kill) comes back before the next call.
    await new Promise((r) => setTimeout(r, 250));
  }
  out.answered = answered;
  out.refusedAt = refusedAt;
} else if (scenario === "concurrent") {
  // 4 clients at once (the first is the harness's), 50 calls each over 4 tools, one slow and
  // one streaming progress; each call's time as the client measured it.
  const clients = [client];
  for (let i = 1; i < 4; i++) {
    const c = new Client({ name: `e2e-agent-${i}`, version: "1.0.0" });
    await c.connect(new StreamableHTTPClientTransport(harness.url!));
    clients.push(c);
  }
  const tools = ["search", "flaky", "slow", "progress"];
  const expected: Record<string, { calls: number; errors: number; maxMs: number }> = {};
  for (const t of tools) expected[t] = { calls: 0, errors: 0, maxMs: 0 };
  let progressSeen = 0;
  await Promise.all(clients.map(async (c, ci) => {
    for (let i = 0; i < 50; i++) {
      const tool = tools[(i + ci) % 4];
      const fail = tool === "flaky" && i % 2 === 0;
      const args = tool === "search" ? { q: `c${ci}-${i}` } : tool === "flaky" ? { fail } : {};
      const started = performance.now();
      const result = await c.callTool({ name: tool, arguments: args }, undefined,
        tool === "progress" ? { onprogress: () => void (progressSeen += 1) } : undefined);
      const took = performance.now() - started;
      if (Boolean(result.isError) !== fail) throw new Error(`${tool}: isError ${result.isError}`);
      expected[tool].calls += 1;
      if (fail) expected[tool].errors += 1;
      expected[tool].maxMs = Math.max(expected[tool].maxMs, took);
    }
  }));
  for (const c of clients.slice(1)) await c.close();
  out.expected = expected;
  out.progressSeen = progressSeen;
} else if (scenario === "blocked") {
  const result = await client.callTool({ name: "search", arguments: { q: "b" } });
  out.refused = Boolean(result.isError);
  out.text = errorText(result);
} else if (scenario === "paid") {
  const results = [];
  for (let i = 0; i < 4; i++) {
    const result = await client.callTool({ name: "premium", arguments: {} });
    results.push({ isError: Boolean(result.isError), terms: result._meta?.["mcp-meter/payment"] ?? null });
  }
  out.results = results;
}
out.runs = await harness.finish();
if (harness.proxyLog) out.proxyLog = harness.proxyLog();
console.log(JSON.stringify(out));
