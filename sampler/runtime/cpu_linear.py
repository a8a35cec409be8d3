"""CPU kernels for a model's linear layers, chosen at load from the CPU's flags and a short measurement.

Which kernel is fastest depends on the CPU, the weight's shape and dtype and the number of rows
(docs/load.md, "Kernel choice", has both machines' tables). So nothing here is a constant tuned on
one machine: the CPU's flags (sampler/runtime/cpu_features.py) say which kernels can run well,
and with `cpu_gemm: auto` a start-up measurement times each of them per distinct weight shape at
1, 4 and 16 rows and keeps the fastest per row bucket. The kernels:

* `stock`: torch's `F.linear` (MKL sgemm for float32; a bfloat16 GEMM that widens to float32
  inside on CPUs without native bfloat16).
* `onednn`: oneDNN's inner product on the dense float32 weight (reordered on every call).
* `packed`: oneDNN with the weight reordered once at load into its blocked layout
  (`torch.ops.mkldnn._reorder_linear_weight` + `_linear_pointwise`, what inductor's freezing
  emits). float32 everywhere; bfloat16 only where oneDNN has hardware bfloat16 (AMX or
  AVX512-BF16: the reorder refuses on AVX2). Costs a copy of the weight in its dtype.
* `half` (only with `quantization: fp16`, `halve_linears`): fbgemm's packed float16 copy of a
  float32 weight, float32 activations and arithmetic: half the bytes to stream, the weight
  rounded to float16 (not chosen by any measurement: it changes the numbers).
* `widened`: bfloat16 weights on CPUs without native bfloat16: the rows run in float32 against
  a packed float32 copy (+4 bytes per parameter), rounded back to bfloat16. Such a CPU widens
  a bfloat16 GEMM to float32 and accumulates in float32 anyway, so the values are a bfloat16
  GEMM's up to the order of summation.

Parameters stay shared with the original module (tied embeddings stay tied); forward hooks on
the replaced module keep working because the replacement is itself the module the parent holds.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from sampler.runtime.cpu_features import CpuFeatures, detect

log = logging.getLogger("dgserve.cpu_linear")

CpuGemm = Literal["auto", "flags", "native"]
Kernel = Literal["stock", "onednn", "packed", "widened", "half"]
# A kernel per row bucket: ((max_rows, kernel), ...), ascending; the last bucket takes every larger count.
Plan = tuple[tuple[int, Kernel], ...]
# (layer, kernel, rows) -> seconds per call; injectable so tests script the measurement.
Measure = Callable[["CpuLinear", Kernel, int], float]

# The row counts measured at start-up: one decode row, a few, a 16-client batch or refinement block.
MEASURED_ROWS = (1, 4, 16)
# The measurement times a slice of a big weight (the LM head): past the CPU's caches the cost per
# byte is what matters, and the whole 262144 x 640 head would take seconds per kernel. 64 MiB is
# past most L3 caches a 2-core slice of a server sees.
_MEASURE_MAX_BYTES = 64 * 2**20
# Weights smaller than this are not measured (the flags' plan): their calls cost microseconds,
# while timing them costs oneDNN's primitive set-up, tens of ms per shape and row count.
_MEASURE_MIN_BYTES = 256 * 2**10
# A kernel replaces the incumbent only when it is this much faster: timing noise on a shared
# machine must not flip kernels (and with them the last bits of float32 sums) from start to start.
_MARGIN = 0.05


def onednn_linear_works() -> bool:
    """Whether this torch build runs oneDNN's float32 linear on dense tensors (x86 CPU builds)."""
    try:
        out = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 4), torch.ones(3, 4), None, "none", [], "")
        return bool(torch.equal(out, torch.full((2, 3), 4.0)))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def packed_works(dtype: torch.dtype) -> bool:
    """Whether oneDNN reorders and multiplies a `dtype` weight here (bfloat16 needs AVX512 or newer)."""
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(torch.ones(3, 4, dtype=dtype), None)
        out = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 4, dtype=dtype), packed, None, "none", [], "")
        return bool(torch.equal(out.float(), torch.full((2, 3), 4.0)))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def candidates(dtype: torch.dtype, features: CpuFeatures, *, bf16_packs: bool) -> list[Kernel]:
    """The kernels worth timing for a `dtype` weight on a CPU with `features`, the flags' pick first.

    `bf16_packs`: whether oneDNN's bfloat16 reorder actually runs here (`packed_works`); flags
    that promise native bfloat16 on a torch that cannot use it must not pick it.
    """
    if dtype == torch.float32:
        return ["packed", "onednn", "stock"]
    if dtype == torch.bfloat16:
        if features.native_bf16 and features.bf16_prepack and bf16_packs:
            return ["packed", "stock"]
        return ["widened", "stock"]
    return []


def flags_plan(dtype: torch.dtype, features: CpuFeatures, *, bf16_packs: bool) -> Plan:
    """The plan without a measurement (`cpu_gemm: flags`): the flags' kernel for every row count,
    except one bfloat16 row on a CPU without native bfloat16, which streams half the bytes in
    bfloat16 rather than widening (a single row is bandwidth-bound, not arithmetic-bound)."""
    kernels = candidates(dtype, features, bf16_packs=bf16_packs)
    if not kernels:
        return ()
    if kernels[0] == "widened":
        return ((1, "stock"), (MEASURED_ROWS[-1], "widened"))
    return ((MEASURED_ROWS[-1], kernels[0]),)


def half_works() -> bool:
    """Whether fbgemm's packed float16 GEMM is in this torch build (x86 CPUs)."""
    return (
        hasattr(torch.ops.quantized, "linear_prepack_fp16") and "fbgemm" in torch.backends.quantized.supported_engines
    )


def _pack_half(linear: nn.Linear) -> torch.Tensor:
    bias = None if linear.bias is None else linear.bias.detach().float()
    return torch.ops.quantized.linear_prepack_fp16(linear.weight.detach().float().contiguous(), bias)


def _reorder(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), None)


class CpuLinear(nn.Module):
    """Drop-in for an `nn.Linear` on CPU running the kernel its `plan` gives each row count."""

    def __init__(self, linear: nn.Linear, plan: Plan, *, prepare: tuple[Kernel, ...] = ()) -> None:
        """`prepare`: kernels to make ready besides the plan's (a measurement proxy runs them all)."""
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight  # the same Parameter: ties and state_dict keys are kept
        self.bias = linear.bias
        self.plan = plan
        used = {kernel for _, kernel in plan} | set(prepare)
        # Derived copies of the weight; not parameters, not saved. Shapes: (out, in), oneDNN-blocked.
        self._packed = _reorder(linear.weight) if "packed" in used else None
        self._packed32 = _reorder(linear.weight.float()) if "widened" in used else None
        self._bias32 = None if linear.bias is None or "widened" not in used else linear.bias.detach().float()
        self._half = _pack_half(linear) if "half" in used else None

    def extra_bytes(self) -> int:
        """Bytes held beyond the shared parameters (packed copies)."""
        copies = (self._packed, self._packed32)
        half = self.weight.numel() * 2 if self._half is not None else 0
        return sum(t.numel() * t.element_size() for t in copies if t is not None) + half

    def kernel_for(self, rows: int) -> Kernel:
        for max_rows, kernel in self.plan:
            if rows <= max_rows:
                return kernel
        return self.plan[-1][1] if self.plan else "stock"

    def run(self, kernel: Kernel, x2d: torch.Tensor) -> torch.Tensor:
        """`kernel` on a (rows, in_features) input; (rows, out_features) out, in x's dtype."""
        if kernel == "onednn":
            return torch.ops.mkldnn._linear_pointwise(x2d, self.weight, self.bias, "none", [], "")
        if kernel == "packed" and self._packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x2d, self._packed, self.bias, "none", [], "")
        if kernel == "half" and self._half is not None:
            return torch.ops.quantized.linear_dynamic_fp16(x2d, self._half)
        if kernel == "widened" and self._packed32 is not None:
            out = torch.ops.mkldnn._linear_pointwise(x2d.float(), self._packed32, self._bias32, "none", [], "")
            return out.to(x2d.dtype)
        return F.linear(x2d, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features if self.in_features else 0
        if x.device.type != "cpu" or rows == 0 or x.dtype != self.weight.dtype:
            return F.linear(x, self.weight, self.bias)
        out = self.run(self.kernel_for(rows), x.reshape(rows, self.in_features))
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        shape = f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        return f"{shape}, plan=({describe_plan(self.plan)})"


def time_kernel(layer: CpuLinear, kernel: Kernel, rows: int) -> float:
    """Seconds per call of `kernel` at `rows` rows: the best of two after a warm-up call."""
    x = torch.randn(rows, layer.in_features, generator=torch.Generator().manual_seed(rows)).to(layer.weight.dtype)
    best = float("inf")
    with torch.inference_mode():
        for i in range(3):
            start = time.perf_counter()
            layer.run(kernel, x)
            if i:
                best = min(best, time.perf_counter() - start)
    return best


def measure_plan(linear: nn.Linear, kernels: list[Kernel], measure: Measure = time_kernel) -> Plan:
    """The fastest of `kernels` per row bucket, timed on a proxy of `linear` (a row slice of a big
    weight). Ties within the margin go to the earlier kernel of the list (the flags' pick)."""
    weight = linear.weight.detach()
    row_bytes = max(1, weight.shape[1] * weight.element_size())
    rows_kept = max(1, min(weight.shape[0], _MEASURE_MAX_BYTES // row_bytes))
    proxy_linear = nn.Linear(linear.in_features, rows_kept, bias=linear.bias is not None)
    proxy_linear.weight = nn.Parameter(weight[:rows_kept], requires_grad=False)
    if linear.bias is not None:
        proxy_linear.bias = nn.Parameter(linear.bias.detach()[:rows_kept], requires_grad=False)
    proxy = CpuLinear(proxy_linear, (), prepare=tuple(kernels))
    plan: list[tuple[int, Kernel]] = []
    for rows in MEASURED_ROWS:
        best, best_s = kernels[0], measure(proxy, kernels[0], rows)
        for kernel in kernels[1:]:
            seconds = measure(proxy, kernel, rows)
            if seconds < best_s * (1 - _MARGIN):
                best, best_s = kernel, seconds
        plan.append((rows, best))
    return tuple(plan)


def _targets(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    return [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear and child.weight.device.type == "cpu"
    ]


def speed_up_linears(
    model: nn.Module,
    mode: CpuGemm = "auto",
    *,
    features: CpuFeatures | None = None,
    measure: Measure = time_kernel,
    measure_min_bytes: int = _MEASURE_MIN_BYTES,
) -> int:
    """Replace every CPU `nn.Linear` of `model` with a `CpuLinear` planned by `mode`. Returns how many.

    `auto`: measured plans (one measurement per distinct weight shape and dtype); `flags`: the
    flags' plan; `native` leaves the model alone, as does a torch build without oneDNN's linear.
    Weights under `measure_min_bytes` get the flags' plan under `auto` too.
    """
    if mode == "native" or not onednn_linear_works():
        return 0
    features = features or detect()
    bf16_packs = packed_works(torch.bfloat16)
    started = time.monotonic()
    plans: dict[tuple[int, int, torch.dtype, bool], Plan] = {}
    replacements: dict[int, CpuLinear] = {}  # a Linear shared by two parents gets one replacement
    for parent, name, child in _targets(model):
        key = (child.out_features, child.in_features, child.weight.dtype, child.bias is not None)
        if key not in plans:
            kernels = candidates(child.weight.dtype, features, bf16_packs=bf16_packs)
            big = child.weight.numel() * child.weight.element_size() >= measure_min_bytes
            if mode == "auto" and big and len(kernels) > 1:
                plans[key] = measure_plan(child, kernels, measure)
            else:
                plans[key] = flags_plan(child.weight.dtype, features, bf16_packs=bf16_packs)
        if not plans[key]:
            continue  # a dtype with no CPU kernel of ours (float16): torch's own
        if id(child) not in replacements:
            replacements[id(child)] = CpuLinear(child, plans[key])
        setattr(parent, name, replacements[id(child)])
    extra = sum(m.extra_bytes() for m in replacements.values())
    log.info(
        "CPU linears on %s: %d replaced, cpu_gemm %s (%.1f s), +%.0f MiB of packed weights; %s",
        features.describe(),
        len(replacements),
        mode,
        time.monotonic() - started,
        extra / 2**20,
        "; ".join(f"{shape}: {plan}" for shape, plan in kernel_summary(model).items()) or "none",
    )
    return len(replacements)


def describe_plan(plan: Plan) -> str:
    """'1: stock, 2-4: packed, 5+: packed' for a plan."""
    parts, low = [], 1
    for i, (max_rows, kernel) in enumerate(plan):
        last = i == len(plan) - 1
        span = f"{low}+" if last else (f"{low}" if low == max_rows else f"{low}-{max_rows}")
        parts.append(f"{span}: {kernel}")
        low = max_rows + 1
    return ", ".join(parts)


def kernel_summary(model: nn.Module) -> dict[str, str]:
    """Each distinct CPU linear shape ('262144x640 bfloat16', with a count when several layers share
    it) and its plan: what a benchmark table prints as the kernels chosen."""
    shapes: Counter[tuple[str, str]] = Counter()
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, CpuLinear) and id(module) not in seen:
            seen.add(id(module))
            dtype = str(module.weight.dtype).removeprefix("torch.")
            shapes[(f"{module.out_features}x{module.in_features} {dtype}", describe_plan(module.plan))] += 1
    return {f"{shape}{f' x{n}' if n > 1 else ''}": plan for (shape, plan), n in sorted(shapes.items())}


def halve_linears(model: nn.Module, *, keep: nn.Module | None = None) -> int:
    """`quantization: fp16`: every float32 CPU linear of `model` but `keep` (the LM head, whose
    draws the certified head keeps exact) runs fbgemm's float16 kernel at every row count.
    Returns how many. Its float32 weight stays (shared, tied) but its packed float32 copy goes."""
    if not half_works():
        return 0
    halved: dict[int, CpuLinear] = {}
    targets = [
        (owner, name, child)
        for owner in model.modules()
        for name, child in owner.named_children()
        if isinstance(child, (nn.Linear, CpuLinear)) and child is not keep
    ]
    for parent, name, child in targets:
        weight = child.weight
        if weight.dtype != torch.float32 or weight.device.type != "cpu":
            continue
        if id(child) not in halved:
            source = child if isinstance(child, nn.Linear) else _as_linear(child)
            halved[id(child)] = CpuLinear(source, ((MEASURED_ROWS[-1], "half"),))
        setattr(parent, name, halved[id(child)])
    log.info(
        "quantization fp16: %d linears run float16 weights (float32 arithmetic), +%.0f MiB",
        len(halved),
        sum(m.extra_bytes() for m in halved.values()) / 2**20,
    )
    return len(halved)


def _as_linear(layer: CpuLinear) -> nn.Linear:
    """An `nn.Linear` sharing a `CpuLinear`'s parameters (to build another plan from)."""
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    linear.weight = layer.weight
    linear.bias = layer.bias
    return linear
