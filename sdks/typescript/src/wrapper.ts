// withMetering: every tool of an McpServer, registered before or after, is metered: one usage
// event per call, and, when asked, a guard check or an authorization before the handler runs.
//
// The billing rule (the proxy's too): a call whose handler returns is SUCCESS, or ERROR when
// the result has `isError` or the handler throws; a call whose request signal aborted (the
// client cancelled, the connection closed) is CANCELLED; the handler's end decides, so a
// handler that never settles never reports. Calls the MCP SDK refuses before the handler (an
// unknown tool, invalid arguments) and calls refused here (a killed session, a guard block, a
// refused authorization) report nothing. Every reported call is billed at its tool's rate, and
// a paid call's event (keyed by the authorization's nonce) settles its reservation; an
// authorized call that does not run releases it.

import { randomUUID } from "node:crypto";
import type { McpServer, RegisteredTool } from "@modelcontextprotocol/sdk/server/mcp.js";
import type { CallToolResult } from "@modelcontextprotocol/sdk/types.js";
import { beforeProcessEnds, ExitReason } from "./exit.js";
import { Kills, listedKills } from "./kills.js";
import { EventQueue, QueueStats, UsageEvent, sleep } from "./queue.js";
import { OpenSession, Sessions } from "./sessions.js";
import { Transport, retriable } from "./transport.js";

/** What a tool handler receives besides its arguments (the MCP SDK's request extra). */
export interface ToolExtra {
  sessionId?: string;
  signal?: AbortSignal;
  requestId?: string | number;
  _meta?: Record<string, unknown>;
  authInfo?: unknown;
  requestInfo?: unknown;
}

export interface TokenCounts {
  inputTokens: number;
  outputTokens: number;
}

export interface MeteringOptions {
  /** mcp-meter's base URL, e.g. `http://127.0.0.1:8080`. */
  url: string;
  /** An API key with the `ingest` scope. */
  apiKey: string;
  /** The payer of a call (the event's `customerId`). */
  customerId?: (extra: ToolExtra) => string | undefined;
  /** The agent; default: the request's `_meta` clientInfo name (MCP 2026-07-28), else `initialize`'s. */
  agentId?: (extra: ToolExtra) => string | undefined;
  /** Token counts of a call; `result` is undefined when the handler threw. */
  tokens?: (toolName: string, args: unknown, result: CallToolResult | undefined) => TokenCounts | undefined;
  /** Tools authorized before they run (`POST /v1/authorize`); refused ones do not run. */
  paidTools?: string[] | ((toolName: string) => boolean);
  /** Ask `GET /v1/guard/check` before each call. */
  guard?: boolean;
  /** Longest wait for the guard check before the call runs anyway (fail open). Default 50. */
  guardTimeoutMs?: number;
  /** Longest a `throttle` answer delays a call. Default 5000. */
  maxThrottleMs?: number;
  /** Default 1000. */
  flushIntervalMs?: number;
  /** Events per batch, at most 1000. Default 100. */
  maxBatchSize?: number;
  /** Events held in memory at most; beyond, the oldest waiting is dropped. Default 10000. */
  maxQueue?: number;
  /** Heartbeats per open session. Default 30000. */
  heartbeatIntervalMs?: number;
  /** A session with no call for this long ends (SESSION_END). Default 3600000 (an hour). */
  sessionIdleMs?: number;
  /** Open sessions at most; beyond, the one idle longest ends (SESSION_END). Default 1000. */
  maxSessions?: number;
  /** Per request to mcp-meter (batches, authorizations). Default 10000. */
  requestTimeoutMs?: number;
  /**
   * Longest the meter delays the end of a connection or of the process to deliver what it
   * holds: when the MCP transport closes, when Node's event loop empties, on SIGINT, SIGTERM,
   * SIGHUP. Default 5000.
   */
  exitFlushMs?: number;
  /** Called with what went wrong; metering never throws into a tool call. */
  onError?: (error: Error) => void;
}

export interface MeteringHandle {
  /** Sends every queued event now, retrying until they are acknowledged or `waitMs` (default 10000) has passed. */
  flush(waitMs?: number): Promise<void>;
  /**
   * Waits for the calls under way (half of `waitMs` at most, delivering meanwhile what is
   * queued), sends SESSION_END for every open session, and flushes, all within `waitMs` (default
   * 10000); then no timer and no exit hook is left. A call that settles later is metered still
   * and waits for a `flush()`.
   */
  close(waitMs?: number): Promise<void>;
  stats(): QueueStats;
  /**
   * Sessions mcp-meter said to stop, sorted: each listed by an answer and not named since by a
   * batch whose answer left it out.
   */
  killedSessions(): string[];
}

const HEARTBEAT_METRIC = "system.session.heartbeat";
const CALL_METRIC = "mcp_server.tool_invocations";
/** Where clientInfo travels in each request from MCP 2026-07-28 on (`params._meta`). */
const CLIENT_INFO_META = "io.modelcontextprotocol/clientInfo";

/** The answer of a paid call's refused authorization, as the MCP client sees it. */
export interface PaymentTerms {
  authorized: false;
  nonce: string;
  quoteMicros?: number;
  reason?: string;
  availableMicros?: number;
  retryAfterSeconds?: number;
  message?: string;
}

type Callback = (...params: unknown[]) => unknown;

/**
 * On a metered server, its meter's handle; on a metered callback, the callback it meters. Keyed
 * with `Symbol.for` so that two copies of this package see each other's marks.
 */
const METER = Symbol.for("mcp-meter-sdk/meter");
const METERED = Symbol.for("mcp-meter-sdk/metered");

/** Why a call does not run: the answer the client gets, and whether a reservation was made. */
interface Refusal {
  result: CallToolResult;
  /** The authorization may have reserved funds (its answer is unknown): release them. */
  release?: boolean;
}

/**
 * Meters every tool of `server`: those registered already and those registered later (it wraps
 * `registerTool` and the older `tool`, and each tool's `update`). Once per server: a second
 * call throws, as a second meter would bill every call again.
 */
export function withMetering(server: McpServer, options: MeteringOptions): MeteringHandle {
  if ((server as unknown as Record<symbol, unknown>)[METER] !== undefined) {
    throw new Error("withMetering was already applied to this server; use the handle it returned");
  }
  // Metering never throws into a tool call, the user's own callbacks included.
  const onError = (error: Error) => {
    try {
      options.onError?.(error);
    } catch {
      // Whatever onError does wrong, the call goes on; there is no one left to tell.
    }
  };
  /** `fn`'s answer, or undefined when it throws (reported through onError). */
  const guarded = <A extends unknown[], R>(what: string, fn: ((...a: A) => R) | undefined, ...a: A): R | undefined => {
    try {
      return fn?.(...a);
    } catch (error) {
      onError(new Error(`${what} threw: ${error instanceof Error ? error.message : String(error)}`));
      return undefined;
    }
  };
  const exitFlushMs = options.exitFlushMs ?? 5000;
  const transport = new Transport({
    url: options.url,
    apiKey: options.apiKey,
    timeoutMs: options.requestTimeoutMs ?? 10_000,
  });
  const kills = new Kills();
  const readKills = (body: unknown, batch: readonly UsageEvent[]) => {
    const listed = listedKills(body);
    if (listed === undefined) {
      onError(new Error(`mcp-meter's answer to ${batch.length} events has no killedSessionIds; the kills stand as they were`));
      return;
    }
    kills.merge(batch.flatMap((event) => (event.sessionId === undefined ? [] : [event.sessionId])), listed);
  };
  const queue = new EventQueue(transport, {
    maxBatchSize: Math.min(options.maxBatchSize ?? 100, 1000),
    flushIntervalMs: options.flushIntervalMs ?? 1000,
    maxQueue: options.maxQueue ?? 10_000,
    minBackoffMs: 100,
    maxBackoffMs: 30_000,
    onError,
    onAnswer: readKills,
    onEmpty: () => releaseIfIdle(),
  });
  // stdio and in-memory transports have no session id: one per connection.
  let connectionSession = randomUUID();
  const sessions = new Sessions(options.sessionIdleMs ?? 3_600_000, options.maxSessions ?? 1000);
  /** Calls under way and releases on the wire: what closing waits for. */
  const underway = new Set<Promise<unknown>>();
  let closed = false;

  const agentOf = (extra: ToolExtra) =>
    guarded("agentId()", options.agentId, extra) ?? clientInfoName(extra._meta) ?? server.server.getClientVersion()?.name;
  const isPaid = (name: string): boolean => {
    const paid = options.paidTools;
    if (typeof paid !== "function") return (paid ?? []).includes(name);
    try {
      return Boolean(paid(name));
    } catch (error) {
      // Counted as paid: a paid call never runs unauthorized.
      onError(new Error(`paidTools(${JSON.stringify(name)}) threw, so the call is authorized first: ${error instanceof Error ? error.message : String(error)}`));
      return true;
    }
  };

  const boundary = (session: OpenSession, kind: "HEARTBEAT" | "SESSION_END") =>
    queue.push({
      idempotencyKey: randomUUID(),
      metricName: HEARTBEAT_METRIC,
      sessionId: session.sessionId,
      sessionBoundary: kind,
      occurredAt: new Date().toISOString(),
      ...(session.agentId ? { agentId: session.agentId } : {}),
    });

  // Runs only while a session is open: an idle meter holds no timer.
  let heartbeats: NodeJS.Timeout | undefined;
  const beat = () => {
    for (const ended of sessions.expire(performance.now())) boundary(ended, "SESSION_END");
    for (const session of sessions.list()) boundary(session, "HEARTBEAT");
    if (sessions.size === 0) stopBeating();
  };
  const startBeating = () => {
    if (heartbeats || closed) return;
    heartbeats = setInterval(beat, options.heartbeatIntervalMs ?? 30_000);
    heartbeats.unref();
  };
  const stopBeating = () => {
    clearInterval(heartbeats);
    heartbeats = undefined;
  };

  const track = <T>(work: Promise<T>): Promise<T> => {
    underway.add(work);
    const done = () => void underway.delete(work);
    work.then(done, done);
    return work;
  };
  const release = (name: string, nonce: string) =>
    track(
      transport.post(`/v1/authorize/${encodeURIComponent(nonce)}/release`, undefined).then((answer) => {
        if (answer.status !== 200 && answer.status !== 404) {
          onError(new Error(`release of ${name}'s authorization ${nonce} failed (${answer.status || answer.error?.message}); it lapses on its own`));
        }
      }),
    );

  const refusal = (message: string, terms?: PaymentTerms): CallToolResult => ({
    content: [{ type: "text", text: terms ? `${message}\n${JSON.stringify(terms)}` : message }],
    isError: true,
    ...(terms ? { _meta: { "mcp-meter/payment": terms } } : {}),
  });

  /** What stops the call before it runs, if anything; a throttle waits here. */
  const admit = async (
    name: string,
    key: string,
    session: string,
    agent: string | undefined,
    customer: string | undefined,
    signal: AbortSignal | undefined,
  ): Promise<Refusal | undefined> => {
    if (kills.has(session)) {
      return { result: refusal(`mcp-meter stopped session ${session} (a hard limit was reached); start a new session`) };
    }
    if (options.guard) {
      const query = new URLSearchParams({ toolName: name, sessionId: session, ...(agent ? { agentId: agent } : {}) });
      const answer = await transport.get(`/v1/guard/check?${query}`, { timeoutMs: options.guardTimeoutMs ?? 50 });
      const check = answer.body as { action?: string; retryAfterSeconds?: number; reason?: string } | undefined;
      if (answer.status !== 200 || !check) {
        onError(new Error(`mcp-meter guard check failed open (${answer.status === 0 ? answer.error?.message : answer.status}); the call runs`));
      } else if (check.action === "block") {
        // The reason may hold the operator's costs and margins (GET /v1/guard/states shows
        // them to the operator): the client is told the call is blocked, not why.
        return { result: refusal(`mcp-meter blocked ${name}: the operator's limits do not allow this call now; try again later`) };
      } else if (check.action === "throttle") {
        await sleep(Math.min((check.retryAfterSeconds ?? 1) * 1000, options.maxThrottleMs ?? 5000));
      }
    }
    if (signal?.aborted) return { result: refusal(`${name} was cancelled before it ran`) };
    if (isPaid(name)) {
      if (!customer) return { result: refusal(`${name} is a paid tool and the call names no customer to charge`) };
      const answer = await transport.post("/v1/authorize", {
        nonce: key,
        customerId: customer,
        toolName: name,
        ...(agent ? { agentId: agent } : {}),
        sessionId: session,
      });
      if (answer.status === 402) {
        const terms = answer.body as PaymentTerms;
        return { result: refusal(`payment required for ${name}: ${terms.message ?? terms.reason}`, terms) };
      }
      if (answer.status !== 200) {
        // No side effect before payment is secured: a paid call never runs unauthorized. With
        // no answer or a 5xx the reservation may exist all the same.
        const why = retriable(answer) ? "mcp-meter is unreachable" : `mcp-meter answered ${answer.status}`;
        onError(new Error(`authorization of ${name} failed: ${why}`));
        return { result: refusal(`${name} could not be authorized (${why}); try again`), release: answer.status === 0 || answer.status >= 500 };
      }
      // Authorized, but the client gave up meanwhile: the tool does not run, nothing is billed.
      if (signal?.aborted) return { result: refusal(`${name} was cancelled before it ran`), release: true };
    }
    return undefined;
  };

  const call = async (name: string, callback: Callback, params: unknown[]): Promise<unknown> => {
    const extra = (params[params.length - 1] ?? {}) as ToolExtra;
    const args = params.length > 1 ? params[0] : undefined;
    const session = extra.sessionId ?? connectionSession;
    const agent = agentOf(extra);
    const customer = guarded("customerId()", options.customerId, extra);
    for (const ended of sessions.touch(session, agent, performance.now())) boundary(ended, "SESSION_END");
    startBeating();
    // Made before the call and reused on every retry of its event: the authorization's nonce.
    const key = randomUUID();
    const refused = await admit(name, key, session, agent, customer, extra.signal);
    if (refused) {
      if (refused.release) void release(name, key);
      return refused.result;
    }
    const occurredAt = new Date().toISOString();
    const started = performance.now();
    let result: CallToolResult | undefined;
    let thrown: unknown;
    try {
      result = (await callback(...params)) as CallToolResult;
    } catch (error) {
      thrown = error;
    }
    const durationMs = Math.round(performance.now() - started);
    const status = extra.signal?.aborted ? "CANCELLED" : thrown !== undefined || result?.isError ? "ERROR" : "SUCCESS";
    const tokens = guarded(`tokens() for ${name}`, options.tokens, name, args, result);
    const event: UsageEvent = {
      idempotencyKey: key,
      metricName: CALL_METRIC,
      toolName: name,
      sessionId: session,
      occurredAt,
      executionStatus: status,
      executionDurationMs: durationMs,
      ...(agent ? { agentId: agent } : {}),
      ...(customer ? { customerId: customer } : {}),
      ...(tokens ? { metadata: { inputTokens: tokens.inputTokens, outputTokens: tokens.outputTokens } } : {}),
    };
    queue.push(event);
    if (thrown !== undefined) throw thrown;
    return result;
  };

  /**
   * `callback` metered under the tool's name as of each call (`update` may rename the tool). A
   * callback metered already is unwrapped first: wrapped twice, a call would be billed twice.
   */
  const meter = (tool: { name: string }, callback: Callback): Callback => {
    const original = ((callback as unknown as Record<symbol, Callback | undefined>)[METERED] ?? callback) as Callback;
    const metered: Callback = (...params: unknown[]) => {
      if (!closed) stopOnExit ??= beforeProcessEnds(atExit);
      return track(call(tool.name, original, params));
    };
    (metered as unknown as Record<symbol, Callback>)[METERED] = original;
    return metered;
  };

  /** A handler given later through the tool's `update` is metered too, under the name of the moment. */
  const follow = (registered: RegisteredTool, tool: { name: string }): RegisteredTool => {
    const update = registered.update;
    registered.update = (updates) => {
      if (typeof updates.name === "string") tool.name = updates.name;
      const callback = updates.callback as Callback | undefined;
      update(typeof callback === "function" ? { ...updates, callback: meter(tool, callback) as typeof updates.callback } : updates);
    };
    return registered;
  };

  // Tools registered from now on: the handler is the last argument of registerTool and of every
  // form of tool.
  const registering = (register: (...a: unknown[]) => RegisteredTool) => (...a: unknown[]): RegisteredTool => {
    const tool = { name: a[0] as string };
    const last = a.length - 1;
    if (typeof a[last] === "function") a[last] = meter(tool, a[last] as Callback);
    return follow(register(...a), tool);
  };
  const target = server as unknown as { registerTool: Callback; tool: Callback };
  target.registerTool = registering(server.registerTool.bind(server) as (...a: unknown[]) => RegisteredTool);
  target.tool = registering(server.tool.bind(server) as (...a: unknown[]) => RegisteredTool);
  // Tools registered before: McpServer has no public list of them, so the one private read is
  // here; each is then re-handled through its public `update`.
  const registered = (server as unknown as { _registeredTools?: Record<string, RegisteredTool> })._registeredTools ?? {};
  for (const [name, entry] of Object.entries(registered)) {
    follow(entry, { name });
    if (typeof entry.handler === "function") entry.update({ callback: entry.handler as Parameters<RegisteredTool["update"]>[0]["callback"] });
  }

  /**
   * Ends every session and delivers what the meter holds by `deadline`. The calls under way get
   * half of the time left at most, and what is queued goes out meanwhile: a call that never
   * settles costs neither the events before it nor the sessions' ends. `hard`: the passes
   * queued before (a user's longer flush) stop by `deadline` too.
   */
  const windDown = async (deadline: number, waitForCalls: boolean, hard: boolean, closeQueue = false) => {
    if (waitForCalls && underway.size > 0) {
      void queue.flush(true, deadline, hard);
      await settledBy([...underway], Date.now() + (deadline - Date.now()) / 2);
    }
    for (const ended of sessions.endAll()) boundary(ended, "SESSION_END");
    stopBeating();
    if (closeQueue) await queue.close(deadline);
    else await queue.flush(true, deadline, hard);
  };

  /** The events pushed so far, when the last exit flush ended with some undelivered. */
  let abandonedAt = -1;
  const pushed = () => {
    const s = queue.stats();
    return s.sent + s.failed + s.dropped + s.queued;
  };
  const atExit = async (reason: ExitReason, ending: boolean) => {
    if (closed) return;
    if (!ending) {
      // A signal the program handles (a SIGHUP that reloads): the server goes on, and so do its
      // sessions; what is queued is delivered, in case the program's handler ends the process.
      await queue.flush(true, Date.now() + exitFlushMs, true);
      return;
    }
    if (reason === "beforeExit") {
      // The loop is empty: nothing can move a call under way any more, and what an earlier exit
      // flush could not deliver is not tried again (or the process would never end).
      if (sessions.size === 0 && queue.stats().queued === 0) return;
      if (pushed() === abandonedAt) return;
    }
    await windDown(Date.now() + exitFlushMs, reason !== "beforeExit", true);
    if (queue.stats().queued > 0) abandonedAt = pushed();
  };
  // Registered while the meter holds something an exit would deliver (a call under way, an open
  // session, an event queued), and only then: a meter per connection, as Streamable HTTP servers
  // make them, must not stay in the process-wide set (with its server) once it holds nothing.
  let stopOnExit: (() => void) | undefined;
  const releaseIfIdle = () => {
    if (underway.size === 0 && sessions.size === 0 && queue.stats().queued === 0) {
      stopOnExit?.();
      stopOnExit = undefined;
    }
  };

  // The connection's end (the client closed stdin, an HTTP session was deleted, close()): its
  // sessions end and what they left is delivered. The handler found here runs first.
  const inner = server.server;
  const theirs = inner.onclose;
  inner.onclose = () => {
    try {
      theirs?.();
    } finally {
      if (!closed) {
        connectionSession = randomUUID();
        void windDown(Date.now() + exitFlushMs, true, false).then(releaseIfIdle);
      }
    }
  };

  const handle: MeteringHandle = {
    flush: (waitMs = 10_000) => queue.flush(true, Date.now() + waitMs),
    close: async (waitMs = 10_000) => {
      closed = true;
      stopOnExit?.();
      stopOnExit = undefined;
      await windDown(Date.now() + waitMs, true, true, true);
    },
    stats: () => queue.stats(),
    killedSessions: () => kills.list(),
  };
  (server as unknown as Record<symbol, MeteringHandle>)[METER] = handle;
  return handle;
}

/** The clientInfo name a request carries in its `_meta` (MCP 2026-07-28), if any. */
function clientInfoName(meta: Record<string, unknown> | undefined): string | undefined {
  const info = meta?.[CLIENT_INFO_META];
  const name = typeof info === "object" && info !== null ? (info as { name?: unknown }).name : undefined;
  return typeof name === "string" && name.length > 0 ? name : undefined;
}

/** Waits for every promise to settle, or until `deadline`, whichever comes first. */
async function settledBy(work: Promise<unknown>[], deadline: number): Promise<void> {
  if (work.length === 0) return;
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<void>((resolve) => (timer = setTimeout(resolve, Math.max(0, deadline - Date.now()))));
  await Promise.race([Promise.allSettled(work), late]);
  clearTimeout(timer);
}
