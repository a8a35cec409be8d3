"""Vocabulary-sized math of one block-diffusion denoising step, as small pure tensor functions.

Shapes: B rows (requests), C canvas positions, V vocabulary. `z` always means the *tempered*
logits, z = logits / temperature, float32: the reference samples from softmax(z), takes the
entropy of softmax(z) and feeds z back as the self-conditioning input.

`gumbel_max_entropy` replaces the reference's softmax → multinomial and
Categorical(logits).entropy() (each a few passes over (C, V) plus a kept probability
tensor) by one sweep per chunk of positions that reuses exp(z - max) for both the entropy
and a Gumbel-max draw. The keyed noise source (`diffusion_noise.KeyedNoise`) goes one step
further: only accepted positions keep their sample (the others are re-noised), and
acceptance depends on the entropies alone, so it sweeps every position for argmax + entropy
and draws Gumbel noise only for the accepted ones (per-position noise keys make that the
same draw as sampling everything). The reference path (`reference_sample_entropy`) is kept
bit for bit, drawing from the global torch RNG, for the parity tests. See docs/diffusion.md.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sampler.logits import noise_seed

# Purposes of keyed noise streams: one generator per (request seed, block, step, purpose).
NOISE_SAMPLE = 0  # Gumbel uniforms, V per sampled position (keyed per position too)
NOISE_RENOISE = 1  # replacement tokens for rejected positions, C per step
NOISE_CANVAS = 2  # the block's initial canvas, C per block (step 0)

# Elements per sweep on the CPU: 1M floats (4 MiB) per temporary. Smaller sweeps stay in
# cache (best on one thread: 1 row of 262144 is ~10 % faster than 4), larger ones amortise
# each op's thread fork/join, which dominates small ops when cores are shared and busy.
# On an accelerator a whole canvas is one sweep.
_CPU_SWEEP_ELEMENTS = 1 << 20


def keyed_generator(
    seed: int, block: int, step: int, purpose: int, device: torch.device, position: int | None = None
) -> torch.Generator:
    """A generator whose stream depends only on (seed, block, step, purpose[, position]).

    Noise is keyed per request, never shared: a seeded request draws the same numbers
    whether it runs alone or batched, whatever the other rows do.
    """
    key = noise_seed(seed, block, (step << 2) | purpose)
    gen = torch.Generator(device=device)
    gen.manual_seed(key if position is None else noise_seed(key, position))
    return gen


GeneratorFor = Callable[[int], torch.Generator]  # row index of z -> that row's noise generator


def schedule_temperature(
    step: int, num_steps: int, t_min: float, t_max: float, device: torch.device | None = None
) -> torch.Tensor:
    """0-d float32 temperature at denoising step `step` (counts down num_steps..1).

    Written exactly as transformers' LinearTemperatureScheduleLogitsProcessor evaluates it
    (an int32 step tensor), so z = logits / temperature is bitwise the reference's z.
    """
    cur_step = torch.tensor(step, device=device, dtype=torch.int32)
    return t_min + ((t_max - t_min) * (cur_step / num_steps))


def entropy_bound_accept(entropy: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """Bool (B, C): the reference's entropy-bound acceptance, per row with its own bound.

    Accept the lowest-entropy positions while (sum of accepted entropies) - (largest of
    them) <= bound; the lowest one is always accepted. entropy (B, C) float32, bound (B, 1).
    """
    sorted_entropy, order = torch.sort(entropy, dim=-1, descending=False)
    # Sorted ascending, so the running maximum is the current element.
    keep_sorted = torch.cumsum(sorted_entropy, dim=-1) - sorted_entropy <= bound
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def reference_sample_entropy(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sample, argmax, entropy), each (B, C), computed as transformers' `generate` does.

    Draws from the *global* torch RNG with the reference's call shape, so with batch 1 and
    the same RNG state it returns the reference's tokens. Materialises probs (B, C, V).
    """
    batch, canvas, vocab = z.shape
    probs = torch.softmax(z, dim=-1, dtype=torch.float32)
    sample = torch.multinomial(probs.view(-1, vocab), num_samples=1).squeeze(-1).view(batch, canvas)
    entropy = torch.distributions.Categorical(logits=z).entropy()
    return sample, torch.argmax(z, dim=-1), entropy


def gumbel_max_entropy(
    z: torch.Tensor, generator_for: GeneratorFor | None, *, chunk: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused sample + argmax + entropy: z (R, V) float32 → three (R,) tensors.

    Per chunk of rows, with m = max(z) and e = exp(z - m):
      entropy = log(sum e) - sum(e * (z - m)) / sum e      (= logsumexp(z) - E_p[z])
      sample  = argmax(e / E) = argmin(e / log U), E = -log(U), U ~ Uniform[0, 1)
    The sample is Gumbel-max in its exponential-race form: argmax(z + G) with
    G = -log(E) is argmax(exp(z - m) / E), so the draw reuses e and needs one log per
    element instead of two. U = 0 gives log U = -inf, e / log U = -0: a token that cannot
    win (G = -inf). Row r's V uniforms come from generator_for(r), so a row's draw does
    not depend on the other rows or on `chunk`. generator_for None: greedy (sample =
    argmax) and no noise at all: the argmax + entropy sweep alone.
    No probability tensor is kept: temporaries are (chunk, V).
    z must be finite (the model's logits are soft-capped): -inf would make e * (z - m) NaN.
    """
    rows_total, vocab = z.shape
    if chunk is None:
        chunk = max(1, _CPU_SWEEP_ELEMENTS // vocab) if z.device.type == "cpu" else rows_total
    sample = torch.empty(rows_total, dtype=torch.long, device=z.device)
    argmax = torch.empty(rows_total, dtype=torch.long, device=z.device)
    entropy = torch.empty(rows_total, dtype=torch.float32, device=z.device)
    shifted = torch.empty(min(chunk, rows_total), vocab, dtype=torch.float32, device=z.device)
    expd = torch.empty_like(shifted)
    noise = torch.empty_like(shifted) if generator_for is not None else None
    for lo in range(0, rows_total, chunk):
        hi = min(lo + chunk, rows_total)
        rows = z[lo:hi]
        t, e = shifted[: hi - lo], expd[: hi - lo]
        top, top_idx = rows.max(dim=-1, keepdim=True)
        argmax[lo:hi] = top_idx.squeeze(-1)
        torch.sub(rows, top, out=t)
        torch.exp(t, out=e)
        total = e.sum(dim=-1)
        # sum(e * t) as a batched dot product: no (chunk, V) product tensor.
        weighted = torch.bmm(e.unsqueeze(1), t.unsqueeze(2)).view(-1)
        entropy[lo:hi] = torch.log(total) - weighted / total
        if noise is None or generator_for is None:
            sample[lo:hi] = top_idx.squeeze(-1)
        else:
            u = noise[: hi - lo]
            for r in range(hi - lo):
                u[r].uniform_(generator=generator_for(lo + r))
            u.log_()  # log U = -E <= 0
            sample[lo:hi] = torch.div(e, u, out=u).argmin(dim=-1)
    return sample, argmax, entropy


def gumbel_max(z: torch.Tensor, rows: list[int], generator_for: GeneratorFor) -> torch.Tensor:
    """Gumbel-max draws (len(rows),) for the listed rows of z (C, V), with
    generator_for(row): the same tokens `gumbel_max_entropy(z, generator_for)` draws there."""
    if not rows:
        return torch.empty(0, dtype=torch.long, device=z.device)
    picked = z[torch.tensor(rows, device=z.device)]  # (A, V), A accepted positions: few
    return gumbel_max_entropy(picked, lambda i: generator_for(rows[i]))[0]
