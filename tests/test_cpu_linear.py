"""The per-shape CPU linear kernels give the stock kernels' values and keep the model intact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sampler.runtime.cpu_linear import CpuLinear, onednn_linear_works, speed_up_linears

needs_onednn = pytest.mark.skipif(not onednn_linear_works(), reason="this torch build has no oneDNN linear")


@needs_onednn
@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("big", [False, True])
def test_float32_matches_stock_kernel(rows: int, big: bool) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(640, 8192 if big else 64, bias=True)  # big: past the small-weight cutoff
    fast = CpuLinear(linear, widen_bf16=True)
    x = torch.randn(2, rows, 640)
    torch.testing.assert_close(fast(x), F.linear(x, linear.weight, linear.bias), rtol=1e-5, atol=1e-5)
    assert fast(x).shape == (2, rows, linear.out_features)


@needs_onednn
@pytest.mark.parametrize("rows", [1, 5])
def test_bfloat16_matches_a_bfloat16_gemm(rows: int) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(256, 512, bias=False).to(torch.bfloat16)
    fast = CpuLinear(linear, widen_bf16=True)
    x = torch.randn(rows, 256).to(torch.bfloat16)
    out = fast(x)
    assert out.dtype == torch.bfloat16
    # Both accumulate bfloat16 products in float32; only the summation order may differ.
    reference = (x.float() @ linear.weight.float().T).to(torch.bfloat16)
    torch.testing.assert_close(out, reference, rtol=1.6e-2, atol=1e-2)


def _fresh_tiny_gemma3(tokenizer) -> nn.Module:
    """The tiny model as built, before load_model swaps its linears."""
    from sampler.runtime.tiny import build_tiny_gemma3

    return build_tiny_gemma3(
        len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    ).eval()


@needs_onednn
def test_model_keeps_ties_hooks_and_outputs(tiny_loaded) -> None:
    model = _fresh_tiny_gemma3(tiny_loaded.tokenizer)
    ids = torch.tensor([[5, 9, 13, 2, 7, 30, 31]])
    with torch.inference_mode():
        before = model(input_ids=ids).logits
    linears = sum(type(m) is nn.Linear for m in model.modules())
    head_weight = model.lm_head.weight
    assert speed_up_linears(model, "auto") == linears > 0
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert model.lm_head.weight is head_weight  # the same Parameter: ties and state_dict survive
    seen = []
    handle = model.lm_head.register_forward_hook(lambda _m, _i, out: seen.append(out.shape))
    with torch.inference_mode():
        after = model(input_ids=ids).logits
    handle.remove()
    assert seen and seen[0][-1] == before.shape[-1]
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_native_mode_changes_nothing(tiny_loaded) -> None:
    model = _fresh_tiny_gemma3(tiny_loaded.tokenizer)
    assert speed_up_linears(model, "native") == 0
    assert any(type(m) is nn.Linear for m in model.modules())


@needs_onednn
def test_load_model_swaps_linears_on_cpu(tiny_loaded) -> None:
    assert any(isinstance(m, CpuLinear) for m in tiny_loaded.model.modules())
