"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with the right HTTP status."""

from __future__ import annotations

import re
from collections.abc import Sequence

from fastapi.responses import JSONResponse

from pagedserve.pooling_params import PoolingParams
from pagedserve.sampling_params import SamplingParams


class APIError(Exception):
    """An error the client gets as an OpenAI error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, dict[str, object]]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def overloaded(message: str, retry_after_s: int = 1) -> APIError:
    return APIError(503, message, "service_unavailable", None, "server_overloaded",
                    headers={"Retry-After": str(retry_after_s)})


def unavailable(message: str) -> APIError:
    return APIError(503, message, "service_unavailable", None, "engine_unavailable")


def internal_error(message: str) -> APIError:
    return APIError(500, message, "internal_server_error", None, "internal_error")


_FIELD = re.compile(r"^([a-z_][a-z0-9_]*) ")
_KNOWN_FIELDS = set(SamplingParams.__dataclass_fields__) | {"prompt", "prompt_token_ids", "messages", "beam_width",
                                                             "length_penalty", "early_stopping"}
_KNOWN_FIELDS |= set(PoolingParams.__dataclass_fields__)


def from_value_error(e: ValueError, renames: dict[str, str] | None = None) -> APIError:
    """SamplingParams / PoolingParams / LLMEngine messages begin with the field they are about: make that
    the param."""
    message = str(e)
    m = _FIELD.match(message)
    param = m.group(1) if m and m.group(1) in _KNOWN_FIELDS else None
    if param is not None and renames and param in renames:  # e.g. chat's top_logprobs is SamplingParams.logprobs
        message = renames[param] + message[len(param):]
        param = renames[param]
    return bad_request(message, param)


def param_from_loc(loc: Sequence[str | int]) -> str | None:
    """A pydantic error location (without the leading 'body') → 'messages[0].role'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out or None


def from_validation_errors(errors: Sequence[dict]) -> APIError:
    """FastAPI/pydantic validation errors → one 400 naming the first bad field."""
    if not errors:
        return bad_request("invalid request")
    first = errors[0]
    loc = [p for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return bad_request(f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}",
                           None, "invalid_json")
    param = param_from_loc([p for p in loc if isinstance(p, (str, int))])
    msg = first.get("msg", "invalid value")
    if first.get("type") == "value_error":  # our own validators: the message names the field already
        message = str(first.get("ctx", {}).get("error", msg))
    elif first.get("type") == "missing":
        message = f"{param} is required"
    elif first.get("type") == "extra_forbidden":
        message = f"{param} is not a field of this request (unknown fields are refused, not ignored)"
    elif param:
        message = f"{param}: {msg}"
    else:
        message = msg
    if param is None and first.get("type") in ("model_type", "dict_type", "model_attributes_type"):
        message = "the request body must be a JSON object"
    return bad_request(message, param)
