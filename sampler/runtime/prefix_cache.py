"""Automatic prefix caching: the KV of earlier prompts, in fixed-size token blocks, reused by later ones.

Chat frontends resend the whole history every turn, so turn N's prompt starts with turn N-1's.
A prompt is cut into blocks of `block_size` tokens; block j's key is a hash chained over the
block's tokens and block j-1's key (as vLLM's automatic prefix caching), so a key names the
whole prefix up to the end of its block. A lookup walks the chain from block 0 and stops at
the first miss; entries are LRU under a byte budget, and a chain is touched root-last so
eviction takes the tails of prefixes before their roots. Behaviour and figures: docs/load.md
("Prefix cache").

What a block stores: every layer's K and V for its tokens, sliding-window layers included. A
prefix longer than the window W still needs its last W-1 positions in the sliding layers, and
which block ends a future hit is unknown when it is stored, so the sliding layers' K/V is kept
for every block (the prefill records it: `DynamicSlidingWindowLayer.activate_past_recording`).
Only prompt tokens are stored (their KV comes from a prefill that saw all of them).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache, PretrainedConfig

# Per layer: (keys, values), each (1, H, block_size, D).
BlockKV = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class PrefixCacheStats:
    """Running totals, read by the server's /metrics (server/metrics.py)."""

    queries: int = 0  # prompts looked up
    hits: int = 0  # prompts that reused at least one block
    query_tokens: int = 0  # prompt tokens looked up
    reused_tokens: int = 0  # prompt tokens whose KV came from the cache
    evicted_blocks: int = 0
    bytes_used: int = 0


@dataclass
class _Block:
    parent: int | None
    tokens: tuple[int, ...]
    kv: BlockKV
    nbytes: int


class PrefixCache:
    """Blocks of prompt KV keyed by chained hashes, LRU-evicted past `budget_bytes`."""

    def __init__(self, budget_bytes: int, block_size: int = 16) -> None:
        if block_size < 1:
            raise ValueError("prefix cache block_size must be >= 1")
        self.budget_bytes = budget_bytes
        self.block_size = block_size
        self.stats = PrefixCacheStats()
        self._blocks: OrderedDict[int, _Block] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def _keys(self, tokens: list[int], n_blocks: int) -> list[tuple[int, tuple[int, ...]]]:
        """(key, block tokens) of the first `n_blocks` full blocks of `tokens`."""
        out: list[tuple[int, tuple[int, ...]]] = []
        parent: int | None = None
        for j in range(n_blocks):
            block = tuple(tokens[j * self.block_size : (j + 1) * self.block_size])
            parent = hash((parent, block))
            out.append((parent, block))
        return out

    def _touch(self, keys: list[int]) -> None:
        for key in reversed(keys):  # the root ends most recent: tails are evicted first
            self._blocks.move_to_end(key)

    def lookup(self, tokens: list[int]) -> list[BlockKV]:
        """The stored blocks of the longest cached prefix of `tokens`, leaving at least one token
        to compute (the next token's logits need a forward)."""
        usable = (len(tokens) - 1) // self.block_size
        found: list[int] = []
        parent: int | None = None
        for key, block in self._keys(tokens, usable):
            entry = self._blocks.get(key)
            # The stored tokens and parent are checked too: a hash collision must not reuse KV.
            if entry is None or entry.tokens != block or entry.parent != parent:
                break
            found.append(key)
            parent = key
        self.stats.queries += 1
        self.stats.query_tokens += len(tokens)
        if found:
            self.stats.hits += 1
            self.stats.reused_tokens += len(found) * self.block_size
            self._touch(found)
        return [self._blocks[k].kv for k in found]

    def insert(self, tokens: list[int], block_kv: Callable[[int], BlockKV]) -> None:
        """Store the full blocks of `tokens` not yet stored; `block_kv(j)` gives block j's KV
        (copied out of the prefill's cache, so a stored block never aliases a running batch)."""
        if self.budget_bytes <= 0:
            return
        chain = self._keys(tokens, len(tokens) // self.block_size)
        parent: int | None = None
        for j, (key, block) in enumerate(chain):
            if key not in self._blocks:
                kv = block_kv(j)
                nbytes = sum(k.nbytes + v.nbytes for k, v in kv)
                self._blocks[key] = _Block(parent, block, kv, nbytes)
                self.stats.bytes_used += nbytes
            parent = key
        self._touch([key for key, _ in chain])
        self._evict()

    def _evict(self) -> None:
        while self.stats.bytes_used > self.budget_bytes and self._blocks:
            _, block = self._blocks.popitem(last=False)
            self.stats.bytes_used -= block.nbytes
            self.stats.evicted_blocks += 1


def new_cache(config: Any, *, record: bool) -> Any:
    """An empty DynamicCache for `config`'s layer types, its sliding layers keeping every column
    when `record` (so the prompt's blocks can be stored); None for a model without a
    transformers config (a scripted test model builds its own cache)."""
    if not isinstance(config, PretrainedConfig):
        return None
    cache = DynamicCache(config=config)
    if record:
        cache.activate_past_recording()
    return cache


def cache_from_blocks(config: Any, blocks: list[BlockKV]) -> Any:
    """A batch-1 cache holding the blocks' tokens, recording (a resumed prefill stores its new
    blocks too). A sliding layer receives every column, so its window is whole whatever the
    prefix length, and its `cumulative_length` becomes the prefix length."""
    cache = new_cache(config, record=True)
    for i, layer in enumerate(cache.layers):
        keys = torch.cat([b[i][0] for b in blocks], dim=-2)
        values = torch.cat([b[i][1] for b in blocks], dim=-2)
        layer.update(keys, values)
    return cache


def row_block(cache: Any, row: int, start: int, size: int) -> BlockKV:
    """Copies of columns [start, start + size) of batch row `row`, every layer (sliding layers
    must have recorded their past, so their columns line up with the full layers')."""
    return [
        (
            layer.keys[row : row + 1, :, start : start + size].clone(),
            layer.values[row : row + 1, :, start : start + size].clone(),
        )
        for layer in cache.layers
    ]
