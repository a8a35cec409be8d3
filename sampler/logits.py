"""Small pure tensor functions over logits. Shapes: N rows (positions), V vocabulary.

Sampling is Gumbel-max with noise keyed by (seed, absolute position): the token drawn for a
position depends only on the request's seed, that position and the logits there. Any sampler
that ends up with the same logits at the same position draws the same token, so the parallel
sampler's verified fixed point is exactly the AR sample, and a seeded request gives the same
output alone or batched.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """One splitmix64 round: decorrelates nearby (seed, position) keys before seeding."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def noise_seed(seed: int, position: int, stream: int = 0) -> int:
    """63-bit generator seed for one (request seed, absolute position, stream) key."""
    return _splitmix64(_splitmix64(_splitmix64(seed & _MASK64) ^ position) ^ stream) >> 1


def gumbel_noise(seed: int, positions: list[int], vocab_size: int, stream: int = 0) -> torch.Tensor:
    """Standard Gumbel noise, (len(positions), V) float32 on the CPU, one row per position."""
    rows = torch.empty(len(positions), vocab_size, dtype=torch.float32)
    gen = torch.Generator()
    for i, pos in enumerate(positions):
        gen.manual_seed(noise_seed(seed, pos, stream))
        rows[i].uniform_(generator=gen)
    # u in [0, 1): clamp away from 0 and 1 so -log(-log(u)) stays finite.
    rows.clamp_(1e-20, 1.0 - 1e-7)
    return rows.log_().neg_().log_().neg_()


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Return (N, V) logits with everything outside top-k / the top-p nucleus set to -inf.

    top_k 0 and top_p 1.0 are no-ops. The nucleus keeps the smallest set of tokens whose
    probability mass reaches top_p (always at least the most likely token).
    """
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Mass strictly before each token; a token stays while that mass is below top_p.
        mass_before = probs.cumsum(dim=-1) - probs
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Gemma's final-logit soft-capping, cap * tanh(logits / cap), any shape; None: unchanged."""
    if cap is None:
        return logits
    return torch.tanh(logits / cap) * cap


def draw_tokens(
    logits: torch.Tensor,
    noise: torch.Tensor | None,
    *,
    temperature: float,
    top_k: int,
    top_p: float,
) -> torch.Tensor:
    """Pick one token per row of (N, V) `logits` with the given (N, V) Gumbel `noise` (CPU).

    temperature <= 0 is greedy argmax and needs no noise. Otherwise Gumbel-max over filtered,
    tempered logits, which samples exactly from softmax(filtered / temperature) when `noise`
    is standard Gumbel. Callers that draw a position twice pass the same noise rows, so both
    draws agree. Returns (N,) int64 on CPU.
    """
    logits = logits.float()
    if temperature <= 0.0:
        return logits.argmax(dim=-1).cpu()
    if noise is None:
        raise ValueError("sampling at temperature > 0 needs noise")
    scaled = filter_top_k_top_p(logits / temperature, top_k, top_p).cpu()
    return (scaled + noise).argmax(dim=-1)


def sample_tokens(
    logits: torch.Tensor,
    positions: list[int],
    *,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int,
) -> torch.Tensor:
    """Pick one token per row of (N, V) `logits`; row i is for absolute position positions[i].

    `draw_tokens` with noise keyed by (seed, positions[i]). Returns (N,) int64 on CPU.
    """
    noise = gumbel_noise(seed, positions, logits.shape[-1]) if temperature > 0.0 else None
    return draw_tokens(logits, noise, temperature=temperature, top_k=top_k, top_p=top_p)
