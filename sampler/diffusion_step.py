"""One block-diffusion denoising step after the decoder forward, as a pure function (the role of
a diffusers scheduler's `step()`): temper, sample, accept or renoise, and the block-done rule.
The formulas are in docs/diffusion.md ("Code layout").

Shapes: B rows, C canvas positions, V vocabulary. The step is batched over rows so that one
sweep serves all of them and the global-RNG source keeps the reference's call order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sampler.diffusion_math import schedule_temperature
from sampler.diffusion_noise import NoiseKey, NoiseSource
from sampler.diffusion_settings import DiffusionSettings


@dataclass(frozen=True)
class RowState:
    """One row's block going into a step."""

    settings: DiffusionSettings
    temperature: float  # the request's scale of the schedule: 1 is the checkpoint's, <= 0 greedy
    seed: int
    block: int
    steps_done: int  # denoising steps already done in this block
    history: Sequence[torch.Tensor] = ()  # the last argmax canvases (C,), oldest first

    @property
    def remaining(self) -> int:
        """The schedule's step index s, counting down N..1."""
        return self.settings.max_denoising_steps - self.steps_done

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass(frozen=True)
class StepResult:
    """The rows' blocks after a step; per-row lists are in the order of the input rows."""

    canvas: torch.Tensor  # (B, C) long: accepted samples, random tokens elsewhere; the next input
    accepted: torch.Tensor  # (B, C) bool
    argmax: torch.Tensor  # (B, C) long: what the block commits when done
    self_cond: torch.Tensor  # (B, C, V) tempered logits z: the next step's self-conditioning input
    done: list[bool]
    history: list[list[torch.Tensor]]  # each row's new argmax history (at most stability_threshold)


def step_temperature(row: RowState, device: torch.device) -> torch.Tensor:
    """0-d float32 temperature of the row's current step.

    The request's temperature 1 (OpenAI's default) is the checkpoint's schedule bit for bit;
    0 (greedy) keeps the unscaled schedule for the entropies and takes argmax samples.
    """
    s = row.settings
    base = schedule_temperature(row.remaining, s.max_denoising_steps, s.t_min, s.t_max, device)
    scale = row.temperature
    return base if scale <= 0.0 or scale == 1.0 else base * scale


def block_done(row: RowState, argmax: torch.Tensor, mean_entropy: float) -> tuple[bool, list[torch.Tensor]]:
    """(whether the block is done after this step, the new argmax history).

    Done when the argmax canvas (C,) equals each of the last `stability_threshold` ones
    (vacuously with threshold 0) and the mean entropy is below `confidence_threshold`, or
    when this was the block's last allowed step.
    """
    threshold = row.settings.stability_threshold
    stable = len(row.history) >= threshold and all(torch.equal(h, argmax) for h in row.history)
    confident = mean_entropy < row.settings.confidence_threshold
    history = [*row.history, argmax][-threshold:] if threshold else []
    last_step = row.steps_done + 1 >= row.settings.max_denoising_steps
    return (stable and confident) or last_step, history


def denoise_step(
    logits: torch.Tensor, rows: list[RowState], noise: NoiseSource, self_cond_dtype: torch.dtype
) -> StepResult:
    """The step after a decoder forward: logits (B, C, V) float32, one RowState per row.

    `logits` is divided in place by the temperatures (a (B, C, V) copy saved) and is the
    self-conditioning output when `self_cond_dtype` is float32.
    """
    batch, canvas_len, vocab = logits.shape
    device = logits.device
    temperatures = torch.stack([step_temperature(row, device) for row in rows])
    z = logits.div_(temperatures.view(batch, 1, 1))
    bounds = torch.tensor([[row.settings.entropy_bound] for row in rows], device=device)
    keys = [NoiseKey(row.seed, row.block, row.remaining) for row in rows]
    draw = noise.draw(z, keys, [row.greedy for row in rows], bounds)
    replacement = noise.renoise(keys, canvas_len, vocab, device)
    canvas = torch.where(draw.accepted, draw.sample, replacement)
    mean_entropy = draw.entropy.mean(dim=-1).tolist()
    done, history = [], []
    for b, row in enumerate(rows):
        row_done, row_history = block_done(row, draw.argmax[b], mean_entropy[b])
        done.append(row_done)
        history.append(row_history)
    return StepResult(canvas, draw.accepted, draw.argmax, z.to(self_cond_dtype), done, history)
