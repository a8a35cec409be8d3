"""The autoregressive baseline: prefill, then one token per forward for every sequence.

Every speed claim of the other samplers is a ratio against this sampler on the same weights
in the same run, so it is kept plain and fast: all running sequences decode together in ONE
batched forward per step over a shared left-padded KV cache (sampler/runtime/kv_batch.py).
Newcomers prefill after the step's decode within a token budget (`max_prefill_tokens`): the
fresh prompts that fit prefill together in one left-padded forward, a longer prompt in chunks
over several steps, so arrivals never stall the running sequences for long. Prompts that start
like an earlier one resume from its KV (sampler/runtime/prefix_cache.py). Why, and the
measurements behind the defaults: docs/load.md ("Prefill under load", "Prefix cache").
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from sampler.constrained import Matcher
from sampler.logits import gumbel_noise, sample_tokens, softcap
from sampler.logprobs import prompt_logprobs, token_logprobs
from sampler.runtime.certified_head import certified_head, draw_alone_decides
from sampler.runtime.kv_batch import KVBatch
from sampler.runtime.packed_prefill import last_rows, packed_masks, packed_positions, packing_layout, unpack_cache
from sampler.runtime.prefix_cache import PrefixCache, PrefixCacheStats, cache_from_blocks, new_cache, row_block
from sampler.sequence import check_prompt, commit_token, resolve_seed
from sampler.types import Handover, SamplingParams, StepEvent, TokenLogprob


@dataclass
class _Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    generated: list[int] = field(default_factory=list)
    # A prefill in progress: a batch-1 cache holding the first `filled` prompt tokens (resumed
    # from the prefix cache, or the earlier chunks of a prompt longer than a step's budget).
    cache: Any = None
    filled: int = 0
    forwards: int = 0  # prefill forwards so far, reported with the first token
    waited: int = 0  # steps that ended with this prompt still not (wholly) prefilled
    joined: bool = False  # in the decode batch
    # echo: logprobs of prompt tokens 1.. (token 0 has no context), filled chunk by chunk.
    prompt_scores: list[TokenLogprob] = field(default_factory=list)
    matcher: Matcher | None = None  # response_format: the grammar's state, else None

    @property
    def next_position(self) -> int:
        return len(self.prompt_ids) + len(self.generated)


def sample_rows(logits: torch.Tensor, seqs: list[_Sequence]) -> list[int]:
    """One token per row of (B, V) `logits`, each with its own sequence's parameters (a
    grammar's mask applied to a copy: the raw rows stay for logprobs)."""
    constrained = [i for i, s in enumerate(seqs) if s.matcher is not None]
    if constrained:
        logits = logits.clone()
        for i in constrained:
            matcher = seqs[i].matcher
            assert matcher is not None
            matcher.mask_(logits[i : i + 1])
    tokens = [0] * len(seqs)
    greedy = [i for i, s in enumerate(seqs) if s.params.greedy]
    if greedy:
        # Indexing copies (B, V) logits (10 ms for 16 rows of Gemma's 262144): skip it when all are greedy.
        picked = (logits if len(greedy) == len(seqs) else logits[greedy]).argmax(dim=-1).tolist()
        for i, token in zip(greedy, picked, strict=True):
            tokens[i] = token
    for i, seq in enumerate(seqs):
        if not seq.params.greedy:
            p = seq.params
            tokens[i] = int(
                sample_tokens(
                    logits[i : i + 1],
                    [seq.next_position],
                    temperature=p.temperature,
                    top_k=p.top_k,
                    top_p=p.top_p,
                    seed=seq.seed,
                )[0]
            )
    return tokens


def _certifiable(seq: _Sequence) -> bool:
    """The draw alone decides this row's step: no logprobs, grammar mask, top-k or top-p, so the
    certified head can draw it without full logits (sampler/runtime/certified_head.py)."""
    p = seq.params
    return p.logprobs is None and seq.matcher is None and draw_alone_decides(p)


def _draw_temperature(seq: _Sequence) -> float:
    return 0.0 if seq.params.greedy else seq.params.temperature


# A JSON document must close within max_tokens: with this many tokens or fewer left, every step
# asks how many a closing needs (sampler/constrained.py `Matcher.closing`), and commits the
# closing once fewer than _CLOSE_MARGIN free tokens would remain beside it (one more free token
# can lengthen a closing by a few: a new string, array or object to end).
_CLOSE_WINDOW = 64
_CLOSE_MARGIN = 3


def _close_if_due(seq: _Sequence, event: StepEvent) -> None:
    """Close a JSON sequence's document now if the budget left barely holds its closing: the
    closing's tokens join this event (no forward: the sequence ends) and it finishes with
    "length". Not with logprobs (a closing token has no distribution of its own)."""
    assert seq.matcher is not None
    left = seq.params.max_tokens - len(seq.generated)
    if seq.params.logprobs is not None or not 0 < left <= _CLOSE_WINDOW:
        return
    closing = seq.matcher.closing(left)
    if closing is None or len(closing) < left - _CLOSE_MARGIN:
        return
    for token in closing:
        seq.matcher.advance(token)
    seq.generated += closing
    event.token_ids = [*event.token_ids, *closing]
    event.finish_reason = "length"


# Prompt tokens prefilled per step and the prefix cache's budget; docs/load.md says why.
DEFAULT_MAX_PREFILL_TOKENS = 512
DEFAULT_PREFIX_CACHE_MB = 512.0
DEFAULT_MAX_PREFILL_S = 0.25
# The budget never drops below this (a forward's fixed cost would dominate), and only forwards
# of at least this many tokens measure the prefill rate (smaller ones are mostly fixed cost).
_MIN_PREFILL_BUDGET = 64
_RATE_DECAY = 0.3  # weight of the newest measurement in the prefill rate's moving average
# Prefills go shortest-first (a burst's median first token comes after the short half, not after
# everything); a prompt still waiting after this many steps goes first, so none is starved.
_MAX_WAIT_STEPS = 4


def _aged(seq: _Sequence) -> bool:
    return seq.waited >= _MAX_WAIT_STEPS


class ARSampler:
    """One token per forward per sequence; all running sequences share each forward."""

    name = "ar"

    def __init__(
        self,
        model: torch.nn.Module,
        device: torch.device,
        *,
        max_prefill_tokens: int = DEFAULT_MAX_PREFILL_TOKENS,
        max_prefill_s: float | None = DEFAULT_MAX_PREFILL_S,
        prefill_rate: float | None = None,
        prefix_cache_mb: float = DEFAULT_PREFIX_CACHE_MB,
        prefix_block_size: int = 16,
        prefix_cache: PrefixCache | None = None,
    ) -> None:
        """`max_prefill_tokens`: prompt tokens (padding included) prefilled per step at most.
        `max_prefill_s`: and no more than this machine prefills in about this many seconds (its
        rate measured on the sampler's own prefill forwards; None: the token budget alone), so
        a burst's first tokens arrive chunk by chunk and running sequences wait at most that
        long per step (docs/load.md, "Prefill under load"). `prefill_rate`: the rate to start
        from (prompt tokens per second, measured at load); None: the token budget until measured.
        `prefix_cache_mb`: the prefix cache's budget, 0 = off; it needs a transformers model
        (a config to build caches from), so scripted test models run without it.
        `prefix_cache`: one to share (the registry's, also the parallel sampler's), used instead
        of building one from `prefix_cache_mb` / `prefix_block_size`."""
        if max_prefill_tokens < 1:
            raise ValueError("max_prefill_tokens must be >= 1")
        if max_prefill_s is not None and max_prefill_s <= 0:
            raise ValueError("max_prefill_s must be > 0 or None")
        self.model = model
        self.device = device
        self.max_prefill_tokens = max_prefill_tokens
        self.max_prefill_s = max_prefill_s
        self.prefill_rate = prefill_rate  # prompt tokens per second (moving average of measurements)
        self._seqs: dict[str, _Sequence] = {}
        self._batch = KVBatch()
        self._config = getattr(model, "config", None)
        usable = prefix_cache_mb > 0 and new_cache(self._config, record=True) is not None
        if prefix_cache is None and usable:
            prefix_cache = PrefixCache(int(prefix_cache_mb * 2**20), prefix_block_size)
        self.prefix_cache = prefix_cache if usable else None
        self._packing = packing_layout(self._config)
        # Decode draws through the certified head where the model has one (float32 on a CPU
        # where it measured faster); the body is then called alone, the head only if needed.
        self._certified = certified_head(model)
        text_config = getattr(self._config, "get_text_config", lambda: self._config)()
        self._softcap = getattr(text_config, "final_logit_softcapping", None)
        self._vocab = int(getattr(text_config, "vocab_size", 0) or 0)
        body = getattr(model, "model", None)
        self._cache_kw = (
            "cache" if body is not None and "cache" in inspect.signature(body.forward).parameters else "past_key_values"
        )

    @property
    def num_active(self) -> int:
        return len(self._seqs)

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats | None:
        return None if self.prefix_cache is None else self.prefix_cache.stats

    def add(self, seq_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        self._start(seq_id, _Sequence(list(prompt_ids), params, resolve_seed(params)))

    def resume(self, seq_id: str, prompt_ids: list[int], params: SamplingParams, handover: Handover) -> None:
        """Continue a sequence another sampler began (TakesOver): its prompt and committed tokens
        prefill as one context, the noise stream is its seed's (keyed by absolute position, so a
        greedy or seeded sequence goes on exactly as it would have there) and max_tokens counts
        what it already committed. The prompt was scored, if asked, where it began."""
        if params.grammar is not None:
            raise ValueError("a grammar's state cannot be handed over")
        rest = replace(params, max_tokens=params.max_tokens - len(handover.generated), prompt_logprobs=None)
        self._start(seq_id, _Sequence(list(prompt_ids) + handover.generated, rest, handover.seed))

    def _start(self, seq_id: str, seq: _Sequence) -> None:
        check_prompt(seq.prompt_ids)
        params = seq.params
        if params.grammar is not None:
            seq.matcher = Matcher(params.grammar, params.stop_token_ids)
        # A prompt to score must run through the model whole: a cached prefix has no logits.
        if self.prefix_cache is not None and params.prompt_logprobs is None:
            blocks = self.prefix_cache.lookup(seq.prompt_ids)
            if blocks:
                seq.cache = cache_from_blocks(self._config, blocks)
                seq.filled = len(blocks) * self.prefix_cache.block_size
        self._seqs[seq_id] = seq

    def cancel(self, seq_id: str) -> None:
        seq = self._seqs.pop(seq_id, None)
        if seq is not None and seq.joined:
            self._batch.remove({seq_id})

    @torch.inference_mode()
    def _decode(self, seqs: list[_Sequence]) -> tuple[list[int], torch.Tensor | None]:
        """One forward over each batch row's newest token. Returns the drawn tokens and the
        logits (B, V) they were drawn from, or None where the certified head drew them without."""
        batch = self._batch
        last = [[seq.generated[-1]] for seq in seqs]
        positions = [[r] for r in batch.lengths]
        mask = batch.mask_for_step()
        # Without padding the model's own causal mask is the same and cheaper to build.
        inputs = {
            "input_ids": torch.tensor(last, device=self.device),
            "attention_mask": mask if batch.has_padding else None,
            "position_ids": torch.tensor(positions, device=self.device),
            "use_cache": True,
        }
        if self._certified is not None and all(_certifiable(seq) for seq in seqs):
            body: Any = self.model.model  # a transformers causal LM's decoder
            hidden = body(**inputs, **{self._cache_kw: batch.cache}).last_hidden_state[:, -1]  # (B, d)
            batch.advance(mask)
            drawn = self._draw_certified(hidden, seqs)
            if drawn is not None:
                return drawn, None
            logits = softcap(self.model.get_output_embeddings()(hidden), self._softcap)  # type: ignore[operator]
        else:
            logits = self.model(**inputs, cache=batch.cache, logits_to_keep=1).logits[:, -1]
            batch.advance(mask)
        return sample_rows(logits, seqs), logits

    def _draw_certified(self, hidden: torch.Tensor, seqs: list[_Sequence]) -> list[int] | None:
        """Each row's token through the certified head (rows of equal temperature together)."""
        assert self._certified is not None
        tokens = [0] * len(seqs)
        for temperature in sorted({_draw_temperature(seq) for seq in seqs}):
            rows = [i for i, seq in enumerate(seqs) if _draw_temperature(seq) == temperature]
            noise = None
            if temperature > 0.0:
                noise = torch.cat([gumbel_noise(seqs[i].seed, [seqs[i].next_position], self._vocab) for i in rows])
            drawn = self._certified.draw(hidden[rows], cap=self._softcap, temperature=temperature, noise=noise)
            if drawn is None:
                return None
            for i, token in zip(rows, drawn, strict=True):
                tokens[i] = token
        return tokens

    @property
    def prefill_budget(self) -> int:
        """Prompt tokens this step may prefill: `max_prefill_tokens`, or fewer where the measured
        rate says they would take longer than `max_prefill_s`."""
        if self.max_prefill_s is None or self.prefill_rate is None:
            return self.max_prefill_tokens
        timed = int(self.prefill_rate * self.max_prefill_s)
        return max(min(_MIN_PREFILL_BUDGET, self.max_prefill_tokens), min(self.max_prefill_tokens, timed))

    def _measure_prefill(self, tokens: int, seconds: float) -> None:
        if tokens < _MIN_PREFILL_BUDGET or seconds <= 0:
            return
        rate = tokens / seconds
        old = self.prefill_rate
        self.prefill_rate = rate if old is None else (1 - _RATE_DECAY) * old + _RATE_DECAY * rate

    def _plan_packed(self, waiting: list[tuple[str, _Sequence]], budget: int) -> list[tuple[str, _Sequence]]:
        """Fresh prompts (in `_prefill_order`) whose tokens together fit `budget`: one packed forward, no padding."""
        group: list[tuple[str, _Sequence]] = []
        total = 0
        for seq_id, seq in waiting:
            n = len(seq.prompt_ids)
            if seq.filled == 0 and seq.params.prompt_logprobs is None and total + n <= budget:
                group.append((seq_id, seq))
                total += n
        return group

    def _plan_group(self, waiting: list[tuple[str, _Sequence]], budget: int) -> list[tuple[str, _Sequence]]:
        """Prompts (in `_prefill_order`) whose uncached part fits `budget` whole, padding included: one forward
        of width max(uncached part) over all of them (`_prefill_group`)."""
        group: list[tuple[str, _Sequence]] = []
        width = 0
        for seq_id, seq in waiting:
            n = len(seq.prompt_ids) - seq.filled
            # Prompts to score prefill alone (`_prefill_chunk`): only they need every row's logits.
            scoring = seq.params.prompt_logprobs is not None
            # A cached prefix is reused only from a recording cache (every column of every layer).
            reusable = seq.filled == 0 or self.prefix_cache is not None
            if not scoring and reusable and (len(group) + 1) * max(width, n) <= budget:
                group.append((seq_id, seq))
                width = max(width, n)
        return group

    def _prefill_some(self) -> dict[str, torch.Tensor]:
        """Spend this step's prefill budget; the logits (V,) of each sequence whose prompt is now
        complete (it joined the batch). Padding costs what tokens cost, so it counts.

        Prompts passed over for `_MAX_WAIT_STEPS` steps chunk first; then fresh prompts pack
        into one forward without padding where the model allows it; prompts resuming a cached
        prefix share one padded forward; what is left of the budget goes to the next prompt's
        chunk (all in `_prefill_order`)."""
        waiting = self._prefill_order()
        if not waiting:
            return {}
        started = time.perf_counter()
        # The time budget keeps running sequences and other waiting prompts from waiting long;
        # a lone prompt with nothing running keeps no one waiting, and bigger chunks prefill it
        # faster (a 3000-token prompt: 7.2 s in 512-token chunks vs 11.1 s in 0.25 s ones).
        alone = len(waiting) == 1 and not self._batch.seq_ids
        budget = self.max_prefill_tokens if alone else self.prefill_budget
        done: dict[str, torch.Tensor] = {}
        spent = self._prefill_chunks([item for item in waiting if _aged(item[1])], budget, 0, done)
        fresh = [(s, q) for s, q in waiting if not q.joined]
        packed = self._plan_packed(fresh, budget - spent) if self._packing is not None else []
        if len(packed) > 1:  # a lone prompt gains nothing from packing: it needs no padding either
            done.update(self._prefill_packed(packed))
            spent += sum(len(q.prompt_ids) for _, q in packed)
        group = self._plan_group([(s, q) for s, q in waiting if not q.joined], budget - spent)
        if group:
            spent += len(group) * max(len(q.prompt_ids) - q.filled for _, q in group)
            done.update(self._prefill_group(group))
        spent = self._prefill_chunks(waiting, budget, spent, done)
        self._measure_prefill(spent, time.perf_counter() - started)
        for _, seq in waiting:
            seq.waited += not seq.joined
        return done

    def _prefill_chunks(
        self, waiting: list[tuple[str, _Sequence]], budget: int, spent: int, done: dict[str, torch.Tensor]
    ) -> int:
        """Chunks of `waiting`'s prompts, in order, on their own caches until `budget` is spent;
        completed prompts' logits go into `done`. Returns the tokens spent in all."""
        for seq_id, seq in waiting:
            if seq.joined:
                continue
            room = budget - spent
            remaining = len(seq.prompt_ids) - seq.filled
            # A forward has a fixed cost (the weights stream once): no slivers once work was done.
            if spent and (room <= 0 or room < min(remaining, budget // 4)):
                break
            n = min(remaining, room)
            logits = self._prefill_chunk(seq_id, seq, n)
            spent += n
            if logits is not None:
                done[seq_id] = logits
        return spent

    def _prefill_order(self) -> list[tuple[str, _Sequence]]:
        """Sequences still to prefill, in the order the budget serves them: the least left to
        prefill first (shortest-job-first minimises the mean wait for a first token: in a burst
        of 16 prompts, the median answers after the short half instead of after all), except
        that any still waiting after `_MAX_WAIT_STEPS` steps goes first, oldest first. Ties keep arrival
        order (the sort is stable)."""
        waiting = [(s, q) for s, q in self._seqs.items() if not q.joined]

        def priority(item: tuple[str, _Sequence]) -> tuple[int, int]:
            seq = item[1]
            return (0, -seq.waited) if _aged(seq) else (1, len(seq.prompt_ids) - seq.filled)

        return sorted(waiting, key=priority)

    @torch.inference_mode()
    def _prefill_packed(self, group: list[tuple[str, _Sequence]]) -> dict[str, torch.Tensor]:
        """One forward over fresh prompts end to end in one row (sampler/runtime/packed_prefill.py);
        the rows join the batch. Logits (V,) per row."""
        assert self._packing is not None
        layer_types, window = self._packing
        lengths = [len(q.prompt_ids) for _, q in group]
        positions, segments = packed_positions(lengths)
        masks = packed_masks(layer_types, window, positions, segments)
        out = self.model(
            input_ids=torch.tensor([[t for _, q in group for t in q.prompt_ids]], device=self.device),
            position_ids=positions[None].to(self.device),
            attention_mask={kind: mask.to(self.device) for kind, mask in masks.items()},
            cache=new_cache(self._config, record=True),
            use_cache=True,
            logits_to_keep=last_rows(lengths).to(self.device),
        )
        cache = unpack_cache(out.cache, lengths)
        width = max(lengths)
        for row, (n, (_, seq)) in enumerate(zip(lengths, group, strict=True)):
            self._remember(seq, cache, row, width - n)
            seq.forwards, seq.joined = 1, True
        self._batch.join([s for s, _ in group], cache, lengths)
        return {seq_id: out.logits[0, row] for row, (seq_id, _) in enumerate(group)}

    def _group_past(self, group: list[tuple[str, _Sequence]], kept: list[int]) -> Any:
        """The cache a group forward starts from: row i holds the first `kept[i]` columns of its
        sequence's cache (a recording one: sliding layers kept every column), left-padded with
        zeros (masked) to max(kept); a fresh cache when no row keeps any. Recording when the
        prefix cache is on, so the prompts' blocks can be stored."""
        past = max(kept)
        cache = new_cache(self._config, record=self.prefix_cache is not None)
        if not past:
            return cache
        template = next(q.cache for k, (_, q) in zip(kept, group, strict=True) if k)

        def stacked(i: int, part: str) -> torch.Tensor:
            like: torch.Tensor = getattr(template.layers[i], part)  # (1, H, C, D)
            rows = []
            for k, (_, seq) in zip(kept, group, strict=True):
                columns = getattr(seq.cache.layers[i], part)[:, :, :k] if k else like[:, :, :0]
                rows.append(torch.cat([like.new_zeros(1, like.shape[1], past - k, like.shape[3]), columns], dim=-2))
            return torch.cat(rows)  # (B, H, past, D)

        for i, layer in enumerate(cache.layers):
            layer.update(stacked(i, "keys"), stacked(i, "values"))
        return cache

    @torch.inference_mode()
    def _prefill_group(self, group: list[tuple[str, _Sequence]]) -> dict[str, torch.Tensor]:
        """One forward over the uncached part of every prompt of `group`; the rows join the batch.
        Logits (V,) per row.

        Every row's real tokens must end up contiguous and right-aligned (kv_batch.py's layout), so
        with W = the longest uncached part, row i feeds its last min(W, len_i) prompt tokens,
        re-computing the few cached ones that fill its gap, on top of the first len_i - W cached
        columns (`_group_past`); a row with no cached prefix is a fresh prompt, left-padded.
        Positions restart at 0 on each row's first real token."""
        lengths = [len(q.prompt_ids) for _, q in group]
        width = max(n - q.filled for n, (_, q) in zip(lengths, group, strict=True))
        kept = [max(0, n - width) for n in lengths]  # <= filled: the rows' cached columns reused
        past = max(kept)
        fed = [n - k for n, k in zip(lengths, kept, strict=True)]  # <= width
        ids = [[0] * (width - f) + q.prompt_ids[k:] for f, k, (_, q) in zip(fed, kept, group, strict=True)]
        mask = [[0] * (past - k) + [1] * k + [0] * (width - f) + [1] * f for k, f in zip(kept, fed, strict=True)]
        positions = [[0] * (width - f) + list(range(k, k + f)) for k, f in zip(kept, fed, strict=True)]
        padded = min(lengths) < past + width
        out = self.model(
            input_ids=torch.tensor(ids, device=self.device),
            attention_mask=torch.tensor(mask, device=self.device) if padded else None,
            position_ids=torch.tensor(positions, device=self.device),
            cache=self._group_past(group, kept),
            use_cache=True,
            logits_to_keep=1,
        )
        for row, (n, (_, seq)) in enumerate(zip(lengths, group, strict=True)):
            self._remember(seq, out.cache, row, past + width - n)
            seq.forwards, seq.joined, seq.cache = seq.forwards + 1, True, None
        self._batch.join([s for s, _ in group], out.cache, lengths)
        return {seq_id: out.logits[row, -1] for row, (seq_id, _) in enumerate(group)}

    @torch.inference_mode()
    def _prefill_chunk(self, seq_id: str, seq: _Sequence, n: int) -> torch.Tensor | None:
        """The next `n` prompt tokens on the sequence's own batch-1 cache. When the prompt is
        complete the sequence joins the batch and its last logits (V,) come back, else None."""
        start = seq.filled
        if seq.cache is None:
            seq.cache = new_cache(self._config, record=self.prefix_cache is not None)
        scoring = seq.params.prompt_logprobs
        out = self.model(
            input_ids=torch.tensor([seq.prompt_ids[start : start + n]], device=self.device),
            position_ids=torch.arange(start, start + n, device=self.device)[None],
            cache=seq.cache,
            use_cache=True,
            logits_to_keep=0 if scoring is not None else 1,  # 0: every row (echo scores the prompt)
        )
        if scoring is not None:
            # Row i (position start + i) predicts prompt token start + i + 1: (n, V) -> n scores.
            targets = seq.prompt_ids[start + 1 : start + n + 1]
            seq.prompt_scores += prompt_logprobs(out.logits[0], targets, scoring)
        seq.cache, seq.filled, seq.forwards = out.cache, start + n, seq.forwards + 1
        if seq.filled < len(seq.prompt_ids):
            return None
        self._remember(seq, out.cache, 0, 0)
        self._batch.join([seq_id], out.cache, [seq.filled])
        seq.cache, seq.joined = None, True
        return out.logits[0, -1]

    def _remember(self, seq: _Sequence, cache: Any, row: int, offset: int) -> None:
        """Store the prompt's full blocks; its tokens sit at columns offset.. of batch `row`."""
        if self.prefix_cache is None:
            return
        size = self.prefix_cache.block_size
        self.prefix_cache.insert(seq.prompt_ids, lambda j: row_block(cache, row, offset + j * size, size))

    @staticmethod
    def _commit(seq: _Sequence, token: int, logits: torch.Tensor | None) -> StepEvent:
        """Commit `token`, drawn from (1, V) `logits` (None: by the certified head, for a request
        without logprobs); its logprob only if the request asked."""
        event = commit_token(seq.generated, token, seq.params)
        if seq.params.logprobs is not None and event.token_ids:
            assert logits is not None, "a request with logprobs is drawn from full logits"
            event.logprobs = token_logprobs(logits, event.token_ids, seq.params.logprobs)
        if seq.matcher is not None and event.token_ids:
            seq.matcher.advance(token)
            if seq.matcher.done:  # the JSON document is complete: nothing may follow it
                event.finish_reason = "stop"
            elif event.finish_reason is None:
                _close_if_due(seq, event)
        return event

    def step(self) -> dict[str, StepEvent]:
        events: dict[str, StepEvent] = {}
        # Rows already in the batch decode together; then newcomers prefill within the budget
        # and those whose prompt is complete join (their first token comes from the prefill).
        rows = list(self._batch.seq_ids)
        if rows:
            seqs = [self._seqs[s] for s in rows]
            tokens, logits = self._decode(seqs)
            for i, (seq_id, seq, token) in enumerate(zip(rows, seqs, tokens, strict=True)):
                events[seq_id] = self._commit(seq, token, None if logits is None else logits[i : i + 1])
                events[seq_id].forward_passes = 1
        for seq_id, last in self._prefill_some().items():
            seq = self._seqs[seq_id]
            if seq.params.max_tokens == 0:  # echo scoring only: the prompt's forward was all
                events[seq_id] = StepEvent(finish_reason="length")
            else:
                events[seq_id] = self._commit(seq, sample_rows(last[None], [seq])[0], last[None])
            events[seq_id].forward_passes = seq.forwards
            if seq.params.prompt_logprobs is not None:
                events[seq_id].prompt_logprobs = [None, *seq.prompt_scores]
        finished = {s for s, e in events.items() if e.finish_reason is not None}
        for seq_id in finished:
            del self._seqs[seq_id]
        self._batch.remove(finished)
        return events
