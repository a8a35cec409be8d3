"""The autoregressive baseline: prefill, then one forward per generated token.

Every speed claim of the other samplers is a ratio against this sampler on the same weights
in the same run, so it is kept plain and fast: KV-cache decode, last-position logits only.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

import torch

from sampler.logits import sample_tokens
from sampler.types import SamplingParams, StepEvent


@dataclass
class _Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    generated: list[int] = field(default_factory=list)
    cache: Any = None  # transformers Cache; None until prefilled


def resolve_seed(params: SamplingParams) -> int:
    """A request without a seed still gets its own noise stream, just not a repeatable one."""
    return params.seed if params.seed is not None else secrets.randbits(63)


def commit_token(generated: list[int], token: int, params: SamplingParams) -> StepEvent:
    """Append `token` to `generated` unless it stops the sequence; say how the step ended.

    Stop tokens (EOS, end of turn) end the sequence and are not part of the output.
    """
    if token in params.stop_token_ids:
        return StepEvent(finish_reason="stop")
    generated.append(token)
    reason = "length" if len(generated) >= params.max_tokens else None
    return StepEvent(token_ids=[token], finish_reason=reason)


class ARSampler:
    """One token per forward per sequence. Sequences join at the next step (prefill)."""

    name = "ar"

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.model = model
        self.device = device
        self._seqs: dict[str, _Sequence] = {}

    @property
    def num_active(self) -> int:
        return len(self._seqs)

    def add(self, seq_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise ValueError("prompt must contain at least one token")
        self._seqs[seq_id] = _Sequence(list(prompt_ids), params, resolve_seed(params))

    def cancel(self, seq_id: str) -> None:
        self._seqs.pop(seq_id, None)

    @torch.inference_mode()
    def _next_logits(self, seq: _Sequence) -> torch.Tensor:
        """Logits (V,) for the next position; prefills on first call, then feeds one token."""
        new_ids = seq.prompt_ids if seq.cache is None else seq.generated[-1:]
        out = self.model(
            input_ids=torch.tensor([new_ids], device=self.device),
            cache=seq.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        seq.cache = out.cache
        return out.logits[0, -1]

    def step(self) -> dict[str, StepEvent]:
        events: dict[str, StepEvent] = {}
        for seq_id, seq in list(self._seqs.items()):
            logits = self._next_logits(seq)
            position = len(seq.prompt_ids) + len(seq.generated)
            p = seq.params
            token = int(sample_tokens(logits[None], [position], temperature=p.temperature,
                                      top_k=p.top_k, top_p=p.top_p, seed=seq.seed)[0])
            event = commit_token(seq.generated, token, p)
            event.forward_passes = 1
            events[seq_id] = event
            if event.finish_reason is not None:
                del self._seqs[seq_id]
        return events
