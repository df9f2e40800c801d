// withMetering on a real McpServer driven by a real MCP client (in memory), against a fake
// mcp-meter: events per call, kills applied, the guard failing open, paid tools refused.

import { test } from "node:test";
import assert from "node:assert/strict";
import { McpServer } from "@modelcontextprotocol/sdk/server/mcp.js";
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { InMemoryTransport } from "@modelcontextprotocol/sdk/inMemory.js";
import { z } from "zod";
import { withMetering, MeteringOptions } from "../../src/index.js";
import { FakeMeter, Script, accepted } from "./fake.js";

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
  return { fake, server, client, meter, errors, call, runs: () => runs };
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
    (req) => (req.path.startsWith("/v1/guard/check") ? { status: 200, body: { action, retryAfterSeconds: 0.2 } } : accepted(req)),
    { guard: true, guardTimeoutMs: 1000 },
  );
  const blocked = await t.call("echo", { text: "hi" });
  assert.equal(blocked.isError, true);
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
