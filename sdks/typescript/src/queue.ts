// Delivery: events wait in memory and go out in batches, by size or by interval. A batch that
// fails for a reason that may pass (no answer, 429, 5xx) is sent again, with the same events
// and so the same idempotency keys, after a backoff that honours Retry-After. Nothing here
// blocks a tool call.
//
// Every event pushed ends in exactly one count: `sent` (acknowledged), `failed` (refused),
// `dropped` (the bound) or `queued` (held now), so sent + failed + dropped + queued = pushed
// at every instant. A batch on the wire is out of the bound's reach: it leaves the waiting
// list when it is sent, and a retriable failure puts it back at the front, in order. The
// bound (`maxQueue`) counts every event held, waiting or on the wire; a full queue drops its
// oldest *waiting* event, or the new one when every event held is on the wire. An event on
// the wire may be stored already, so only its answer may count it.

import { Answer, Poster, retriable } from "./transport.js";

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
  /** Every 202 and the batch it answers: its kill list speaks for the sessions the batch named. */
  onAnswer: (body: unknown, batch: readonly UsageEvent[]) => void;
  /** Each event the bound drops, as it drops it. */
  onDropped?: (event: UsageEvent) => void;
  /** A pass ended with nothing held (nothing waiting, nothing on the wire). */
  onEmpty?: () => void;
}

export interface QueueStats {
  /** Events mcp-meter acknowledged (accepted or duplicates). */
  sent: number;
  /** Events mcp-meter refused (each named in its answer's `errors`, or a batch answered 4xx). */
  failed: number;
  /** Events dropped because the queue was full. */
  dropped: number;
  /** Events held now: waiting, or on the wire awaiting their answer. */
  queued: number;
}

export class EventQueue {
  private waiting: UsageEvent[] = [];
  /** The batch on the wire; its answer decides its events' counts. */
  private onWire: UsageEvent[] = [];
  private wire: AbortController | undefined;
  private counts = { sent: 0, failed: 0, dropped: 0 };
  /** The next pass by interval, armed only while events wait: an idle queue holds no timer. */
  private timer: NodeJS.Timeout | undefined;
  /** Passes run one after another: each waits for the one before. */
  private chain: Promise<void> = Promise.resolve();
  private draining = false;
  private backoffMs = 0;
  private notBefore = 0;
  private closed = false;
  /**
   * The deadlines of the hard flushes not yet settled (close, the exit hook's): while one is
   * pending, every pass, its own or one queued before it, stops by then.
   */
  private hardDeadlines: number[] = [];
  /** Ends the backoff a pass is sleeping through, so that it meets a hard deadline set meanwhile. */
  private wake: (() => void) | undefined;

  constructor(
    private readonly transport: Poster,
    private readonly options: QueueOptions,
  ) {}

  push(event: UsageEvent): void {
    if (this.waiting.length + this.onWire.length >= this.options.maxQueue) {
      const victim = this.waiting.length > 0 ? this.waiting.shift()! : event;
      this.counts.dropped += 1;
      this.options.onDropped?.(victim);
      this.options.onError(new Error(`mcp-meter: the queue is full (${this.options.maxQueue} events); the oldest waiting was dropped`));
      if (victim === event) return;
    }
    this.waiting.push(event);
    if (this.waiting.length >= this.options.maxBatchSize) this.nudge(true);
    else this.arm();
  }

  stats(): QueueStats {
    return { ...this.counts, queued: this.waiting.length + this.onWire.length };
  }

  /**
   * Sends what is queued. `untilEmpty`: keep sending (waiting out backoffs) until nothing waits
   * or `deadline` passes; otherwise one pass that stops at the first retriable failure. A
   * request still on the wire at `deadline` is cut (its events wait again), so the promise
   * settles by then. `hard`: until this flush settles, the passes queued before it (a flush
   * with a later deadline, a pass sleeping through a backoff) stop by `deadline` too, so it
   * settles by then whatever ran before it; the bound ends with it.
   */
  flush(untilEmpty = true, deadline = Infinity, hard = false): Promise<void> {
    if (hard) {
      this.hardDeadlines.push(deadline);
      this.wake?.();
    }
    const run = this.chain.then(() => this.drain(untilEmpty, deadline, false));
    this.chain = run.catch(() => {});
    const settled = () => {
      if (hard) this.hardDeadlines.splice(this.hardDeadlines.indexOf(deadline), 1);
    };
    if (deadline === Infinity) return run.finally(settled);
    const cut = setTimeout(() => this.wire?.abort(new Error("the flush's deadline passed")), Math.max(0, deadline - Date.now()));
    return run.finally(() => {
      clearTimeout(cut);
      settled();
    });
  }

  /**
   * No more timers; sends what is queued until `deadline` (a hard flush). Later pushes wait for
   * a flush, which sends as any flush does.
   */
  async close(deadline: number): Promise<void> {
    this.closed = true;
    clearTimeout(this.timer);
    this.timer = undefined;
    await this.flush(true, deadline, true);
  }

  /** The pass by interval. Unref'd: a queue never keeps the process alive on its own. */
  private arm(): void {
    if (this.timer || this.closed || this.waiting.length === 0) return;
    this.timer = setTimeout(() => {
      this.timer = undefined;
      this.nudge(false);
    }, this.options.flushIntervalMs);
    this.timer.unref();
  }

  /**
   * A background pass, unless one is under way: by size (`onlyFull`: full batches only, the
   * rest waits for the interval) or by the interval (everything waiting).
   */
  private nudge(onlyFull: boolean): void {
    if (this.draining) return;
    const run = this.chain.then(() => this.drain(false, Infinity, onlyFull));
    this.chain = run.catch(() => {});
  }

  private async drain(untilEmpty: boolean, deadline: number, onlyFull: boolean): Promise<void> {
    this.draining = true;
    try {
      await this.send(untilEmpty, deadline, onlyFull);
    } finally {
      this.draining = false;
      this.arm();
    }
    if (this.waiting.length === 0 && this.onWire.length === 0) this.options.onEmpty?.();
  }

  /** Sleeps `ms`, or less when a hard flush comes meanwhile. */
  private async backoff(ms: number): Promise<void> {
    let timer: NodeJS.Timeout | undefined;
    await new Promise<void>((resolve) => {
      this.wake = resolve;
      timer = setTimeout(resolve, ms);
    });
    clearTimeout(timer);
    this.wake = undefined;
  }

  private async send(untilEmpty: boolean, deadline: number, onlyFull: boolean): Promise<void> {
    while (this.waiting.length > 0) {
      if (onlyFull && this.waiting.length < this.options.maxBatchSize) return;
      const limit = Math.min(deadline, ...this.hardDeadlines);
      if (Date.now() >= limit) return;
      const wait = this.notBefore - Date.now();
      if (wait > 0) {
        if (!untilEmpty || Date.now() + wait > limit) return;
        await this.backoff(wait);
        // Woken early by a hard flush: its deadline is checked again.
        if (this.notBefore > Date.now()) continue;
      }
      const batch = this.waiting.splice(0, this.options.maxBatchSize);
      this.onWire = batch;
      this.wire = new AbortController();
      let answer: Answer;
      try {
        answer = await this.transport.post("/v1/ingest/batch", { events: batch }, {
          signal: this.wire.signal,
          ...(limit === Infinity ? {} : { timeoutMs: Math.max(1, limit - Date.now()) }),
        });
      } catch (error) {
        // A transport answers failures as status 0; should one throw, the batch is kept all the same.
        answer = { status: 0, body: undefined, error: error instanceof Error ? error : new Error(String(error)) };
      } finally {
        this.onWire = [];
        this.wire = undefined;
      }
      if (retriable(answer)) {
        this.waiting.unshift(...batch);
        this.backoffMs = Math.min(Math.max(this.backoffMs * 2, this.options.minBackoffMs), this.options.maxBackoffMs);
        this.notBefore = Date.now() + Math.max(this.backoffMs, answer.retryAfterMs ?? 0);
        this.options.onError(describe(answer, batch.length));
        if (!untilEmpty) return;
        continue;
      }
      this.backoffMs = 0;
      this.notBefore = 0;
      if (answer.status === 202) {
        const body = (answer.body ?? {}) as { accepted?: number; duplicates?: number; failed?: number; errors?: unknown[] };
        // Counted from the batch, not from the answer's `failed`: each event once, whatever a
        // server that miscounts says.
        const acknowledged = Math.min(batch.length, count(body.accepted) + count(body.duplicates));
        this.counts.sent += acknowledged;
        this.counts.failed += batch.length - acknowledged;
        if (acknowledged < batch.length) {
          this.options.onError(new Error(`mcp-meter refused ${batch.length - acknowledged} events: ${JSON.stringify(body.errors)}`));
        }
        this.options.onAnswer(answer.body, batch);
      } else {
        this.counts.failed += batch.length;
        this.options.onError(describe(answer, batch.length));
      }
    }
  }
}

function count(n: unknown): number {
  return typeof n === "number" && Number.isFinite(n) && n > 0 ? Math.floor(n) : 0;
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
