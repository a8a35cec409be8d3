"""The denoising schedule of one block-diffusion request: checkpoint defaults, then overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# transformers' DiffusionGemmaGenerationConfig global defaults (the released checkpoint's).
RELEASED_DEFAULTS: dict[str, Any] = {
    "max_denoising_steps": 48,
    "entropy_bound": 0.1,
    "t_min": 0.4,
    "t_max": 0.8,
    "stability_threshold": 1,
    "confidence_threshold": 0.005,
}


@dataclass(frozen=True)
class DiffusionSettings:
    """The denoising schedule of one request (checkpoint defaults, then overrides)."""

    max_denoising_steps: int
    entropy_bound: float
    t_min: float
    t_max: float
    stability_threshold: int
    confidence_threshold: float

    @classmethod
    def from_generation_config(cls, generation_config: Any) -> DiffusionSettings:
        """Read a DiffusionGemmaGenerationConfig; unset fields take transformers' defaults."""
        values = dict(RELEASED_DEFAULTS)
        for name in values:
            if name == "entropy_bound":
                sampler_config = getattr(generation_config, "sampler_config", None)
                if isinstance(sampler_config, dict):
                    value = sampler_config.get("entropy_bound")
                else:
                    value = getattr(sampler_config, "entropy_bound", None)
            else:
                value = getattr(generation_config, name, None)
            if value is not None:
                values[name] = value
        return cls(**values).validated()

    def override(self, **changes: Any) -> DiffusionSettings:
        """A copy with the non-None `changes` applied, validated."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None}).validated()

    def validated(self) -> DiffusionSettings:
        if int(self.max_denoising_steps) < 1:
            raise ValueError(f"steps (max_denoising_steps) must be >= 1, got {self.max_denoising_steps}")
        if not self.entropy_bound > 0:
            raise ValueError(f"entropy_bound must be > 0, got {self.entropy_bound}")
        if not 0 <= self.t_min <= self.t_max or self.t_max <= 0:
            raise ValueError(f"need 0 <= t_min <= t_max and t_max > 0, got t_min={self.t_min} t_max={self.t_max}")
        if int(self.stability_threshold) < 0:
            raise ValueError(f"stability_threshold must be >= 0, got {self.stability_threshold}")
        if not self.confidence_threshold >= 0:  # 0: never confident, every block runs all steps
            raise ValueError(f"confidence_threshold must be >= 0, got {self.confidence_threshold}")
        return dataclasses.replace(
            self,
            max_denoising_steps=int(self.max_denoising_steps),
            stability_threshold=int(self.stability_threshold),
            entropy_bound=float(self.entropy_bound),
            t_min=float(self.t_min),
            t_max=float(self.t_max),
            confidence_threshold=float(self.confidence_threshold),
        )
