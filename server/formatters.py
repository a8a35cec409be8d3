"""Response bodies, one formatter per endpoint: a chat completion speaks in messages and deltas,
a text completion in plain text. Both share the usage and timings of a finished job."""

from __future__ import annotations

import time
import uuid
from abc import ABC, abstractmethod
from typing import Any, ClassVar

from server.choices import Choice, TokenEntry, served_by
from server.jobs import Job
from server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionResponse,
    DeltaMessage,
    Refinement,
    Timings,
    TopLogprob,
    Usage,
)

# JSON has no -inf: a probability that underflows float32 is reported as this (vLLM's floor).
_LOGPROB_FLOOR = -9999.0


def _finite(logprob: float) -> float:
    return max(logprob, _LOGPROB_FLOOR)


def chat_logprobs(entries: list[TokenEntry] | None) -> ChatLogprobs | None:
    """OpenAI's `choices[].logprobs` of a chat choice or chunk; None when not asked."""
    if entries is None:
        return None
    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                token=e.text,
                logprob=_finite(e.logprob if e.logprob is not None else 0.0),
                bytes=list(e.text.encode("utf-8")),
                top_logprobs=[
                    TopLogprob(token=t, logprob=_finite(lp), bytes=list(t.encode("utf-8"))) for t, lp in e.top
                ],
            )
            for e in entries
        ]
    )


def completion_logprobs(entries: list[TokenEntry] | None) -> CompletionLogprobs | None:
    """The legacy parallel lists; an echoed prompt's first token has null logprob and alternatives."""
    if entries is None:
        return None
    return CompletionLogprobs(
        tokens=[e.text for e in entries],
        token_logprobs=[None if e.logprob is None else _finite(e.logprob) for e in entries],
        # As OpenAI's legacy API: the k alternatives and always the chosen token (up to k + 1 keys).
        top_logprobs=[
            None if e.logprob is None else {**{t: _finite(lp) for t, lp in e.top}, e.text: _finite(e.logprob)}
            for e in entries
        ],
        text_offset=[e.offset for e in entries],
    )


def usage(job: Job, choices: list[Choice]) -> Usage:
    completion = sum(c.tokens for c in choices)
    return Usage(
        prompt_tokens=job.prompt_tokens, completion_tokens=completion, total_tokens=job.prompt_tokens + completion
    )


def timings(job: Job, choices: list[Choice]) -> Timings:
    end = max((c.finished_at or time.monotonic()) for c in choices)
    first = min((c.first_token_at for c in choices if c.first_token_at is not None), default=None)
    admitted = [c.stream.request.admitted for c in choices if c.stream.request.admitted is not None]
    start = min(admitted) if admitted else job.arrival
    tokens = sum(c.tokens for c in choices)
    forwards = sum(c.forward_passes for c in choices)
    diffusion = any(c.blocks for c in choices)
    return Timings(
        prompt_tokens=job.prompt_tokens,
        generated_tokens=tokens,
        forward_passes=forwards,
        tokens_per_forward=round(tokens / forwards, 4) if forwards else None,
        queue_s=round(start - job.arrival, 6),
        time_to_first_token_s=None if first is None else round(first - job.arrival, 6),
        total_s=round(end - job.arrival, 6),
        tokens_per_s=round(tokens / (end - start), 3) if end > start and tokens else None,
        sampler=served_by(choices),
        denoising_steps=sum(c.denoising_steps for c in choices) if diffusion else None,
        blocks=sum(c.blocks for c in choices) if diffusion else None,
    )


class ResponseFormatter(ABC):
    """The JSON body of a finished job and the SSE chunks of a streamed one, as plain dicts."""

    id_prefix: ClassVar[str]
    response_type: ClassVar[type[ChatCompletionResponse] | type[CompletionResponse]]
    chunk_type: ClassVar[type[ChatCompletionChunk] | type[CompletionChunk]]

    def new_request_id(self) -> str:
        return self.id_prefix + uuid.uuid4().hex

    def response(self, job: Job, choices: list[Choice]) -> dict[str, Any]:
        return self.response_type(
            id=job.request_id,
            created=job.created,
            model=job.model,
            choices=[self._choice(c) for c in choices],
            usage=usage(job, choices),
            system_fingerprint=job.system_fingerprint,
            timings=timings(job, choices),
        ).model_dump()

    @abstractmethod
    def _choice(self, choice: Choice) -> Any:
        """A finished choice in the response body."""

    @abstractmethod
    def _chunk_choice(
        self, index: int, text: str | None, finish_reason: str | None, entries: list[TokenEntry] | None = None
    ) -> Any:
        """One choice of a chunk; `text` None is a chunk that carries no text; `entries` its
        tokens' logprobs (requests with logprobs)."""

    def opening_chunks(self, job: Job, choices: list[Choice]) -> list[dict[str, Any]]:
        """Chunks sent before any text."""
        return []

    def _chunk(self, job: Job, choices: list[Any], **extra: Any) -> dict[str, Any]:
        chunk = self.chunk_type(
            id=job.request_id,
            created=job.created,
            model=job.model,
            choices=choices,
            system_fingerprint=job.system_fingerprint,
            **extra,
        )
        # `usage` is null on each chunk only for a client that asked for it (stream_options).
        return chunk.model_dump(exclude=None if job.include_usage else {"usage"})

    def text_chunk(self, job: Job, index: int, text: str, entries: list[TokenEntry] | None = None) -> dict[str, Any]:
        return self._chunk(job, [self._chunk_choice(index, text, None, entries)])

    def finish_chunk(self, job: Job, index: int, finish_reason: str) -> dict[str, Any]:
        return self._chunk(job, [self._chunk_choice(index, None, finish_reason)])

    def refinement_chunk(self, job: Job, draft: Refinement) -> dict[str, Any]:
        return self._chunk(job, [self._chunk_choice(draft.index, None, None)], refinement=draft)

    def usage_chunk(self, job: Job, choices: list[Choice]) -> dict[str, Any]:
        return self._chunk(job, [], usage=usage(job, choices), timings=timings(job, choices))


class ChatFormatter(ResponseFormatter):
    id_prefix = "chatcmpl-"
    response_type = ChatCompletionResponse
    chunk_type = ChatCompletionChunk

    def _choice(self, choice: Choice) -> ChatChoice:
        message = AssistantMessage(content=choice.text)
        logprobs = chat_logprobs(choice.entries)
        return ChatChoice(index=choice.index, message=message, finish_reason=choice.finish_reason, logprobs=logprobs)

    def _chunk_choice(
        self, index: int, text: str | None, finish_reason: str | None, entries: list[TokenEntry] | None = None
    ) -> ChatChunkChoice:
        delta = DeltaMessage(content=text)
        return ChatChunkChoice(index=index, delta=delta, finish_reason=finish_reason, logprobs=chat_logprobs(entries))

    def opening_chunks(self, job: Job, choices: list[Choice]) -> list[dict[str, Any]]:
        """Each choice's first chunk names the assistant role, with empty content."""
        opening = [
            ChatChunkChoice(index=c.index, delta=DeltaMessage(role="assistant", content=""), finish_reason=None)
            for c in choices
        ]
        return [self._chunk(job, [choice]) for choice in opening]


class CompletionFormatter(ResponseFormatter):
    id_prefix = "cmpl-"
    response_type = CompletionResponse
    chunk_type = CompletionChunk

    def _choice(self, choice: Choice) -> CompletionChoice:
        entries = None if choice.entries is None else (choice.echo_entries or []) + choice.entries
        return CompletionChoice(
            index=choice.index,
            text=choice.text,
            finish_reason=choice.finish_reason,
            logprobs=completion_logprobs(entries),
        )

    def _chunk_choice(
        self, index: int, text: str | None, finish_reason: str | None, entries: list[TokenEntry] | None = None
    ) -> CompletionChoice:
        logprobs = completion_logprobs(entries)
        return CompletionChoice(index=index, text=text or "", finish_reason=finish_reason, logprobs=logprobs)
