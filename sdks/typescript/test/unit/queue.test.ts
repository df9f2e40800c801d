// The delivery rules, against a fake mcp-meter: batching by size and by time, retries with the
// same keys, Retry-After, a bounded queue that never drops a batch on the wire, flushes bounded
// by their deadline.

import { test } from "node:test";
import assert from "node:assert/strict";
import { EventQueue, UsageEvent } from "../../src/queue.js";
import { Transport } from "../../src/transport.js";
import { FakeMeter, accepted } from "./fake.js";

function event(n: number): UsageEvent {
  return { idempotencyKey: `k${n}`, metricName: "mcp_server.tool_invocations", toolName: "t", occurredAt: new Date().toISOString() };
}

function queue(fake: FakeMeter, overrides: Partial<ConstructorParameters<typeof EventQueue>[1]> = {}, errors: Error[] = []) {
  return new EventQueue(new Transport({ url: fake.url, apiKey: "k", timeoutMs: 2000 }), {
    maxBatchSize: 3,
    flushIntervalMs: 60_000,
    maxQueue: 100,
    minBackoffMs: 20,
    maxBackoffMs: 200,
    onError: (e) => errors.push(e),
    onAnswer: () => {},
    ...overrides,
  });
}

const until = async (what: () => boolean, ms = 5000) => {
  const deadline = Date.now() + ms;
  while (!what()) {
    if (Date.now() > deadline) throw new Error("timed out");
    await new Promise((r) => setTimeout(r, 5));
  }
};

test("a full batch goes at once; the rest waits for the interval or a flush", async () => {
  const fake = await FakeMeter.start();
  const q = queue(fake);
  for (let n = 0; n < 7; n++) q.push(event(n));
  // Until both answers are in: an event is held (queued) until its batch is answered.
  await until(() => q.stats().sent >= 6);
  assert.deepEqual(fake.received.map((r) => r.body.events.length), [3, 3]);
  assert.equal(q.stats().queued, 1);
  await q.flush();
  assert.deepEqual(fake.events().map((e) => e.idempotencyKey), ["k0", "k1", "k2", "k3", "k4", "k5", "k6"]);
  assert.deepEqual(q.stats(), { sent: 7, failed: 0, dropped: 0, queued: 0 });
  await q.close(Date.now());
  await fake.stop();
});

test("the interval sends a batch that is not full", async () => {
  const fake = await FakeMeter.start();
  const q = queue(fake, { flushIntervalMs: 50 });
  q.push(event(1));
  await until(() => fake.events().length === 1, 2000);
  await q.close(Date.now());
  await fake.stop();
});

test("after a 503 and after a dropped connection the same events are sent again, same keys", async () => {
  const fake = await FakeMeter.start((req, n) => (n === 1 ? { status: 503, headers: { "Retry-After": "0" } } : n === 2 ? "drop" : accepted(req)));
  const errors: Error[] = [];
  const q = queue(fake, {}, errors);
  for (let n = 0; n < 2; n++) q.push(event(n));
  await q.flush();
  const keys = fake.received.map((r) => r.body.events.map((e: UsageEvent) => e.idempotencyKey).join(","));
  assert.deepEqual(keys, ["k0,k1", "k0,k1", "k0,k1"]);
  assert.equal(q.stats().sent, 2);
  assert.equal(errors.length, 2);
  assert.match(errors[0].message, /503/);
  assert.match(errors[1].message, /unreachable/);
  await q.close(Date.now());
  await fake.stop();
});

test("Retry-After is honoured before the next attempt", async () => {
  const fake = await FakeMeter.start((req, n) => (n === 1 ? { status: 429, headers: { "Retry-After": "1" } } : accepted(req)));
  const q = queue(fake);
  q.push(event(1));
  await q.flush();
  const [first, second] = fake.received;
  assert.ok(second.at - first.at >= 950, `waited ${second.at - first.at} ms`);
  await q.close(Date.now());
  await fake.stop();
});

test("a full queue drops its oldest events and counts them", async () => {
  const fake = await FakeMeter.start(() => ({ status: 503 }));
  const errors: Error[] = [];
  const q = queue(fake, { maxQueue: 5, maxBatchSize: 1000 }, errors);
  for (let n = 0; n < 8; n++) q.push(event(n));
  assert.deepEqual(q.stats(), { sent: 0, failed: 0, dropped: 3, queued: 5 });
  assert.equal(errors.filter((e) => /queue is full/.test(e.message)).length, 3);
  await q.close(Date.now() + 50);
  await fake.stop();
});

test("a batch on the wire is out of the bound's reach: the oldest waiting event is dropped", async () => {
  const slow = await FakeMeter.start((req) => (req.body.events.length === 2 ? { ...accepted(req), delayMs: 300 } : accepted(req)));
  const dropped: string[] = [];
  const q = queue(slow, { maxQueue: 3, maxBatchSize: 2, onDropped: (e) => dropped.push(e.idempotencyKey) });
  q.push(event(0));
  q.push(event(1)); // a full batch: k0 and k1 go out
  await until(() => slow.received.length === 1);
  q.push(event(2));
  q.push(event(3)); // the bound (3) counts k0, k1 on the wire and k2: k2, the oldest waiting, goes
  assert.deepEqual(dropped, ["k2"]);
  assert.deepEqual(q.stats(), { sent: 0, failed: 0, dropped: 1, queued: 3 });
  await q.flush();
  assert.deepEqual(slow.events().map((e) => e.idempotencyKey), ["k0", "k1", "k3"]);
  assert.deepEqual(q.stats(), { sent: 3, failed: 0, dropped: 1, queued: 0 });
  await q.close(Date.now());
  await slow.stop();
});

test("a flush's deadline cuts the request on the wire; its events wait again", async () => {
  const fake = await FakeMeter.start((req) => ({ ...accepted(req), delayMs: 5000 }));
  const errors: Error[] = [];
  const q = queue(fake, {}, errors);
  q.push(event(1));
  const started = Date.now();
  await q.flush(true, Date.now() + 200);
  assert.ok(Date.now() - started < 1000, `the flush took ${Date.now() - started} ms`);
  assert.deepEqual(q.stats(), { sent: 0, failed: 0, dropped: 0, queued: 1 });
  // Cut by the flush's deadline, or by the request's timeout, which the deadline bounds too.
  assert.match(errors[0].message, /unreachable \(1 events kept for retry\): (the flush's deadline passed|no answer within)/);
  await q.close(Date.now());
  await fake.stop();
});

test("a batch answered 400 leaves the queue and counts as failed", async () => {
  const fake = await FakeMeter.start(() => ({ status: 400, body: { error: "bad_request", message: "nope" } }));
  const errors: Error[] = [];
  const q = queue(fake, {}, errors);
  q.push(event(1));
  await q.flush();
  assert.deepEqual(q.stats(), { sent: 0, failed: 1, dropped: 0, queued: 0 });
  assert.match(errors[0].message, /400.*nope/);
  await q.close(Date.now());
  await fake.stop();
});

test("a flush after close sends: close's deadline bounds close alone", async () => {
  const fake = await FakeMeter.start();
  const q = queue(fake);
  await q.close(Date.now() + 100);
  await new Promise((r) => setTimeout(r, 150));
  q.push(event(1));
  await q.flush(true, Date.now() + 1000);
  assert.deepEqual(q.stats(), { sent: 1, failed: 0, dropped: 0, queued: 0 });
  await fake.stop();
});

test("a hard flush settles by its deadline though a longer flush, sleeping through a backoff, runs before it", async () => {
  const fake = await FakeMeter.start(() => ({ status: 503 }));
  const q = queue(fake, { minBackoffMs: 400, maxBackoffMs: 400 });
  q.push(event(1));
  let longer = 0;
  const started = Date.now();
  void q.flush(true, Date.now() + 20_000).then(() => (longer = Date.now() - started));
  await until(() => fake.received.length === 1);
  await q.flush(true, Date.now() + 150, true);
  const hard = Date.now() - started;
  assert.ok(hard < 600, `the hard flush settled ${hard} ms after the longer one began`);
  // The longer flush stopped by the hard deadline too, not by its own.
  await until(() => longer > 0, 200);
  assert.equal(q.stats().queued, 1);
  // The bound ended with the hard flush: a later flush retries until its own deadline.
  await q.flush(true, Date.now() + 1000);
  assert.ok(fake.received.length >= 3, `${fake.received.length} attempts`);
  await q.close(Date.now());
  await fake.stop();
});

test("onEmpty: a pass that ends with nothing held says so", async () => {
  const fake = await FakeMeter.start();
  let empties = 0;
  const q = queue(fake, { onEmpty: () => (empties += 1) });
  q.push(event(1));
  await q.flush();
  assert.equal(empties, 1);
  await q.close(Date.now());
  await fake.stop();
});
