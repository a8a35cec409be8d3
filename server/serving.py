"""Serving functions: protocol request → engine submissions → OpenAI response objects.

Routes stay thin (app.py); everything between a validated request and its response body or
SSE chunks lives here. One request may run several choices (n > 1, several prompts); each
choice is one engine sequence with its own detokenizer and stop-string state.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from sampler.runtime.model import LoadedModel
from sampler.registry import SAMPLERS_FOR_KIND
from sampler.types import SamplingParams
from server.chat import chat_prompt_ids, chat_stop_token_ids, text_prompt_ids
from server.config import ServerConfig
from server.detok import IncrementalDetokenizer
from server.engine import Engine, EngineRequest, RequestStream
from server.errors import APIError, bad_request, model_not_found, overloaded, unsupported_parameter
from server.metrics import Metrics
from server.protocol import ChatCompletionRequest, CompletionRequest

log = logging.getLogger("dgserve.serving")
_SEED_MASK = (1 << 64) - 1


@dataclass
class ServerState:
    config: ServerConfig
    metrics: Metrics
    loaded: LoadedModel | None = None
    engine: Engine | None = None
    draining: bool = False
    load_error: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def max_context(self) -> int:
        assert self.loaded is not None
        return self.config.max_model_len or self.loaded.max_context

    def ready_engine(self) -> Engine:
        if self.draining:
            raise overloaded("The server is shutting down.", retry_after_s=5)
        if self.engine is None or self.loaded is None:
            if self.load_error:
                raise APIError(503, f"The model failed to load: {self.load_error}", type="server_error",
                               code="model_load_failed")
            raise overloaded("The model is still loading.", retry_after_s=5)
        return self.engine


@dataclass
class Choice:
    """One generated choice: its engine stream, detokenizer and running counts."""

    index: int
    stream: RequestStream
    detok: IncrementalDetokenizer
    text: str = ""
    finish_reason: str | None = None
    tokens: int = 0
    forward_passes: int = 0
    denoising_steps: int = 0
    blocks: int = 0
    first_token_at: float | None = None
    finished_at: float | None = None


@dataclass
class Update:
    """What a choice produced at one step: new text, an end, or a refinement draft."""

    index: int
    text: str = ""
    finish_reason: str | None = None
    draft: dict[str, Any] | None = None


@dataclass
class Job:
    """A validated request, ready to submit: prompts × n choices."""

    kind: str  # "chat" | "completion"
    request_id: str
    model: str
    prompts: list[list[int]]
    params: list[SamplingParams]  # one per choice, in choice order
    sampler: str
    sampler_when_busy: str | None  # the engine may switch to it at admission (config key)
    stop: list[str]
    stream: bool
    include_usage: bool
    want_drafts: bool
    n: int
    arrival: float = field(default_factory=time.monotonic)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


# ---- request → job ------------------------------------------------------------------
def _check_common(req: ChatCompletionRequest | CompletionRequest, state: ServerState) -> None:
    cfg = state.config
    if req.model not in (cfg.model_name, cfg.model):
        raise model_not_found(req.model)
    for name in req.unsupported_parameters():
        raise unsupported_parameter(name)
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed when stream is true", param="stream_options")
    if (req.n or 1) > cfg.max_n:
        raise bad_request(f"n must be at most {cfg.max_n}", param="n")
    if req.t_min is not None and req.t_max is not None and req.t_min > req.t_max:
        raise bad_request("t_min must not exceed t_max", param="t_min")
    if req.stream_refinements and not req.stream:
        raise bad_request("stream_refinements needs stream: true", param="stream_refinements")


def _sampler_for(req: ChatCompletionRequest | CompletionRequest, state: ServerState) -> str:
    assert state.loaded is not None
    name = req.sampler or state.config.sampler
    allowed = SAMPLERS_FOR_KIND[state.loaded.kind]
    if name not in allowed:
        if req.sampler is None:  # the config's default cannot serve this model: use its own
            return allowed[0]
        raise bad_request(f"sampler '{name}' cannot serve this model; use one of {list(allowed)}",
                          param="sampler")
    return name


def _busy_sampler_for(req: ChatCompletionRequest | CompletionRequest, state: ServerState) -> str | None:
    """The config's `sampler_when_busy`, for requests that leave the choice to the server.

    A client watching refinements keeps the refining sampler (AR has no drafts to show).
    """
    assert state.loaded is not None
    name = state.config.sampler_when_busy
    if req.sampler is not None or req.stream_refinements or name not in SAMPLERS_FOR_KIND[state.loaded.kind]:
        return None
    return name


def _params(req: ChatCompletionRequest | CompletionRequest, state: ServerState, prompt_len: int,
            max_tokens: int | None, stop_ids: list[int], choice: int) -> SamplingParams:
    cfg = state.config
    room = state.max_context - prompt_len
    if room < 1:
        raise bad_request(f"This model's maximum context length is {state.max_context} tokens; "
                          f"the prompt has {prompt_len}.", param="messages" if isinstance(
                              req, ChatCompletionRequest) else "prompt", code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = min(cfg.default_max_tokens, room)
    elif max_tokens > room:
        raise bad_request(f"This model's maximum context length is {state.max_context} tokens. "
                          f"You requested {prompt_len + max_tokens} tokens ({prompt_len} in the prompt, "
                          f"{max_tokens} for the completion).", param="max_tokens",
                          code="context_length_exceeded")
    top_k = cfg.top_k if req.top_k is None else max(req.top_k, 0)
    seed = None if req.seed is None else (req.seed + choice) & _SEED_MASK
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=cfg.temperature if req.temperature is None else req.temperature,
        top_p=cfg.top_p if req.top_p is None else req.top_p,
        top_k=top_k,
        seed=seed,
        stop_token_ids=frozenset(stop_ids),
        steps=req.steps,
        stream_refinements=req.stream_refinements,
        entropy_bound=req.entropy_bound,
        t_min=req.t_min,
        t_max=req.t_max,
        stability_threshold=req.stability_threshold,
        confidence_threshold=req.confidence_threshold,
    )


def _check_token_ids(prompts: list[list[int]], vocab_size: int) -> None:
    for prompt in prompts:
        for token in prompt:
            if not 0 <= token < vocab_size:
                raise bad_request(f"token id {token} is outside the vocabulary (size {vocab_size})",
                                  param="prompt")


def build_job(req: ChatCompletionRequest | CompletionRequest, state: ServerState) -> Job:
    _check_common(req, state)
    state.ready_engine()
    loaded = state.loaded
    assert loaded is not None
    tokenizer = loaded.tokenizer
    stop_ids = list(loaded.eos_token_ids)
    if isinstance(req, ChatCompletionRequest):
        kind, prefix = "chat", "chatcmpl-"
        if req.messages[-1].role == "assistant" and len(req.messages) == 1:
            raise bad_request("messages must contain a user or system message", param="messages")
        prompts = [chat_prompt_ids(tokenizer, req.messages)]
        stop_ids += [t for t in chat_stop_token_ids(tokenizer) if t not in stop_ids]
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    else:
        kind, prefix = "completion", "cmpl-"
        p = req.prompt
        if isinstance(p, str):
            prompts = [text_prompt_ids(tokenizer, p)]
        elif all(isinstance(x, str) for x in p):
            prompts = [text_prompt_ids(tokenizer, x) for x in p]  # type: ignore[arg-type]
        elif all(isinstance(x, int) for x in p):
            prompts = [list(p)]  # type: ignore[arg-type]
        else:
            prompts = [list(x) for x in p]  # type: ignore[union-attr]
        _check_token_ids(prompts, int(loaded.model.config.get_text_config().vocab_size))
        if any(not x for x in prompts):
            raise bad_request("prompt must not be empty", param="prompt")
        max_tokens = req.max_tokens
    n = req.n or 1
    params = [_params(req, state, len(prompt), max_tokens, stop_ids, j)
              for prompt in prompts for j in range(n)]
    return Job(kind=kind, request_id=prefix + uuid.uuid4().hex, model=req.model, prompts=prompts,
               params=params, sampler=_sampler_for(req, state), sampler_when_busy=_busy_sampler_for(req, state),
               stop=req.stop_list(),
               stream=bool(req.stream),
               include_usage=bool(req.stream_options and req.stream_options.include_usage),
               want_drafts=req.stream_refinements, n=n)


# ---- running choices ---------------------------------------------------------------------
def start_choices(job: Job, state: ServerState) -> list[Choice]:
    engine = state.ready_engine()
    loop = asyncio.get_running_loop()
    requests = [EngineRequest(job.prompts[i // job.n], params, job.sampler, loop,
                              sampler_when_busy=job.sampler_when_busy)
                for i, params in enumerate(job.params)]
    engine.submit_many(requests)
    assert state.loaded is not None
    return [Choice(i, RequestStream(engine, r), IncrementalDetokenizer(state.loaded.tokenizer, job.stop))
            for i, r in enumerate(requests)]


async def _run_choice(choice: Choice, job: Job, state: ServerState) -> AsyncIterator[Update]:
    metrics, tokenizer = state.metrics, state.loaded.tokenizer  # type: ignore[union-attr]
    last_delivery = job.arrival
    limit = state.config.request_timeout_s
    while choice.finish_reason is None:
        if limit is None:
            event = await choice.stream.next_event()
        else:
            try:
                remaining = job.arrival + limit - time.monotonic()
                event = await asyncio.wait_for(choice.stream.next_event(), max(remaining, 0.0))
            except TimeoutError:
                raise APIError(504, f"The request exceeded the server's time limit of {limit:g} s.",
                               type="server_error", code="timeout") from None
        now = time.monotonic()
        choice.forward_passes += event.forward_passes
        if event.denoising_steps is not None:
            choice.denoising_steps += event.denoising_steps
            choice.blocks += 1
            metrics.label(metrics.denoising_steps).observe(event.denoising_steps)
        update = Update(choice.index)
        if event.token_ids:
            if choice.first_token_at is None:
                choice.first_token_at = now
                metrics.label(metrics.ttft).observe(now - job.arrival)
            else:
                gap = (now - last_delivery) / len(event.token_ids)
                for _ in event.token_ids:
                    metrics.label(metrics.itl).observe(gap)
            last_delivery = now
            update.text = choice.detok.add(event.token_ids)
            choice.tokens = choice.detok.num_tokens
        if choice.detok.stopped:
            choice.stream.cancel()  # the stop string ended it; free the sequence now
            choice.finish_reason = "stop"
        elif event.finish_reason is not None:
            update.text += choice.detok.flush()
            choice.finish_reason = event.finish_reason
        if job.want_drafts and event.draft_ids is not None:
            update.draft = {"step": event.refinement_step, "draft_ids": event.draft_ids,
                            "draft_text": tokenizer.decode(event.draft_ids, skip_special_tokens=True)}
        update.finish_reason = choice.finish_reason
        choice.text += update.text
        if update.text or update.finish_reason or update.draft:
            yield update
    choice.finished_at = time.monotonic()


async def run_job(job: Job, choices: list[Choice], state: ServerState) -> AsyncIterator[Update]:
    """Updates of all choices, interleaved as they arrive. Cancels leftovers on exit."""
    queue: asyncio.Queue[Update | BaseException | None] = asyncio.Queue()

    async def pump(choice: Choice) -> None:
        try:
            async for update in _run_choice(choice, job, state):
                await queue.put(update)
            await queue.put(None)
        except BaseException as exc:  # forwarded to the consumer, which re-raises it
            await queue.put(exc)

    tasks = [asyncio.create_task(pump(c)) for c in choices]
    remaining = len(tasks)
    try:
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        for choice in choices:
            choice.stream.cancel()
        finished = [c for c in choices if c.finish_reason is not None]
        _record(job, choices, state, complete=len(finished) == len(choices))


def _record(job: Job, choices: list[Choice], state: ServerState, complete: bool) -> None:
    metrics = state.metrics
    if not complete:
        metrics.request_success.labels(metrics.model_name, "abort").inc()
        log.info("request %s aborted after %d tokens", job.request_id, sum(c.tokens for c in choices))
        return
    elapsed = time.monotonic() - job.arrival
    tokens = sum(c.tokens for c in choices)
    forwards = sum(c.forward_passes for c in choices)
    metrics.label(metrics.prompt_tokens).inc(job.prompt_tokens)
    metrics.label(metrics.generation_tokens).inc(tokens)
    metrics.label(metrics.forward_passes).inc(forwards)
    metrics.label(metrics.e2e).observe(elapsed)
    for c in choices:
        metrics.request_success.labels(metrics.model_name, c.finish_reason).inc()
        if c.forward_passes:
            metrics.label(metrics.tokens_per_forward).observe(c.tokens / c.forward_passes)
    log.info("request %s sampler=%s prompt_tokens=%d completion_tokens=%d forwards=%d latency=%.3fs",
             job.request_id, served_by(choices), job.prompt_tokens, tokens, forwards, elapsed)


# ---- response bodies -----------------------------------------------------------------
def usage(job: Job, choices: list[Choice]) -> dict[str, int]:
    completion = sum(c.tokens for c in choices)
    return {"prompt_tokens": job.prompt_tokens, "completion_tokens": completion,
            "total_tokens": job.prompt_tokens + completion}


def served_by(choices: list[Choice]) -> str:
    """The sampler(s) that ran the choices, as admitted (sampler_when_busy may have switched)."""
    return ",".join(dict.fromkeys(c.stream.request.sampler for c in choices))


def timings(job: Job, choices: list[Choice]) -> dict[str, Any]:
    end = max((c.finished_at or time.monotonic()) for c in choices)
    first = min((c.first_token_at for c in choices if c.first_token_at is not None), default=None)
    admitted = [c.stream.request.admitted for c in choices if c.stream.request.admitted is not None]
    start = min(admitted) if admitted else job.arrival
    tokens = sum(c.tokens for c in choices)
    forwards = sum(c.forward_passes for c in choices)
    out: dict[str, Any] = {
        "prompt_tokens": job.prompt_tokens,
        "generated_tokens": tokens,
        "forward_passes": forwards,
        "tokens_per_forward": round(tokens / forwards, 4) if forwards else None,
        "queue_s": round(start - job.arrival, 6),
        "time_to_first_token_s": None if first is None else round(first - job.arrival, 6),
        "total_s": round(end - job.arrival, 6),
        "tokens_per_s": round(tokens / (end - start), 3) if end > start and tokens else None,
        "sampler": served_by(choices),
    }
    if any(c.blocks for c in choices):
        out["denoising_steps"] = sum(c.denoising_steps for c in choices)
        out["blocks"] = sum(c.blocks for c in choices)
    return out


def final_body(job: Job, choices: list[Choice]) -> dict[str, Any]:
    if job.kind == "chat":
        items = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                  "finish_reason": c.finish_reason, "logprobs": None} for c in choices]
        obj = "chat.completion"
    else:
        items = [{"index": c.index, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}
                 for c in choices]
        obj = "text_completion"
    return {"id": job.request_id, "object": obj, "created": job.created, "model": job.model,
            "choices": items, "usage": usage(job, choices), "system_fingerprint": None,
            "timings": timings(job, choices)}


def sse(data: dict[str, Any] | str, event: str | None = None) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"


def _chunk(job: Job, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    obj = "chat.completion.chunk" if job.kind == "chat" else "text_completion"
    body = {"id": job.request_id, "object": obj, "created": job.created, "model": job.model,
            "choices": choices, "system_fingerprint": None}
    if job.include_usage:
        body["usage"] = None
    body.update(extra)
    return body


def _choice_delta(job: Job, index: int, text: str | None, finish_reason: str | None,
                  role: bool = False) -> dict[str, Any]:
    if job.kind == "chat":
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        return {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
    return {"index": index, "text": text or "", "finish_reason": finish_reason, "logprobs": None}


async def stream_job(job: Job, choices: list[Choice], state: ServerState) -> AsyncIterator[str]:
    """SSE lines for a streamed request. Errors after the first byte become an error event."""
    try:
        if job.kind == "chat":
            for c in choices:
                yield sse(_chunk(job, [_choice_delta(job, c.index, "", None, role=True)]))
        async for update in run_job(job, choices, state):
            if update.draft is not None:
                yield sse(_chunk(job, [_choice_delta(job, update.index, None if job.kind == "chat" else "",
                                                     None)],
                                 refinement={"index": update.index, **update.draft}), event="refinement")
            if update.text:
                yield sse(_chunk(job, [_choice_delta(job, update.index, update.text, None)]))
            if update.finish_reason is not None:
                yield sse(_chunk(job, [_choice_delta(job, update.index, None if job.kind == "chat" else "",
                                                     update.finish_reason)]))
        if job.include_usage:
            yield sse(_chunk(job, [], usage=usage(job, choices), timings=timings(job, choices)))
    except APIError as exc:
        state.metrics.request_errors.labels(state.metrics.model_name, exc.code or str(exc.status)).inc()
        yield sse(exc.body(), event="error")
    except Exception as exc:  # never leave a client hanging on a half-open stream
        log.exception("stream %s failed", job.request_id)
        state.metrics.request_errors.labels(state.metrics.model_name, "internal_error").inc()
        yield sse(APIError(500, f"generation failed: {exc}", type="server_error").body(), event="error")
    yield sse("[DONE]")


async def complete_job(job: Job, choices: list[Choice], state: ServerState) -> dict[str, Any]:
    async for _ in run_job(job, choices, state):
        pass
    return final_body(job, choices)
