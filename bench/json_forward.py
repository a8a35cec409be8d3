"""Tokens per forward of `parallel` on JSON-schema prompts, with and without forced-token commits.

For every prompt of `bench/json_prompts.jsonl` (a base-model prompt and a schema with fixed keys:
records, lists of records) it runs, greedy and side by side one step of each in turn (the order
rotating per prompt, as `dgserve bench` does): `ar`, `parallel` with `commit_forced=False` (every
token takes a draw row of a masked forward) and `parallel` as configured (tokens the grammar
allows alone are committed without a forward). It prints one row per mode (tokens, forwards,
tokens per forward, tokens/s, outputs that parse and validate with jsonschema, outputs equal to
AR's) and writes JSON. docs/parallel.md ("Structured output") quotes a run.

    .venv/bin/python -m bench.json_forward --config configs/default.yaml --limit 6 --max-tokens 96 \
        --threads 2 --json bench/out/json_forward.json
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import torch

from bench.refine import interleaved
from sampler.ar import ARSampler
from sampler.constrained import json_grammar
from sampler.parallel import ParallelSampler
from sampler.types import BatchSampler, SamplingParams

DEFAULT_PROMPTS = Path(__file__).with_name("json_prompts.jsonl")
MODES = ("ar", "parallel no-forced", "parallel forced")


@dataclass
class ModeResult:
    """One mode's outputs over the prompts, in prompt order."""

    mode: str
    outputs: list[list[int]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    forwards: list[int] = field(default_factory=list)
    valid: list[bool] = field(default_factory=list)

    def summary(self, reference: ModeResult) -> dict[str, Any]:
        tokens, forwards, seconds = sum(map(len, self.outputs)), sum(self.forwards), sum(self.seconds)
        same = sum(a == b for a, b in zip(self.outputs, reference.outputs, strict=True))
        return {
            "mode": self.mode,
            "tokens": tokens,
            "forwards": forwards,
            "tokens_per_forward": tokens / max(forwards, 1),
            "tokens_per_s": tokens / max(seconds, 1e-9),
            "valid": sum(self.valid) / max(len(self.valid), 1),
            "same_as_ar": same / max(len(self.outputs), 1),
        }


def load_cases(path: Path, limit: int | None) -> list[dict[str, Any]]:
    """The prompts with their schemas (`prompt`, `schema`, `kind` per JSON line)."""
    cases = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return cases[:limit] if limit else cases


def is_valid(text: str, schema: dict[str, Any]) -> bool:
    """The output parses as JSON and validates against the schema."""
    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def table(rows: list[dict[str, Any]]) -> str:
    """The summary rows as a Markdown table."""
    lines = [
        "| mode | tokens | forwards | tok/fwd | tok/s | valid | same as AR |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['tokens']} | {r['forwards']} | {r['tokens_per_forward']:.2f} | "
            f"{r['tokens_per_s']:.1f} | {100 * r['valid']:.0f}% | {100 * r['same_as_ar']:.0f}% |"
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.json_forward", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/default.yaml", help="the server config whose model runs")
    parser.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS, help="JSON lines: prompt, schema")
    parser.add_argument("--limit", type=int, default=None, help="use the first N prompts")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--dtype", default="float32", help="float32 (default: greedy output equals AR's) or auto")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from sampler.runtime.loading import load_model
    from server.chat import text_prompt_ids
    from server.config import load_config

    config = load_config(args.config)
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = load_cases(args.prompts, args.limit)
    print(f"loading {config.model} ({args.dtype}) ...", file=sys.stderr, flush=True)
    loaded = load_model(
        config.model, dtype=args.dtype, device=config.device, cpu_gemm=config.cpu_gemm, quantization=config.quantization
    )
    stop = frozenset(loaded.eos_token_ids)
    options = dict(config.parallel)

    def make(mode: str) -> BatchSampler:
        if mode == "ar":
            return ARSampler(loaded.model, loaded.device, prefix_cache_mb=0)
        return ParallelSampler(loaded.model, loaded.device, **options, commit_forced=mode == "parallel forced")

    grammars = [json_grammar(loaded.tokenizer, case["schema"]) for case in cases]  # the first builds the tokenizer
    prompt_ids = [text_prompt_ids(loaded.tokenizer, case["prompt"]) for case in cases]
    # Warm-up, not counted: first forwards and the first mask application pay one-off costs.
    warm = SamplingParams(max_tokens=4, temperature=0.0, stop_token_ids=stop, grammar=grammars[0])
    interleaved([make(mode) for mode in MODES], prompt_ids[0], warm)

    results = [ModeResult(mode) for mode in MODES]
    for i, (case, ids, grammar) in enumerate(zip(cases, prompt_ids, grammars, strict=True)):
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, stop_token_ids=stop, grammar=grammar)
        order = results[i % len(results) :] + results[: i % len(results)]  # rotate who goes first
        for r, (out, secs, forwards) in zip(
            order, interleaved([make(r.mode) for r in order], ids, params), strict=True
        ):
            r.outputs.append(out)
            r.seconds.append(secs)
            r.forwards.append(forwards)
            r.valid.append(is_valid(loaded.tokenizer.decode(out), case["schema"]))
        line = " ".join(f"{r.mode}: {len(r.outputs[-1])}/{r.forwards[-1]}" for r in results)
        print(f"[{i + 1}/{len(cases)}] {case['kind']}: tokens/forwards {line}", file=sys.stderr, flush=True)

    rows = [r.summary(results[0]) for r in results]
    print(
        f"{config.model} ({args.dtype}, {torch.get_num_threads()} threads), {len(cases)} JSON-schema prompts, "
        f"{args.max_tokens} max tokens, greedy"
    )
    print(table(rows))
    if args.json is not None:
        report = {
            "model": config.model,
            "dtype": args.dtype,
            "threads": torch.get_num_threads(),
            "max_tokens": args.max_tokens,
            "prompts": [case["kind"] for case in cases],
            "modes": rows,
            "outputs": {r.mode: [loaded.tokenizer.decode(o) for o in r.outputs] for r in results},
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
