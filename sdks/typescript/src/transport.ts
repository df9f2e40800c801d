// The HTTP side: one POST or GET to mcp-meter, answered with its status, its JSON body and
// how long the server asked to wait (Retry-After). Node's own fetch; no other dependency.

/** What mcp-meter answered. `status` 0: no answer (network error, timeout or abort). */
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

/** A request's own bounds: a shorter timeout than the transport's, a signal that cuts it. */
export interface RequestOptions {
  timeoutMs?: number;
  signal?: AbortSignal;
}

/** What the queue needs of a transport (a fake in the queue's simulation). */
export interface Poster {
  post(path: string, body: unknown, options?: RequestOptions): Promise<Answer>;
}

export class Transport implements Poster {
  private readonly base: string;

  constructor(private readonly options: TransportOptions) {
    this.base = options.url.replace(/\/+$/, "");
  }

  async post(path: string, body: unknown, options: RequestOptions = {}): Promise<Answer> {
    return this.send("POST", path, body === undefined ? undefined : JSON.stringify(body), options);
  }

  async get(path: string, options: RequestOptions = {}): Promise<Answer> {
    return this.send("GET", path, undefined, options);
  }

  private async send(method: string, path: string, body: string | undefined, options: RequestOptions): Promise<Answer> {
    const timeoutMs = Math.min(options.timeoutMs ?? Infinity, this.options.timeoutMs);
    const abort = new AbortController();
    // Unref'd: a request on the wire keeps the process alive by its socket, not by its timer.
    const timer = setTimeout(() => abort.abort(new Error(`no answer within ${timeoutMs} ms`)), timeoutMs);
    timer.unref();
    const cut = () => abort.abort(options.signal?.reason ?? new Error("aborted"));
    if (options.signal?.aborted) cut();
    options.signal?.addEventListener("abort", cut, { once: true });
    try {
      const answer = await fetch(this.base + path, {
        method,
        headers: {
          "X-API-Key": this.options.apiKey,
          ...(body === undefined ? {} : { "Content-Type": "application/json" }),
        },
        body,
        signal: abort.signal,
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
    } finally {
      clearTimeout(timer);
      options.signal?.removeEventListener("abort", cut);
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
