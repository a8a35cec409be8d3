"""The CPU linear kernels give the stock kernels' values and keep the model intact; the kernel
choice follows the CPU's flags (faked here) and the start-up measurement (scripted here)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sampler.runtime.cpu_features import CpuFeatures, detect
from sampler.runtime.cpu_linear import (
    CpuLinear,
    Kernel,
    candidates,
    describe_plan,
    flags_plan,
    kernel_summary,
    measure_plan,
    onednn_linear_works,
    packed_works,
    speed_up_linears,
)

needs_onednn = pytest.mark.skipif(not onednn_linear_works(), reason="this torch build has no oneDNN linear")


AVX2 = CpuFeatures(frozenset({"avx", "avx2", "fma"}), "AVX2")
AMX = CpuFeatures(
    frozenset({"avx2", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "amx_bf16", "amx_tile"}),
    "AVX512",
)
AVX512_NO_BF16 = CpuFeatures(frozenset({"avx2", "avx512f", "avx512bw", "avx512vl", "avx512dq"}), "AVX512")


@needs_onednn
@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("big", [False, True])
@pytest.mark.parametrize("kernel", ["stock", "onednn", "packed"])
def test_float32_matches_stock_kernel(rows: int, big: bool, kernel: Kernel) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(640, 8192 if big else 64, bias=True)
    fast = CpuLinear(linear, ((16, kernel),))
    x = torch.randn(2, rows, 640)
    torch.testing.assert_close(fast(x), F.linear(x, linear.weight, linear.bias), rtol=1e-5, atol=1e-5)
    assert fast(x).shape == (2, rows, linear.out_features)


@needs_onednn
@pytest.mark.parametrize("rows", [1, 5])
def test_bfloat16_matches_a_bfloat16_gemm(rows: int) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(256, 512, bias=False).to(torch.bfloat16)
    fast = CpuLinear(linear, flags_plan(torch.bfloat16, AVX2, bf16_packs=False))  # 1 row stock, 5 widened
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


# ---- the choice: flags, then the measurement -------------------------------------------------


def test_candidates_follow_the_flags():
    assert candidates(torch.float32, AVX2, bf16_packs=False) == ["packed", "onednn", "stock"]
    assert candidates(torch.bfloat16, AVX2, bf16_packs=False) == ["widened", "stock"]
    assert candidates(torch.bfloat16, AMX, bf16_packs=True) == ["packed", "stock"]
    # Flags that promise bfloat16 on a torch whose oneDNN refuses it, or AVX512 without BF16: widened.
    assert candidates(torch.bfloat16, AMX, bf16_packs=False) == ["widened", "stock"]
    assert candidates(torch.bfloat16, AVX512_NO_BF16, bf16_packs=True) == ["widened", "stock"]
    assert candidates(torch.float16, AMX, bf16_packs=True) == []


def test_flags_plans():
    assert flags_plan(torch.bfloat16, AMX, bf16_packs=True) == ((16, "packed"),)
    assert flags_plan(torch.bfloat16, AVX2, bf16_packs=False) == ((1, "stock"), (16, "widened"))
    assert flags_plan(torch.float32, AVX2, bf16_packs=False) == ((16, "packed"),)
    assert flags_plan(torch.float16, AVX2, bf16_packs=False) == ()
    assert describe_plan(((1, "stock"), (4, "packed"), (16, "packed"))) == "1: stock, 2-4: packed, 5+: packed"


def test_measurement_keeps_the_fastest_per_row_count_and_the_incumbent_within_the_margin():
    times = {  # (kernel, rows) -> seconds; packed is the flags' pick (listed first)
        ("packed", 1): 1.00, ("onednn", 1): 0.97, ("stock", 1): 0.50,  # stock clearly faster
        ("packed", 4): 1.00, ("onednn", 4): 0.97, ("stock", 4): 2.00,  # onednn within 5 %: packed stays
        ("packed", 16): 1.00, ("onednn", 16): 0.80, ("stock", 16): 0.90,
    }  # fmt: skip
    seen = []

    def measure(layer: CpuLinear, kernel: Kernel, rows: int) -> float:
        seen.append((layer.out_features, kernel, rows))
        return times[(kernel, rows)]

    plan = measure_plan(nn.Linear(64, 32), ["packed", "onednn", "stock"], measure)
    assert plan == ((1, "stock"), (4, "packed"), (16, "onednn"))
    assert len(seen) == 9 and {out for out, _, _ in seen} == {32}


@needs_onednn
def test_measurement_times_a_slice_of_a_big_weight():
    big = nn.Linear(64, 1024 * 1024, bias=False)  # 256 MiB of float32: above the measured 64 MiB
    sizes = []
    measure_plan(big, ["onednn", "stock"], lambda layer, kernel, rows: sizes.append(layer.out_features) or 1.0)
    assert set(sizes) == {64 * 2**20 // (64 * 4)}  # every timing on the same 64 MiB row slice


def _model_with(kernel: Kernel, dtype: torch.dtype, tokenizer, features: CpuFeatures = AVX2) -> nn.Module:
    """The tiny model in `dtype` with every linear on `kernel`: a scripted measurement makes it fastest."""
    model = _fresh_tiny_gemma3(tokenizer).to(dtype)
    speed_up_linears(
        model, "auto", features=features, measure=lambda _l, k, _r: 0.0 if k == kernel else 1.0, measure_min_bytes=0
    )
    return model


def _kernels_of(model: nn.Module) -> set[str]:
    return {k for m in model.modules() if isinstance(m, CpuLinear) for _, k in m.plan}


@needs_onednn
@pytest.mark.parametrize("kernel", ["stock", "onednn", "packed"])
def test_each_float32_path_matches_the_float32_model(kernel: Kernel, tiny_loaded, one_torch_thread) -> None:
    ids = torch.tensor([[5, 9, 13, 2, 7, 30, 31], [8, 8, 3, 40, 41, 2, 6]])
    with torch.inference_mode():
        reference = _fresh_tiny_gemma3(tiny_loaded.tokenizer)(input_ids=ids).logits
        model = _model_with(kernel, torch.float32, tiny_loaded.tokenizer)
        assert _kernels_of(model) == {kernel}
        # float32 sums in another order: a few ulps of the logits.
        torch.testing.assert_close(model(input_ids=ids).logits, reference, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model(input_ids=ids[:1, :1]).logits, reference[:1, :1], rtol=1e-4, atol=1e-4)


def _bf16_kernels_here() -> list[Kernel]:
    return ["stock", "widened"] + (["packed"] if packed_works(torch.bfloat16) else [])


@needs_onednn
@pytest.mark.parametrize("kernel", _bf16_kernels_here())
def test_each_bfloat16_path_stays_near_the_float32_model(kernel: Kernel, tiny_loaded, one_torch_thread) -> None:
    ids = torch.tensor([[5, 9, 13, 2, 7, 30, 31], [8, 8, 3, 40, 41, 2, 6]])
    features = AMX if kernel == "packed" else AVX2
    with torch.inference_mode():
        reference = _fresh_tiny_gemma3(tiny_loaded.tokenizer)(input_ids=ids).logits
        model = _model_with(kernel, torch.bfloat16, tiny_loaded.tokenizer, features)
        assert _kernels_of(model) == {kernel}
        logits = model(input_ids=ids).logits.float()
    # bfloat16 keeps 8 bits of mantissa: weights and activations round at ~0.4 % each, through
    # every layer; stated bound: within 5 % of the logits' largest magnitude, and the same top-1
    # token wherever float32's leads its runner-up by more than twice that bound.
    atol = 0.05 * float(reference.abs().max())
    torch.testing.assert_close(logits, reference, rtol=0.0, atol=atol)
    top2 = reference.topk(2, dim=-1).values
    decisive = top2[..., 0] - top2[..., 1] > 2 * atol
    assert decisive.any()
    assert torch.equal(logits.argmax(-1)[decisive], reference.argmax(-1)[decisive])


@needs_onednn
def test_faked_amx_picks_prepacked_bfloat16_only_where_onednn_runs_it(tiny_loaded) -> None:
    model = _fresh_tiny_gemma3(tiny_loaded.tokenizer).to(torch.bfloat16)
    speed_up_linears(model, "flags", features=AMX)
    expected = {"packed"} if packed_works(torch.bfloat16) else {"stock", "widened"}
    assert _kernels_of(model) == expected


@needs_onednn
def test_this_cpu_never_gets_a_bfloat16_kernel_it_cannot_run(tiny_loaded) -> None:
    model = _fresh_tiny_gemma3(tiny_loaded.tokenizer).to(torch.bfloat16)
    speed_up_linears(model, "flags")  # detected flags
    if not detect().native_bf16:
        assert "packed" not in _kernels_of(model)
    if not packed_works(torch.bfloat16):  # e.g. an AVX2-only CPU: the reorder refuses bfloat16
        assert _kernels_of(model) == {"stock", "widened"}
    with torch.inference_mode():  # and every chosen kernel runs
        assert model(input_ids=torch.tensor([[5, 9, 13, 2, 7]])).logits.isfinite().all()


@needs_onednn
def test_small_weights_get_the_flags_plan_without_a_measurement(tiny_loaded) -> None:
    model = _fresh_tiny_gemma3(tiny_loaded.tokenizer)
    timed = []
    speed_up_linears(model, "auto", features=AVX2, measure=lambda *args: timed.append(args) or 1.0)
    assert timed == [] and _kernels_of(model) == {"packed"}  # tiny weights: under the measured size


@needs_onednn
def test_kernel_summary_names_each_shape_once(tiny_loaded) -> None:
    model = _model_with("onednn", torch.float32, tiny_loaded.tokenizer)
    summary = kernel_summary(model)
    shapes = {(m.out_features, m.in_features) for m in model.modules() if isinstance(m, CpuLinear)}
    assert len(summary) == len(shapes)
    assert set(summary.values()) == {"1: onednn, 2-4: onednn, 5+: onednn"}
    head = model.get_output_embeddings()
    assert any(k.startswith(f"{head.out_features}x{head.in_features} float32") for k in summary)
