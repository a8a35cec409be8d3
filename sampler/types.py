"""Types every sampler shares: what a request asks for and what one step yields.

The engine, streaming and metrics only ever see these types, so they never branch on
which sampler runs (DESIGN principle 6).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    from sampler.constrained import Grammar

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class ParallelOptions:
    """Parallel refinement's per-request option (docs/parallel.md)."""

    steps: int | None = None  # most refinement forwards per block; None: refine until the block is exact


@dataclass(frozen=True)
class DiffusionOptions:
    """Per-request overrides of the checkpoint's denoising schedule (docs/diffusion.md); None keeps its value."""

    max_denoising_steps: int | None = None
    entropy_bound: float | None = None
    t_min: float | None = None
    t_max: float | None = None
    stability_threshold: int | None = None
    confidence_threshold: float | None = None


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings, already validated at the HTTP edge.

    temperature 0 means greedy (argmax). `seed` None means the engine picks a fresh random
    seed, so every request still has its own reproducible noise stream.
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    seed: int | None = None
    stop_token_ids: frozenset[int] = frozenset()
    stream_refinements: bool = False
    # Each sampler reads only its own options; the others are ignored (a request may be moved
    # to another sampler at admission, see server/scheduler.py).
    parallel: ParallelOptions = ParallelOptions()
    diffusion: DiffusionOptions = DiffusionOptions()
    # Log-probabilities (docs/openai.md, "Logprobs"): None = off, and then nothing is computed.
    # k >= 0: each generated token's logprob plus its k most likely alternatives.
    logprobs: int | None = None
    # k >= 0: score the prompt too (echo): each prompt token's logprob given the tokens before
    # it, plus k alternatives. Only the `ar` sampler scores prompts (in its prefill forward).
    prompt_logprobs: int | None = None
    # response_format JSON (docs/openai.md, "Structured output"): every draw is masked to the
    # grammar and the sequence stops when the document is complete. `ar` and `parallel` honour
    # it; block diffusion cannot (server/jobs.py refuses).
    grammar: Grammar | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability under the model's distribution at its position (the
    log-softmax of the raw logits, before temperature / top-k / top-p), and the `top` most
    likely tokens there as (token id, logprob), most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class StepEvent:
    """What one engine step produced for one sequence.

    `token_ids` are committed (final) tokens, in order, never retracted. `draft_ids` is the
    current, uncommitted refinement draft (only when the request asked for refinements).
    `forward_passes` counts model forwards this sequence took part in during the step.
    """

    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    forward_passes: int = 0
    draft_ids: list[int] | None = None
    refinement_step: int | None = None
    # Set when a block-diffusion block commits: how many denoising steps it took.
    denoising_steps: int | None = None
    # When the request asked for logprobs: one entry per token of `token_ids`, in order.
    logprobs: list[TokenLogprob] | None = None
    # When it asked to score the prompt: one entry per prompt token, the first None (nothing
    # precedes it); sent once, with the sequence's first event.
    prompt_logprobs: list[TokenLogprob | None] | None = None


class BatchSampler(Protocol):
    """A sampler that advances every active sequence by one step per `step()` call.

    The engine's model thread is the only caller. Sequences join with `add`, leave by
    finishing (an event with a finish_reason) or by `cancel`. A sampler may defer a newly
    added sequence until it can join (block diffusion joins at block boundaries).
    """

    name: str

    def add(self, seq_id: str, prompt_ids: list[int], params: SamplingParams) -> None: ...

    def cancel(self, seq_id: str) -> None: ...

    def step(self) -> dict[str, StepEvent]: ...

    @property
    def num_active(self) -> int: ...


@dataclass(frozen=True)
class Handover:
    """A running sequence given up by one sampler for another to continue (the busy switch for
    sequences already running, server/engine_core.py): what it committed and its noise seed."""

    generated: list[int]
    seed: int


@runtime_checkable
class HandsOver(Protocol):
    """A sampler that can give up a running sequence between steps."""

    def detach(self, seq_id: str) -> Handover | None:
        """Remove `seq_id` and return what it committed; None (and nothing removed) when it
        cannot be handed over (unknown, or state another sampler could not continue)."""
        ...


@runtime_checkable
class TakesOver(Protocol):
    """A sampler that can continue a sequence another sampler began."""

    def resume(self, seq_id: str, prompt_ids: list[int], params: SamplingParams, handover: Handover) -> None:
        """Continue `seq_id` after `handover.generated`, as if it had run here from the start:
        the same noise stream (seed, keyed by position), max_tokens counting what was committed."""
        ...
