// The queue against an oracle, over seeded random sequences: pushes, passes and flushes, and
// every answer mcp-meter can give (202, partly refused, 400, 429, 500, no answer, and no answer
// after the batch was stored), with random bounds. The oracle is a ledger written apart from
// the queue: each event is held, acknowledged, refused or dropped, and moves only on what the
// fake server answered or the queue reported dropping. Checked after every step: the queue's
// counts equal the ledger's (so sent + failed + dropped + queued = pushed); a batch is the
// oldest events held, in order, never one already acknowledged, refused or dropped; no event
// is acknowledged twice; a dropped event was waiting (not on the wire) and was the oldest one
// waiting. A failure is shrunk (smaller bounds, fewer ops) and printed with its seed.
// MCP_METER_TEST_QUEUE_SEED replays a run; MCP_METER_TEST_QUEUE_SEQUENCES sets how many
// sequences (300).

import { test } from "node:test";
import assert from "node:assert/strict";
import { EventQueue, UsageEvent } from "../../src/queue.js";
import type { Answer, Poster } from "../../src/transport.js";
import { random, withoutRuns } from "./search.js";

type Reply = "202" | "202-partial" | "400" | "429" | "500" | "none" | "none-stored";
type Op = { op: "push" } | { op: "answer"; reply: Reply } | { op: "pass" } | { op: "flush" };
interface Scenario {
  maxQueue: number;
  maxBatchSize: number;
  ops: Op[];
}

const REPLIES: Reply[] = ["202", "202", "202-partial", "400", "429", "500", "none", "none-stored"];

function generate(seed: number): Scenario {
  const next = random(seed);
  const pick = <T>(xs: T[]) => xs[Math.floor(next() * xs.length)];
  const ops: Op[] = [];
  for (let i = 0; i < 120; i++) {
    const r = next();
    ops.push(r < 0.45 ? { op: "push" } : r < 0.85 ? { op: "answer", reply: pick(REPLIES) } : r < 0.95 ? { op: "pass" } : { op: "flush" });
  }
  return { maxQueue: 1 + Math.floor(next() * 12), maxBatchSize: 1 + Math.floor(next() * 5), ops };
}

type Fate = "held" | "acked" | "refused" | "dropped";

/** Runs a scenario; answers the first broken rule, or undefined. */
async function run(scenario: Scenario): Promise<string | undefined> {
  const fate = new Map<string, Fate>();
  const order: string[] = []; // push order
  const stored = new Set<string>(); // what the fake server holds
  const wire: { keys: string[]; answer: (a: Answer) => void }[] = [];
  let broken: string | undefined;
  const check = (ok: boolean, what: string) => {
    if (!ok && broken === undefined) broken = what;
  };
  const held = () => order.filter((k) => fate.get(k) === "held");
  const onWire = () => new Set(wire.flatMap((r) => r.keys));

  const poster: Poster = {
    post(_path, body) {
      const keys = (body as { events: UsageEvent[] }).events.map((e) => e.idempotencyKey);
      check(wire.length === 0, `a second batch went out while one was on the wire: ${keys}`);
      check(keys.length > 0 && keys.length <= scenario.maxBatchSize, `a batch of ${keys.length}`);
      const oldest = held().slice(0, keys.length);
      check(JSON.stringify(keys) === JSON.stringify(oldest), `batch ${keys} is not the oldest held, in order (${oldest})`);
      return new Promise((answer) => wire.push({ keys, answer }));
    },
  };
  const queue = new EventQueue(poster, {
    maxBatchSize: scenario.maxBatchSize,
    maxQueue: scenario.maxQueue,
    flushIntervalMs: 1e9,
    minBackoffMs: 0,
    maxBackoffMs: 0,
    onError: () => {},
    onAnswer: () => {},
    onDropped: (event) => {
      const key = event.idempotencyKey;
      check(fate.get(key) === "held", `${key} dropped while ${fate.get(key)}`);
      check(!onWire().has(key), `${key} dropped while on the wire`);
      const waiting = held().filter((k) => !onWire().has(k));
      check(waiting[0] === key, `${key} dropped, but the oldest waiting is ${waiting[0]}`);
      fate.set(key, "dropped");
    },
  });
  const reply = (request: { keys: string[]; answer: (a: Answer) => void }, kind: Reply) => {
    const { keys } = request;
    if (kind === "202" || kind === "202-partial") {
      // Partly: the last event of the batch is refused (bad data), the rest stored.
      const refused = kind === "202-partial" ? keys.slice(-1) : [];
      let accepted = 0;
      let duplicates = 0;
      for (const key of keys) {
        if (refused.includes(key)) {
          check(fate.get(key) === "held", `${key} refused while ${fate.get(key)}`);
          fate.set(key, "refused");
          continue;
        }
        if (stored.has(key)) duplicates += 1;
        else accepted += 1;
        stored.add(key);
        check(fate.get(key) === "held", `${key} acknowledged while ${fate.get(key)}`);
        fate.set(key, "acked");
      }
      request.answer({ status: 202, body: { accepted, duplicates, failed: refused.length, errors: [], killedSessionIds: [] } });
    } else if (kind === "400") {
      for (const key of keys) fate.set(key, "refused");
      request.answer({ status: 400, body: { error: "bad_request", message: "x" } });
    } else if (kind === "429" || kind === "500") {
      request.answer({ status: Number(kind), body: {} });
    } else {
      if (kind === "none-stored") for (const key of keys) stored.add(key);
      request.answer({ status: 0, body: undefined, error: new Error("dropped connection") });
    }
  };
  const settle = async () => {
    for (let i = 0; i < 2; i++) await new Promise((r) => setImmediate(r));
  };
  const compare = (step: string) => {
    const s = queue.stats();
    const counted = (f: Fate) => order.filter((k) => fate.get(k) === f).length;
    const ledger = { sent: counted("acked"), failed: counted("refused"), dropped: counted("dropped"), queued: counted("held") };
    check(JSON.stringify(s) === JSON.stringify(ledger), `after ${step}: the queue says ${JSON.stringify(s)}, the ledger ${JSON.stringify(ledger)}`);
    check(s.sent + s.failed + s.dropped + s.queued === order.length, `after ${step}: counts do not add up to ${order.length} pushed`);
    check(s.queued <= scenario.maxQueue, `after ${step}: ${s.queued} held, bound ${scenario.maxQueue}`);
  };

  let n = 0;
  for (const [i, op] of scenario.ops.entries()) {
    if (op.op === "push") {
      const key = `e${n++}`;
      order.push(key);
      fate.set(key, "held");
      queue.push({ idempotencyKey: key, metricName: "m", occurredAt: "2026-01-01T00:00:00Z" });
    } else if (op.op === "answer") {
      const request = wire.shift();
      if (request) reply(request, op.reply);
    } else if (op.op === "pass") {
      void queue.flush(false);
    } else {
      void queue.flush(true);
    }
    await settle();
    compare(`op ${i} (${JSON.stringify(op)})`);
    if (broken) break;
  }
  // The end: mcp-meter answers everything; nothing may be left, nothing lost.
  if (!broken) {
    let done = false;
    void queue.flush(true).then(() => (done = true));
    for (let rounds = 0; !done && rounds < 10_000; rounds++) {
      const request = wire.shift();
      if (request) reply(request, "202");
      await settle();
    }
    check(done, "the final flush never ended");
    compare("the final flush");
    check(held().length === 0, `still held after the final flush: ${held()}`);
  }
  // Whatever is still on the wire goes unanswered, so that closing ends.
  let closed = false;
  void queue.close(Date.now()).then(() => (closed = true));
  for (let rounds = 0; !closed && rounds < 10_000; rounds++) {
    wire.shift()?.answer({ status: 0, body: undefined, error: new Error("closing") });
    await settle();
  }
  return broken;
}

/** Shortens a failing scenario: smaller bounds, then fewer ops (runs of them), while it still fails. */
async function shrink(scenario: Scenario): Promise<Scenario> {
  let best = scenario;
  for (const bound of ["maxQueue", "maxBatchSize"] as const) {
    for (let value = 1; value < best[bound]; value++) {
      const candidate = { ...best, [bound]: value };
      if (await run(candidate)) {
        best = candidate;
        break;
      }
    }
  }
  const ops = await withoutRuns(best.ops, async (ops) => Boolean(await run({ ...best, ops })));
  return { ...best, ops };
}

test("every event pushed is acknowledged, refused, dropped while waiting, or still held: never lost, never counted twice", async (t) => {
  const base = process.env.MCP_METER_TEST_QUEUE_SEED ? Number(process.env.MCP_METER_TEST_QUEUE_SEED) : Math.floor(Math.random() * 2 ** 31);
  const sequences = Number(process.env.MCP_METER_TEST_QUEUE_SEQUENCES ?? 300);
  t.diagnostic(`MCP_METER_TEST_QUEUE_SEED=${base} (sequences ${base}..${base + sequences - 1})`);
  for (let i = 0; i < sequences; i++) {
    const seed = base + i;
    const scenario = generate(seed);
    const broken = await run(scenario);
    if (broken) {
      const small = await shrink(scenario);
      assert.fail(
        `seed ${seed} (MCP_METER_TEST_QUEUE_SEED=${seed} MCP_METER_TEST_QUEUE_SEQUENCES=1 replays it): ${broken}\n` +
          `shrunk to maxQueue ${small.maxQueue}, maxBatchSize ${small.maxBatchSize}, ops:\n` +
          small.ops.map((op) => JSON.stringify(op)).join("\n") +
          `\nwhich breaks: ${await run(small)}`,
      );
    }
  }
});
