"""Parallel refinement over unchanged causal Gemma weights (training-free, lookahead style): the policy.

Each step runs ONE forward per sequence over its pending committed tokens plus a tree of guesses
(sampler/parallel_tree.py), draws the next tokens along the tree exactly as AR would
(sampler/parallel_draws.py), commits the verified path plus one drawn token and keeps only that
path's KV rows (sampler/runtime/kv_compaction.py). This module decides what goes into a tree
(the Jacobi draft, n-gram candidates, lean forwards) and when `steps` forces a commit.
How and why: docs/parallel.md.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from sampler.ar import _CLOSE_MARGIN, _CLOSE_WINDOW
from sampler.constrained import Matcher
from sampler.logits import softcap
from sampler.logprobs import token_logprobs
from sampler.ngram_pool import NgramPool
from sampler.parallel_draws import Draws, Shortlist, ensure_together
from sampler.parallel_tree import GuessTree, attention_masks, batch_masks, forward_rows, guess_tree
from sampler.runtime.certified_head import certified_head
from sampler.runtime.kv_compaction import TreeBatchCache, append_kept_rows, keep_new_rows
from sampler.runtime.prefix_cache import PrefixCache, PrefixCacheStats, cache_from_blocks, row_block
from sampler.runtime.stacked_cache import stack_caches
from sampler.sequence import check_prompt, commit_token, resolve_seed
from sampler.types import Handover, SamplingParams, StepEvent


@dataclass
class _Sequence:
    params: SamplingParams
    seed: int
    steps: int | None
    pool: NgramPool  # pool.tokens is the whole context: prompt + generated
    shortlist: Shortlist | None  # None: the sampler's shortlist is off (full logits everywhere)
    generated: list[int] = field(default_factory=list)
    # transformers DynamicCache; holds positions [0, cache_len). The context's tokens past it are
    # "pending" (committed, never forwarded yet; more than one after a forced commit) and head the
    # next forward's rows.
    cache: Any = None
    cache_len: int = 0
    draft: list[int] = field(default_factory=list)  # guesses for positions len(context)...
    block_end: int = 0  # last absolute position of the current block (inclusive)
    block_forwards: int = 0  # refinement forwards spent on the current block
    accept_avg: float = 1.0  # moving average of verified tree tokens per forward
    lean_run: int = 0  # consecutive lean forwards (see ParallelSampler._build_tree)
    matcher: Matcher | None = None  # response_format: the grammar's state after the context
    # Tokens committed before the sequence's first forward (a grammar's forced opening); they
    # are reported with the first forward's event.
    opening: list[int] = field(default_factory=list)
    # Sampling: Gumbel noise rows (V,) by absolute position, for positions not yet committed. A
    # position is drawn in several forwards until it commits (~2 ms a row to generate).
    noise: dict[int, torch.Tensor] = field(default_factory=dict)
    started: bool = False  # its first forward ran (it may have begun with a cached prefix)


@dataclass
class _Plan:
    """One sequence's part of a step: its tree over the pending tokens, before the forward."""

    seq: _Sequence
    tree: GuessTree
    draft_nodes: list[int]
    num_pending: int  # committed tokens not in the cache yet (>= 1); they head the forward's rows

    def kept_rows(self, path: list[int]) -> list[int]:
        """The forward's new rows whose KV stays: every pending token, then the walked path."""
        return list(range(self.num_pending)) + [self.num_pending + n for n in path]


class ParallelSampler:
    """Lookahead-style parallel refinement; one batched forward per step for all running sequences.

    Constructor keywords are the config's `parallel:` mapping:
      block_size      Jacobi draft positions refined per forward; the unit `steps` counts in
      max_candidates  n-gram candidates verified per forward (besides the draft)
      candidate_len   most tokens per candidate
      key_len         longest context suffix looked up for candidates
      trajectory_per_key  n-grams kept per first token from the refinement trajectory
      steps           default refinement forwards per block (None: unlimited, exact)
      max_tree_nodes  most guessed tokens per forward (draft + candidates; at least block_size)
      shortlist_size  tokens whose logits guess the tree walk cheaply (0: full logits everywhere)
      lean_below      exact mode: below this many verified guesses per forward (moving average)
                      send only strong context matches (0: never)
      probe_every     while lean, every probe_every-th forward is a full one
      max_handover_tokens  a sequence whose context (prompt + generated) is longer stays here
                      when the engine gets busy (`detach` refuses): the receiving sampler would
                      prefill it all again, which costs more than it saves for long contexts
      batched         one forward per step carries every running sequence's tree (False: one
                      forward per sequence, the reference the batched path is tested against)
      commit_forced   with a grammar, commit the tokens it forces (the only one allowed) without
                      a forward (False: every token takes a draw row; bench/json_forward.py)
      prefill_chunk   a first forward's uncached prompt past this many tokens goes through the
                      decoder in chunks of this size first (no tree, no head)
    `prefix_cache` (not a config key: the registry shares AR's): prompts resume from the KV of
    earlier prompts' blocks, and each prompt's blocks are stored after its first forward.
    """

    name = "parallel"

    def __init__(
        self,
        model: torch.nn.Module,
        device: torch.device | str = "cpu",
        *,
        block_size: int = 8,
        max_candidates: int = 6,
        candidate_len: int = 8,
        key_len: int = 3,
        trajectory_per_key: int = 2,
        steps: int | None = None,
        max_tree_nodes: int = 16,
        shortlist_size: int = 4096,
        lean_below: float = 1.0,
        probe_every: int = 8,
        max_handover_tokens: int = 2048,
        batched: bool = True,
        commit_forced: bool = True,
        prefix_cache: PrefixCache | None = None,
        prefill_chunk: int = 512,
    ) -> None:
        if block_size < 1 or candidate_len < 1 or max_candidates < 0 or key_len < 1 or shortlist_size < 0:
            raise ValueError("block_size, candidate_len, key_len must be >= 1; max_candidates, shortlist_size >= 0")
        if steps is not None and steps < 1:
            raise ValueError("steps must be >= 1 or None (unlimited)")
        self.model = model
        self.device = torch.device(device)
        self.block_size = block_size
        self.max_candidates = max_candidates
        self.candidate_len = candidate_len
        self.key_len = key_len
        self.trajectory_per_key = trajectory_per_key
        self.steps = steps
        self.batched = batched
        self.commit_forced = commit_forced
        self.max_handover_tokens = max_handover_tokens
        self.prefix_cache = prefix_cache
        if prefill_chunk < 1:
            raise ValueError("prefill_chunk must be >= 1")
        self.prefill_chunk = prefill_chunk
        # Rows past ~16 cost a forward more and more (the body's GEMMs stop being weight-bound).
        self.max_tree_nodes = max(max_tree_nodes, block_size)
        if probe_every < 1:
            raise ValueError("probe_every must be >= 1")
        # A full tree costs about two AR steps on a CPU, so it must verify about one guess per
        # forward to pay; below `lean_below` (moving average, weight `accept_decay`) go lean.
        self.lean_below = lean_below
        self.probe_every = probe_every
        self.accept_decay = 0.3
        self._bind_model(model)
        # A shortlist as big as the vocabulary saves nothing: then every row gets full logits.
        self.shortlist_size = shortlist_size if 0 < shortlist_size < self._vocab // 2 else 0
        self._seqs: dict[str, _Sequence] = {}

    def _bind_model(self, model: torch.nn.Module) -> None:
        """Read what the forwards need from a transformers causal LM: layer kinds, window, body, head."""
        lm: Any = model  # a transformers causal LM: config, decoder and head are not nn.Module API
        config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
        self._config = config
        # Per decoder layer (what stacking walks), and the distinct kinds (what masks are per).
        self._layer_kinds = list(getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers)
        self._layer_types = sorted(set(self._layer_kinds))
        unknown = set(self._layer_types) - {"full_attention", "sliding_attention"}
        if unknown:
            raise ValueError(f"parallel sampler cannot mask layer types {sorted(unknown)}")
        self._window = int(getattr(config, "sliding_window", 0) or 0)
        # The body (decoder stack + final norm) and the LM head are called separately, so that
        # full logits are computed only for the rows that need them.
        body, head = getattr(lm, "model", None), lm.get_output_embeddings()
        if body is None or head is None:
            raise ValueError("parallel sampler needs a causal LM with `.model` (decoder) and an output head")
        self._body: torch.nn.Module = body
        self._head: torch.nn.Module = head
        self._head_weight: torch.Tensor = head.weight  # (V, d)
        self._vocab = self._head_weight.shape[0]
        self._softcap = getattr(config, "final_logit_softcapping", None)
        self._certified = certified_head(model)  # exact draws without full logits (or None)
        # transformers 5.24 renamed past_key_values to cache (the old name warns until 5.40).
        params = inspect.signature(self._body.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    @property
    def num_active(self) -> int:
        return len(self._seqs)

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats | None:
        return None if self.prefix_cache is None else self.prefix_cache.stats

    def add(self, seq_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        check_prompt(prompt_ids)
        steps = params.parallel.steps if params.parallel.steps is not None else self.steps
        if steps is not None and steps < 1:
            raise ValueError("steps must be >= 1")
        if steps is not None and (steps >= self.block_size or params.grammar is not None):
            # Every forward verifies at least one token, so a block never runs out of steps:
            # this is exact mode (and may use lean forwards, which a forced commit could not).
            # A grammar runs exact too: an unverified draft token may be one it forbids.
            steps = None
        pool = NgramPool(self.key_len, self.trajectory_per_key)
        pool.extend(list(prompt_ids))
        shortlist = Shortlist(self._head_weight, self.shortlist_size) if self.shortlist_size else None
        if shortlist is not None:
            shortlist.add(list(prompt_ids))
        seq = _Sequence(
            params,
            resolve_seed(params),
            steps,
            pool,
            shortlist,
            block_end=len(prompt_ids) + self.block_size - 1,
            matcher=None if params.grammar is None else Matcher(params.grammar, params.stop_token_ids),
        )
        if self.prefix_cache is not None and params.prompt_logprobs is None:  # scoring needs every row
            blocks = self.prefix_cache.lookup(list(prompt_ids))
            if blocks:  # the first forward starts after the cached prefix (pending: the rest)
                seq.cache = cache_from_blocks(self._config, blocks)
                seq.cache_len = len(blocks) * self.prefix_cache.block_size
        self._seqs[seq_id] = seq

    def cancel(self, seq_id: str) -> None:
        self._seqs.pop(seq_id, None)

    def detach(self, seq_id: str) -> Handover | None:
        """Give up a running sequence (HandsOver): every committed token was already reported in
        the step that committed it, so the hand-over carries exactly what the client has. A
        context longer than `max_handover_tokens` stays (None): re-prefilling it costs more, and
        so does one with a grammar (its matcher state does not travel; docs/parallel.md)."""
        seq = self._seqs.get(seq_id)
        if seq is None or len(seq.pool.tokens) > self.max_handover_tokens or seq.matcher is not None:
            return None
        del self._seqs[seq_id]
        return Handover(list(seq.generated), seq.seed)

    def step(self) -> dict[str, StepEvent]:
        """One forward per sequence taking part: sequences with a cache share one batched forward
        (when `batched`); a newcomer's first forward (its prompt plus a tree) runs alone."""
        events: dict[str, StepEvent] = {}
        for seq_id, seq in self._seqs.items():
            if not seq.started and not seq.generated:
                opening = self._open(seq)
                if opening.finish_reason is not None:  # the forced tokens alone ended it
                    events[seq_id] = opening
        if self.batched:
            running = {s: seq for s, seq in self._seqs.items() if seq.started and s not in events}
            if running:
                events.update(self._step_batch(running))
        for seq_id, seq in list(self._seqs.items()):
            if seq_id not in events:
                events[seq_id] = self._step_one(seq)
        for seq_id, event in events.items():
            if event.finish_reason is not None:
                del self._seqs[seq_id]
        return events

    # -- one step: build the trees, forward, verify, advance -------------------------------------

    @torch.inference_mode()
    def _step_one(self, seq: _Sequence) -> StepEvent:
        """A forward of this sequence alone (its KV cache grows in place)."""
        chunks = 0 if seq.started else self._prefill_ahead(seq)
        plan = self._plan(seq)
        draws = self._draws(plan, self._forward(seq, plan.tree))
        if not seq.started:
            self._remember_prompt(seq)
            seq.started = True
        draws.ensure(self._first_rows(plan, draws))
        path = self._walk(plan.tree, draws)
        keep_new_rows(seq.cache, plan.num_pending + len(plan.tree), plan.kept_rows(path))
        event = self._advance(plan, draws, path)
        event.forward_passes += chunks
        return event

    @torch.inference_mode()
    def _step_batch(self, running: dict[str, _Sequence]) -> dict[str, StepEvent]:
        """ONE forward over every running sequence's pending tokens and tree, then one head call
        for the rows each walk is predicted to need; each sequence keeps its own accepted KV."""
        plans = [self._plan(seq) for seq in running.values()]
        hiddens, cache = self._forward_batch(plans)
        all_draws = [self._draws(plan, hidden) for plan, hidden in zip(plans, hiddens, strict=True)]
        ensure_together([(draws, self._first_rows(plan, draws)) for plan, draws in zip(plans, all_draws, strict=True)])
        events: dict[str, StepEvent] = {}
        for row, (seq_id, plan, draws) in enumerate(zip(running, plans, all_draws, strict=True)):
            path = self._walk(plan.tree, draws)
            append_kept_rows(plan.seq.cache, cache, row, plan.kept_rows(path))
            events[seq_id] = self._advance(plan, draws, path)
        return events

    def _plan(self, seq: _Sequence) -> _Plan:
        # Committing d tree tokens plus one drawn token must not pass max_tokens.
        tree, draft_nodes = self._build_tree(seq, seq.params.max_tokens - len(seq.generated) - 1)
        return _Plan(seq, tree, draft_nodes, len(seq.pool.tokens) - seq.cache_len)

    def _draws(self, plan: _Plan, hidden: torch.Tensor) -> Draws:
        """The draws of one sequence's rows; `hidden` (1 + len(tree), d): root, then the nodes."""
        seq = plan.seq
        root_pos = len(seq.pool.tokens) - 1  # the last committed token's position
        for position in [p for p in seq.noise if p <= root_pos]:
            del seq.noise[position]  # committed: never drawn again
        return Draws(
            hidden,
            [root_pos + 1] + [root_pos + d + 1 for d in plan.tree.depths],
            head=self._head,
            cap=self._softcap,
            vocab_size=self._vocab,
            params=seq.params,
            seed=seq.seed,
            shortlist=seq.shortlist,
            masks=None if seq.matcher is None else seq.matcher.tree_masks(plan.tree.paths()),
            certified=self._certified,
            noise_rows=seq.noise,
        )

    def _build_tree(self, seq: _Sequence, depth_cap: int) -> tuple[GuessTree, list[int]]:
        """The tree to verify (at most `depth_cap` deep) and the nodes of its draft part.

        Exact mode adapts to the text: while the moving average of verified guesses per forward
        is below `lean_below` (new prose, where guesses rarely hold), a forward carries only
        candidates that match the context's last 2+ tokens, often none, which makes it cost
        what an AR step costs; every `probe_every`-th forward is a full one, to notice when
        guessing starts paying again. Lean forwards refine no draft.
        """
        if depth_cap <= 0:
            return GuessTree(), []
        # A grammar cuts every guess at its first forbidden token: it could never verify.
        valid = None if seq.matcher is None else seq.matcher.valid_prefix
        # A client watching refinements gets a refined draft every step, so never lean then.
        lean = (
            seq.steps is None
            and not seq.params.stream_refinements
            and seq.accept_avg < self.lean_below
            and (seq.lean_run + 1) % self.probe_every
        )
        seq.lean_run = seq.lean_run + 1 if lean else 0
        cand_len = min(self.candidate_len, depth_cap)
        if lean:
            candidates = seq.pool.candidates(self.max_candidates, cand_len, min_key=2)
            return guess_tree([], 0, candidates, self.max_tree_nodes, seq.pool.tokens[-1], valid)
        candidates = seq.pool.candidates(self.max_candidates, cand_len)
        return guess_tree(
            seq.draft, min(self.block_size, depth_cap), candidates, self.max_tree_nodes, seq.pool.tokens[-1], valid
        )

    def _remember_prompt(self, seq: _Sequence) -> None:
        """Store the prompt's full blocks after its first forward: columns [0, len(prompt)) of
        the sequence's (recording) cache hold the prompt's KV, the rows after it are the tree's."""
        if self.prefix_cache is None or seq.params.prompt_logprobs is not None:
            return
        size = self.prefix_cache.block_size
        prompt = seq.pool.tokens[: len(seq.pool.tokens) - len(seq.generated)]
        self.prefix_cache.insert(prompt, lambda j: row_block(seq.cache, 0, j * size, size))

    def _prefill_ahead(self, seq: _Sequence) -> int:
        """Before a sequence's first tree forward, its uncached prompt past `prefill_chunk` tokens
        goes through the decoder in chunks of that size (the rest, at least one token, heads the
        tree forward). One forward over a long prompt attends over all of it in every layer, the
        sliding ones included; a chunk's sliding layers see only their window (docs/load.md,
        "A lone prompt is not cut by the time budget"). The cache records every column until the
        first step's crop, so the prompt's prefix-cache blocks are stored whole. Returns how
        many chunk forwards ran."""
        chunks = 0
        while len(seq.pool.tokens) - seq.cache_len > self.prefill_chunk:
            self._forward(seq, GuessTree(), self.prefill_chunk)
            seq.cache_len += self.prefill_chunk
            chunks += 1
        return chunks

    def _forward(self, seq: _Sequence, tree: GuessTree, num_pending: int | None = None) -> torch.Tensor:
        """One forward over the pending tokens (the first `num_pending` of them; default all) then
        the tree's nodes, appending their KV rows to the cache; returns the final hidden states of
        the draw rows, (1 + len(tree), d): the root (last pending row), then node i at row 1 + i."""
        pending = seq.pool.tokens[seq.cache_len :][:num_pending]
        positions, allowed = forward_rows(seq.cache_len, len(pending), tree)
        masks = attention_masks(self._layer_types, self._window, seq.cache_len, positions, allowed)
        if seq.cache is None:
            seq.cache = DynamicCache(config=self._config)
            # Sliding layers must keep rows past their window until we drop the rejected ones.
            seq.cache.activate_past_recording()
        hidden = self._body(
            input_ids=torch.tensor([pending + tree.tokens], device=self.device),
            position_ids=positions[None].to(self.device),
            attention_mask={kind: mask.to(self.device) for kind, mask in masks.items()},
            use_cache=True,
            **{self._cache_kw: seq.cache},
        ).last_hidden_state[0]  # (Q, d)
        return hidden[len(pending) - 1 :]

    def _forward_batch(self, plans: list[_Plan]) -> tuple[list[torch.Tensor], TreeBatchCache]:
        """One forward over every plan's pending tokens and tree nodes: row b holds sequence b's
        Q_b rows, padded to the longest Q; the caches are stacked left-padded and read only.
        Returns each sequence's draw rows' hidden states (1 + len(tree_b), d) and the forward's
        cache, which holds the new KV rows for `append_kept_rows`."""
        seqs = [plan.seq for plan in plans]
        rows = [seq.pool.tokens[seq.cache_len :] + plan.tree.tokens for seq, plan in zip(seqs, plans, strict=True)]
        q_max = max(len(r) for r in rows)
        positions, masks = [], []
        for seq, plan in zip(seqs, plans, strict=True):
            pos, allowed = forward_rows(seq.cache_len, plan.num_pending, plan.tree)
            masks.append(attention_masks(self._layer_types, self._window, seq.cache_len, pos, allowed))
            # Padding rows sit at the last real position: any valid position does, none is read.
            positions.append(torch.cat([pos, pos[-1:].expand(q_max - len(pos))]))
        stacked = stack_caches([seq.cache for seq in seqs], self._layer_kinds, q_max, self.device)
        past = [(layer.keys, layer.values) for layer in stacked.view.layers]  # (B, H, P_l, D)
        past_len = {kind: past[self._layer_kinds.index(kind)][0].shape[-2] for kind in self._layer_types}
        cache = TreeBatchCache(past)
        hidden = self._body(
            input_ids=torch.tensor([r + [0] * (q_max - len(r)) for r in rows], device=self.device),
            position_ids=torch.stack(positions).to(self.device),
            attention_mask={kind: m.to(self.device) for kind, m in batch_masks(masks, past_len, q_max).items()},
            use_cache=True,
            **{self._cache_kw: cache},
        ).last_hidden_state  # (B, q_max, d)
        hiddens = [
            hidden[b, plan.num_pending - 1 : len(r)] for b, (plan, r) in enumerate(zip(plans, rows, strict=True))
        ]
        return hiddens, cache

    def _first_rows(self, plan: _Plan, draws: Draws) -> list[int]:
        """The rows that get full logits first: the path the guesses predict (without a
        shortlist, every row); `_walk` asks for more wherever the exact walk leaves it."""
        seq, tree = plan.seq, plan.tree
        first = draws.guessed_path(tree, 0) if seq.shortlist is not None else list(range(1 + len(tree)))
        if seq.steps is not None and seq.block_forwards + 1 >= seq.steps:
            # This forward is the block's last: whatever is not verified gets committed from the
            # draft, so those rows need full logits too; one head call for all is cheaper.
            root_pos = len(seq.pool.tokens) - 1
            first += [1 + n for n in plan.draft_nodes if root_pos + tree.depths[n] < seq.block_end]
        return first

    @staticmethod
    def _walk(tree: GuessTree, draws: Draws) -> list[int]:
        """Walk the tree from the root along exactly drawn tokens; return the walked nodes."""
        path: list[int] = []
        row = 0
        while (node := tree.kids_of_row(row).get(draws.exact[row])) is not None:
            path.append(node)
            row = 1 + node
            if row not in draws.exact:
                draws.ensure(draws.guessed_path(tree, row))
        return path

    def _advance(self, plan: _Plan, draws: Draws, path: list[int]) -> StepEvent:
        """Commit the walked `path` plus the token drawn at its end (the caller kept their KV
        rows), refresh the draft and, when `steps` runs out, commit the rest of the block from it."""
        seq, tree, draft_nodes = plan.seq, plan.tree, plan.draft_nodes
        root_pos = len(seq.pool.tokens) - 1  # nothing is committed yet in this step
        accepted = [tree.tokens[n] for n in path] + [draws.exact[1 + path[-1] if path else 0]]
        if len(tree):
            seq.accept_avg = (1 - self.accept_decay) * seq.accept_avg + self.accept_decay * len(path)
        seq.block_forwards += 1
        last = root_pos + len(accepted)  # position of the last token committed below
        forcing = seq.steps is not None and seq.block_forwards >= seq.steps and last < seq.block_end
        if forcing:
            # The forced positions are committed from the draft: give them full logits.
            draws.ensure([1 + n for n in draft_nodes[len(path) : len(path) + seq.block_end - last]])

        seq.cache_len += plan.num_pending + len(path)  # the pending tokens and the walked path

        # Refresh the Jacobi draft: the model's choice after each draft node, shifted past what
        # was just accepted. draft_preds[i] is the guess for position root_pos + 2 + i.
        draft_preds = [draws.best(1 + n) for n in draft_nodes]
        seq.draft = draft_preds[len(path) :]
        for i, n in enumerate(draft_nodes):
            # Trajectory n-gram: a draft token and what the model chose after it (and next).
            seq.pool.add_trajectory(tree.tokens[n], draft_preds[i : i + self.candidate_len])

        event = self._commit(seq, accepted)
        if seq.opening:
            event.token_ids[:0], seq.opening = seq.opening, []
        if event.finish_reason is None:
            self._close_block(seq, event, forcing)
        if seq.params.logprobs is not None and event.token_ids:
            # The rows that drew the committed tokens: the root, the walked path, then (forced
            # commits) the draft rows that proposed them.
            rows = [0] + [1 + n for n in path] + [1 + n for n in draft_nodes[len(path) :]]
            self._score(draws, rows[: len(event.token_ids)], event, seq.params.logprobs)
        event.forward_passes = 1
        if seq.params.stream_refinements and event.finish_reason is None:
            self._show_draft(seq, event)
        return event

    def _score(self, draws: Draws, rows: list[int], event: StepEvent, k: int) -> None:
        """Logprobs of the event's tokens from the full logits of `rows` (one head call, only
        for requests that asked): the soft-capped logits AR would see at those positions."""
        logits = softcap(self._head(draws.hidden[rows]), self._softcap)  # (len(rows), V)
        event.logprobs = token_logprobs(logits, event.token_ids, k)

    def _close_block(self, seq: _Sequence, event: StepEvent, forcing: bool) -> None:
        """Start the next block once the current one is committed; out of refinement steps
        (`forcing`), commit the rest of the block as the draft stands first (into `event`)."""
        last = len(seq.pool.tokens) - 1
        if last >= seq.block_end:
            self._start_block(seq, last)
        elif forcing:
            forced = seq.draft[: seq.block_end - last]
            seq.draft = seq.draft[len(forced) :]
            more = self._commit(seq, forced)
            event.token_ids += more.token_ids
            event.finish_reason = more.finish_reason
            self._start_block(seq, len(seq.pool.tokens) - 1)

    def _show_draft(self, seq: _Sequence, event: StepEvent) -> None:
        """The current draft up to the block end and `max_tokens`, cut before a stop token."""
        left = min(seq.block_end - (len(seq.pool.tokens) - 1), seq.params.max_tokens - len(seq.generated))
        draft = seq.draft[:left]
        stops = [i for i, tok in enumerate(draft) if tok in seq.params.stop_token_ids]
        event.draft_ids = draft[: stops[0]] if stops else draft
        event.refinement_step = seq.block_forwards

    def _start_block(self, seq: _Sequence, last: int) -> None:
        seq.block_end = last + self.block_size
        seq.block_forwards = 0

    def _commit(self, seq: _Sequence, tokens: list[int]) -> StepEvent:
        """Commit tokens in order with AR's stop / max_tokens rules (and a grammar's, as AR
        applies them after each token); stop at the first finish. Then the tokens a grammar
        forces, without a forward (`_commit_forced`)."""
        out = StepEvent()
        for token in tokens:
            if self._commit_one(seq, token, out):
                return out
        self._commit_forced(seq, out)
        return out

    def _commit_one(self, seq: _Sequence, token: int, out: StepEvent) -> bool:
        """Commit one token into `out`; True when it ended the sequence (`out.finish_reason`)."""
        event = commit_token(seq.generated, token, seq.params)
        self._extend(seq, event.token_ids)
        out.token_ids += event.token_ids
        reason = event.finish_reason
        if seq.matcher is not None and event.token_ids:
            seq.matcher.advance(token)
            if seq.matcher.done:  # the JSON document is complete: nothing may follow it
                reason = "stop"
            elif reason is None and (closing := self._due_closing(seq)) is not None:
                for closer in closing:
                    seq.matcher.advance(closer)
                seq.generated += closing
                self._extend(seq, closing)
                out.token_ids += closing
                reason = "length"
        out.finish_reason = reason
        return reason is not None

    def _extend(self, seq: _Sequence, tokens: list[int]) -> None:
        seq.pool.extend(tokens)
        if seq.shortlist is not None:
            seq.shortlist.add(tokens)

    @staticmethod
    def _due_closing(seq: _Sequence) -> list[int] | None:
        """The closing of a JSON document once the budget left barely holds it, else None: AR's
        rule (sampler/ar.py `_close_if_due`, its window and margin), checked after every
        committed token as AR does, so a cut output is AR's and parses."""
        assert seq.matcher is not None
        left = seq.params.max_tokens - len(seq.generated)
        if seq.params.logprobs is not None or not 0 < left <= _CLOSE_WINDOW:
            return None
        closing = seq.matcher.closing(left)
        if closing is None or len(closing) < left - _CLOSE_MARGIN:
            return None
        return closing

    def _commit_forced(self, seq: _Sequence, out: StepEvent) -> None:
        """Commit, into `out`, the tokens the grammar allows alone next (any masked draw would
        pick them) without spending a forward: they head the next forward's rows as pending
        tokens. Not with logprobs: such a token would have no distribution to report."""
        if seq.matcher is None or not self.commit_forced or seq.params.logprobs is not None:
            return
        forced = 0
        while out.finish_reason is None and (token := seq.matcher.forced()) is not None:
            self._commit_one(seq, token, out)
            forced += 1
        seq.draft = seq.draft[forced:]  # the draft guesses positions after the last committed token

    def _open(self, seq: _Sequence) -> StepEvent:
        """Before a grammar sequence's first forward: commit what the grammar forces at the start
        (a schema's opening `{"` and first key), so that forward starts past it."""
        opening = StepEvent()
        self._commit_forced(seq, opening)
        seq.opening = list(opening.token_ids)
        return opening
