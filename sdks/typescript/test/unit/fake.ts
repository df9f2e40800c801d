// A small stand-in for mcp-meter's HTTP API: records what it receives, answers what each test
// scripts. Unit tests only; the end-to-end tests run against the real `mcp-meter serve`.

import { createServer, IncomingMessage, ServerResponse, Server } from "node:http";
import type { AddressInfo } from "node:net";

export interface Received {
  method: string;
  path: string;
  body: any;
  at: number;
}

/** Answers a request: status, body, headers; `"drop"` cuts the connection without answering. */
export type Script = (req: Received, n: number) =>
  | { status: number; body?: unknown; headers?: Record<string, string>; delayMs?: number }
  | "drop";

export class FakeMeter {
  readonly received: Received[] = [];
  private server: Server;
  url = "";

  constructor(private script: Script = defaultScript) {
    this.server = createServer((req, res) => void this.handle(req, res));
  }

  static async start(script?: Script): Promise<FakeMeter> {
    const fake = new FakeMeter(script);
    await new Promise<void>((resolve) => fake.server.listen(0, "127.0.0.1", resolve));
    fake.url = `http://127.0.0.1:${(fake.server.address() as AddressInfo).port}`;
    return fake;
  }

  /** Every event of every ingest request, in arrival order (retries included). */
  events(): any[] {
    return this.received.filter((r) => r.path === "/v1/ingest/batch").flatMap((r) => r.body.events);
  }

  async stop(): Promise<void> {
    this.server.closeAllConnections();
    await new Promise((resolve) => this.server.close(resolve));
  }

  private async handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    let text = "";
    for await (const chunk of req) text += chunk;
    const received: Received = {
      method: req.method ?? "",
      path: req.url ?? "",
      body: text ? JSON.parse(text) : undefined,
      at: Date.now(),
    };
    this.received.push(received);
    const answer = this.script(received, this.received.length);
    if (answer === "drop") {
      req.socket.destroy();
      return;
    }
    if (answer.delayMs) await new Promise((r) => setTimeout(r, answer.delayMs));
    res.writeHead(answer.status, { "Content-Type": "application/json", ...answer.headers });
    res.end(answer.body === undefined ? "" : JSON.stringify(answer.body));
  }
}

/** The sessions a request's events name. */
export function named(req: Received): Set<string> {
  const events: { sessionId?: unknown }[] = req.body?.events ?? [];
  return new Set(events.flatMap((e) => (typeof e.sessionId === "string" ? [e.sessionId] : [])));
}

/**
 * A 202 for every event. Its `killedSessionIds` are those of `killed` that the request names, as
 * mcp-meter answers: the killed sessions among the batch's, not every kill of the tenant.
 */
export function accepted(req: Received, killed: Iterable<string> = []) {
  const n = req.body?.events?.length ?? 0;
  const sessions = named(req);
  const listed = [...killed].filter((s) => sessions.has(s));
  return { status: 202, body: { accepted: n, duplicates: 0, failed: 0, errors: [], killedSessionIds: listed } };
}

export const defaultScript: Script = (req) =>
  req.path.startsWith("/v1/ingest") ? accepted(req) : { status: 404, body: { error: "not_found" } };
