"""How many drafts each request verifies next step: never slower than plain decoding.

Verifying d drafts adds d rows to the step. Whether a row pays depends on what it costs and on how
likely its draft is to be accepted, and both are measured, not guessed:

- the step's cost as a function of its rows, t(n): a moving average of measured step times per row
  count, interpolated between measured counts (on this CPU one extra row is nearly free at batch 1
  and costs about what a real token costs at batch 64; elsewhere the curve differs);
- each request's chance that its next draft is accepted, given the previous one was: accepted and
  tried drafts counted with decay (rejection stops a run, so a run of a accepted of d is a
  successes and a + 1 trials, or a trials when all were accepted), shrunk towards the engine-wide
  rate; a request that stops drafting drifts back to that rate, so it gets another chance later;
- for a model-based proposer, what one draft pass costs at this batch size, and what catching up
  costs for a request the draft sat out (priced from t(n), spread over the request's next steps).

Each step then adds drafts in the order of their expected gain (a request's j-th draft is accepted
with probability alpha^j) while the expected tokens per second, (B + expected accepted) /
(t(B + drafts) + passes * pass cost), keeps growing, and keeps the best prefix. Now and then it
tries more drafts than it planned, so a cost it measured badly once is measured again; while the
model keeps picking no drafts at all those tries grow rarer (every 16, 32, ... 1024 steps), and they
skip requests a draft model would first have to catch up on, so that a draft that never pays (a draft
model as large as the target) costs next to nothing.
`disable_by_batch_size` (vLLM's option) replaces all of this by a fixed threshold.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass

EXPLORE_EVERY = 16  # steps between two tries of more drafts than the model picked...
MAX_EXPLORE_EVERY = 1024  # ...doubling up to this while the model keeps picking none
AMORTIZE_STEPS = 64  # a catch-up's cost is spread over at most this many of the request's next steps
MAX_EXPLORE_CATCH_UP = 16  # tokens a draft model may have to catch up on for a request to be tried
COST_DECAY = 0.7  # weight of the old estimate in each row count's moving average of step seconds
ACCEPT_DECAY = 0.9  # per step: how fast a request's acceptance counts fade
PRIOR_TRIALS = 2.0  # weight of the engine-wide rate in a request's estimate
INITIAL_ALPHA = 0.6  # the engine-wide rate before anything is measured


def batch_bucket(batch_size: int) -> int:
    """1, 2, 4, 8, ...: draft passes of similar batch sizes share their measurements."""
    return 1 << max(0, batch_size - 1).bit_length()


class StepCosts:
    """t(n): seconds of a step with n rows, from measured steps."""

    def __init__(self) -> None:
        self._rows: list[int] = []  # sorted row counts with a measurement
        self._seconds: dict[int, float] = {}

    def observe(self, rows: int, seconds: float) -> None:
        if rows < 1 or seconds <= 0:
            return
        if rows in self._seconds:
            self._seconds[rows] = COST_DECAY * self._seconds[rows] + (1 - COST_DECAY) * seconds
        else:
            bisect.insort(self._rows, rows)
            self._seconds[rows] = seconds

    def estimate(self, rows: int) -> float | None:
        """Interpolated between the nearest measured counts; scaled from the nearest one beyond them;
        None before any measurement."""
        if not self._rows:
            return None
        if rows in self._seconds:
            return self._seconds[rows]
        i = bisect.bisect_left(self._rows, rows)
        if i == 0:
            lo_n, lo_t = 0, 0.0
        else:
            lo_n = self._rows[i - 1]
            lo_t = self._seconds[lo_n]
        if i == len(self._rows):  # beyond every measurement: as costly per row as the largest one
            return lo_t * rows / lo_n
        hi_n = self._rows[i]
        hi_t = self._seconds[hi_n]
        if lo_n == 0:  # fewer rows than any measurement: taken as costly as the smallest one
            return hi_t
        return lo_t + (hi_t - lo_t) * (rows - lo_n) / (hi_n - lo_n)


@dataclass
class _Acceptance:
    successes: float = 0.0
    trials: float = 0.0

    def decay(self) -> None:
        self.successes *= ACCEPT_DECAY
        self.trials *= ACCEPT_DECAY

    def add(self, proposed: int, accepted: int) -> None:
        self.successes += accepted
        self.trials += accepted + (1 if accepted < proposed else 0)

    def alpha(self, prior: float) -> float:
        return (self.successes + PRIOR_TRIALS * prior) / (self.trials + PRIOR_TRIALS)


@dataclass
class Candidate:
    """A request that may draft next step: at most `limit` drafts. `catch_up`: tokens a draft model
    would first have to compute for it (it sat out the steps since it last drafted)."""

    request_id: str
    limit: int
    catch_up: int = 0
    remaining: int = 1  # output tokens it may still make (over which a catch-up pays back)


class SpeculationController:
    def __init__(self, disable_by_batch_size: int | None = None) -> None:
        self.disable_by_batch_size = disable_by_batch_size
        self.costs = StepCosts()
        self._pass_seconds: dict[int, float] = {}  # batch bucket -> seconds of one draft pass
        self._requests: dict[str, _Acceptance] = {}
        self._overall = _Acceptance(INITIAL_ALPHA * 4, 4.0)  # engine-wide, decays per verification
        self._step = 0
        self._explore_every = EXPLORE_EVERY
        self._next_explore = EXPLORE_EVERY

    # --- measurements ----------------------------------------------------------------------------

    def observe_step(self, rows: int, seconds: float) -> None:
        """A step's forward and sampling over `rows` rows took `seconds`."""
        self.costs.observe(rows, seconds)

    def observe_proposal(self, batch_size: int, passes: int, seconds: float) -> None:
        """Drafting for `batch_size` requests took `passes` passes and `seconds` (model-based proposers)."""
        if passes < 1 or seconds <= 0:
            return
        b = batch_bucket(batch_size)
        per_pass = seconds / passes
        old = self._pass_seconds.get(b)
        self._pass_seconds[b] = per_pass if old is None else COST_DECAY * old + (1 - COST_DECAY) * per_pass

    def observe_request(self, request_id: str, proposed: int, accepted: int) -> None:
        self._requests.setdefault(request_id, _Acceptance()).add(proposed, accepted)
        self._overall.decay()
        self._overall.add(proposed, accepted)

    def next_step(self, request_ids: Iterable[str]) -> None:
        """A step passed for these requests: their counts fade a little."""
        self._step += 1
        for rid in request_ids:
            if (state := self._requests.get(rid)) is not None:
                state.decay()

    def forget(self, request_ids: Iterable[str]) -> None:
        for rid in request_ids:
            self._requests.pop(rid, None)

    def alpha(self, request_id: str) -> float:
        """The chance that this request's next draft is accepted (given the one before it was)."""
        prior = self._overall.alpha(INITIAL_ALPHA)
        state = self._requests.get(request_id)
        return prior if state is None else state.alpha(prior)

    # --- the plan --------------------------------------------------------------------------------

    def plan(self, batch_size: int, candidates: list[Candidate], model_based: bool) -> dict[str, int]:
        """Drafts per request for the next step, whose batch has `batch_size` requests (one row each
        before drafts). A request left out drafts nothing."""
        candidates = [c for c in candidates if c.limit > 0]
        if not candidates:
            return {}
        if self.disable_by_batch_size is not None:
            return {} if batch_size >= self.disable_by_batch_size else {c.request_id: c.limit for c in candidates}
        base = self.costs.estimate(batch_size)
        if base is None:  # nothing measured yet: speculate, and learn what it costs
            return {c.request_id: c.limit for c in candidates}
        # Every draft as (expected gain, request); a request's j-th draft counts alpha^j.
        gains = []
        for c in candidates:
            a, g = self.alpha(c.request_id), 1.0
            for _ in range(c.limit):
                g *= a
                gains.append((g, c.request_id))
        gains.sort(key=lambda x: -x[0])
        pass_cost = self._pass_seconds.get(batch_bucket(batch_size), 0.0) if model_based else 0.0
        by_id = {c.request_id: c for c in candidates}
        best_rate, best_n = batch_size / base, 0
        tokens, per_request, passes, catch_up = float(batch_size), {}, 0, 0.0
        for n, (g, rid) in enumerate(gains, 1):
            tokens += g
            per_request[rid] = per_request.get(rid, 0) + 1
            passes = max(passes, per_request[rid])
            if per_request[rid] == 1 and pass_cost:
                catch_up += self._catch_up_cost(batch_size, base, pass_cost, by_id[rid])
            cost = self.costs.estimate(batch_size + n) + passes * pass_cost + catch_up
            if tokens / cost > best_rate:
                best_rate, best_n = tokens / cost, n
        plan: dict[str, int] = {}
        for _, rid in gains[:best_n]:
            plan[rid] = plan.get(rid, 0) + 1
        if self._step >= self._next_explore:
            self._explore_every = EXPLORE_EVERY if best_n else min(2 * self._explore_every, MAX_EXPLORE_EVERY)
            self._next_explore = self._step + self._explore_every
            self._explore(plan, candidates)
        return plan

    def _catch_up_cost(self, batch_size: int, base: float, pass_cost: float, c: Candidate) -> float:
        """A draft model's first pass for `c` computes its tokens since it last drafted: priced as the
        target's extra rows would be, scaled by how the draft's pass compares with the target's step,
        and spread over the steps it can pay back in (a prompt's catch-up is paid once per request)."""
        extra = max(0, c.catch_up - 1)
        if not extra:
            return 0.0
        rows = self.costs.estimate(batch_size + extra) - base
        return max(0.0, rows) * (pass_cost / base) / max(1, min(c.remaining, AMORTIZE_STEPS))

    @staticmethod
    def _explore(plan: dict[str, int], candidates: list[Candidate]) -> None:
        """Twice the planned drafts (at least one) for every candidate, except where a draft model would
        first catch up on a long stretch: a try must cost a few rows, not a prefill."""
        for c in candidates:
            if c.catch_up <= MAX_EXPLORE_CATCH_UP:
                n = plan.get(c.request_id, 0)
                plan[c.request_id] = min(c.limit, n + max(1, n))
