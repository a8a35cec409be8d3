import math

import pytest
import torch

from sampler.logits import draw_tokens, filter_top_k_top_p, gumbel_noise, sample_tokens, softcap


def test_top_k_keeps_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    out = filter_top_k_top_p(logits, top_k=2, top_p=1.0)
    assert torch.isfinite(out).tolist() == [[False, True, False, True, False]]


def test_top_p_keeps_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = filter_top_k_top_p(probs.log(), top_k=0, top_p=0.75)
    # 0.5 alone < 0.75, 0.5 + 0.3 reaches it: two tokens survive.
    assert torch.isfinite(out).tolist() == [[True, True, False, False]]
    out = filter_top_k_top_p(probs.log(), top_k=0, top_p=0.01)
    assert torch.isfinite(out).tolist() == [[True, False, False, False]]


def test_noise_is_keyed_by_seed_and_position():
    a = gumbel_noise(7, [3, 4], 50)
    assert torch.equal(a, gumbel_noise(7, [3, 4], 50))
    assert torch.equal(a[1], gumbel_noise(7, [4], 50)[0])  # a row depends only on its own key
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(a, gumbel_noise(8, [3, 4], 50))
    assert torch.isfinite(a).all()


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 2.0, 0.3], [3.0, 0.0, 0.0]])
    assert sample_tokens(logits, [0, 1], temperature=0.0, top_k=0, top_p=1.0, seed=1).tolist() == [1, 0]


def test_sampling_follows_softmax():
    logits = torch.tensor([math.log(0.6), math.log(0.3), math.log(0.1)])
    draws = torch.stack(
        [sample_tokens(logits[None], [pos], temperature=1.0, top_k=0, top_p=1.0, seed=123)[0] for pos in range(3000)]
    )
    freq = torch.bincount(draws, minlength=3).float() / len(draws)
    assert torch.allclose(freq, torch.tensor([0.6, 0.3, 0.1]), atol=0.04), freq


def test_sampling_respects_top_k():
    logits = torch.tensor([[1.0, 1.0, 1.0, 5.0]])
    draws = {int(sample_tokens(logits, [p], temperature=2.0, top_k=1, top_p=1.0, seed=5)[0]) for p in range(50)}
    assert draws == {3}


def test_softcap_bounds_logits_and_keeps_small_ones():
    logits = torch.tensor([0.0, 0.01, 30.0 * math.atanh(0.5), 1e6, -1e6])
    capped = softcap(logits, 30.0)
    assert torch.allclose(capped, torch.tensor([0.0, 0.01, 15.0, 30.0, -30.0]), atol=1e-5)
    assert softcap(logits, None) is logits  # models without soft-capping


def test_draw_tokens_takes_its_noise_from_the_caller():
    logits = torch.zeros(2, 4)
    noise = torch.tensor([[0.0, 0.0, 9.0, 0.0], [0.0, 0.0, 0.0, 9.0]])
    assert draw_tokens(logits, noise, temperature=1.0, top_k=0, top_p=1.0).tolist() == [2, 3]
    # Filtering comes before the noise: a token outside the top-k never wins, however noisy.
    peaked = torch.tensor([[5.0, 4.0, 0.0, 0.0]])
    big = torch.tensor([[0.0, 50.0, 0.0, 0.0]])
    assert draw_tokens(peaked, big, temperature=1.0, top_k=1, top_p=1.0).tolist() == [0]
    assert draw_tokens(peaked, None, temperature=0.0, top_k=0, top_p=1.0).tolist() == [0]  # greedy: no noise
    with pytest.raises(ValueError):
        draw_tokens(peaked, None, temperature=0.5, top_k=0, top_p=1.0)


def test_sample_tokens_is_draw_tokens_with_keyed_noise():
    """AR draws through sample_tokens, parallel refinement through draw_tokens with noise it
    keeps per position: both must pick the same token for the same logits and position."""
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(0))
    positions = [4, 9, 4]
    noise = gumbel_noise(11, positions, 40)
    for temperature, top_k, top_p in ((1.0, 0, 1.0), (0.7, 5, 0.9)):
        expected = sample_tokens(logits, positions, temperature=temperature, top_k=top_k, top_p=top_p, seed=11)
        drawn = draw_tokens(logits, noise, temperature=temperature, top_k=top_k, top_p=top_p)
        assert drawn.tolist() == expected.tolist()
