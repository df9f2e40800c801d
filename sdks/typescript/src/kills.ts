// The sessions mcp-meter said to stop. An ingest answer (a heartbeat's too: a heartbeat is an
// ingest event) lists the killed sessions among those its batch named, so it speaks for those
// alone: a session it lists is killed; a session the batch named and the answer does not list
// is not (its kill ended with its limit's window); every other session keeps what an earlier
// answer said. The proxy's `Kills` (proxy/src/meter.rs) follows the same rule. Pure
// bookkeeping, no timers.

/** Kills remembered at most, as the proxy; past it, the one listed longest ago is forgotten. */
export const MAX_KILLED_SESSIONS = 100_000;

export class Kills {
  /** In order of when an answer last listed them, oldest first (a Set keeps insertion order). */
  private killed = new Set<string>();

  constructor(private readonly max = MAX_KILLED_SESSIONS) {}

  get size(): number {
    return this.killed.size;
  }

  has(sessionId: string): boolean {
    return this.killed.has(sessionId);
  }

  /** Applies one answer: `named` are the sessions of its batch, `listed` its killed sessions. */
  merge(named: Iterable<string>, listed: readonly string[]): void {
    const kills = new Set(listed);
    for (const session of named) if (!kills.has(session)) this.killed.delete(session);
    // Every session listed is killed: those of the batch and, from a server older than
    // per-batch answers, every other kill of the tenant.
    for (const session of listed) {
      this.killed.delete(session);
      this.killed.add(session);
    }
    // A forgotten kill lets its session's calls through until an answer lists it again.
    for (const session of this.killed) {
      if (this.killed.size <= this.max) break;
      this.killed.delete(session);
    }
  }

  /** Sorted. */
  list(): string[] {
    return [...this.killed].sort();
  }
}

/**
 * The killed sessions a 202's body lists, or undefined when it has no list to read (not JSON,
 * no `killedSessionIds` array): such an answer says nothing about kills, so it changes none.
 */
export function listedKills(body: unknown): string[] | undefined {
  const ids = typeof body === "object" && body !== null ? (body as { killedSessionIds?: unknown }).killedSessionIds : undefined;
  return Array.isArray(ids) ? ids.filter((id): id is string => typeof id === "string") : undefined;
}
