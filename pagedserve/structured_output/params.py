"""StructuredOutputsParams: what a request's output must match (vLLM's offline names)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass(frozen=True)
class StructuredOutputsParams:
    """Exactly one of: `json` (a JSON schema, as a dict or a JSON string), `regex`, `choice` (a list of
    strings, the output is one of them), `grammar` (EBNF, xgrammar's dialect of GBNF), `json_object`
    (any JSON object: OpenAI's response_format json_object)."""

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def __post_init__(self) -> None:
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"structured_outputs must set exactly one of {', '.join(KINDS)}, got "
                             f"{', '.join(given) or 'none'}")
        kind = given[0]
        value = getattr(self, kind)
        if kind == "json":
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"structured_outputs.json is not valid JSON: {exc}") from None
            if not isinstance(value, dict):
                raise ValueError(f"structured_outputs.json must be a JSON schema object, got {type(value).__name__}")
        elif kind in ("regex", "grammar"):
            if not isinstance(value, str) or not value:
                raise ValueError(f"structured_outputs.{kind} must be a non-empty string, got {value!r}")
        elif kind == "choice":
            if not isinstance(value, (list, tuple)) or not value or \
                    not all(isinstance(c, str) and c for c in value):
                raise ValueError(f"structured_outputs.choice must be a non-empty list of non-empty strings, "
                                 f"got {value!r}")
        elif value is not True:
            raise ValueError(f"structured_outputs.json_object must be true, got {value!r}")
        self.to_grammar()  # a grammar xgrammar cannot parse is refused here, before any engine sees it

    def to_grammar(self) -> Any:
        """The xgrammar Grammar (tokenizer-independent; the engine compiles it for its vocabulary)."""
        import xgrammar as xgr

        kind, text = self.key()
        try:
            if kind == "json":  # compact JSON: any_whitespace would let a model pad without end
                return xgr.Grammar.from_json_schema(text, any_whitespace=False)
            if kind == "json_object":
                # OpenAI's json_object is an object (xgrammar's builtin JSON grammar takes any value),
                # written compactly for the same reason as schemas
                return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False)
            if kind == "regex":
                return xgr.Grammar.from_regex(text)
            if kind == "choice":
                return xgr.Grammar.from_ebnf(
                    "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in json.loads(text)))
            return xgr.Grammar.from_ebnf(text)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise ValueError(f"structured_outputs.{kind} is not a grammar xgrammar accepts: "
                             f"{str(exc).strip().splitlines()[-1]}") from None

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    def key(self) -> tuple[str, str]:
        """(kind, canonical text): the compiled-grammar cache key."""
        kind = self.kind
        value = getattr(self, kind)
        if kind == "json":
            value = value if isinstance(value, str) else json.dumps(value)
            value = json.dumps(json.loads(value))  # property order is generation order: keep it
        elif kind == "choice":
            value = json.dumps(list(value))
        return kind, str(value)
