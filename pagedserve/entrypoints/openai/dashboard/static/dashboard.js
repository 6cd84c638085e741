// The live page: one server-sent-events stream of snapshots (/dashboard/stream), drawn as a block map,
// queue tables, a request timeline (from the request's trace, /dashboard/request/ID) and charts.
(function () {
  "use strict";
  const key = new URLSearchParams(location.search).get("api_key");
  const qs = key ? "?api_key=" + encodeURIComponent(key) : "";
  const $ = (id) => document.getElementById(id);
  const fmt = window.PagedCharts.fmt;
  let last = null;           // the latest snapshot
  let decoded = null;        // its block map as typed arrays
  let selected = null;       // the request whose timeline is shown
  let traceFetchedAt = 0;
  let updates = 0;

  function bytes(b64) {
    const s = atob(b64);
    const out = new Uint8Array(s.length);
    for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
    return out.buffer;
  }

  function ownerColour(id) {
    let h = 2166136261;
    for (let i = 0; i < id.length; i++) { h ^= id.charCodeAt(i); h = Math.imul(h, 16777619); }
    return `hsl(${((h >>> 0) % 360)}, 70%, 52%)`;
  }

  function escapeHtml(s) {
    return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
  }

  // --- block map --------------------------------------------------------------------------------

  const map = $("blockmap");
  let cellPx = 8, cols = 1;

  function drawMap(snap) {
    const c = snap.cells;
    decoded = {
      state: new Uint8Array(bytes(c.state)), ref: new Uint8Array(bytes(c.ref)),
      fill: new Uint16Array(bytes(c.fill)), owner: new Int32Array(bytes(c.owner)),
      perCell: c.blocks_per_cell, count: c.count,
    };
    const width = map.clientWidth || 600;
    cellPx = Math.max(2, Math.min(18, Math.floor(Math.sqrt((width * 320) / Math.max(1, c.count)))));
    cols = Math.max(1, Math.floor(width / cellPx));
    const rows = Math.ceil(c.count / cols);
    const ratio = window.devicePixelRatio || 1;
    const pxW = Math.round(width * ratio), pxH = Math.round(rows * cellPx * ratio);
    if (map.width !== pxW || map.height !== pxH) {  // resizing reallocates the bitmap and relays the page out
      map.style.height = rows * cellPx + "px";
      map.width = pxW;
      map.height = pxH;
    }
    const ctx = map.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, rows * cellPx);
    const gap = cellPx >= 5 ? 1 : 0;
    const full = snap.kv.block_size * c.blocks_per_cell;
    const colours = snap.owners.map(ownerColour);
    for (let i = 0; i < c.count; i++) {
      const x = (i % cols) * cellPx, y = Math.floor(i / cols) * cellPx, s = cellPx - gap;
      const st = decoded.state[i];
      if (st === 0) { ctx.fillStyle = "#e5e7eb"; ctx.fillRect(x, y, s, s); continue; }
      if (st === 1) { ctx.fillStyle = "#bfdbfe"; ctx.fillRect(x, y, s, s); continue; }
      const colour = decoded.owner[i] >= 0 ? colours[decoded.owner[i]] : "#9ca3af";
      ctx.globalAlpha = 0.35;
      ctx.fillStyle = colour;
      ctx.fillRect(x, y, s, s);
      ctx.globalAlpha = 1;
      const h = Math.max(1, Math.round((s * Math.min(decoded.fill[i], full)) / full));
      ctx.fillRect(x, y + s - h, s, h);
      if (st === 3) {
        ctx.strokeStyle = "#111";
        ctx.lineWidth = Math.max(1, cellPx / 6);
        ctx.strokeRect(x + 0.5, y + 0.5, s - 1, s - 1);
      }
    }
    map.dataset.cells = String(c.count);
    map.dataset.blocks = String(snap.kv.total_blocks);
    map.dataset.updates = String(++updates);
    const kv = snap.kv;
    $("kv-caption").textContent = `${kv.total_blocks} blocks of ${kv.block_size} tokens` +
      (c.blocks_per_cell > 1 ? ` · a cell is ${c.blocks_per_cell} blocks` : "");
    $("kv-figures").innerHTML = [
      ["used", kv.used], ["free", kv.free], ["cached", kv.cached], ["shared", kv.shared],
      ["utilization", (100 * kv.utilization).toFixed(1) + "%"],
      ["internal fragmentation", (100 * kv.fragmentation).toFixed(1) + "%"],
      ["prefix hit rate", (100 * kv.prefix_cache_hit_rate).toFixed(1) + "%"],
    ].map(([k, v]) => `<span>${k} <b>${v}</b></span>`).join("");
  }

  let hoverTimer = null;
  map.addEventListener("mousemove", (ev) => {
    if (!decoded) return;
    const r = map.getBoundingClientRect();
    const i = Math.floor((ev.clientY - r.top) / cellPx) * cols + Math.floor((ev.clientX - r.left) / cellPx);
    const tip = $("tooltip");
    if (i < 0 || i >= decoded.count || ev.clientX - r.left >= cols * cellPx) { tip.hidden = true; return; }
    const first = i * decoded.perCell;
    const states = ["free", "cached", "held", "shared"];
    const owner = decoded.owner[i] >= 0 ? last.owners[decoded.owner[i]] : "–";
    const range = decoded.perCell > 1 ? `blocks ${first}–${first + decoded.perCell - 1}` : `block ${first}`;
    tip.textContent = `${range}\n${states[decoded.state[i]]}, ref count ${decoded.ref[i]}\n` +
      `fill ${decoded.fill[i]} / ${last.kv.block_size * decoded.perCell} tokens\nowner ${owner}`;
    tip.style.left = Math.min(ev.clientX - r.left + 12, r.width - 200) + "px";
    tip.style.top = (ev.clientY - r.top + 12) + "px";
    tip.hidden = false;
    clearTimeout(hoverTimer);
    hoverTimer = setTimeout(() => fetchBlock(first, tip), 150);   // the full record: every owner, the hash
  });
  map.addEventListener("mouseleave", () => { $("tooltip").hidden = true; clearTimeout(hoverTimer); });

  async function fetchBlock(id, tip) {
    try {
      const res = await fetch(`/dashboard/block/${id}${qs}`);
      if (!res.ok || tip.hidden) return;
      const b = await res.json();
      tip.textContent = `block ${b.block_id}: ${b.state}, ref count ${b.ref_count}\nfill ${b.fill} / ${b.block_size} tokens` +
        `\nhash ${b.hash || "–"}\nowners ${b.owners.length ? b.owners.join(", ") : "–"}`;
    } catch (e) { /* the stream's status line reports a lost server */ }
  }

  // --- queues --------------------------------------------------------------------------------------

  const COLUMNS = [["id", "request"], ["state", "state"], ["prompt_tokens", "prompt"], ["generated", "out"],
    ["blocks", "blocks"], ["ttft_ms", "TTFT ms"], ["age_s", "age s"], ["preemptions", "preempt"],
    ["cached_tokens", "cached"]];
  const FINISHED_COLUMNS = [["id", "request"], ["state", "finish"], ["prompt_tokens", "prompt"],
    ["generated", "out"], ["ttft_ms", "TTFT ms"], ["e2e_s", "e2e s"], ["preemptions", "preempt"],
    ["cached_tokens", "cached"]];

  const PAGE_ROWS = 40;  // rows drawn per table (the snapshot may carry more): layout is the page's main cost

  function table(title, rows, total, columns) {
    const head = columns.map(([, t]) => `<th>${t}</th>`).join("");
    const body = rows.map((r) => `<tr class="req${r.id === selected ? " selected" : ""}" data-id="${escapeHtml(r.id)}">` +
      columns.map(([k]) => `<td>${escapeHtml(cell(r[k]))}</td>`).join("") + "</tr>").join("");
    const more = total > rows.length ? `<tr class="more"><td colspan="${columns.length}">… and ${total - rows.length} more</td></tr>` : "";
    return `<table data-queue="${title}"><caption>${title} (${total})</caption><thead><tr>${head}</tr></thead><tbody>${body}${more}</tbody></table>`;
  }

  const tableState = {};  // per queue: the row ids drawn and the caption, to patch cells in place

  function cell(v) { return v === null || v === undefined ? "–" : String(v); }

  function drawTable(host, title, rows, total, columns) {
    rows = rows.slice(0, PAGE_ROWS);
    const ids = rows.map((r) => r.id).join("\n");
    const state = tableState[title];
    if (state && state.ids === ids && state.total === total) {
      // the same requests in the same order: change only the cells whose text changed (no new DOM)
      const trs = state.body.rows;
      rows.forEach((r, i) => columns.forEach(([k], j) => {
        const td = trs[i].cells[j], text = cell(r[k]);
        if (td.textContent !== text) td.textContent = text;
      }));
      return;
    }
    let div = host.querySelector(`div[data-table="${title}"]`);
    if (!div) {
      div = document.createElement("div");
      div.dataset.table = title;
      host.appendChild(div);
    }
    div.innerHTML = table(title, rows, total, columns);
    tableState[title] = { ids, total, body: div.querySelector("tbody") };
  }

  function drawQueues(snap) {
    const q = snap.requests;
    const host = $("queues");
    drawTable(host, "running", q.running, q.totals.running, COLUMNS);
    drawTable(host, "waiting", q.waiting, q.totals.waiting, COLUMNS);
    drawTable(host, "preempted", q.preempted, q.totals.preempted, COLUMNS);
    drawTable(host, "finished", q.finished, q.finished.length, FINISHED_COLUMNS);
    $("status").textContent = `up ${fmt(snap.uptime_s)} s · running ${q.totals.running}/${q.max_num_seqs} · ` +
      `waiting ${q.totals.waiting} · preempted ${q.totals.preempted}` +
      (q.totals.compiling_grammar ? ` · compiling grammars ${q.totals.compiling_grammar}` : "");
  }

  $("queues").addEventListener("click", (ev) => {
    const row = ev.target.closest("tr.req");
    if (!row) return;
    selected = row.dataset.id;
    for (const tr of document.querySelectorAll("#queues tr.req")) tr.classList.toggle("selected", tr.dataset.id === selected);
    fetchTrace();
  });

  // --- one request's timeline, from its trace --------------------------------------------------------

  function attrs(span) {
    const out = {};
    for (const a of span.attributes) {
      const v = a.value;
      if ("arrayValue" in v) out[a.key] = v.arrayValue.values.map((x) => Number(Object.values(x)[0]));
      else { const x = Object.values(v)[0]; out[a.key] = typeof x === "string" && /^-?\d+$/.test(x) ? Number(x) : x; }
    }
    return out;
  }

  async function fetchTrace() {
    if (!selected) return;
    traceFetchedAt = Date.now();
    try {
      const res = await fetch(`/dashboard/request/${encodeURIComponent(selected)}${qs}`);
      if (res.status === 404) { $("timeline-caption").textContent = `${selected}: no longer known`; return; }
      if (!res.ok) return;
      drawTimeline(await res.json());
    } catch (e) { /* reported by the stream's status */ }
  }

  function drawTimeline(record) {
    const spans = record.resourceSpans[0].scopeSpans[0].spans;
    const root = spans[0];
    const ra = attrs(root);
    const t0 = Number(BigInt(root.startTimeUnixNano) / 1000n) / 1000;   // ms
    const ms = (ns) => Number(BigInt(ns) / 1000n) / 1000 - t0;
    const tEnd = Math.max(1, ms(root.endTimeUnixNano));
    const canvas = $("timeline");
    const { ctx, w } = window.PagedCharts.setup(canvas);  // 170 px high (dashboard.css)
    const left = 60, pw = w - left - 10;
    const X = (t) => left + (t / tEnd) * pw;
    const lanes = { queued: [18, "#9ca3af"], prefill: [40, "#f59e0b"], decode: [62, "#16a34a"] };
    ctx.font = "11px system-ui, sans-serif";
    ctx.textBaseline = "middle";
    for (const [name, [y]] of Object.entries(lanes)) { ctx.fillStyle = "#374151"; ctx.fillText(name, 4, y + 7); }
    for (const s of spans.slice(1)) {
      const lane = lanes[s.name];
      if (!lane) continue;
      ctx.fillStyle = lane[1];
      const a = X(ms(s.startTimeUnixNano)), b = X(ms(s.endTimeUnixNano));
      ctx.fillRect(a, lane[0], Math.max(2, b - a), 14);
    }
    const marks = { preempted: "#dc2626", first_token: "#2563eb", cache_hit: "#9333ea" };
    for (const e of root.events) {
      ctx.strokeStyle = marks[e.name] || "#111";
      const x = X(ms(e.timeUnixNano));
      ctx.beginPath(); ctx.moveTo(x, 12); ctx.lineTo(x, 82); ctx.stroke();
    }
    // tokens over time
    const ts = ra.token_times_ms || [], ns = ra.token_counts || [];
    const top = 95, ph = 55, nmax = Math.max(1, ns.length ? ns[ns.length - 1] : 1);
    ctx.fillStyle = "#374151";
    ctx.fillText("tokens", 4, top + ph / 2);
    ctx.strokeStyle = "#e5e7eb";
    ctx.strokeRect(left, top, pw, ph);
    ctx.strokeStyle = "#2563eb";
    ctx.beginPath();
    ts.forEach((t, i) => { const x = X(t), y = top + ph - (ns[i] / nmax) * ph; if (i) ctx.lineTo(x, y); else ctx.moveTo(x, y); });
    ctx.stroke();
    ctx.fillStyle = "#6b7280";
    ctx.textAlign = "right";
    ctx.fillText(`${fmt(tEnd)} ms`, left + pw, top + ph + 10);
    ctx.textAlign = "left";
    canvas.dataset.request = ra.request_id;
    $("timeline-caption").textContent = `${ra.request_id}${ra.finished ? " · " + ra.finish_reason : " · live"}`;
    const events = root.events.map((e) => e.name);
    $("timeline-figures").innerHTML = [
      ["prompt", ra.prompt_tokens], ["output", ra.output_tokens], ["cached", ra.cached_tokens],
      ["prefill chunks", spans.filter((s) => s.name === "prefill").length],
      ["preemptions", ra.num_preemptions], ["events", events.join(", ") || "–"],
    ].map(([k, v]) => `<span>${k} <b>${escapeHtml(v)}</b></span>`).join("");
  }

  // --- charts ------------------------------------------------------------------------------------------

  const CHARTS = [
    ["tokens/s", [["output tokens/s (5 s mean)", "output_tokens_per_s"]]],
    ["batch", [["sequences per step", "batch_size"], ["tokens per step", "tokens_per_step"]]],
    ["queue depth", [["waiting", "queue_depth"]]],
    ["KV usage", [["used blocks", "kv_usage", 100]], "%"],
    ["TTFT (last 10 s)", [["p50", "ttft_p50_ms"], ["p95", "ttft_p95_ms"]], "ms"],
    ["inter-token latency (last 10 s)", [["p50", "itl_p50_ms"], ["p95", "itl_p95_ms"]], "ms"],
    ["preemptions", [["per second", "preemptions"]]],
    ["prefix cache (last 10 s)", [["hit rate", "prefix_hit_rate", 100]], "%"],
    ["speculative decoding", [["acceptance (last 10 s)", "spec_acceptance", 100]], "%"],
  ];
  const chartCanvases = [];

  let chartKey = null;

  function drawCharts(snap) {
    // the series moves on once a second: redraw only when it did
    const key = JSON.stringify(snap.series.length ? snap.series[snap.series.length - 1] : null) + snap.series.length;
    if (key === chartKey) return;
    chartKey = key;
    const cols = {};
    snap.series_columns.forEach((name, i) => { cols[name] = snap.series.map((r) => r[i]); });
    const xs = cols.t;
    const now = xs.length ? xs[xs.length - 1] : 0;
    if (!chartCanvases.length) {
      const host = $("charts");
      for (const [title] of CHARTS) {
        const div = document.createElement("div");
        div.className = "chart";
        div.innerHTML = `<div class="title">${title}</div><canvas data-chart="${title}"></canvas>`;
        host.appendChild(div);
        chartCanvases.push(div.querySelector("canvas"));
      }
    }
    CHARTS.forEach(([title, lines, unit], k) => {
      if (title === "speculative decoding" && !snap.spec_decode) { chartCanvases[k].parentElement.hidden = true; return; }
      window.PagedCharts.line(chartCanvases[k], {
        xs, unit,
        series: lines.map(([name, col, scale]) => ({ name, values: cols[col].map((v) => v === null ? null : v * (scale || 1)) })),
        xFormat: (x) => (x - now === 0 ? "now" : `${Math.round(x - now)}s`),
      });
    });
  }

  // --- the stream ----------------------------------------------------------------------------------------

  function connect() {
    const source = new EventSource(`/dashboard/stream${qs}`);
    source.addEventListener("snapshot", (ev) => {
      if (document.hidden && last) return;  // a background tab draws nothing
      last = JSON.parse(ev.data);
      drawMap(last);
      drawQueues(last);
      drawCharts(last);
      if (selected && Date.now() - traceFetchedAt > 1000) fetchTrace();
    });
    source.addEventListener("unavailable", (ev) => { $("status").textContent = ev.data; });
    source.onerror = () => { $("status").textContent = "disconnected — retrying…"; };
  }

  connect();
})();
