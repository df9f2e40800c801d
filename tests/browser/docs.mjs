// Opens the interactive API documentation (/docs/) in headless Chromium under the content
// security policy the server sends, and prints what rendered as one JSON document;
// tests/it/hardening.rs checks it.
//
//   node docs.mjs URL
//
// Reports the operations Swagger UI listed, every console error (a policy violation is one)
// and every request that left the server's origin.

import { chromium } from "playwright-core";

const [url] = process.argv.slice(2);
const origin = new URL(url).origin;
const report = { operations: [], consoleErrors: [], foreignRequests: [], csp: null };

const browser = await chromium.launch({
  executablePath: process.env.MCP_METER_TEST_CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage();
  page.on("console", (m) => { if (m.type() === "error") report.consoleErrors.push(m.text()); });
  page.on("pageerror", (e) => report.consoleErrors.push(String(e)));
  page.on("request", (r) => {
    const u = r.url();
    if (!u.startsWith(origin) && !u.startsWith("data:")) report.foreignRequests.push(u);
  });
  const answer = await page.goto(`${url}/docs/`);
  report.csp = answer.headers()["content-security-policy"] ?? null;
  await page.waitForSelector(".opblock-summary-path", { timeout: 20000 });
  report.operations = await page.$$eval(".opblock-summary-path", (els) =>
    els.map((e) => e.getAttribute("data-path") || e.textContent.trim()));
} finally {
  await browser.close();
}
console.log(JSON.stringify(report));
