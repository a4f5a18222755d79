/* batchq view and report: draws a job's picture (show/picture.py) with uPlot. */
"use strict";
(function () {
  const BOOT = window.BATCHQ || { mode: "live" };
  const LIVE = BOOT.mode === "live";
  const C = {
    ok: "#16a34a", failed: "#dc2626", blue: "#2563eb", gray: "#9ca3af", amber: "#d97706",
    violet: "#7c3aed", teal: "#0d9488", pink: "#db2777",
  };
  const CAUSE_COLORS = [C.amber, C.violet, C.teal, C.pink, C.blue, C.gray];
  const BINDING_COLORS = {
    "pace": "rgba(37,99,235,0.10)", "endpoint capacity": "rgba(217,119,6,0.16)",
    "pool": "rgba(124,58,237,0.12)", "pool ceiling": "rgba(220,38,38,0.14)",
    "--concurrency": "rgba(107,114,128,0.14)", "input": "rgba(22,163,74,0.10)",
  };
  const $ = (id) => document.getElementById(id);
  const fmt = (n, digits) => n === null || n === undefined ? "–" :
    Number(n).toLocaleString("en-US", { maximumFractionDigits: digits === undefined ? 0 : digits });
  const money = (n) => n === null || n === undefined ? "–" : "$" + fmt(n, n < 10 ? 4 : 2);
  const seconds = (v) => v === null || v === undefined ? "–" : v < 1 ? fmt(v * 1000, v < 0.01 ? 1 : 0) + " ms" : fmt(v, 2) + " s";
  const anyValue = (a) => Array.isArray(a) && a.some((v) => v !== null && v !== undefined);
  const el = (tag, attrs, ...children) => {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v; else if (k === "text") e.textContent = v; else e.setAttribute(k, v);
    }
    for (const c of children) e.append(c);
    return e;
  };

  window.batchqCharts = {};
  window.batchqRefreshes = 0;

  /* ---- headline ---- */
  function renderFigures(f) {
    document.title = "batchq · " + f.name + " · " + f.state;
    $("name").textContent = f.name;
    const state = $("state");
    state.textContent = f.state;
    state.className = "badge " + f.state.replace(" ", "-");
    $("updated").textContent = LIVE ? "updated " + new Date(f.updated * 1000).toLocaleTimeString()
      : "report of " + new Date(f.updated * 1000).toLocaleString();
    $("meta").textContent = [f.model, f.endpoint, f.base_url, f.shards ? f.shards + " shards" : null,
      "input " + f.input].filter(Boolean).join("  ·  ");
    const total = f.total || f.done || 1;
    $("bar-ok").style.width = (100 * f.succeeded / total) + "%";
    $("bar-failed").style.width = (100 * f.failed / total) + "%";
    const pct = f.total ? " (" + fmt(100 * f.done / f.total, 1) + "%)" : "";
    const tiles = [
      ["done", fmt(f.done) + " / " + (f.total === null ? "?" : fmt(f.total)) + pct],
      ["succeeded", fmt(f.succeeded)],
      ["failed", fmt(f.failed), f.failed > 0 ? "bad" : ""],
      ["time running", f.elapsed || "–"],
    ];
    if (f.state === "running") {
      tiles.push(["requests/s now", fmt(f.rate, 1)], ["ETA", f.eta || "–"],
        ["in flight", f.in_flight === null ? "–" : fmt(f.in_flight) + (f.binding ? " (" + f.binding + ")" : "")]);
    } else {
      tiles.push(["requests/s while running", fmt(f.mean_rate, 1)]);
    }
    tiles.push(["tokens in / out", fmt(f.prompt_tokens) + " / " + fmt(f.completion_tokens)]);
    if (f.cost !== null) tiles.push(["cost", money(f.cost)]);
    const notice = $("notice");
    notice.hidden = f.state !== "interrupted";
    notice.textContent = f.state === "interrupted" ? "Stopped with " + fmt(f.pending) +
      " requests not done; this continues it: " + f.resume_command : "";
    $("tiles").replaceChildren(...tiles.map(([k, v, cls]) =>
      el("div", { class: "tile " + (cls || ""), "data-k": k }, el("div", { class: "v", text: v }), el("div", { class: "k", text: k }))));
  }

  /* ---- failures ---- */
  function renderFailures(failures) {
    const card = $("failures-card");
    card.hidden = !failures.total;
    const body = $("failures").tBodies[0];
    body.replaceChildren(...failures.codes.map((c) => {
      const first = c.first;
      const example = el("div", {},
        el("span", { text: "line " + fmt(first.line) + (first.custom_id ? " · " + first.custom_id : "") +
          (first.status ? " · HTTP " + first.status : "") }),
        el("div", { class: "msg", text: first.message }));
      const row = el("tr", { "data-code": c.code },
        el("td", {}, el("code", { text: c.code })), el("td", { class: "num", text: fmt(c.count) }),
        el("td", { class: "num", text: fmt(c.retryable) }), el("td", {}, example));
      if (LIVE) row.addEventListener("click", () => { $("f-status").value = "failed"; $("f-code").value = c.code; browse(1, true); });
      return row;
    }));
    const permanent = failures.total - failures.retryable;
    $("permanent").hidden = !permanent;
    $("permanent").textContent = fmt(permanent) + " of them would fail the same way if sent again (the endpoint refused the request, or the input line is bad): fix those lines; the first example of each code says what was wrong.";
    $("retry").hidden = !failures.retry_command;
    $("retry-command").textContent = failures.retry_command || "";
    const select = $("f-code");
    const chosen = select.value;
    select.replaceChildren(el("option", { value: "", text: "any error code" }),
      ...failures.codes.map((c) => el("option", { value: c.code, text: c.code + " (" + fmt(c.count) + ")" })));
    select.value = chosen;
  }

  /* ---- charts ---- */
  function chartSpecs(s) {
    const causes = Object.keys(s.retries || {});
    const specs = [
      { id: "throughput", title: "Requests done per second", note: "answers written per second; the dashed line is the pace the rate limits allow",
        lines: [["done/s", s.done_rate, C.ok], ["failed/s", s.failed_rate, C.failed], ["pace", s.pace, C.gray, true]] },
      { id: "concurrency", title: "In flight", note: "requests at the endpoint against the pool's allowance; the shading says what held sending back",
        lines: [["in flight", s.in_flight, C.blue], ["allowance", s.allowance, C.gray, true]], bands: s.binding },
      { id: "latency", title: "Latency", note: "of the answers between two points", seconds: true,
        lines: [["p50", s.p50, C.teal], ["p95", s.p95, C.amber], ["p99", s.p99, C.failed]] },
      { id: "limits", title: "429s and retries per minute", note: "429s pause the whole pool; retries by cause (HTTP status or failure kind)",
        lines: [["429s", s.rate_limited, C.failed], ["invalid answers asked again", s.invalid_rate || [], C.violet, false, true], ...causes.map((c, i) => ["retry " + c, s.retries[c], CAUSE_COLORS[i % CAUSE_COLORS.length], true])] },
      { id: "tokens", title: "Tokens per second", note: "as the endpoint's usage reports them",
        lines: [["prompt", s.prompt_tps, C.violet], ["completion", s.completion_tps, C.pink]] },
    ];
    if (anyValue(s.cost)) specs.push({ id: "cost", title: "Cost so far ($)", note: "from the job's price_in and price_out", lines: [["cost", s.cost, C.amber]], money: true });
    // a line with no value is left out, and an optional one (a feature not in use) with no count
    for (const spec of specs) spec.lines = spec.lines.filter(([, data, , , optional], i) =>
      i === 0 || (optional ? data.some((v) => v > 0) : anyValue(data)));
    return specs;
  }

  function bandsPlugin(id) {
    return {
      hooks: {
        drawClear: (u) => {
          // read at each draw: a refresh brings new points (setData) and their bindings
          const bindings = window.batchqCharts[id]?.bands, times = u.data[0];
          if (!bindings) return;
          const ctx = u.ctx;
          const { top, height } = u.bbox;
          for (let i = 1; i < times.length; i++) {
            const color = BINDING_COLORS[bindings[i]];
            if (!color) continue;
            const x0 = u.valToPos(times[i - 1], "x", true), x1 = u.valToPos(times[i], "x", true);
            ctx.fillStyle = color;
            ctx.fillRect(x0, top, x1 - x0, height);
          }
        },
      },
    };
  }

  function chartWidth(box) { return Math.max(300, box.clientWidth - 4); }

  function drawChart(spec, s) {
    let card = $("chart-" + spec.id);
    if (!card) {
      card = el("div", { class: "card chart", id: "chart-" + spec.id },
        el("h2", { text: spec.title }), el("div", { class: "note", text: spec.note }), el("div", { class: "plot" }));
      $("charts").append(card);
    }
    const plot = card.querySelector(".plot");
    const data = [s.t, ...spec.lines.map((l) => l[1].map((v) => v === undefined ? null : v))];
    const key = spec.lines.map((l) => l[0]).join("|");
    const existing = window.batchqCharts[spec.id];
    if (existing && existing.key === key) {
      existing.data = data;
      existing.bands = spec.bands;
      existing.plot.setData(data);
      drawChips(card, spec.bands);
      return;
    }
    if (existing) existing.plot.destroy();
    plot.replaceChildren();
    const opts = {
      width: chartWidth(plot), height: 220,
      scales: { x: { time: true } },
      series: [{}, ...spec.lines.map(([label, , color, dashed]) => ({
        label, stroke: color, width: 2, dash: dashed ? [6, 4] : undefined, spanGaps: false, points: { show: s.t.length < 60 },
        value: (u, v) => v === null ? "–" : spec.money ? money(v) : spec.seconds ? seconds(v) : fmt(v, 3),
      }))],
      axes: [{}, { size: 64, values: (u, vals) => vals.map((v) => spec.money ? money(v) : spec.seconds ? seconds(v) : fmt(v, 2)) }],
      plugins: spec.bands ? [bandsPlugin(spec.id)] : [],
    };
    window.batchqCharts[spec.id] = { key, data, bands: spec.bands };
    window.batchqCharts[spec.id].plot = new uPlot(opts, data, plot);
    drawChips(card, spec.bands);
  }

  function drawChips(card, bands) {
    card.querySelector(".chips")?.remove();
    if (!bands) return;
    const seen = [...new Set(bands.filter((b) => b))];
    card.append(el("div", { class: "chips" }, ...seen.map((b) =>
      el("span", { class: "chip" }, el("i", { style: "background:" + (BINDING_COLORS[b] || "#eee").replace(/0\.1\d?\)/, "0.5)") }), "held by " + b))));
  }

  function renderCharts(s) {
    if (!s.t.length) {
      $("charts").replaceChildren(el("div", { class: "card" }, el("div", { class: "empty muted",
        text: "No history: the charts are drawn from history.jsonl, which a live run writes every few seconds " +
          "(a job run by an older batchq has none, and a new run writes its first point at once)." })));
      window.batchqCharts = {};
      return;
    }
    $("charts").querySelector(".empty")?.parentElement.remove();
    for (const spec of chartSpecs(s)) drawChart(spec, s);
  }

  window.addEventListener("resize", () => {
    for (const { plot } of Object.values(window.batchqCharts)) {
      const box = plot.root.parentElement;
      plot.setSize({ width: chartWidth(box), height: 220 });
    }
  });

  function render(picture) {
    renderFigures(picture.figures);
    renderFailures(picture.failures);
    renderCharts(picture.series);
    window.batchqRefreshes += 1;
    document.body.dataset.updated = String(picture.figures.updated);
    document.body.dataset.state = picture.figures.state;
  }

  /* ---- results browser ---- */
  const pages = [];  // where each page shown so far began: "previous" goes back one
  let nextFrom = null;

  async function getJSON(url) {
    const response = await fetch(url);
    if (!response.ok) throw new Error(url + ": HTTP " + response.status);
    return response.json();
  }

  async function browse(from, fresh) {
    if (fresh) pages.length = 0;
    const params = new URLSearchParams({ from: String(from), status: $("f-status").value, code: $("f-code").value, q: $("f-text").value, limit: "50" });
    const page = await getJSON("api/lines?" + params);
    pages.push(from);
    nextFrom = page.next;
    const body = $("rows").tBodies[0];
    body.replaceChildren(...page.rows.map((r) => {
      const answer = el("td", { class: "answer", text: r.answer || "" });
      if (r.fields) {  // a structured answer: its fields, one a line, rather than its JSON
        answer.replaceChildren(...Object.entries(r.fields).map(([k, v]) =>
          el("div", {}, el("span", { class: "fields", text: k + ": " }), v)));
      }
      const status = r.status === "failed" ? "failed · " + (r.code || "") : r.status;
      const row = el("tr", { "data-line": String(r.line) },
        el("td", { class: "num", text: String(r.line) }), el("td", { class: "prompt", text: r.prompt }), answer,
        el("td", {}, el("span", { class: "st " + r.status, text: status })));
      row.addEventListener("click", () => showRaw(r.line, row));
      return row;
    }));
    const shown = page.rows.length ? "lines " + fmt(page.rows[0].line) + "–" + fmt(page.rows[page.rows.length - 1].line) : "no lines match";
    $("page-info").textContent = shown + " · looked through line " + fmt(page.scanned_to) + " of " + fmt(page.last);
    $("prev").disabled = pages.length < 2;
    $("next").disabled = page.next === null;
    document.body.dataset.page = String(pages.length);
  }

  async function showRaw(line, row) {
    for (const r of $("rows").querySelectorAll("tr.sel")) r.classList.remove("sel");
    row.classList.add("sel");
    const raw = await getJSON("api/line/" + line);
    $("raw").hidden = false;
    $("raw").textContent = "input line " + line + ":\n" + JSON.stringify(raw.input, null, 2) +
      "\n\noutput line:\n" + JSON.stringify(raw.output, null, 2);
  }

  function setUpBrowser() {
    $("filters").addEventListener("submit", (e) => { e.preventDefault(); browse(Number($("f-from").value) || 1, true); });
    $("next").addEventListener("click", () => { if (nextFrom !== null) browse(nextFrom, false); });
    $("prev").addEventListener("click", () => { if (pages.length > 1) { pages.pop(); browse(pages.pop(), false); } });
    $("copy-retry").addEventListener("click", () => navigator.clipboard?.writeText($("retry-command").textContent));
    browse(1, true);
  }

  /* ---- start ---- */
  async function refresh() {
    let delay = 15000;
    try {
      const picture = await getJSON("api/picture");
      render(picture);
      if (picture.figures.state === "running") delay = 3000;
    } catch (e) {
      $("updated").textContent = "cannot reach batchq view (" + e.message + "); retrying";
      delay = 5000;
    }
    setTimeout(refresh, delay);
  }

  if (LIVE) {
    refresh();
    setUpBrowser();
  } else {
    $("browser-card").hidden = true;
    $("copy-retry").hidden = true;
    $("report-note").hidden = false;
    $("view-command").textContent = "batchq view " + BOOT.picture.figures.job;
    render(BOOT.picture);
  }
})();
