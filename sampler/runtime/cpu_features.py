"""What the CPU under this process can do, read once from /proc/cpuinfo and torch.

The kernel and dtype choices (sampler/runtime/cpu_linear.py, docs/load.md "Kernel choice") take a
`CpuFeatures`, so tests hand them faked flags (an AMX Xeon on an AVX2-only machine) instead of
the ones detected here.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

# /proc/cpuinfo flag -> the name printed in reports, strongest first.
_ISA_NAMES = {
    "amx_bf16": "AMX-BF16",
    "amx_int8": "AMX-INT8",
    "avx512_bf16": "AVX512-BF16",
    "avx512_vnni": "AVX512-VNNI",
    "avx512f": "AVX512F",
    "avx_vnni": "AVX-VNNI",
    "avx2": "AVX2",
    "fma": "FMA",
}
# torch's dispatch level -> the flags it implies, for systems without /proc/cpuinfo.
_CAPABILITY_FLAGS = {"AVX512": {"avx512f", "avx2", "fma"}, "AVX2": {"avx2", "fma"}}


@dataclass(frozen=True)
class CpuFeatures:
    """The x86 flags that matter to the linear kernels, and torch's own vector dispatch level."""

    flags: frozenset[str]
    capability: str = "DEFAULT"  # torch.backends.cpu.get_cpu_capability(): AVX2, AVX512, ...

    @property
    def amx_bf16(self) -> bool:
        return {"amx_bf16", "amx_tile"} <= self.flags

    @property
    def avx512_bf16(self) -> bool:
        return "avx512_bf16" in self.flags

    @property
    def native_bf16(self) -> bool:
        """Hardware bfloat16 dot products (AMX tiles or AVX512-BF16): a bfloat16 GEMM of many rows
        costs about what it costs in float32 per byte, not the widened float32 arithmetic."""
        return self.amx_bf16 or self.avx512_bf16

    @property
    def bf16_prepack(self) -> bool:
        """What oneDNN's bfloat16 weight reorder asks of the CPU (torch's check in
        mkldnn_reorder_linear_weight: avx_ne_convert, or avx512bw + avx512vl + avx512dq)."""
        return "avx_ne_convert" in self.flags or {"avx512bw", "avx512vl", "avx512dq"} <= self.flags

    def isa(self) -> list[str]:
        """The report names of the flags present, strongest first (e.g. ['AVX2', 'FMA'])."""
        return [name for flag, name in _ISA_NAMES.items() if flag in self.flags]

    def describe(self) -> str:
        return f"{' '.join(self.isa()) or 'no x86 vector flags'} (torch dispatch {self.capability})"


def parse_cpuinfo_flags(text: str) -> frozenset[str]:
    """The `flags` line of the first processor in a /proc/cpuinfo text (empty if none)."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def features_from(cpuinfo: str, capability: str) -> CpuFeatures:
    """Features from a cpuinfo text and torch's capability string; the capability fills in the
    basic flags where cpuinfo has none (macOS, containers without /proc)."""
    flags = parse_cpuinfo_flags(cpuinfo) or frozenset(_CAPABILITY_FLAGS.get(capability, set()))
    return CpuFeatures(flags=flags, capability=capability)


@functools.cache
def detect() -> CpuFeatures:
    """This machine's features (cached: the CPU does not change under a running process)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    return features_from(cpuinfo, torch.backends.cpu.get_cpu_capability())
