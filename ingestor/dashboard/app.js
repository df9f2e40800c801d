// The dashboard's shell: sign-in, the views' navigation (the address's #fragment: #tools,
// #sessions/ID, #exports?period=2026-11) and the date range every view reads.

import { signedIn, portalClaims, getJson } from "./api.js";
import { h } from "./dom.js";
import { today, daysBefore } from "./format.js";
import * as views from "./views.js";

const VIEWS = [
  ["overview", "Overview"],
  ["tools", "Tools"],
  ["agents", "Agents"],
  ["sessions", "Sessions"],
  ["customers", "Customers"],
  ["exports", "Exports"],
];

const $ = (id) => document.getElementById(id);
const main = $("main");
const signInSection = $("sign-in");
const portalPage = new URLSearchParams(location.search).has("portal");
let range = { from: daysBefore(today(), 29), to: today() };

function showSignIn(message = "") {
  for (const id of ["nav", "range", "sign-out"]) $(id).hidden = true;
  $("mode").textContent = portalPage ? "customer portal" : "";
  $("key-label").textContent = portalPage ? "Portal token" : "API key with the read scope";
  $("sign-in-error").textContent = message;
  main.replaceChildren(signInSection);
  $("key").focus();
}

async function signIn(key) {
  signedIn.set(key);
  try {
    // A cheap read that every key with the read scope, and every portal token, may make.
    await getJson("/analytics/mcp/summary", { from: today(), to: today() });
  } catch (e) {
    signedIn.clear();
    const reason = e.status === 401
      ? "This key was not accepted"
      : e.status === 403 ? "This key may not read analytics" : "Signing in failed";
    showSignIn(`${reason}: ${e.message}`);
    return;
  }
  start();
}

function start() {
  const portal = portalClaims();
  $("mode").textContent = portal ? `portal of customer ${portal.customer}` : "dashboard";
  $("nav").replaceChildren(...VIEWS.map(([name, label]) =>
    h("a", { href: `#${name}`, "data-view": name }, portal && name === "customers" ? "Balance" : label)));
  for (const id of ["nav", "range", "sign-out"]) $(id).hidden = false;
  $("range").elements.from.value = range.from;
  $("range").elements.to.value = range.to;
  show();
}

async function show() {
  if (!signedIn.key()) return showSignIn();
  const [path, query = ""] = location.hash.slice(1).split("?");
  const [name, ...rest] = path.split("/");
  const view = VIEWS.some(([v]) => v === name) ? name : "overview";
  for (const link of $("nav").children) {
    if (link.dataset.view === view) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  main.removeAttribute("data-ready");
  main.dataset.view = view;
  main.replaceChildren(h("p", { class: "empty", role: "status" }, "Loading…"));
  try {
    await views[view]({
      main,
      range,
      portal: portalClaims(),
      arg: rest.length ? decodeURIComponent(rest.join("/")) : "",
      params: new URLSearchParams(query),
    });
  } catch (e) {
    if (e.status === 401) {
      signedIn.clear();
      return showSignIn(`Signed out: ${e.message}`);
    }
    main.replaceChildren(h("h2", {}, "Something went wrong"), h("p", { class: "error", role: "alert" }, e.message));
  }
  // Charts draw on the next frame; the view is ready once they have.
  await new Promise((resolve) => requestAnimationFrame(() => requestAnimationFrame(resolve)));
  main.dataset.ready = "true";
}

$("sign-in-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const key = $("key").value.trim();
  $("key").value = "";
  signIn(key);
});

$("sign-out").addEventListener("click", () => {
  signedIn.clear();
  showSignIn("Signed out.");
});

$("range").addEventListener("submit", (e) => {
  e.preventDefault();
  const form = e.target.elements;
  if (form.from.value > form.to.value) {
    form.to.setCustomValidity("The range ends before it begins");
    form.to.reportValidity();
    return;
  }
  form.to.setCustomValidity("");
  range = { from: form.from.value, to: form.to.value };
  show();
});

window.addEventListener("hashchange", show);

if (signedIn.key()) start();
else showSignIn();
