"""`quantization: fp16` (sampler/runtime/cpu_linear.py `halve_linears`): a float32 model's linears
but the LM head stream float16 copies of their weights in float32 arithmetic; parallel refinement
stays identical to AR on those weights."""

from __future__ import annotations

import pytest
import torch

from sampler.registry import build_sampler
from sampler.runtime.cpu_linear import CpuLinear
from sampler.runtime.loading import load_model
from sampler.types import SamplingParams
from server.engine_core import run_to_completion

PROMPTS = {"a": [5, 9, 17, 33, 65, 129, 7], "b": [2, 40, 41, 42, 40, 41, 42, 40]}


@pytest.fixture(scope="module")
def halved(one_torch_thread):
    return load_model("tiny-gemma3", dtype="float32", device="cpu", quantization="fp16")


def _linears(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, CpuLinear))}


def test_every_linear_but_the_head_runs_float16_weights(halved) -> None:
    head = halved.model.get_output_embeddings()
    linears = _linears(halved.model)
    assert len(linears) > 1
    for name, layer in linears.items():
        kernels = {kernel for _, kernel in getattr(layer, "plan", ())}
        assert (kernels == {"half"}) == (layer is not head), name
    assert head.weight.dtype == torch.float32  # the head's draws stay float32 (certified head)


def test_logits_stay_close_to_float32(halved, tiny_loaded) -> None:
    ids = torch.tensor([PROMPTS["a"]])
    with torch.inference_mode():
        want = tiny_loaded.model(input_ids=ids).logits
        got = halved.model(input_ids=ids).logits
    assert not torch.equal(got, want)  # the weights really are rounded
    assert (got - want).abs().max() < 1e-2 * want.abs().max()


@pytest.mark.parametrize(
    "params",
    [SamplingParams(max_tokens=32, temperature=0), SamplingParams(max_tokens=32, temperature=1.0, seed=11)],
    ids=["greedy", "seeded-t1"],
)
def test_parallel_equals_ar_on_float16_weights(halved, params: SamplingParams) -> None:
    jobs = {k: (p, params) for k, p in PROMPTS.items()}
    ar = run_to_completion(build_sampler("ar", halved), jobs).tokens
    assert run_to_completion(build_sampler("parallel", halved), jobs).tokens == ar


def test_not_applied_to_bfloat16_weights_and_applied_without_cpu_gemm(one_torch_thread) -> None:
    bf16 = load_model("tiny-gemma3", dtype="bfloat16", device="cpu", quantization="fp16")
    assert all("half" not in {k for _, k in getattr(m, "plan", ())} for m in _linears(bf16.model).values())
    native = load_model("tiny-gemma3", dtype="float32", device="cpu", cpu_gemm="native", quantization="fp16")
    halved_layers = [m for m in _linears(native.model).values() if isinstance(m, CpuLinear)]
    assert halved_layers and all(m.plan == ((16, "half"),) for m in halved_layers)
