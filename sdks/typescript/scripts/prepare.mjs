// npm's `prepare`: builds dist/ from src/. npm runs it after `npm ci` or `npm install` in this
// folder, before `npm pack`, and when a project installs this folder by its path
// (`npm install --install-links /path/to/sdks/typescript`). In that last case the folder is
// often a fresh checkout with no node_modules, and npm installs none of its devDependencies
// for it, so TypeScript is missing: they are installed first, as package-lock.json pins them,
// with scripts off (or this would run again).

import { existsSync } from "node:fs";
import { spawnSync } from "node:child_process";
import { fileURLToPath } from "node:url";

const root = fileURLToPath(new URL("..", import.meta.url));
const tsc = fileURLToPath(new URL("../node_modules/typescript/bin/tsc", import.meta.url));

/** Runs `args` with node in this folder; the script fails as the command did. */
function node(args) {
  const done = spawnSync(process.execPath, args, { cwd: root, stdio: "inherit" });
  if (done.status !== 0) process.exit(done.status ?? 1);
}

if (!existsSync(tsc)) {
  // npm names its own entry point to the scripts it runs; outside npm, the one on the PATH.
  const npm = process.env.npm_execpath;
  const ci = ["ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"];
  if (npm) node([npm, ...ci]);
  else if (spawnSync("npm", ci, { cwd: root, stdio: "inherit", shell: process.platform === "win32" }).status !== 0) process.exit(1);
}
node([tsc, "-p", "tsconfig.json"]);
