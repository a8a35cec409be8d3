"""Token-for-token parity with transformers' `DiffusionGemmaGenerationMixin.generate`.

Two alignments of the randomness:
- "global": our sampler draws from the global torch RNG in the reference's call order
  (canvas, then per step multinomial and renoise), so with one row and the same seed the
  whole output must equal `generate`'s.
- "keyed": the reference's random calls are patched to draw our per-request keyed noise
  (Gumbel uniforms, renoise tokens, initial canvas), which checks our fused Gumbel-max /
  entropy path and the per-row bookkeeping against the reference loop.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from transformers import EntropyBoundSamplerConfig
from transformers.models.diffusion_gemma import generation_diffusion_gemma as reference_module

from sampler.diffusion import DiffusionSampler
from sampler.diffusion_math import NOISE_CANVAS, NOISE_RENOISE, NOISE_SAMPLE, keyed_generator
from sampler.runtime.tiny_diffusion import build_tiny_diffusion
from sampler.types import DiffusionOptions, SamplingParams
from server.engine_core import run_to_completion

CPU = torch.device("cpu")
EOS_IDS = [1, 5]
PROMPT = [2, 10, 20, 30, 40, 50, 60]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return build_tiny_diffusion(1024, 32, eos_token_ids=EOS_IDS, usable_vocab=489)


def reference_tokens(model: torch.nn.Module, prompt: list[int], max_new_tokens: int, **settings) -> list[int]:
    """`generate`'s new tokens, cut before the first EOS (the rest is EOS + padding)."""
    kwargs = dict(settings)
    if "entropy_bound" in kwargs:
        kwargs["sampler_config"] = EntropyBoundSamplerConfig(entropy_bound=kwargs.pop("entropy_bound"))
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, **kwargs)
    tokens = out.sequences[0, len(prompt) :].tolist()
    cut = next((i for i, t in enumerate(tokens) if t in EOS_IDS), len(tokens))
    return tokens[:cut]


def our_run(sampler: DiffusionSampler, prompt: list[int], params: SamplingParams) -> tuple[list[int], list]:
    done = run_to_completion(sampler, {"r": (prompt, params)})
    return done.tokens["r"], done.events["r"]


# (settings for both sides, max_new_tokens): multi-block runs, an early stop on confidence
# alone (no stability check), a custom schedule and bound, the full 48 default steps.
CASES = [
    (dict(max_denoising_steps=6), 64),
    (dict(max_denoising_steps=8, stability_threshold=0, confidence_threshold=1.0), 64),
    (
        dict(
            max_denoising_steps=5,
            t_min=0.2,
            t_max=1.3,
            entropy_bound=0.6,
            stability_threshold=2,
            confidence_threshold=2.0,
        ),
        64,
    ),
    (dict(), 32),
]


def _params(settings: dict, max_tokens: int, **extra) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens, stop_token_ids=frozenset(EOS_IDS), diffusion=DiffusionOptions(**settings), **extra
    )


@pytest.mark.parametrize("settings,max_new", CASES)
def test_global_rng_parity(model: torch.nn.Module, settings: dict, max_new: int) -> None:
    torch.manual_seed(1234)
    expected = reference_tokens(model, PROMPT, max_new, **settings)
    torch.manual_seed(1234)
    ours, events = our_run(DiffusionSampler(model, CPU, noise="global"), PROMPT, _params(settings, max_new))
    assert ours == expected
    steps = [e.denoising_steps for e in events if e.denoising_steps is not None]
    assert len(steps) == -(-max_new // 32)
    if settings.get("stability_threshold") == 0:
        assert min(steps) < settings["max_denoising_steps"], "the early stop was not exercised"


@pytest.fixture
def steered(model: torch.nn.Module) -> Iterator[None]:
    """Push canvas position i towards token 100 + i: a random model's argmax canvas never
    settles, a steered one does after a varying number of steps, so the released stopping
    rule (stable for 1 step and mean entropy < 0.005) fires mid-block."""

    def hook(module, inputs, output):
        positions = torch.arange(output.shape[1])
        output[:, positions, positions + 100] += 24.0
        return output

    handle = model.lm_head.register_forward_hook(hook)
    yield
    handle.remove()


def test_global_rng_parity_with_early_stops(model: torch.nn.Module, steered: None) -> None:
    torch.manual_seed(5)
    expected = reference_tokens(model, PROMPT, 96, max_denoising_steps=16)
    torch.manual_seed(5)
    ours, events = our_run(
        DiffusionSampler(model, CPU, noise="global"), PROMPT, _params(dict(max_denoising_steps=16), 96)
    )
    assert ours == expected
    steps = [e.denoising_steps for e in events if e.denoising_steps is not None]
    assert len(steps) == 3 and min(steps) < 16, steps


@pytest.fixture
def eos_at_index_5(model: torch.nn.Module) -> Iterator[None]:
    """Bias the decoder's logits: canvas position 5 is certainly EOS (id 5), every block."""

    def hook(module, inputs, output):
        output[:, 5, :] = -1e4
        output[:, 5, 5] = 1e4
        return output

    handle = model.lm_head.register_forward_hook(hook)
    yield
    handle.remove()


def test_global_rng_parity_with_eos_inside_a_block(model: torch.nn.Module, eos_at_index_5: None) -> None:
    settings = dict(max_denoising_steps=6)
    torch.manual_seed(99)
    expected = reference_tokens(model, PROMPT, 96, **settings)
    torch.manual_seed(99)
    ours, events = our_run(DiffusionSampler(model, CPU, noise="global"), PROMPT, _params(settings, 96))
    assert ours == expected and len(ours) == 5
    assert events[-1].finish_reason == "stop"


def test_global_rng_parity_trims_to_max_tokens(model: torch.nn.Module) -> None:
    """The reference emits whole blocks (64 tokens for 40 asked); we stop at 40."""
    torch.manual_seed(7)
    expected = reference_tokens(model, PROMPT, 40, max_denoising_steps=4)
    torch.manual_seed(7)
    ours, events = our_run(
        DiffusionSampler(model, CPU, noise="global"), PROMPT, _params(dict(max_denoising_steps=4), 40)
    )
    assert len(expected) == 64 and ours == expected[:40]
    assert [len(e.token_ids) for e in events if e.denoising_steps] == [32, 8]
    assert events[-1].finish_reason == "length"


class _KeyedReferenceNoise:
    """Patches the reference's random draws to use our keyed streams for one request."""

    def __init__(self, seed: int, steps: int, vocab: int) -> None:
        self.seed, self.steps, self.vocab = seed, steps, vocab
        self.block, self.step = -1, steps

    def initialize_canvas(self, sampler, batch_size: int, device: torch.device) -> torch.Tensor:
        self.block, self.step = self.block + 1, self.steps
        gen = keyed_generator(self.seed, self.block, 0, NOISE_CANVAS, device)
        return torch.randint(0, self.vocab, (sampler.canvas_length,), generator=gen, device=device)[None]

    def multinomial(self, probs: torch.Tensor, num_samples: int) -> torch.Tensor:
        """Gumbel-max (exponential race) on every position, position p's noise keyed by p."""
        exponential = torch.empty_like(probs)
        for position in range(probs.shape[0]):
            gen = keyed_generator(self.seed, self.block, self.step, NOISE_SAMPLE, probs.device, position)
            exponential[position].uniform_(generator=gen)
        exponential.log_().neg_()
        return (probs / exponential).argmax(dim=-1, keepdim=True)

    def renoise_canvas(self, sampler, accepted: torch.Tensor, cur_step) -> torch.Tensor:
        gen = keyed_generator(self.seed, self.block, self.step, NOISE_RENOISE, accepted.device)
        noise = torch.randint(0, self.vocab, (accepted.shape[1],), generator=gen, device=accepted.device)
        self.step -= 1
        return torch.where(sampler.accepted_token_mask, accepted, noise[None])


@pytest.mark.parametrize(
    "settings,max_new,steer", [(*CASES[0], False), (*CASES[1], False), (dict(max_denoising_steps=16), 96, True)]
)
def test_keyed_noise_parity(
    model: torch.nn.Module,
    settings: dict,
    max_new: int,
    steer: bool,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    if steer:
        request.getfixturevalue("steered")
    seed = 4321
    steps = settings.get("max_denoising_steps", 48)
    noise = _KeyedReferenceNoise(seed, steps, model.config.text_config.vocab_size)
    monkeypatch.setattr(
        reference_module.EntropyBoundSampler,
        "initialize_canvas",
        lambda self, batch_size, device: noise.initialize_canvas(self, batch_size, device),
    )
    monkeypatch.setattr(
        reference_module.EntropyBoundSampler,
        "renoise_canvas",
        lambda self, accepted, cur_step: noise.renoise_canvas(self, accepted, cur_step),
    )
    monkeypatch.setattr(torch, "multinomial", noise.multinomial)
    expected = reference_tokens(model, PROMPT, max_new, **settings)
    monkeypatch.undo()
    ours, _ = our_run(DiffusionSampler(model, CPU), PROMPT, _params(settings, max_new, seed=seed))
    assert ours == expected
