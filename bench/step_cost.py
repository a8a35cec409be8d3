"""`dgserve bench-steps`: what one forward costs against how many rows it carries, per dtype.

Two of the project's targets are ratios whose ceiling is set by the hardware, not by the
server: batched AR decoding (16 clients against one) gains at most cost(1 row) x 16 /
cost(16 rows), and parallel refinement gains tokens-per-forward x cost(1 row) / cost(block
forward). This measures those costs on the machine at hand, in process:

* `decode`: an `ARSampler` with B greedy sequences on the same prompt, the mean of `--steps`
  steady decode steps (after the prefill and two warm-up steps): ms per step, tokens/s and
  the ceiling B x cost(1) / cost(B) that batching can reach before any prefill.
* `block`: the decoder body (no LM head) over k new rows on a cached context of `--context`
  tokens, the shape of a parallel-refinement forward; best of `--repeats`.
* `head`: the LM head alone at 1 and 16 rows (the largest weight; best of `--repeats`).

Every table names the CPU's ISA flags, the dtype a mode loaded (with `auto`'s reason) and the
kernels `cpu_gemm` chose per weight shape (docs/load.md, "Kernel choice"). Prints a table per
mode (dtype x cpu_gemm) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch


def _decode_costs(loaded: Any, prompt_ids: list[int], batches: list[int], steps: int) -> list[dict[str, Any]]:
    from sampler.ar import ARSampler
    from sampler.types import SamplingParams

    rows: list[dict[str, Any]] = []
    for batch in batches:
        sampler = ARSampler(loaded.model, loaded.device)
        # No stop tokens and room for every step: all B rows decode for the whole measurement.
        params = SamplingParams(max_tokens=steps + 8, temperature=0)
        for i in range(batch):
            sampler.add(str(i), prompt_ids, params)
        for _ in range(3):  # the prefills, then two warm-up steps
            sampler.step()
        start = time.perf_counter()
        for _ in range(steps):
            sampler.step()
        ms = (time.perf_counter() - start) / steps * 1000
        rows.append({"batch": batch, "ms_per_step": ms, "tokens_per_s": batch * 1000 / ms})
    single = next((r["ms_per_step"] for r in rows if r["batch"] == 1), None)
    for r in rows:
        r["batching_ceiling"] = r["batch"] * single / r["ms_per_step"] if single else None
    return rows


@torch.inference_mode()
def _block_costs(loaded: Any, context: int, block_rows: list[int], repeats: int) -> list[dict[str, Any]]:
    from transformers import DynamicCache

    body = loaded.model.model
    vocab = loaded.model.get_output_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, vocab, (1, context), generator=generator).to(loaded.device)
    rows: list[dict[str, Any]] = []
    for k in block_rows:
        best = float("inf")
        for _ in range(repeats + 1):  # the first call warms this shape up
            cache = DynamicCache(config=loaded.model.config)
            body(input_ids=prefix, cache=cache, use_cache=True)
            block = torch.randint(0, vocab, (1, k), generator=generator).to(loaded.device)
            start = time.perf_counter()
            body(input_ids=block, cache=cache, use_cache=True)
            best = min(best, time.perf_counter() - start)
        rows.append({"rows": k, "ms": best * 1000})
    single = next((r["ms"] for r in rows if r["rows"] == 1), None)
    for r in rows:
        r["vs_one_row"] = r["ms"] / single if single else None
    return rows


@torch.inference_mode()
def _head_costs(loaded: Any, head_rows: list[int], repeats: int) -> list[dict[str, Any]]:
    head = loaded.model.get_output_embeddings()
    generator = torch.Generator().manual_seed(0)
    rows: list[dict[str, Any]] = []
    for k in head_rows:
        x = torch.randn(k, head.in_features, generator=generator).to(device=loaded.device, dtype=loaded.dtype)
        best = float("inf")
        for _ in range(repeats + 1):  # the first call warms this shape up
            start = time.perf_counter()
            head(x)
            best = min(best, time.perf_counter() - start)
        rows.append({"rows": k, "ms": best * 1000})
    return rows


def _mode(loaded: Any, dtype: str, cpu_gemm: str) -> dict[str, Any]:
    """What a mode ran with: the dtype loaded (and why, for `auto`) and the kernels chosen."""
    from sampler.runtime.cpu_linear import kernel_summary
    from sampler.runtime.loading import choose_dtype

    return {
        "requested_dtype": dtype,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "dtype_reason": choose_dtype(dtype, loaded.device)[1],
        "cpu_gemm": cpu_gemm,
        "kernels": kernel_summary(loaded.model),
        "device": str(loaded.device),
    }


def _print_mode(name: str, model: str, entry: dict[str, Any]) -> None:
    print(f"\n{model} {name} on {entry['device']}, {torch.get_num_threads()} threads: {entry['dtype']}", end="")
    print(f" ({entry['dtype_reason']}), cpu_gemm {entry['cpu_gemm']}")
    for shape, plan in entry["kernels"].items():
        print(f"  kernels {shape}: {plan}")
    print(f"{'decode batch':>12} {'ms/step':>8} {'tok/s':>7} {'ceiling':>8}")
    for r in entry["decode"]:
        ceiling = f"{r['batching_ceiling']:.2f}x" if r["batching_ceiling"] else "-"
        print(f"{r['batch']:>12} {r['ms_per_step']:>8.1f} {r['tokens_per_s']:>7.1f} {ceiling:>8}")
    print(f"{'block rows':>12} {'body ms':>8} {'x 1 row':>7}")
    for r in entry["block"]:
        ratio = f"{r['vs_one_row']:.2f}" if r["vs_one_row"] else "-"
        print(f"{r['rows']:>12} {r['ms']:>8.1f} {ratio:>7}")
    print(f"{'head rows':>12} {'head ms':>8}")
    for r in entry["head"]:
        print(f"{r['rows']:>12} {r['ms']:>8.1f}")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dgserve bench-steps")
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--dtypes", default="float32,bfloat16", help="dtypes to load (auto: what this CPU gets)")
    p.add_argument("--cpu-gemm", default="", help="cpu_gemm modes, comma-separated (default: the config's)")
    p.add_argument("--batches", default="1,4,16", help="AR decode batch sizes")
    p.add_argument("--block-rows", default="1,2,4,8,17", help="new rows of a body forward")
    p.add_argument("--head-rows", default="1,16", help="rows of an LM head call")
    p.add_argument("--steps", type=int, default=15, help="decode steps measured per batch size")
    p.add_argument("--context", type=int, default=200, help="cached tokens before a block forward")
    p.add_argument("--repeats", type=int, default=3, help="block forwards per row count (best kept)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", dest="json_out")
    return p


def run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)

    from sampler.runtime.cpu_features import detect
    from sampler.runtime.loading import load_model
    from server.config import load_config

    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_config(args.config)
    cpu = detect()
    gemms = [g for g in args.cpu_gemm.split(",") if g] or [config.cpu_gemm]
    report: dict[str, Any] = {
        "model": config.model,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu": {"isa": cpu.isa(), "torch_capability": cpu.capability},
        "dtypes": {},
    }
    print(f"CPU: {cpu.describe()}; torch {torch.__version__}")
    for dtype in args.dtypes.split(","):
        for gemm in gemms:
            loaded = load_model(config.model, dtype=dtype, device=config.device, cpu_gemm=gemm)
            if loaded.kind != "causal":
                raise SystemExit(f"bench-steps measures causal models; {config.model} is a {loaded.kind} model")
            prompt_ids = list(loaded.tokenizer("The history of the Roman empire is")["input_ids"])
            entry = _mode(loaded, dtype, gemm)
            entry["decode"] = _decode_costs(loaded, prompt_ids, _ints(args.batches), args.steps)
            entry["block"] = _block_costs(loaded, args.context, _ints(args.block_rows), args.repeats)
            entry["head"] = _head_costs(loaded, _ints(args.head_rows), args.repeats)
            name = dtype if len(gemms) == 1 else f"{dtype}/{gemm}"
            report["dtypes"][name] = entry
            _print_mode(name, config.model, entry)
            del loaded
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(report, indent=2))
    return 0
