// Every figure on the page is formatted here, once. Money arrives as integer micro-USD and is
// shown in USD exactly (integer arithmetic, no rounding), with the µUSD amount on hover and in
// `data-micros` for anyone who reads the page programmatically.

import { h } from "./dom.js";

const thousands = (digits) => digits.replace(/\B(?=(\d{3})+(?!\d))/g, ",");

// "$1,234.56", "$0.00755": at least two decimals, then as many as the amount has (at most 6).
export function usd(micros) {
  const n = BigInt(micros);
  const size = n < 0n ? -n : n;
  let fraction = (size % 1000000n).toString().padStart(6, "0").replace(/0+$/, "");
  if (fraction.length < 2) fraction = fraction.padEnd(2, "0");
  return `${n < 0n ? "−" : ""}$${thousands((size / 1000000n).toString())}.${fraction}`;
}

// USD as a float, for chart scales only (never shown as a figure).
export const usdValue = (micros) => Number(micros) / 1e6;

// An amount of money: USD shown, µUSD exact on hover.
export function money(micros) {
  return h("span", { class: "money", title: `${micros} µUSD`, "data-micros": micros }, usd(micros));
}

export const count = (n) => thousands(String(n));

export function percent(ratio) {
  return ratio === null || ratio === undefined ? "—" : `${(ratio * 100).toFixed(2)}%`;
}

export function errorRate(errors, calls) {
  return calls === 0 ? "—" : percent(errors / calls);
}

export function millis(ms) {
  return ms === null || ms === undefined ? "—" : `${count(ms)} ms`;
}

// "2026-11-21 09:30:00 UTC" from RFC 3339.
export function when(rfc3339) {
  return rfc3339 ? `${rfc3339.slice(0, 10)} ${rfc3339.slice(11, 19)} UTC` : "—";
}

// A margin level as a badge; `null` when the guard has not computed one.
export function level(state) {
  const name = state?.level ?? "none";
  const text = { OK: "OK", L1_WARN: "L1 warn", L2_THROTTLE: "L2 throttle", L3_BLOCK: "L3 block", none: "—" }[name];
  return h("span", { class: `level level-${name}`, "data-level": name }, text);
}

// Days from `from` to `to` (YYYY-MM-DD), inclusive.
export function days(from, to) {
  const out = [];
  for (let t = Date.parse(`${from}T00:00:00Z`); t <= Date.parse(`${to}T00:00:00Z`); t += 86400000) {
    out.push(new Date(t).toISOString().slice(0, 10));
  }
  return out;
}

export function today() {
  return new Date().toISOString().slice(0, 10);
}

export function daysBefore(day, n) {
  return new Date(Date.parse(`${day}T00:00:00Z`) - n * 86400000).toISOString().slice(0, 10);
}
