"""Fakes for unit tests: a model whose logits are scripted from the tokens it has seen."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class _Out:
    logits: torch.Tensor
    cache: TokenCache


class _TokenLayer:
    """Looks like a transformers cache layer; its "keys" (B, 1, T, 1) hold the token ids."""

    is_sliding = False

    def __init__(self, batch: int) -> None:
        self.keys = torch.zeros(batch, 1, 0, 1)
        self.values = torch.zeros(batch, 1, 0, 1)


class TokenCache:
    def __init__(self, batch: int) -> None:
        self.layers = [_TokenLayer(batch)]


class ScriptedModel(torch.nn.Module):
    """A causal "model" whose next-token logits are `script(context) -> logits (V,)`.

    Its KV cache stores the token ids themselves, in the layout the real samplers use
    (left padding marked by `attention_mask`), so batching code runs unchanged on it.
    Counts forward calls.
    """

    def __init__(self, vocab_size: int, script: Callable[[list[int]], torch.Tensor]) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.script = script
        self.forward_calls = 0

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: TokenCache | None = None,
        use_cache: bool = True,
        logits_to_keep: int = 0,
        attention_mask: torch.Tensor | None = None,
        **_: object,
    ) -> _Out:
        self.forward_calls += 1
        batch, n_new = input_ids.shape
        cache = cache or TokenCache(batch)
        layer = cache.layers[0]
        new = input_ids.float()[:, None, :, None]
        layer.keys = torch.cat([layer.keys, new], dim=2)
        layer.values = layer.keys
        total = layer.keys.shape[2]
        mask = attention_mask if attention_mask is not None else torch.ones(batch, total, dtype=torch.long)
        rows = []
        for b in range(batch):
            context = [int(t) for t, m in zip(layer.keys[b, 0, :, 0].tolist(), mask[b].tolist(), strict=True) if m]
            rows.append(torch.stack([self.script(context[: len(context) - n_new + i + 1]) for i in range(n_new)]))
        logits = torch.stack(rows)
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return _Out(logits=logits, cache=cache)


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
