"""ASGI middleware in front of every route: request-body size limit (413), API key on /v1/* (401) and
the playground page's Content-Security-Policy (docs/playground.md)."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from server.error_responses import error_response
from server.errors import APIError
from server.state import ServerState

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class _BodyTooLarge(Exception):
    pass


# The playground's scripts and styles come only from this server, as files: no inline script or
# style, no eval, nothing from another origin (the page works offline), no framing, no forms
# posting elsewhere. Model output is inserted as text (playground.js); this is the second line.
PLAYGROUND_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_PLAYGROUND_HEADERS = [
    (b"content-security-policy", PLAYGROUND_CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


def _is_playground(path: str) -> bool:
    return path == "/" or path == "/playground" or path.startswith("/playground/")


def _with_playground_headers(send: Send) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *_PLAYGROUND_HEADERS]}
        await send(message)

    return wrapped


class LimitsAndAuth:
    """Pure ASGI rather than BaseHTTPMiddleware so streaming responses and disconnects pass
    through untouched."""

    def __init__(self, app: Any, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if _is_playground(scope["path"]):
            send = _with_playground_headers(send)
        cfg = self.state.config
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if cfg.api_key and scope["path"].startswith("/v1/") and scope.get("method") != "OPTIONS":
            supplied = headers.get("authorization", "")
            token = supplied[7:] if supplied.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), cfg.api_key.encode()):
                exc = APIError(
                    401, "Incorrect or missing API key. Send 'Authorization: Bearer <key>'.", code="invalid_api_key"
                )
                return await error_response(exc, self.state)(scope, receive, send)
        limit = cfg.max_request_bytes
        too_large = APIError(413, f"Request body exceeds {limit} bytes.", code="request_too_large")
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await error_response(too_large, self.state)(scope, receive, send)
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
            await error_response(too_large, self.state)(scope, receive, send)
