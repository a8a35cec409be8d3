"""What a loaded model is, and the built-in model names: the types both loaders share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

BUILTIN_GEMMA3_270M = "gemma3-270m"
TINY_GEMMA3 = "tiny-gemma3"
TINY_DIFFUSION = "tiny-diffusion"

ModelKind = Literal["causal", "diffusion"]


@dataclass
class LoadedModel:
    """A model ready to serve: the torch module, its tokenizer and what the server needs."""

    model: torch.nn.Module
    tokenizer: Any  # a transformers PreTrainedTokenizerBase
    kind: ModelKind
    eos_token_ids: list[int]
    device: torch.device
    dtype: torch.dtype
    source: str
    max_context: int
    generation_config: Any = None
    prefill_tokens_per_s: float | None = None  # measured at load (sampler/runtime/prefill_rate.py)
    # The samplers' shared prefix cache (sampler/registry.py): None until built, False when off.
    prefix_cache: Any = None

    @classmethod
    def of(
        cls,
        model: torch.nn.Module,
        tokenizer: Any,
        kind: ModelKind,
        *,
        source: str,
        device: torch.device,
        dtype: torch.dtype,
        eos_token_ids: list[int] | None = None,
    ) -> LoadedModel:
        """Describe a loaded module: context length, generation config and EOS ids read from it.

        `eos_token_ids` None: the generation config's, else the tokenizer's.
        """
        config: Any = model.config  # a transformers config (nn.Module's attribute typing says Tensor | Module)
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        generation_config: Any = getattr(model, "generation_config", None)
        return cls(
            model=model,
            tokenizer=tokenizer,
            kind=kind,
            eos_token_ids=eos_token_ids if eos_token_ids is not None else eos_ids(generation_config, tokenizer),
            device=device,
            dtype=dtype,
            source=source,
            max_context=int(getattr(text_config, "max_position_embeddings", 8192)),
            generation_config=generation_config,
        )


def eos_ids(generation_config: Any, tokenizer: Any) -> list[int]:
    """The generation config's EOS id(s), else the tokenizer's, deduplicated in order."""
    ids: list[int] = []
    eos = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    if eos is None:
        eos = tokenizer.eos_token_id
    for value in eos if isinstance(eos, (list, tuple)) else [eos]:
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    return ids
