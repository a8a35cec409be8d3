"""Running a job's choices on the engine: each choice is one engine sequence with its own
detokenizer and stop strings; its events become text updates, its counts feed the metrics."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from sampler.types import StepEvent, TokenLogprob
from server.detok import IncrementalDetokenizer
from server.engine import EngineRequest, RequestStream
from server.errors import APIError
from server.jobs import Job
from server.metrics import Metrics
from server.protocol import Refinement
from server.state import ServerState

log = logging.getLogger("dgserve.serving")


@dataclass
class TokenEntry:
    """One token as the logprobs fields show it: its text in the output (the detokenizer's
    attribution, so the texts of a choice's tokens join into its text; a token that ends inside
    a UTF-8 character has "" and the one completing it the whole character), its logprob (None:
    an echoed prompt's first token) and the alternatives as (standalone text, logprob)."""

    text: str
    logprob: float | None
    top: list[tuple[str, float]]
    offset: int  # where `text` starts in the choice's text (echoed prompt included)


class TokenTexts:
    """Per-token text and alternatives of one token stream (the project's detokenizer, fed one
    token at a time, decides each token's share of the text)."""

    def __init__(self, tokenizer: Any, offset: int = 0) -> None:
        self._tokenizer = tokenizer
        self._detok = IncrementalDetokenizer(tokenizer)
        self.offset = offset  # the next token's text starts here in the choice's text

    def entry(self, token_id: int, scored: TokenLogprob | None) -> TokenEntry:
        text = self._detok.add([token_id])
        start, self.offset = self.offset, self.offset + len(text)
        if scored is None:
            return TokenEntry(text, None, [], start)
        top = [(self._tokenizer.decode([t]), lp) for t, lp in scored.top]
        return TokenEntry(text, scored.logprob, top, start)


@dataclass
class Choice:
    """One generated choice: its engine stream, detokenizer and running counts."""

    index: int
    stream: RequestStream
    detok: IncrementalDetokenizer
    # With logprobs: each generated token's entry (`tokens` of them count, after a stop string).
    texts: TokenTexts | None = None
    entries: list[TokenEntry] | None = None
    echo_entries: list[TokenEntry] | None = None  # echo with logprobs: the prompt's, first
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
    draft: Refinement | None = None
    entries: list[TokenEntry] | None = None  # the tokens' logprob entries (requests with logprobs)


def start_choices(job: Job, state: ServerState) -> list[Choice]:
    """Submit every choice of `job` at once (all or none are queued)."""
    engine = state.ready_engine()
    tokenizer = state.ready_model().tokenizer
    loop = asyncio.get_running_loop()
    requests = [
        EngineRequest(
            job.prompts[i // job.n],
            params,
            job.sampler,
            loop,
            sampler_when_busy=job.sampler_when_busy,
            group=job.request_id,  # sibling choices do not count as load for the busy switch
        )
        for i, params in enumerate(job.params)
    ]
    engine.submit_many(requests)
    return [
        Choice(
            i,
            RequestStream(engine, r),
            IncrementalDetokenizer(tokenizer, job.stop),
            texts=TokenTexts(tokenizer) if job.logprobs else None,
            entries=[] if job.logprobs else None,
        )
        for i, r in enumerate(requests)
    ]


def served_by(choices: list[Choice]) -> str:
    """The sampler(s) that ran the choices, as admitted (sampler_when_busy may have switched)."""
    return ",".join(dict.fromkeys(c.stream.request.sampler for c in choices))


async def _next_event(choice: Choice, job: Job, limit: float | None) -> StepEvent:
    """The choice's next event, or a 504 once the request has run `limit` seconds since arrival."""
    if limit is None:
        return await choice.stream.next_event()
    try:
        remaining = job.arrival + limit - time.monotonic()
        return await asyncio.wait_for(choice.stream.next_event(), max(remaining, 0.0))
    except TimeoutError:
        raise APIError(
            504, f"The request exceeded the server's time limit of {limit:g} s.", type="server_error", code="timeout"
        ) from None


def _count(choice: Choice, event: StepEvent, metrics: Metrics) -> None:
    choice.forward_passes += event.forward_passes
    if event.denoising_steps is not None:
        choice.denoising_steps += event.denoising_steps
        choice.blocks += 1
        metrics.label(metrics.denoising_steps).observe(event.denoising_steps)


def _observe_delivery(choice: Choice, job: Job, metrics: Metrics, now: float, last: float, tokens: int) -> None:
    """Time to first token, or the gap since the last delivery spread over its tokens."""
    if choice.first_token_at is None:
        choice.first_token_at = now
        metrics.label(metrics.ttft).observe(now - job.arrival)
        return
    gap = (now - last) / tokens
    for _ in range(tokens):
        metrics.label(metrics.itl).observe(gap)


def _echo(choice: Choice, job: Job, event: StepEvent, tokenizer: Any) -> Update:
    """The echoed prompt, as the first update: its text and, when scored, its entries."""
    prompt = job.prompts[choice.index // job.n]
    texts = TokenTexts(tokenizer)
    scores = event.prompt_logprobs or [None] * len(prompt)
    entries = [texts.entry(t, lp) for t, lp in zip(prompt, scores, strict=True)]
    if job.logprobs and choice.texts is not None:
        choice.echo_entries = entries
        choice.texts.offset = texts.offset  # generated tokens follow the echoed text
    return Update(choice.index, text="".join(e.text for e in entries), entries=entries if job.logprobs else None)


def _entries(choice: Choice, event: StepEvent) -> list[TokenEntry] | None:
    """Entries of the event's tokens that count (a stop string ends the choice mid-event)."""
    if choice.texts is None or choice.entries is None:
        return None
    scores = event.logprobs or []
    new = [choice.texts.entry(t, lp) for t, lp in zip(event.token_ids, scores, strict=True)]
    new = new[: max(choice.tokens - len(choice.entries), 0)]
    choice.entries += new
    return new


def _draft(choice: Choice, event: StepEvent, tokenizer: Any) -> Refinement | None:
    if event.draft_ids is None:
        return None
    text = tokenizer.decode(event.draft_ids, skip_special_tokens=True)
    return Refinement(index=choice.index, step=event.refinement_step, draft_ids=event.draft_ids, draft_text=text)


async def _run_choice(choice: Choice, job: Job, state: ServerState) -> AsyncIterator[Update]:
    # Not ready_model(): a request already running finishes while the server drains.
    assert state.loaded is not None
    metrics, tokenizer = state.metrics, state.loaded.tokenizer
    last_delivery = job.arrival
    first = True
    while choice.finish_reason is None:
        event = await _next_event(choice, job, state.config.request_timeout_s)
        now = time.monotonic()
        _count(choice, event, metrics)
        update = _echo(choice, job, event, tokenizer) if first and job.echo else Update(choice.index)
        first = False
        if event.token_ids:
            _observe_delivery(choice, job, metrics, now, last_delivery, len(event.token_ids))
            last_delivery = now
            update.text += choice.detok.add(event.token_ids)
            choice.tokens = choice.detok.num_tokens
            new = _entries(choice, event)
            if new is not None:
                update.entries = (update.entries or []) + new
        if choice.detok.stopped:
            choice.stream.cancel()  # the stop string ended it; free the sequence now
            choice.finish_reason = "stop"
        elif event.finish_reason is not None:
            update.text += choice.detok.flush()
            choice.finish_reason = event.finish_reason
        if job.want_drafts:
            update.draft = _draft(choice, event, tokenizer)
        update.finish_reason = choice.finish_reason
        choice.text += update.text
        if update.text or update.finish_reason or update.draft or update.entries:
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
        _record(job, choices, state.metrics)


def _record(job: Job, choices: list[Choice], metrics: Metrics) -> None:
    if any(c.finish_reason is None for c in choices):
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
    log.info(
        "request %s sampler=%s prompt_tokens=%d completion_tokens=%d forwards=%d latency=%.3fs",
        job.request_id, served_by(choices), job.prompt_tokens, tokens, forwards, elapsed,
    )  # fmt: skip
