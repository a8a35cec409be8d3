"""The samplers by name: the one list of names, which model kind each serves, and their builders.

The engine asks here, never imports samplers; the server's request and config models take their
allowed names from `SamplerName`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, get_args

from sampler.runtime.model import LoadedModel
from sampler.types import BatchSampler

SamplerName = Literal["ar", "parallel", "diffusion"]
SAMPLER_NAMES: tuple[SamplerName, ...] = get_args(SamplerName)
# The first name of a kind is the one its models fall back to when the configured one cannot serve them.
SAMPLERS_FOR_KIND: dict[str, tuple[SamplerName, ...]] = {"causal": ("ar", "parallel"), "diffusion": ("diffusion",)}


def _build_ar(loaded: LoadedModel, options: dict[str, Any]) -> BatchSampler:
    from sampler.ar import ARSampler

    # The load-time prefill rate starts the time-based prefill budget (options may override it).
    return ARSampler(loaded.model, loaded.device, **{"prefill_rate": loaded.prefill_tokens_per_s, **options})


def _build_parallel(loaded: LoadedModel, options: dict[str, Any]) -> BatchSampler:
    from sampler.parallel import ParallelSampler

    return ParallelSampler(loaded.model, loaded.device, **options)


def _build_diffusion(loaded: LoadedModel, options: dict[str, Any]) -> BatchSampler:
    from sampler.diffusion import DiffusionSampler

    return DiffusionSampler(loaded.model, loaded.device, loaded.generation_config, **options)


# Imports stay inside the builders: a server that runs one sampler never imports the others.
_BUILDERS: dict[str, Callable[[LoadedModel, dict[str, Any]], BatchSampler]] = {
    "ar": _build_ar,
    "parallel": _build_parallel,
    "diffusion": _build_diffusion,
}
assert set(_BUILDERS) == set(SAMPLER_NAMES), "every sampler name needs a builder"


def build_sampler(name: str, loaded: LoadedModel, options: dict[str, Any] | None = None) -> BatchSampler:
    """`options` are the config's sampler-specific defaults (e.g. config key `parallel`)."""
    allowed = SAMPLERS_FOR_KIND[loaded.kind]
    if name not in allowed:
        raise ValueError(f"sampler {name!r} cannot serve a {loaded.kind} model; choose one of {list(allowed)}")
    return _BUILDERS[name](loaded, options or {})
