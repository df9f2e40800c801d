// Open sessions end: all at once when the connection closes, each after `idleMs` without a
// call, and the one idle longest once there are more than `max`.

import { test } from "node:test";
import assert from "node:assert/strict";
import { Sessions } from "../../src/sessions.js";

const ids = (sessions: { sessionId: string }[]) => sessions.map((s) => s.sessionId);

test("a session idle for idleMs ends; a call keeps it open", () => {
  const s = new Sessions(100, 10);
  s.touch("a", "agent-a", 0);
  s.touch("b", undefined, 50);
  s.touch("a", "agent-a", 90);
  assert.deepEqual(s.expire(149), []);
  assert.deepEqual(s.expire(150), [{ sessionId: "b", agentId: undefined }]);
  assert.deepEqual(ids(s.list()), ["a"]);
  assert.deepEqual(ids(s.expire(190)), ["a"]);
  assert.equal(s.size, 0);
});

test("past max sessions, the one whose last call is oldest ends", () => {
  const s = new Sessions(1e9, 2);
  assert.deepEqual(s.touch("a", undefined, 0), []);
  assert.deepEqual(s.touch("b", undefined, 1), []);
  s.touch("a", undefined, 2);
  assert.deepEqual(ids(s.touch("c", undefined, 3)), ["b"]);
  assert.deepEqual(ids(s.list()), ["a", "c"]);
});

test("endAll ends every session, with its agent", () => {
  const s = new Sessions(1e9, 10);
  s.touch("a", "x", 0);
  s.touch("b", "y", 0);
  assert.deepEqual(s.endAll(), [
    { sessionId: "a", agentId: "x" },
    { sessionId: "b", agentId: "y" },
  ]);
  assert.equal(s.size, 0);
});
