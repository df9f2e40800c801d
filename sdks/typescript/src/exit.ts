// Before the process ends, every meter flushes. Two ways a Node process ends are seen here:
// its event loop empties (`beforeExit`: a stdio server whose client closed stdin ends so, as
// the meter's timers are unref'd), and SIGINT, SIGTERM or SIGHUP. `process.exit()` is not: it
// runs no asynchronous work, so whoever calls it awaits `close()` first.
//
// A signal that only this module listens for is re-raised once the meters have flushed (or
// given up), so the process ends as the signal's default would (status 128 + its number). A
// signal the program listens for itself is the program's to act on: the meters flush and
// nothing else happens. A second identical signal during the flush re-raises at once.
//
// One listener per event for the whole process, whatever the number of meters.

/** What a meter does before the process ends; settles by the meter's own deadline. */
export type ExitHook = (reason: ExitReason) => Promise<void>;
export type ExitReason = "beforeExit" | "SIGINT" | "SIGTERM" | "SIGHUP";

const SIGNALS = ["SIGINT", "SIGTERM", "SIGHUP"] as const;
const hooks = new Set<ExitHook>();
let installed = false;
let pending: ExitReason | undefined;

/** Runs `hook` before the process ends, until the answered function removes it. */
export function beforeProcessEnds(hook: ExitHook): () => void {
  hooks.add(hook);
  if (!installed) {
    installed = true;
    process.on("beforeExit", onBeforeExit);
    for (const signal of SIGNALS) process.on(signal, onSignal);
  }
  return () => void hooks.delete(hook);
}

async function runHooks(reason: ExitReason): Promise<void> {
  await Promise.allSettled([...hooks].map((hook) => hook(reason)));
}

function onBeforeExit(): void {
  // The hooks' requests keep the loop alive; once they end, `beforeExit` comes again and each
  // hook finds nothing new to do, so the process ends.
  void runHooks("beforeExit");
}

function onSignal(signal: NodeJS.Signals): void {
  const reason = signal as (typeof SIGNALS)[number];
  const programListens = process.listeners(signal).some((listener) => listener !== onSignal);
  if (pending === reason && !programListens) return reraise(signal);
  pending = reason;
  void runHooks(reason).then(() => {
    pending = undefined;
    if (!programListens) reraise(signal);
  });
}

function reraise(signal: NodeJS.Signals): void {
  process.removeListener(signal, onSignal);
  process.kill(process.pid, signal);
}
