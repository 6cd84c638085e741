"""Speculative decoding counters, as vLLM counts them (since the start)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpecDecodeStats:
    num_drafts: int = 0  # (request, step) pairs that verified at least one proposed token
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)  # accepted drafts at position 0, 1, ...
    num_steps_speculated: int = 0
    num_steps_plain: int = 0  # steps the controller ran without proposals

    def record(self, num_draft: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_draft
        self.num_accepted_tokens += num_accepted
        if len(self.accepted_per_pos) < num_draft:
            self.accepted_per_pos += [0] * (num_draft - len(self.accepted_per_pos))
        for pos in range(num_accepted):
            self.accepted_per_pos[pos] += 1

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens a verifying step emits per request on average: accepted drafts plus the one sampled."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0

    def copy(self) -> SpecDecodeStats:
        return SpecDecodeStats(self.num_drafts, self.num_draft_tokens, self.num_accepted_tokens,
                               list(self.accepted_per_pos), self.num_steps_speculated, self.num_steps_plain)

    def since(self, earlier: SpecDecodeStats) -> SpecDecodeStats:
        """The counts added after `earlier` (a copy taken before, e.g. before a benchmark run)."""
        per_pos = list(self.accepted_per_pos)
        for pos, n in enumerate(earlier.accepted_per_pos):
            per_pos[pos] -= n
        return SpecDecodeStats(self.num_drafts - earlier.num_drafts, self.num_draft_tokens - earlier.num_draft_tokens,
                               self.num_accepted_tokens - earlier.num_accepted_tokens, per_pos,
                               self.num_steps_speculated - earlier.num_steps_speculated,
                               self.num_steps_plain - earlier.num_steps_plain)

    def as_dict(self) -> dict[str, object]:
        return {"num_drafts": self.num_drafts, "num_draft_tokens": self.num_draft_tokens,
                "num_accepted_tokens": self.num_accepted_tokens, "accepted_per_pos": list(self.accepted_per_pos),
                "acceptance_rate": self.acceptance_rate, "mean_accepted_length": self.mean_accepted_length,
                "num_steps_speculated": self.num_steps_speculated, "num_steps_plain": self.num_steps_plain}
