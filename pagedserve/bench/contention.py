"""Was the machine busy while a system ran? On a shared machine other processes can take the cores
away during one system's run and not another's. Linux counts, per thread, the time it sat runnable on
a run queue waiting for a CPU (/proc/self/task/*/schedstat); that share of our threads' time, with the
load average, lets the report flag runs whose timings were inflated by someone else's load.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

# Above this share of runnable time spent waiting for a CPU, a run is flagged as disturbed.
DISTURBED_ABOVE = 0.2


def _schedstat() -> tuple[float, float] | None:
    """(seconds on a CPU, seconds waiting for one) summed over this process's threads; None if unknown."""
    run = wait = 0
    try:
        for task in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{task}/schedstat") as f:
                    r, w, _ = f.read().split()
            except FileNotFoundError:  # the thread ended meanwhile
                continue
            run += int(r)
            wait += int(w)
    except (OSError, ValueError):
        return None
    return run / 1e9, wait / 1e9


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


@dataclass
class Contention:
    """Start it before a run, call result() after."""

    _wall: float = field(default_factory=time.monotonic)
    _cpu: float = field(default_factory=time.process_time)
    _sched: tuple[float, float] | None = field(default_factory=_schedstat)
    _load: float | None = field(default_factory=_load)

    def result(self) -> dict:
        out = {"wall_s": time.monotonic() - self._wall, "cpu_s": time.process_time() - self._cpu,
               "loadavg_1m_start": self._load, "loadavg_1m_end": _load()}
        end = _schedstat()
        if self._sched is not None and end is not None:
            run, wait = max(0.0, end[0] - self._sched[0]), max(0.0, end[1] - self._sched[1])
            out["runqueue_wait_s"] = wait
            out["wait_share"] = wait / (run + wait) if run + wait > 0 else 0.0
        return out


def note_if_disturbed(stats: dict) -> str | None:
    share = stats.get("wait_share")
    if share is None or share <= DISTURBED_ABOVE:
        return None
    def fmt(x: float | None) -> str:
        return "?" if x is None else f"{x:.1f}"

    return (f"its threads spent {100 * share:.0f}% of their runnable time waiting for a CPU (1-min load "
            f"average {fmt(stats.get('loadavg_1m_start'))} → {fmt(stats.get('loadavg_1m_end'))}): other "
            "processes competed for the cores, so its timings are inflated — rerun on a quiet machine")
