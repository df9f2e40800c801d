// The sessions a meter has seen calls in: what heartbeats go to and what SESSION_END closes.
// A session ends when its transport closes, when it has had no call for `idleMs`, or, past
// `max` sessions, the one whose last call is oldest first. Pure bookkeeping, no timers.

export interface OpenSession {
  sessionId: string;
  agentId?: string;
}

export class Sessions {
  /** In order of their last call, oldest first (a Map keeps insertion order). */
  private open = new Map<string, { agentId?: string; lastCallAt: number }>();

  constructor(
    private readonly idleMs: number,
    private readonly max: number,
  ) {}

  get size(): number {
    return this.open.size;
  }

  /** A call in `sessionId` at `now`; answers the sessions this pushes past `max`, removed. */
  touch(sessionId: string, agentId: string | undefined, now: number): OpenSession[] {
    this.open.delete(sessionId);
    this.open.set(sessionId, { agentId, lastCallAt: now });
    const ended: OpenSession[] = [];
    for (const [id, session] of this.open) {
      if (this.open.size <= this.max) break;
      this.open.delete(id);
      ended.push({ sessionId: id, agentId: session.agentId });
    }
    return ended;
  }

  /** The sessions with no call since `now - idleMs`, removed. */
  expire(now: number): OpenSession[] {
    const ended: OpenSession[] = [];
    for (const [id, session] of this.open) {
      if (now - session.lastCallAt < this.idleMs) break;
      this.open.delete(id);
      ended.push({ sessionId: id, agentId: session.agentId });
    }
    return ended;
  }

  /** Every open session, removed. */
  endAll(): OpenSession[] {
    const ended = this.list();
    this.open.clear();
    return ended;
  }

  list(): OpenSession[] {
    return [...this.open].map(([sessionId, { agentId }]) => ({ sessionId, agentId }));
  }
}
