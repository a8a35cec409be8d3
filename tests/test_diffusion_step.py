"""The pure denoising step and the noise sources, on small hand-made logits (no model)."""

from __future__ import annotations

import pytest
import torch

from sampler.diffusion_noise import Draw, GlobalNoise, KeyedNoise, NoiseKey, NoiseSource, noise_source
from sampler.diffusion_settings import DiffusionSettings
from sampler.diffusion_step import RowState, block_done, denoise_step, step_temperature

CPU = torch.device("cpu")
VOCAB = 8
CANVAS = 6
FILL = -1  # the scripted source's replacement: no real token, so easy to spot


def settings(**changes) -> DiffusionSettings:
    base = DiffusionSettings(
        max_denoising_steps=4, entropy_bound=0.1, t_min=0.5, t_max=1.0, stability_threshold=1, confidence_threshold=0.01
    )
    return base.override(**changes)


def row(
    steps_done: int = 0, history: tuple[torch.Tensor, ...] = (), temperature: float = 1.0, seed: int = 3, **changes
) -> RowState:
    return RowState(settings(**changes), temperature, seed, block=0, steps_done=steps_done, history=history)


def peaked(tokens: list[int], certain: list[bool]) -> torch.Tensor:
    """(1, C, V) logits: position i is certainly tokens[i] where certain[i], uniform elsewhere."""
    logits = torch.zeros(1, len(tokens), VOCAB)
    for i, (token, sure) in enumerate(zip(tokens, certain, strict=True)):
        if sure:
            logits[0, i, token] = 50.0
    return logits


class ScriptedNoise(NoiseSource):
    """Keyed draws, but every rejected position is renoised to FILL: easy to spot."""

    def __init__(self) -> None:
        self.keyed = KeyedNoise()
        self.keys: list[NoiseKey] = []

    def initial_canvas(self, key: NoiseKey, length: int, vocab: int, device: torch.device) -> torch.Tensor:
        return torch.full((length,), FILL)

    def draw(self, z: torch.Tensor, keys: list[NoiseKey], greedy: list[bool], bounds: torch.Tensor) -> Draw:
        self.keys = keys
        return self.keyed.draw(z, keys, greedy, bounds)

    def renoise(self, keys: list[NoiseKey], length: int, vocab: int, device: torch.device) -> torch.Tensor:
        return torch.full((len(keys), length), FILL)


# ----------------------------------------------------------------- block-done rule
def test_block_done_when_stable_and_confident() -> None:
    canvas = torch.tensor([1, 2, 3])
    done, history = block_done(row(history=(canvas.clone(),)), canvas, mean_entropy=0.001)
    assert done and len(history) == 1 and torch.equal(history[0], canvas)


@pytest.mark.parametrize("previous,entropy", [([1, 2, 4], 0.001), ([1, 2, 3], 0.5)])
def test_block_not_done_when_changed_or_unsure(previous: list[int], entropy: float) -> None:
    done, _ = block_done(row(history=(torch.tensor(previous),)), torch.tensor([1, 2, 3]), entropy)
    assert not done


def test_block_needs_a_full_history_before_stable() -> None:
    canvas = torch.tensor([1, 2, 3])
    state = row(history=(canvas.clone(),), stability_threshold=2)
    done, history = block_done(state, canvas, 0.0)
    assert not done and [h.tolist() for h in history] == [[1, 2, 3], [1, 2, 3]]
    done, history = block_done(row(history=tuple(history), stability_threshold=2), canvas, 0.0)
    assert done and len(history) == 2
    older = (torch.tensor([7, 7, 7]), canvas.clone())
    done, history = block_done(row(history=older, stability_threshold=2), canvas, 0.0)
    assert not done and [h.tolist() for h in history] == [[1, 2, 3], [1, 2, 3]]  # the oldest dropped


def test_block_done_after_max_steps_even_if_unstable() -> None:
    changed = (torch.tensor([9, 9, 9]),)
    assert block_done(row(steps_done=3, history=changed), torch.tensor([1, 2, 3]), 5.0)[0]
    assert not block_done(row(steps_done=2, history=changed), torch.tensor([1, 2, 3]), 5.0)[0]


def test_no_stability_check_stops_on_confidence_alone() -> None:
    done, history = block_done(row(stability_threshold=0), torch.tensor([4, 5]), 0.001)
    assert done and history == []


# ----------------------------------------------------------------- temperature
def test_temperature_counts_down_the_schedule_and_scales() -> None:
    # N = 4 steps from t_max 1.0 to t_min 0.5: s = 4, 3, 2, 1 -> 1.0, 0.875, 0.75, 0.625.
    expected = [1.0, 0.875, 0.75, 0.625]
    assert [float(step_temperature(row(steps_done=k), CPU)) for k in range(4)] == expected
    assert float(step_temperature(row(steps_done=2, temperature=0.5), CPU)) == 0.375
    assert float(step_temperature(row(steps_done=2, temperature=0.0), CPU)) == 0.75  # greedy: unscaled


def test_self_conditioning_is_the_tempered_logits() -> None:
    logits = torch.randn(1, CANVAS, VOCAB, generator=torch.Generator().manual_seed(0))
    original = logits.clone()
    result = denoise_step(logits, [row(steps_done=2)], KeyedNoise(), torch.bfloat16)
    assert result.self_cond.dtype == torch.bfloat16
    torch.testing.assert_close(result.self_cond.float(), (original / 0.75).bfloat16().float())


# ----------------------------------------------------------------- accept or renoise
def test_lowest_entropies_are_accepted_and_the_rest_renoised() -> None:
    tokens, certain = [3, 1, 4, 1, 5, 2], [True, False, True, False, False, True]
    logits = peaked(tokens, certain)
    logits[0, 1, 1] = 2.0  # position 1: unsure, but less so than the uniform 3 and 4
    noise = ScriptedNoise()
    result = denoise_step(logits, [row()], noise, torch.float32)
    # Entropies ~0 (x3), then position 1's: the sum before the largest is ~0 <= 0.1, so it is
    # accepted too; position 3 or 4 would make it about 1.5.
    assert result.accepted[0].tolist() == [True, True, True, False, False, True]
    canvas = result.canvas[0].tolist()
    assert [canvas[i] for i in (0, 2, 3, 4, 5)] == [3, 4, FILL, FILL, 2] and canvas[1] != FILL
    assert [result.argmax[0, i].item() for i in (0, 1, 2, 5)] == [3, 1, 4, 2]
    assert noise.keys == [NoiseKey(seed=3, block=0, step=4)]  # s counts down from N = 4
    assert result.done == [False]  # no history yet, and half the canvas is unsure


def test_at_least_one_position_is_accepted() -> None:
    uniform = torch.zeros(2, CANVAS, VOCAB)  # every entropy is log(8), far above the bound
    uniform[1, 4, 0] = 0.5  # row 1: position 4 is a little less uncertain
    result = denoise_step(uniform, [row(), row(seed=4)], ScriptedNoise(), torch.float32)
    assert result.accepted.sum(dim=-1).tolist() == [1, 1]
    assert result.accepted[1, 4]
    assert (result.canvas == FILL).sum().item() == 2 * CANVAS - 2


def test_renoised_positions_differ_from_step_to_step() -> None:
    uniform = torch.zeros(1, 64, VOCAB)
    first = denoise_step(uniform.clone(), [row(steps_done=0)], KeyedNoise(), torch.float32)
    second = denoise_step(uniform.clone(), [row(steps_done=1)], KeyedNoise(), torch.float32)
    rejected = ~(first.accepted[0] | second.accepted[0])
    assert rejected.sum() >= 60
    assert not torch.equal(first.canvas[0, rejected], second.canvas[0, rejected])
    # ... and the same step of the same request renoises the same way.
    again = denoise_step(uniform.clone(), [row(steps_done=0)], KeyedNoise(), torch.float32)
    assert torch.equal(again.canvas, first.canvas)


def test_block_done_when_the_whole_canvas_is_certain_and_stable() -> None:
    tokens = [3, 1, 4, 1, 5, 2]
    logits = peaked(tokens, [True] * CANVAS)
    first = denoise_step(logits.clone(), [row()], KeyedNoise(), torch.float32)
    assert first.done == [False]  # nothing to compare with yet
    assert first.canvas[0].tolist() == tokens and first.accepted.all()
    second = denoise_step(
        logits.clone(), [row(steps_done=1, history=tuple(first.history[0]))], KeyedNoise(), torch.float32
    )
    assert second.done == [True]


def test_greedy_rows_take_the_argmax_sampled_rows_draw() -> None:
    logits = torch.zeros(2, 64, VOCAB)
    logits[:, :, 0] = 0.1  # token 0 slightly ahead of 7 others: a sample is often another token
    rows = [row(temperature=0.0, entropy_bound=1e6), row(entropy_bound=1e6)]
    result = denoise_step(logits, rows, KeyedNoise(), torch.float32)
    assert result.accepted.all()
    assert (result.canvas[0] == 0).all()
    assert (result.canvas[1] != 0).sum() > 20


# ----------------------------------------------------------------- noise sources
def test_keyed_rows_ignore_their_neighbours() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 64, VOCAB, generator=gen) * 3
    rows = [row(entropy_bound=2.0), row(seed=11, steps_done=1, entropy_bound=2.0)]
    together = denoise_step(logits.clone(), rows, KeyedNoise(), torch.float32)
    alone = denoise_step(logits[1:].clone(), rows[1:], KeyedNoise(), torch.float32)
    assert torch.equal(together.canvas[1], alone.canvas[0])
    assert not torch.equal(together.canvas[0], together.canvas[1])


def test_keyed_canvas_ignores_the_global_rng_and_global_follows_it() -> None:
    keyed, global_ = KeyedNoise(), GlobalNoise()
    key = NoiseKey(seed=5, block=2, step=0)
    canvases = []
    for rng_seed in (1, 2):
        torch.manual_seed(rng_seed)
        canvases.append((keyed.initial_canvas(key, 32, 1000, CPU), global_.initial_canvas(key, 32, 1000, CPU)))
    assert torch.equal(canvases[0][0], canvases[1][0])
    assert not torch.equal(canvases[0][1], canvases[1][1])
    other_block = keyed.initial_canvas(NoiseKey(seed=5, block=3, step=0), 32, 1000, CPU)
    assert not torch.equal(other_block, canvases[0][0])


def test_noise_source_by_name() -> None:
    assert isinstance(noise_source("keyed"), KeyedNoise) and isinstance(noise_source("global"), GlobalNoise)
    with pytest.raises(ValueError):
        noise_source("philox")
