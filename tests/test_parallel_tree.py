"""The guess tree and the attention of one parallel-refinement forward, on hand-made trees."""

from __future__ import annotations

import torch

from sampler.parallel_tree import attention_masks, batch_masks, forward_rows, guess_tree


def test_guess_tree_shares_prefixes_and_respects_the_budget():
    tree, draft_nodes = guess_tree([5, 6, 7], 3, [[5, 6, 9], [8, 8, 8]], max_nodes=5, last_token=1)
    # Draft 5-6-7 (nodes 0-2); the candidate 5-6-9 shares 5-6 and adds 9; 8-8-8 gets one node, then the budget ends.
    assert draft_nodes == [0, 1, 2]
    assert tree.tokens == [5, 6, 7, 9, 8]
    assert tree.parents == [-1, 0, 1, 1, -1]
    assert tree.depths == [1, 2, 3, 3, 1]
    assert tree.kids_of_row(0) == {5: 0, 8: 4} and tree.kids_of_row(2) == {7: 2, 9: 3}


def test_short_draft_is_padded_from_the_best_candidate_then_by_repeating():
    tree, draft_nodes = guess_tree([4], 4, [[4, 2]], max_nodes=16, last_token=1)
    assert [tree.tokens[n] for n in draft_nodes] == [4, 2, 2, 2]
    empty, nodes = guess_tree([], 2, [], max_nodes=16, last_token=3)
    assert [empty.tokens[n] for n in nodes] == [3, 3]
    lean, nodes = guess_tree([9, 9], 0, [[1, 2]], max_nodes=16, last_token=3)  # no draft at all
    assert nodes == [] and lean.tokens == [1, 2]


def test_forward_rows_let_a_node_see_only_its_ancestors():
    # Root children a (node 0) and b (node 1); a's child c (node 2). Two pending tokens at 10, 11.
    tree, _ = guess_tree([], 0, [[1, 2], [3]], max_nodes=16, last_token=0)
    positions, allowed = forward_rows(cache_len=10, num_pending=2, tree=tree)
    assert positions.tolist() == [10, 11, 12, 13, 12]
    assert allowed.int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],  # a
        [1, 1, 1, 1, 0],  # c under a
        [1, 1, 0, 0, 1],  # b: not a, not c
    ]


def test_sliding_mask_keeps_the_window_and_the_ancestry():
    tree, _ = guess_tree([], 0, [[1, 2]], max_nodes=16, last_token=0)
    positions, allowed = forward_rows(cache_len=6, num_pending=1, tree=tree)  # rows at 6, 7, 8
    masks = attention_masks(["full_attention", "sliding_attention"], 4, 6, positions, allowed)
    assert masks["full_attention"].shape == (1, 1, 3, 9)
    assert masks["full_attention"][0, 0].all(dim=1).tolist() == [False, False, True]
    # Sliding layers hold the last window - 1 = 3 cached keys (positions 3, 4, 5), then the new rows.
    sliding = masks["sliding_attention"][0, 0].int().tolist()
    assert sliding == [
        [1, 1, 1, 1, 0, 0],  # position 6 sees 3..6
        [0, 1, 1, 1, 1, 0],  # position 7 sees 4..7
        [0, 0, 1, 1, 1, 1],  # position 8 sees 5..8
    ]
    assert masks["sliding_attention"].dtype == torch.bool


def test_batch_masks_left_align_the_past_and_pad_rows_see_themselves():
    # Sequence 0: 3 cached keys, one pending row and one node (Q = 2). Sequence 1: 1 cached key, Q = 3.
    one, _ = guess_tree([4], 1, [], max_nodes=4, last_token=1)
    two, _ = guess_tree([4, 5], 2, [], max_nodes=4, last_token=1)
    own = []
    for cache_len, tree in ((3, one), (1, two)):
        positions, allowed = forward_rows(cache_len, 1, tree)
        own.append(attention_masks(["full_attention"], 0, cache_len, positions, allowed))
    mask = batch_masks(own, {"full_attention": 3}, q_max=3)["full_attention"]
    assert mask.shape == (2, 1, 3, 6)
    # Sequence 0: its 3 cached keys fill the past; its 2 rows are causal; row 2 is padding.
    assert mask[0, 0].int().tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1]]
    # Sequence 1: two padding columns on the left, then its one cached key.
    assert mask[1, 0].int().tolist() == [[0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
