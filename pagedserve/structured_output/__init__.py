"""Structured outputs: a per-request grammar (JSON schema, regex, choice, EBNF) that masks the logits."""

from pagedserve.structured_output.params import StructuredOutputsParams

__all__ = ["StructuredOutputsParams"]
