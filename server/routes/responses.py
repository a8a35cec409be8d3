"""POST /v1/responses: OpenAI's Responses API for text, one JSON response object or its semantic
event stream (server/responses_api.py shapes both; docs/openai.md)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from server.cancellation import with_cancellation
from server.choices import Choice, run_job
from server.errors import unsupported_parameter
from server.jobs import Job
from server.responses_api import ResponseBuilder, ResponsesRequest, new_response_id
from server.serving import event_stream, sse, start_job, stream_failure
from server.state import ServerState

router = APIRouter()


async def _events(builder: ResponseBuilder, job: Job, choices: list[Choice], state: ServerState) -> AsyncIterator[str]:
    """The SSE lines of a streamed response; a failure after the first byte is an `error` event."""
    try:
        for event in builder.opening():
            yield sse(event, event=event["type"])
        async for update in run_job(job, choices, state):
            if update.text or update.entries:
                yield sse(builder.delta(update.text, update.entries), event="response.output_text.delta")
        for event in builder.closing(choices):
            yield sse(event, event=event["type"])
    except Exception as exc:
        error = stream_failure(exc, job, state)
        fields = {"code": error.code, "message": error.message, "param": error.param}
        yield sse(builder.event("error", **fields), event="error")


@router.post("/v1/responses")
@with_cancellation
async def create_response(body: ResponsesRequest, raw_request: Request) -> Any:
    for name in body.unsupported_parameters():
        raise unsupported_parameter(name)
    state, job, choices = await start_job(raw_request, body.to_chat(), new_response_id())
    builder = ResponseBuilder(body, job, state.config)
    if job.stream:
        return event_stream(_events(builder, job, choices, state), choices)
    async for _ in run_job(job, choices, state):
        pass
    return JSONResponse(builder.response(choices))
