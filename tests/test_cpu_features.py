"""CPU feature detection (sampler/runtime/cpu_features.py): cpuinfo parsing, torch's capability as
the fallback, and what the flags imply for the kernels."""

from __future__ import annotations

import logging

import pytest
import torch

from sampler.runtime.cpu_features import CpuFeatures, detect, features_from, parse_cpuinfo_flags
from sampler.runtime.loading import choose_dtype, load_model

# Abridged /proc/cpuinfo of the two CPUs this project has seen (docs/load.md, "Kernel choice").
EPYC = """processor\t: 0
vendor_id\t: AuthenticAMD
flags\t\t: fpu sse sse2 avx fma avx2 bmi2
bugs\t\t: sysret_ss_attrs
processor\t: 1
flags\t\t: fpu sse sse2 avx fma avx2 bmi2
"""
XEON = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu avx fma avx2 avx512f avx512dq avx512bw avx512vl avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8
"""


def test_flags_of_the_first_processor():
    assert parse_cpuinfo_flags(EPYC) == frozenset({"fpu", "sse", "sse2", "avx", "fma", "avx2", "bmi2"})
    assert parse_cpuinfo_flags("processor : 0\n") == frozenset()


def test_avx2_only_cpu_has_no_native_bfloat16():
    epyc = features_from(EPYC, "AVX2")
    assert epyc.isa() == ["AVX2", "FMA"]
    assert not epyc.native_bf16 and not epyc.amx_bf16 and not epyc.bf16_prepack
    assert epyc.describe() == "AVX2 FMA (torch dispatch AVX2)"


def test_amx_xeon_has_native_bfloat16_and_prepack():
    xeon = features_from(XEON, "AVX512")
    assert xeon.isa() == ["AMX-BF16", "AMX-INT8", "AVX512-BF16", "AVX512-VNNI", "AVX512F", "AVX2", "FMA"]
    assert xeon.amx_bf16 and xeon.avx512_bf16 and xeon.native_bf16 and xeon.bf16_prepack


def test_avx512_bf16_without_amx_is_native_and_amx_needs_its_tiles():
    only_bf16 = CpuFeatures(frozenset({"avx512f", "avx512_bf16", "avx512bw", "avx512vl", "avx512dq"}))
    assert only_bf16.native_bf16 and not only_bf16.amx_bf16 and only_bf16.bf16_prepack
    no_tiles = CpuFeatures(frozenset({"amx_bf16"}))  # amx_bf16 without amx_tile: no usable tiles
    assert not no_tiles.amx_bf16 and not no_tiles.native_bf16
    plain_avx512 = CpuFeatures(frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq"}))
    assert plain_avx512.bf16_prepack and not plain_avx512.native_bf16


def test_torch_capability_fills_in_without_cpuinfo():
    assert features_from("", "AVX512").flags == frozenset({"avx512f", "avx2", "fma"})
    assert features_from("", "DEFAULT").flags == frozenset()
    assert features_from("", "DEFAULT").describe() == "no x86 vector flags (torch dispatch DEFAULT)"


def test_detect_agrees_with_torch_on_this_machine():
    here = detect()
    assert here.capability == torch.backends.cpu.get_cpu_capability()
    if here.capability in ("AVX2", "AVX512"):  # torch dispatches to what the CPU has
        assert "avx2" in here.flags
    if here.capability == "AVX512":
        assert "avx512f" in here.flags
    assert detect() is here  # read once


# ---- dtype auto (sampler/runtime/loading.choose_dtype) ----------------------------------------

AVX2_CPU = features_from(EPYC, "AVX2")
AMX_CPU = features_from(XEON, "AVX512")
CPU = torch.device("cpu")


def test_dtype_auto_is_bfloat16_on_amx_where_onednn_prepacks_it():
    dtype, reason = choose_dtype("auto", CPU, AMX_CPU, bf16_packs=True)
    assert dtype == torch.bfloat16
    assert reason.startswith("dtype auto -> bfloat16: native bfloat16 (AMX-BF16")


def test_dtype_auto_is_float32_on_avx2():
    dtype, reason = choose_dtype("auto", CPU, AVX2_CPU, bf16_packs=False)
    assert dtype == torch.float32
    assert reason == ("dtype auto -> float32: no native bfloat16 (AVX2 FMA); parallel refinement is exact in float32")


def test_dtype_auto_is_float32_when_torch_cannot_prepack_bfloat16_despite_the_flags():
    dtype, reason = choose_dtype("auto", CPU, AMX_CPU, bf16_packs=False)
    assert dtype == torch.float32 and "cannot prepack bfloat16" in reason


def test_dtype_auto_on_an_accelerator_and_named_dtypes():
    assert choose_dtype("auto", torch.device("cuda"), AVX2_CPU, bf16_packs=False)[0] == torch.bfloat16
    assert choose_dtype("bfloat16", CPU, AVX2_CPU, bf16_packs=False) == (torch.bfloat16, "configured")
    assert choose_dtype("float32", CPU, AMX_CPU, bf16_packs=True) == (torch.float32, "configured")
    with pytest.raises(ValueError, match="or 'auto'"):
        choose_dtype("int3", CPU, AVX2_CPU, bf16_packs=False)


def test_load_model_with_dtype_auto_loads_what_this_cpu_gets(caplog):
    caplog.set_level(logging.INFO, logger="dgserve")
    expected, reason = choose_dtype("auto", CPU)
    loaded = load_model("tiny-gemma3", dtype="auto", device="cpu")
    assert loaded.dtype == expected and next(loaded.model.parameters()).dtype == expected
    assert reason in caplog.text
    if not detect().native_bf16:
        assert expected == torch.float32  # an AVX2 machine serves float32 under auto
