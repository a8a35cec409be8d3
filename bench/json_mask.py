"""What `response_format` JSON costs with llguidance on a model's tokenizer: building its token
trie, compiling a grammar, and the mask before each token of one compact document.

    .venv/bin/python -m bench.json_mask tiny-gemma3
    .venv/bin/python -m bench.json_mask gemma3-270m   # the real 262,144-token vocabulary

The figures and the choice of library: docs/openai.md ("Structured output").
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Any

import llguidance.torch
import torch

from sampler.constrained import Matcher, json_grammar, llg_tokenizer
from sampler.runtime.cpu_features import detect
from sampler.runtime.loading import load_model

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"enum": ["red", "green"]}},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "ok"],
    "additionalProperties": False,
}
DOCUMENT = json.dumps({"name": "Ann", "age": 31, "tags": ["red", "green"], "ok": True}, separators=(",", ":"))


def _ms(seconds: float) -> str:
    return f"{1e3 * seconds:.3f} ms"


def _time_masks(tokenizer: Any, label: str, schema: dict[str, Any] | None, vocab: int, stop: frozenset[int]) -> None:
    """Compile, then walk DOCUMENT token by token timing the mask fill and fill + apply."""
    start = time.perf_counter()
    grammar = json_grammar(tokenizer, schema)
    compiled = time.perf_counter()
    matcher = Matcher(grammar, stop)
    built = time.perf_counter()
    fills, masks = [], []
    ids = tokenizer.encode(DOCUMENT, add_special_tokens=False)
    logits = torch.zeros(1, vocab)
    inner = matcher._matcher  # the raw llguidance matcher: times the fill alone
    for token in ids:
        t = time.perf_counter()
        llguidance.torch.fill_next_token_bitmask(inner, matcher._bitmask, 0)
        fills.append(time.perf_counter() - t)
        t = time.perf_counter()
        matcher.mask_(logits.clone())
        masks.append(time.perf_counter() - t)
        matcher.advance(token)
    print(
        f"{label}: compile+validate {_ms(compiled - start)}, new matcher {_ms(built - compiled)}; "
        f"{len(ids)} tokens: fill median {_ms(statistics.median(fills))} max {_ms(max(fills))}, "
        f"fill+apply median {_ms(statistics.median(masks))}; complete={matcher.done}"
    )


def main(argv: list[str]) -> int:
    name = argv[0] if argv else "tiny-gemma3"
    print(f"cpu: {detect().describe()}; llguidance {llguidance.__version__}")
    loaded = load_model(name, dtype="float32", device="cpu")
    config: Any = loaded.model.config  # a transformers config (torch types attributes as Tensor | Module)
    vocab = int(config.get_text_config().vocab_size)
    start = time.perf_counter()
    llg_tokenizer(loaded.tokenizer)
    print(f"{name}: vocabulary {vocab}; llguidance tokenizer built in {_ms(time.perf_counter() - start)}")
    stop = frozenset(loaded.eos_token_ids)
    _time_masks(loaded.tokenizer, "json_object", None, vocab, stop)
    _time_masks(loaded.tokenizer, "json_schema", SCHEMA, vocab, stop)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
