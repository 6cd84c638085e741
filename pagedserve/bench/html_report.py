"""report.html: the benchmark's report as one self-contained, interactive page (beside report.md and
the PNGs). The data is embedded as JSON and drawn with the live page's own chart code
(entrypoints/openai/dashboard/static/charts.js, inlined), so the file opens anywhere, offline.

Series are thinned to a few thousand points per chart; results.json keeps every measurement.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from pathlib import Path

from pagedserve.bench import metrics
from pagedserve.bench.records import RunResult

CHARTS_JS = Path(__file__).resolve().parents[1] / "entrypoints" / "openai" / "dashboard" / "static" / "charts.js"
MAX_POINTS = 1500


def _thin(values: Sequence, limit: int = MAX_POINTS) -> list:
    if len(values) <= limit:
        return list(values)
    step = len(values) / limit
    return [values[int(i * step)] for i in range(limit - 1)] + [values[-1]]


def _finite(v: float | None) -> float | None:
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else round(v, 6)


def _cdf(values: list[float]) -> dict[str, list[float]]:
    xs = _thin(sorted(values))
    n = len(xs)
    return {"xs": [round(x, 6) for x in xs], "ys": [(i + 1) / n for i in range(n)]}


def report_data(runs: Sequence[RunResult], summaries: Sequence[dict], meta: dict) -> dict:
    systems = []
    for run, s in zip(runs, summaries, strict=True):
        done = [r for r in run.requests if r.ok]
        arrivals = sorted((r.arrival, v) for r in done if (v := metrics.ttft(r)) is not None)
        steps = _thin(run.steps)
        bs = run.steps[0].block_size if run.steps else 1
        systems.append({
            "name": run.system,
            "figures": {"output tok/s": _finite(s["output_throughput"]), "requests/s": _finite(s["request_throughput"]),
                        "completed": s["completed"], "errors": s["errors"],
                        **{f"{k} p{q} ms": _finite(s[k][f"p{q}"] * 1e3) for k in ("ttft", "itl", "e2e") for q in (50, 95)}},
            "cdf": {"ttft": _cdf([v for r in done if (v := metrics.ttft(r)) is not None]),
                    "itl": _cdf([g for r in done for g in metrics.itls(r)]),
                    "e2e": _cdf([v for r in done if (v := metrics.e2e(r)) is not None])},
            "ttft_by_arrival": {"xs": [round(a, 4) for a, _ in _thin(arrivals)],
                                "ys": [round(v, 6) for _, v in _thin(arrivals)]},
            "steps": {"t": [round(x.t, 4) for x in steps], "batch": [x.batch_size for x in steps],
                      "waiting": [x.num_waiting for x in steps],
                      "allocated": [x.kv_allocated_slots / bs for x in steps],
                      "filled": [round(x.kv_filled_slots / bs, 2) for x in steps]},
        })
    return {"meta": {"created": meta.get("created"), "command": meta.get("command")}, "systems": systems}


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>pagedserve benchmark report</title>
<style>
body { font: 13px/1.4 system-ui, sans-serif; margin: 1.2em 2em; color: #222; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-variant-numeric: tabular-nums; }
th, td { padding: 2px 8px; border-bottom: 1px solid #eee; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(420px, 1fr)); gap: 1em; }
.chart canvas { width: 100%; height: 220px; display: block; }
.chart .title { font-weight: 600; }
code { background: #f3f4f6; padding: 1px 4px; }
</style></head><body>
<h1>Benchmark report</h1>
<p>__META__</p>
<div id="table"></div>
<div class="charts" id="charts"></div>
<script>__CHARTS_JS__</script>
<script id="data" type="application/json">__DATA__</script>
<script>
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("data").textContent);
  const systems = data.systems;
  const fmt = window.PagedCharts.fmt;
  const keys = systems.length ? Object.keys(systems[0].figures) : [];
  document.getElementById("table").innerHTML = "<table><tr><th>system</th>" + keys.map((k) => `<th>${k}</th>`).join("") +
    "</tr>" + systems.map((s) => `<tr><td>${s.name}</td>` + keys.map((k) => `<td>${fmt(s.figures[k])}</td>`).join("") + "</tr>").join("") + "</table>";
  const host = document.getElementById("charts");
  function chart(title, draw) {
    const div = document.createElement("div");
    div.className = "chart";
    div.innerHTML = `<div class="title">${title}</div><canvas data-chart="${title}"></canvas>`;
    host.appendChild(div);
    draw(div.querySelector("canvas"));
  }
  const sec = (x) => fmt(x) + " s";
  chart("output tokens / s", (c) => window.PagedCharts.bars(c, { labels: systems.map((s) => s.name), values: systems.map((s) => s.figures["output tok/s"] || 0) }));
  for (const [key, label] of [["ttft", "TTFT"], ["itl", "inter-token latency"], ["e2e", "end-to-end latency"]]) {
    chart(`CDF: ${label}`, (c) => window.PagedCharts.line(c, { xFormat: sec, xLabel: "seconds",
      series: systems.map((s) => ({ name: s.name, xs: s.cdf[key].xs, values: s.cdf[key].ys })) }));
  }
  chart("TTFT by arrival time", (c) => window.PagedCharts.line(c, { xFormat: sec, xLabel: "arrival (s since start)", unit: "s",
    series: systems.map((s) => ({ name: s.name, xs: s.ttft_by_arrival.xs, values: s.ttft_by_arrival.ys })) }));
  const stepped = systems.filter((s) => s.steps.t.length);
  chart("sequences per step", (c) => window.PagedCharts.line(c, { xFormat: sec, xLabel: "time (s since start)",
    series: stepped.map((s) => ({ name: s.name, xs: s.steps.t, values: s.steps.batch })) }));
  chart("waiting requests", (c) => window.PagedCharts.line(c, { xFormat: sec, xLabel: "time (s since start)",
    series: stepped.map((s) => ({ name: s.name, xs: s.steps.t, values: s.steps.waiting })) }));
  chart("KV blocks: allocated / holding K/V", (c) => window.PagedCharts.line(c, { xFormat: sec, xLabel: "time (s since start)",
    series: stepped.flatMap((s) => [{ name: s.name + " allocated", xs: s.steps.t, values: s.steps.allocated },
                                     { name: s.name + " filled", xs: s.steps.t, values: s.steps.filled }]) }));
})();
</script>
</body></html>
"""


def write_html(path: Path, runs: Sequence[RunResult], summaries: Sequence[dict], meta: dict) -> Path:
    data = report_data(runs, summaries, meta)
    # JSON inside <script>: "</" would end the element early
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    text = (PAGE.replace("__CHARTS_JS__", CHARTS_JS.read_text())
            .replace("__META__", f"created {html.escape(str(meta.get('created')))} · "
                                 f"<code>{html.escape(str(meta.get('command')))}</code>")
            .replace("__DATA__", payload))
    path.write_text(text)
    return path
