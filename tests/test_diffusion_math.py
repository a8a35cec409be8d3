"""The vocabulary-sized math of a denoising step against transformers' reference pieces."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import EntropyBoundSamplerConfig
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    EntropyBoundSampler,
    LinearTemperatureScheduleLogitsProcessor,
)

from sampler.diffusion_math import (
    NOISE_SAMPLE,
    entropy_bound_accept,
    gumbel_max,
    gumbel_max_entropy,
    keyed_generator,
    reference_sample_entropy,
    schedule_temperature,
)

CPU = torch.device("cpu")


def keyed(seed: int, block: int, step: int):
    """Per-position Gumbel noise of one (request, block, step), as the sampler keys it."""
    return lambda position: keyed_generator(seed, block, step, NOISE_SAMPLE, CPU, position)


def _logits(rows: int, vocab: int, scale: float, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=gen) * scale


@pytest.mark.parametrize("scale", [0.01, 1.0, 8.0, 60.0])
def test_entropy_and_argmax_match_categorical(scale: float) -> None:
    z = _logits(37, 1024, scale)
    z[3, 17] = 1e4  # one certain position: entropy ~0, exp underflows elsewhere
    _, argmax, entropy = gumbel_max_entropy(z, keyed(1, 0, 1), chunk=5)
    exact = torch.distributions.Categorical(logits=z.double()).entropy().float()
    torch.testing.assert_close(entropy, exact, rtol=1e-5, atol=1e-6)
    # The reference's float32 Categorical is less accurate on peaked rows (~7e-6 at scale 60).
    reference = torch.distributions.Categorical(logits=z).entropy()
    torch.testing.assert_close(entropy, reference, rtol=1e-5, atol=2e-5)
    assert torch.equal(argmax, z.argmax(dim=-1))
    assert entropy[3].abs() < 1e-6


def test_greedy_samples_the_argmax() -> None:
    z = _logits(16, 300, 3.0)
    sample, argmax, _ = gumbel_max_entropy(z, None)
    assert torch.equal(sample, argmax) and torch.equal(argmax, z.argmax(dim=-1))


def test_gumbel_max_draws_from_softmax() -> None:
    """Frequencies of 4096 draws per row match softmax(z) (Gumbel-max is exact)."""
    probs = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0625])
    z = probs.log().repeat(4096, 1) / 0.7 * 0.7  # tempered logits, same row everywhere
    sample, _, entropy = gumbel_max_entropy(z, keyed(3, 1, 2), chunk=100)
    freq = torch.bincount(sample, minlength=5).float() / sample.numel()
    # Binomial standard error at n = 4096 is <= 0.008; allow 4 sigma.
    assert (freq - probs).abs().max() < 0.032, freq
    expected_entropy = -(probs * probs.log()).sum()
    torch.testing.assert_close(entropy, expected_entropy.expand(4096), rtol=1e-5, atol=1e-6)


def test_sample_is_independent_of_chunking_and_keyed() -> None:
    z = _logits(9, 777, 2.0)
    a = gumbel_max_entropy(z, keyed(5, 2, 7), chunk=1)
    b = gumbel_max_entropy(z, keyed(5, 2, 7), chunk=9)
    c = gumbel_max_entropy(z, keyed(5, 2, 6), chunk=4)
    assert torch.equal(a[0], b[0])
    torch.testing.assert_close(a[2], b[2])
    assert not torch.equal(a[0], c[0])  # another step draws other noise
    # Drawing only some rows (the sampler's accepted positions) gives those rows' tokens.
    rows = [0, 4, 8]
    assert torch.equal(gumbel_max(z, rows, keyed(5, 2, 7)), a[0][rows])
    assert gumbel_max(z, [], keyed(5, 2, 7)).numel() == 0


def test_schedule_temperature_is_the_reference_bitwise() -> None:
    for steps, t_min, t_max in [(48, 0.4, 0.8), (7, 0.1, 1.3), (1, 0.5, 0.5)]:
        processor = LinearTemperatureScheduleLogitsProcessor(t_min, t_max, steps)
        logits = _logits(2, 50, 5.0)
        for step in range(steps, 0, -1):
            expected = processor(None, logits, torch.tensor(step, dtype=torch.int32))
            ours = logits / schedule_temperature(step, steps, t_min, t_max)
            assert torch.equal(ours, expected)
            assert math.isclose(
                float(schedule_temperature(step, steps, t_min, t_max)),
                t_min + (t_max - t_min) * step / steps,
                rel_tol=1e-6,
            )


@pytest.mark.parametrize("bound", [0.1, 1.0, 1e-9])
def test_entropy_bound_acceptance_matches_the_reference(bound: float) -> None:
    z = _logits(3, 64, 4.0).view(3, 1, 64).expand(3, 20, 64) * torch.linspace(0.1, 3, 20)[None, :, None]
    reference = EntropyBoundSampler(EntropyBoundSamplerConfig(entropy_bound=bound), 20, 64, 8)
    current = torch.zeros(3, 20, dtype=torch.long)
    denoised = torch.ones(3, 20, dtype=torch.long)
    reference.accept_canvas(current, denoised, z, 8)
    entropy = torch.distributions.Categorical(logits=z).entropy()
    mask = entropy_bound_accept(entropy, torch.full((3, 1), bound))
    assert torch.equal(mask, reference.accepted_token_mask)
    assert bool(mask.any(dim=-1).all())  # at least one position per row


def test_per_row_bounds() -> None:
    entropy = torch.tensor([[0.05, 0.05, 0.05, 2.0], [0.05, 0.05, 0.05, 2.0]])
    mask = entropy_bound_accept(entropy, torch.tensor([[0.06], [1.0]]))
    # Row 2: 0.05 * 3 = 0.15 <= 1.0 before the largest entropy, so all four are accepted.
    assert mask.sum(dim=-1).tolist() == [2, 4]


def test_reference_path_uses_the_global_rng() -> None:
    z = _logits(12, 40, 2.0).view(2, 6, 40)
    torch.manual_seed(11)
    first = reference_sample_entropy(z)[0]
    torch.manual_seed(11)
    expected = torch.multinomial(torch.softmax(z, -1, dtype=torch.float32).view(-1, 40), 1).view(2, 6)
    assert torch.equal(first, expected)
