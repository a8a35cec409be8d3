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
