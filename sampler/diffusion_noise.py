"""Where a block-diffusion step's random numbers come from: per-request keyed streams, or the
global torch RNG in transformers' call order (parity checks only). See docs/diffusion.md.

Shapes: B rows, C canvas positions, V vocabulary; z is the tempered logits (B, C, V) float32.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sampler.diffusion_math import (
    NOISE_CANVAS,
    NOISE_RENOISE,
    NOISE_SAMPLE,
    entropy_bound_accept,
    gumbel_max,
    gumbel_max_entropy,
    keyed_generator,
    reference_sample_entropy,
)


@dataclass(frozen=True)
class NoiseKey:
    """Which draw of which request: step counts down N..1 within a block, 0 is its initial canvas."""

    seed: int
    block: int
    step: int


@dataclass(frozen=True)
class Draw:
    """A step's sampling outcome, each (B, C): sample is meaningful where accepted is True."""

    sample: torch.Tensor  # long
    argmax: torch.Tensor  # long
    entropy: torch.Tensor  # float32, of softmax(z)
    accepted: torch.Tensor  # bool


class NoiseSource(ABC):
    """The random draws of block diffusion. Implementations differ only in the numbers drawn."""

    @abstractmethod
    def initial_canvas(self, key: NoiseKey, length: int, vocab: int, device: torch.device) -> torch.Tensor:
        """(length,) uniform random tokens: a block's starting canvas."""

    @abstractmethod
    def draw(self, z: torch.Tensor, keys: list[NoiseKey], greedy: list[bool], bounds: torch.Tensor) -> Draw:
        """Sample, argmax, entropy and entropy-bound acceptance (`bounds` (B, 1)) of z (B, C, V).

        Acceptance is decided here because the keyed source samples accepted positions only.
        """

    @abstractmethod
    def renoise(self, keys: list[NoiseKey], length: int, vocab: int, device: torch.device) -> torch.Tensor:
        """(B, length) uniform random tokens for the rejected positions."""


class KeyedNoise(NoiseSource):
    """Every draw from a generator keyed by (request seed, block, step, purpose): a seeded
    request gets the same numbers alone or batched, whatever the other rows do."""

    def initial_canvas(self, key: NoiseKey, length: int, vocab: int, device: torch.device) -> torch.Tensor:
        gen = keyed_generator(key.seed, key.block, 0, NOISE_CANVAS, device)
        return torch.randint(0, vocab, (length,), generator=gen, device=device)

    def draw(self, z: torch.Tensor, keys: list[NoiseKey], greedy: list[bool], bounds: torch.Tensor) -> Draw:
        # Acceptance needs only the entropies, and rejected positions are re-noised, so Gumbel
        # noise is drawn for accepted positions only (keyed per position: the same tokens as
        # drawing everywhere, at a fraction of the cost).
        batch, canvas, vocab = z.shape
        _, flat_argmax, flat_entropy = gumbel_max_entropy(z.view(-1, vocab), None)
        argmax, entropy = flat_argmax.view(batch, canvas), flat_entropy.view(batch, canvas)
        accepted = entropy_bound_accept(entropy, bounds)
        sample = argmax.clone()  # greedy rows keep their argmax
        for b, (key, row_greedy) in enumerate(zip(keys, greedy, strict=True)):
            if not row_greedy:
                positions = accepted[b].nonzero().view(-1).tolist()
                sample[b, positions] = gumbel_max(z[b], positions, self._position_noise(key, z.device))
        return Draw(sample, argmax, entropy, accepted)

    def renoise(self, keys: list[NoiseKey], length: int, vocab: int, device: torch.device) -> torch.Tensor:
        return torch.stack(
            [
                torch.randint(
                    0,
                    vocab,
                    (length,),
                    device=device,
                    generator=keyed_generator(key.seed, key.block, key.step, NOISE_RENOISE, device),
                )
                for key in keys
            ]
        )

    @staticmethod
    def _position_noise(key: NoiseKey, device: torch.device) -> Callable[[int], torch.Generator]:
        return lambda position: keyed_generator(key.seed, key.block, key.step, NOISE_SAMPLE, device, position)


class GlobalNoise(NoiseSource):
    """The global torch RNG in transformers' `generate` call order (canvas; per step one
    multinomial over every position, then the renoise tokens). Keys and `greedy` are ignored:
    with one row and the same RNG state the tokens are the reference's, one for one."""

    def initial_canvas(self, key: NoiseKey, length: int, vocab: int, device: torch.device) -> torch.Tensor:
        return torch.randint(0, vocab, (1, length), device=device)[0]

    def draw(self, z: torch.Tensor, keys: list[NoiseKey], greedy: list[bool], bounds: torch.Tensor) -> Draw:
        sample, argmax, entropy = reference_sample_entropy(z)
        return Draw(sample, argmax, entropy, entropy_bound_accept(entropy, bounds))

    def renoise(self, keys: list[NoiseKey], length: int, vocab: int, device: torch.device) -> torch.Tensor:
        return torch.cat([torch.randint(0, vocab, (1, length), device=device) for _ in keys])


NOISE_SOURCES: dict[str, type[NoiseSource]] = {"keyed": KeyedNoise, "global": GlobalNoise}


def noise_source(name: str) -> NoiseSource:
    """The source a config names: "keyed" (serving) or "global" (parity checks)."""
    if name not in NOISE_SOURCES:
        raise ValueError(f"noise must be 'keyed' or 'global', got {name!r}")
    return NOISE_SOURCES[name]()
