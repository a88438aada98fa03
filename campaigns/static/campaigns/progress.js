// Live campaign progress: polls the admin's progress endpoint and redraws the panel in place.
// Stops once the campaign is final; backs off (up to 10 s) while the endpoint fails.
(function () {
  "use strict";
  const panel = document.getElementById("campaign-live");
  if (!panel) return;
  const url = panel.dataset.progressUrl;
  const bar = document.getElementById("campaign-progress");
  let delay = 1000;

  function setText(selector, value) {
    panel.querySelectorAll(selector).forEach((el) => { el.textContent = value; });
  }

  function redrawFailures(rows) {
    const body = document.querySelector("#campaign-failures tbody");
    body.replaceChildren();
    if (!rows.length) {
      const tr = body.insertRow();
      const td = tr.insertCell();
      td.colSpan = 4;
      td.textContent = "No failures or retries yet.";
      return;
    }
    for (const row of rows) {
      const tr = body.insertRow();
      for (const value of [row.platform, row.outcome, row.reason, row.count]) {
        tr.insertCell().textContent = value;  // textContent: provider reasons are untrusted text
      }
    }
  }

  // Which buttons apply in which state (the server refuses the others anyway).
  const ALLOWED = {
    launch: ["draft"],
    pause: ["running"],
    resume: ["paused", "halted"],
    cancel: ["draft", "scheduled", "running", "paused", "halted"],
    duplicate: null,
  };

  function formatEta(iso) {
    if (!iso) return "—";
    const seconds = Math.max(0, Math.round((Date.parse(iso) - Date.now()) / 1000));
    const when = new Date(iso).toLocaleTimeString();
    if (seconds < 90) return `${seconds} s (${when})`;
    if (seconds < 5400) return `${Math.round(seconds / 60)} min (${when})`;
    return `${(seconds / 3600).toFixed(1)} h (${when})`;
  }

  // --- the chart: inline SVG, no library --------------------------------------------------------
  // The stored series has one row per interval ([start, width, delivered, failed, invalid,
  // retried, expired], at most ~240 rows: campaigns/series.py merges old intervals), so the chart
  // is a step line per figure, each interval at its own rate; a gap between rows is zero.
  const SVG_NS = "http://www.w3.org/2000/svg";
  const W = 900, H = 260, LEFT = 56, RIGHT = 12, TOP = 12, BOTTOM = 30;
  const LINES = [
    ["delivered", (r) => r.delivered],
    ["errors", (r) => r.failed + r.invalid],
    ["retries", (r) => r.retried],
  ];

  function svg(name, attrs, text) {
    const el = document.createElementNS(SVG_NS, name);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
    if (text !== undefined) el.textContent = text;
    return el;
  }

  function niceMax(value) {
    if (value <= 0) return 1;
    const step = Math.pow(10, Math.floor(Math.log10(value)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * step >= value) return m * step;
    return 10 * step;
  }

  function clock(seconds) {
    const s = Math.round(seconds);
    if (s < 3600) return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
    return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}`;
  }

  function drawChart(series, now, final) {
    const chart = document.getElementById("campaign-chart");
    if (!chart || !series) return;
    const fields = series.fields;
    const rows = series.rows.map((values) => Object.fromEntries(fields.map((f, i) => [f, values[i]])));
    chart.replaceChildren();
    chart.dataset.points = String(rows.length);
    if (!rows.length) {
      chart.append(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "axis-label" }, "No answers yet."));
      return;
    }
    const merged = new Set(rows.map((r) => r.width)).size > 1;
    const last = rows[rows.length - 1];
    // The newest interval may still be filling: rate it by its elapsed part.
    if (!final && now > last.start && now < last.start + last.width) last.width = Math.max(1, now - last.start);
    const t0 = rows[0].start;
    const t1 = Math.max(last.start + last.width, t0 + 10);
    let peak = 0;
    for (const r of rows) for (const [, pick] of LINES) peak = Math.max(peak, pick(r) / r.width);
    const ymax = niceMax(peak);
    const x = (t) => LEFT + ((t - t0) / (t1 - t0)) * (W - LEFT - RIGHT);
    const y = (v) => TOP + (1 - v / ymax) * (H - TOP - BOTTOM);
    for (let i = 0; i <= 4; i++) {
      const v = (ymax * i) / 4;
      chart.append(svg("line", { x1: LEFT, x2: W - RIGHT, y1: y(v), y2: y(v), class: "grid" }));
      chart.append(svg("text", { x: LEFT - 6, y: y(v) + 4, "text-anchor": "end", class: "axis-label" },
        v >= 100 ? Math.round(v) : +v.toFixed(1)));
    }
    for (let i = 0; i <= 6; i++) {
      const t = t0 + ((t1 - t0) * i) / 6;
      chart.append(svg("text", { x: x(t), y: H - 10, "text-anchor": "middle", class: "axis-label" }, clock(t - t0)));
    }
    for (const [name, pick] of LINES) {
      const points = [];
      let end = null;
      for (const r of rows) {
        if (end !== null && r.start > end) points.push([x(end), y(0)], [x(r.start), y(0)]);
        const rate = pick(r) / r.width;
        points.push([x(r.start), y(rate)], [x(r.start + r.width), y(rate)]);
        end = r.start + r.width;
      }
      chart.append(svg("polyline", {
        class: `line series-${name}`,
        "data-series": name,
        points: points.map(([px, py]) => `${px.toFixed(1)},${py.toFixed(1)}`).join(" "),
      }));
    }
    setText('[data-field="chart_note"]', `${rows.length} intervals` + (merged ? ", older ones merged" : ""));
  }

  const SHARES = ["delivered", "invalid_token", "retry", "rejected", "auth_failure"];

  function drawShares(providers) {
    const box = document.getElementById("provider-shares");
    if (!box || !providers) return;
    box.replaceChildren();
    const names = Object.keys(providers);
    if (!names.length) {
      const p = document.createElement("p");
      p.className = "empty";
      p.textContent = "No answers yet.";
      box.append(p);
      return;
    }
    for (const name of names) {
      const outcomes = providers[name];
      const total = Object.values(outcomes).reduce((a, b) => a + b, 0) || 1;
      const row = document.createElement("div");
      row.className = "share-row";
      row.dataset.provider = name;
      const label = document.createElement("span");
      label.className = "share-name";
      label.textContent = name;
      const bar = document.createElement("div");
      bar.className = "share-bar";
      const parts = [];
      for (const outcome of SHARES) {
        const n = outcomes[outcome] || 0;
        if (!n) continue;
        const seg = document.createElement("span");
        seg.className = `seg-${outcome}`;
        seg.style.width = `${(100 * n) / total}%`;
        seg.title = `${outcome}: ${n}`;
        bar.append(seg);
        parts.push(`${outcome} ${((100 * n) / total).toFixed(1)}%`);
      }
      const text = document.createElement("span");
      text.className = "share-text";
      text.textContent = parts.join(" · ");
      row.append(label, bar, text);
      box.append(row);
    }
  }

  function redrawVersions(rows) {
    const body = document.querySelector("#campaign-versions tbody");
    if (!body || !rows) return;
    body.replaceChildren();
    if (!rows.length) {
      const td = body.insertRow().insertCell();
      td.colSpan = 7;
      td.textContent = "No answers yet.";
      return;
    }
    for (const row of rows) {
      const tr = body.insertRow();
      const success = row.success === null ? "—" : `${row.success}%`;
      for (const value of [row.provider, row.version, row.answers, row.delivered, row.invalid, row.failed, success]) {
        tr.insertCell().textContent = value;  // textContent: app versions are client-supplied text
      }
    }
  }

  function draw(data) {
    bar.max = Math.max(data.counters.targeted, 1);
    bar.value = data.processed;
    for (const [name, value] of Object.entries(data.counters)) setText(`[data-counter="${name}"]`, value);
    setText('[data-field="status"]', data.status);
    setText('[data-field="status_reason"]', data.status_reason || "");
    setText('[data-field="percent"]', data.percent);
    setText('[data-field="rate"]', data.progress.rate_per_s);
    setText('[data-field="eta"]', formatEta(data.progress.eta));
    panel.querySelectorAll("button[data-action]").forEach((button) => {
      const allowed = ALLOWED[button.dataset.action];
      button.disabled = allowed !== null && !allowed.includes(data.status);
    });
    setText('[data-field="dead_letters"]', data.dead_letters);
    setText('[data-field="updated"]', new Date().toLocaleTimeString());
    redrawFailures(data.failures || []);
    drawChart(data.series, data.now, data.final);
    drawShares(data.providers);
    redrawVersions(data.versions);
  }

  async function poll() {
    try {
      const response = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const data = await response.json();
      draw(data);
      delay = 1000;
      if (data.final) return;
    } catch (err) {
      setText('[data-field="updated"]', `failed (${err.message}), retrying`);
      delay = Math.min(delay * 2, 10000);
    }
    setTimeout(poll, delay);
  }
  poll();
})();
