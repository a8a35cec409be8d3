"""How many prompt tokens per second this machine prefills: measured once at load, so the AR
sampler's time-based prefill budget (`max_prefill_s`, docs/load.md "Prefill under load") holds
from the first burst on, before any prefill of its own has been timed."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

log = logging.getLogger(__name__)

# Long enough that a forward's fixed cost (the weights stream once) is a small share.
_PROBE_TOKENS = 128


def measure_prefill_rate(model: torch.nn.Module, device: torch.device) -> float | None:
    """Prompt tokens per second of the decoder body over one `_PROBE_TOKENS`-token prompt (best
    of two after a warm-up); None where the model has no transformers decoder body."""
    lm: Any = model
    body = getattr(lm, "model", None)
    config = getattr(lm, "config", None)
    vocab = int(getattr(getattr(config, "get_text_config", lambda: config)(), "vocab_size", 0) or 0)
    if body is None or vocab <= 0:
        return None
    ids = torch.randint(0, vocab, (1, _PROBE_TOKENS), generator=torch.Generator().manual_seed(0)).to(device)
    best = float("inf")
    with torch.inference_mode():
        for i in range(3):
            start = time.perf_counter()
            body(input_ids=ids, use_cache=False)
            if i:
                best = min(best, time.perf_counter() - start)
    rate = _PROBE_TOKENS / best
    log.info("prefill: %.0f prompt tokens/s measured (%d-token prompt)", rate, _PROBE_TOKENS)
    return rate
