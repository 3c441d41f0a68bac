// brownout live dashboard: the charts of the last minutes, drawn with uPlot (vendor/uplot, served by
// the server itself). The server keeps one point every few seconds (GET /api/v1/history); the page
// gets them all once ("history" message) and each new one as it is taken ("sample" message).
// Labels come from the server (breaker and gateway group names): uPlot writes them as text.
"use strict";

const COLORS = {
  full: "#1f9d55", downshifted: "#d98e04", fallback: "#e8590c", emergency: "#862e9c",
  cached: "#2a6fdb", rejected: "#cc1f1a",
  closed: "#1f9d55", half_open: "#d98e04", open: "#cc1f1a", forced_open: "#cc1f1a",
};
const PALETTE = ["#2a6fdb", "#1f9d55", "#cc1f1a", "#d98e04", "#862e9c", "#0b7285", "#e8590c", "#5c677d"];
const BREAKER_STATES = ["closed", "half_open", "open", "forced_open"];
const KINDS_DEFAULT = ["full", "downshifted", "fallback", "emergency", "cached", "rejected"];

const state = { points: [], window: 900, kinds: KINDS_DEFAULT, charts: {} };

function seconds(v) {
  if (v === null || v === undefined) return "-";
  return v < 1 ? Math.round(v * 1000) + " ms" : v.toFixed(v < 10 ? 2 : 1) + " s";
}

function rate(v) {
  return v === null || v === undefined ? "-" : v.toFixed(v < 10 ? 2 : 1) + "/s";
}

function union(key) {
  // Every name seen in the points kept (breakers and gateway keys come and go with the config).
  const names = new Set();
  for (const p of state.points) for (const k of Object.keys(p[key] || {})) names.add(k);
  return [...names].sort();
}

// Each chart: the series it draws, built from the points; rebuilt when its series change.
const CHARTS = {
  answers: () => ({
    series: state.kinds.map((k) => ({ label: k, stroke: COLORS[k] || "#5c677d", width: 2, value: (u, v) => rate(v) })),
    data: state.kinds.map((k) => state.points.map((p) => (p.answers ? p.answers[k] ?? 0 : null))),
    axes: [{ values: (u, vs) => vs.map((v) => v + "/s"), size: 54 }],
  }),
  latency: () => ({
    series: [
      { label: "p50", stroke: "#2a6fdb", width: 2, value: (u, v) => seconds(v) },
      { label: "p95", stroke: "#cc1f1a", width: 2, value: (u, v) => seconds(v) },
    ],
    data: ["p50", "p95"].map((q) => state.points.map((p) => (p.latency ? p.latency[q] : null))),
    axes: [{ values: (u, vs) => vs.map(seconds), size: 60 }],
  }),
  breakers: () => {
    // A timeline: one lane per breaker, a thick line in the colour of its state while it is in it.
    const names = union("breakers");
    const series = [];
    const data = [];
    names.forEach((name, lane) => {
      for (const s of BREAKER_STATES) {
        const values = state.points.map((p, i) => {
          const now = p.breakers ? p.breakers[name] : undefined;
          const before = i > 0 && state.points[i - 1].breakers ? state.points[i - 1].breakers[name] : undefined;
          // The segment of the previous state runs up to the point where the new one was seen.
          return now === s || before === s ? lane : null;
        });
        if (values.some((v) => v !== null) || s !== "forced_open") {
          series.push({ label: name + " " + s, stroke: COLORS[s], width: 12, points: { show: false } });
          data.push(values);
        }
      }
    });
    return {
      series, data, legend: false,
      scales: { y: { range: [-0.6, Math.max(names.length, 1) - 0.4] } },
      axes: [{ splits: () => names.map((_, i) => i), values: () => names, size: 80, grid: { show: false } }],
      empty: names.length ? "" : "no breakers",
    };
  },
  load: () => ({
    series: [
      { label: "queue", stroke: "#2a6fdb", width: 2 },
      { label: "running", stroke: "#5c677d", width: 1, dash: [4, 3] },
      { label: "dimmer level", stroke: "#d98e04", width: 2, scale: "level", paths: uPlot.paths.stepped({ align: 1 }) },
    ],
    data: [
      state.points.map((p) => p.queue ?? null),
      state.points.map((p) => p.in_flight ?? null),
      state.points.map((p) => p.dimmer ?? null),
    ],
    scales: { level: { range: (u, lo, hi) => [0, Math.max(3, hi)] } },
    axes: [{ size: 44 }, { scale: "level", side: 1, size: 36, grid: { show: false }, values: (u, vs) => vs.map((v) => (Number.isInteger(v) ? v : "")) }],
  }),
  spool: () => ({
    series: [{ label: "waiting writes", stroke: "#862e9c", width: 2, fill: "rgba(134,46,156,0.12)" }],
    data: [state.points.map((p) => p.spool ?? null)],
    scales: { y: { range: (u, lo, hi) => [0, Math.max(5, hi)] } },
    axes: [{ size: 44 }],
  }),
  gateway: () => {
    const keys = union("gateway");
    return {
      series: keys.map((k, i) => ({ label: k, stroke: PALETTE[i % PALETTE.length], width: 2, value: (u, v) => rate(v) })),
      data: keys.map((k) => state.points.map((p) => (p.gateway ? p.gateway[k] ?? 0 : null))),
      axes: [{ values: (u, vs) => vs.map((v) => v + "/s"), size: 54 }],
      empty: keys.length ? "" : "no gateway requests yet",
    };
  },
};

function options(name, spec, width, height) {
  const axes = spec.axes || [];
  return {
    width, height,
    legend: { show: spec.legend !== false, live: false },
    cursor: { drag: { x: false, y: false } },
    scales: Object.assign({ x: { time: true } }, spec.scales || {}),
    series: [{ label: "time" }, ...spec.series],
    axes: [{ size: 30, space: 70 }, ...axes.map((a) => Object.assign({ stroke: "#6a7385", grid: { stroke: "#eef0f4" } }, a))],
  };
}

function draw(name) {
  const box = document.getElementById("chart-" + name);
  if (!box) return;
  const spec = CHARTS[name]();
  const xs = state.points.map((p) => p.t);
  const data = [xs, ...spec.data];
  const signature = spec.series.map((s) => s.label).join("|");
  const width = Math.max(240, box.clientWidth);
  const height = Number(box.dataset.height || 170);
  let chart = state.charts[name];
  if (!chart || chart.signature !== signature || chart.width !== width) {
    if (chart) chart.plot.destroy();
    chart = { signature, width, plot: new uPlot(options(name, spec, width, height), data, box) };
    state.charts[name] = chart;
  } else {
    chart.plot.setData(data);
  }
  box.dataset.series = String(spec.series.length);
  const note = document.getElementById("empty-" + name);
  if (note) note.textContent = spec.empty || "";
}

function drawAll() {
  for (const name of Object.keys(CHARTS)) draw(name);
  const section = document.getElementById("charts");
  section.dataset.points = String(state.points.length);
  const span = state.points.length > 1 ? state.points[state.points.length - 1].t - state.points[0].t : 0;
  document.getElementById("charts-span").textContent =
    state.points.length
      ? Math.round(span / 6) / 10 + " of " + Math.round(state.window / 60) + " min, " + state.points.length + " points"
      : "waiting for the first points...";
}

function trim() {
  if (!state.points.length) return;
  const newest = state.points[state.points.length - 1].t;
  while (state.points.length && state.points[0].t < newest - state.window) state.points.shift();
}

window.brownoutCharts = {
  history(h) {
    state.window = h.window || state.window;
    state.kinds = h.answer_kinds && h.answer_kinds.length ? h.answer_kinds : KINDS_DEFAULT;
    state.points = (h.points || []).slice();
    trim();
    drawAll();
  },
  sample(point) {
    state.points.push(point);
    trim();
    drawAll();
  },
};

let resizing = 0;
window.addEventListener("resize", () => {
  clearTimeout(resizing);
  resizing = setTimeout(drawAll, 150);
});
