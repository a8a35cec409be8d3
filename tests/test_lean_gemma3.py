"""The lean Gemma 3 layers compute what transformers' layers compute (sampler/runtime/lean_gemma3.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

from sampler.runtime.lean_gemma3 import LeanGemma3Layer, make_lean
from sampler.runtime.loading import _load_tiny_gemma3


def _tiny_pair(dtype: torch.dtype) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A tiny Gemma 3 with random norm weights too (the tiny builder leaves them at 0, i.e. a
    scale of 1, which would not exercise the folded `1 + weight`), and its lean copy."""
    ref = _load_tiny_gemma3(torch.float32, torch.device("cpu")).model  # transformers' own layers
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in ref.named_parameters():
            if param.dim() == 1 and "norm" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    ref = ref.to(dtype)
    lean = copy.deepcopy(ref)
    assert make_lean(lean)
    return ref, lean


def _greedy(model: torch.nn.Module, prompt: torch.Tensor, steps: int) -> tuple[list[torch.Tensor], list[int]]:
    """Prefill then `steps` greedy decode steps on a DynamicCache: the logits of each and the tokens."""
    logits, tokens = [], []
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        out = model(input_ids=prompt, cache=cache, use_cache=True)
        for _ in range(steps):
            logits.append(out.logits[:, -1].float())
            tokens.append(int(out.logits[0, -1].argmax()))
            out = model(input_ids=torch.tensor([[tokens[-1]]]), cache=cache, use_cache=True)
    return logits, tokens


def test_swaps_every_layer_and_keeps_the_weights():
    ref, lean = _tiny_pair(torch.float32)
    layers = list(lean.model.layers)
    assert layers and all(isinstance(layer, LeanGemma3Layer) for layer in layers)
    attn = ref.model.layers[0].self_attn
    # The fused projection is the three weights stacked, in q, k, v order.
    fused = layers[0].qkv_proj.weight
    assert torch.equal(fused, torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
    assert lean.lm_head.weight is lean.model.embed_tokens.weight or not ref.config.tie_word_embeddings


def test_float32_prefill_and_decode_match_transformers_past_the_sliding_window():
    ref, lean = _tiny_pair(torch.float32)
    prompt = torch.tensor([[5, 9, 17, 33, 65, 129, 257, 7, 11, 13]])
    # 30 steps: the sliding layer's window (16) is crossed during decode.
    ref_logits, ref_tokens = _greedy(ref, prompt, 30)
    lean_logits, lean_tokens = _greedy(lean, prompt, 30)
    assert lean_tokens == ref_tokens
    for a, b in zip(ref_logits, lean_logits, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_left_padded_batch_with_a_mask_matches_transformers():
    ref, lean = _tiny_pair(torch.float32)
    ids = torch.tensor([[0, 0, 0, 5, 9, 17, 33], [7, 11, 13, 17, 19, 23, 29]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1] * 7])
    positions = torch.tensor([[0, 0, 0, 0, 1, 2, 3], list(range(7))])
    with torch.inference_mode():
        outs = [
            m(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                cache=DynamicCache(config=m.config),
                use_cache=True,
            )
            for m in (ref, lean)
        ]
    # Padding rows' outputs are never read; the real rows must agree.
    torch.testing.assert_close(outs[1].logits[0, 3:], outs[0].logits[0, 3:], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outs[1].logits[1], outs[0].logits[1], rtol=1e-4, atol=1e-4)
    for ref_layer, lean_layer in zip(outs[0].cache.layers, outs[1].cache.layers, strict=True):
        torch.testing.assert_close(lean_layer.keys[1], ref_layer.keys[1], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(lean_layer.values[1], ref_layer.values[1], rtol=1e-5, atol=1e-5)


def test_bfloat16_matches_transformers_within_bfloat16_rounding():
    ref, lean = _tiny_pair(torch.bfloat16)
    prompt = torch.tensor([[5, 9, 17, 33, 65, 129]])
    ref_logits, _ = _greedy(ref, prompt, 4)
    lean_logits, _ = _greedy(lean, prompt, 4)
    for a, b in zip(ref_logits, lean_logits, strict=True):
        # A bfloat16 value carries 8 bits: a few units in the last place, relative to the logits' scale.
        assert (a - b).abs().max() <= 0.05 * a.abs().max()


def test_other_models_are_left_alone():
    from sampler.runtime.tiny_diffusion import load_tiny_diffusion

    loaded = load_tiny_diffusion(torch.float32, torch.device("cpu"))
    before = [type(m) for m in loaded.model.modules()]
    assert not make_lean(loaded.model)
    assert [type(m) for m in loaded.model.modules()] == before


@pytest.mark.slow
def test_real_gemma_greedy_text_is_transformers_own():
    from sampler.runtime.loading import load_model

    lean = load_model("gemma3-270m", dtype="float32", device="cpu", cpu_gemm="native").model
    assert isinstance(lean.model.layers[0], LeanGemma3Layer)
    from transformers import AutoModelForCausalLM

    from sampler.runtime.loading import builtin_gemma3_270m_dir

    ref = AutoModelForCausalLM.from_pretrained(str(builtin_gemma3_270m_dir()), dtype=torch.float32).eval()
    for text_ids in ([2, 818, 5279, 529, 7001, 563], [2, 2063, 123340, 236769, 236749, 1473]):
        prompt = torch.tensor([text_ids])
        ref_logits, ref_tokens = _greedy(ref, prompt, 24)
        lean_logits, lean_tokens = _greedy(lean, prompt, 24)
        assert lean_tokens == ref_tokens
        for a, b in zip(ref_logits, lean_logits, strict=True):
            assert (a - b).abs().max() < 2e-3 * a.abs().max()
