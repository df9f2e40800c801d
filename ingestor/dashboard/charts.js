// Charts, drawn by uPlot (vendored: vendor/uPlot-1.6.32.*). Each chart sits in a <figure>
// whose caption says what it shows and whose table holds the same figures, for those who
// cannot see the canvas.

import uPlot from "./vendor/uPlot-1.6.32.esm.js";
import { h } from "./dom.js";
import { usd, percent } from "./format.js";

const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777"];
export const color = (i) => COLORS[i % COLORS.length];

// A figure holding a chart drawn once it is on the page (uPlot measures its container).
function figure(name, caption, table, draw) {
  const plot = h("div", { class: "chart", role: "img", "aria-label": `${name}: ${caption}` });
  const fig = h("figure", { "data-chart": name },
    plot,
    h("figcaption", {}, caption),
    h("details", {}, h("summary", {}, `${name}: the figures as a table`), table));
  requestAnimationFrame(() => draw(plot, Math.max(plot.clientWidth, 480)));
  return fig;
}

const usdAxis = { values: (u, ticks) => ticks.map((t) => usd(Math.round(t * 1e6))), size: 90 };

// Lines over time. `x`: seconds since the epoch; `lines`: {label, values, percent?} (values in
// USD, or ratios for a percent line drawn on its own axis on the right).
export function timeChart(name, caption, x, lines, table) {
  const hasPercent = lines.some((l) => l.percent);
  return figure(name, caption, table, (plot, width) => {
    new uPlot({
      width,
      height: 280,
      // Money from zero; margins up to 100% (a margin is never more), down as far as they go.
      scales: {
        x: { time: true },
        y: { range: (u, min, max) => [Math.min(0, min), max > 0 ? max * 1.1 : 1] },
        pct: { range: (u, min) => [Math.min(0, min ?? 0), 1] },
      },
      series: [
        {},
        ...lines.map((l, i) => ({
          label: l.label,
          stroke: color(i),
          width: 2,
          scale: l.percent ? "pct" : "y",
          value: (u, v) => (v === null ? "—" : l.percent ? percent(v) : usd(Math.round(v * 1e6))),
          points: { show: x.length < 60 },
        })),
      ],
      axes: [
        {},
        { scale: "y", ...usdAxis },
        ...(hasPercent
          ? [{ scale: "pct", side: 1, size: 70, grid: { show: false }, values: (u, t) => t.map((v) => percent(v)) }]
          : []),
      ],
    }, [x, ...lines.map((l) => l.values)], plot);
  });
}

// Bars, one per label, values in USD.
export function barChart(name, caption, labels, values, table) {
  return figure(name, caption, table, (plot, width) => {
    new uPlot({
      width,
      height: 260,
      // Half a bar's room either side of the first and last bar; money from zero.
      scales: {
        x: { time: false, range: (u, min, max) => [min - 0.5, max + 0.5] },
        y: { range: (u, min, max) => [Math.min(0, min), max > 0 ? max * 1.1 : 1] },
      },
      series: [
        { value: (u, i) => labels[i] ?? "" },
        {
          label: name,
          stroke: color(0),
          fill: "rgba(37, 99, 235, 0.35)",
          paths: uPlot.paths.bars({ size: [0.6, 80] }),
          points: { show: false },
          value: (u, v) => (v === null ? "—" : usd(Math.round(v * 1e6))),
        },
      ],
      axes: [
        { splits: () => labels.map((_, i) => i), values: (u, ticks) => ticks.map((i) => shorten(labels[i] ?? "")) },
        usdAxis,
      ],
    }, [labels.map((_, i) => i), values], plot);
  });
}

const shorten = (text) => (text.length > 14 ? `${text.slice(0, 13)}…` : text);
