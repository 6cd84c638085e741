"""When to speculate: never slower than plain decoding.

Verifying k proposals per request makes a step's batch k+1 times larger. On a small batch the step is
bound by reading the weights, so the extra rows are nearly free; on a large one it is bound by
arithmetic and the extra rows cost what they would cost as real tokens, while only the accepted ones
come out. Where the crossover lies depends on the machine, the model, the proposer and the text, so it
is measured, not guessed: decode-only steps are timed per batch-size bucket with speculation on and
off, and each step takes the arm with the higher measured output rate (tokens per second), trying the
other arm now and then so that a changed workload is noticed. `disable_by_batch_size` (vLLM's option)
replaces the measurement with a fixed threshold.

Per request, a proposer whose drafts keep being rejected (a text with nothing to look up, say) is
paused for a while: its verification rows would cost without paying back.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

EXPLORE_EVERY = 16  # steps per bucket between two tries of the arm that measured worse
MIN_SAMPLES = 3  # an arm is tried this often in a bucket before the measurements decide
RATE_DECAY = 0.8  # weight of the old estimate in each arm's moving average of tokens/s
ACCEPT_DECAY = 0.7
LOW_ACCEPTANCE = 0.15  # a request's recent acceptance rate below which it pauses
PAUSE_STEPS = 32


def batch_bucket(batch_size: int) -> int:
    """1, 2, 4, 8, ...: steps of similar batch sizes share their measurements."""
    return 1 << max(0, batch_size - 1).bit_length()


@dataclass
class _Arm:
    rate: float = 0.0  # tokens per second, moving average
    samples: int = 0

    def observe(self, rate: float) -> None:
        self.rate = rate if self.samples == 0 else RATE_DECAY * self.rate + (1 - RATE_DECAY) * rate
        self.samples += 1


@dataclass
class _Bucket:
    on: _Arm = field(default_factory=_Arm)
    off: _Arm = field(default_factory=_Arm)
    decisions: int = 0


@dataclass
class _RequestAcceptance:
    rate: float = 1.0
    paused_until: int = 0


class SpeculationController:
    def __init__(self, disable_by_batch_size: int | None = None) -> None:
        self.disable_by_batch_size = disable_by_batch_size
        self._buckets: dict[int, _Bucket] = {}
        self._requests: dict[str, _RequestAcceptance] = {}
        self._step = 0

    def should_speculate(self, batch_size: int) -> bool:
        """For the next step, whose running batch is `batch_size` sequences."""
        if self.disable_by_batch_size is not None:
            return batch_size < self.disable_by_batch_size
        b = self._buckets.setdefault(batch_bucket(batch_size), _Bucket())
        b.decisions += 1
        for arm, choice in ((b.on, True), (b.off, False)):
            if arm.samples < MIN_SAMPLES:
                return choice
        best = b.on.rate >= b.off.rate
        return (not best) if b.decisions % EXPLORE_EVERY == 0 else best

    def observe_step(self, batch_size: int, speculated: bool, num_tokens: int, seconds: float) -> None:
        """A decode-only step's outcome: tokens it emitted over its duration."""
        if seconds <= 0 or self.disable_by_batch_size is not None:
            return
        b = self._buckets.setdefault(batch_bucket(batch_size), _Bucket())
        (b.on if speculated else b.off).observe(num_tokens / seconds)

    def eligible(self, request_id: str) -> bool:
        state = self._requests.get(request_id)
        return state is None or state.paused_until <= self._step

    def observe_request(self, request_id: str, proposed: int, accepted: int) -> None:
        state = self._requests.setdefault(request_id, _RequestAcceptance())
        state.rate = ACCEPT_DECAY * state.rate + (1 - ACCEPT_DECAY) * (accepted / proposed)
        if state.rate < LOW_ACCEPTANCE:
            state.paused_until = self._step + PAUSE_STEPS
            state.rate = LOW_ACCEPTANCE * 2  # after the pause it gets a few chances again

    def next_step(self) -> None:
        self._step += 1

    def forget(self, request_ids: Iterable[str]) -> None:
        for rid in request_ids:
            self._requests.pop(rid, None)

    def arms(self) -> dict[int, tuple[float, float]]:
        """Per bucket: measured tokens/s with and without speculation (for reports and tests)."""
        return {k: (b.on.rate, b.off.rate) for k, b in sorted(self._buckets.items())}
