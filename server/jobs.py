"""A validated request turned into a Job: prompt token ids and sampling parameters per choice.

Runs off the event loop (templating and tokenizing a body of up to max_request_bytes); every
refusal is an APIError with OpenAI's fields.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from sampler.constrained import Grammar, json_grammar
from sampler.registry import SAMPLERS_FOR_KIND
from sampler.runtime.model import LoadedModel
from sampler.types import SamplingParams
from server import __version__
from server.chat import chat_prompt_ids, chat_stop_token_ids, text_prompt_ids
from server.errors import bad_request, model_not_found, unsupported_parameter
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.state import ServerState

Request = ChatCompletionRequest | CompletionRequest


@dataclass
class Job:
    """A validated request, ready to submit: prompts × n choices."""

    request_id: str
    model: str
    prompts: list[list[int]]
    params: list[SamplingParams]  # one per choice, in choice order: choice i runs prompts[i // n]
    sampler: str
    sampler_when_busy: str | None  # the engine may switch to it at admission (config key)
    stop: list[str]
    stream: bool
    include_usage: bool
    want_drafts: bool
    n: int
    system_fingerprint: str  # the backend that shaped the output: version, sampler, dtype
    logprobs: bool = False  # each generated token's logprob is reported (params say how many alternatives)
    echo: bool = False  # completions: the prompt's text (and, with logprobs, its scores) comes first
    arrival: float = field(default_factory=time.monotonic)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


def _check_common(req: Request, state: ServerState) -> None:
    cfg = state.config
    if req.model not in (cfg.model_name, cfg.model):
        raise model_not_found(req.model, cfg.model_name)
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


def _check_logprobs(req: Request, loaded: LoadedModel) -> None:
    """What the logprob and echo fields ask must be servable (docs/openai.md, "Logprobs")."""
    if isinstance(req, ChatCompletionRequest):
        if req.top_logprobs and not req.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", param="top_logprobs")
        return
    if req.max_tokens == 0 and not req.echo:
        raise bad_request("max_tokens 0 generates nothing; it is allowed only with echo: true", param="max_tokens")
    if _scores_prompt(req) and loaded.kind != "causal":
        raise bad_request(
            "echo with logprobs or max_tokens 0 scores the prompt, which needs a causal model; "
            "a block-diffusion model has no left-to-right prompt distribution",
            param="echo",
        )


def _grammar(req: Request, loaded: LoadedModel) -> Grammar | None:
    """The compiled `response_format` grammar, or None (plain text). Both causal samplers mask
    their draws to it (`ar`, `parallel`; docs/openai.md, "Structured output"): a block-diffusion
    model cannot serve it."""
    wanted, schema = req.json_mode()
    if not wanted:
        return None
    if loaded.kind != "causal":
        raise bad_request(
            f"{req.format_param} JSON needs left-to-right decoding to mask each token to the grammar; "
            "a block-diffusion model commits tokens out of order and cannot serve it",
            param=req.format_param,
        )
    try:
        return json_grammar(loaded.tokenizer, schema)
    except ValueError as exc:
        raise bad_request(f"Invalid schema in {req.format_param}: {exc}", param=req.format_param) from exc


def _scores_prompt(req: Request) -> bool:
    """Echo scoring (or generating nothing) runs on `ar`: its prefill forward scores the prompt."""
    return isinstance(req, CompletionRequest) and bool(req.echo) and (req.logprobs is not None or req.max_tokens == 0)


def _sampler_for(req: Request, loaded: LoadedModel, configured: str) -> str:
    if _scores_prompt(req):
        return "ar"  # seeded tokens are the ones parallel would commit (docs/parallel.md)
    name = req.sampler or configured
    allowed = SAMPLERS_FOR_KIND[loaded.kind]
    if name not in allowed:
        if req.sampler is None:  # the config's default cannot serve this model: use its own
            return allowed[0]
        raise bad_request(f"sampler '{name}' cannot serve this model; use one of {list(allowed)}", param="sampler")
    return name


def _busy_sampler_for(req: Request, loaded: LoadedModel, configured: str | None) -> str | None:
    """The config's `sampler_when_busy`, for requests that leave the choice to the server.

    A client watching refinements keeps the refining sampler (AR has no drafts to show). JSON
    requests may switch at admission (every causal sampler masks to the grammar); once running,
    `parallel` keeps them (its `detach` refuses a grammar's sequence, docs/parallel.md).
    """
    if (
        req.sampler is not None
        or req.stream_refinements
        or _scores_prompt(req)
        or configured not in SAMPLERS_FOR_KIND[loaded.kind]
    ):
        return None
    return configured


def _chat_prompts(req: ChatCompletionRequest, loaded: LoadedModel) -> tuple[list[list[int]], list[int]]:
    if all(m.role == "assistant" for m in req.messages):
        raise bad_request("messages must contain a user, system or developer message", param=req.prompt_param)
    prompts = [chat_prompt_ids(loaded.tokenizer, req.messages)]
    stop_ids = list(loaded.eos_token_ids)
    stop_ids += [t for t in chat_stop_token_ids(loaded.tokenizer) if t not in stop_ids]
    return prompts, stop_ids


def _completion_prompts(req: CompletionRequest, loaded: LoadedModel) -> tuple[list[list[int]], list[int]]:
    p = req.prompt
    if isinstance(p, str):
        prompts = [text_prompt_ids(loaded.tokenizer, p)]
    elif all(isinstance(x, str) for x in p):
        prompts = [text_prompt_ids(loaded.tokenizer, x) for x in p]  # type: ignore[arg-type]
    elif all(isinstance(x, int) for x in p):
        prompts = [list(p)]  # type: ignore[arg-type]
    else:
        prompts = [list(x) for x in p]  # type: ignore[arg-type]
    model_config: Any = loaded.model.config  # a transformers config (torch types attributes as Tensor | Module)
    vocab_size = int(model_config.get_text_config().vocab_size)
    for prompt in prompts:
        for token in prompt:
            if not 0 <= token < vocab_size:
                raise bad_request(f"token id {token} is outside the vocabulary (size {vocab_size})", param="prompt")
    if any(not x for x in prompts):
        raise bad_request("prompt must not be empty", param="prompt")
    return prompts, list(loaded.eos_token_ids)


def _max_tokens(req: Request, state: ServerState, prompt_len: int) -> int:
    """The completion budget: the request's, else the config default, within the context left."""
    context = state.max_context
    room = context - prompt_len
    if room < (0 if req.requested_max_tokens() == 0 else 1):
        raise bad_request(
            f"This model's maximum context length is {context} tokens; the prompt has {prompt_len}.",
            param=req.prompt_param,
            code="context_length_exceeded",
        )
    requested = req.requested_max_tokens()
    if requested == 0:  # echo scoring: the prompt alone
        return 0
    if requested is None:
        return min(state.config.default_max_tokens, room)
    if requested > room:
        raise bad_request(
            f"This model's maximum context length is {context} tokens. "
            f"You requested {prompt_len + requested} tokens ({prompt_len} in the prompt, "
            f"{requested} for the completion).",
            param=req.max_tokens_param(),
            code="context_length_exceeded",
        )
    return requested


def build_job(req: Request, state: ServerState, request_id: str) -> Job:
    _check_common(req, state)
    loaded = state.ready_model()
    _check_logprobs(req, loaded)
    if isinstance(req, ChatCompletionRequest):
        prompts, stop_ids = _chat_prompts(req, loaded)
    else:
        prompts, stop_ids = _completion_prompts(req, loaded)
    n = req.n or 1
    if len(prompts) * n > state.config.max_queue:
        # It could never be queued whole, however idle the server: not a "retry later".
        raise bad_request(
            f"This request asks for {len(prompts) * n} choices (prompts x n); the server queues at most "
            f"{state.config.max_queue}.",
            param="n" if n > 1 else req.prompt_param,
        )
    grammar = _grammar(req, loaded)
    params = [
        req.to_sampling_params(
            max_tokens=_max_tokens(req, state, len(prompt)),
            stop_token_ids=stop_ids,
            choice=j,
            defaults=state.config,
            grammar=grammar,
        )
        for prompt in prompts
        for j in range(n)
    ]
    sampler = _sampler_for(req, loaded, state.config.sampler)
    return Job(
        request_id=request_id,
        model=req.model,
        prompts=prompts,
        params=params,
        sampler=sampler,
        sampler_when_busy=_busy_sampler_for(req, loaded, state.config.sampler_when_busy),
        stop=req.stop_list(),
        stream=bool(req.stream),
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
        want_drafts=req.stream_refinements,
        n=n,
        system_fingerprint=fingerprint(sampler, str(loaded.dtype).removeprefix("torch.")),
        logprobs=req.logprob_counts()[0] is not None,
        echo=isinstance(req, CompletionRequest) and bool(req.echo),
    )


def fingerprint(sampler: str, dtype: str) -> str:
    """OpenAI's `system_fingerprint`: changes when the backend that shapes outputs changes (the
    server version, the sampler the request was given, the loaded weights' dtype). The sampler that
    actually ran (after a busy switch) is in `timings.sampler`."""
    return f"fp_dgserve-{__version__}-{sampler}-{dtype}"
