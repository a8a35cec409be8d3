"""Log-probabilities for the OpenAI `logprobs` / `echo` fields: small pure functions over logits.

The values are the model's own distribution: log-softmax of the raw (soft-capped) logits in
float32, before temperature, top-k and top-p (vLLM's default "raw" mode). Shapes: N rows, V
vocabulary. Callers run these only for requests that asked, so a request without logprobs
never pays for a log-softmax over the vocabulary. See docs/openai.md ("Logprobs").
"""

from __future__ import annotations

import torch

from sampler.types import TokenLogprob

# Rows per log-softmax when scoring a prompt: bounds the float32 (rows, V) temporary
# (64 x 262,144 x 4 B = 64 MiB on Gemma's vocabulary).
_PROMPT_ROWS = 64


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """(N, V) logits of any dtype -> (N, V) float32 log-probabilities."""
    return torch.log_softmax(logits.float(), dim=-1)


def pick(logprobs: torch.Tensor, tokens: list[int], k: int) -> list[TokenLogprob]:
    """Row i of (N, V) float32 `logprobs`: tokens[i]'s logprob and the row's top-k (k >= 0)."""
    rows = torch.arange(len(tokens), device=logprobs.device)
    chosen = logprobs[rows, torch.tensor(tokens, device=logprobs.device)].tolist()
    if k > 0:
        values, ids = torch.topk(logprobs, min(k, logprobs.shape[-1]), dim=-1)  # (N, k) each
        tops = [tuple(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
    else:
        tops = [() for _ in tokens]
    return [TokenLogprob(t, lp, top) for t, lp, top in zip(tokens, chosen, tops, strict=True)]


def token_logprobs(logits: torch.Tensor, tokens: list[int], k: int) -> list[TokenLogprob]:
    """The logprob of tokens[i] under row i of (N, V) raw `logits`, with k alternatives."""
    return pick(log_softmax(logits), tokens, k)


def prompt_logprobs(logits: torch.Tensor, targets: list[int], k: int) -> list[TokenLogprob]:
    """Score a prompt span: row i of (N, V) `logits` is the forward's output at one prompt
    position and `targets[i]` the prompt token that follows it (len(targets) <= N; rows past
    the targets, such as the last prompt position's, are not scored). Log-softmax runs in
    slices of rows so a long prompt never holds an (N, V) float32 copy."""
    out: list[TokenLogprob] = []
    for lo in range(0, len(targets), _PROMPT_ROWS):
        hi = min(lo + _PROMPT_ROWS, len(targets))
        out += token_logprobs(logits[lo:hi], targets[lo:hi], k)
    return out
