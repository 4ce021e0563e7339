// fedloom dashboard: the run list, and the selected run's curves fed by its metrics stream (SSE).
"use strict";
const state = { run: null, source: null, rows: new Map(), pending: false };
const LAYOUT = { margin: { t: 40, r: 10, b: 40, l: 55 }, legend: { orientation: "h", y: -0.2 } };
const CONFIG = { responsive: true, displaylogo: false };

function api(path) { return fetch(path).then((r) => (r.ok ? r.json() : null)); }

function runButton(run) {
  const button = document.createElement("button");
  button.dataset.run = run.name;
  button.className = run.name === state.run ? "selected" : "";
  const value = run.value == null ? "" : ` · ${run.metric} ${Number(run.value).toFixed(4)}`;
  button.textContent = `${run.name} (round ${run.rounds}${value})`;
  const status = document.createElement("span");
  status.className = `status ${run.status}`;
  status.textContent = run.status;
  button.prepend(status);
  button.onclick = () => selectRun(run.name);
  return button;
}

async function loadRuns() {
  const runs = (await api("/api/runs")) || [];
  const list = document.getElementById("runs");
  list.replaceChildren(...runs.map(runButton));
  if (!runs.length) list.textContent = "no run directories yet";
}

function selectRun(name) {
  if (state.source) state.source.close();
  state.run = name;
  state.rows = new Map();
  document.getElementById("title").textContent = name;
  document.querySelectorAll("#runs button").forEach((b) => b.classList.toggle("selected", b.dataset.run === name));
  ["metric", "loss", "bytes", "participation", "sizes", "labels", "graph", "clients"].forEach((id) => Plotly.purge(id));
  api(`/api/runs/${encodeURIComponent(name)}/partition`).then((p) => p && drawPartition(p));
  api(`/api/runs/${encodeURIComponent(name)}/graph`).then((g) => g && drawGraph(g));
  loadSummary(name);
  const source = new EventSource(`/api/runs/${encodeURIComponent(name)}/stream`);
  source.onmessage = (event) => addRecord(JSON.parse(event.data));
  source.addEventListener("end", () => { source.close(); loadRuns(); loadSummary(name); });
  state.source = source;
}

function addRecord(record) {
  if (record.round == null) return;
  if (!state.rows.size) loadRuns();  // a run first listed as starting shows as running from its first round
  state.rows.set(record.round, Object.assign(state.rows.get(record.round) || {}, record));
  if (!state.pending) {  // one redraw for a burst of lines
    state.pending = true;
    setTimeout(() => { state.pending = false; drawCurves(); }, 100);
  }
}

function series(rows, key, scale = 1) {
  const kept = rows.filter((r) => r[key] != null);
  return { x: kept.map((r) => r.round), y: kept.map((r) => r[key] * scale), name: key, mode: "lines+markers" };
}

function plot(id, title, traces, ytitle) {
  const shown = traces.filter((t) => t.x.length);
  if (!shown.length) return;
  Plotly.react(id, shown, { ...LAYOUT, title: { text: title }, xaxis: { title: { text: "round" } },
    yaxis: { title: { text: ytitle } } }, CONFIG);
}

function drawCurves() {
  const rows = [...state.rows.keys()].sort((a, b) => a - b).map((r) => state.rows.get(r));
  const keys = new Set(rows.flatMap(Object.keys));
  const metrics = [...keys].filter((k) => /^(central|federated)_/.test(k) && !k.endsWith("_loss")).sort();
  const losses = ["train_loss", "central_loss", "federated_loss"].filter((k) => keys.has(k));
  plot("metric", "central metric", metrics.map((k) => series(rows, k)), "");
  plot("loss", "loss", losses.map((k) => series(rows, k)), "loss");
  plot("bytes", "cumulative uplink", [series(rows, "bytes_up_total", 1e-6)], "MB");
  drawParticipation(rows);
  document.getElementById("charts").dataset.rounds = String(rows.length);
}

function drawParticipation(rows) {
  const x = [], y = [];
  rows.forEach((r) => (r.clients_submitted || []).forEach((c) => { x.push(r.round); y.push(c); }));
  if (!x.length) return;
  Plotly.react("participation", [{ x, y, mode: "markers", type: "scatter", marker: { size: 5 }, name: "submitted" }],
    { ...LAYOUT, title: { text: "clients that took part" }, xaxis: { title: { text: "round" } },
      yaxis: { title: { text: "client" } } }, CONFIG);
}

function drawPartition(stats) {
  const sizes = stats.train_sizes || [];
  Plotly.react("sizes", [{ x: sizes.map((_, i) => i), y: sizes, type: "bar", name: "train examples" }],
    { ...LAYOUT, title: { text: "client sizes" }, xaxis: { title: { text: "client" } } }, CONFIG);
  if (stats.label_histogram) {
    Plotly.react("labels", [{ z: stats.label_histogram, type: "heatmap", colorscale: "Blues" }],
      { ...LAYOUT, title: { text: "labels per client" }, xaxis: { title: { text: "label" } },
        yaxis: { title: { text: "client" } } }, CONFIG);
  }
}

loadRuns();
setInterval(loadRuns, 3000);

function loadSummary(name) {  // the per-client histogram is drawn from the summary, written when the run ends
  api(`/api/runs/${encodeURIComponent(name)}/summary`).then((s) => s && state.run === name && drawClients(s));
}

function drawGraph(graph) {  // nodes on a circle, edges as one line trace broken by nulls; Byzantine nodes red
  const angle = (i) => (2 * Math.PI * i) / graph.n_nodes;
  const px = (i) => Math.cos(angle(i)), py = (i) => Math.sin(angle(i));
  const ex = [], ey = [];
  graph.edges.forEach(([a, b]) => { ex.push(px(a), px(b), null); ey.push(py(a), py(b), null); });
  const nodes = [...Array(graph.n_nodes).keys()];
  const byzantine = new Set(graph.byzantine || []);
  Plotly.react("graph", [
    { x: ex, y: ey, mode: "lines", type: "scatter", line: { width: 1, color: "#999" }, hoverinfo: "skip", name: "edges" },
    { x: nodes.map(px), y: nodes.map(py), mode: "markers", type: "scatter", text: nodes.map(String), name: "nodes",
      marker: { size: 8, color: nodes.map((i) => (byzantine.has(i) ? "crimson" : "steelblue")) } },
  ], { ...LAYOUT, title: { text: `gossip graph: ${graph.name}, ${graph.n_nodes} nodes` }, showlegend: false,
    xaxis: { visible: false }, yaxis: { visible: false, scaleanchor: "x" } }, CONFIG);
}

function drawClients(summary) {  // each client's final metric on its own test split: global (and personalized) models
  const key = Object.keys(summary).find((k) => k.startsWith("per_client_"));
  if (!key) return;
  const values = summary[key];
  const traces = [["global", "global model"], ["personal", "personalized models"]]
    .filter(([k]) => values[k] && values[k].length)
    .map(([k, name]) => ({ x: values[k], type: "histogram", name, opacity: 0.6 }));
  if (!traces.length) return;
  const metric = key.slice("per_client_".length);
  Plotly.react("clients", traces, { ...LAYOUT, barmode: "overlay", title: { text: `per-client ${metric}` },
    xaxis: { title: { text: metric } }, yaxis: { title: { text: "clients" } } }, CONFIG);
}
