"""Exact token draws over a float32 LM head from a half-precision pass (docs/load.md, "Certified head").

On a CPU one decode row streams the LM head's whole weight (Gemma 3: 262144 x 640 float32, 671 MB);
a float16 copy is half the bytes. A draw needs only the best score, not every logit, so:

  a = W16 h                (V,) from fbgemm's packed float16 GEMM (float32 arithmetic)
  |l_v - a_v| <= c_v |h|   for the float32 logits l = W h, with, per vocabulary row v,
                           c_v = |W_v - W16_v| + 2 gamma_d (|W16_v| + |W_v|)   (Euclidean norms)

(Cauchy-Schwarz for the weight's rounding to float16; gamma_d = d u / (1 - d u) bounds a d-term
float32 dot product's accumulation error, for the half pass and for any float32 kernel the
reference might use.) The draw's score is s_v = softcap(l_v) / T + g_v (greedy: T = 1, g = 0);
softcap is monotone and 1-Lipschitz, so s_v lies within c_v |h| / T of the same score from a.
Every token whose upper bound reaches the best lower bound is a candidate (usually a handful);
their logits are recomputed from the float32 rows and the best of them is the draw: no other
token's float32 score can beat it. Draws equal `sampler.logits.draw_tokens` on full float32 logits
(up to ties within float32 rounding, as between two float32 GEMM kernels).

Only for what a draw alone decides: top-k / top-p filters, grammar masks and logprobs need every
logit and keep the full head. Built at load where the float16 pass measures faster
(`attach_certified_head`).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

import torch

from sampler.logits import softcap

log = logging.getLogger(__name__)

CertifiedHeadMode = Literal["auto", "on", "off"]

_UNIT_ROUNDOFF = 2.0**-24  # float32
# Absolute slack for the score's own float32 steps (softcap, / T, + noise): far below any gap
# that matters, far above their rounding.
_SCORE_SLACK = 1e-4
# More candidates than this and a full float32 row is cheaper than gathering them.
_MAX_CANDIDATES = 8192
# Row counts the start-up timing tries; the half pass is used up to the largest that won. Parallel
# refinement draws 2-12 rows a forward: on the 2-core AVX2 machine the half pass still wins at 8
# and 12 rows (0.81x the float32 head), no longer at 16 (0.94x).
_TIMED_ROWS = (1, 4, 8, 12, 16)
_MIN_GAIN = 0.9  # the half pass must take at most 90 % of the float32 head's time


def half_pass_available() -> bool:
    """fbgemm's float16 GEMM is in this torch build (x86 CPUs)."""
    return (
        hasattr(torch.ops.quantized, "linear_prepack_fp16") and "fbgemm" in torch.backends.quantized.supported_engines
    )


class CertifiedHead:
    """Exact draws from the float32 head `weight` (V, d) through a float16 pass plus rescoring.

    `max_rows`: calls with more rows than this return None (the caller computes full logits),
    where the start-up timing found the half pass no faster.
    """

    def __init__(self, weight: torch.Tensor, max_rows: int = 1 << 30) -> None:
        if weight.dtype != torch.float32 or weight.device.type != "cpu":
            raise ValueError("the certified head is for a float32 head on the CPU")
        self.weight = weight.detach()  # (V, d); shared with the model (tied embedding)
        self.max_rows = max_rows
        self._packed = torch.ops.quantized.linear_prepack_fp16(self.weight, None)
        half = self.weight.half().float()
        gamma = self.weight.shape[1] * _UNIT_ROUNDOFF / (1 - self.weight.shape[1] * _UNIT_ROUNDOFF)
        norms = half.norm(dim=1) + self.weight.norm(dim=1)
        self._reach = (self.weight - half).norm(dim=1) + 2 * gamma * norms  # (V,) c_v above
        self.fallbacks = 0  # rows that had too many candidates (full float32 row instead)

    @property
    def extra_bytes(self) -> int:
        """Memory held beyond the shared weight: the float16 copy (packed) and c."""
        return self.weight.numel() * 2 + self._reach.numel() * 4

    def draw(
        self, hidden: torch.Tensor, *, cap: float | None, temperature: float, noise: torch.Tensor | None
    ) -> list[int] | None:
        """One token per row of `hidden` (k, d): argmax of softcap(W h) / T + noise, exactly as
        `draw_tokens` would draw it from full float32 logits (no top-k / top-p). `noise` (k, V)
        Gumbel rows when temperature > 0. None: more rows than `max_rows` (use full logits)."""
        rows = hidden.shape[0]
        if rows > self.max_rows:
            return None
        h = hidden.float()
        scale = 1.0 if temperature <= 0.0 else 1.0 / temperature
        score = softcap(torch.ops.quantized.linear_dynamic_fp16(h, self._packed), cap)  # (k, V)
        if temperature > 0.0:
            if noise is None:
                raise ValueError("sampling at temperature > 0 needs noise")
            score = score.mul_(scale).add_(noise)
        width = torch.outer(h.norm(dim=1) * scale, self._reach).add_(_SCORE_SLACK)  # (k, V)
        best_low = (score - width).amax(dim=1, keepdim=True)  # (k, 1): a score some token reaches
        candidates = width.add_(score).ge_(best_low)  # (k, V): upper bound reaches it
        return [
            self._best(h[r], candidates[r], cap, temperature, None if noise is None else noise[r]) for r in range(rows)
        ]

    def _best(
        self,
        h: torch.Tensor,
        candidates: torch.Tensor,
        cap: float | None,
        temperature: float,
        noise: torch.Tensor | None,
    ) -> int:
        """The best float32 score among the candidate tokens of one row, computed as
        `draw_tokens` computes it (logits / temperature + noise)."""
        ids = candidates.nonzero().squeeze(1)  # ascending: ties go to the lowest id, like argmax
        if ids.numel() > _MAX_CANDIDATES:
            self.fallbacks += 1
            logits = softcap(self.weight @ h, cap)  # (V,)
            ids = torch.arange(self.weight.shape[0])
        else:
            # Each candidate's dot product by the same reduction, whatever its place in the list
            # (a GEMV blocks rows, and equal rows can then round apart): equal rows tie exactly.
            logits = softcap((self.weight.index_select(0, ids) * h).sum(dim=1), cap)  # (n,)
        if noise is not None:
            logits = logits / temperature + noise.index_select(0, ids)
        return int(ids[int(logits.argmax())])


def draw_alone_decides(params: Any) -> bool:
    """Whether a draw under these `SamplingParams` is an argmax of softcap(l) / T + noise over the
    whole vocabulary (greedy, or no top-k / top-p filter): what `CertifiedHead.draw` computes."""
    return bool(params.greedy or (params.top_k == 0 and params.top_p >= 1.0))


def _seconds(call: Any, repeats: int = 3) -> float:
    """Best of `repeats` timed calls after one warm-up call."""
    call()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def measure_max_rows(head: torch.nn.Module, certified: CertifiedHead) -> int:
    """The largest timed row count at which a certified greedy draw beats the float32 head's
    logits plus argmax (0: never). Timed on this machine at start-up: the gain is about bytes,
    and how much bytes matter depends on the CPU's bandwidth and float32 arithmetic."""
    best = 0
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for rows in _TIMED_ROWS:
            x = torch.randn(rows, certified.weight.shape[1], generator=gen)
            full = _seconds(lambda x=x: head(x).argmax(dim=-1))
            half = _seconds(lambda x=x: certified.draw(x, cap=None, temperature=0.0, noise=None))
            log.info("certified head at %d rows: %.1f ms vs float32 head %.1f ms", rows, half * 1e3, full * 1e3)
            if half <= _MIN_GAIN * full:
                best = rows
            else:
                break
    return best


def attach_certified_head(model: torch.nn.Module, mode: CertifiedHeadMode) -> CertifiedHead | None:
    """Give a float32 CPU causal LM's output head a `certified` draw path (or not) and return it.

    `auto`: where fbgemm's float16 GEMM exists and a start-up timing finds it faster; `on`: at any
    row count where it exists; `off`: never. Samplers read it with `certified_head(model)`.
    """
    head = getattr(model, "get_output_embeddings", lambda: None)()
    weight = getattr(head, "weight", None)
    if mode == "off" or head is None or weight is None:
        return None
    if weight.dtype != torch.float32 or weight.device.type != "cpu" or not half_pass_available():
        return None
    start = time.perf_counter()
    certified = CertifiedHead(weight)
    if mode == "auto":
        certified.max_rows = measure_max_rows(head, certified)
        if certified.max_rows == 0:
            log.info("certified head off: the float16 pass was not faster here")
            return None
    head.certified = certified  # read back by certified_head()
    log.info(
        "certified head: float16 pass + exact rescoring up to %d rows (+%.0f MiB, %.1f s to build)",
        certified.max_rows,
        certified.extra_bytes / 2**20,
        time.perf_counter() - start,
    )
    return certified


def certified_head(model: torch.nn.Module) -> CertifiedHead | None:
    """The model's certified draw path, if `attach_certified_head` gave it one."""
    head = getattr(model, "get_output_embeddings", lambda: None)()
    found = getattr(head, "certified", None)
    return found if isinstance(found, CertifiedHead) else None
