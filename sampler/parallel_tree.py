"""The guess tree of one parallel-refinement forward, down to the row positions and attention masks it runs with.

Why a tree, and why each node sees only its own ancestors: docs/parallel.md ("How it works").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class GuessTree:
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

    def paths(self) -> list[list[int]]:
        """The tokens from the root to each draw row: [] for the root, then node i's path."""
        out: list[list[int]] = [[]]
        for token, parent in zip(self.tokens, self.parents, strict=True):
            out.append(out[1 + parent] + [token])
        return out

    def __len__(self) -> int:
        return len(self.tokens)


def guess_tree(
    draft: list[int],
    draft_len: int,
    candidates: list[list[int]],
    max_nodes: int,
    last_token: int,
    valid: Callable[[list[int]], int] | None = None,
) -> tuple[GuessTree, list[int]]:
    """The draft first (so all its `draft_len` nodes are known), then `candidates` (best first,
    so the `max_nodes` budget cuts the least promising). Returns the tree and the draft's nodes.

    A draft shorter than `draft_len` is padded with the best candidate (it then shares that
    candidate's rows) or by repeating its last token (`last_token`, the context's, if empty).
    `valid` (a grammar, docs/parallel.md "Structured output") says how many tokens of a guess
    are allowed from the root: the rest is cut before it takes a row, since it can never verify
    (the draft may then have fewer than `draft_len` nodes).
    """
    draft = draft[:draft_len]
    filler = candidates[0] if candidates else []
    while len(draft) < draft_len:
        i = len(draft)
        draft.append(filler[i] if i < len(filler) else (draft[-1] if draft else last_token))
    if valid is not None:
        draft = draft[: valid(draft)]
        candidates = [cand[: valid(cand)] for cand in candidates]
    tree = GuessTree()
    draft_nodes = tree.insert(draft)
    for cand in candidates:
        tree.insert(cand, max_nodes)
    return tree, draft_nodes


def forward_rows(cache_len: int, num_pending: int, tree: GuessTree) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (Q,) and ancestry (Q, Q) of one forward's rows: `num_pending` committed tokens
    not yet in the cache (a causal chain from position `cache_len`), then the tree's nodes.

    ancestry[i, j] is True when row i may attend to row j: pending rows see earlier pending
    rows, a node sees every pending row, its ancestors and itself.
    """
    m, q = num_pending, num_pending + len(tree)
    root_pos = cache_len + m - 1
    allowed = torch.zeros(q, q, dtype=torch.bool)
    allowed[:m, :m] = torch.ones(m, m, dtype=torch.bool).tril()
    allowed[m:, :m] = True
    for i, parent in enumerate(tree.parents):
        if parent >= 0:
            allowed[m + i] = allowed[m + parent]
        allowed[m + i, m + i] = True
    positions = torch.tensor(list(range(cache_len, root_pos + 1)) + [root_pos + d for d in tree.depths])
    return positions, allowed


def attention_masks(
    layer_types: list[str], window: int, cache_len: int, positions: torch.Tensor, allowed: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Boolean (1, 1, Q, K) masks per layer type in `layer_types`; True = may attend.

    positions: (Q,) absolute positions of the new rows. allowed: (Q, Q) ancestry among the
    new rows. Full layers see all `cache_len` cached keys; sliding layers keep only the last
    `window - 1` of them (past recording is trimmed after every step), and a query at
    position q sees a key at p only when q - p < window, as in AR decoding. On the CPU.
    """
    q = positions.shape[0]
    masks: dict[str, torch.Tensor] = {}
    if "full_attention" in layer_types:
        past = torch.ones(q, cache_len, dtype=torch.bool)
        masks["full_attention"] = torch.cat([past, allowed], dim=1)[None, None]
    if "sliding_attention" in layer_types:
        kept = min(cache_len, window - 1)
        key_pos = torch.cat([torch.arange(cache_len - kept, cache_len), positions])
        in_window = (positions[:, None] - key_pos[None, :]) < window
        full = torch.cat([torch.ones(q, kept, dtype=torch.bool), allowed], dim=1)
        masks["sliding_attention"] = (full & in_window)[None, None]
    return masks


def batch_masks(per_seq: list[dict[str, torch.Tensor]], past: dict[str, int], q_max: int) -> dict[str, torch.Tensor]:
    """Several sequences' masks (from `attention_masks`) as one boolean (B, 1, q_max, P + q_max)
    mask per layer type, for a forward over their left-padded stacked caches.

    Sequence b's mask (1, 1, Q_b, P_b + Q_b) sees its own P_b cached keys, which stacking put
    last of the P = `past[kind]` columns, and its own Q_b new rows, the first of the q_max new
    columns. The padding rows Q_b..q_max see only themselves: a row that sees nothing can give
    NaN in some attention kernels, and a NaN value poisons even the rows that mask it out.
    """
    out: dict[str, torch.Tensor] = {}
    pad_diag = torch.eye(q_max, dtype=torch.bool)
    for kind, p in past.items():
        mask = torch.zeros(len(per_seq), 1, q_max, p + q_max, dtype=torch.bool)
        for b, masks in enumerate(per_seq):
            own = masks[kind][0, 0]  # (Q_b, P_b + Q_b)
            q = own.shape[0]
            p_b = own.shape[1] - q
            mask[b, 0, :q, p - p_b : p + q] = own
            mask[b, 0, q:, p:] = pad_diag[q:]
        out[kind] = mask
    return out
