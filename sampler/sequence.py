"""What every sampler does with one sequence: its noise seed, its prompt check, committing tokens."""

from __future__ import annotations

import secrets

from sampler.types import FinishReason, SamplingParams, StepEvent


def resolve_seed(params: SamplingParams) -> int:
    """A request without a seed still gets its own noise stream, just not a repeatable one."""
    return params.seed if params.seed is not None else secrets.randbits(63)


def check_prompt(prompt_ids: list[int]) -> None:
    """Every sampler needs at least one token to condition on."""
    if not prompt_ids:
        raise ValueError("prompt must contain at least one token")


def commit_token(generated: list[int], token: int, params: SamplingParams) -> StepEvent:
    """Append `token` to `generated` unless it stops the sequence; say how the step ended.

    Stop tokens (EOS, end of turn) end the sequence and are not part of the output.
    """
    if token in params.stop_token_ids:
        return StepEvent(finish_reason="stop")
    generated.append(token)
    reason: FinishReason | None = "length" if len(generated) >= params.max_tokens else None
    return StepEvent(token_ids=[token], finish_reason=reason)
