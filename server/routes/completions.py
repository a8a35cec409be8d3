"""POST /v1/chat/completions and /v1/completions: one handler per endpoint, one formatter each."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from server.cancellation import with_cancellation
from server.formatters import ChatFormatter, CompletionFormatter
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.serving import serve

router = APIRouter()

# The handlers return a Response (JSON or SSE); `Any` keeps FastAPI from declaring a response model.


@router.post("/v1/chat/completions")
@with_cancellation
async def chat_completions(body: ChatCompletionRequest, raw_request: Request) -> Any:
    return await serve(raw_request, body, ChatFormatter())


@router.post("/v1/completions")
@with_cancellation
async def completions(body: CompletionRequest, raw_request: Request) -> Any:
    return await serve(raw_request, body, CompletionFormatter())
