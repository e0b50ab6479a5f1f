// Tern console: reads /console/api/* and draws tables and SVG charts.
// No inline script (the page's CSP forbids it); the operator token lives in
// sessionStorage only, and goes out as an Authorization header.
"use strict";

const TOKEN_KEY = "tern-console-token";
const REFRESH_MS = 10000;
const SVG_NS = "http://www.w3.org/2000/svg";
let canAct = false;

function $(id) { return document.getElementById(id); }
function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

function say(text, isError) {
  const m = $("message");
  m.textContent = text;
  m.className = isError ? "error" : "";
}

async function api(path, body) {
  const headers = {};
  if (token()) headers["Authorization"] = "Bearer " + token();
  const init = { headers, credentials: "omit", cache: "no-store" };
  if (body !== undefined) {
    init.method = "POST";
    headers["Content-Type"] = "application/json";
    headers["X-Tern-Console"] = "1";
    init.body = JSON.stringify(body);
  }
  const r = await fetch("/console/api/" + path, init);
  let data = null;
  try { data = await r.json(); } catch (_) { /* not JSON */ }
  if (!r.ok) {
    const err = new Error((data && data.detail) || (r.status + " " + r.statusText));
    err.status = r.status;
    throw err;
  }
  return data;
}

function cell(tr, text, cls) {
  const td = document.createElement("td");
  td.textContent = text === undefined || text === null ? "" : String(text);
  if (cls) td.className = cls;
  tr.appendChild(td);
  return td;
}

function button(td, label, action, arg) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.dataset.action = action;
  b.dataset.arg = arg;
  b.disabled = !canAct;
  td.appendChild(b);
}

function fill(id, rows, render) {
  const tbody = $(id).querySelector("tbody");
  tbody.replaceChildren();
  for (const row of rows) {
    const tr = document.createElement("tr");
    render(tr, row);
    tbody.appendChild(tr);
  }
}

function age(secs) {
  if (secs < 60) return secs + " s";
  if (secs < 3600) return Math.floor(secs / 60) + " min";
  if (secs < 86400) return (secs / 3600).toFixed(1) + " h";
  return (secs / 86400).toFixed(1) + " d";
}

function renderOverview(o) {
  $("node").textContent = "node " + o.node + " (" + o.hostname + ") · Tern " + o.version +
    " · " + o.queued_messages + " queued" +
    (o.unreachable.length ? " · unreachable: " + o.unreachable.join(", ") : "");
  fill("members", o.members, (tr, m) => {
    tr.dataset.member = m.id;
    tr.dataset.health = m.health;
    cell(tr, m.id + (m.control_leader ? " ★" : ""));
    cell(tr, m.addr);
    cell(tr, m.role);
    cell(tr, m.health, "health-" + m.health);
    cell(tr, m.lag);
    cell(tr, m.shards_led);
    cell(tr, m.replicas);
  });
  fill("shards", o.shards, (tr, s) => {
    tr.dataset.shard = s.shard;
    tr.dataset.leader = s.leader;
    cell(tr, s.shard);
    cell(tr, s.leader || "none", s.leader ? "" : "health-unreachable");
    cell(tr, s.voters.join(", ") + (s.joint ? " (joint)" : ""));
    cell(tr, s.replicas.join(", "));
    cell(tr, s.queued);
    cell(tr, s.term);
  });
}

function renderQueue(q) {
  $("queue-total").textContent = q.messages + " messages, " + q.recipients + " recipients, oldest " +
    age(q.oldest_age_secs) + (q.missing_shards.length ? " · shards not counted: " + q.missing_shards.join(", ") : "");
  fill("queue", q.domains, (tr, d) => {
    tr.dataset.domain = d.domain;
    tr.dataset.messages = d.messages;
    cell(tr, d.domain);
    cell(tr, d.messages);
    cell(tr, d.recipients);
    cell(tr, d.held);
    cell(tr, age(d.oldest_age_secs));
    cell(tr, d.last_error, "reply");
    const td = cell(tr, "", "act");
    button(td, "Hold", "hold", d.domain);
    button(td, "Release", "release", d.domain);
    button(td, "Retry", "retry", d.domain);
    button(td, "Suspend", "suspend", d.domain);
  });
}

function renderDomains(d) {
  fill("suspended", d.suspended, (tr, s) => {
    tr.dataset.domain = s.domain;
    cell(tr, s.domain);
    cell(tr, s.until === null ? "until resumed" : new Date(s.until * 1000).toISOString());
    cell(tr, s.reason);
    button(cell(tr, "", "act"), "Resume", "resume", s.domain);
  });
}

function renderEvents(e) {
  fill("events", e.events.slice(0, 50), (tr, ev) => {
    const f = ev.fields;
    cell(tr, ev.timestamp.replace("T", " ").slice(0, 19));
    cell(tr, f.event);
    cell(tr, f.action || f.scope || "");
    cell(tr, f.who ? f.who + " (" + (f.role || f.how || "") + ")" : "");
    cell(tr, f.selection || f.reason || "");
    cell(tr, f.result ? f.result + (f.error ? ": " + f.error : "") : "");
  });
}

function svg(parent, name, attrs, text) {
  const el = document.createElementNS(SVG_NS, name);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  parent.appendChild(el);
  return el;
}

// A line chart of `series` ({name, cls, values}) over `labels` (oldest first).
function lineChart(el, labels, series) {
  const W = 640, H = 200, L = 40, R = 10, T = 10, B = 24;
  el.replaceChildren();
  el.setAttribute("viewBox", "0 0 " + W + " " + H);
  let max = 1;
  for (const s of series) for (const v of s.values) max = Math.max(max, v);
  const n = Math.max(labels.length - 1, 1);
  const x = i => L + (W - L - R) * i / n;
  const y = v => H - B - (H - T - B) * v / max;
  for (const frac of [0, 0.5, 1]) {
    const v = Math.round(max * frac);
    svg(el, "line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: "grid" });
    svg(el, "text", { x: L - 4, y: y(v) + 4, class: "axis", "text-anchor": "end" }, v);
  }
  for (let i = 0; i < labels.length; i += Math.max(1, Math.floor(labels.length / 6))) {
    svg(el, "text", { x: x(i), y: H - 6, class: "axis", "text-anchor": "middle" }, labels[i]);
  }
  series.forEach((s, k) => {
    const points = s.values.map((v, i) => x(i) + "," + y(v)).join(" ");
    svg(el, "polyline", { points, class: "line " + s.cls }).dataset.series = s.name;
    svg(el, "rect", { x: L + 8 + k * 110, y: T, width: 10, height: 10, class: "swatch " + s.cls });
    svg(el, "text", { x: L + 22 + k * 110, y: T + 9, class: "legend" }, s.name);
  });
}

function renderStats(s) {
  const labels = s.points.map(p => "-" + p.minutes_ago + "m");
  lineChart($("rate-chart"), labels, [
    { name: "delivered", cls: "c0", values: s.points.map(p => p.delivered) },
    { name: "deferred", cls: "c1", values: s.points.map(p => p.deferred) },
    { name: "bounced", cls: "c2", values: s.points.map(p => p.bounced) },
  ]);
  lineChart($("reason-chart"), labels,
    s.reasons.map((r, k) => ({ name: r.reason, cls: "c" + (k + 1), values: r.counts })));
  fill("reasons", s.reasons, (tr, r) => {
    const sw = cell(tr, "");
    sw.className = "swatch-cell c" + (s.reasons.indexOf(r) + 1);
    cell(tr, r.reason);
    cell(tr, r.total);
    cell(tr, r.last_reply, "reply");
  });
}

async function loadWho() {
  try {
    const who = await api("whoami");
    canAct = who.can_act;
    $("who").textContent = "signed in as " + who.name + " (" + who.role + ")";
    $("login").hidden = !!token();
    $("sign-out").hidden = !token();
    document.body.dataset.canAct = canAct ? "1" : "0";
    return true;
  } catch (e) {
    canAct = false;
    $("who").textContent = "";
    $("login").hidden = false;
    $("sign-out").hidden = !token();
    say(e.status === 401 ? "Sign in with an operator token: " + e.message : e.message, true);
    return false;
  }
}

async function load() {
  if (!(await loadWho())) return;
  document.querySelectorAll("#suspend-form button").forEach(b => { b.disabled = !canAct; });
  const parts = [
    ["overview", renderOverview], ["queue", renderQueue], ["stats", renderStats],
    ["domains", renderDomains], ["events", renderEvents],
  ];
  const errors = [];
  await Promise.all(parts.map(async ([path, render]) => {
    try { render(await api(path)); } catch (e) { errors.push(path + ": " + e.message); }
  }));
  if (errors.length) say(errors.join("; "), true);
  else if ($("message").className === "error") say("");
  document.body.dataset.loaded = String(Number(document.body.dataset.loaded || 0) + 1);
}

async function act(action, domain, extra) {
  const body = Object.assign({ domain }, extra || {});
  const path = { suspend: "domains/suspend", resume: "domains/resume" }[action] || "queue/" + action;
  try {
    const r = await api(path, body);
    const partial = (r.unreachable && r.unreachable.length ? " — not reached: nodes " + r.unreachable.join(", ") : "") +
      (r.missing_shards && r.missing_shards.length ? " — shards not read: " + r.missing_shards.join(", ") : "");
    say(action + " " + domain + ": done" + (r.affected !== undefined ? " (" + r.affected + " messages)" : "") + partial, partial !== "");
  } catch (e) {
    say(action + " " + domain + " failed: " + e.message, true);
  }
  await load();
}

document.addEventListener("DOMContentLoaded", () => {
  $("login").addEventListener("submit", ev => {
    ev.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
    $("token").value = "";
    say("");
    load();
  });
  $("sign-out").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    say("");
    load();
  });
  $("refresh").addEventListener("click", load);
  $("suspend-form").addEventListener("submit", ev => {
    ev.preventDefault();
    act("suspend", $("suspend-domain").value.trim(), {
      duration_secs: Number($("suspend-duration").value),
      reason: $("suspend-reason").value,
    });
  });
  document.querySelector("main").addEventListener("click", ev => {
    const b = ev.target.closest("button[data-action]");
    if (b) act(b.dataset.action, b.dataset.arg, b.dataset.action === "suspend" ? { reason: "from the console" } : undefined);
  });
  load();
  setInterval(load, REFRESH_MS);
});
