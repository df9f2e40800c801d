// What the unit tests' seeded searches share: a generator that is the same on every Node, and
// the shortening of a failing sequence.

/** mulberry32: small, fast, and the same on every Node. */
export function random(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Removes runs of `steps` (halves, then quarters, down to single steps) while `fails` still holds; answers the shortest. */
export async function withoutRuns<T>(steps: T[], fails: (steps: T[]) => boolean | Promise<boolean>): Promise<T[]> {
  let best = steps;
  for (let size = Math.ceil(best.length / 2); size >= 1; size = Math.floor(size / 2)) {
    for (let at = 0; at < best.length; ) {
      const candidate = [...best.slice(0, at), ...best.slice(at + size)];
      if (await fails(candidate)) best = candidate;
      else at += size;
    }
  }
  return best;
}
