"""Faster CPU matrix products for a model's linear layers, kernel chosen per call by shape.

Why: on an x86 CPU without native bfloat16 (AVX2 only, as on the development machines) the
stock kernels scale badly with the number of rows, and batched decoding (16 rows per forward)
or a parallel-refinement block (8-40 rows) is all about many rows. Measured there, 2 threads,
the Gemma 3 LM head (262144 x 640), ms per call:

    rows                        1     4     8    16
    float32, MKL sgemm         76   176   199   234
    float32, oneDNN            43    71    75   109
    bfloat16, stock kernel     26    85   174   330

and a 2048 x 640 MLP projection at 16 rows: MKL 1.8, oneDNN 0.7, bfloat16 2.8. So:

* float32 weights: oneDNN's inner product, except for one row against a small weight, where
  MKL's call overhead is lower (0.12 vs 0.17 ms for 1024 x 640).
* bfloat16 weights on a CPU without native bfloat16: up to 3 rows stay in bfloat16 (half the
  bytes to stream; head at 1 thread, rows 1/2/3/4: bfloat16 58/91/115/173 ms, widened to
  float32 95/182/141/163 ms); more rows run in float32 through oneDNN against a float32 copy
  of the weight (+4 bytes per parameter) and the result is rounded back to bfloat16. A bfloat16
  GEMM on such a CPU widens its operands to float32 and accumulates in float32 anyway, so the
  values are those of a bfloat16 GEMM up to the order of summation.

Parameters stay shared with the original module (tied embeddings stay tied); forward hooks on
the replaced module keep working because the replacement is itself the module the parent
holds.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("dgserve.cpu_linear")

CpuGemm = Literal["auto", "native"]

# Up to this many rows a bfloat16 product stays in bfloat16 (measured, see above).
_BF16_NATIVE_MAX_ROWS = 3
# Below this many weight elements a single-row product is call-overhead bound and MKL wins.
_SMALL_WEIGHT = 4 * 1024 * 1024


def onednn_linear_works() -> bool:
    """Whether this torch build runs oneDNN's float32 linear on dense tensors (x86 CPU builds)."""
    try:
        out = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 4), torch.ones(3, 4), None, "none", [], "")
        return bool(torch.equal(out, torch.full((2, 3), 4.0)))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def native_bf16() -> bool:
    """Whether oneDNN has hardware bfloat16 here (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _onednn(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x2d, weight, bias, "none", [], "")


class CpuLinear(nn.Module):
    """Drop-in for an `nn.Linear` on CPU that picks the kernel per call (see module doc)."""

    def __init__(self, linear: nn.Linear, *, widen_bf16: bool) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight  # the same Parameter: ties and state_dict keys are kept
        self.bias = linear.bias
        self._small = linear.weight.numel() < _SMALL_WEIGHT
        # float32 copies for multi-row bfloat16 products; not parameters, not saved.
        self._weight32: torch.Tensor | None = None
        self._bias32: torch.Tensor | None = None
        if widen_bf16 and linear.weight.dtype == torch.bfloat16:
            self._weight32 = linear.weight.detach().float().contiguous()
            self._bias32 = None if linear.bias is None else linear.bias.detach().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features if self.in_features else 0
        weight = self.weight
        if x.device.type != "cpu" or rows == 0 or x.dtype != weight.dtype:
            return F.linear(x, weight, self.bias)
        if weight.dtype == torch.float32:
            if rows == 1 and self._small:
                return F.linear(x, weight, self.bias)
            out = _onednn(x.reshape(rows, self.in_features), weight, self.bias)
            return out.reshape(*x.shape[:-1], self.out_features)
        if self._weight32 is not None and rows > _BF16_NATIVE_MAX_ROWS:
            out = _onednn(x.reshape(rows, self.in_features).float(), self._weight32, self._bias32)
            return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return F.linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, widened_bf16={self._weight32 is not None}"
        )


def speed_up_linears(model: nn.Module, mode: CpuGemm = "auto") -> int:
    """Replace every `nn.Linear` of a CPU model with a `CpuLinear`. Returns how many.

    `native` leaves the model alone. Does nothing where oneDNN's linear is unavailable.
    """
    if mode == "native" or not onednn_linear_works():
        return 0
    widen = not native_bf16()
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear
    ]
    replacements: dict[int, CpuLinear] = {}  # a Linear shared by two parents gets one replacement
    for parent, name, child in targets:
        if child.weight.device.type == "cpu" and child.weight.dtype in (torch.float32, torch.bfloat16):
            if id(child) not in replacements:
                replacements[id(child)] = CpuLinear(child, widen_bf16=widen)
            setattr(parent, name, replacements[id(child)])
    extra = sum(
        m._weight32.numel() * 4 for m in model.modules() if isinstance(m, CpuLinear) and m._weight32 is not None
    )
    log.info(
        "CPU linears: %d replaced (oneDNN float32%s)",
        len(replacements),
        f"; multi-row bfloat16 in float32, +{extra / 2**20:.0f} MiB of float32 weights" if extra else "",
    )
    return len(replacements)
