// Makes the server-rendered status page live. No framework, no build step, no network beyond this gateway.
//  - every second: GET api/points -> values, quality, age, and one more point on each sparkline;
//  - once at start: GET api/history -> the recent history the sparklines start from;
//  - every 5 seconds: GET this page again and swap the [data-section] parts (devices, rules, uplinks, ...), so the
//    HTML is rendered in one place only (the server).
"use strict";

(() => {
  const POINTS_EVERY_MS = 1000;
  const SECTIONS_EVERY_MS = 5000;
  const WINDOW_MS = 5 * 60 * 1000;
  const series = new Map(); // point id -> [[ts_ms, value], ...], oldest first
  const lastTs = new Map(); // point id -> ts (ns) of the last sample appended
  const note = () => document.getElementById("live-note");

  // mirrors page.format_value on the server
  // (JSON drops the difference between 22 and 22.0, so the point's kind says which it is)
  function fmt(value, kind) {
    if (value === null || value === undefined) return "—";
    if (typeof value === "boolean") return value ? "on" : "off";
    if (typeof value === "number" && (kind === "float" || !Number.isInteger(value))) {
      const magnitude = Math.abs(value);
      if (magnitude >= 1000) return Math.round(value).toLocaleString("en-US");
      return value.toFixed(magnitude >= 100 ? 1 : 2);
    }
    return String(value);
  }

  // mirrors page.format_age
  function fmtAge(seconds) {
    if (seconds === null || seconds === undefined) return "never";
    if (seconds < 10) return seconds.toFixed(1) + " s";
    if (seconds < 120) return Math.round(seconds) + " s";
    if (seconds < 7200) return Math.round(seconds / 60) + " min";
    if (seconds < 172800) return Math.round(seconds / 3600) + " h";
    return Math.round(seconds / 86400) + " d";
  }

  async function getJSON(url) {
    const response = await fetch(url, { cache: "no-store", credentials: "same-origin" });
    if (!response.ok) throw new Error(url + ": HTTP " + response.status);
    return response.json();
  }

  function rowOf(point) {
    return document.querySelector('.pt[data-point="' + CSS.escape(point) + '"]');
  }

  function draw(row, points) {
    const line = row.querySelector("svg.spark polyline");
    if (!line) return;
    if (!points || points.length < 2) {
      line.setAttribute("points", "");
      return;
    }
    const t0 = points[0][0];
    const t1 = points[points.length - 1][0];
    let low = Infinity;
    let high = -Infinity;
    for (const [, v] of points) {
      if (v < low) low = v;
      if (v > high) high = v;
    }
    const span = high - low || Math.abs(high) || 1;
    const spanT = t1 - t0 || 1;
    // 2 units of padding top and bottom so the stroke is never clipped
    const coords = points.map(([t, v]) => {
      const x = ((t - t0) / spanT) * 100;
      const y = high === low ? 12 : 22 - ((v - low) / span) * 20;
      return x.toFixed(2) + "," + y.toFixed(2);
    });
    line.setAttribute("points", coords.join(" "));
    row.dataset.plotted = String(points.length);
  }

  function redrawAll() {
    for (const row of document.querySelectorAll(".pt[data-point]")) {
      draw(row, series.get(row.dataset.point));
    }
  }

  function append(point, tsNs, value) {
    if (lastTs.get(point) === tsNs) return;
    lastTs.set(point, tsNs);
    if (typeof value === "boolean") value = value ? 1 : 0;
    if (typeof value !== "number") return;
    const tsMs = Math.floor(tsNs / 1e6);
    let ring = series.get(point);
    if (!ring) series.set(point, (ring = []));
    if (ring.length && ring[ring.length - 1][0] >= tsMs) return; // already in the history we loaded
    ring.push([tsMs, value]);
    while (ring.length && ring[0][0] < tsMs - WINDOW_MS) ring.shift();
  }

  let missingRows = false;

  async function refreshPoints() {
    let points;
    try {
      points = await getJSON("api/points");
    } catch (error) {
      document.body.classList.add("stale");
      if (note()) note().textContent = "connection lost, retrying…";
      return;
    }
    document.body.classList.remove("stale");
    if (note()) note().textContent = "updating every second";
    missingRows = false;
    for (const p of points) {
      const row = rowOf(p.id);
      if (!row) {
        if (p.ts !== null) missingRows = true;
        continue;
      }
      const valueCell = row.querySelector('[data-field="value"]');
      const text = fmt(p.value, p.kind);
      if (valueCell.textContent !== text) {
        valueCell.textContent = text;
        valueCell.title = text; // the whole value when the card is too narrow for it
        row.classList.remove("flash");
        void row.offsetWidth; // restart the highlight animation
        row.classList.add("flash");
      }
      const age = row.querySelector('[data-field="age"]');
      // mirrors page._age_text: a point whose first value is not due yet is pending, not "never"
      age.textContent = p.awaiting && p.age_s === null ? "pending" : fmtAge(p.age_s);
      if (p.awaiting) age.title = p.awaiting;
      else age.removeAttribute("title");
      row.className = row.className.replace(/\bq-\w+/, "q-" + (p.quality || "none"));
      if (p.ts !== null) append(p.id, p.ts, p.value);
      draw(row, series.get(p.id));
    }
  }

  async function refreshSections() {
    let html;
    try {
      const response = await fetch("./", { cache: "no-store", credentials: "same-origin" });
      if (!response.ok) return;
      html = await response.text();
    } catch (error) {
      return;
    }
    const fresh = new DOMParser().parseFromString(html, "text/html");
    for (const part of fresh.querySelectorAll("[data-section]")) {
      const current = document.getElementById(part.id);
      if (current) current.replaceWith(document.adoptNode(part));
    }
    // new points (a rule's derived point appeared): take the new grid and draw it from what we hold
    const grid = fresh.getElementById("points");
    const mine = document.getElementById("points");
    if (grid && mine && (missingRows || grid.dataset.points !== mine.dataset.points)) {
      mine.replaceWith(document.adoptNode(grid));
      redrawAll();
    }
  }

  async function start() {
    try {
      const history = await getJSON("api/history");
      for (const [point, points] of Object.entries(history)) series.set(point, points);
    } catch (error) {
      // the page still works without history: the sparklines fill up from the live values
    }
    redrawAll();
    await refreshPoints();
    setInterval(refreshPoints, POINTS_EVERY_MS);
    setInterval(refreshSections, SECTIONS_EVERY_MS);
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
