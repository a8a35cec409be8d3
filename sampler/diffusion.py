"""Block-diffusion sampler for DiffusionGemma checkpoints (`DiffusionGemmaForBlockDiffusion`):
transformers' `generate` loop per row, with the rows of concurrent requests sharing one decoder
forward per step. Design, step formulas and randomness: docs/diffusion.md ("Code layout").
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from sampler.diffusion_noise import NoiseKey, noise_source
from sampler.diffusion_settings import DiffusionSettings
from sampler.diffusion_step import RowState, StepResult, denoise_step
from sampler.logprobs import log_softmax, pick
from sampler.runtime.stacked_cache import StackedCache, stack_caches
from sampler.sequence import check_prompt, resolve_seed
from sampler.types import FinishReason, SamplingParams, StepEvent, TokenLogprob


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
    # Requests with logprobs: the committed canvas's scores, from the step that committed it.
    scores: list[TokenLogprob] = field(default_factory=list)

    def state(self) -> RowState:
        return RowState(self.settings, self.params.temperature, self.seed, self.block, self.steps_done, self.history)

    def start_block(self) -> None:
        """Move to the next block; the caller draws its initial canvas."""
        self.block += 1
        self.steps_done = 0
        self.end_block()

    def end_block(self) -> None:
        """Drop the finished block's tensors (self_cond is (C, V): large)."""
        self.canvas = self.argmax = self.self_cond = None
        self.history = []

    def decoder_input(self) -> torch.Tensor:
        assert self.canvas is not None, "a block starts with a canvas"
        return self.canvas

    def advance(self, result: StepResult, b: int) -> None:
        """Take row b of a step's result."""
        self.canvas, self.argmax, self.self_cond = result.canvas[b], result.argmax[b], result.self_cond[b]
        self.history = result.history[b]
        self.steps_done += 1


class DiffusionSampler:
    """BatchSampler for DiffusionGemma: one batched decoder forward per `step()`."""

    name = "diffusion"

    def __init__(
        self,
        model: Any,
        device: torch.device,
        generation_config: Any = None,
        *,
        max_denoising_steps: int | None = None,
        entropy_bound: float | None = None,
        t_min: float | None = None,
        t_max: float | None = None,
        stability_threshold: int | None = None,
        confidence_threshold: float | None = None,
        noise: str = "keyed",
        batch_invariant: bool = False,
        max_batch_rows: int | None = None,
        profile: bool = False,
    ) -> None:
        """`model`: a DiffusionGemmaForBlockDiffusion (Any: read untyped). `generation_config`
        None: the model's own; the keyword defaults (config key `diffusion`, docs/diffusion.md)
        override it, and a request's extension fields override those.

        batch_invariant: one decoder forward per row, so that a seeded request's output ignores
        the other rows bit for bit (a batched forward rounds differently). max_batch_rows: most
        rows per decoder forward (None: all). noise: "keyed" or "global" (parity checks only).
        profile: synchronise the device around each phase so `stats` times are exact.
        """
        self.noise = noise_source(noise)
        if max_batch_rows is not None and max_batch_rows < 1:
            raise ValueError(f"max_batch_rows must be >= 1, got {max_batch_rows}")
        self.model = model
        self.device = torch.device(device)
        config = model.config
        self.canvas_length = int(config.canvas_length)
        self.vocab_size = int(config.get_text_config().vocab_size)
        self._text_config = config.get_text_config(decoder=True)
        self._layer_types = list(self._text_config.layer_types)
        self._embed_dtype: torch.dtype = model.model.decoder.embed_tokens.weight.dtype
        self.defaults = DiffusionSettings.from_generation_config(
            generation_config if generation_config is not None else getattr(model, "generation_config", None)
        ).override(
            max_denoising_steps=max_denoising_steps,
            entropy_bound=entropy_bound,
            t_min=t_min,
            t_max=t_max,
            stability_threshold=stability_threshold,
            confidence_threshold=confidence_threshold,
        )
        self.max_batch_rows = 1 if batch_invariant else max_batch_rows
        self.profile = profile
        self._rows: dict[str, _Row] = {}
        # Stacked caches of the last step, by group composition: rebuilt only when a row
        # joins, leaves or encodes a block (the decoder never changes a cache).
        self._views: dict[tuple[tuple[str, int], ...], StackedCache] = {}
        self._last_self_cond: dict[tuple[str, ...], torch.Tensor] = {}
        # Seconds per phase and counts, for the benchmark and metrics.
        self.stats: dict[str, float] = dict.fromkeys(("encoder_s", "decoder_s", "sampling_s"), 0.0)
        self.stats.update(dict.fromkeys(("encoder_passes", "decoder_passes", "row_steps"), 0))

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

        self._rows[seq_id] = _Row(
            seq_id, params, settings, seed, DynamicCache(config=self._text_config), pending=list(prompt_ids)
        )

    def cancel(self, seq_id: str) -> None:
        self._rows.pop(seq_id, None)

    def settings_for(self, params: SamplingParams) -> DiffusionSettings:
        """The schedule a request runs with: defaults overridden by its extension fields."""
        return self.defaults.override(**dataclasses.asdict(params.diffusion))

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
            group = rows[lo : lo + size]
            done = self._denoise(group, used_views, used_self_cond)
            for row, finished_block in zip(group, done, strict=True):
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
            config=model.config,
            inputs_embeds=dummy,
            attention_mask=attention,
            cache=row.cache,
            position_ids=positions,
            mm_token_type_ids=None,
        )
        model.model.encoder(input_ids=ids, attention_mask=masks, cache=row.cache, position_ids=positions)
        self.stats["encoder_passes"] += 1
        row.encoded += n
        row.pending = []
        row.start_block()
        row.canvas = self.noise.initial_canvas(
            NoiseKey(row.seed, row.block, 0), self.canvas_length, self.vocab_size, self.device
        )

    def _stacked_cache(self, group: list[_Row], used: set) -> StackedCache:
        """The group's caches stacked for one decoder forward, reused while no row joins,
        leaves or encodes a block (the decoder never changes a cache)."""
        key = tuple((row.seq_id, row.encoded) for row in group)
        used.add(key)
        if key not in self._views:
            self._views[key] = stack_caches(
                [row.cache for row in group], self._layer_types, self.canvas_length, self.device
            )
        return self._views[key]

    def _self_conditioning(self, group: list[_Row]) -> dict[str, torch.Tensor | None]:
        """The decoder's self-conditioning inputs: (B, C, V) previous-step logits and a (B,)
        mask of rows that have them.

        All rows at a block's first step: both None, the reference's first step. Rows
        without logits get zeros and mask False: the decoder then zeroes their signal,
        bitwise as if no logits were passed.
        """
        have = [row.self_cond is not None for row in group]
        if not any(have):
            return {"self_conditioning_logits": None, "self_conditioning_mask": None}
        previous = self._last_self_cond.get(tuple(row.seq_id for row in group))
        if previous is not None and all(
            row.self_cond is not None and row.self_cond.data_ptr() == previous[b].data_ptr()
            for b, row in enumerate(group)
        ):  # same rows, same order: reuse last step's batch, no copy
            return {"self_conditioning_logits": previous, "self_conditioning_mask": None}
        template = next(row.self_cond for row in group if row.self_cond is not None)
        stacked = torch.stack(
            [row.self_cond if row.self_cond is not None else torch.zeros_like(template) for row in group]
        )
        mask = None if all(have) else torch.tensor(have, device=self.device)
        return {"self_conditioning_logits": stacked, "self_conditioning_mask": mask}

    def _decoder_logits(self, group: list[_Row], used_views: set) -> torch.Tensor:
        """One decoder forward over the group's canvases: (B, C, V) float32 soft-capped logits."""
        canvas_len = self.canvas_length
        view, masks = self._stacked_cache(group, used_views)
        canvas = torch.stack([row.decoder_input() for row in group])  # (B, C)
        offsets = torch.tensor([row.encoded for row in group], dtype=torch.int32, device=self.device)
        positions = offsets[:, None] + torch.arange(canvas_len, dtype=torch.int32, device=self.device)[None]
        logits = self.model(
            decoder_input_ids=canvas,
            cache=view,
            decoder_attention_mask=masks,
            decoder_position_ids=positions,
            **self._self_conditioning(group),
        ).logits
        self.stats["decoder_passes"] += 1
        return logits

    def _denoise(self, group: list[_Row], used_views: set, used_self_cond: set) -> list[bool]:
        """One decoder forward for `group`, then the denoising step of each row.

        Returns, per row, whether its block is done (stable and confident, or N steps).
        """
        started = self._clock()
        logits = self._decoder_logits(group, used_views)
        mid = self._clock()
        self.stats["decoder_s"] += mid - started
        # denoise_step tempers the logits in place: take the raw distribution first (C, V) per
        # row that asked. Any step may be the block's last, so every step of such a row pays.
        raw = {b: log_softmax(logits[b]) for b, row in enumerate(group) if row.params.logprobs is not None}
        result = denoise_step(logits, [row.state() for row in group], self.noise, self._embed_dtype)
        for b, lsm in raw.items():
            if result.done[b]:  # the committed tokens are this step's argmax canvas
                group[b].scores = pick(lsm, result.argmax[b].tolist(), group[b].params.logprobs or 0)
        key = tuple(row.seq_id for row in group)
        self._last_self_cond[key] = result.self_cond
        used_self_cond.add(key)
        for b, row in enumerate(group):
            row.advance(result, b)
        self.stats["row_steps"] += len(group)
        self.stats["sampling_s"] += self._clock() - mid
        return result.done

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
        if row.params.logprobs is not None:
            event.logprobs, row.scores = row.scores[: len(tokens)], []
        event.finish_reason = reason
        event.denoising_steps = row.steps_done
        if reason is not None:
            del self._rows[row.seq_id]
        else:
            row.pending = canvas  # the whole argmax canvas is context for the next block
            row.end_block()
        return event
