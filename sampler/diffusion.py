"""Block-diffusion sampler for DiffusionGemma checkpoints (`DiffusionGemmaForBlockDiffusion`).

It re-implements transformers' `DiffusionGemmaGenerationMixin.generate` loop per row, so
that rows of concurrent requests share one decoder forward per step:

- The encoder (causal) writes each row's own KV cache: the prompt, then every committed
  block. Each row keeps a batch-1 `DynamicCache`, so what a row has cached never depends
  on the other rows (no padding inside the cache, positions count real tokens only).
- The decoder (bidirectional over the canvas, reads the cache, never writes it) runs once
  per `step()` for all active rows: the rows' caches are stacked left-padded into one
  read-only view with a boolean attention mask (right padding would be wrong).
- Rows are not aligned: each carries its own block index and step counter. A new request
  starts its first block at the next `step()`; a row that commits a block runs its encoder
  pass on that block at the next `step()` and keeps denoising alongside the others.

One denoising step of a row, at remaining-step s = N..1 (N = max_denoising_steps):
  z = decoder logits / temperature(s), temperature(s) = t_min + (t_max - t_min) * s / N
  per position: a sample from softmax(z), the entropy of softmax(z), argmax(z)
  accept the lowest-entropy positions whose cumulative entropy minus the largest stays
  within entropy_bound (at least one); they keep their sample, the rest get random tokens
  z becomes the self-conditioning input of the next step
  the block is done when its argmax canvas equals the previous `stability_threshold`
  steps' and its mean entropy is below `confidence_threshold`, or after N steps.
The argmax canvas is committed, cut at the first stop token and at max_tokens.

Randomness: by default ("keyed") every draw comes from a generator keyed by (request seed,
block, step, purpose), so a seeded request gives the same tokens alone or batched. "global"
draws from the global torch RNG in the reference's call order; with one active row it
reproduces `generate` token for token (the parity tests use it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from sampler.sequence import check_prompt, resolve_seed
from sampler.diffusion_math import (
    NOISE_CANVAS,
    NOISE_RENOISE,
    NOISE_SAMPLE,
    entropy_bound_accept,
    gumbel_max,
    gumbel_max_entropy,
    keyed_generator,
    reference_sample_entropy,
    schedule_temperature,
)
from sampler.diffusion_settings import DiffusionSettings
from sampler.types import FinishReason, SamplingParams, StepEvent

NoiseMode = Literal["keyed", "global"]

@dataclass
class _Row:
    """One request. Invariant: `cache` holds exactly `encoded` tokens (prompt + committed)."""

    seq_id: str
    params: SamplingParams
    settings: DiffusionSettings
    seed: int
    cache: Any
    pending: list[int]  # tokens to encode before the next decoder step
    encoded: int = 0
    generated: list[int] = field(default_factory=list)
    block: int = -1  # index of the block being denoised; -1 before the prompt is encoded
    steps_done: int = 0  # denoising steps done in the current block
    canvas: torch.Tensor | None = None  # (C,) long: the decoder's input (accepted + noise)
    argmax: torch.Tensor | None = None  # (C,) long: argmax canvas of the latest step
    self_cond: torch.Tensor | None = None  # (C, V) tempered logits of the previous step
    history: list[torch.Tensor] = field(default_factory=list)  # last argmax canvases, oldest first


class _CacheView:
    """Read-only stacked KV for one decoder forward: what `append_to_cache` reads.

    The decoder only concatenates `layers[i].keys/values` with the canvas K/V and never
    writes, so a plain holder of (B, H, L, D) tensors is enough.
    """

    is_compileable = False

    def __init__(self, layers: list[Any]) -> None:
        self.layers = layers


@dataclass
class _KV:
    keys: torch.Tensor
    values: torch.Tensor


def _left_pad(x: torch.Tensor, length: int) -> torch.Tensor:
    """(1, H, n, D) → (1, H, length, D) with zeros on the left (length >= n)."""
    missing = length - x.shape[-2]
    if missing == 0:
        return x
    return torch.cat([x.new_zeros(x.shape[0], x.shape[1], missing, x.shape[3]), x], dim=-2)


class DiffusionSampler:
    """BatchSampler for DiffusionGemma: one batched decoder forward per `step()`."""

    name = "diffusion"

    def __init__(self, model: torch.nn.Module, device: torch.device, generation_config: Any = None, *,
                 max_denoising_steps: int | None = None, entropy_bound: float | None = None,
                 t_min: float | None = None, t_max: float | None = None,
                 stability_threshold: int | None = None, confidence_threshold: float | None = None,
                 noise: NoiseMode = "keyed", batch_invariant: bool = False, max_batch_rows: int | None = None,
                 profile: bool = False) -> None:
        """`generation_config` None: the model's own. Keyword defaults override it (config
        key `diffusion`); a request's extension fields override those.

        batch_invariant: one decoder forward per row. A batched forward's logits differ from
        a batch-1 forward's in the last float bits (GEMM blocking and threading, MoE token
        grouping, padded attention), and the self-conditioning loop amplifies such
        differences until a sampling decision flips; per-row forwards make a seeded
        request's output bitwise independent of the other requests, at the cost of batching.
        max_batch_rows: most rows per decoder forward (None: all active rows); more rows are
        split into several forwards per step, each row still advances one step per step().
        profile: synchronise the device around each phase so `stats` times are exact.
        """
        if noise not in ("keyed", "global"):
            raise ValueError(f"noise must be 'keyed' or 'global', got {noise!r}")
        if max_batch_rows is not None and max_batch_rows < 1:
            raise ValueError(f"max_batch_rows must be >= 1, got {max_batch_rows}")
        self.model = model
        self.device = torch.device(device)
        config = model.config
        self.canvas_length = int(config.canvas_length)
        self.vocab_size = int(config.get_text_config().vocab_size)
        self._text_config = config.get_text_config(decoder=True)
        self._layer_types = list(self._text_config.layer_types)
        self._embed_dtype = model.model.decoder.embed_tokens.weight.dtype
        self.defaults = DiffusionSettings.from_generation_config(
            generation_config if generation_config is not None else getattr(model, "generation_config", None)
        ).override(max_denoising_steps=max_denoising_steps, entropy_bound=entropy_bound, t_min=t_min,
                   t_max=t_max, stability_threshold=stability_threshold,
                   confidence_threshold=confidence_threshold)
        self.noise = noise
        self.max_batch_rows = 1 if batch_invariant else max_batch_rows
        self.profile = profile
        self._rows: dict[str, _Row] = {}
        # Stacked caches of the last step, by group composition: rebuilt only when a row
        # joins, leaves or encodes a block (the decoder never changes a cache).
        self._views: dict[tuple[tuple[str, int], ...], tuple[_CacheView, dict[str, torch.Tensor] | None]] = {}
        self._last_self_cond: dict[tuple[str, ...], torch.Tensor] = {}
        # Seconds per phase and counts, for the benchmark and metrics.
        self.stats: dict[str, float] = {"encoder_s": 0.0, "decoder_s": 0.0, "sampling_s": 0.0,
                                        "encoder_passes": 0, "decoder_passes": 0, "row_steps": 0}

    # ----------------------------------------------------------------- BatchSampler API
    @property
    def num_active(self) -> int:
        return len(self._rows)

    def add(self, seq_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        """Queue a request; its prompt is encoded and its first block starts next step()."""
        check_prompt(prompt_ids)
        if params.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if seq_id in self._rows:
            raise ValueError(f"sequence {seq_id!r} is already active")
        settings = self.settings_for(params)
        # Greedy without a seed still needs canvas noise; seed 0 keeps greedy repeatable.
        seed = (params.seed if params.seed is not None else 0) if params.greedy else resolve_seed(params)
        from transformers import DynamicCache

        self._rows[seq_id] = _Row(seq_id, params, settings, seed, DynamicCache(config=self._text_config),
                                  pending=list(prompt_ids))

    def cancel(self, seq_id: str) -> None:
        self._rows.pop(seq_id, None)

    def settings_for(self, params: SamplingParams) -> DiffusionSettings:
        """The schedule a request runs with: defaults overridden by its extension fields."""
        return self.defaults.override(max_denoising_steps=params.steps, entropy_bound=params.entropy_bound,
                                      t_min=params.t_min, t_max=params.t_max,
                                      stability_threshold=params.stability_threshold,
                                      confidence_threshold=params.confidence_threshold)

    @torch.inference_mode()
    def step(self) -> dict[str, StepEvent]:
        """One denoising step for every active row (plus encoder passes where due)."""
        rows = list(self._rows.values())
        if not rows:
            return {}
        forwards = dict.fromkeys(self._rows, 0)
        started = self._clock()
        for row in rows:
            if row.pending:
                self._encode(row)
                forwards[row.seq_id] += 1
        self.stats["encoder_s"] += self._clock() - started

        events: dict[str, StepEvent] = {}
        size = self.max_batch_rows or len(rows)
        used_views: set[tuple[tuple[str, int], ...]] = set()
        used_self_cond: set[tuple[str, ...]] = set()
        for lo in range(0, len(rows), size):
            group = rows[lo:lo + size]
            done = self._denoise(group, used_views, used_self_cond)
            for row, finished_block in zip(group, done):
                forwards[row.seq_id] += 1
                events[row.seq_id] = self._event(row, finished_block, forwards[row.seq_id])
        # Drop stacked caches and self-conditioning batches no group used this step.
        self._views = {k: v for k, v in self._views.items() if k in used_views}
        self._last_self_cond = {k: v for k, v in self._last_self_cond.items() if k in used_self_cond}
        return events

    # ----------------------------------------------------------------- internals
    def _clock(self) -> float:
        if self.profile and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _encode(self, row: _Row) -> None:
        """Encoder pass over `row.pending` into the row's cache, then start a new block.

        Inputs are built as `generate` builds them for one unpadded row (int32 positions,
        the encoder's own mask helper), so the cache is bitwise the reference's.
        """
        model, n = self.model, len(row.pending)
        ids = torch.tensor([row.pending], dtype=torch.long, device=self.device)
        positions = torch.arange(row.encoded, row.encoded + n, dtype=torch.int32, device=self.device)[None]
        attention = torch.ones((1, row.encoded + n), dtype=torch.bool, device=self.device)
        dummy = torch.empty((1, n, 0), dtype=model.dtype, device=self.device)
        masks = model.model.encoder.create_masks_for_generate(
            config=model.config, inputs_embeds=dummy, attention_mask=attention, cache=row.cache,
            position_ids=positions, mm_token_type_ids=None)
        model.model.encoder(input_ids=ids, attention_mask=masks, cache=row.cache, position_ids=positions)
        self.stats["encoder_passes"] += 1
        row.encoded += n
        row.pending = []
        row.block += 1
        row.steps_done = 0
        row.self_cond = None
        row.history = []
        row.argmax = None
        if self.noise == "global":
            canvas = torch.randint(0, self.vocab_size, (1, self.canvas_length), device=self.device)[0]
        else:
            gen = keyed_generator(row.seed, row.block, 0, NOISE_CANVAS, self.device)
            canvas = torch.randint(0, self.vocab_size, (self.canvas_length,), generator=gen, device=self.device)
        row.canvas = canvas

    def _stacked_cache(self, group: list[_Row], used: set) -> tuple[_CacheView, dict[str, torch.Tensor] | None]:
        """Rows' caches as one left-padded (B, H, L, D) view per layer, plus decoder masks.

        Masks are None when no row needs padding (the reference's own unpadded path);
        otherwise a boolean (B, 1, C, L + C) per layer type: a row sees its own cached
        columns (the last n_b of L) and the whole canvas.
        """
        key = tuple((row.seq_id, row.encoded) for row in group)
        used.add(key)
        if key in self._views:
            return self._views[key]
        layers, lengths = [], {}
        for i, layer_type in enumerate(self._layer_types):
            per_row = [row.cache.layers[i] for row in group]
            sizes = [layer.keys.shape[-2] for layer in per_row]
            longest = max(sizes)
            lengths.setdefault(layer_type, (sizes, longest))
            if len(group) == 1:
                layers.append(_KV(per_row[0].keys, per_row[0].values))
            else:
                layers.append(_KV(torch.cat([_left_pad(x.keys, longest) for x in per_row]),
                                  torch.cat([_left_pad(x.values, longest) for x in per_row])))
        masks: dict[str, torch.Tensor] | None = None
        if any(min(sizes) != longest for sizes, longest in lengths.values()):
            masks = {}
            canvas = self.canvas_length
            for layer_type, (sizes, longest) in lengths.items():
                columns = torch.arange(longest + canvas, device=self.device)
                first_real = torch.tensor([longest - n for n in sizes], device=self.device)
                visible = columns[None, :] >= first_real[:, None]  # (B, L + C)
                masks[layer_type] = visible[:, None, None, :].expand(len(group), 1, canvas, longest + canvas)
        self._views[key] = (_CacheView(layers), masks)
        return self._views[key]

    def _self_conditioning(self, group: list[_Row]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(B, C, V) previous-step logits and a (B,) mask of rows that have them.

        All rows at a block's first step: (None, None), the reference's first step. Rows
        without logits get zeros and mask False: the decoder then zeroes their signal,
        bitwise as if no logits were passed.
        """
        have = [row.self_cond is not None for row in group]
        if not any(have):
            return None, None
        key = tuple(row.seq_id for row in group)
        previous = self._last_self_cond.get(key)
        if all(have) and previous is not None and all(
                row.self_cond is not None and row.self_cond.data_ptr() == previous[b].data_ptr()
                for b, row in enumerate(group)):
            return previous, None  # same rows, same order: reuse last step's batch, no copy
        template = next(row.self_cond for row in group if row.self_cond is not None)
        stacked = torch.stack([row.self_cond if row.self_cond is not None else torch.zeros_like(template)
                               for row in group])
        mask = None if all(have) else torch.tensor(have, device=self.device)
        return stacked, mask

    def _temperature(self, row: _Row, step: int) -> torch.Tensor:
        """0-d float32 temperature of this row's step; request temperature scales the schedule.

        temperature 1 (OpenAI's default) is the checkpoint's schedule bit for bit; temperature
        0 (greedy) keeps the unscaled schedule for the entropies and takes argmax samples.
        """
        s = row.settings
        base = schedule_temperature(step, s.max_denoising_steps, s.t_min, s.t_max, self.device)
        scale = row.params.temperature
        return base if scale <= 0.0 or scale == 1.0 else base * scale

    def _position_noise(self, row: _Row, step: int) -> Callable[[int], torch.Generator]:
        return lambda position: keyed_generator(row.seed, row.block, step, NOISE_SAMPLE, self.device, position)

    def _denoise(self, group: list[_Row], used_views: set, used_self_cond: set) -> list[bool]:
        """One decoder forward for `group` and each row's accept / renoise / stop decision.

        Returns, per row, whether its block is done (stable and confident, or N steps).
        """
        started = self._clock()
        batch, canvas_len = len(group), self.canvas_length
        steps = [row.settings.max_denoising_steps - row.steps_done for row in group]  # s = N..1
        view, masks = self._stacked_cache(group, used_views)
        self_cond, self_cond_mask = self._self_conditioning(group)
        canvas = torch.stack([row.canvas for row in group])  # (B, C)
        offsets = torch.tensor([row.encoded for row in group], dtype=torch.int32, device=self.device)
        positions = offsets[:, None] + torch.arange(canvas_len, dtype=torch.int32, device=self.device)[None]
        logits = self.model(decoder_input_ids=canvas, cache=view, self_conditioning_logits=self_cond,
                            self_conditioning_mask=self_cond_mask, decoder_attention_mask=masks,
                            decoder_position_ids=positions).logits  # (B, C, V) float32, soft-capped
        self.stats["decoder_passes"] += 1
        mid = self._clock()
        self.stats["decoder_s"] += mid - started

        temperatures = torch.stack([self._temperature(row, s) for row, s in zip(group, steps)])
        z = logits.div_(temperatures.view(batch, 1, 1))  # in place: the (B, C, V) logits die here
        bounds = torch.tensor([[row.settings.entropy_bound] for row in group], device=self.device)
        if self.noise == "global":
            sample, argmax, entropy = reference_sample_entropy(z)
            accepted = entropy_bound_accept(entropy, bounds)
        else:
            # Acceptance needs only the entropies, and rejected positions are re-noised, so
            # Gumbel noise is drawn for accepted positions only (keyed per position: the
            # same tokens as drawing everywhere, at a fraction of the cost).
            _, flat_argmax, flat_entropy = gumbel_max_entropy(z.view(-1, self.vocab_size), None)
            argmax, entropy = flat_argmax.view(batch, canvas_len), flat_entropy.view(batch, canvas_len)
            accepted = entropy_bound_accept(entropy, bounds)
            sample = argmax.clone()
            for b, (row, s) in enumerate(zip(group, steps)):
                if not row.params.greedy:
                    positions = accepted[b].nonzero().view(-1).tolist()
                    sample[b, positions] = gumbel_max(z[b], positions, self._position_noise(row, s))
        if self.noise == "global":
            noise = torch.cat([torch.randint(0, self.vocab_size, (1, canvas_len), device=self.device)
                               for _ in group])
        else:
            noise = torch.stack([torch.randint(
                0, self.vocab_size, (canvas_len,), device=self.device,
                generator=keyed_generator(row.seed, row.block, s, NOISE_RENOISE, self.device))
                for row, s in zip(group, steps)])
        new_canvas = torch.where(accepted, sample, noise)
        mean_entropy = entropy.mean(dim=-1).tolist()
        self_cond_next = z.to(self._embed_dtype)
        self._last_self_cond[tuple(row.seq_id for row in group)] = self_cond_next
        used_self_cond.add(tuple(row.seq_id for row in group))

        done = []
        for b, row in enumerate(group):
            threshold = row.settings.stability_threshold
            stable = len(row.history) >= threshold and all(torch.equal(h, argmax[b]) for h in row.history)
            confident = mean_entropy[b] < row.settings.confidence_threshold
            if threshold:
                row.history = (row.history + [argmax[b]])[-threshold:]
            row.canvas, row.argmax, row.self_cond = new_canvas[b], argmax[b], self_cond_next[b]
            row.steps_done += 1
            done.append((stable and confident) or row.steps_done >= row.settings.max_denoising_steps)
        self.stats["row_steps"] += batch
        self.stats["sampling_s"] += self._clock() - mid
        return done

    def _trim(self, row: _Row, tokens: list[int]) -> tuple[list[int], FinishReason | None]:
        """Tokens of a canvas that would be emitted: cut at the first stop token (which is
        not emitted) and at the max_tokens budget; and the finish reason they imply."""
        stops = row.params.stop_token_ids
        cut = next((i for i, t in enumerate(tokens) if t in stops), None)
        kept = tokens if cut is None else tokens[:cut]
        budget = row.params.max_tokens - len(row.generated)
        if len(kept) >= budget:  # as in AR decoding: the budget runs out before a later stop token
            return kept[:budget], "length"
        return kept, None if cut is None else "stop"

    def _event(self, row: _Row, finished_block: bool, forwards: int) -> StepEvent:
        assert row.argmax is not None
        event = StepEvent(forward_passes=forwards)
        if not (finished_block or row.params.stream_refinements):
            return event  # nothing to read back from the device this step
        canvas = row.argmax.tolist()
        if row.params.stream_refinements:
            event.draft_ids, _ = self._trim(row, canvas)
            event.refinement_step = row.steps_done
        if not finished_block:
            return event
        tokens, reason = self._trim(row, canvas)
        row.generated.extend(tokens)
        event.token_ids = tokens
        event.finish_reason = reason
        event.denoising_steps = row.steps_done
        if reason is not None:
            del self._rows[row.seq_id]
        else:
            row.pending = canvas  # the whole argmax canvas is context for the next block
            row.canvas = row.self_cond = row.argmax = None
            row.history = []
        return event
