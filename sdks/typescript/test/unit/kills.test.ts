// The kill list, merged from each answer for the sessions its batch named: a listed session is
// killed, a named one left out is not, the rest keep their state, and past its bound the kill
// listed longest ago is forgotten. Then seeded random answers against an oracle written apart
// (when each kill was last listed), as the queue's model test does: a failure is shrunk and
// printed with its seed. MCP_METER_TEST_KILLS_SEED replays a run; MCP_METER_TEST_KILLS_SEQUENCES
// sets how many sequences (500).

import { test } from "node:test";
import assert from "node:assert/strict";
import { Kills, listedKills } from "../../src/kills.js";
import { random, withoutRuns } from "./search.js";

test("an answer speaks only for the sessions its batch named", () => {
  const kills = new Kills(10);
  kills.merge(["a", "b"], ["a"]);
  assert.deepEqual(kills.list(), ["a"]);
  // The answer to a batch of another session lists no kill: `a` stays killed.
  kills.merge(["c"], []);
  assert.deepEqual(kills.list(), ["a"]);
  // `a` named again and left out: its kill is over (its limit's window ended).
  kills.merge(["a", "c"], ["c"]);
  assert.deepEqual(kills.list(), ["c"]);
  // A server that lists every kill of the tenant, named or not: each is a kill all the same.
  kills.merge(["c"], ["c", "x", "y"]);
  assert.deepEqual(kills.list(), ["c", "x", "y"]);
});

test("past its bound, the kill list forgets the kill listed longest ago", () => {
  const kills = new Kills(2);
  kills.merge([], ["a", "b"]);
  // `a` is listed again, so `b` is the one listed longest ago.
  kills.merge([], ["a", "c"]);
  assert.deepEqual(kills.list(), ["a", "c"]);
  assert.equal(kills.size, 2);
});

test("a body without a killedSessionIds array has no list to read; one with it lists its strings", () => {
  for (const body of [undefined, null, "text", 7, {}, { killedSessionIds: "s1" }, { killedSessionIds: null }]) {
    assert.equal(listedKills(body), undefined, JSON.stringify(body));
  }
  assert.deepEqual(listedKills({ killedSessionIds: [] }), []);
  assert.deepEqual(listedKills({ killedSessionIds: ["s1", 7, null, "s2"] }), ["s1", "s2"]);
});

interface Scenario {
  max: number;
  answers: { named: string[]; listed: string[] }[];
}

function generate(seed: number): Scenario {
  const next = random(seed);
  const pick = () => `s${Math.floor(next() * 8)}`;
  const answers = Array.from({ length: 60 }, () => {
    const named = Array.from({ length: Math.floor(next() * 4) }, pick);
    // Mostly kills among the named, as mcp-meter answers; sometimes another session too, as a
    // server older than per-batch answers lists every kill of the tenant.
    const listed = [...named.filter(() => next() < 0.4), ...(next() < 0.2 ? [pick()] : [])];
    return { named, listed };
  });
  return { max: 1 + Math.floor(next() * 4), answers };
}

/** Merges a scenario's answers; the first where the kill list and the oracle differ, or undefined. */
function run({ max, answers }: Scenario): string | undefined {
  const kills = new Kills(max);
  // The oracle: when each killed session was last listed, and nothing else. A listed session is
  // killed; a named one left out is not; then only the `max` listed last stay, and one
  // forgotten stays forgotten until listed again.
  const listedAt = new Map<string, number>();
  let clock = 0;
  for (const [i, { named, listed }] of answers.entries()) {
    kills.merge(named, listed);
    for (const s of named) if (!listed.includes(s)) listedAt.delete(s);
    for (const s of listed) listedAt.set(s, clock++);
    const newest = [...listedAt].sort(([, a], [, b]) => b - a).map(([s]) => s);
    for (const s of newest.slice(max)) listedAt.delete(s);
    const expected = [...listedAt.keys()].sort();
    if (JSON.stringify(kills.list()) !== JSON.stringify(expected)) {
      return `after answer ${i}: the kill list is ${JSON.stringify(kills.list())}, the oracle says ${JSON.stringify(expected)}`;
    }
  }
  return undefined;
}

/** Shortens a failing scenario: a smaller bound, then fewer answers (runs of them), while it still fails. */
async function shrink(scenario: Scenario): Promise<Scenario> {
  let best = scenario;
  for (let max = 1; max < best.max; max++) {
    if (run({ ...best, max })) {
      best = { ...best, max };
      break;
    }
  }
  const answers = await withoutRuns(best.answers, (answers) => Boolean(run({ ...best, answers })));
  return { ...best, answers };
}

test("seeded random answers: after each, the kill list is what the oracle says", async (t) => {
  const base = process.env.MCP_METER_TEST_KILLS_SEED ? Number(process.env.MCP_METER_TEST_KILLS_SEED) : Math.floor(Math.random() * 2 ** 31);
  const sequences = Number(process.env.MCP_METER_TEST_KILLS_SEQUENCES ?? 500);
  t.diagnostic(`MCP_METER_TEST_KILLS_SEED=${base} (sequences ${base}..${base + sequences - 1})`);
  for (let i = 0; i < sequences; i++) {
    const seed = base + i;
    const scenario = generate(seed);
    const broken = run(scenario);
    if (broken) {
      const small = await shrink(scenario);
      assert.fail(
        `seed ${seed} (MCP_METER_TEST_KILLS_SEED=${seed} MCP_METER_TEST_KILLS_SEQUENCES=1 replays it): ${broken}\n` +
          `shrunk to max ${small.max}, answers:\n` +
          small.answers.map((a) => JSON.stringify(a)).join("\n") +
          `\nwhich breaks: ${run(small)}`,
      );
    }
  }
});
