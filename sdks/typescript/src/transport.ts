// The HTTP side: one POST or GET to mcp-meter, answered with its status, its JSON body and
// how long the server asked to wait (Retry-After). Node's own fetch; no other dependency.

/** What mcp-meter answered. `status` 0: no answer (network error or timeout). */
export interface Answer {
  status: number;
  body: unknown;
  /** Retry-After in ms, when the answer carried one. */
  retryAfterMs?: number;
  /** The network error, when there was no answer. */
  error?: Error;
}

export interface TransportOptions {
  url: string;
  apiKey: string;
  /** Per request; past it the request counts as a network error. */
  timeoutMs: number;
}

export class Transport {
  private readonly base: string;

  constructor(private readonly options: TransportOptions) {
    this.base = options.url.replace(/\/+$/, "");
  }

  async post(path: string, body: unknown, timeoutMs = this.options.timeoutMs): Promise<Answer> {
    return this.send("POST", path, body === undefined ? undefined : JSON.stringify(body), timeoutMs);
  }

  async get(path: string, timeoutMs = this.options.timeoutMs): Promise<Answer> {
    return this.send("GET", path, undefined, timeoutMs);
  }

  private async send(
    method: string,
    path: string,
    body: string | undefined,
    timeoutMs: number,
  ): Promise<Answer> {
    try {
      const answer = await fetch(this.base + path, {
        method,
        headers: {
          "X-API-Key": this.options.apiKey,
          ...(body === undefined ? {} : { "Content-Type": "application/json" }),
        },
        body,
        signal: AbortSignal.timeout(timeoutMs),
      });
      const text = await answer.text();
      let parsed: unknown = text;
      try {
        parsed = text.length > 0 ? JSON.parse(text) : undefined;
      } catch {
        // Not JSON (a proxy's error page): keep the text for the error message.
      }
      return { status: answer.status, body: parsed, retryAfterMs: retryAfterMs(answer.headers.get("retry-after")) };
    } catch (error) {
      return { status: 0, body: undefined, error: error instanceof Error ? error : new Error(String(error)) };
    }
  }
}

/** Retry-After as seconds or as an HTTP date, in ms. */
export function retryAfterMs(header: string | null, now = Date.now()): number | undefined {
  if (header === null) return undefined;
  const seconds = Number(header);
  if (Number.isFinite(seconds) && seconds >= 0) return seconds * 1000;
  const at = Date.parse(header);
  return Number.isNaN(at) ? undefined : Math.max(0, at - now);
}

/** Whether trying the same request again later can succeed: no answer, 429, or 5xx. */
export function retriable(answer: Answer): boolean {
  return answer.status === 0 || answer.status === 429 || answer.status >= 500;
}
