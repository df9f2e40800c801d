// Delivery: events wait in memory and go out in batches, by size or by interval. A batch that
// fails for a reason that may pass (no answer, 429, 5xx) is sent again, with the same events
// and so the same idempotency keys, after a backoff that honours Retry-After. A full queue
// drops its oldest event and counts it. Nothing here blocks a tool call.

import { Answer, Transport, retriable } from "./transport.js";

/** One usage event, as mcp-meter's wire format has it (camelCase). */
export interface UsageEvent {
  idempotencyKey: string;
  metricName: string;
  toolName?: string;
  agentId?: string;
  customerId?: string;
  sessionId?: string;
  occurredAt: string;
  executionStatus?: string;
  executionDurationMs?: number;
  sessionBoundary?: string;
  metadata?: Record<string, unknown>;
}

export interface QueueOptions {
  maxBatchSize: number;
  flushIntervalMs: number;
  maxQueue: number;
  /** First backoff; doubled per failure up to `maxBackoffMs`, unless Retry-After says more. */
  minBackoffMs: number;
  maxBackoffMs: number;
  onError: (error: Error) => void;
  /** Every ingest answer, for the kill lists it carries. */
  onAnswer: (body: unknown) => void;
}

export interface QueueStats {
  /** Events mcp-meter acknowledged (accepted or duplicates). */
  sent: number;
  /** Events mcp-meter refused (each named in its answer's `errors`, or a batch answered 4xx). */
  failed: number;
  /** Events dropped because the queue was full. */
  dropped: number;
  /** Events waiting now. */
  queued: number;
}

export class EventQueue {
  private events: UsageEvent[] = [];
  private stats_ = { sent: 0, failed: 0, dropped: 0 };
  private timer: NodeJS.Timeout | undefined;
  /** Flushes run one after another: each waits for the one before. */
  private chain: Promise<void> = Promise.resolve();
  private draining = false;
  private backoffMs = 0;
  private notBefore = 0;
  /** Once closed, no flush sends past this time, whatever its own deadline. */
  private closeDeadline = Infinity;

  constructor(
    private readonly transport: Transport,
    private readonly options: QueueOptions,
  ) {
    this.timer = setInterval(() => this.nudge(false), options.flushIntervalMs);
    this.timer.unref();
  }

  push(event: UsageEvent): void {
    if (this.events.length >= this.options.maxQueue) {
      this.events.shift();
      this.stats_.dropped += 1;
      this.options.onError(new Error(`mcp-meter: the queue is full (${this.options.maxQueue} events); the oldest was dropped`));
    }
    this.events.push(event);
    if (this.events.length >= this.options.maxBatchSize) this.nudge(true);
  }

  /**
   * A background pass, unless one is under way: by size (`onlyFull`: full batches only, the
   * rest waits for the interval) or by the interval (everything queued).
   */
  private nudge(onlyFull: boolean): void {
    if (this.draining) return;
    const run = this.chain.then(() => this.drain(false, Infinity, onlyFull));
    this.chain = run.catch(() => {});
  }

  stats(): QueueStats {
    return { ...this.stats_, queued: this.events.length };
  }

  /**
   * Sends what is queued. `untilEmpty`: keep sending (waiting out backoffs) until the queue is
   * empty or `deadline` passes; otherwise one pass that stops at the first retriable failure.
   */
  flush(untilEmpty = true, deadline = Infinity): Promise<void> {
    const run = this.chain.then(() => this.drain(untilEmpty, deadline));
    this.chain = run.catch(() => {});
    return run;
  }

  async close(deadline: number): Promise<void> {
    this.closeDeadline = deadline;
    if (this.timer) clearInterval(this.timer);
    await this.flush(true, deadline);
  }

  private async drain(untilEmpty: boolean, deadline: number, onlyFull = false): Promise<void> {
    this.draining = true;
    try {
      await this.send(untilEmpty, Math.min(deadline, this.closeDeadline), onlyFull);
    } finally {
      this.draining = false;
    }
  }

  private async send(untilEmpty: boolean, deadline: number, onlyFull: boolean): Promise<void> {
    while (this.events.length > 0) {
      if (onlyFull && this.events.length < this.options.maxBatchSize) return;
      const limit = Math.min(deadline, this.closeDeadline);
      const wait = this.notBefore - Date.now();
      if (wait > 0) {
        if (!untilEmpty || Date.now() + wait > limit) return;
        await sleep(wait);
      }
      const batch = this.events.slice(0, this.options.maxBatchSize);
      const answer = await this.transport.post("/v1/ingest/batch", { events: batch });
      if (retriable(answer)) {
        this.backoffMs = Math.min(
          Math.max(this.backoffMs * 2, this.options.minBackoffMs),
          this.options.maxBackoffMs,
        );
        this.notBefore = Date.now() + Math.max(this.backoffMs, answer.retryAfterMs ?? 0);
        this.options.onError(describe(answer, batch.length));
        continue;
      }
      this.backoffMs = 0;
      this.notBefore = 0;
      // The batch is answered: it leaves the queue whatever the answer (events pushed while it
      // was in flight stay behind it).
      this.events.splice(0, batch.length);
      if (answer.status === 202) {
        const body = answer.body as { accepted?: number; duplicates?: number; failed?: number; errors?: unknown[] };
        this.stats_.sent += (body.accepted ?? 0) + (body.duplicates ?? 0);
        this.stats_.failed += body.failed ?? 0;
        if ((body.failed ?? 0) > 0) {
          this.options.onError(new Error(`mcp-meter refused ${body.failed} events: ${JSON.stringify(body.errors)}`));
        }
        this.options.onAnswer(answer.body);
      } else {
        this.stats_.failed += batch.length;
        this.options.onError(describe(answer, batch.length));
      }
    }
  }
}

function describe(answer: Answer, events: number): Error {
  if (answer.status === 0) {
    return new Error(`mcp-meter unreachable (${events} events kept for retry): ${answer.error?.message ?? "no answer"}`);
  }
  const message = (answer.body as { message?: string } | undefined)?.message ?? JSON.stringify(answer.body);
  return new Error(`mcp-meter answered ${answer.status} to ${events} events: ${message}`);
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
