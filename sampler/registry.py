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

    prepare_prefix_cache(loaded, options)
    # The load-time prefill rate starts the time-based prefill budget (options may override it).
    shared: dict[str, Any] = {"prefill_rate": loaded.prefill_tokens_per_s, "prefix_cache": _shared_prefix_cache(loaded)}
    if loaded.prefix_cache is False:
        shared["prefix_cache_mb"] = 0  # off for every sampler of this model
    return ARSampler(loaded.model, loaded.device, **{**shared, **options})


def _build_parallel(loaded: LoadedModel, options: dict[str, Any]) -> BatchSampler:
    from sampler.parallel import ParallelSampler

    prepare_prefix_cache(loaded, {})
    return ParallelSampler(loaded.model, loaded.device, **{"prefix_cache": _shared_prefix_cache(loaded), **options})


def _shared_prefix_cache(loaded: LoadedModel) -> Any:
    """The prepared cache, or None where it is off (an empty cache is falsy: it has a length)."""
    return None if loaded.prefix_cache is False else loaded.prefix_cache


def prepare_prefix_cache(loaded: LoadedModel, ar_options: dict[str, Any]) -> None:
    """Build the loaded model's one prefix cache, shared by its `ar` and `parallel` samplers (a
    prompt prefilled by one is a hit for the other, a hand-over's re-prefill included), from the
    `ar` mapping's `prefix_cache_mb` / `prefix_block_size` (0 MB: off). The server calls it with
    the config's `ar` mapping before any sampler is built; otherwise the first build decides."""
    from sampler.ar import DEFAULT_PREFIX_CACHE_MB
    from sampler.runtime.prefix_cache import PrefixCache

    if loaded.prefix_cache is not None or loaded.kind != "causal":
        return
    budget_mb = float(ar_options.get("prefix_cache_mb", DEFAULT_PREFIX_CACHE_MB))
    block = int(ar_options.get("prefix_block_size", 16))
    loaded.prefix_cache = PrefixCache(int(budget_mb * 2**20), block) if budget_mb > 0 else False


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
