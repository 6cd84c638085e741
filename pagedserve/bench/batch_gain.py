"""How much continuous batching can gain over static batching on this machine, from measured steps.

Both policies do the same prefill work and make the same tokens; what differs is how full their
decode steps are. A decode step costs a fixed part (every weight read once, the per-step overheads)
plus a part per sequence in it (its multiply-adds and its K/V reads). Where the fixed part dominates
(a GPU), a full step makes tokens many times cheaper than a nearly empty one, and continuous batching,
which keeps its steps full, gains up to seats / static's mean batch. Where the per-sequence part
dominates (a 2-core CPU), a nearly empty step makes tokens almost as cheaply as a full one, and no
scheduler can gain much.

`batching_gain` puts numbers on this from the steps both runs recorded:
- the ceiling: static's decode cost per token over the cost per token of a full decode step (every
  seat busy). No scheduler's decode beats full steps, and prefill is the same work under both
  policies, which can only pull the whole-run ratio towards 1; so continuous / static throughput is
  at most this. The full steps are pooled from both runs. Static's come at the start of its batches,
  when contexts (and so K/V reads) are short, which makes the pooled figure cheap and the ceiling, if
  anything, too high.
- the same on a machine where a step costs as much at any batch size: seats / static's mean batch.
- a least-squares fit of step time = fixed + per_sequence * batch, to say which part dominates.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from pagedserve.bench.records import StepSample


@dataclass(frozen=True)
class DecodeStep:
    batch: int  # sequences in the step, each making one token
    seconds: float


@dataclass(frozen=True)
class BatchingGain:
    seats: int  # max_num_seqs, the same for both policies
    static_ms_per_token: float  # over static's decode-only steps
    continuous_ms_per_token: float  # over continuous's decode-only steps
    full_ms_per_token: float  # over decode steps with every seat busy (either run)
    static_mean_batch: float
    continuous_mean_batch: float
    fixed_ms: float  # fit: one decode step = fixed_ms + per_sequence_ms * batch
    per_sequence_ms: float

    @property
    def ceiling(self) -> float:
        """The most continuous / static can reach in decode on this machine (full steps throughout)."""
        return self.static_ms_per_token / self.full_ms_per_token

    @property
    def achieved(self) -> float:
        """What continuous batching reached in decode: static's cost per token over continuous's."""
        return self.static_ms_per_token / self.continuous_ms_per_token

    @property
    def flat_cost_ceiling(self) -> float:
        """The ceiling where a step costs the same at any batch size (the fixed part dominating)."""
        return self.seats / self.static_mean_batch

    @property
    def fixed_share_of_full_step(self) -> float:
        return self.fixed_ms / (self.fixed_ms + self.per_sequence_ms * self.seats)

    def to_json(self) -> dict:
        return {**asdict(self), "ceiling": self.ceiling, "achieved": self.achieved,
                "flat_cost_ceiling": self.flat_cost_ceiling,
                "fixed_share_of_full_step": self.fixed_share_of_full_step}


def _ms_per_token(steps: Sequence[DecodeStep]) -> float:
    tokens = sum(s.batch for s in steps)
    return 1000 * sum(s.seconds for s in steps) / tokens if tokens else math.nan


def _mean_batch(steps: Sequence[DecodeStep]) -> float:
    return sum(s.batch for s in steps) / len(steps) if steps else math.nan


def fit_step_cost(steps: Sequence[DecodeStep]) -> tuple[float, float]:
    """Least squares: seconds = fixed + per_sequence * batch. Returns (fixed_ms, per_sequence_ms)."""
    n = len(steps)
    if n == 0:
        return math.nan, math.nan
    mb = sum(s.batch for s in steps) / n
    mt = sum(s.seconds for s in steps) / n
    var = sum((s.batch - mb) ** 2 for s in steps)
    if var == 0:  # one batch size only: no slope to fit
        return math.nan, math.nan
    slope = sum((s.batch - mb) * (s.seconds - mt) for s in steps) / var
    return 1000 * (mt - slope * mb), 1000 * slope


def batching_gain(static: Iterable[DecodeStep], continuous: Iterable[DecodeStep], seats: int) -> BatchingGain | None:
    """The gain figures from each policy's decode-only steps; None without steps of both."""
    static, continuous = list(static), list(continuous)
    if not static or not continuous:
        return None
    everything = static + continuous
    fixed, per_seq = fit_step_cost(everything)
    full = [s for s in everything if s.batch == seats]
    # Without a single full step, the fit's full step stands in for the measured one.
    full_ms = _ms_per_token(full) if full else (fixed + per_seq * seats) / seats
    return BatchingGain(seats=seats, static_ms_per_token=_ms_per_token(static),
                        continuous_ms_per_token=_ms_per_token(continuous), full_ms_per_token=full_ms,
                        static_mean_batch=_mean_batch(static), continuous_mean_batch=_mean_batch(continuous),
                        fixed_ms=fixed, per_sequence_ms=per_seq)


def decode_steps(steps: Iterable[StepSample]) -> list[DecodeStep]:
    """The decode-only steps of a run's step log."""
    return [DecodeStep(s.batch_size, s.duration) for s in steps if s.batch_size > 0 and not s.num_prefill]


def markdown(g: BatchingGain) -> str:
    """The report's section body."""
    rows = [("static", g.static_mean_batch, g.static_ms_per_token),
            ("continuous", g.continuous_mean_batch, g.continuous_ms_per_token),
            (f"every seat busy ({g.seats})", float(g.seats), g.full_ms_per_token)]
    lines = ["| decode steps | mean batch | ms per token |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {b:.1f} | {ms:.2f} |" for name, b, ms in rows]
    fit = ("- Too few batch sizes to fit a step cost." if math.isnan(g.fixed_ms) else
           f"- One decode step here costs about {g.fixed_ms:.1f} ms + {g.per_sequence_ms:.2f} ms per sequence "
           f"(least squares over both runs' decode steps): the fixed part is "
           f"{100 * g.fixed_share_of_full_step:.0f}% of a full step.")
    return "\n".join([
        *lines, "", fit,
        f"- Continuous batching reached **{g.achieved:.2f}x** static's decode cost per token. With every step "
        f"full, the most any scheduler can reach on this machine is **{g.ceiling:.2f}x**; prefill is the same "
        "work under both policies, so the whole-run throughput ratio is at most that.",
        f"- Where a step costs the same at any batch size (the fixed part dominating, as on a GPU), the "
        f"same static schedule would leave room for {g.flat_cost_ceiling:.2f}x (seats / static's mean batch).",
    ])


def one_line(g: dict) -> str:
    """A one-line summary of `BatchingGain.to_json()` (also what results.json keeps)."""
    return (f"decode ms per token: static {g['static_ms_per_token']:.2f}, continuous {g['continuous_ms_per_token']:.2f}, "
            f"full steps {g['full_ms_per_token']:.2f} -> continuous/static {g['achieved']:.2f}x of at most "
            f"{g['ceiling']:.2f}x on this machine ({g['flat_cost_ceiling']:.2f}x where a step costs the same at "
            "any batch size)")
