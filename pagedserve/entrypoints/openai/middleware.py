"""Raw ASGI guard in front of the app: API key (401) and request body size (413).

It runs before FastAPI reads anything, so an unauthenticated or oversized request costs at most
`max_body_bytes` of memory and never reaches a handler.
"""

from __future__ import annotations

import hmac
import json
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pagedserve.entrypoints.openai.errors import error_body

# Routes that need the key when one is set (health, version and metrics stay open for probes/scrapers).
# /kv_events too: its block hashes would tell anyone who can hash a guessed prompt whether it was sent.
PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize", "/dashboard", "/kv_events")
# The live page's static files hold no data: open, so the page loads before its script adds the key.
OPEN_PREFIXES = ("/dashboard/static/",)
# A browser's EventSource cannot send headers: the live page may carry the key as ?api_key=KEY.
QUERY_KEY_PREFIXES = ("/dashboard",)


class RequestGuard:
    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if (self.api_key and path.startswith(PROTECTED_PREFIXES) and not path.startswith(OPEN_PREFIXES)
                and not self._authorized(scope)):
            how = " (or ?api_key=<key> on /dashboard)" if path.startswith(QUERY_KEY_PREFIXES) else ""
            await _send_error(send, 401, f"invalid or missing API key: send 'Authorization: Bearer <key>'{how}",
                              "authentication_error", "invalid_api_key")
            return
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._too_large(send)
            return
        # Read the body here (bounded), then replay it to the app; later receives go to the client.
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await self._too_large(send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body: bytes | None = b"".join(chunks)

        async def replay() -> Message:
            nonlocal body
            if body is not None:
                message = {"type": "http.request", "body": body, "more_body": False}
                body = None
                return message
            return await receive()

        await self.app(scope, replay, send)

    def _authorized(self, scope: Scope) -> bool:
        value = _header(scope, b"authorization") or ""
        scheme, _, token = value.partition(" ")
        assert self.api_key is not None
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            return True
        if scope["path"].startswith(QUERY_KEY_PREFIXES):
            given = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("api_key", [""])[-1]
            return hmac.compare_digest(given.encode(), self.api_key.encode())
        return False

    async def _too_large(self, send: Send) -> None:
        await _send_error(send, 413, f"the request body is larger than {self.max_body_bytes} bytes",
                          "invalid_request_error", "request_too_large")


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


async def _send_error(send: Send, status: int, message: str, type: str, code: str) -> None:
    body = json.dumps(error_body(message, type, None, code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
