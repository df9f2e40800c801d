// The six views. Each reads the API for the range shown and renders into `ctx.main`:
// ctx = {main, range: {from, to}, portal: claims or null, arg: what follows the view's name
// in the address (a session id)}. A portal token sees its customer's usage and spend only:
// the operator's costs, margins and levels are not shown to it.

import { get, getJson, ApiError } from "./api.js";
import { h, render, table } from "./dom.js";
import {
  count, days, errorRate, level, millis, money, percent, usdValue, when,
} from "./format.js";
import { barChart, timeChart } from "./charts.js";

const card = (label, figure, value) =>
  h("div", { class: "card", "data-figure": figure }, h("h3", {}, label), h("p", {}, value));

const revenueLabel = (ctx) => (ctx.portal ? "Spend" : "Revenue");
const seconds = (day) => Date.parse(`${day}T00:00:00Z`) / 1000;
const rangeText = (r) => `${r.from} to ${r.to} (UTC days)`;

// The columns every usage table shares; costs only for the operator.
function figureColumns(ctx) {
  const columns = [
    { label: "Calls", cell: (r) => count(r.calls), sort: (r) => r.calls },
    { label: "Errors", cell: (r) => count(r.errors), sort: (r) => r.errors },
    { label: revenueLabel(ctx), cell: (r) => money(r.revenueMicros), sort: (r) => r.revenueMicros },
  ];
  if (!ctx.portal) {
    columns.push(
      { label: "COGS", cell: (r) => money(r.cogsMicros), sort: (r) => r.cogsMicros },
      { label: "Margin", cell: (r) => percent(r.margin), sort: (r) => r.margin ?? -Infinity },
    );
  }
  return columns;
}

const durationColumns = [
  { label: "Avg duration", cell: (r) => millis(r.avgDurationMs), sort: (r) => r.avgDurationMs ?? -1 },
  { label: "Max duration", cell: (r) => millis(r.maxDurationMs), sort: (r) => r.maxDurationMs },
];

// The guard's current levels by id, or empty maps with a note when they cannot be read.
async function guardLevels() {
  try {
    const states = await getJson("/v1/guard/states");
    return {
      agents: new Map(states.agents.map((s) => [s.id, s])),
      tools: new Map(states.tools.map((s) => [s.id, s])),
      note: null,
    };
  } catch (e) {
    return { agents: new Map(), tools: new Map(), note: `Margin levels unavailable: ${e.message}` };
  }
}

const levelColumn = (levels) => ({
  label: "Level",
  cell: (r) => level(levels.get(r.toolName ?? r.agentId)),
  sort: (r) => ["OK", "L1_WARN", "L2_THROTTLE", "L3_BLOCK"].indexOf(levels.get(r.toolName ?? r.agentId)?.level),
});

// One series' points on every day of the range (days without usage are zero).
function daily(range, points) {
  const byDay = new Map(points.map((p) => [p.start.slice(0, 10), p]));
  return days(range.from, range.to).map((day) => ({ day, point: byDay.get(day) }));
}

export async function overview(ctx) {
  const { range } = ctx;
  const [summary, series] = await Promise.all([
    getJson("/analytics/mcp/summary", range),
    getJson("/analytics/mcp/timeseries", { ...range, interval: "day" }),
  ]);
  const cards = [card(revenueLabel(ctx), "revenueMicros", money(summary.revenueMicros))];
  if (!ctx.portal) {
    cards.push(
      card("COGS", "cogsMicros", money(summary.cogsMicros)),
      card("Gross profit", "grossProfitMicros", money(summary.grossProfitMicros)),
      card("Margin", "margin", percent(summary.margin)),
    );
  }
  cards.push(
    card("Calls", "calls", count(summary.calls)),
    card("Error rate", "errorRate", errorRate(summary.errors, summary.calls)),
    card("Sessions", "sessions", count(summary.sessions)),
  );
  const rows = daily(range, series.series[0]?.points ?? []);
  const value = (field) => rows.map((r) => usdValue(r.point?.[field] ?? 0));
  const lines = [{ label: revenueLabel(ctx), values: value("revenueMicros") }];
  if (!ctx.portal) {
    lines.push(
      { label: "COGS", values: value("cogsMicros") },
      { label: "Margin", values: rows.map((r) => r.point?.margin ?? null), percent: true },
    );
  }
  const columns = [
    { label: "Day", cell: (r) => r.day },
    { label: revenueLabel(ctx), cell: (r) => money(r.point?.revenueMicros ?? 0) },
    ...(ctx.portal ? [] : [
      { label: "COGS", cell: (r) => money(r.point?.cogsMicros ?? 0) },
      { label: "Margin", cell: (r) => percent(r.point?.margin) },
    ]),
    { label: "Calls", cell: (r) => count(r.point?.calls ?? 0) },
  ];
  const caption = ctx.portal
    ? `Spend per UTC day, ${rangeText(range)}.`
    : `Revenue and COGS per UTC day, ${rangeText(range)}, with each day's margin on the right axis.`;
  render(ctx.main, 
    h("h2", {}, "Overview"),
    h("div", { class: "cards" }, cards),
    timeChart(ctx.portal ? "Daily spend" : "Daily revenue and COGS", caption,
      rows.map((r) => seconds(r.day)), lines, table(columns, rows)),
  );
}

export async function tools(ctx) {
  const [report, levels] = await Promise.all([
    getJson("/analytics/mcp/revenue/by-tool", ctx.range),
    ctx.portal ? null : guardLevels(),
  ]);
  const columns = [
    { label: "Tool", cell: (r) => r.toolName, sort: (r) => r.toolName },
    ...figureColumns(ctx),
    ...durationColumns,
    ...(levels ? [levelColumn(levels.tools)] : []),
  ];
  const top = report.tools.slice(0, 20);
  render(ctx.main, 
    h("h2", {}, "Tools"),
    levels?.note ? h("p", { class: "error" }, levels.note) : null,
    report.tools.length === 0
      ? h("p", { class: "empty" }, `No tool calls ${rangeText(ctx.range)}.`)
      : [
        barChart(`${revenueLabel(ctx)} per tool`,
          `${revenueLabel(ctx)} of the ${top.length} highest-earning tools, ${rangeText(ctx.range)}.`,
          top.map((t) => t.toolName), top.map((t) => usdValue(t.revenueMicros)),
          table([{ label: "Tool", cell: (r) => r.toolName },
            { label: revenueLabel(ctx), cell: (r) => money(r.revenueMicros) }], top)),
        table(columns, report.tools, {
          sortable: true, key: (r) => r.toolName,
          caption: "Per tool; choose a heading to sort by it. Level: the margin guard's current level."
            + (report.nextCursor ? ` The ${report.tools.length} highest-earning tools only: the API answers the rest page by page.` : ""),
        }),
      ],
  );
}

export async function agents(ctx) {
  const [report, levels] = await Promise.all([
    getJson("/analytics/mcp/by-agent", ctx.range),
    ctx.portal ? null : guardLevels(),
  ]);
  const columns = [
    { label: "Agent", cell: (r) => r.agentId || "(none)", sort: (r) => r.agentId },
    ...figureColumns(ctx),
    { label: "Sessions", cell: (r) => count(r.sessions), sort: (r) => r.sessions },
    ...(levels ? [levelColumn(levels.agents)] : []),
  ];
  const top = report.agents.slice(0, 8);
  const dayList = days(ctx.range.from, ctx.range.to);
  const lines = top.map((a) => {
    const byDay = new Map(a.daily.map((d) => [d.date, d.revenueMicros]));
    return { label: a.agentId || "(none)", values: dayList.map((d) => usdValue(byDay.get(d) ?? 0)) };
  });
  const dailyRows = top.flatMap((a) => a.daily.map((d) => ({ agent: a.agentId || "(none)", ...d })));
  render(ctx.main, 
    h("h2", {}, "Agents"),
    levels?.note ? h("p", { class: "error" }, levels.note) : null,
    report.agents.length === 0
      ? h("p", { class: "empty" }, `No agent made calls ${rangeText(ctx.range)}.`)
      : [
        timeChart(`Daily ${revenueLabel(ctx).toLowerCase()} per agent`,
          `${revenueLabel(ctx)} per UTC day of the ${top.length} highest-earning agents, ${rangeText(ctx.range)}.`,
          dayList.map(seconds), lines,
          table([{ label: "Agent", cell: (r) => r.agent }, { label: "Day", cell: (r) => r.date },
            { label: revenueLabel(ctx), cell: (r) => money(r.revenueMicros) },
            { label: "Calls", cell: (r) => count(r.calls) }], dailyRows)),
        table(columns, report.agents, {
          sortable: true, key: (r) => r.agentId,
          caption: "Per agent; choose a heading to sort by it. Level: the margin guard's current level.",
        }),
      ],
  );
}

export async function sessions(ctx) {
  if (ctx.arg) return session(ctx, ctx.arg);
  const agent = ctx.params.get("agent") ?? "";
  const [report, agentsReport] = await Promise.all([
    getJson("/analytics/mcp/sessions", { ...ctx.range, agentId: agent, limit: 100 }),
    getJson("/analytics/mcp/by-agent", ctx.range),
  ]);
  const filter = h("select", {
    id: "agent-filter",
    onchange: (e) => {
      const params = new URLSearchParams({ agent: e.target.value });
      location.hash = e.target.value ? `sessions?${params}` : "sessions";
    },
  },
  h("option", { value: "" }, "All agents"),
  agentsReport.agents.map((a) => h("option", { value: a.agentId, selected: a.agentId === agent }, a.agentId || "(none)")));
  const columns = [
    { label: "Session", cell: (r) => h("a", { href: `#sessions/${encodeURIComponent(r.sessionId)}` }, r.sessionId), sort: (r) => r.sessionId },
    { label: "Agent", cell: (r) => r.agentId || "(none)", sort: (r) => r.agentId },
    { label: "Last seen", cell: (r) => when(r.lastSeen), sort: (r) => r.lastSeen },
    { label: "Ended", cell: (r) => (r.ended ? "yes" : "no"), sort: (r) => r.ended },
    { label: "Tools", cell: (r) => count(r.tools), sort: (r) => r.tools },
    ...figureColumns(ctx),
  ];
  render(ctx.main, 
    h("h2", {}, "Sessions"),
    h("div", { class: "toolbar" }, h("label", {}, "Agent ", filter)),
    report.sessions.length === 0
      ? h("p", { class: "empty" }, `No sessions ${rangeText(ctx.range)}.`)
      : table(columns, report.sessions, {
        sortable: true, key: (r) => r.sessionId,
        caption: `The ${report.sessions.length} most recently active sessions; choose one for its tools.`,
      }),
  );
}

async function session(ctx, id) {
  let detail;
  try {
    detail = await getJson(`/analytics/mcp/sessions/${encodeURIComponent(id)}`);
  } catch (e) {
    if (!(e instanceof ApiError) || e.status !== 404) throw e;
    render(ctx.main, h("h2", {}, "Session"), h("p", { class: "error", role: "alert" }, e.message),
      h("a", { href: "#sessions" }, "All sessions"));
    return;
  }
  const facts = [
    ["Session", detail.sessionId],
    ["Agent", detail.agentId || "(none)"],
    ["First seen", when(detail.firstSeen)],
    ["Last seen", when(detail.lastSeen)],
    ["Ended", detail.ended ? "yes (SESSION_END received)" : "no"],
    ["Killed", detail.killedUntil ? `yes, until ${when(detail.killedUntil)}` : "no"],
    ["Calls", count(detail.calls)],
    ["Error rate", errorRate(detail.errors, detail.calls)],
    [revenueLabel(ctx), money(detail.revenueMicros)],
    ...(ctx.portal ? [] : [["COGS", money(detail.cogsMicros)], ["Margin", percent(detail.margin)]]),
  ];
  render(ctx.main, 
    h("p", {}, h("a", { href: "#sessions" }, "← All sessions")),
    h("h2", {}, `Session ${detail.sessionId}`),
    h("dl", { class: "facts", "data-killed": String(Boolean(detail.killedUntil)) },
      facts.flatMap(([term, value]) => [h("dt", {}, term), h("dd", {}, value)])),
    h("h3", {}, "Tools in this session"),
    detail.nextCursor
      ? h("p", {}, `The ${detail.byTool.length} highest-earning of its ${count(detail.tools)} tools.`)
      : null,
    table([{ label: "Tool", cell: (r) => r.toolName, sort: (r) => r.toolName }, ...figureColumns(ctx), ...durationColumns],
      detail.byTool, { sortable: true, key: (r) => r.toolName }),
  );
}

async function balanceOf(customer) {
  try {
    return await getJson(`/v1/customers/${encodeURIComponent(customer)}/balance`);
  } catch {
    return null;
  }
}

export async function customers(ctx) {
  if (ctx.portal) return balance(ctx);
  const report = await getJson("/analytics/mcp/by-customer", { ...ctx.range, limit: 1000 });
  // Calls that named no customer come under a null id.
  const name = (r) => r.customerId ?? "(none)";
  const named = report.customers.filter((r) => r.customerId).slice(0, 50);
  const balances = new Map(await Promise.all(named.map(async (r) => [r.customerId, await balanceOf(r.customerId)])));
  const prepaid = (r) => balances.get(r.customerId)?.grants.length > 0;
  const columns = [
    { label: "Customer", cell: name, sort: (r) => r.customerId ?? "" },
    ...figureColumns(ctx),
    { label: "Sessions", cell: (r) => count(r.sessions), sort: (r) => r.sessions },
    { label: "Balance", cell: (r) => (prepaid(r) ? money(balances.get(r.customerId).availableMicros) : "not prepaid"), sort: (r) => balances.get(r.customerId)?.availableMicros ?? -Infinity },
    { label: "Granted", cell: (r) => (prepaid(r) ? money(balances.get(r.customerId).grantedMicros) : "—"), sort: (r) => balances.get(r.customerId)?.grantedMicros ?? -Infinity },
  ];
  const top = report.customers.slice(0, 20);
  render(ctx.main, 
    h("h2", {}, "Customers"),
    report.customers.length === 0
      ? h("p", { class: "empty" }, `No customer made calls ${rangeText(ctx.range)}.`)
      : [
        barChart("Spend per customer", `What the ${top.length} highest-spending customers were charged, ${rangeText(ctx.range)}.`,
          top.map(name), top.map((r) => usdValue(r.revenueMicros)),
          table([{ label: "Customer", cell: name }, { label: "Spend", cell: (r) => money(r.revenueMicros) }], top)),
        table(columns, report.customers, {
          sortable: true, key: (r) => r.customerId ?? "",
          caption: "Spend per customer (calls without a customerId under “(none)”); balance: prepaid credit available now."
            + (report.nextCursor ? ` The ${report.customers.length} highest-spending customers only: the API answers the rest page by page.` : ""),
        }),
      ],
  );
}

// The portal's own customer: balance, grants, and spend per day.
async function balance(ctx) {
  const customer = ctx.portal.customer;
  const [wallet, report] = await Promise.all([
    getJson(`/v1/customers/${encodeURIComponent(customer)}/balance`),
    getJson("/analytics/mcp/timeseries", { ...ctx.range, interval: "day" }),
  ]);
  const rows = daily(ctx.range, report.series[0]?.points ?? []);
  render(ctx.main, 
    h("h2", {}, `Balance of ${customer}`),
    h("div", { class: "cards" },
      card("Available", "availableMicros", money(wallet.availableMicros)),
      card("Granted", "grantedMicros", money(wallet.grantedMicros)),
      card("Used", "settledMicros", money(wallet.settledMicros)),
      card("Reserved", "reservedMicros", money(wallet.reservedMicros))),
    timeChart("Daily spend", `Spend per UTC day, ${rangeText(ctx.range)}.`, rows.map((r) => seconds(r.day)),
      [{ label: "Spend", values: rows.map((r) => usdValue(r.point?.revenueMicros ?? 0)) }],
      table([{ label: "Day", cell: (r) => r.day }, { label: "Spend", cell: (r) => money(r.point?.revenueMicros ?? 0) }], rows)),
    h("h3", {}, "Credit grants"),
    wallet.grants.length === 0
      ? h("p", { class: "empty" }, "No prepaid credit.")
      : table([
        { label: "Granted", cell: (g) => when(g.grantedAt) },
        { label: "Amount", cell: (g) => money(g.amountMicros) },
        { label: "Expires", cell: (g) => (g.expiresAt ? when(g.expiresAt) : "never") },
        { label: "Note", cell: (g) => g.note },
      ], wallet.grants),
  );
}

export async function exports(ctx) {
  const month = ctx.params.get("period") ?? ctx.range.to.slice(0, 7);
  const status = h("p", { role: "status", id: "export-status" });
  const download = async (format) => {
    try {
      const answer = await get("/v1/exports/billing", { period: picker.value, format });
      const blob = await answer.blob();
      const name = /filename="([^"]+)"/.exec(answer.headers.get("Content-Disposition") ?? "")?.[1]
        ?? `billing-${picker.value}.${format}`;
      const link = h("a", { href: URL.createObjectURL(blob), download: name });
      link.click();
      setTimeout(() => URL.revokeObjectURL(link.href), 10000);
      status.textContent = `Downloaded ${name} (${count(blob.size)} bytes).`;
    } catch (e) {
      status.textContent = `The export failed: ${e.message}`;
    }
  };
  const picker = h("input", {
    type: "month", id: "period", value: month,
    onchange: () => { location.hash = `exports?period=${picker.value}`; },
  });
  let preview;
  try {
    const totals = await getJson("/v1/exports/billing", { period: month, format: "json" });
    preview = h("div", { class: "cards" },
      card("Invoice lines", "lineCount", count(totals.lineCount)),
      card(revenueLabel(ctx), "revenueMicros", money(totals.totals.revenueMicros)),
      card("Calls", "calls", count(totals.totals.calls)));
  } catch (e) {
    preview = h("p", { class: "error", role: "alert" }, e.message);
  }
  render(ctx.main, 
    h("h2", {}, "Billing export"),
    h("p", {}, ctx.portal
      ? "Your invoice lines for a calendar month (UTC), per agent and tool."
      : "Invoice lines per customer, agent and tool for a calendar month (UTC), as finance imports them."),
    h("div", { class: "toolbar" },
      h("label", {}, "Month ", picker),
      h("button", { type: "button", id: "download-csv", onclick: () => download("csv") }, "Download CSV"),
      h("button", { type: "button", id: "download-json", onclick: () => download("json") }, "Download JSON")),
    status,
    h("h3", {}, `Totals of ${month}`),
    preview,
  );
}

