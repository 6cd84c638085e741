"""The results folder: results.json (every raw measurement), report.md (tables + plots) and the PNGs,
report.html (the same charts, interactive, in one file),
plus the one-screen summary printed at the end of a run.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from pagedserve.bench import batch_gain, compare, html_report, metrics, plots, prefix_cache
from pagedserve.bench.records import RunResult
from pagedserve.bench.workloads import Workload, WorkloadRequest


def machine_info() -> dict:
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "processor": platform.processor()}


def _clean(x):
    """NaN/inf → None so results.json is strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


# --- formatting -------------------------------------------------------------------------------------


def _num(v, fmt: str = ".2f", scale: float = 1.0) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return format(v * scale, fmt)


def _ms(v) -> str:
    return _num(v, ".1f", 1000)


def _pct(v) -> str:
    return "–" if v is None or not math.isfinite(v) else f"{v:+.1f}%"


def _share(v) -> str:
    return "–" if v is None or not math.isfinite(v) else f"{100 * v:.1f}%"


def _row_text(r: dict) -> tuple[str, str, str, str]:
    r = {k: (math.nan if v is None else v) for k, v in r.items()}  # rows read back from JSON hold None for NaN
    unit = r["unit"]
    if unit == "%":  # compared in percentage points: waste saved, or hit rate gained
        t, b = f"{r['target']:.1f}%", f"{r['baseline']:.1f}%"
        pp = r["improvement"]
        change = "–" if not math.isfinite(pp) else f"{pp:+.1f} pp" + ("" if r.get("higher_is_better") else " less waste")
        return r["metric"], t, b, change
    if unit == "s" and max(abs(r["target"]), abs(r["baseline"])) < 1:
        t, b = f"{_ms(r['target'])} ms", f"{_ms(r['baseline'])} ms"
    elif unit == "blocks":
        t, b = f"{_num(r['target'], '.0f')} {unit}", f"{_num(r['baseline'], '.0f')} {unit}"
    else:
        t, b = f"{_num(r['target'])} {unit}", f"{_num(r['baseline'])} {unit}"
    return r["metric"], t, b, _pct(r["improvement"])


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def headline_markdown(headlines: list[dict]) -> str:
    parts = []
    for h in headlines:
        rows = [_row_text(r) for r in h["rows"]]
        parts.append(f"**{h['target']} vs {h['baseline']}**\n\n"
                     + _table(["metric", h["target"], h["baseline"], "improvement"], rows))
    return "\n\n".join(parts)


def _cpu_wait(run: RunResult) -> str:
    share = (run.config.get("contention") or {}).get("wait_share")
    return "–" if share is None else f"{100 * share:.0f}%"


def systems_table(summaries: Sequence[dict], runs: Sequence[RunResult]) -> str:
    rows = []
    for s, run in zip(summaries, runs, strict=True):
        rows.append([s["system"], f"{s['completed']}/{s['requests']}", _num(s["duration_s"], ".1f"),
                     _num(s["request_throughput"], ".3f"), _num(s["output_throughput"], ".1f"),
                     _num(s["total_token_throughput"], ".1f"), _ms(s["ttft"]["mean"]), _ms(s["ttft"]["p95"]),
                     _ms(s["itl"]["mean"]), _ms(s["itl"]["p95"]), _num(s["e2e"]["mean"]), _num(s["e2e"]["p95"]),
                     _ms(s["queue"]["mean"]), _cpu_wait(run)])
    return _table(["system", "done", "time s", "req/s", "out tok/s", "total tok/s", "TTFT mean ms",
                   "TTFT p95 ms", "ITL mean ms", "ITL p95 ms", "E2E mean s", "E2E p95 s", "queue mean ms",
                   "CPU wait"], rows)


def percentiles_table(summaries: Sequence[dict]) -> str:
    rows = []
    for s in summaries:
        for key, label, fmt in (("ttft", "TTFT (ms)", _ms), ("itl", "ITL (ms)", _ms), ("tpot", "TPOT (ms)", _ms),
                                ("e2e", "E2E (s)", lambda v: _num(v, ".3f"))):
            d = s[key]
            rows.append([s["system"], label] + [fmt(d[k]) for k in ("mean", "p50", "p90", "p95", "p99", "max")])
    return _table(["system", "metric", "mean", "p50", "p90", "p95", "p99", "max"], rows)


def steps_table(summaries: Sequence[dict]) -> str:
    rows = []
    for s in summaries:
        st = s.get("steps") or {}
        if not st:
            continue
        rows.append([s["system"], st["num_steps"], _num(st["mean_batch_size"], ".1f"), st["max_batch_size"],
                     _num(st["mean_tokens_per_step"], ".1f"), _num(st["mean_step_ms"], ".1f"),
                     _num(st["kv_mean_allocated_blocks"], ".1f"), _num(st["kv_mean_filled_blocks"], ".1f"),
                     _num(st["kv_peak_allocated_blocks"], ".0f"), f"{100 * st['kv_waste']:.1f}%", st["num_preempted"]])
    if not rows:
        return "_No per-step data (systems measured over HTTP expose none)._"
    return _table(["system", "steps", "mean batch", "max batch", "tokens/step", "step ms", "KV alloc blocks (mean)",
                   "KV live blocks (mean)", "KV alloc peak", "memory waste", "preemptions"], rows)


def _hit_rate(s: dict) -> str:
    rate = (s.get("prefix_cache") or {}).get("hit_rate")
    return "–" if rate is None else f"{100 * rate:.1f}%"


def prefix_cache_table(summaries: Sequence[dict]) -> str:
    rows = []
    for s in summaries:
        pc, st = s.get("prefix_cache") or {}, s.get("steps") or {}
        tokens = "–" if pc.get("queries") is None else f"{pc['hits']} / {pc['queries']}"
        rows.append([s["system"], prefix_cache.setting_label(pc.get("enabled")), _hit_rate(s), tokens,
                     pc.get("source", prefix_cache.NOT_REPORTED), _ms(s["ttft"]["p50"]), _ms(s["ttft"]["p95"]),
                     _num(s["output_throughput"], ".1f"), _num(s["request_throughput"], ".3f"),
                     _num(st.get("kv_peak_allocated_blocks"), ".0f"), _num(st.get("kv_mean_allocated_blocks"), ".1f"),
                     _num(st.get("kv_peak_cached_blocks"), ".0f")])
    return _table(["system", "prefix caching", "hit rate", "cached / prompt tokens", "counted from", "TTFT p50 ms",
                   "TTFT p95 ms", "out tok/s", "req/s", "KV blocks in use (peak)", "KV blocks in use (mean)",
                   "cached free blocks (peak)"], rows)


def _plain_reference(summaries: Sequence[dict]) -> dict | None:
    """The system that decoded without speculation, that speculative systems are compared with."""
    plain = [s for s in summaries if s.get("spec_decode") is None and s["completed"]]
    named = [s for s in plain if s["system"].endswith("spec-off")]
    return (named or plain or [None])[0]


def spec_decode_rows(summaries: Sequence[dict]) -> list[dict]:
    """One row per system with speculation: its counters and its speed over plain decoding."""
    ref = _plain_reference(summaries)
    rows = []
    for s in summaries:
        sd = s.get("spec_decode")
        if sd is None:
            continue
        config = sd.get("config") or {}
        speedup = (s["output_throughput"] / ref["output_throughput"]
                   if ref and ref["output_throughput"] else math.nan)
        steps = (sd.get("num_steps_speculated") or 0) + (sd.get("num_steps_plain") or 0)
        rows.append({"system": s["system"], "method": config.get("method"),
                     "k": config.get("num_speculative_tokens"), "speedup": speedup,
                     "versus": ref["system"] if ref else None, "acceptance_rate": sd.get("acceptance_rate"),
                     "mean_accepted_length": sd.get("mean_accepted_length"),
                     "speculated_share": (sd.get("num_steps_speculated") or 0) / steps if steps else math.nan})
    return rows


def spec_decode_table(summaries: Sequence[dict]) -> str | None:
    rows = spec_decode_rows(summaries)
    if not rows:
        return None
    by_name = {s["system"]: s for s in summaries}
    ref = _plain_reference(summaries)
    table = []
    for row in ([] if ref is None else [None]) + rows:
        s = ref if row is None else by_name[row["system"]]
        table.append([s["system"], "–" if row is None else f"{row['method']} k={row['k']}",
                      _num(s["output_throughput"], ".1f"), "1.00x" if row is None else _num(row["speedup"]) + "x",
                      _ms(s["itl"]["p50"]), _ms(s["itl"]["p95"]), _ms(s["tpot"]["p50"]),
                      "–" if row is None else _share(row["acceptance_rate"]),
                      "–" if row is None else _num(row["mean_accepted_length"]),
                      "–" if row is None else _share(row["speculated_share"])])
    return _table(["system", "speculation", "out tok/s", "vs plain", "ITL p50 ms", "ITL p95 ms", "TPOT p50 ms",
                   "acceptance", "mean accepted length", "steps speculated"], table)


def turns_table(summaries: Sequence[dict]) -> str | None:
    """TTFT p50 per turn of a chat workload (and the share of its prompt tokens that were cached)."""
    names = list(dict.fromkeys(t for s in summaries for t in (s.get("by_template") or {})))
    if not names:
        return None
    rows = []
    for s in summaries:
        cells = [s["system"]]
        for name in names:
            d = (s.get("by_template") or {}).get(name)
            share = None if d is None else d.get("cached_share")
            cell = "–" if d is None else f"{_ms(d['ttft_p50'])} ms"
            cells.append(cell if share is None else f"{cell} ({100 * share:.0f}% cached)")
        rows.append(cells)
    return _table(["system"] + names, rows)


def goodput_table(summaries: Sequence[dict]) -> str | None:
    rows = [[s["system"], _num(s["goodput"]["requests_per_s"], ".3f"), f"{100 * s['goodput']['fraction']:.1f}%"]
            for s in summaries if "goodput" in s]
    return _table(["system", "goodput req/s", "within SLO"], rows) if rows else None


def workload_markdown(desc: dict) -> str:
    mt, pw = desc["max_tokens"], desc["prompt_words"]
    lines = [f"- **{desc['name']}**, {desc['num_requests']} requests, arrivals: {desc['arrival']} "
             f"(last arrival at {desc['duration_of_arrivals_s']:.1f} s), seed {desc.get('seed')}, "
             f"fingerprint `{desc['fingerprint']}`",
             f"- max_tokens: min {mt['min']}, mean {mt['mean']:.1f}, max {mt['max']}, total {mt['total']} "
             "(greedy, ignore_eos: every system generates exactly these)",
             f"- prompt length: {pw['min']}–{pw['max']} words (mean {pw['mean']:.0f})"]
    if desc.get("max_tokens_scale", 1.0) != 1.0 or desc.get("max_tokens_cap"):
        origin = {"prefix": "the generator's range", "chat": "the replies' lengths"}.get(desc.get("generator"),
                                                                                         "the chapter's ranges")
        lines.append(f"- output lengths scaled by {desc.get('max_tokens_scale')} "
                     f"(cap {desc.get('max_tokens_cap')}) from {origin}")
    if desc.get("generator") == "prefix":
        lines.append(f"- every prompt starts with the same system prompt of {desc.get('prefix_token_count')} tokens "
                     f"({desc.get('token_counts')}; text from {desc.get('text_source')}), then its own question")
    if desc.get("generator") == "chat":
        lines.append(f"- {desc.get('conversations')} conversations of up to {desc.get('turns')} turns; each turn "
                     "resends the whole history (fixed assistant replies, text from "
                     f"{desc.get('text_source')}); the next turn arrives a think time (mean "
                     f"{desc.get('think_time_s')} s) after the previous one")
    if desc.get("templates"):
        lines.append("- templates: " + ", ".join(f"{k} ×{v}" for k, v in sorted(desc["templates"].items())))
    return "\n".join(lines)


METHOD = """\
- Times are wall-clock (`time.monotonic`) from the run's start. TTFT = first token − arrival;
  ITL = gaps between consecutive tokens (pooled over all requests; over HTTP, between SSE chunks);
  TPOT = a request's mean ITL; E2E = last token − arrival; queue = first admitted − arrival.
- Arrivals are replayed on the wall clock: a request is handed to the system once its offset has
  passed; the engine is stepped in between, and only an idle system waits for the next arrival.
- Throughput = completed requests (or generated tokens) / (start → last finish).
- Memory waste = allocated KV slots holding no live token / allocated slots, time-weighted over steps.
  Under the static policy the KV for prompt + max_tokens is reserved at admission, so reservation
  counts as waste; for HF `generate` the dense cache's padding and finished rows do.
- Each pagedserve policy runs on a freshly built engine with identical options; HF runs on the same
  weights. The runs are sequential on one machine: compare ratios, not absolute numbers.
- Prefix-cache hit rate = prompt tokens served from the cache / prompt tokens of admitted requests,
  over the run (the engine's counters; over HTTP the responses' cached_tokens or the server's
  /metrics). KV blocks in use exclude free blocks that merely still hold a cached prefix."""


def policy_gain(runs: Sequence[RunResult]) -> batch_gain.BatchingGain | None:
    """Continuous vs static decode costs, when both engine policies ran with the same seats (and the
    same other settings: of several prefix-caching settings, the first that ran under both)."""
    by_setting: dict[str, dict[str, RunResult]] = {}
    for r in runs:
        if r.kind == "engine":
            policy, _, rest = r.system.removeprefix("pagedserve-").partition("-")
            by_setting.setdefault(rest, {})[policy] = r
    pair = next((p for p in by_setting.values() if "static" in p and "continuous" in p), None)
    if pair is None:
        return None
    static, continuous = pair["static"], pair["continuous"]
    seats = {r.config.get("engine", {}).get("scheduler", {}).get("max_num_seqs") for r in (static, continuous)}
    if len(seats) != 1 or None in seats:
        return None
    return batch_gain.batching_gain(batch_gain.decode_steps(static.steps), batch_gain.decode_steps(continuous.steps),
                                    seats.pop())


def write_markdown(path: Path, meta: dict, workload_desc: dict, summaries: list[dict], headlines: list[dict],
                   runs: Sequence[RunResult], plot_paths: Sequence[Path],
                   gain: batch_gain.BatchingGain | None = None) -> None:
    m = meta["machine"]
    parts = ["# pagedserve benchmark", "",
             f"`{meta['command']}`", "",
             f"{meta['created']} · {m['cpu_count']} CPUs · torch {m['torch']} ({m['torch_threads']} threads) · "
             f"{m['platform']}", "",
             "## Workload", "", workload_markdown(workload_desc), ""]
    notes = list(meta.get("notes", [])) + [f"{run.system}: {n}" for run in runs for n in run.notes]
    if notes:
        parts += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    if headlines:
        parts += ["## Headline", "", headline_markdown(headlines), ""]
    parts += ["## Results", "", systems_table(summaries, runs), "",
              "_CPU wait: share of the run's runnable thread time spent waiting for a core (other load on "
              "the machine); high values mean inflated timings._", "",
              "## Latency distribution", "", percentiles_table(summaries), ""]
    gp = goodput_table(summaries)
    if gp:
        slo = next(s["slo"] for s in summaries if "slo" in s)
        parts += ["## Goodput", "", f"SLO: TTFT ≤ {slo['ttft_s']} s, mean ITL ≤ {slo['itl_s']} s, "
                  f"E2E ≤ {slo['e2e_s']} s (None = unconstrained)", "", gp, ""]
    parts += ["## Prefix cache", "", prefix_cache_table(summaries), ""]
    if spec := spec_decode_table(summaries):
        parts += ["## Speculative decoding", "", spec, "",
                  "_Acceptance: accepted draft tokens / proposed draft tokens. Mean accepted length: tokens a "
                  "verifying step gives a request (accepted drafts + the one sampled). Steps speculated: steps "
                  "the controller let propose (it turns speculation off where it measures it slower)._", ""]
    if workload_desc.get("conversations") and (turns := turns_table(summaries)):
        parts += ["### Time to first token by turn (p50)", "", turns, ""]
    parts += ["## Steps and KV cache", "", steps_table(summaries), ""]
    if gain is not None:
        parts += ["## What batching can gain on this machine", "", batch_gain.markdown(gain), ""]
    parts += ["## Plots", ""]
    parts += [f"![{p.stem}]({p.name})" for p in plot_paths]
    parts += ["", "## Systems", ""]
    for run in runs:
        parts.append(f"- **{run.system}** ({run.kind}): `{json.dumps(_clean(run.config), default=str)}`")
    errors = [(s["system"], e) for s in summaries for e in s.get("first_errors", [])]
    if errors:
        parts += ["", "## Errors (first few per system)", ""] + [f"- {name}: {e}" for name, e in errors]
    parts += ["", "## Method", "", METHOD, ""]
    path.write_text("\n".join(parts))


def write_report(out_dir: str | Path, workload: Workload, runs: Sequence[RunResult],
                 slo: metrics.SLO | None = None, target: str | None = None, command: str | None = None,
                 notes: Sequence[str] = ()) -> dict:
    """Write results.json, report.md and the plots into out_dir; return the results dict."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summaries = [metrics.summarize(r, slo) for r in runs]
    headlines = compare.headline(summaries, target)
    meta = {"created": _dt.datetime.now().isoformat(timespec="seconds"),
            "command": command or " ".join(["pagedserve" if i == 0 else a for i, a in enumerate(sys.argv)]),
            "machine": machine_info(), "notes": list(notes)}
    desc = workload.describe()
    results = {"meta": meta, "workload": {**desc, "requests": [r.to_json() for r in workload.requests]},
               "systems": [{"summary": s, "run": r.to_json()} for s, r in zip(summaries, runs, strict=True)],
               "headline": headlines}
    if (gain := policy_gain(runs)) is not None:
        results["batching_gain"] = gain.to_json()
    with open(out / "results.json", "w") as f:
        json.dump(_clean(results), f, indent=1)
    plot_paths = plots.write_all(runs, summaries, out)
    write_markdown(out / "report.md", meta, desc, summaries, headlines, runs, plot_paths, gain)
    html_report.write_html(out / "report.html", runs, summaries, meta)
    return results


def load_results(path: str | Path) -> tuple[Workload, list[RunResult]]:
    """A results.json (or the folder holding it) → (its workload, its runs)."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    with open(path) as f:
        data = json.load(f)
    return workload_from_json(data["workload"]), [RunResult.from_json(s["run"]) for s in data["systems"]]


def workload_from_json(section: dict) -> Workload:
    keys = ("name", "num_requests", "arrival", "rate", "concurrency", "seed", "requests", "fingerprint", "templates",
            "max_tokens", "prompt_words", "duration_of_arrivals_s", "conversations")
    reqs = [WorkloadRequest.from_json(d, i) for i, d in enumerate(section["requests"], 1)]
    return Workload(section.get("name", "workload"), reqs, rate=section.get("rate"),
                    concurrency=section.get("concurrency"), seed=section.get("seed"),
                    meta={k: v for k, v in section.items() if k not in keys})


def terminal_summary(results: dict, out_dir: str | Path) -> str:
    """One screen: a line per system, the first headline comparison, and where the report is."""
    w = max([28] + [len(e["summary"]["system"]) for e in results["systems"]])
    lines = [f"{'system':<{w}} {'done':>7} {'time s':>7} {'out tok/s':>10} {'req/s':>7} {'TTFT p50/p95 ms':>17} "
             f"{'ITL p50/p95 ms':>16} {'E2E p50/p95 s':>15} {'KV waste':>9} {'KV use pk/mean':>15} {'prefix hit':>10}"]
    for entry in results["systems"]:
        s = entry["summary"]
        st = s.get("steps") or {}
        waste = f"{100 * st['kv_waste']:.1f}%" if st.get("kv_waste") is not None else "–"
        kv = (f"{_num(st['kv_peak_allocated_blocks'], '.0f')}/{_num(st['kv_mean_allocated_blocks'], '.1f')}"
              if st.get("kv_peak_allocated_blocks") is not None else "–")
        lines.append(f"{s['system']:<{w}} {s['completed']:>3}/{s['requests']:<3} {_num(s['duration_s'], '.1f'):>7} "
                     f"{_num(s['output_throughput'], '.1f'):>10} {_num(s['request_throughput'], '.2f'):>7} "
                     f"{_ms(s['ttft']['p50']) + '/' + _ms(s['ttft']['p95']):>17} "
                     f"{_ms(s['itl']['p50']) + '/' + _ms(s['itl']['p95']):>16} "
                     f"{_num(s['e2e']['p50']) + '/' + _num(s['e2e']['p95']):>15} {waste:>9} {kv:>15} "
                     f"{_hit_rate(s):>10}")
    for h in results["headline"][:2]:
        lines += ["", f"{h['target']} vs {h['baseline']}:"]
        for r in h["rows"]:
            metric, t, b, change = _row_text(r)
            lines.append(f"  {metric:<40} {t:>14} vs {b:>14}   {change}")
    if (gain := results.get("batching_gain")) is not None:
        lines += ["", batch_gain.one_line(gain)]
    spec_rows = spec_decode_rows([e["summary"] for e in results["systems"]])
    if spec_rows:
        lines.append("")
    for row in spec_rows:
        lines.append(f"{row['system']}: {_num(row['speedup'])}x output tok/s vs {row['versus']}, acceptance "
                     f"{_share(row['acceptance_rate'])}, mean accepted length {_num(row['mean_accepted_length'])}, "
                     f"steps speculated {_share(row['speculated_share'])}")
    notes = list(results["meta"].get("notes", [])) + [
        f"{e['run']['system']}: {n}" for e in results["systems"] for n in e["run"].get("notes", [])]
    if notes:
        lines += [""] + [f"note: {n}" for n in notes]
    lines += ["", f"report: {Path(out_dir) / 'report.md'}  (report.html, results.json and plots beside it)"]
    return "\n".join(lines)
