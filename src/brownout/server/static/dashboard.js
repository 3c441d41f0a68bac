// brownout live dashboard: plain JavaScript, no build step, no external assets.
// It listens to GET /api/v1/events?charts=1 (Server-Sent Events): "snapshot" messages redraw the
// state, "event" and "alert" messages go to the feed, "history" and "sample" messages go to the
// charts (charts.js), "job" messages (a job's state and progress) to the jobs table, which is first
// filled from GET /v1/jobs and read again every 15 s. Everything from the server is inserted with
// textContent, never as HTML: event fields carry model error messages.
"use strict";

const FEED_MAX = 200;
let feedCount = 0;

function $(id) {
  return document.getElementById(id);
}

function el(tag, text, attrs) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  return node;
}

function badge(text, state) {
  return el("span", text, { class: "badge", "data-state": state });
}

function pct(x) {
  return x === null || x === undefined ? "-" : (x * 100).toFixed(1) + " %";
}

function timeOf(iso) {
  const d = iso ? new Date(iso) : new Date();
  return isNaN(d) ? String(iso) : d.toISOString().slice(11, 23);
}

function renderModels(models) {
  const body = $("models-body");
  const rows = [];
  for (const [role, m] of Object.entries(models || {})) {
    const tr = el("tr", null, { "data-role": role, "data-health": m.status });
    tr.appendChild(el("td", role, { class: "role" }));
    const health = el("td", null, { class: "health" });
    health.appendChild(badge(m.status, m.status));
    tr.appendChild(health);
    const breakers = el("td", null, { class: "breakers" });
    for (const [name, state] of Object.entries(m.breakers || {})) {
      const b = badge(Object.keys(m.breakers).length > 1 ? name + ": " + state : state, state);
      b.classList.add("breaker");
      b.setAttribute("data-breaker", name);
      breakers.appendChild(b);
    }
    tr.appendChild(breakers);
    const check = m.last_check;
    let checkText = "not yet";
    if (check) {
      checkText = (check.healthy ? "ok" : "failed") + ", " + check.latency_ms + " ms";
      if (check.error) checkText += " - " + check.error;
    }
    tr.appendChild(el("td", checkText, { class: "last-check" }));
    tr.appendChild(el("td", m.server || "external", { class: "server" }));
    rows.push(tr);
  }
  body.replaceChildren(...rows);
}

function render(s) {
  const mode = $("system-mode");
  mode.textContent = s.system_mode;
  mode.setAttribute("data-mode", s.system_mode);
  const off = (s.switched_off || []).length ? " - off: " + s.switched_off.join(", ") : "";
  $("mode-reason").textContent = (s.mode_reason || "") + off;
  const status = $("status");
  status.textContent = s.status;
  status.setAttribute("data-state", s.status);
  $("available-modes").textContent = (s.available_modes || []).join(", ") || "none";
  if (s.queue) {
    $("queue-size").textContent = s.queue.size;
    $("queue-detail").textContent = "of " + s.queue.max_size + " max, " + s.queue.in_flight + " running";
  }
  if (s.dimmer) {
    // Overload is not failure: the level says how much optional work is left out under load.
    const d = s.dimmer;
    $("dimmer-level").textContent = d.level === 0 ? "full" : "level " + d.level;
    $("dimmer-level").setAttribute("data-level", String(d.level));
    const p95 = d.observed_p95 === null ? "-" : d.observed_p95.toFixed(1) + " s";
    $("dimmer-detail").textContent =
      (d.dimming ? "dimming " + d.dimming + ", " : "") + "value " + d.value.toFixed(2) +
      ", p95 " + p95 + " of " + d.target_p95 + " s target";
  }
  if (s.cache) {
    $("cache-hit-rate").textContent = pct(s.cache.hit_rate);
    $("cache-detail").textContent =
      s.cache.hits + " hits, " + s.cache.misses + " misses, " + s.cache.size + "/" + s.cache.max_size +
      " entries, ttl " + s.cache.ttl_seconds + " s";
  }
  if (s.spool) {
    $("spool-pending").textContent = s.spool.pending;
    $("spool-detail").textContent = s.spool.alert ? "over the alert threshold" : "writes waiting for the database";
  }
  if (s.database) {
    const db = $("database");
    db.replaceChildren(badge(s.database.status, s.database.status));
  }
  if (s.redis) {
    $("redis").replaceChildren(badge(s.redis.status, s.redis.status));
  }
  if (s.gateway) {
    const groups = Object.entries(s.gateway.groups || {});
    $("gateway").replaceChildren(badge(s.gateway.status, s.gateway.status));
    $("gateway-detail").textContent = groups.length
      ? groups.map(([name, state]) => name + ": " + state).join(", ")
      : "no model groups configured";
  }
  $("updated").textContent = "updated " + timeOf(s.at) + " UTC, " + s.live_clients + " live client(s)";
  renderModels(s.models);
}

const JOBS_SHOWN = 20;
const jobs = new Map();

function jobRow(j) {
  const p = j.progress || { done: 0, failed: 0, total: 0, mock: 0 };
  const tr = el("tr", null, { "data-job": j.id, "data-job-state": j.state });
  tr.appendChild(el("td", j.id.slice(0, 12), { class: "id", title: j.id }));
  const state = el("td");
  state.appendChild(badge(j.state, j.state));
  tr.appendChild(state);
  const bar = el("div", null, { class: "progress", role: "progressbar", "aria-valuemin": 0,
    "aria-valuemax": p.total, "aria-valuenow": p.done + p.failed });
  const total = Math.max(1, p.total);
  // Set through the style object (CSSOM): the page's Content-Security-Policy forbids inline styles.
  for (const [cls, n] of [["done", p.done - p.mock], ["mock", p.mock], ["failed", p.failed]]) {
    const part = el("span", null, { class: cls });
    part.style.width = (100 * Math.max(0, n) / total).toFixed(2) + "%";
    bar.appendChild(part);
  }
  const cell = el("td");
  cell.appendChild(bar);
  tr.appendChild(cell);
  tr.appendChild(el("td", (p.done - p.mock) + " / " + p.mock + " / " + p.failed + " of " + p.total));
  tr.appendChild(el("td", j.waiting || j.reason || "", { class: "small" }));
  return tr;
}

function renderJobs() {
  const shown = [...jobs.values()]
    .sort((a, b) => String(b.created_at || "").localeCompare(String(a.created_at || "")))
    .slice(0, JOBS_SHOWN);
  $("jobs-body").replaceChildren(...shown.map(jobRow));
  $("jobs").setAttribute("data-jobs", String(jobs.size));
  const counts = {};
  for (const j of jobs.values()) counts[j.state] = (counts[j.state] || 0) + 1;
  const order = ["queued", "running", "succeeded", "partially_succeeded", "failed", "cancelled"];
  const text = order.filter((s) => counts[s]).map((s) => counts[s] + " " + s.replace("_", " "));
  $("jobs-counts").textContent = text.length ? text.join(", ") : "none yet";
}

function updateJob(j) {
  if (!j || !j.id) return;
  // A progress message carries no timestamps: keep the ones the list gave (a job first seen here
  // is the newest).
  const known = jobs.get(j.id) || { created_at: new Date().toISOString() };
  jobs.set(j.id, { ...known, ...j });
  renderJobs();
}

async function loadJobs() {
  try {
    const r = await fetch("/v1/jobs?limit=" + JOBS_SHOWN, { headers: { accept: "application/json" } });
    if (!r.ok) return; // jobs switched off, or the database away: the table keeps what it had
    const body = await r.json();
    for (const j of body.jobs || []) jobs.set(j.id, { ...(jobs.get(j.id) || {}), ...j });
    renderJobs();
  } catch (e) {
    // The server is restarting: the stream's reconnection brings the table back.
  }
}

function addFeed(kind, m) {
  const feed = $("feed");
  const li = el("li", null, {
    "data-type": kind,
    "data-category": m.category || kind,
    "data-name": m.name || m.alert || "",
    "data-status": m.status || "",
  });
  li.appendChild(el("span", timeOf(m.at), { class: "time" }));
  const label = kind === "alert" ? "alert " + m.status : m.category;
  li.appendChild(el("span", label, { class: "cat" }));
  let text = kind === "alert" ? m.alert + ": " + m.summary : m.summary;
  if (m.suppressed) text += " (+" + m.suppressed + " similar suppressed)";
  li.appendChild(el("span", " " + text, { class: "text" }));
  feed.prepend(li);
  while (feed.children.length > FEED_MAX) feed.lastElementChild.remove();
  feedCount += 1;
  $("feed-count").textContent = String(feedCount);
}

function connect() {
  const conn = $("connection");
  const source = new EventSource("/api/v1/events?charts=1");
  source.onopen = () => {
    conn.textContent = "live";
    conn.setAttribute("data-state", "live");
  };
  source.onerror = () => {
    // EventSource reconnects by itself (and resumes with Last-Event-ID).
    conn.textContent = "reconnecting...";
    conn.setAttribute("data-state", "lost");
  };
  source.addEventListener("snapshot", (e) => render(JSON.parse(e.data).data));
  source.addEventListener("event", (e) => addFeed("event", JSON.parse(e.data)));
  source.addEventListener("alert", (e) => addFeed("alert", JSON.parse(e.data)));
  source.addEventListener("history", (e) => window.brownoutCharts.history(JSON.parse(e.data).data));
  source.addEventListener("sample", (e) => window.brownoutCharts.sample(JSON.parse(e.data).data));
  source.addEventListener("job", (e) => updateJob(JSON.parse(e.data).job));
  source.addEventListener("dropped", () => {
    conn.textContent = "fell behind; reconnecting...";
    conn.setAttribute("data-state", "lost");
  });
}

document.addEventListener("DOMContentLoaded", () => {
  connect();
  loadJobs();
  setInterval(loadJobs, 15000);
});
