"""Builds a sampler by name for a loaded model. The engine asks here, never imports samplers."""

from __future__ import annotations

from typing import Any

from sampler.runtime.model import LoadedModel
from sampler.types import BatchSampler

SAMPLERS_FOR_KIND = {"causal": ("ar", "parallel"), "diffusion": ("diffusion",)}


def build_sampler(name: str, loaded: LoadedModel, options: dict[str, Any] | None = None) -> BatchSampler:
    """`options` are the config's sampler-specific defaults (e.g. config key `parallel`)."""
    if name not in SAMPLERS_FOR_KIND[loaded.kind]:
        raise ValueError(f"sampler {name!r} cannot serve a {loaded.kind} model; "
                         f"choose one of {list(SAMPLERS_FOR_KIND[loaded.kind])}")
    options = options or {}
    if name == "ar":
        from sampler.ar import ARSampler

        return ARSampler(loaded.model, loaded.device)
    if name == "parallel":
        from sampler.parallel import ParallelSampler

        return ParallelSampler(loaded.model, loaded.device, **options)
    from sampler.diffusion import DiffusionSampler

    return DiffusionSampler(loaded.model, loaded.device, loaded.generation_config, **options)
