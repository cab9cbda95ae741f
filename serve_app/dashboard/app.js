// LLM Proxifier dashboard. Live data comes over one server-sent-events stream
// (/dashboard/stream), read with fetch so the API key can travel in a header; every name that
// comes from the configuration is put in the page as text (textContent), never as HTML.
"use strict";

const KEY_STORAGE = "proxifier.key";
const HISTORY_SECONDS = 300;
const state = { models: [], events: [], history: {}, view: "overview", logsFor: null, caller: null };
// Which permission each kind of button needs (the API's own table: README, Permissions).
const NEEDS = { start: "models", stop: "models", reload: "models", "start-all": "models",
  "stop-all": "models", validate: "config", "config-reload": "config", backup: "config",
  restore: "config" };
// States a model action makes no sense in: why the button is off.
const NOT_IN = {
  start: { ready: "it is ready", starting: "it is starting", restarting: "it is restarting",
    stopping: "it is stopping" },
  stop: { stopped: "it is stopped", stopping: "it is stopping", failed: "it holds nothing (failed)" },
  reload: { stopped: "it is not running", stopping: "it is stopping", failed: "it is not running" },
};

// ---------------------------------------------------------------- helpers
const $ = (selector) => document.querySelector(selector);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child ?? "")));
  }
  return node;
}

const STARTING = new Set(["starting", "restarting"]);
const LEAVING = new Set(["draining", "stopping", "stopped", "failed"]);  // not counted as replicas

// A node as people know it: its address, with the start of Ray's id to tell two apart.
function nodeName(address, nodeId) {
  if (!nodeId) return address || "-";
  return address ? `${address} (${nodeId.slice(0, 6)})` : nodeId.slice(0, 6);
}

function ago(seconds) {
  if (seconds === null || seconds === undefined) return "-";
  if (seconds < 60) return `${Math.round(seconds)}s`;
  if (seconds < 3600) return `${Math.round(seconds / 60)}m`;
  return `${(seconds / 3600).toFixed(1)}h`;
}

function bytes(n) {
  if (!n) return "-";
  return n > 1 << 30 ? `${(n / (1 << 30)).toFixed(1)} GiB` : `${(n / (1 << 20)).toFixed(0)} MiB`;
}

function notify(message, ok = false) {
  const box = $("#notice");
  box.textContent = message;
  box.className = ok ? "ok" : "";
  box.hidden = false;
  clearTimeout(notify.timer);
  notify.timer = setTimeout(() => { box.hidden = true; }, 6000);
}

// Whether this tab's key may do what a button does (null: not known, the API decides).
function may(permission) {
  const granted = state.caller && state.caller.permissions;
  return !granted || granted.includes("admin") || granted.includes(permission);
}

// A button the key or the model's state cannot use is shown off, with the reason as its title.
function gate(button, action, modelState) {
  const permission = NEEDS[action];
  let why = null;
  if (permission && !may(permission)) why = `needs a key with the ${permission} permission`;
  else if (modelState && NOT_IN[action] && NOT_IN[action][modelState]) why = `not now: ${NOT_IN[action][modelState]}`;
  button.disabled = why !== null;
  button.title = why || "";
  return button;
}

function gatePage() {
  for (const button of document.querySelectorAll("[data-action]")) {
    const action = button.dataset.action === "reload" ? "config-reload" : button.dataset.action;
    gate(button, action);
  }
}

function headers() {
  const key = sessionStorage.getItem(KEY_STORAGE);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// ---------------------------------------------------------------- the API key
function askForKey(reason) {
  return new Promise((resolve) => {
    const dialog = $("#key-dialog");
    $("#key-reason").textContent = reason;
    $("#key-input").value = "";
    dialog.returnValue = "";
    dialog.onclose = () => {
      if (dialog.returnValue === "save" && $("#key-input").value) {
        sessionStorage.setItem(KEY_STORAGE, $("#key-input").value.trim());
        resolve(true);
      } else resolve(false);
    };
    dialog.showModal();
  });
}

async function api(method, path, body) {
  for (let attempt = 0; attempt < 3; attempt++) {
    const options = { method, headers: { ...headers() } };
    if (body !== undefined) {
      options.headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(body);
    }
    const response = await fetch(path, options);
    const data = await response.json().catch(() => ({}));
    if (response.status === 401) {
      const message = data.error ? data.error.message : "This action needs an API key.";
      if (await askForKey(message)) continue;
      throw new Error(message);
    }
    if (!response.ok) throw new Error(data.error ? data.error.message : `HTTP ${response.status}`);
    return data;
  }
  throw new Error("no valid API key");
}

async function act(method, path, body, done) {
  try {
    const result = await api(method, path, body);
    if (done) notify(done, true);
    return result;
  } catch (error) {
    notify(error.message);
    return null;
  }
}

// ---------------------------------------------------------------- live stream
async function connect() {
  let delay = 1000;
  for (;;) {
    try {
      const response = await fetch("/dashboard/stream", { headers: headers() });
      if (response.status === 401 || response.status === 403) {
        setLive("down", response.status === 401 ? "needs a key" : "key not allowed");
        const data = await response.json().catch(() => ({}));
        const given = await askForKey(data.error ? data.error.message : "This dashboard needs an API key.");
        if (!given) {
          await new Promise((r) => setTimeout(r, delay));
          delay = Math.min(delay * 2, 10000);
        }
        continue;
      }
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      setLive("live", "live");
      delay = 1000;
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          handleEvent(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
        }
      }
      throw new Error("stream ended");
    } catch (error) {
      setLive("down", "reconnecting");
      await new Promise((r) => setTimeout(r, delay));
      delay = Math.min(delay * 2, 10000);
    }
  }
}

function setLive(kind, text) {
  $("#live").className = `dot ${kind}`;
  $("#live-text").textContent = text;
}

function handleEvent(block) {
  let type = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) type = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
  }
  if (!data.length) return;
  const payload = JSON.parse(data.join("\n"));
  if (type === "stats") onStats(payload);
  else if (type === "events") onEvents(payload);
  else if (type === "caller") { state.caller = payload; gatePage(); }
}

function onStats(payload) {
  state.models = payload.models;
  const now = Date.now() / 1000;
  for (const model of payload.models) {
    const series = (state.history[model.name] ||= []);
    series.push({ t: now, depth: model.queue_depth || 0, wait: model.oldest_wait || 0 });
    while (series.length && series[0].t < now - HISTORY_SECONDS) series.shift();
  }
  render();
}

function onEvents(events) {
  for (const event of events) state.events.unshift(event);
  state.events.length = Math.min(state.events.length, 300);
  if (events.some((e) => ["config_reloaded", "config_restored", "config_backup"].includes(e.kind))
      && state.view === "config") loadConfig();
  if (state.view === "events") renderEvents();
}

// ---------------------------------------------------------------- views
function render() {
  renderModels();
  if (state.view === "groups") renderGroups();
  if (state.view === "queues") renderQueues();
  if (state.logsFor) loadLogs(state.logsFor);
}

function modelActions(model) {
  const name = encodeURIComponent(model.name);
  const cell = el("td", { class: "actions" });
  cell.append(
    gate(el("button", { "data-model": model.name, "data-do": "start",
      onclick: () => act("POST", `/admin/models/${name}/start`, undefined, `${model.name}: started`) }, "Start"),
      "start", model.state),
    " ",
    gate(el("button", { "data-model": model.name, "data-do": "stop",
      onclick: () => stopModel(model) }, "Stop"), "stop", model.state),
    " ",
    gate(el("button", { "data-model": model.name, "data-do": "reload",
      onclick: () => act("POST", `/admin/models/${name}/reload`, undefined, `${model.name}: reloaded`) }, "Reload"),
      "reload", model.state),
    " ",
    el("button", { "data-model": model.name, "data-do": "logs", onclick: () => loadLogs(model.name) }, "Log"),
  );
  return cell;
}

async function stopModel(model) {
  const name = encodeURIComponent(model.name);
  let path = `/admin/models/${name}/stop`;
  if (model.preload) {
    if (!confirm(`${model.name} is preloaded. Stop it anyway?`)) return;
    path += "?force=true";
  }
  await act("POST", path, undefined, `${model.name}: stopped`);
}

function renderModels() {
  const body = $("#models tbody");
  body.replaceChildren(...state.models.flatMap((m) => [modelRow(m), ...replicaRows(m)]));
}

// A model with replicas: its row sums them (and says how many of how many wanted), and one
// row under it per replica shows where that one runs and what it holds.
function replicaRows(m) {
  if (!m.replicas) return [];
  const now = Date.now() / 1000;
  return m.replicas.map((r) => el("tr", { class: "replica", "data-replica": r.name },
    el("td", {}, `↳ ${r.name}`),
    el("td", {}, el("span", { class: `state state-${r.state}`, "data-state": r.state }, r.state)),
    el("td", {}), el("td", {}),
    el("td", { class: "node", title: r.node_id || "" }, nodeName(r.host, r.node_id),
      r.gpu_ids && r.gpu_ids.length ? ` GPU ${r.gpu_ids.join(",")}` : ""),
    el("td", {}, r.host ? `${r.host}:${r.port}` : "-"),
    el("td", {}, r.slots ? `${r.in_flight ?? 0}/${r.slots}` : (r.in_flight ?? 0)),
    el("td", {}, r.queue_depth ?? 0),
    el("td", {}, r.state === "ready" && r.ready_at ? ago(now - r.ready_at) : "-"),
    el("td", {}), el("td", {}), el("td", {}),
    el("td", { class: "waiting", title: r.waiting_for || "" }, r.waiting_for ? `waiting: ${r.waiting_for.split("\n")[0]}` : ""),
    el("td", {}),
  ));
}

function modelRow(m) {
  const counted = m.replicas ? m.replicas.filter((r) => !LEAVING.has(r.state)).length : 0;
  return el("tr", { "data-model": m.name },
    el("td", {}, m.name,
      m.desired ? el("span", { class: "replicas", title: m.desired.reason }, ` ${counted}/${m.desired.replicas}`) : ""),
    el("td", {}, el("span", { class: `state state-${m.state}`, "data-state": m.state }, m.state),
      // a model fetched from Hugging Face: how far its download has come
      m.progress ? el("span", { class: "progress" }, ` ${m.progress}`) : "",
      // a model loading: for how long so far (its llama-server started then)
      STARTING.has(m.state) && m.started_at
        ? el("span", { class: "elapsed" }, ` for ${ago(Date.now() / 1000 - m.started_at)}`) : ""),
    el("td", {}, m.priority),
    el("td", {}, m.resource_group),
    el("td", { class: "node", title: m.node_id || "" }, nodeName(m.host, m.node_id)),
    el("td", {}, m.host ? `${m.host}:${m.port}` : "-"),
    el("td", {}, m.in_flight ?? 0),
    el("td", {}, m.queue_depth ?? 0),
    el("td", {}, m.state === "ready" ? ago(m.uptime) : "-"),
    el("td", {}, m.last_used ? `${ago(Date.now() / 1000 - m.last_used)} ago` : "-"),
    el("td", {}, bytes(m.rss_bytes)),
    el("td", {}, m.restarts ?? 0),
    // Not placed yet: the scheduler's reason (what it waits for) instead of the last error.
    m.waiting_for
      ? el("td", { class: "waiting", title: m.waiting_for }, `waiting: ${m.waiting_for.split("\n")[0]}`)
      : el("td", { class: "error", title: m.last_error || "" }, errorSummary(m.last_error)),
    modelActions(m),
  );
}

// A failure's first line and, when it goes on with a log tail, that tail's last error line
// (llama.cpp marks them E): "...the last lines of its log:" alone says nothing.
function errorSummary(text) {
  const lines = (text || "").split("\n").filter((line) => line.trim());
  if (lines.length <= 1) return lines[0] || "";
  const errors = lines.slice(1).filter((line) => /(^|\s)E\s|error|failed|fatal/i.test(line));
  const last = (errors.length ? errors : lines.slice(1)).at(-1).trim();
  return `${lines[0]} ${last}`;
}

async function loadLogs(name) {
  state.logsFor = name;
  const data = await act("GET", `/admin/models/${encodeURIComponent(name)}/logs?lines=60`);
  if (!data) return;
  $("#logs").hidden = false;
  $("#logs-model").textContent = name;
  $("#logs-text").textContent = data.lines.join("\n");
}

function renderGroups() {
  const groups = {};
  for (const m of state.models) (groups[m.resource_group] ||= []).push(m);
  $("#groups").replaceChildren(...Object.entries(groups).sort().map(([group, members]) => {
    const running = members.filter((m) => ["ready", "starting", "restarting"].includes(m.state)).length;
    const path = `/admin/groups/${encodeURIComponent(group)}`;
    return el("div", { class: "group" },
      el("strong", {}, group), ` ${running}/${members.length} running `,
      el("button", { onclick: () => act("POST", `${path}/start`, undefined, `group ${group}: started`) }, "Start group"),
      " ",
      el("button", { onclick: () => act("POST", `${path}/stop`, undefined, `group ${group}: stopped (preloaded stay)`) }, "Stop group"),
      el("ul", {}, ...members.map((m) => el("li", {}, `${m.name} `,
        el("span", { class: `state state-${m.state}` }, m.state), m.preload ? " preload" : ""))));
  }));
  const ranked = [...state.models].sort((a, b) => b.priority - a.priority || a.name.localeCompare(b.name));
  $("#priorities").replaceChildren(...ranked.map((m) => el("li", {},
    `${m.priority}  ${m.name}  `, el("span", { class: `state state-${m.state}` }, m.state),
    m.preload ? "  preload" : m.auto_start ? "  auto start" : "")));
}

function sparkline(points, key, color) {
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  // The time axis grows with the history (at least a minute), so a page opened a moment ago
  // already shows something readable.
  const now = points.length ? points[points.length - 1].t : 0;
  const span = points.length ? Math.min(HISTORY_SECONDS, Math.max(60, now - points[0].t)) : 60;
  svg.setAttribute("viewBox", `0 0 ${span} 100`);
  svg.setAttribute("preserveAspectRatio", "none");
  if (points.length > 1) {
    const top = Math.max(1, ...points.map((p) => p[key]));
    const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    line.setAttribute("fill", "none");
    line.setAttribute("stroke", color);
    line.setAttribute("stroke-width", "2");
    line.setAttribute("vector-effect", "non-scaling-stroke");
    line.setAttribute("points", points.map((p) =>
      `${span - (now - p.t)},${95 - (p[key] / top) * 85}`).join(" "));
    svg.append(line);
  }
  return svg;
}

function renderQueues() {
  $("#queues").replaceChildren(...state.models.map((m) => {
    const points = state.history[m.name] || [];
    const last = points[points.length - 1] || { depth: 0, wait: 0 };
    const top = (key) => Math.max(0, ...points.map((p) => p[key]));
    return el("div", { class: "chart", "data-model": m.name },
      el("strong", {}, m.name), `  now: ${last.depth} queued, oldest wait ${last.wait.toFixed(1)} s`,
      el("div", { class: "legend depth" }, `queue depth (peak ${top("depth")})`),
      sparkline(points, "depth", "#2f6fed"),
      el("div", { class: "legend wait" }, `oldest wait in s (peak ${top("wait").toFixed(1)})`),
      sparkline(points, "wait", "#f79009"));
  }));
}

function renderEvents() {
  $("#events").replaceChildren(...state.events.map((e) => {
    const when = new Date(e.time * 1000).toLocaleTimeString();
    const details = Object.entries(e)
      .filter(([k]) => !["seq", "time", "kind", "model"].includes(k))
      .map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`).join(" ");
    return el("li", {}, `${when}  ${e.kind}  ${e.model || ""}  ${details}`);
  }));
}

async function loadConfig() {
  const files = await act("GET", "/admin/config/files");
  if (files) {
    $("#models-path").textContent = files.models_path;
    $("#models-yaml").textContent = files.models_yaml;
    $("#auth-path").textContent = files.auth_path ? `${files.auth_path} (keys redacted)` : "no auth file";
    $("#auth-yaml").textContent = files.auth_yaml || "";
  }
  const backups = await act("GET", "/admin/config/backups");
  if (!backups) return;
  $("#backups tbody").replaceChildren(...backups.backups.map((b) => el("tr", {},
    el("td", {}, b.id), el("td", {}, b.created_at), el("td", {}, b.description),
    el("td", {}, gate(el("button", { onclick: () => previewRestore(b.id) }, "Restore…"), "restore")))));
}

async function previewRestore(id) {
  const diff = await act("GET", `/admin/config/backups/${encodeURIComponent(id)}/diff`);
  if (!diff) return;
  $("#restore-id").textContent = id;
  $("#restore-changes").textContent = diff.changes.join("\n") || "no changes";
  $("#restore-preview").hidden = false;
  $("#restore-confirm").onclick = async () => {
    $("#restore-preview").hidden = true;
    await act("POST", `/admin/config/restore/${encodeURIComponent(id)}`, undefined, `restored ${id}`);
    loadConfig();
  };
}

async function loadCluster() {
  const data = await act("GET", "/admin/cluster");
  if (!data) return;
  const names = (node) => node.models.join(", ") || "-";
  const gib = (bytes) => (bytes == null ? "?" : (bytes / 1073741824).toFixed(1));
  // Each GPU: its memory, what is free, and each model's share with what it is expected to need.
  const gpus = (node) => (node.gpus || []).map((g) => {
    const size = g.memory ? `${gib(g.memory)} GiB` : "memory unknown";
    const free = g.free == null ? `${+(1 - g.used_fraction).toFixed(2)} free` : `${gib(g.free)} GiB free`;
    const models = g.models.map((m) => `${m.name} ${m.holds == null ? `x${m.share}` : `${gib(m.holds)} GiB`}`
      + (m.expected ? ` (needs ${gib(m.expected)})` : ""));
    return `GPU ${g.index}: ${size}, ${free}` + (models.length ? `: ${models.join(", ")}` : "");
  }).join("\n") || "-";
  $("#nodes tbody").replaceChildren(...data.nodes.map((n) => el("tr", {},
    el("td", { title: n.node_id }, nodeName(n.address, n.node_id)), el("td", {}, n.alive ? "yes" : "no"),
    el("td", {}, Object.keys(n.resources).filter((k) => !k.startsWith("node:") && !k.startsWith("object_store"))
      .sort().map((k) => k === "memory"
        ? `memory ${gib(n.free[k] ?? 0)}/${gib(n.resources[k])} GiB`
        : `${k} ${+(n.free[k] ?? 0).toFixed(2)}/${+n.resources[k].toFixed(2)}`).join(", ")),
    el("td", {}, Object.entries(n.labels).map(([k, v]) => `${k}=${v}`).join(", ") || "-"),
    el("td", {}, names(n)), el("td", { class: "gpus" }, gpus(n)))));
}

function show(view) {
  state.view = view;
  for (const button of document.querySelectorAll("#tabs button")) {
    button.classList.toggle("active", button.dataset.view === view);
  }
  for (const section of document.querySelectorAll(".view")) {
    section.hidden = section.id !== `view-${view}`;
  }
  if (view === "config") loadConfig();
  if (view === "cluster") loadCluster();
  render();
  if (view === "events") renderEvents();
}

// ---------------------------------------------------------------- wiring
for (const button of document.querySelectorAll("#tabs button")) {
  button.addEventListener("click", () => show(button.dataset.view));
}
const actions = {
  "start-all": () => act("POST", "/admin/start-all", undefined, "starting every model"),
  "stop-all": () => act("POST", "/admin/stop-all", undefined, "stopped every model that is not preloaded"),
  validate: async () => {
    const result = await act("GET", "/admin/config/validate");
    if (result) $("#config-result").textContent = result.valid
      ? `valid\n${result.changes.join("\n") || "no changes against the running config"}`
      : `NOT valid\n${result.errors.join("\n")}`;
  },
  reload: async () => {
    const result = await act("POST", "/admin/config/reload", undefined, "configuration reloaded");
    if (result) $("#config-result").textContent = result.changes.join("\n") || "no changes";
  },
  backup: async () => {
    await act("POST", "/admin/config/backup", { description: $("#backup-description").value }, "backup made");
    loadConfig();
  },
};
for (const button of document.querySelectorAll("[data-action]")) {
  button.addEventListener("click", () => actions[button.dataset.action]());
}
$("#logs-close").addEventListener("click", () => { state.logsFor = null; $("#logs").hidden = true; });
$("#restore-cancel").addEventListener("click", () => { $("#restore-preview").hidden = true; });
$("#key-button").addEventListener("click", () => askForKey("API key for this dashboard (kept for this tab only)."));
$("#key-save").addEventListener("click", (event) => {
  event.preventDefault();
  $("#key-dialog").close("save");
});

connect();
