"""What `response_format` JSON costs with each structured-generation library on a model's tokenizer:
preparing the library's view of the vocabulary, compiling a grammar, and the token mask before
each token of one compact document. dgserve uses llguidance (sampler/constrained.py); xgrammar and
outlines-core are measured beside it when installed (they are not project dependencies: a library
that does not import is skipped, and the run says so).

    .venv/bin/python -m bench.json_mask tiny-gemma3
    .venv/bin/python -m bench.json_mask gemma3-270m --json out.json   # the 262,144-token vocabulary
    .venv/bin/python -m bench.json_mask gemma3-270m --libraries llguidance,xgrammar

The figures and the choice of library: docs/openai.md ("Structured output").
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from sampler.runtime.cpu_features import detect
from sampler.runtime.loading import load_model

LIBRARIES = ("llguidance", "xgrammar", "outlines-core")

# A realistic response_format schema: a nested object, an enum, arrays, a pattern, an optional
# property and required fields. additionalProperties false keeps outlines-core's regex finite.
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "name": {"type": "string", "maxLength": 40},
        "status": {"enum": ["active", "suspended", "closed"]},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string"},
                "city": {"type": "string"},
                "postcode": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["street", "city", "postcode"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"enum": ["admin", "billing", "support", "sales"]}, "maxItems": 4},
        "score": {"type": "number"},
        "verified": {"type": "boolean"},
    },
    "required": ["id", "name", "status", "address", "tags", "verified"],
    "additionalProperties": False,
}
# Valid against SCHEMA (and any JSON object), properties in schema order, compact as dgserve emits.
DOCUMENT = json.dumps(
    {
        "id": 1042,
        "name": "Ada Lovelace",
        "status": "active",
        "address": {"street": "12 St James's Square", "city": "London", "postcode": "10115"},
        "tags": ["admin", "billing"],
        "score": 97.5,
        "verified": True,
    },
    separators=(",", ":"),
)
GRAMMARS: dict[str, dict[str, Any] | None] = {"json_object": None, "json_schema": SCHEMA}


class Cursor(Protocol):
    """One sequence's position in a compiled grammar."""

    def fill(self, bitmask: torch.Tensor) -> None:
        """Write the allowed next tokens into the (1, ceil(V / 32)) int32 bitmask."""

    def advance(self, token: int) -> None:
        """Consume `token`; raises when the grammar rejects it."""

    def accepting(self) -> bool:
        """The document so far is complete."""


class Library(Protocol):
    """A structured-generation library, driven the way a server would drive it."""

    def prepare(self, hf_tokenizer: Any, vocab: int, stop: list[int]) -> None:
        """Build the library's view of the tokenizer (once per process in a server)."""

    def compile(self, schema: dict[str, Any] | None) -> Callable[[], Cursor]:
        """Compile `schema` (None: any JSON object, compact); returns a factory of fresh cursors."""


class _LlgCursor:
    def __init__(self, llg: Any, tokenizer: Any, grammar: str) -> None:
        self._llg, self._matcher = llg, llg.LLMatcher(tokenizer, grammar)
        if self._matcher.is_error():
            raise ValueError(self._matcher.get_error())

    def fill(self, bitmask: torch.Tensor) -> None:
        self._llg.torch.fill_next_token_bitmask(self._matcher, bitmask, 0)

    def advance(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            raise ValueError(f"llguidance rejected token {token}: {self._matcher.get_error()}")

    def accepting(self) -> bool:
        return bool(self._matcher.is_accepting())


class Llguidance:
    """llguidance, with the calls and defaults of sampler/constrained.py (compact JSON, validated)."""

    def __init__(self) -> None:
        self._llg = importlib.import_module("llguidance")
        importlib.import_module("llguidance.hf")
        importlib.import_module("llguidance.torch")
        self._tokenizer: Any = None

    def prepare(self, hf_tokenizer: Any, vocab: int, stop: list[int]) -> None:
        # Uncached (sampler/constrained.py keeps one per process): always a real build.
        self._tokenizer = self._llg.hf.from_tokenizer(hf_tokenizer)

    def compile(self, schema: dict[str, Any] | None) -> Callable[[], Cursor]:
        text = self._llg.LLMatcher.grammar_from_json_schema(
            {"type": "object"} if schema is None else json.dumps(schema), defaults={"whitespace_flexible": False}
        )
        error = self._llg.LLMatcher.validate_grammar(text, self._tokenizer)
        if error:
            raise ValueError(error)
        return lambda: _LlgCursor(self._llg, self._tokenizer, text)


class _XgrCursor:
    def __init__(self, xgr: Any, compiled: Any) -> None:
        self._matcher = xgr.GrammarMatcher(compiled)

    def fill(self, bitmask: torch.Tensor) -> None:
        self._matcher.fill_next_token_bitmask(bitmask, 0)

    def advance(self, token: int) -> None:
        if not self._matcher.accept_token(token):
            raise ValueError(f"xgrammar rejected token {token}")

    def accepting(self) -> bool:
        # Completed: the document may end (xgrammar waits for a stop token to terminate).
        return bool(self._matcher.is_completed())


class Xgrammar:
    """xgrammar: a TokenizerInfo per tokenizer and a GrammarCompiler (its defaults: 8 threads, cache
    on). Compiling precomputes, per grammar, which tokens each grammar position allows regardless of
    the stack (its adaptive token-mask cache): compile costs more so that masks cost less."""

    def __init__(self) -> None:
        self._xgr = importlib.import_module("xgrammar")
        self._compiler: Any = None

    def prepare(self, hf_tokenizer: Any, vocab: int, stop: list[int]) -> None:
        info = self._xgr.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=vocab, stop_token_ids=stop)
        self._compiler = self._xgr.GrammarCompiler(info)

    def compile(self, schema: dict[str, Any] | None) -> Callable[[], Cursor]:
        compiled = self._compiler.compile_json_schema(
            json.dumps({"type": "object"} if schema is None else schema), any_whitespace=False, separators=(",", ":")
        )
        return lambda: _XgrCursor(self._xgr, compiled)


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the printable character that stands for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


def token_bytes(hf_tokenizer: Any) -> dict[bytes, list[int]]:
    """Each non-special token's bytes as the model emits them, grouped (several ids can spell the
    same bytes), for libraries that take a plain vocabulary (outlines-core). Handles the two
    tokenizer families dgserve serves: byte-level BPE (the tiny model) and SentencePiece-style
    BPE with '▁' for spaces and <0xXX> byte fallback (Gemma). Raises ValueError otherwise."""
    decoder = json.loads(hf_tokenizer.backend_tokenizer.to_str())["decoder"] or {}
    parts = decoder.get("decoders", [decoder])
    special = set(hf_tokenizer.all_special_ids)
    vocabulary: dict[bytes, list[int]] = {}
    if any(part.get("type") == "ByteLevel" for part in parts):
        alphabet = _byte_level_decoder()

        def spell(token: str) -> bytes:
            return bytes(alphabet[char] for char in token)
    elif any(part.get("type") == "ByteFallback" for part in parts):

        def spell(token: str) -> bytes:
            if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                return bytes([int(token[3:5], 16)])
            return token.replace("▁", " ").encode()
    else:
        raise ValueError(f"no byte spelling for tokenizer decoder {decoder.get('type')!r}")
    for token, token_id in hf_tokenizer.get_vocab().items():
        if token_id not in special:
            vocabulary.setdefault(spell(token), []).append(token_id)
    return vocabulary


class _OutlinesCursor:
    def __init__(self, guide: Any) -> None:
        self._guide = guide

    def fill(self, bitmask: torch.Tensor) -> None:
        self._guide.write_mask_into(bitmask.data_ptr(), bitmask.numel(), bitmask.element_size())

    def advance(self, token: int) -> None:
        self._guide.advance(token, return_tokens=False)

    def accepting(self) -> bool:
        return bool(self._guide.is_finished())


class OutlinesCore:
    """outlines-core: a JSON schema becomes a regex, the regex an Index (a token-level automaton
    precomputed over the whole vocabulary), the Index a Guide per sequence. Its json_object regex
    nests objects and arrays to a fixed depth (a regex cannot recurse)."""

    def __init__(self) -> None:
        self._oc = importlib.import_module("outlines_core")
        self._vocabulary: Any = None

    def prepare(self, hf_tokenizer: Any, vocab: int, stop: list[int]) -> None:
        self._vocabulary = self._oc.Vocabulary(stop[0], token_bytes(hf_tokenizer))

    def compile(self, schema: dict[str, Any] | None) -> Callable[[], Cursor]:
        # Whitespace pattern "": compact JSON, as the other two produce.
        regex = self._oc.json_schema.build_regex_from_schema(json.dumps(schema or {"type": "object"}), "")
        index = self._oc.Index(regex, self._vocabulary)
        return lambda: _OutlinesCursor(self._oc.Guide(index))


FACTORIES: dict[str, Callable[[], Library]] = {
    "llguidance": Llguidance,
    "xgrammar": Xgrammar,
    "outlines-core": OutlinesCore,
}


@dataclass
class Walk:
    """Per-token timings over the document, seconds."""

    fills: list[float] = field(default_factory=list)
    advances: list[float] = field(default_factory=list)
    refused: int = 0  # document tokens the mask did not allow: a wrong vocabulary or grammar
    complete: bool = True


def _allowed(bitmask: torch.Tensor, token: int) -> bool:
    return bool((int(bitmask[0, token // 32]) >> (token % 32)) & 1)


def _walk(cursor: Cursor, ids: list[int], bitmask: torch.Tensor, walk: Walk) -> None:
    """Mask, check the document's token is allowed, advance: token by token."""
    for token in ids:
        start = time.perf_counter()
        cursor.fill(bitmask)
        filled = time.perf_counter()
        walk.fills.append(filled - start)
        walk.refused += not _allowed(bitmask, token)
        start = time.perf_counter()
        cursor.advance(token)
        walk.advances.append(time.perf_counter() - start)
    walk.complete = walk.complete and cursor.accepting()


def _p95(values: list[float]) -> float:
    return sorted(values)[min(len(values) - 1, round(0.95 * (len(values) - 1)))]


def measure_grammar(library: Library, schema: dict[str, Any] | None, ids: list[int], vocab: int, walks: int) -> dict:
    """Compile `schema`, then walk the document `walks` times with fresh cursors (the compiled
    grammar reused, as a server reuses it across `n` choices)."""
    start = time.perf_counter()
    new_cursor = library.compile(schema)
    compiled = time.perf_counter()
    cursor = new_cursor()
    built = time.perf_counter()
    bitmask = torch.zeros(1, (vocab + 31) // 32, dtype=torch.int32)
    walk = Walk()
    _walk(cursor, ids, bitmask, walk)
    for _ in range(walks - 1):
        _walk(new_cursor(), ids, bitmask, walk)
    return {
        "compile_ms": 1e3 * (compiled - start),
        "new_matcher_ms": 1e3 * (built - compiled),
        "first_mask_ms": 1e3 * walk.fills[0],
        "mask_median_ms": 1e3 * statistics.median(walk.fills),
        "mask_p95_ms": 1e3 * _p95(walk.fills),
        "mask_max_ms": 1e3 * max(walk.fills),
        "advance_median_ms": 1e3 * statistics.median(walk.advances),
        "tokens": len(ids),
        "samples": len(walk.fills),
        "refused_tokens": walk.refused,
        "complete": walk.complete,
    }


def measure_library(name: str, tokenizer: Any, vocab: int, stop: list[int], walks: int) -> dict:
    """One library on one tokenizer: preparation, then each grammar; `skipped` when it does not
    import, `error` when it fails on this tokenizer or schema."""
    try:
        library = FACTORIES[name]()
        version = importlib.metadata.version(name)
    except ImportError as exc:
        return {"skipped": f"not installed ({exc})"}
    ids = tokenizer.encode(DOCUMENT, add_special_tokens=False)
    result: dict[str, Any] = {"version": version}
    try:
        start = time.perf_counter()
        library.prepare(tokenizer, vocab, stop)
        result["prepare_s"] = time.perf_counter() - start
        result["grammars"] = {
            grammar: measure_grammar(library, schema, ids, vocab, walks) for grammar, schema in GRAMMARS.items()
        }
    except (ValueError, RuntimeError) as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    return result


def apply_ms(vocab: int, repeats: int = 50) -> float:
    """Median time to apply a bitmask to (1, V) float32 logits with dgserve's kernel: the same
    for every library (all three write the same int32 bitmask layout)."""
    import llguidance.torch

    bitmask = torch.full((1, (vocab + 31) // 32), 0x55555555, dtype=torch.int32)
    times = []
    for _ in range(repeats):
        logits = torch.zeros(1, vocab)
        start = time.perf_counter()
        llguidance.torch.apply_token_bitmask_inplace(logits, bitmask)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _duration(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds >= 1 else f"{1e3 * seconds:.1f} ms"


def table(results: dict[str, dict]) -> str:
    """A Markdown table: one row per library and grammar (or why a library has none)."""
    head = (
        "| library | prepare vocabulary | grammar | compile | new matcher | first mask "
        "| mask median / p95 / max | advance median | doc ok |"
    )
    lines = [head, "|" + "---|" * 9]
    for name, result in results.items():
        label = f"{name} {result.get('version', '')}".strip()
        if "grammars" not in result:
            lines.append(f"| {label} | {result.get('skipped') or result.get('error')} |" + " |" * 7)
            continue
        for grammar, row in result["grammars"].items():
            ok = row["refused_tokens"] == 0 and row["complete"]
            lines.append(
                f"| {label} | {_duration(result['prepare_s'])} | {grammar} | {_duration(row['compile_ms'] / 1e3)} "
                f"| {row['new_matcher_ms']:.2f} ms | {row['first_mask_ms']:.2f} ms "
                f"| {row['mask_median_ms']:.3f} / {row['mask_p95_ms']:.3f} / {row['mask_max_ms']:.2f} ms "
                f"| {row['advance_median_ms']:.3f} ms | {'yes' if ok else 'NO'} |"
            )
    return "\n".join(lines)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.json_mask", description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?", default="tiny-gemma3", help="a dgserve model spec (default tiny-gemma3)")
    parser.add_argument(
        "--libraries", default=",".join(LIBRARIES), help="comma-separated, from " + ", ".join(LIBRARIES)
    )
    parser.add_argument("--walks", type=int, default=3, help="walks of the document per grammar (default 3)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    args.libraries = [name.strip() for name in args.libraries.split(",") if name.strip()]
    unknown = sorted(set(args.libraries) - set(LIBRARIES))
    if unknown or not args.libraries or args.walks < 1:
        parser.error(f"--libraries takes {', '.join(LIBRARIES)} (got {unknown or 'none'}); --walks at least 1")
    return args


def main(argv: list[str]) -> int:
    args = _parse(argv)
    loaded = load_model(args.model, dtype="float32", device="cpu")
    config: Any = loaded.model.config  # a transformers config (torch types attributes as Tensor | Module)
    vocab = int(config.get_text_config().vocab_size)
    tokenizer, stop = loaded.tokenizer, sorted(loaded.eos_token_ids)
    ids = tokenizer.encode(DOCUMENT, add_special_tokens=False)
    cpu = detect().describe()
    print(f"cpu: {cpu}; torch threads {torch.get_num_threads()}")
    print(f"{args.model}: vocabulary {vocab}; document {len(ids)} tokens, {args.walks} walks per grammar")
    results: dict[str, dict] = {}
    for name in args.libraries:
        results[name] = measure_library(name, tokenizer, vocab, stop, args.walks)
        if "skipped" in results[name]:
            print(f"{name}: skipped, {results[name]['skipped']}")
    apply = apply_ms(vocab)
    print(table(results))
    print(f"apply a bitmask to (1, {vocab}) float32 logits (shared by all): median {apply:.3f} ms")
    if args.json:
        report = {
            "model": args.model,
            "vocab": vocab,
            "cpu": cpu,
            "document": DOCUMENT,
            "document_tokens": len(ids),
            "walks": args.walks,
            "apply_median_ms": apply,
            "libraries": results,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
