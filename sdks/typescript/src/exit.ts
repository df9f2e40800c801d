// Before the process ends, every meter flushes. Two ways a Node process ends are seen here:
// its event loop empties (`beforeExit`: a stdio server whose client closed stdin ends so, as
// the meter's timers are unref'd), and SIGINT, SIGTERM or SIGHUP. `process.exit()` is not: it
// runs no asynchronous work, so whoever calls it awaits `close()` first.
//
// A signal no one else acts on is re-raised once the meters have flushed (or given up), so the
// process ends as the signal's default would (status 128 + its number); the hooks are told it
// ends. A signal the program listens for itself is the program's to act on (a SIGHUP that
// reloads, a SIGTERM that drains first): the hooks are told the process goes on, and nothing
// else happens. A second identical signal during the flush re-raises at once.
//
// Listeners that only re-raise do not count as the program's: signal-exit's (v3 and v4, which
// execa, ink, write-file-atomic and others load; each acts only when its kind are the only
// listeners left, and counts them on a shared emitter) and those of other copies of this
// module. Counting them would leave each waiting for the other and the signal would end
// nothing. Every copy of this module in the process (two versions installed side by side, a
// bundle) shares one registry on `globalThis`: one listener per event for the whole process,
// whatever the number of meters and copies.

/**
 * What a meter does before the process ends, or on a signal the program handles (`ending`
 * false: the process goes on); settles by the meter's own deadline.
 */
export type ExitHook = (reason: ExitReason, ending: boolean) => Promise<void>;
export type ExitReason = "beforeExit" | "SIGINT" | "SIGTERM" | "SIGHUP";

const SIGNALS = ["SIGINT", "SIGTERM", "SIGHUP"] as const;

/** Shared by every copy of this module; its shape is fixed by the version in the key. */
interface Registry {
  hooks: Set<ExitHook>;
  installed: boolean;
  pending: ExitReason | undefined;
}
const REGISTRY = Symbol.for("mcp-meter-sdk/exit/v1");
/** Marks a listener that only re-raises its signal once its work is done. */
const RERAISES = Symbol.for("mcp-meter-sdk/reraises");
const registry: Registry = ((globalThis as { [REGISTRY]?: Registry })[REGISTRY] ??= {
  hooks: new Set(),
  installed: false,
  pending: undefined,
});

/** Runs `hook` before the process ends, until the answered function removes it. */
export function beforeProcessEnds(hook: ExitHook): () => void {
  registry.hooks.add(hook);
  if (!registry.installed) {
    registry.installed = true;
    process.on("beforeExit", onBeforeExit);
    for (const signal of SIGNALS) process.on(signal, onSignal);
  }
  return () => void registry.hooks.delete(hook);
}

/** The hooks registered now, in every copy of this module. */
export function exitHooks(): number {
  return registry.hooks.size;
}

async function runHooks(reason: ExitReason, ending: boolean): Promise<void> {
  await Promise.allSettled([...registry.hooks].map(async (hook) => hook(reason, ending)));
}

function onBeforeExit(): void {
  // The hooks' requests keep the loop alive; once they end, `beforeExit` comes again and each
  // hook finds nothing new to do, so the process ends.
  void runHooks("beforeExit", true);
}

function onSignal(signal: NodeJS.Signals): void {
  const reason = signal as (typeof SIGNALS)[number];
  const ending = !programListens(signal);
  if (registry.pending === reason && ending) return reraise(signal);
  registry.pending = reason;
  void runHooks(reason, ending).then(() => {
    registry.pending = undefined;
    if (ending) reraise(signal);
  });
}
(onSignal as unknown as Record<symbol, boolean>)[RERAISES] = true;

/** Whether a listener other than those that only re-raise is there for `signal`. */
function programListens(signal: NodeJS.Signals): boolean {
  const others = process.listeners(signal).filter((listener) => !(listener as unknown as Record<symbol, unknown>)[RERAISES]);
  return others.length > signalExitListeners();
}

/**
 * signal-exit's listeners per signal: one per loaded copy, counted on its shared emitter (v4 on
 * `globalThis[Symbol.for("signal-exit emitter")]`, v3 on `process.__signal_exit_emitter__`).
 */
function signalExitListeners(): number {
  const v4 = (globalThis as { [k: symbol]: { count?: unknown } | undefined })[Symbol.for("signal-exit emitter")]?.count;
  const v3 = (process as unknown as { __signal_exit_emitter__?: { count?: unknown } }).__signal_exit_emitter__?.count;
  return (typeof v4 === "number" ? v4 : 0) + (typeof v3 === "number" ? v3 : 0);
}

/**
 * Our listener leaves and the signal comes again: with no listener left it ends the process;
 * with signal-exit's alone, signal-exit now finds itself the only one, runs its handlers and
 * re-raises in turn.
 */
function reraise(signal: NodeJS.Signals): void {
  process.removeListener(signal, onSignal);
  process.kill(process.pid, signal);
}
