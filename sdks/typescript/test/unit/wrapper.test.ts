// withMetering on a real McpServer driven by a real MCP client (in memory), against a fake
// mcp-meter: events per call and the billing rule (what is reported, with which status, what
// is not), kills merged from each answer for the sessions its batch named, the guard failing open, paid tools refused, settled or released,
// sessions ended by their connection or by idleness, the agent from _meta or initialize.

import { test } from "node:test";
import assert from "node:assert/strict";
import { McpServer } from "@modelcontextprotocol/sdk/server/mcp.js";
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { InMemoryTransport } from "@modelcontextprotocol/sdk/inMemory.js";
import { z } from "zod";
import { withMetering, MeteringOptions } from "../../src/index.js";
import { exitHooks } from "../../src/exit.js";
import { FakeMeter, Script, accepted, named } from "./fake.js";

async function setup(script: Script, options: Partial<MeteringOptions> = {}) {
  const fake = await FakeMeter.start(script);
  const server = new McpServer({ name: "test-server", version: "1.0.0" });
  let runs = 0;
  server.registerTool("echo", { inputSchema: { text: z.string() } }, async ({ text }) => {
    runs += 1;
    return { content: [{ type: "text", text }] };
  });
  const errors: Error[] = [];
  const meter = withMetering(server, { url: fake.url, apiKey: "k", onError: (e) => errors.push(e), ...options });
  // Registered after withMetering: metered too.
  server.registerTool("slow", {}, async () => {
    runs += 1;
    await new Promise((r) => setTimeout(r, 200));
    return { content: [{ type: "text", text: "late" }] };
  });
  server.tool("boom", async () => {
    runs += 1;
    throw new Error("boom");
  });
  const client = new Client({ name: "test-agent", version: "1.0.0" });
  const [a, b] = InMemoryTransport.createLinkedPair();
  await Promise.all([server.connect(a), client.connect(b)]);
  const call = (name: string, args: Record<string, unknown> = {}) => client.callTool({ name, arguments: args });
  // The server's end of the connection: its session id is read at each request, so a test may
  // change it to call in another session of the same meter.
  return { fake, server, client, meter, errors, call, runs: () => runs, transport: a };
}

async function waitFor(what: () => boolean, why = "") {
  const deadline = Date.now() + 3000;
  while (!what() && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
  assert.ok(what(), why);
}

test("one event per call, before and after withMetering, with status, duration and agent", async () => {
  const t = await setup((req) => accepted(req));
  const ok = await t.call("echo", { text: "hi" });
  assert.equal(ok.isError, undefined);
  const failed = await t.call("boom");
  assert.equal(failed.isError, true);
  await t.meter.flush();
  const events = t.fake.events();
  assert.deepEqual(events.map((e) => [e.toolName, e.executionStatus, e.agentId]), [
    ["echo", "SUCCESS", "test-agent"],
    ["boom", "ERROR", "test-agent"],
  ]);
  assert.equal(new Set(events.map((e) => e.idempotencyKey)).size, 2);
  assert.equal(events[0].sessionId, events[1].sessionId, "one session per server instance");
  assert.ok(events.every((e) => e.executionDurationMs >= 0));
  await t.meter.close(1000);
  assert.deepEqual(t.fake.events().slice(2).map((e) => e.sessionBoundary), ["SESSION_END"]);
  await t.client.close();
  await t.fake.stop();
});

test("a session in killedSessionIds is refused without running the handler", async () => {
  let killed: string[] = [];
  const t = await setup((req) => {
    const sessions = req.body?.events?.map((e: { sessionId: string }) => e.sessionId) ?? [];
    killed = [...new Set([...killed, ...sessions])];
    return accepted(req, killed);
  });
  await t.call("echo", { text: "first" });
  await t.meter.flush();
  const refused = await t.call("echo", { text: "second" });
  assert.equal(refused.isError, true);
  assert.match(JSON.stringify(refused.content), /stopped session/);
  assert.equal(t.runs(), 1, "the handler ran once");
  assert.equal(t.meter.killedSessions().length, 1);
  await t.meter.close(1000);
  await t.client.close();
  await t.fake.stop();
});

test("a kill learned from one answer outlives the answers to batches of other sessions", async () => {
  const killed = new Set<string>();
  const t = await setup((req) => accepted(req, killed), { heartbeatIntervalMs: 60_000 });
  t.transport.sessionId = "s1";
  await t.call("echo", { text: "s1 reaches a hard limit" });
  killed.add("s1");
  await t.meter.flush();
  assert.deepEqual(t.meter.killedSessions(), ["s1"]);
  t.transport.sessionId = "s2";
  assert.equal((await t.call("echo", { text: "s2 runs" })).isError, undefined);
  await t.meter.flush();
  assert.deepEqual([...named(t.fake.received.at(-1)!)], ["s2"], "the last batch named s2 alone");
  assert.deepEqual(t.meter.killedSessions(), ["s1"], "an answer for s2's batch says nothing of s1");
  t.transport.sessionId = "s1";
  const refused = await t.call("echo", { text: "s1 again" });
  assert.match(JSON.stringify(refused.content), /stopped session s1/);
  assert.equal(t.runs(), 2);
  await t.meter.close(1000);
  await t.client.close();
  await t.fake.stop();
});

test("a session its batch names and its answer leaves out is killed no more: a heartbeat's answer ends the kill", async () => {
  const killed = new Set(["s1"]);
  const t = await setup((req) => accepted(req, killed), { heartbeatIntervalMs: 50, flushIntervalMs: 20 });
  t.transport.sessionId = "s1";
  assert.equal((await t.call("echo", { text: "runs: no answer has listed s1 yet" })).isError, undefined);
  await waitFor(() => t.meter.killedSessions().length === 1);
  assert.equal((await t.call("echo", { text: "refused" })).isError, true);
  // The limit's window ends. A refused call reports nothing, so only the session's heartbeats
  // name it from now on.
  const before = t.fake.events().length;
  killed.delete("s1");
  await waitFor(() => t.meter.killedSessions().length === 0, "a heartbeat's answer left s1 out");
  assert.deepEqual([...new Set(t.fake.events().slice(before).map((e) => e.sessionBoundary))], ["HEARTBEAT"]);
  assert.equal((await t.call("echo", { text: "runs again" })).isError, undefined);
  assert.equal(t.runs(), 2);
  await t.meter.close(1000);
  await t.client.close();
  await t.fake.stop();
});

test("a 202 whose body has no kill list to read changes no kill, and says so", async () => {
  const killed = new Set(["s1"]);
  let readable = true;
  let garbled = 0;
  const t = await setup(
    (req) => {
      if (!req.path.startsWith("/v1/ingest") || readable) return accepted(req, killed);
      const n = req.body.events.length;
      const bodies = [
        undefined, // an empty body: not JSON
        { accepted: n, duplicates: 0, failed: 0, errors: [] },
        { accepted: n, duplicates: 0, failed: 0, errors: [], killedSessionIds: "none" },
      ];
      return { status: 202, body: bodies[garbled++ % bodies.length] };
    },
    { heartbeatIntervalMs: 50, flushIntervalMs: 20 },
  );
  t.transport.sessionId = "s1";
  await t.call("echo", { text: "hi" });
  await t.meter.flush();
  assert.deepEqual(t.meter.killedSessions(), ["s1"]);
  // Were these answers readable, the next one, for s1's heartbeat, would end the kill.
  killed.delete("s1");
  readable = false;
  // One batch at a time: when the fourth arrives, the answers to the three before it were read.
  const at = t.fake.received.length;
  await waitFor(() => t.fake.received.slice(at).filter((r) => r.path === "/v1/ingest/batch").length >= 4);
  assert.deepEqual(t.meter.killedSessions(), ["s1"]);
  assert.ok(t.errors.filter((e) => /no killedSessionIds/.test(e.message)).length >= 3);
  assert.equal((await t.call("echo", { text: "still refused" })).isError, true);
  assert.equal(t.runs(), 1);
  readable = true;
  await t.meter.close(1000);
  await t.client.close();
  await t.fake.stop();
});

test("a guard check that times out lets the call run and says so", async () => {
  const t = await setup(
    (req) => (req.path.startsWith("/v1/guard/check") ? { status: 200, body: { action: "block" }, delayMs: 300 } : accepted(req)),
    { guard: true, guardTimeoutMs: 50 },
  );
  const answer = await t.call("echo", { text: "hi" });
  assert.equal(answer.isError, undefined);
  assert.equal(t.runs(), 1);
  assert.match(t.errors.map((e) => e.message).join("\n"), /failed open/);
  await t.meter.close(1000);
  await t.client.close();
  await t.fake.stop();
});

test("a guard block refuses and a throttle waits, then runs", async () => {
  let action = "block";
  const t = await setup(
    (req) =>
      req.path.startsWith("/v1/guard/check")
        ? { status: 200, body: { action, retryAfterSeconds: 0.2, reason: "L3_BLOCK: tool `echo`: margin -1199904.00% (revenue 5000 µUSD, COGS 60000200 µUSD)" } }
        : accepted(req),
    { guard: true, guardTimeoutMs: 1000 },
  );
  const blocked = await t.call("echo", { text: "hi" });
  assert.equal(blocked.isError, true);
  // The operator's costs never reach the client.
  const said = JSON.stringify(blocked.content);
  assert.match(said, /blocked echo/);
  assert.doesNotMatch(said, /COGS|margin|µUSD|60000200/);
  assert.equal(t.runs(), 0);
  action = "throttle";
  const started = Date.now();
  const throttled = await t.call("echo", { text: "hi" });
  assert.equal(throttled.isError, undefined);
  assert.ok(Date.now() - started >= 190, "waited retryAfterSeconds");
  assert.equal(t.runs(), 1);
  await t.meter.close(1000);
  await t.client.close();
  await t.fake.stop();
});

test("a paid tool refused with 402 does not run and answers the terms", async () => {
  const terms = { authorized: false, nonce: "n", quoteMicros: 5000, reason: "insufficient_balance", availableMicros: 10, message: "top up" };
  const t = await setup(
    (req) => (req.path === "/v1/authorize" ? { status: 402, body: { ...terms, nonce: req.body.nonce } } : accepted(req)),
    { paidTools: ["echo"], customerId: () => "cust-1" },
  );
  const refused = await t.call("echo", { text: "hi" });
  assert.equal(refused.isError, true);
  assert.equal((refused._meta?.["mcp-meter/payment"] as { reason: string }).reason, "insufficient_balance");
  assert.equal(t.runs(), 0);
  const ask = t.fake.received.find((r) => r.path === "/v1/authorize")!;
  assert.equal(ask.body.customerId, "cust-1");
  await t.meter.close(1000);
  assert.equal(t.fake.events().filter((e) => e.toolName).length, 0, "nothing ran, nothing is reported");
  await t.client.close();
  await t.fake.stop();
});

test("a call the client cancels is reported CANCELLED", async () => {
  const t = await setup((req) => accepted(req));
  const cancel = new AbortController();
  const call = t.client.callTool({ name: "slow", arguments: {} }, undefined, { signal: cancel.signal });
  setTimeout(() => cancel.abort("the user gave up"), 50);
  await assert.rejects(call);
  await new Promise((r) => setTimeout(r, 300));
  await t.meter.flush();
  assert.deepEqual(t.fake.events().filter((e) => e.toolName).map((e) => [e.toolName, e.executionStatus]), [["slow", "CANCELLED"]]);
  await t.meter.close(1000);
  await t.client.close();
  await t.fake.stop();
});

test("open sessions send heartbeats, whose answers carry kills too", async () => {
  let killAll = false;
  const t = await setup(
    (req) => {
      const sessions = req.body?.events?.map((e: { sessionId: string }) => e.sessionId) ?? [];
      return accepted(req, killAll ? sessions : []);
    },
    { heartbeatIntervalMs: 50, flushIntervalMs: 20 },
  );
  await t.call("echo", { text: "hi" });
  const beats = () => t.fake.events().filter((e) => e.metricName === "system.session.heartbeat");
  const waitFor = async (what: () => boolean) => {
    const deadline = Date.now() + 3000;
    while (!what() && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    assert.ok(what());
  };
  await waitFor(() => beats().length >= 1);
  assert.deepEqual(t.meter.killedSessions(), []);
  // From now on only heartbeats go out: the kill can only come in a heartbeat's answer.
  killAll = true;
  await waitFor(() => t.meter.killedSessions().length === 1);
  assert.equal(beats()[0].sessionBoundary, "HEARTBEAT");
  assert.equal(beats()[0].agentId, "test-agent");
  const refused = await t.call("echo", { text: "again" });
  assert.equal(refused.isError, true);
  await t.meter.close(1000);
  await t.client.close();
  await t.fake.stop();
});

test("the agent is the request's _meta clientInfo name (MCP 2026-07-28) before initialize's", async () => {
  const t = await setup((req) => accepted(req));
  await t.client.callTool({ name: "echo", arguments: { text: "a" }, _meta: { "io.modelcontextprotocol/clientInfo": { name: "meta-agent", version: "2" } } });
  await t.call("echo", { text: "b" });
  await t.meter.flush();
  assert.deepEqual(t.fake.events().filter((e) => e.toolName).map((e) => e.agentId), ["meta-agent", "test-agent"]);
  await t.meter.close(1000);
  await t.client.close();
  await t.fake.stop();
});

test("a handler given through a tool's update is metered, under the tool's new name", async () => {
  const t = await setup((req) => accepted(req));
  const late = t.server.registerTool("late", {}, async () => ({ content: [{ type: "text", text: "v1" }] }));
  late.update({ name: "renamed", callback: async () => ({ content: [{ type: "text", text: "v2" }] }) });
  const answer = await t.call("renamed");
  assert.equal((answer.content as { text: string }[])[0].text, "v2");
  await t.meter.flush();
  assert.deepEqual(t.fake.events().filter((e) => e.toolName).map((e) => [e.toolName, e.executionStatus]), [["renamed", "SUCCESS"]]);
  await t.meter.close(1000);
  await t.client.close();
  await t.fake.stop();
});

test("when the connection closes, a call under way is reported CANCELLED and the session ends, without flush or close", async () => {
  const t = await setup((req) => accepted(req), { flushIntervalMs: 60_000, heartbeatIntervalMs: 30 });
  const slow = t.client.callTool({ name: "slow", arguments: {} }).catch(() => "closed");
  await new Promise((r) => setTimeout(r, 50));
  await t.client.close();
  assert.equal(await slow, "closed");
  const waitFor = async (what: () => boolean) => {
    const deadline = Date.now() + 3000;
    while (!what() && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    assert.ok(what(), JSON.stringify(t.fake.events()));
  };
  await waitFor(() => t.fake.events().some((e) => e.sessionBoundary === "SESSION_END"));
  const events = t.fake.events();
  assert.deepEqual(events.filter((e) => e.toolName).map((e) => [e.toolName, e.executionStatus]), [["slow", "CANCELLED"]]);
  assert.equal(events.filter((e) => e.sessionBoundary === "SESSION_END").length, 1);
  // The session is over: no heartbeat follows.
  const count = t.fake.events().length;
  await new Promise((r) => setTimeout(r, 150));
  assert.equal(t.fake.events().length, count);
  assert.deepEqual(t.meter.stats(), { sent: events.length, failed: 0, dropped: 0, queued: 0 });
  await t.meter.close(1000);
  await t.fake.stop();
});

test("a session without a call for sessionIdleMs ends and its heartbeats stop", async () => {
  const t = await setup((req) => accepted(req), { sessionIdleMs: 100, heartbeatIntervalMs: 30, flushIntervalMs: 20 });
  await t.call("echo", { text: "hi" });
  await new Promise((r) => setTimeout(r, 400));
  const boundaries = t.fake.events().filter((e) => e.sessionBoundary).map((e) => e.sessionBoundary);
  assert.ok(boundaries.length >= 2, JSON.stringify(boundaries));
  assert.deepEqual(boundaries.slice(-1), ["SESSION_END"]);
  assert.deepEqual(boundaries.slice(0, -1).filter((b) => b !== "HEARTBEAT"), []);
  await t.meter.close(1000);
  assert.equal(t.fake.events().filter((e) => e.sessionBoundary === "SESSION_END").length, 1, "close has no session left to end");
  await t.client.close();
  await t.fake.stop();
});

test("an authorized call the client cancels before it runs does not run, reports nothing, and releases its reservation", async () => {
  const t = await setup(
    (req) =>
      req.path === "/v1/authorize"
        ? { status: 200, body: { authorized: true, nonce: req.body.nonce }, delayMs: 200 }
        : req.path.endsWith("/release")
          ? { status: 200, body: { released: true } }
          : accepted(req),
    { paidTools: ["echo"], customerId: () => "cust-1" },
  );
  const cancel = new AbortController();
  const call = t.client.callTool({ name: "echo", arguments: { text: "hi" } }, undefined, { signal: cancel.signal });
  setTimeout(() => cancel.abort("the user gave up"), 50);
  await assert.rejects(call);
  await new Promise((r) => setTimeout(r, 400));
  await t.meter.flush();
  assert.equal(t.runs(), 0);
  const nonce = t.fake.received.find((r) => r.path === "/v1/authorize")!.body.nonce;
  assert.deepEqual(t.fake.received.filter((r) => r.path.endsWith("/release")).map((r) => r.path), [`/v1/authorize/${nonce}/release`]);
  assert.equal(t.fake.events().filter((e) => e.toolName).length, 0);
  await t.meter.close(1000);
  await t.client.close();
  await t.fake.stop();
});

test("an authorization with no answer or a 5xx is released (it may have reserved); a 4xx is not", async () => {
  let status = 503;
  const t = await setup(
    (req) => (req.path === "/v1/authorize" ? { status, body: { error: "x" } } : req.path.endsWith("/release") ? { status: 404, body: {} } : accepted(req)),
    { paidTools: ["echo"], customerId: () => "cust-1" },
  );
  assert.equal((await t.call("echo", { text: "a" })).isError, true);
  status = 400;
  assert.equal((await t.call("echo", { text: "b" })).isError, true);
  await t.meter.close(1000);
  const asked = t.fake.received.filter((r) => r.path === "/v1/authorize").map((r) => r.body.nonce);
  assert.deepEqual(t.fake.received.filter((r) => r.path.endsWith("/release")).map((r) => r.path), [`/v1/authorize/${asked[0]}/release`]);
  assert.equal(t.runs(), 0);
  await t.client.close();
  await t.fake.stop();
});

test("calls the MCP SDK refuses before the handler (unknown tool, invalid arguments) report nothing", async () => {
  const t = await setup((req) => accepted(req));
  // SDK 1.32.2 answers both with an isError result, not a JSON-RPC error; the handler never runs.
  const unknown = await t.call("nope");
  assert.equal(unknown.isError, true);
  const invalid = await t.call("echo", { text: 42 });
  assert.equal(invalid.isError, true);
  assert.equal(t.runs(), 0);
  await t.meter.close(1000);
  assert.deepEqual(t.fake.events().filter((e) => e.toolName), []);
  await t.client.close();
  await t.fake.stop();
});

test("an authorized paid call runs and its event, keyed by the authorization's nonce, settles it; nothing is released", async () => {
  const t = await setup(
    (req) =>
      req.path === "/v1/authorize"
        ? { status: 200, body: { authorized: true, nonce: req.body.nonce, quoteMicros: 5000 } }
        : accepted(req),
    { paidTools: ["echo"], customerId: () => "cust-1" },
  );
  const answer = await t.call("echo", { text: "paid" });
  assert.equal(answer.isError, undefined);
  assert.equal(t.runs(), 1);
  await t.meter.close(1000);
  const nonce = t.fake.received.find((r) => r.path === "/v1/authorize")!.body.nonce;
  assert.deepEqual(t.fake.events().filter((e) => e.toolName).map((e) => [e.idempotencyKey, e.customerId, e.executionStatus]), [
    [nonce, "cust-1", "SUCCESS"],
  ]);
  assert.equal(t.fake.received.filter((r) => r.path.endsWith("/release")).length, 0);
  await t.client.close();
  await t.fake.stop();
});

test("a server is metered once: a callback given back through update is not wrapped again, a second withMetering throws", async () => {
  const fake = await FakeMeter.start((req) => accepted(req));
  const server = new McpServer({ name: "twice", version: "1.0.0" });
  const reply = async () => ({ content: [{ type: "text" as const, text: "x" }] });
  server.registerTool("before", {}, reply);
  const meter = withMetering(server, { url: fake.url, apiKey: "k" });
  const after = server.registerTool("after", {}, reply);
  // The handler the MCP SDK holds is the metered one; handing it back must not meter it twice.
  after.update({ callback: (after as unknown as { handler: typeof reply }).handler });
  const client = new Client({ name: "twice-agent", version: "1.0.0" });
  const [a, b] = InMemoryTransport.createLinkedPair();
  await Promise.all([server.connect(a), client.connect(b)]);
  await client.callTool({ name: "before", arguments: {} });
  await client.callTool({ name: "after", arguments: {} });
  await meter.flush();
  assert.deepEqual(fake.events().map((e) => e.toolName), ["before", "after"]);
  assert.throws(() => withMetering(server, { url: fake.url, apiKey: "k" }), /already applied to this server; use the handle it returned/);
  await client.callTool({ name: "before", arguments: {} });
  await meter.close(1000);
  assert.deepEqual(fake.events().filter((e) => e.toolName).map((e) => e.toolName), ["before", "after", "before"]);
  await client.close();
  await fake.stop();
});

test("close() while a call never settles still delivers what came before and the session's end, within waitMs; a flush after close sends", async () => {
  const t = await setup((req) => accepted(req), { flushIntervalMs: 60_000 });
  t.server.registerTool("hang", {}, () => new Promise<never>(() => {}));
  await t.call("echo", { text: "done" });
  void t.call("hang").catch(() => {});
  await new Promise((r) => setTimeout(r, 20));
  const started = Date.now();
  await t.meter.close(1000);
  const took = Date.now() - started;
  const delivered = () => t.fake.events().map((e) => e.toolName ?? e.sessionBoundary);
  assert.deepEqual(delivered(), ["echo", "SESSION_END"], `close(1000) returned after ${took} ms`);
  assert.ok(took < 1200, `close(1000) took ${took} ms`);
  // A call after close is metered, and waits for a flush, which sends.
  await t.call("echo", { text: "late" });
  await t.meter.flush(1000);
  assert.deepEqual(delivered(), ["echo", "SESSION_END", "echo"]);
  assert.equal(t.meter.stats().queued, 0);
  await t.client.close();
  await t.fake.stop();
});

test("metering never throws into a tool call: onError, customerId, agentId and tokens that throw", async () => {
  const throwing = (what: string) => () => {
    throw new Error(`${what} is broken`);
  };
  const t = await setup((req) => accepted(req), {
    maxQueue: 2,
    flushIntervalMs: 60_000,
    customerId: throwing("customerId"),
    agentId: throwing("agentId"),
    tokens: throwing("tokens"),
  });
  // setup's onError collects; this one throws as well, after collecting.
  const seen: string[] = [];
  const t2 = await setup((req) => accepted(req), {
    maxQueue: 2,
    flushIntervalMs: 60_000,
    customerId: throwing("customerId"),
    onError: (e) => {
      seen.push(e.message);
      throw e;
    },
  });
  for (const m of [t, t2]) {
    for (let i = 0; i < 3; i++) assert.equal((await m.call("echo", { text: `call ${i}` })).isError, undefined);
    assert.equal(m.runs(), 3);
    // The bound (2 events) dropped the first call, and said so (onError); nothing else was lost.
    assert.deepEqual(m.meter.stats(), { sent: 0, failed: 0, dropped: 1, queued: 2 });
    await m.meter.close(1000);
    const [event] = m.fake.events().filter((e) => e.toolName);
    assert.equal(event.customerId, undefined);
    assert.equal(event.executionStatus, "SUCCESS");
    await m.client.close();
    await m.fake.stop();
  }
  assert.equal(t.fake.events().find((e) => e.toolName).agentId, "test-agent", "agentId falls back to initialize's clientInfo");
  assert.ok(t.errors.some((e) => /customerId\(\) threw: customerId is broken/.test(e.message)));
  assert.ok(t.errors.some((e) => /agentId\(\) threw/.test(e.message)));
  assert.ok(t.errors.some((e) => /tokens\(\) for echo threw/.test(e.message)));
  assert.ok(seen.some((m) => /queue is full/.test(m)));
});

test("a paid call whose authorization fails is released though onError throws", async () => {
  const t = await setup(
    (req) => (req.path === "/v1/authorize" ? { status: 503, body: {} } : req.path.endsWith("/release") ? { status: 200, body: {} } : accepted(req)),
    {
      paidTools: ["echo"],
      customerId: () => "cust-1",
      onError: () => {
        throw new Error("onError is broken");
      },
    },
  );
  const answer = await t.call("echo", { text: "paid" });
  assert.equal(answer.isError, true);
  assert.match(JSON.stringify(answer.content), /could not be authorized/);
  await t.meter.close(1000);
  assert.equal(t.fake.received.filter((r) => r.path.endsWith("/release")).length, 1);
  await t.client.close();
  await t.fake.stop();
});

test("a meter per connection holds no exit hook once it holds nothing, though mcp-meter was down when its connection closed", async () => {
  let down = true;
  const fake = await FakeMeter.start((req) => (down ? { status: 503, body: {} } : accepted(req)));
  const before = exitHooks();
  const meters: ReturnType<typeof withMetering>[] = [];
  for (let i = 0; i < 20; i++) {
    const server = new McpServer({ name: "per-connection", version: "1.0.0" });
    meters.push(withMetering(server, { url: fake.url, apiKey: "k", exitFlushMs: 20, flushIntervalMs: 50 }));
    server.registerTool("echo", {}, async () => ({ content: [{ type: "text", text: "x" }] }));
    const client = new Client({ name: "a", version: "1" });
    const [a, b] = InMemoryTransport.createLinkedPair();
    await Promise.all([server.connect(a), client.connect(b)]);
    await client.callTool({ name: "echo", arguments: {} });
    await client.close();
  }
  await new Promise((r) => setTimeout(r, 100));
  assert.equal(exitHooks() - before, 20, "each meter holds its call and its session's end: its hook stays");
  down = false;
  await waitFor(() => meters.every((m) => m.stats().sent === 2), "every meter delivered");
  await waitFor(() => exitHooks() === before, `${exitHooks() - before} exit hooks still held`);
  await fake.stop();
});

test("a paidTools predicate that throws counts the tool as paid: the call is authorized first", async () => {
  const t = await setup(
    (req) => (req.path === "/v1/authorize" ? { status: 200, body: { authorized: true, nonce: req.body.nonce } } : accepted(req)),
    {
      customerId: () => "cust-1",
      paidTools: () => {
        throw new Error("the price list is unreadable");
      },
    },
  );
  assert.equal((await t.call("echo", { text: "hi" })).isError, undefined);
  assert.equal(t.fake.received.filter((r) => r.path === "/v1/authorize").length, 1);
  assert.ok(t.errors.some((e) => /paidTools\("echo"\) threw, so the call is authorized first: the price list is unreadable/.test(e.message)));
  await t.meter.close(1000);
  await t.client.close();
  await t.fake.stop();
});
