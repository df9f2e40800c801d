// withMetering: every tool of an McpServer, registered before or after, is metered: one usage
// event per call, and, when asked, a guard check or an authorization before the handler runs.

import { randomUUID } from "node:crypto";
import type { McpServer } from "@modelcontextprotocol/sdk/server/mcp.js";
import type { CallToolResult } from "@modelcontextprotocol/sdk/types.js";
import { EventQueue, QueueStats, UsageEvent, sleep } from "./queue.js";
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
  /** The agent; default: the MCP client's `initialize` clientInfo name. */
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
  /** Events held in memory at most; beyond, the oldest is dropped. Default 10000. */
  maxQueue?: number;
  /** Heartbeats per open session. Default 30000. */
  heartbeatIntervalMs?: number;
  /** Per request to mcp-meter (batches, authorizations). Default 10000. */
  requestTimeoutMs?: number;
  /** Called with what went wrong; metering never throws into a tool call. */
  onError?: (error: Error) => void;
}

export interface MeteringHandle {
  /** Sends every queued event now, retrying until they are acknowledged or `waitMs` (default 10000) has passed. */
  flush(waitMs?: number): Promise<void>;
  /** Stops the timers, sends SESSION_END for every open session, and flushes (at most `waitMs`, default 10000). */
  close(waitMs?: number): Promise<void>;
  stats(): QueueStats;
  /** Sessions mcp-meter asked to stop, as of the last answer. */
  killedSessions(): string[];
}

const HEARTBEAT_METRIC = "system.session.heartbeat";
const CALL_METRIC = "mcp_server.tool_invocations";

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
 * Meters every tool of `server`: those registered already and those registered later (it wraps
 * `registerTool` and the older `tool`).
 */
export function withMetering(server: McpServer, options: MeteringOptions): MeteringHandle {
  const onError = options.onError ?? (() => {});
  const maxBatchSize = Math.min(options.maxBatchSize ?? 100, 1000);
  const transport = new Transport({
    url: options.url,
    apiKey: options.apiKey,
    timeoutMs: options.requestTimeoutMs ?? 10_000,
  });
  let killed = new Set<string>();
  const readKills = (body: unknown) => {
    const ids = (body as { killedSessionIds?: unknown } | undefined)?.killedSessionIds;
    if (Array.isArray(ids)) killed = new Set(ids.filter((id): id is string => typeof id === "string"));
  };
  const queue = new EventQueue(transport, {
    maxBatchSize,
    flushIntervalMs: options.flushIntervalMs ?? 1000,
    maxQueue: options.maxQueue ?? 10_000,
    minBackoffMs: 100,
    maxBackoffMs: 30_000,
    onError,
    onAnswer: readKills,
  });
  // stdio and in-memory transports have no session id: one per server instance.
  const instanceSession = randomUUID();
  const openSessions = new Map<string, string | undefined>();
  const agentOf = (extra: ToolExtra) =>
    options.agentId?.(extra) ?? server.server.getClientVersion()?.name;
  const isPaid = (name: string) =>
    typeof options.paidTools === "function"
      ? options.paidTools(name)
      : (options.paidTools ?? []).includes(name);

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
  ): Promise<CallToolResult | undefined> => {
    if (killed.has(session)) {
      return refusal(`mcp-meter stopped session ${session} (a hard limit was reached); start a new session`);
    }
    if (options.guard) {
      const query = new URLSearchParams({ toolName: name, sessionId: session, ...(agent ? { agentId: agent } : {}) });
      const answer = await transport.get(`/v1/guard/check?${query}`, options.guardTimeoutMs ?? 50);
      const check = answer.body as { action?: string; retryAfterSeconds?: number; reason?: string } | undefined;
      if (answer.status !== 200 || !check) {
        onError(new Error(`mcp-meter guard check failed open (${answer.status === 0 ? answer.error?.message : answer.status}); the call runs`));
      } else if (check.action === "block") {
        return refusal(`mcp-meter blocked ${name}: ${check.reason ?? "margin below its floor"}`);
      } else if (check.action === "throttle") {
        await sleep(Math.min((check.retryAfterSeconds ?? 1) * 1000, options.maxThrottleMs ?? 5000));
      }
    }
    if (isPaid(name)) {
      if (!customer) return refusal(`${name} is a paid tool and the call names no customer to charge`);
      const answer = await transport.post("/v1/authorize", {
        nonce: key,
        customerId: customer,
        toolName: name,
        ...(agent ? { agentId: agent } : {}),
        sessionId: session,
      });
      if (answer.status === 402) {
        const terms = answer.body as PaymentTerms;
        return refusal(`payment required for ${name}: ${terms.message ?? terms.reason}`, terms);
      }
      if (answer.status !== 200) {
        // No side effect before payment is secured: a paid call never runs unauthorized.
        const why = retriable(answer) ? "mcp-meter is unreachable" : `mcp-meter answered ${answer.status}`;
        onError(new Error(`authorization of ${name} failed: ${why}`));
        return refusal(`${name} could not be authorized (${why}); try again`);
      }
    }
    return undefined;
  };

  const meter = (name: string, callback: Callback): Callback =>
    async (...params: unknown[]) => {
      const extra = (params[params.length - 1] ?? {}) as ToolExtra;
      const args = params.length > 1 ? params[0] : undefined;
      const session = extra.sessionId ?? instanceSession;
      const agent = agentOf(extra);
      const customer = options.customerId?.(extra);
      openSessions.set(session, agent);
      // Made before the call and reused on every retry of its event: the authorization's nonce.
      const key = randomUUID();
      const refused = await admit(name, key, session, agent, customer);
      if (refused) return refused;
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
      const status = extra.signal?.aborted
        ? "CANCELLED"
        : thrown !== undefined || result?.isError
          ? "ERROR"
          : "SUCCESS";
      let tokens: TokenCounts | undefined;
      try {
        tokens = options.tokens?.(name, args, result);
      } catch (error) {
        onError(new Error(`tokens() threw for ${name}: ${String(error)}`));
      }
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

  // The handler is always the last argument of registerTool and of every form of tool.
  const wrapLast = (name: string, rest: unknown[]) => {
    const last = rest.length - 1;
    if (typeof rest[last] === "function") rest[last] = meter(name, rest[last] as Callback);
    return rest;
  };
  const registerTool = server.registerTool.bind(server) as (...a: unknown[]) => unknown;
  const tool = server.tool.bind(server) as (...a: unknown[]) => unknown;
  (server as unknown as { registerTool: Callback }).registerTool = (...a: unknown[]) =>
    registerTool(...wrapLast(a[0] as string, a));
  (server as unknown as { tool: Callback }).tool = (...a: unknown[]) => tool(...wrapLast(a[0] as string, a));
  // Tools registered before withMetering: their handlers are wrapped in place.
  const registered = (server as unknown as { _registeredTools?: Record<string, { handler?: Callback; callback?: Callback }> })._registeredTools ?? {};
  for (const [name, entry] of Object.entries(registered)) {
    if (typeof entry.handler === "function") entry.handler = meter(name, entry.handler);
    else if (typeof entry.callback === "function") entry.callback = meter(name, entry.callback);
  }

  const heartbeat = (boundary: string) => {
    for (const [session, agent] of openSessions) {
      queue.push({
        idempotencyKey: randomUUID(),
        metricName: HEARTBEAT_METRIC,
        sessionId: session,
        sessionBoundary: boundary,
        occurredAt: new Date().toISOString(),
        ...(agent ? { agentId: agent } : {}),
      });
    }
  };
  const heartbeats = setInterval(() => heartbeat("HEARTBEAT"), options.heartbeatIntervalMs ?? 30_000);
  heartbeats.unref();

  return {
    flush: (waitMs = 10_000) => queue.flush(true, Date.now() + waitMs),
    close: async (waitMs = 10_000) => {
      clearInterval(heartbeats);
      heartbeat("SESSION_END");
      openSessions.clear();
      await queue.close(Date.now() + waitMs);
    },
    stats: () => queue.stats(),
    killedSessions: () => [...killed].sort(),
  };
}
