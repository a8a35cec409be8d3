"""Cancel a route handler when its client disconnects, so its engine sequences are freed at once."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import ParamSpec

from fastapi import Request, Response

P = ParamSpec("P")

# nginx's "client closed request": nobody reads it, but the access log tells it from a success.
CLIENT_CLOSED_REQUEST = 499


async def _client_disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def with_cancellation(handler: Callable[P, Awaitable[Response]]) -> Callable[P, Awaitable[Response]]:
    """Run `handler` until it returns or the client goes away; then cancel it (its finally-blocks
    cancel the engine sequences) and answer 499. The handler takes the request as `raw_request`.

    A streamed response is returned at once; from then on Starlette watches the disconnect.
    """

    @functools.wraps(handler)
    async def run(*args: P.args, **kwargs: P.kwargs) -> Response:
        request = kwargs["raw_request"]
        assert isinstance(request, Request)
        work = asyncio.ensure_future(handler(*args, **kwargs))
        watcher = asyncio.ensure_future(_client_disconnected(request))
        try:
            done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not work.done():
                work.cancel()
        if work in done:
            return work.result()
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    return run
