// The end of the process delivers what the meter holds: when Node's event loop empties, and
// on a signal, which is then re-raised unless the program listens for it itself; a meter that
// cannot deliver delays the end by exitFlushMs at most. Each case is a child process
// (exit-child.ts) against a fake mcp-meter.

import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { fileURLToPath } from "node:url";
import { FakeMeter, accepted } from "./fake.js";

const CHILD = fileURLToPath(new URL("./exit-child.js", import.meta.url));

interface Ended {
  code: number | null;
  signal: NodeJS.Signals | null;
  /** From the child's CALLED line to its end. */
  afterCallMs: number;
  stderr: string;
}

function child(scenario: string, url: string, options: { signal?: NodeJS.Signals; exitFlushMs?: number } = {}): Promise<Ended> {
  const proc = spawn(process.execPath, [CHILD], {
    env: { ...process.env, MCP_METER_EXIT_CHILD: scenario, MCP_METER_URL: url, EXIT_FLUSH_MS: String(options.exitFlushMs ?? 5000) },
    stdio: ["ignore", "pipe", "pipe"],
  });
  let stderr = "";
  let calledAt = 0;
  proc.stderr.on("data", (chunk) => (stderr += chunk));
  proc.stdout.on("data", (chunk) => {
    if (!calledAt && String(chunk).includes("CALLED")) {
      calledAt = Date.now();
      if (options.signal) proc.kill(options.signal);
    }
  });
  // A child that outlives every bound here is stuck: it is killed, and ends with SIGKILL.
  const stuck = setTimeout(() => proc.kill("SIGKILL"), 15_000);
  return new Promise((resolve) =>
    proc.on("close", (code, signal) => {
      clearTimeout(stuck);
      resolve({ code, signal, afterCallMs: Date.now() - calledAt, stderr });
    }),
  );
}

const calls = (fake: FakeMeter) => fake.events().filter((e) => e.toolName).map((e) => [e.toolName, e.agentId]);
const ends = (fake: FakeMeter) => fake.events().filter((e) => e.sessionBoundary === "SESSION_END").length;

test("when the event loop empties, the call and the session's end are delivered before the process ends", async () => {
  const fake = await FakeMeter.start();
  const ended = await child("drain", fake.url);
  assert.equal(ended.code, 0, ended.stderr);
  assert.deepEqual(calls(fake), [["echo", "exit-agent"]]);
  assert.equal(ends(fake), 1);
  assert.match(ended.stderr, /STATS \{"sent":2,"failed":0,"dropped":0,"queued":0\}/);
  await fake.stop();
});

test("SIGTERM with no listener of the program's: delivered, then the process dies of SIGTERM", async () => {
  const fake = await FakeMeter.start();
  const ended = await child("signal", fake.url, { signal: "SIGTERM" });
  assert.equal(ended.signal, "SIGTERM", ended.stderr);
  assert.deepEqual(calls(fake), [["echo", "exit-agent"]]);
  assert.equal(ends(fake), 1);
  await fake.stop();
});

test("SIGTERM the program listens for: delivered, and the program's listener decides the end", async () => {
  const fake = await FakeMeter.start();
  const ended = await child("signal-handled", fake.url, { signal: "SIGTERM" });
  assert.deepEqual([ended.code, ended.signal], [7, null], ended.stderr);
  assert.deepEqual(calls(fake), [["echo", "exit-agent"]]);
  await fake.stop();
});

test("a meter that never answers delays the end by exitFlushMs at most, on either way out", async () => {
  const silent = await FakeMeter.start((req) => ({ ...accepted(req), delayMs: 60_000 }));
  for (const signal of [undefined, "SIGINT" as const]) {
    const ended = await child(signal ? "signal" : "drain", silent.url, { signal, exitFlushMs: 300 });
    assert.ok(ended.afterCallMs < 3000, `ended ${ended.afterCallMs} ms after the call`);
    assert.equal(ended.signal, signal ?? null, ended.stderr);
    // The call and the session's end were tried once and are still held. A process that dies
    // of its signal emits no 'exit', so there only the flush's own report says so.
    assert.match(ended.stderr, /unreachable \(2 events kept for retry\)/);
    if (!signal) assert.match(ended.stderr, /STATS \{"sent":0,"failed":0,"dropped":0,"queued":2\}/);
  }
  await silent.stop();
});

test("a flush of the user's own under way does not hold the end past exitFlushMs", async () => {
  const down = await FakeMeter.start(() => ({ status: 503, body: {} }));
  const ended = await child("user-flush", down.url, { signal: "SIGTERM", exitFlushMs: 300 });
  assert.equal(ended.signal, "SIGTERM", ended.stderr);
  assert.ok(ended.afterCallMs < 3000, `ended ${ended.afterCallMs} ms after the call`);
  await down.stop();
});

test("SIGTERM ends the process beside a listener that re-raises as signal-exit does, and beside a second copy of the SDK", async () => {
  const fake = await FakeMeter.start();
  for (const scenario of ["signal-exit", "two-copies"]) {
    const at = fake.events().length;
    const ended = await child(scenario, fake.url, { signal: "SIGTERM", exitFlushMs: 500 });
    assert.equal(ended.signal, "SIGTERM", `${scenario}: ended ${JSON.stringify([ended.code, ended.signal])} after ${ended.afterCallMs} ms; ${ended.stderr}`);
    assert.ok(ended.afterCallMs < 3000, `${scenario}: ended ${ended.afterCallMs} ms after the call`);
    assert.deepEqual(fake.events().slice(at).map((e) => e.toolName ?? e.sessionBoundary), ["echo", "SESSION_END"]);
    assert.match(ended.stderr, scenario === "signal-exit" ? /SIGNAL-EXIT ran its handlers/ : /SECOND COPY's hook ran/);
  }
  await fake.stop();
});

test("a SIGHUP the program handles (a reload) delivers what is queued and ends no session", async () => {
  const fake = await FakeMeter.start();
  const ended = await child("hup-reload", fake.url, { signal: "SIGHUP" });
  assert.deepEqual([ended.code, ended.signal], [0, null], ended.stderr);
  const events = fake.events();
  assert.deepEqual(events.map((e) => e.toolName ?? e.sessionBoundary), ["echo", "echo", "SESSION_END"]);
  assert.equal(new Set(events.map((e) => e.sessionId)).size, 1);
  // The first call went out on the signal, alone; the second and the session's end with close().
  assert.deepEqual(fake.received.map((r) => r.body.events.length), [1, 2]);
  await fake.stop();
});
