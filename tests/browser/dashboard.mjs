// Drives the dashboard in headless Chromium (Debian's, through playwright-core) and prints
// what the pages showed as one JSON document; tests/it/dashboard.rs compares it with the API.
//
//   node dashboard.mjs URL READ_KEY PORTAL_TOKEN EXPIRED_TOKEN OTHER_SESSION OUT_DIR
//
// Every view is opened, read (cards, table rows with their exact µUSD, margin levels), its
// charts checked for drawn series, and saved as OUT_DIR/<phase>-<view>.png. Console errors,
// page errors and requests are recorded with the phase they happened in.

import { chromium } from "playwright-core";
import { mkdirSync, readFileSync } from "node:fs";

const [url, key, portalToken, expiredToken, otherSession, out] = process.argv.slice(2);
const origin = new URL(url).origin;
mkdirSync(out, { recursive: true });

const report = {
  wrongKey: null,
  views: {},
  sessionDetail: null,
  exportCsv: null,
  portal: { views: {}, otherSession: null, expired: null, exportCsv: null },
  consoleErrors: [],
  foreignRequests: [],
  secretInUrl: [],
  screenshots: [],
};
let phase = "start";

const browser = await chromium.launch({
  executablePath: process.env.MCP_METER_TEST_CHROMIUM || "/usr/bin/chromium",
  // As root in a container, and with no network beyond loopback: no sandbox, and nothing
  // Chromium would fetch for itself.
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});

async function newPage() {
  const context = await browser.newContext({ acceptDownloads: true, viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  page.on("console", (m) => {
    if (m.type() === "error") report.consoleErrors.push({ phase, text: m.text() });
  });
  page.on("pageerror", (e) => report.consoleErrors.push({ phase, text: String(e) }));
  context.on("request", (r) => {
    const target = r.url();
    const protocol = new URL(target).protocol;
    if (protocol !== "data:" && protocol !== "blob:" && new URL(target).origin !== origin) {
      report.foreignRequests.push({ phase, url: target });
    }
    for (const secret of [key, portalToken]) {
      if (target.includes(secret)) report.secretInUrl.push({ phase, url: target });
    }
  });
  return page;
}

async function signIn(page, path, secret) {
  await page.goto(`${url}${path}`);
  await page.fill("#key", secret);
  await page.click("#sign-in-form button[type=submit]");
}

async function open(page, hash, view) {
  await page.evaluate((h) => { location.hash = h; }, hash);
  await page.waitForSelector(`main[data-view="${view}"][data-ready="true"]`, { timeout: 20000 });
}

// What a view shows: cards, table rows (key, exact µUSD cells, levels), charts drawn.
async function read(page) {
  return page.evaluate(() => {
    const cards = {};
    for (const c of document.querySelectorAll("main [data-figure]")) {
      const money = c.querySelector("[data-micros]");
      cards[c.dataset.figure] = money ? Number(money.dataset.micros) : c.querySelector("p").textContent;
    }
    const rows = [...document.querySelectorAll("main tr[data-key]")].map((tr) => ({
      key: tr.dataset.key,
      micros: [...tr.querySelectorAll("[data-micros]")].map((m) => Number(m.dataset.micros)),
      levels: [...tr.querySelectorAll("[data-level]")].map((l) => l.dataset.level),
      text: [...tr.cells].map((td) => td.textContent),
    }));
    // A chart drew its data when its canvas holds pixels of the first series' colour
    // (#2563eb); axes and grid alone are grey.
    const charts = [...document.querySelectorAll("main figure[data-chart]")].map((f) => {
      const canvas = f.querySelector("canvas");
      let seriesPixels = 0;
      if (canvas) {
        const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
        for (let i = 0; i < data.length; i += 4) {
          if (Math.abs(data[i] - 37) < 12 && Math.abs(data[i + 1] - 99) < 12 && Math.abs(data[i + 2] - 235) < 12 && data[i + 3] > 200) seriesPixels++;
        }
      }
      return { name: f.dataset.chart, canvas: Boolean(canvas), seriesPixels, caption: f.querySelector("figcaption")?.textContent };
    });
    const alerts = [...document.querySelectorAll("main [role=alert]")].map((a) => a.textContent).filter(Boolean);
    const killed = document.querySelector("main dl[data-killed]")?.dataset.killed ?? null;
    return { cards, rows, charts, alerts, killed, heading: document.querySelector("main h2")?.textContent };
  });
}

async function shoot(page, name) {
  const path = `${out}/${name}.png`;
  await page.screenshot({ path, fullPage: true });
  report.screenshots.push(path);
}

async function downloadCsv(page) {
  const [download] = await Promise.all([page.waitForEvent("download"), page.click("#download-csv")]);
  return { name: download.suggestedFilename(), text: readFileSync(await download.path(), "utf8") };
}

const VIEWS = ["overview", "tools", "agents", "sessions", "customers", "exports"];

try {
  // The analyst: a wrong key first, then the read key.
  let page = await newPage();
  phase = "wrong-key";
  await signIn(page, "/dashboard/", "not-a-key");
  await page.waitForFunction(() => document.querySelector("#sign-in-error")?.textContent);
  report.wrongKey = await page.textContent("#sign-in-error");
  phase = "sign-in";
  await page.fill("#key", key);
  await page.click("#sign-in-form button[type=submit]");
  await page.waitForSelector('main[data-view="overview"][data-ready="true"]', { timeout: 20000 });
  for (const view of VIEWS) {
    phase = view;
    await open(page, view, view);
    report.views[view] = await read(page);
    await shoot(page, `dashboard-${view}`);
  }
  phase = "export";
  report.exportCsv = await downloadCsv(page);
  phase = "session-detail";
  const first = report.views.sessions.rows[0]?.key;
  if (first) {
    await open(page, `sessions/${encodeURIComponent(first)}`, "sessions");
    report.sessionDetail = { id: first, ...(await read(page)) };
    await shoot(page, "dashboard-session");
  }
  phase = "sort";
  await open(page, "tools", "tools");
  await page.click("main th:nth-child(4) button"); // Revenue: highest first
  await page.click("main th:nth-child(4) button"); // then lowest first
  report.views.toolsSortedAscending = await read(page);

  // The customer: a portal token.
  page = await newPage();
  phase = "portal-sign-in";
  await signIn(page, "/dashboard/?portal", portalToken);
  await page.waitForSelector('main[data-view="overview"][data-ready="true"]', { timeout: 20000 });
  for (const view of VIEWS) {
    phase = `portal-${view}`;
    await open(page, view, view);
    report.portal.views[view] = await read(page);
    await shoot(page, `portal-${view}`);
  }
  phase = "portal-export";
  report.portal.exportCsv = await downloadCsv(page);
  phase = "portal-other-session";
  await open(page, `sessions/${encodeURIComponent(otherSession)}`, "sessions");
  report.portal.otherSession = await read(page);
  phase = "portal-expired";
  page = await newPage();
  await signIn(page, "/dashboard/?portal", expiredToken);
  await page.waitForFunction(() => document.querySelector("#sign-in-error")?.textContent);
  report.portal.expired = await page.textContent("#sign-in-error");
} finally {
  await browser.close();
}
console.log(JSON.stringify(report));
