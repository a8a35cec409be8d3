"""Serving one request: build its job off the event loop, run its choices on the engine, and answer
with an SSE stream or one JSON body shaped by the endpoint's formatter."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from server.choices import Choice, run_job, start_choices
from server.errors import APIError
from server.formatters import ResponseFormatter
from server.jobs import Job, build_job
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.state import ServerState

log = logging.getLogger("dgserve.serving")


def sse(data: dict[str, Any] | str, event: str | None = None) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"


async def stream_job(
    job: Job, choices: list[Choice], state: ServerState, formatter: ResponseFormatter
) -> AsyncIterator[str]:
    """SSE lines for a streamed request. Errors after the first byte become an error event."""
    try:
        for chunk in formatter.opening_chunks(job, choices):
            yield sse(chunk)
        async for update in run_job(job, choices, state):
            if update.draft is not None:
                yield sse(formatter.refinement_chunk(job, update.draft), event="refinement")
            if update.text or update.entries:
                yield sse(formatter.text_chunk(job, update.index, update.text, update.entries))
            if update.finish_reason is not None:
                yield sse(formatter.finish_chunk(job, update.index, update.finish_reason))
        if job.include_usage:
            yield sse(formatter.usage_chunk(job, choices))
    except Exception as exc:  # never leave a client hanging on a half-open stream
        yield sse(stream_failure(exc, job, state).body(), event="error")
    yield sse("[DONE]")


def stream_failure(exc: Exception, job: Job, state: ServerState) -> APIError:
    """The error a stream reports after its first byte (an APIError, or a 500), counted in metrics."""
    if not isinstance(exc, APIError):
        log.error("stream %s failed", job.request_id, exc_info=exc)
        exc = APIError(500, f"generation failed: {exc}", type="server_error", code="internal_error")
    state.metrics.request_errors.labels(state.metrics.model_name, exc.code or str(exc.status)).inc()
    return exc


async def complete_job(
    job: Job, choices: list[Choice], state: ServerState, formatter: ResponseFormatter
) -> dict[str, Any]:
    async for _ in run_job(job, choices, state):
        pass
    return formatter.response(job, choices)


async def start_job(
    raw_request: Request, body: ChatCompletionRequest | CompletionRequest, request_id: str
) -> tuple[ServerState, Job, list[Choice]]:
    """Build the request's job and submit its choices to the engine."""
    state: ServerState = raw_request.app.state.dg
    # Templating and tokenizing a body of up to max_request_bytes must not stall other streams.
    loop = asyncio.get_running_loop()
    job = await loop.run_in_executor(state.prompt_executor, build_job, body, state, request_id)
    return state, job, start_choices(job, state)


def event_stream(lines: AsyncIterator[str], choices: list[Choice]) -> StreamWithCleanup:
    """An SSE response of `lines` that frees the choices' engine sequences however it ends."""
    return StreamWithCleanup(
        lines,
        cleanup=lambda: cancel_unfinished(choices),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def serve(
    raw_request: Request, body: ChatCompletionRequest | CompletionRequest, formatter: ResponseFormatter
) -> Response:
    state, job, choices = await start_job(raw_request, body, formatter.new_request_id())
    if job.stream:
        return event_stream(stream_job(job, choices, state, formatter), choices)
    return JSONResponse(await complete_job(job, choices, state, formatter))


class StreamWithCleanup(StreamingResponse):
    """A streaming response whose `cleanup` runs however the response ends.

    A client gone before the first byte means the body iterator never started, so its own
    `finally` (run_job's, which cancels the engine sequences) never runs; Starlette's
    `background` does not run either when the disconnect surfaces as ClientDisconnect.
    """

    def __init__(self, content: AsyncIterator[str], *, cleanup: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._cleanup = cleanup

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._cleanup()


def cancel_unfinished(choices: list[Choice]) -> None:
    """Free the engine sequences of choices still running (a no-op for finished ones)."""
    for choice in choices:
        choice.stream.cancel()
