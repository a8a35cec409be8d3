"""with_cancellation: a handler whose client goes away is cancelled (freeing its work) and answered 499."""

from __future__ import annotations

import asyncio

import pytest
from fastapi import Request, Response

from server.cancellation import with_cancellation


def _request(disconnect_after_s: float | None) -> Request:
    async def receive() -> dict:
        if disconnect_after_s is None:
            await asyncio.Event().wait()  # the client stays
        await asyncio.sleep(disconnect_after_s)
        return {"type": "http.disconnect"}

    return Request({"type": "http", "method": "POST", "path": "/", "headers": []}, receive)


def test_disconnect_cancels_the_handler_and_answers_499():
    cleaned_up = []

    @with_cancellation
    async def handler(raw_request: Request) -> Response:
        try:
            await asyncio.sleep(30)
            return Response(status_code=200)
        finally:
            cleaned_up.append(True)

    async def main() -> Response:
        response = await asyncio.wait_for(handler(raw_request=_request(0.01)), 5)
        await asyncio.sleep(0.01)  # the cancelled handler unwinds on the loop's next turns
        assert cleaned_up == [True]
        return response

    assert asyncio.run(main()).status_code == 499


def test_a_handler_that_finishes_first_is_answered_normally():
    @with_cancellation
    async def handler(raw_request: Request) -> Response:
        await asyncio.sleep(0.01)
        return Response(status_code=201)

    assert asyncio.run(asyncio.wait_for(handler(raw_request=_request(None)), 5)).status_code == 201


def test_errors_of_the_handler_propagate():
    @with_cancellation
    async def handler(raw_request: Request) -> Response:
        raise ValueError("refused")

    with pytest.raises(ValueError, match="refused"):
        asyncio.run(handler(raw_request=_request(None)))


def _stream_scope(spec_version: str) -> dict:
    return {"type": "http", "method": "POST", "path": "/", "headers": [], "asgi": {"spec_version": spec_version}}


@pytest.mark.parametrize("spec_version", ["2.0", "2.4"])
def test_a_stream_whose_client_left_before_the_first_byte_still_cleans_up(spec_version):
    """The body never starts, so only the response itself can free the engine's sequences."""
    from starlette.requests import ClientDisconnect

    from server.serving import StreamWithCleanup

    started, cleaned = [], []

    async def body():
        started.append(True)
        yield "data: x\n\n"

    async def receive() -> dict:
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        raise OSError("client gone")  # what a server reports for a closed socket

    response = StreamWithCleanup(body(), cleanup=lambda: cleaned.append(True), media_type="text/event-stream")

    async def main() -> None:
        try:
            await response(_stream_scope(spec_version), receive, send)
        except (ClientDisconnect, OSError):
            pass

    asyncio.run(main())
    assert started == [] and cleaned == [True]
