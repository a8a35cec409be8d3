"""The server's one typed config, validated at start-up (fail at start, not mid-request).

Sources, lowest to highest precedence: field defaults, the YAML file, environment variables
`DGSERVE_<KEY>` (YAML-parsed, so numbers, booleans and JSON objects work), CLI flags.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sampler.registry import SAMPLER_NAMES, SamplerName


class ConfigError(ValueError):
    """A config that cannot start a server; the message names the offending key."""


class ServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    # What to serve: a built-in name (gemma3-270m, tiny-gemma3, tiny-diffusion), a .gguf
    # file, a local directory of safetensors or a hub id.
    model: str = "gemma3-270m"
    # The id clients send in `model`; defaults to `model`.
    served_model_name: str | None = None
    # `auto`: bfloat16 on CPUs with hardware bfloat16 (AMX, AVX512-BF16), float32 elsewhere
    # (sampler/runtime/loading.choose_dtype; the choice and its reason are logged at start-up).
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    device: str = "auto"
    # CPU matrix-product kernels (sampler/runtime/cpu_linear.py): `auto` times the kernels the CPU's
    # flags allow per weight shape at start-up and keeps the fastest per row count; `flags` takes
    # the flags' pick without measuring; `native` keeps torch's stock kernels.
    cpu_gemm: Literal["auto", "flags", "native"] = "auto"
    # Exact draws from a float32 LM head through a float16 pass plus rescoring of the few tokens it
    # cannot rule out (sampler/runtime/certified_head.py): `auto` where a start-up timing finds it
    # faster, `on` always (where fbgemm has it), `off` never.
    certified_head: Literal["auto", "on", "off"] = "auto"
    # `fp16`: a float32 model's linear layers (not the LM head) stream float16 copies of their
    # weights through fbgemm, in float32 arithmetic: half the bytes, weights rounded to float16
    # (docs/load.md, "Float16 weights"). `none`: the weights as loaded.
    quantization: Literal["none", "fp16"] = "none"
    sampler: SamplerName = "ar"
    # A request that names no sampler and is admitted while other sequences run goes to this
    # sampler instead: parallel refinement spends one forward per sequence per step, AR one
    # forward for all of them, so under load AR's batching wins. None: always `sampler`.
    sampler_when_busy: SamplerName | None = None

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: str | None = None
    cors_origins: list[str] = ["*"]
    log_level: str = "info"
    # The browser playground at / and /playground (docs/playground.md); off in production.
    playground: bool = True

    # Engine limits.
    # 16: measured in process on the 2-core CPU, 16 clients (docs/load.md, "Prefill under load").
    max_num_seqs: int = Field(16, ge=1)
    max_queue: int = Field(64, ge=1)
    max_model_len: int | None = Field(None, ge=16)
    default_max_tokens: int = Field(512, ge=1)
    max_n: int = Field(16, ge=1)
    max_request_bytes: int = Field(2_000_000, ge=1024)
    request_timeout_s: float | None = Field(None, gt=0)
    shutdown_grace_s: float = Field(30.0, ge=0)

    # Default sampling parameters (a request's own values win).
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)

    # Sampler-specific defaults, passed as keyword arguments to the sampler's constructor; each
    # key is the name of its sampler (sampler/registry.py).
    # `ar`: max_prefill_tokens, max_prefill_s, prefix_cache_mb (0 = off), prefix_block_size (docs/load.md).
    ar: dict[str, Any] = {}
    parallel: dict[str, Any] = {}
    diffusion: dict[str, Any] = {}

    def sampler_options(self, name: str) -> dict[str, Any]:
        """The config's keyword arguments for sampler `name`: the mapping under its name, or none."""
        options = getattr(self, name, None) if name in SAMPLER_NAMES else None
        return options if isinstance(options, dict) else {}

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model


def _free_text(annotation: Any) -> bool:
    """True for `str` and `str | None` fields: their environment value is the text as written."""
    return annotation is str or (
        get_origin(annotation) in (Union, UnionType) and set(get_args(annotation)) == {str, type(None)}
    )


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, info in ServerConfig.model_fields.items():
        name = f"DGSERVE_{key.upper()}"
        raw = environ.get(name)
        if raw is None:
            continue
        if not raw.strip():
            out[key] = None
        elif _free_text(info.annotation):
            # An API key "null", "~", "123456" or "0123", a model name "1.0": text, never YAML.
            out[key] = raw
        else:
            # Strings like "null", "8", "true" or '{"block_size": 8}' get their YAML meaning.
            try:
                out[key] = yaml.safe_load(raw)
            except yaml.YAMLError as exc:
                why = getattr(exc, "problem", None) or exc
                raise ConfigError(f"environment variable {name}={raw!r} is not valid YAML: {why}") from None
    return out


def _explain(exc: ValidationError, origins: dict[str, str]) -> str:
    """One line per invalid key naming where its value came from (file, environment variable or
    flag), instead of pydantic's dump; unknown keys get the nearest real key as a suggestion."""
    lines = []
    for err in exc.errors():
        key = str(err["loc"][0]) if err["loc"] else "?"
        where = origins.get(key, "the built-in default")
        if err["type"] == "extra_forbidden":
            near = difflib.get_close_matches(key, list(ServerConfig.model_fields), n=1)
            hint = f"; did you mean '{near[0]}'?" if near else " (README.md, Configuration, lists the keys)"
            lines.append(f"  unknown key '{key}' in {where}{hint}")
            continue
        shown = "<hidden>" if key == "api_key" else repr(err.get("input"))
        lines.append(f"  {key}: {err['msg']} (got {shown} from {where})")
    return "invalid config:\n" + "\n".join(lines)


def load_config(
    path: str | Path | None, overrides: dict[str, Any] | None = None, environ: dict[str, str] | None = None
) -> ServerConfig:
    data: dict[str, Any] = {}
    origins: dict[str, str] = {}  # key -> where its value came from (the highest layer wins)
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"config {path} must be a mapping of keys to values")
        data.update(loaded)
        origins.update({str(k): f"file {path}" for k in loaded})
    env = _env_overrides(dict(os.environ) if environ is None else environ)
    data.update(env)
    origins.update({k: f"environment variable DGSERVE_{k.upper()}" for k in env})
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    data.update(flags)
    origins.update({k: "flag --" + k.replace("_", "-") for k in flags})
    try:
        return ServerConfig(**data)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, origins)) from None
