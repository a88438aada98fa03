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
