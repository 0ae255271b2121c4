// tiproxy status page: polls the JSON API once a second and redraws.
// Rates are differences between samples kept here in the browser (the
// proxy keeps no history for the page). Text from clients (user names,
// databases) goes in through textContent only.
"use strict";

const POLL_MS = 1000;
const WINDOW_S = 120; // samples kept for the moves chart
const MINUTE_MS = 60000;

const samples = []; // {t, status}
let prevCommands = null; // Map(connection id -> commands) at the previous poll
let prevPollAt = 0;

const $ = (id) => document.getElementById(id);

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function row(cells, attrs) {
  const tr = el("tr");
  for (const c of cells) tr.appendChild(c instanceof Node ? c : el("td", c));
  for (const [k, v] of Object.entries(attrs || {})) tr.setAttribute(k, v);
  return tr;
}

function fill(tableId, rows) {
  const body = document.querySelector(`#${tableId} tbody`);
  body.replaceChildren(...rows);
}

function age(ms) {
  if (ms < 1000) return "just now";
  if (ms < 60000) return `${(ms / 1000).toFixed(0)} s ago`;
  if (ms < 3600000) return `${(ms / 60000).toFixed(0)} min ago`;
  return `${(ms / 3600000).toFixed(1)} h ago`;
}

function rate(n) {
  return n >= 100 ? n.toFixed(0) : n.toFixed(1);
}

async function getJSON(path) {
  const r = await fetch(path, { cache: "no-store", signal: AbortSignal.timeout(3000) });
  if (!r.ok) throw new Error(`${path}: HTTP ${r.status}`);
  return r.json();
}

// The sample closest to `ms` ago (or the oldest one).
function sampleAgo(now, ms) {
  let best = samples[0];
  for (const s of samples) {
    if (now - s.t >= ms) best = s;
    else break;
  }
  return best;
}

// Queries per second per backend from the sessions' command counts; null on
// the first poll (nothing to compare with yet).
function perBackendQps(sessions, now) {
  const first = prevCommands === null;
  const counts = new Map(sessions.map((s) => [s.connection_id, s.commands || 0]));
  const qps = new Map();
  if (!first) {
    const dt = Math.max((now - prevPollAt) / 1000, 0.001);
    for (const s of sessions) {
      if (!s.backend) continue;
      // A session that is new since the last poll ran all its commands since.
      const d = (s.commands || 0) - (prevCommands.get(s.connection_id) || 0);
      qps.set(s.backend, (qps.get(s.backend) || 0) + Math.max(d, 0) / dt);
    }
  }
  prevCommands = counts;
  prevPollAt = now;
  return first ? null : qps;
}

// A 0.0-1.0 share as a percentage; "–" when unknown.
function pct(v) {
  return typeof v === "number" ? `${(v * 100).toFixed(0)}%` : "–";
}

function drawBackends(backends, qps) {
  fill("backends", backends.map((b) => {
    const state = el("td", b.state, `state state-${b.state}`);
    if (b.manually_drained) state.textContent += " (by operator)";
    return row([
      b.addr,
      state,
      b.connections,
      qps ? rate(qps.get(b.addr) || 0) : "–",
      b.incoming_moves > 0 ? b.incoming_moves : "",
      b.status_addr || "–",
      b.supports_migration ? "yes" : "no",
      pct(b.cpu_usage),
      pct(b.memory_usage),
      b.zone || "",
      Object.entries(b.score || {}).map(([f, v]) => `${f} ${v}`).join(", "),
    ], { "data-addr": b.addr });
  }));
}

function drawSessions(sessions) {
  const MAX = 200;
  $("session-count").textContent = sessions.length > MAX
    ? `(${sessions.length}, first ${MAX} shown)` : `(${sessions.length})`;
  fill("sessions", sessions.slice(0, MAX).map((s) => row([
    s.connection_id, s.client, s.backend || "–", s.user, s.db || "",
    s.in_transaction ? "yes" : "", age(s.idle_ms),
  ], { "data-connection-id": s.connection_id })));
}

function drawMovesChart(now) {
  const svg = $("moves-chart");
  const ns = "http://www.w3.org/2000/svg";
  const bars = [];
  for (let i = 1; i < samples.length; i++) {
    const a = samples[i - 1], b = samples[i];
    const dt = Math.max((b.t - a.t) / 1000, 0.001);
    bars.push({
      x: WINDOW_S - (now - b.t) / 1000,
      ok: (b.status.migrations.succeeded - a.status.migrations.succeeded) / dt,
      bad: (b.status.migrations.failed - a.status.migrations.failed) / dt,
    });
  }
  const max = Math.max(1, ...bars.map((p) => p.ok + p.bad));
  const w = 300 / WINDOW_S, h = 60;
  const rects = [];
  for (const p of bars) {
    const x = (p.x / WINDOW_S) * 300;
    const okH = (p.ok / max) * h, badH = (p.bad / max) * h;
    for (const [height, y, cls] of [[okH, h - okH, "ok"], [badH, h - okH - badH, "bad"]]) {
      if (height <= 0) continue;
      const r = document.createElementNS(ns, "rect");
      r.setAttribute("x", x.toFixed(2));
      r.setAttribute("y", y.toFixed(2));
      r.setAttribute("width", w.toFixed(2));
      r.setAttribute("height", height.toFixed(2));
      r.setAttribute("class", cls);
      rects.push(r);
    }
  }
  svg.replaceChildren(...rects);
  $("window").textContent = `${WINDOW_S} s (peak ${rate(max)}/s)`;
}

function drawCounters(status, now) {
  const old = sampleAgo(now, MINUTE_MS).status;
  const m = status.migrations, om = old.migrations;
  fill("moves", [
    row(["succeeded", m.succeeded - om.succeeded, m.succeeded]),
    row(["failed", m.failed - om.failed, m.failed], { class: m.failed > om.failed ? "alert" : "" }),
    // Crash protection: sessions restored on another TiDB after theirs died.
    row(["restored after a TiDB crash", ((status.restores || {}).ok || 0) - ((old.restores || {}).ok || 0), (status.restores || {}).ok || 0]),
    row(["protected sessions (now)", "", status.protected_sessions || 0]),
  ]);
  const errors = [
    ["query errors (backend ERR)", status.query_errors, old.query_errors],
    ["failed session moves", m.failed, om.failed],
    ["connections rejected (max-connections)", status.connections_rejected, old.connections_rejected],
  ];
  for (const [type, n] of Object.entries(status.disconnections).sort()) {
    if (type === "success") continue;
    errors.push([`disconnected: ${type}`, n, old.disconnections[type] || 0]);
  }
  fill("errors", errors.map(([name, n, before]) =>
    row([name, n - before, n], { class: n > before ? "alert" : "" })));
}

function drawSummary(status, now) {
  $("version").textContent = status.version;
  const health = $("health");
  health.textContent = status.unhealthy_reason ? `unhealthy: ${status.unhealthy_reason}` : "serving";
  health.className = `badge ${status.unhealthy_reason ? "bad" : "ok"}`;
  const vip = $("vip"), v = status.vip;
  vip.hidden = !v;
  if (v) {
    const who = v.holding ? "held here" : v.owner ? `owner ${v.owner}` : "no owner";
    vip.textContent = `VIP ${v.virtual_ip}: ${who}${v.error ? ` (${v.error})` : ""}`;
    vip.className = `badge ${v.error ? "bad" : "ok"}`;
  }
  $("connections").textContent = status.connections;
  $("pending").textContent = status.pending_migrations;
  const prev = samples.length > 1 ? samples[samples.length - 2] : null;
  if (prev) {
    const dt = Math.max((now - prev.t) / 1000, 0.001);
    $("qps").textContent = rate((status.queries - prev.status.queries) / dt);
    $("eps").textContent = rate((status.query_errors - prev.status.query_errors) / dt);
  }
}

async function poll() {
  try {
    const [status, backends, sessions] = await Promise.all([
      getJSON("/api/status"), getJSON("/api/backends"), getJSON("/api/sessions"),
    ]);
    const now = Date.now();
    samples.push({ t: now, status });
    while (samples.length > 0 && now - samples[0].t > WINDOW_S * 1000) samples.shift();
    drawSummary(status, now);
    drawBackends(backends, perBackendQps(sessions, now));
    drawSessions(sessions);
    drawCounters(status, now);
    drawMovesChart(now);
    $("updated").textContent = `updated ${new Date(now).toLocaleTimeString()}`;
    $("updated").className = "";
  } catch (e) {
    $("updated").textContent = `cannot reach the API (${e.message}); retrying`;
    $("updated").className = "bad";
  }
  setTimeout(poll, POLL_MS);
}

poll();
