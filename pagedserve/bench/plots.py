"""PNG plots of a benchmark, drawn with matplotlib's Agg canvas (no display, no pyplot global state).

One function per figure; each takes the runs (and their summaries) and writes one file.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pagedserve.bench import batch_gain, metrics
from pagedserve.bench.records import RunResult

PLOT_FILES = ("throughput.png", "latency_cdf.png", "ttft_over_time.png", "batch_size.png", "kv_blocks.png",
              "fragmentation.png", "step_cost.png", "prefix_cache.png")


def _figure(width: float = 10, height: float = 5) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _color(i: int) -> str:
    return f"C{i % 10}"


def _no_data(fig: Figure, text: str) -> None:
    ax = fig.subplots()
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=12)


def throughput(runs: Sequence[RunResult], summaries: Sequence[dict], path: Path) -> None:
    fig = _figure(11, 4.5)
    names = [r.system for r in runs]
    panels = (("output_throughput", "output tokens / s"), ("request_throughput", "requests / s"))
    for ax, (key, label) in zip(fig.subplots(1, 2), panels, strict=True):
        values = [s[key] for s in summaries]
        bars = ax.bar(range(len(names)), values, color=[_color(i) for i in range(len(names))])
        ax.bar_label(bars, fmt="%.2f", fontsize=9)
        ax.set_xticks(range(len(names)), names, rotation=15, ha="right", fontsize=9)
        ax.set_ylabel(label)
        ax.set_title(f"Throughput: {label}")
        ax.grid(axis="y", alpha=0.3)
    fig.savefig(path)


def latency_cdf(runs: Sequence[RunResult], path: Path) -> None:
    fig = _figure(14, 4.5)
    panels = (("TTFT", lambda run: [v for r in run.requests if r.ok and (v := metrics.ttft(r)) is not None]),
              ("inter-token latency", lambda run: [g for r in run.requests if r.ok for g in metrics.itls(r)]),
              ("end-to-end latency", lambda run: [v for r in run.requests if r.ok and (v := metrics.e2e(r)) is not None]))
    for ax, (title, values_of) in zip(fig.subplots(1, 3), panels, strict=True):
        for i, run in enumerate(runs):
            xs = sorted(values_of(run))
            if xs:
                ys = [(k + 1) / len(xs) for k in range(len(xs))]
                ax.step(xs, ys, where="post", color=_color(i), label=run.system)
        ax.set_xlabel("seconds")
        ax.set_ylabel("fraction of requests" if title != "inter-token latency" else "fraction of token gaps")
        ax.set_title(f"CDF: {title}")
        ax.grid(alpha=0.3)
        ax.set_ylim(0, 1.02)
    fig.axes[0].legend(fontsize=8)
    fig.savefig(path)


def ttft_over_time(runs: Sequence[RunResult], path: Path) -> None:
    fig = _figure(10, 4.5)
    ax = fig.subplots()
    for i, run in enumerate(runs):
        pts = [(r.arrival, metrics.ttft(r)) for r in run.requests if r.ok and r.first_token is not None]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=14, color=_color(i), label=run.system, alpha=0.8)
    ax.set_xlabel("arrival time (s since start)")
    ax.set_ylabel("time to first token (s)")
    ax.set_title("TTFT by arrival time: waiting for a batch shows up as a staircase")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path)


def _stepped(runs: Sequence[RunResult]) -> list[tuple[int, RunResult]]:
    return [(i, r) for i, r in enumerate(runs) if r.steps]


_NO_STEP_DATA = "no per-step data (systems measured over HTTP report none)"


def _per_system_panels(runs: Sequence[RunResult], path: Path, row_height: float, title: str,
                       draw: Callable[[Axes, int, RunResult], None]) -> None:
    """One panel per system with per-step data, stacked on a shared time axis."""
    with_steps = _stepped(runs)
    fig = _figure(10, 2.2 + row_height * max(1, len(with_steps)))
    if not with_steps:
        _no_data(fig, _NO_STEP_DATA)
        fig.savefig(path)
        return
    axes = fig.subplots(len(with_steps), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (i, run) in zip(axes, with_steps, strict=True):
        draw(ax, i, run)
        ax.set_title(run.system, fontsize=10, loc="left")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    axes[-1].set_xlabel("time (s since start)")
    fig.suptitle(title)
    fig.savefig(path)


def _draw_batch_size(ax: Axes, i: int, run: RunResult) -> None:
    ts = [s.t for s in run.steps]
    ax.step(ts, [s.batch_size for s in run.steps], where="post", color=_color(i), label="sequences in the step")
    if any(s.num_waiting for s in run.steps):
        ax.step(ts, [s.num_waiting for s in run.steps], where="post", color="gray", alpha=0.7,
                linestyle="--", label="waiting")
    ax.set_ylabel("requests")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def _draw_kv_blocks(ax: Axes, i: int, run: RunResult) -> None:
    bs = run.steps[0].block_size
    ts = [s.t for s in run.steps]
    alloc = [s.kv_allocated_slots / bs for s in run.steps]
    filled = [s.kv_filled_slots / bs for s in run.steps]
    ax.step(ts, alloc, where="post", color=_color(i), label="allocated (incl. reserved / padding)")
    ax.step(ts, filled, where="post", color="black", linewidth=1, label="holding live K/V")
    ax.fill_between(ts, filled, alloc, step="post", color=_color(i), alpha=0.25, label="allocated but empty")
    if any(s.kv_cached_blocks for s in run.steps):
        ax.step(ts, [s.kv_cached_blocks for s in run.steps], where="post", color="gray", linestyle=":",
                label="free, still caching a prefix")
    ax.set_ylabel(f"blocks of {bs}")


def batch_size(runs: Sequence[RunResult], path: Path) -> None:
    _per_system_panels(runs, path, 1.8, "Batch size over time", _draw_batch_size)


def kv_blocks(runs: Sequence[RunResult], path: Path) -> None:
    _per_system_panels(runs, path, 2.0, "KV cache: blocks in use vs reserved over time", _draw_kv_blocks)


def _two_panel_step_figure(runs: Sequence[RunResult], path: Path) -> Figure | None:
    """A wide figure for per-step data, or None once a "no data" figure has been written to path."""
    fig = _figure(13, 4.5)
    if _stepped(runs):
        return fig
    _no_data(fig, _NO_STEP_DATA)
    fig.savefig(path)
    return None


def fragmentation(runs: Sequence[RunResult], summaries: Sequence[dict], path: Path) -> None:
    if (fig := _two_panel_step_figure(runs, path)) is None:
        return
    with_steps = _stepped(runs)
    left, right = fig.subplots(1, 2, width_ratios=[2, 1])
    for i, run in with_steps:
        left.step([s.t for s in run.steps], [100 * s.waste for s in run.steps], where="post", color=_color(i),
                  label=run.system, alpha=0.85)
    left.set_xlabel("time (s since start)")
    left.set_ylabel("% of allocated KV slots empty")
    left.set_title("KV waste over time (fragmentation + reservation/padding)")
    left.set_ylim(0, 100)
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    by_name = {s["system"]: s for s in summaries}
    names = [run.system for _, run in with_steps]
    values = [100 * by_name[n]["steps"]["kv_waste"] for n in names]
    bars = right.bar(range(len(names)), values, color=[_color(i) for i, _ in with_steps])
    right.bar_label(bars, fmt="%.1f%%", fontsize=9)
    right.set_xticks(range(len(names)), names, rotation=15, ha="right", fontsize=9)
    right.set_ylabel("time-weighted mean, %")
    right.set_title("Memory waste")
    right.set_ylim(0, 100)
    right.grid(axis="y", alpha=0.3)
    fig.savefig(path)


def step_cost(runs: Sequence[RunResult], path: Path) -> None:
    """Decode step time and cost per token by batch size: how much a full step saves on this machine."""
    if (fig := _two_panel_step_figure(runs, path)) is None:
        return
    left, right = fig.subplots(1, 2)
    for i, run in _stepped(runs):
        by_batch: dict[int, list[float]] = {}
        for s in batch_gain.decode_steps(run.steps):
            by_batch.setdefault(s.batch, []).append(s.seconds)
        sizes = sorted(by_batch)
        ms = [1000 * metrics.mean(by_batch[b]) for b in sizes]
        left.plot(sizes, ms, marker="o", markersize=3, color=_color(i), label=run.system)
        right.plot(sizes, [m / b for m, b in zip(ms, sizes, strict=True)], marker="o", markersize=3,
                   color=_color(i), label=run.system)
    left.set_ylabel("ms per decode step (mean)")
    left.set_title("Decode step time by batch size")
    right.set_ylabel("ms per token")
    right.set_title("Decode cost per token by batch size")
    right.set_ylim(bottom=0)
    for ax in (left, right):
        ax.set_xlabel("sequences in the step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(path)


def _bars(ax: Axes, names: Sequence[str], values: Sequence[float | None], fmt: str, title: str, ylabel: str) -> None:
    shown = [0.0 if v is None else v for v in values]
    bars = ax.bar(range(len(names)), shown, color=[_color(i) for i in range(len(names))])
    ax.bar_label(bars, labels=["–" if v is None else format(v, fmt) for v in values], fontsize=9)
    ax.set_xticks(range(len(names)), names, rotation=15, ha="right", fontsize=9)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)


def prefix_cache(runs: Sequence[RunResult], summaries: Sequence[dict], path: Path) -> None:
    """Per system: hit rate, TTFT p50/p95 and KV blocks in use (peak/mean) — what a prefix cache buys."""
    fig = _figure(15, 4.5)
    hit_ax, ttft_ax, kv_ax = fig.subplots(1, 3)
    names = [r.system for r in runs]
    rates = [(s.get("prefix_cache") or {}).get("hit_rate") for s in summaries]
    _bars(hit_ax, names, [None if r is None else 100 * r for r in rates], ".1f", "Prefix-cache hit rate",
          "% of prompt tokens served from the cache")
    hit_ax.set_ylim(0, 105)
    x = range(len(names))
    for offset, key, alpha in ((-0.2, "p50", 1.0), (0.2, "p95", 0.55)):
        values = [1000 * v if math.isfinite(v := s["ttft"][key]) else 0.0 for s in summaries]
        bars = ttft_ax.bar([i + offset for i in x], values, width=0.4, alpha=alpha, label=f"TTFT {key}",
                           color=[_color(i) for i in x])
        ttft_ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ttft_ax.set_xticks(list(x), names, rotation=15, ha="right", fontsize=9)
    ttft_ax.set_title("Time to first token (p50, p95 pale)")
    ttft_ax.set_ylabel("ms")
    ttft_ax.grid(axis="y", alpha=0.3)
    steps = [s.get("steps") or {} for s in summaries]
    for offset, key, alpha, label in ((-0.2, "kv_peak_allocated_blocks", 1.0, "peak"),
                                      (0.2, "kv_mean_allocated_blocks", 0.55, "mean")):
        values = [st.get(key) or 0.0 for st in steps]
        bars = kv_ax.bar([i + offset for i in x], values, width=0.4, alpha=alpha, label=label,
                         color=[_color(i) for i in x])
        kv_ax.bar_label(bars, fmt="%.0f", fontsize=8)
    kv_ax.set_xticks(list(x), names, rotation=15, ha="right", fontsize=9)
    kv_ax.set_title("KV blocks in use (peak, mean pale)" + ("" if any(steps) else ": no per-step data"))
    kv_ax.set_ylabel("blocks")
    kv_ax.grid(axis="y", alpha=0.3)
    fig.savefig(path)


def write_all(runs: Sequence[RunResult], summaries: Sequence[dict], out_dir: Path) -> list[Path]:
    out_dir = Path(out_dir)
    paths = [out_dir / name for name in PLOT_FILES]
    throughput(runs, summaries, paths[0])
    latency_cdf(runs, paths[1])
    ttft_over_time(runs, paths[2])
    batch_size(runs, paths[3])
    kv_blocks(runs, paths[4])
    fragmentation(runs, summaries, paths[5])
    step_cost(runs, paths[6])
    prefix_cache(runs, summaries, paths[7])
    return paths
