"""Parallel refinement over unchanged causal Gemma weights (training-free, lookahead style).

Each step runs ONE forward per sequence over

    [pending committed tokens] + [a token tree of guesses for the next positions]

where the tree merges (as a trie) the Jacobi draft of the next `block_size` positions and
candidate n-grams from an `NgramPool` (prompt, output so far, refinement trajectory). Every tree
node attends to the cache, the pending tokens and its own ancestors only (a branch-aware 4-D
mask with explicit position ids), so the hidden state at a node is the one AR decoding would
compute after that node's path.

Verification walks the tree from the last pending token: draw the next token from the logits
(argmax, or Gumbel-max with noise keyed by (seed, absolute position) as `sampler.logits` does for
AR), step into the child holding that token, repeat. The walked path plus the one token drawn at
its end are committed: that is the AR output by construction (exact in float32 up to kernel
rounding; bfloat16 block forwards round differently, so near-ties may flip). The KV rows of the
walked path are kept and every other new row is dropped.

The LM head (262144 x 640 for Gemma 3 270M) costs as much as the rest of a forward, so full
logits are computed only for rows that are drawn from: the walked path (predicted first by
cheap "shortlist" logits over a few thousand likely tokens, then checked with full logits) and,
when `steps` forces a commit, the forced positions. Every other row (the rest of the Jacobi
draft) is refreshed from its shortlist guess: a guess only decides what is tried next, never
what is committed.

`steps` caps the refinement forwards per block of `block_size` positions: when a block is not
verified after that many forwards, its remaining positions are committed as the draft stands.
Those tokens are not in the KV cache yet; they stay "pending" and are fed at the head of the
next forward. `steps=None` never forces a commit, so the output is exact.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from sampler.sequence import check_prompt, commit_token, resolve_seed
from sampler.logits import filter_top_k_top_p, gumbel_noise
from sampler.ngram_pool import NgramPool
from sampler.types import SamplingParams, StepEvent


@dataclass
class _Tree:
    """A trie of guessed continuations hanging off the last pending token (the root).

    Node i (0-based) is input row `num_pending + i`; parent -1 means the root. Parents always
    precede their children, so any root-to-node path is ascending in row order.
    """

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)  # root is depth 0, its children depth 1
    children: list[dict[int, int]] = field(default_factory=list)
    root_children: dict[int, int] = field(default_factory=dict)

    def insert(self, path: list[int], max_nodes: int | None = None) -> list[int]:
        """Add `path` below the root (sharing existing prefixes) while the tree has fewer than
        `max_nodes` nodes; return the node indices of the part of `path` that is in the tree."""
        nodes: list[int] = []
        kids = self.root_children
        parent = -1
        for token in path:
            node = kids.get(token)
            if node is None:
                if max_nodes is not None and len(self.tokens) >= max_nodes:
                    break
                node = len(self.tokens)
                self.tokens.append(token)
                self.parents.append(parent)
                self.depths.append(1 if parent < 0 else self.depths[parent] + 1)
                self.children.append({})
                kids[token] = node
            nodes.append(node)
            parent, kids = node, self.children[node]
        return nodes

    def kids_of_row(self, row: int) -> dict[int, int]:
        """Children of draw row `row` (0 = root, 1 + i = node i), token -> node."""
        return self.root_children if row == 0 else self.children[row - 1]

    def __len__(self) -> int:
        return len(self.tokens)


class _Shortlist:
    """A ring of up to `capacity` likely next tokens and their LM-head rows, per sequence.

    Fed with the context's tokens and every token drawn from full logits, so it follows the
    text (adding each row's top-k as well measured no better). `weight[:size]` are the head
    rows of `ids[:size]`, in float32.
    """

    def __init__(self, head_weight: torch.Tensor, capacity: int) -> None:
        self.head_weight = head_weight  # (V, d)
        self.capacity = capacity
        self.ids = torch.zeros(capacity, dtype=torch.long)
        self.weight = head_weight.new_empty(capacity, head_weight.shape[1], dtype=torch.float32)  # (capacity, d)
        self.slot: dict[int, int] = {}
        self.size = 0
        self._next = 0

    def add(self, tokens: list[int]) -> None:
        fresh = list(dict.fromkeys(t for t in tokens if t not in self.slot))[-self.capacity :]
        if not fresh:
            return
        slots = []
        for token in fresh:
            slot = self._next
            self._next = (self._next + 1) % self.capacity
            old = int(self.ids[slot])
            if self.size == self.capacity and self.slot.get(old) == slot:
                del self.slot[old]
            self.slot[token] = slot
            slots.append(slot)
            self.size = min(self.size + 1, self.capacity)
        idx = torch.tensor(slots)
        ids = torch.tensor(fresh)
        self.ids[idx] = ids
        rows = self.head_weight.index_select(0, ids.to(self.head_weight.device)).float()
        self.weight[idx.to(self.weight.device)] = rows


@dataclass
class _Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    steps: int | None
    pool: NgramPool  # pool.tokens is the whole context: prompt + generated
    shortlist: _Shortlist
    generated: list[int] = field(default_factory=list)
    cache: Any = None  # transformers DynamicCache; holds positions [0, cache_len)
    cache_len: int = 0
    draft: list[int] = field(default_factory=list)  # guesses for positions len(context)...
    block_end: int = 0  # last absolute position of the current block (inclusive)
    block_forwards: int = 0  # refinement forwards spent on the current block
    accept_avg: float = 1.0  # moving average of verified tree tokens per forward
    lean_run: int = 0  # consecutive lean forwards (see ParallelSampler._build_tree)


class _Draws:
    """Next-token choices for the R draw rows of one forward: row 0 is the root, row 1 + i is
    tree node i, and row r predicts absolute position positions[r].

    `exact[r]` is drawn from full logits exactly as AR would draw it; `guess[r]` comes from the
    shortlist and is only used to decide which rows to compute exactly and what to try next.
    """

    def __init__(self, sampler: "ParallelSampler", seq: _Sequence, hidden: torch.Tensor, positions: list[int]):
        self.sampler, self.seq, self.hidden, self.positions = sampler, seq, hidden, positions  # hidden: (R, d)
        self.exact: dict[int, int] = {}
        self._noise: dict[int, torch.Tensor] = {}  # position -> (V,) Gumbel noise (sampling only)
        sl = seq.shortlist
        self.guess: list[int] = [-1] * len(positions)  # -1: no guess (the shortlist is off)
        if sampler.shortlist_size:
            # float32 even for a bfloat16 model: R x S x d is small, and fp32 GEMM is fast here.
            approx = sampler._softcap_fn(hidden.float() @ sl.weight[: sl.size].T)  # (R, S)
            if not seq.params.greedy:
                noise = torch.stack([self.noise(p) for p in positions])[:, sl.ids[: sl.size]]
                approx = approx / seq.params.temperature + noise.to(approx.device)
            self.guess = sl.ids[: sl.size][approx.argmax(dim=-1).cpu()].tolist()

    def noise(self, position: int) -> torch.Tensor:
        if position not in self._noise:
            self._noise[position] = gumbel_noise(self.seq.seed, [position], self.sampler._vocab)[0]
        return self._noise[position]

    def best(self, row: int) -> int:
        return self.exact.get(row, self.guess[row])

    def ensure(self, rows: list[int]) -> None:
        """Full logits for `rows` (one head call), drawn with AR's arithmetic (`sample_tokens`)."""
        rows = [r for r in dict.fromkeys(rows) if r not in self.exact]
        if not rows:
            return
        p = self.seq.params
        logits = self.sampler._logits(self.hidden[rows]).float()  # (k, V)
        if p.greedy:
            tokens = logits.argmax(dim=-1).tolist()
        else:
            scaled = filter_top_k_top_p(logits / p.temperature, p.top_k, p.top_p).cpu()
            noise = torch.stack([self.noise(self.positions[r]) for r in rows])
            tokens = (scaled + noise).argmax(dim=-1).tolist()
        self.exact.update(zip(rows, tokens))
        if self.sampler.shortlist_size:
            self.seq.shortlist.add(tokens)

    def guessed_path(self, tree: _Tree, row: int) -> list[int]:
        """`row` and the rows reached from it by following the current best tokens."""
        rows = [row]
        while (node := tree.kids_of_row(row).get(self.best(row))) is not None:
            row = 1 + node
            rows.append(row)
        return rows


class ParallelSampler:
    """Lookahead-style parallel refinement; one forward per sequence per step.

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
    """

    name = "parallel"

    def __init__(self, model: torch.nn.Module, device: torch.device | str = "cpu", *,
                 block_size: int = 8, max_candidates: int = 6, candidate_len: int = 8,
                 key_len: int = 3, trajectory_per_key: int = 2, steps: int | None = None,
                 max_tree_nodes: int = 16, shortlist_size: int = 4096, lean_below: float = 1.0,
                 probe_every: int = 8) -> None:
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
        # Rows past ~16 cost a forward more and more (the body's GEMMs stop being weight-bound).
        self.max_tree_nodes = max(max_tree_nodes, block_size)
        if probe_every < 1:
            raise ValueError("probe_every must be >= 1")
        # A full tree costs about two AR steps on a CPU, so it must verify about one guess per
        # forward to pay; below `lean_below` (moving average, weight `accept_decay`) go lean.
        self.lean_below = lean_below
        self.probe_every = probe_every
        self.accept_decay = 0.3
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self._config = config
        self._layer_types = sorted(set(getattr(config, "layer_types", None) or ["full_attention"]))
        unknown = set(self._layer_types) - {"full_attention", "sliding_attention"}
        if unknown:
            raise ValueError(f"parallel sampler cannot mask layer types {sorted(unknown)}")
        self._window = int(getattr(config, "sliding_window", 0) or 0)
        # The body (decoder stack + final norm) and the LM head are called separately, so that
        # full logits are computed only for the rows that need them.
        self._body = getattr(model, "model", None)
        if self._body is None or model.get_output_embeddings() is None:
            raise ValueError("parallel sampler needs a causal LM with `.model` (decoder) and an output head")
        self._head = model.get_output_embeddings()
        self._vocab = self._head.weight.shape[0]
        # A shortlist as big as the vocabulary saves nothing: then every row gets full logits.
        self.shortlist_size = shortlist_size if 0 < shortlist_size < self._vocab // 2 else 0
        self._softcap = getattr(config, "final_logit_softcapping", None)
        # transformers 5.24 renamed past_key_values to cache (the old name warns until 5.40).
        params = inspect.signature(self._body.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._seqs: dict[str, _Sequence] = {}

    @property
    def num_active(self) -> int:
        return len(self._seqs)

    def add(self, seq_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        check_prompt(prompt_ids)
        steps = params.steps if params.steps is not None else self.steps
        if steps is not None and steps < 1:
            raise ValueError("steps must be >= 1")
        if steps is not None and steps >= self.block_size:
            # Every forward verifies at least one token, so a block never runs out of steps:
            # this is exact mode (and may use lean forwards, which a forced commit could not).
            steps = None
        pool = NgramPool(self.key_len, self.trajectory_per_key)
        pool.extend(list(prompt_ids))
        shortlist = _Shortlist(self._head.weight, max(self.shortlist_size, 1))
        if self.shortlist_size:
            shortlist.add(list(prompt_ids))
        self._seqs[seq_id] = _Sequence(
            list(prompt_ids), params, resolve_seed(params), steps, pool, shortlist,
            block_end=len(prompt_ids) + self.block_size - 1,
        )

    def cancel(self, seq_id: str) -> None:
        self._seqs.pop(seq_id, None)

    def step(self) -> dict[str, StepEvent]:
        events: dict[str, StepEvent] = {}
        for seq_id, seq in list(self._seqs.items()):
            event = self._step_one(seq)
            events[seq_id] = event
            if event.finish_reason is not None:
                del self._seqs[seq_id]
        return events

    # -- pieces of one forward -----------------------------------------------------------------

    def _build_tree(self, seq: _Sequence, depth_cap: int) -> tuple[_Tree, list[int]]:
        """The draft first (so its nodes are known), then the pool's candidates.

        Exact mode adapts to the text: while the moving average of verified guesses per forward
        is below `lean_below` (new prose, where guesses rarely hold), a forward carries only
        candidates that match the context's last 2+ tokens, often none, which makes it cost
        what an AR step costs; every `probe_every`-th forward is a full one, to notice when
        guessing starts paying again. Lean forwards refine no draft.
        """
        tree = _Tree()
        if depth_cap <= 0:
            return tree, []
        # A client watching refinements gets a refined draft every step, so never lean then.
        lean = (seq.steps is None and not seq.params.stream_refinements and seq.accept_avg < self.lean_below
                and (seq.lean_run + 1) % self.probe_every)
        seq.lean_run = seq.lean_run + 1 if lean else 0
        if lean:
            for cand in seq.pool.candidates(self.max_candidates, min(self.candidate_len, depth_cap), min_key=2):
                tree.insert(cand, self.max_tree_nodes)
            return tree, []
        candidates = seq.pool.candidates(self.max_candidates, min(self.candidate_len, depth_cap))
        draft = seq.draft[: min(self.block_size, depth_cap)]
        if len(draft) < min(self.block_size, depth_cap):
            # Pad a short draft with the best candidate (shares its tree rows) or a repeat.
            filler = candidates[0] if candidates else []
            while len(draft) < min(self.block_size, depth_cap):
                i = len(draft)
                draft.append(filler[i] if i < len(filler) else (draft[-1] if draft else seq.pool.tokens[-1]))
        draft_nodes = tree.insert(draft)
        for cand in candidates:  # best first, so the budget cuts the least promising
            tree.insert(cand, self.max_tree_nodes)
        return tree, draft_nodes

    def _masks(self, cache_len: int, positions: torch.Tensor, allowed: torch.Tensor) -> dict[str, torch.Tensor]:
        """Boolean (1, 1, Q, K) masks per layer type; True = may attend.

        positions: (Q,) absolute positions of the new rows. allowed: (Q, Q) ancestry among the
        new rows. Full layers see all `cache_len` cached keys; sliding layers keep only the last
        `window - 1` of them (past recording is trimmed after every step), and a query at
        position q sees a key at p only when q - p < window, as in AR decoding.
        """
        q = positions.shape[0]
        masks: dict[str, torch.Tensor] = {}
        if "full_attention" in self._layer_types:
            past = torch.ones(q, cache_len, dtype=torch.bool)
            masks["full_attention"] = torch.cat([past, allowed], dim=1)[None, None].to(self.device)
        if "sliding_attention" in self._layer_types:
            kept = min(cache_len, self._window - 1)
            key_pos = torch.cat([torch.arange(cache_len - kept, cache_len), positions])
            in_window = (positions[:, None] - key_pos[None, :]) < self._window
            full = torch.cat([torch.ones(q, kept, dtype=torch.bool), allowed], dim=1)
            masks["sliding_attention"] = (full & in_window)[None, None].to(self.device)
        return masks

    def _softcap_fn(self, logits: torch.Tensor) -> torch.Tensor:
        if self._softcap is None:
            return logits
        return torch.tanh(logits / self._softcap) * self._softcap

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(R, d) final hidden states -> (R, V) logits, soft-capped as the model's forward does.

        Through the model's own head, so the kernel per row count is the one AR gets
        (sampler/runtime/cpu_linear.py picks oneDNN for several rows on CPU).
        """
        return self._softcap_fn(self._head(hidden))

    # -- one sequence, one forward -------------------------------------------------------------

    @torch.inference_mode()
    def _step_one(self, seq: _Sequence) -> StepEvent:
        context = seq.pool.tokens
        pending = context[seq.cache_len :]  # committed, not yet in the cache; >= 1 token
        m = len(pending)
        root_pos = len(context) - 1
        remaining = seq.params.max_tokens - len(seq.generated)
        # Committing d tree tokens plus one drawn token must not pass max_tokens.
        tree, draft_nodes = self._build_tree(seq, remaining - 1)
        t = len(tree)

        # Rows: pending (a causal chain) then tree nodes. Ancestry (Q, Q), True = may attend.
        q = m + t
        allowed = torch.zeros(q, q, dtype=torch.bool)
        allowed[:m, :m] = torch.ones(m, m, dtype=torch.bool).tril()
        allowed[m:, :m] = True
        for i, parent in enumerate(tree.parents):
            if parent >= 0:
                allowed[m + i] = allowed[m + parent]
            allowed[m + i, m + i] = True
        positions = torch.tensor(list(range(seq.cache_len, root_pos + 1)) + [root_pos + d for d in tree.depths])

        if seq.cache is None:
            seq.cache = DynamicCache(config=self._config)
            # Sliding layers must keep rows past their window until we drop the rejected ones.
            seq.cache.activate_past_recording()
        hidden = self._body(
            input_ids=torch.tensor([pending + tree.tokens], device=self.device),
            position_ids=positions[None].to(self.device),
            attention_mask=self._masks(seq.cache_len, positions, allowed),
            use_cache=True,
            **{self._cache_kw: seq.cache},
        ).last_hidden_state[0]  # (Q, d)

        # Draw rows: the root (last pending row) and every tree node.
        draws = _Draws(self, seq, hidden[m - 1 :], [root_pos + 1] + [root_pos + d + 1 for d in tree.depths])
        first = draws.guessed_path(tree, 0) if self.shortlist_size else list(range(1 + t))
        if seq.steps is not None and seq.block_forwards + 1 >= seq.steps:
            # This forward is the block's last: whatever is not verified gets committed from the
            # draft, so those rows need full logits too; one head call for all is cheaper.
            first += [1 + n for n in draft_nodes if root_pos + tree.depths[n] < seq.block_end]
        # Verify: walk the tree along exactly drawn tokens; full logits for the path the guesses
        # predict, and again from wherever the exact walk leaves that prediction.
        draws.ensure(first)
        path: list[int] = []
        row = 0
        while (node := tree.kids_of_row(row).get(draws.exact[row])) is not None:
            path.append(node)
            row = 1 + node
            if row not in draws.exact:
                draws.ensure(draws.guessed_path(tree, row))
        accepted = [tree.tokens[n] for n in path] + [draws.exact[row]]
        if t:
            seq.accept_avg = (1 - self.accept_decay) * seq.accept_avg + self.accept_decay * len(path)

        seq.block_forwards += 1
        last = root_pos + len(accepted)  # position of the last token committed below
        forcing = seq.steps is not None and seq.block_forwards >= seq.steps and last < seq.block_end
        if forcing:
            # The forced positions are committed from the draft: give them full logits.
            draws.ensure([1 + n for n in draft_nodes[len(path) : len(path) + seq.block_end - last]])

        # Keep the KV rows of pending tokens and the walked path; drop every other new row.
        self._keep_rows(seq.cache, q, list(range(m)) + [m + n for n in path])
        seq.cache_len += m + len(path)

        # Refresh the Jacobi draft: the model's choice after each draft node, shifted past what
        # was just accepted. draft_preds[i] is the guess for position root_pos + 2 + i.
        draft_preds = [draws.best(1 + n) for n in draft_nodes]
        seq.draft = draft_preds[len(path) :]
        draft_inputs = [tree.tokens[n] for n in draft_nodes]
        for i, token in enumerate(draft_inputs):
            # Trajectory n-gram: a draft token and what the model chose after it (and next).
            seq.pool.add_trajectory(token, draft_preds[i : i + self.candidate_len])

        event = self._commit(seq, accepted)
        if event.finish_reason is None:
            last = len(seq.pool.tokens) - 1
            if last >= seq.block_end:
                self._start_block(seq, last)
            elif forcing:
                # Out of refinement steps: commit the rest of the block as the draft stands.
                forced = seq.draft[: seq.block_end - last]
                seq.draft = seq.draft[len(forced) :]
                more = self._commit(seq, forced)
                event.token_ids += more.token_ids
                event.finish_reason = more.finish_reason
                self._start_block(seq, len(seq.pool.tokens) - 1)
        event.forward_passes = 1
        if seq.params.stream_refinements and event.finish_reason is None:
            last = len(seq.pool.tokens) - 1
            left = min(seq.block_end - last, seq.params.max_tokens - len(seq.generated))
            draft = seq.draft[:left]
            stops = [i for i, tok in enumerate(draft) if tok in seq.params.stop_token_ids]
            event.draft_ids = draft[: stops[0]] if stops else draft
            event.refinement_step = seq.block_forwards
        return event

    def _start_block(self, seq: _Sequence, last: int) -> None:
        seq.block_end = last + self.block_size
        seq.block_forwards = 0

    def _commit(self, seq: _Sequence, tokens: list[int]) -> StepEvent:
        """Commit tokens in order with AR's stop / max_tokens rules; stop at the first finish."""
        out = StepEvent()
        for token in tokens:
            event = commit_token(seq.generated, token, seq.params)
            out.token_ids += event.token_ids
            seq.pool.extend(event.token_ids)
            if self.shortlist_size:
                seq.shortlist.add(event.token_ids)
            if event.finish_reason is not None:
                out.finish_reason = event.finish_reason
                break
        return out

    @staticmethod
    def _keep_rows(cache: Any, num_new: int, keep: list[int]) -> None:
        """Keep rows `keep` (ascending, < num_new) of the `num_new` rows just appended to every
        layer, compacted in order, and drop the rest.

        Keys/values are (B, H, L, D) with the new rows last. Kept rows are copied down in place,
        then `crop` drops the tail; for sliding layers that crop also trims the recorded past
        back to `window - 1` rows (so the next forward's mask sizes hold).
        """
        n = len(keep)
        if keep != list(range(n)):
            for layer in cache.layers:
                if not getattr(layer, "is_initialized", True) or layer.keys is None:
                    continue
                base = layer.keys.shape[-2] - num_new
                idx = torch.tensor(keep, device=layer.keys.device) + base
                layer.keys[:, :, base : base + n] = layer.keys.index_select(2, idx)
                layer.values[:, :, base : base + n] = layer.values.index_select(2, idx)
        cache.crop(n - num_new)
