"""Fakes for unit tests: a model whose logits are scripted from the tokens it has seen."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class _Out:
    logits: torch.Tensor
    cache: list[int]


class ScriptedModel(torch.nn.Module):
    """A causal "model" whose next-token logits are `script(context) -> logits (V,)`.

    Its "KV cache" is the list of token ids seen so far, so it behaves like a real cached
    model for samplers that prefill once and then feed new tokens. Counts forward calls.
    """

    def __init__(self, vocab_size: int, script: Callable[[list[int]], torch.Tensor]) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.script = script
        self.forward_calls = 0

    def forward(self, input_ids: torch.Tensor, cache: list[int] | None = None, use_cache: bool = True,
                logits_to_keep: int = 0, **_: object) -> _Out:
        assert input_ids.shape[0] == 1, "scripted model serves one sequence per forward"
        self.forward_calls += 1
        context = list(cache or []) + input_ids[0].tolist()
        n_new = input_ids.shape[1]
        rows = [self.script(context[: len(context) - n_new + i + 1]) for i in range(n_new)]
        logits = torch.stack(rows)[None]
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return _Out(logits=logits, cache=context)


def one_hot_logits(vocab_size: int, token: int, high: float = 10.0) -> torch.Tensor:
    logits = torch.zeros(vocab_size)
    logits[token] = high
    return logits


def counting_script(vocab_size: int, eos: int | None = None, eos_after: int | None = None):
    """Next token = (last token + 1) mod V, skipping `eos`; EOS once `eos_after` tokens exist."""

    def script(context: list[int]) -> torch.Tensor:
        if eos is not None and eos_after is not None and len(context) >= eos_after:
            return one_hot_logits(vocab_size, eos)
        nxt = (context[-1] + 1) % vocab_size
        if nxt == eos:
            nxt = (nxt + 1) % vocab_size
        return one_hot_logits(vocab_size, nxt)

    return script
