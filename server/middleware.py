"""ASGI middleware in front of every route: request-body size limit (413) and API key on /v1/* (401)."""

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


class LimitsAndAuth:
    """Pure ASGI rather than BaseHTTPMiddleware so streaming responses and disconnects pass
    through untouched."""

    def __init__(self, app: Any, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
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
