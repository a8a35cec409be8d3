"""`dgserve bench`: parallel refinement vs AR on the same weights, in one process, interleaved.

For every prompt it runs AR greedy and the parallel sampler at each `steps` setting side by side,
one step of each in turn (the order rotates per prompt), so machine noise hits all alike. Per configuration it
reports tokens/s, the ratio to AR (aggregate and median per prompt), tokens per forward,
exact-match rate and ROUGE-L against AR's output, and the perplexity of the output under the
model in float32; then the default configuration's ratio at a few output lengths, its tokens
per forward and speed-up when sampling (seeded, at `--temperatures`), and with `--concurrency`
the tokens/s of N concurrent greedy sequences through the engine core (batched parallel against
batched AR). With `--peer-llama-server PATH` llama.cpp's server on the same GGUF answers the same
prompts (one request at a time, after ours on each prompt) and its text is scored like the other
rows. Last, the cost of echo scoring (`/v1/completions` echo + max_tokens 0) of a ~200-token text
against a plain prefill of it. It prints tables, writes JSON (top-level `runs`, `sampling`,
`concurrency`, `echo_cost`) and optionally a PNG of speed ratio against quality
(docs/parallel.md, Benchmark).

    dgserve bench --config configs/default.yaml --prompts bench/prompts.jsonl --max-tokens 128 \
        [--dtype float32|bfloat16] --json OUT.json [--plot OUT.png] [--limit N] \
        [--peer-llama-server PATH/llama-server]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import torch

from bench.live_server import LiveServer, llama_server_gguf
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
    dtype: str | None = None  # None: the bench's dtype; a peer names its own weights
    # A peer server's own time per prompt, when it reports one (llama-server's `timings`).
    server_seconds: list[float] = field(default_factory=list)

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
        help="in bfloat16/float16, skip the float32 AR run that exact match and ROUGE-L are also measured against",
    )
    p.add_argument(
        "--peer-llama-server",
        metavar="PATH",
        default=None,
        help="add llama.cpp's llama-server binary at PATH as a row: same GGUF, prompts and max tokens, greedy",
    )
    p.add_argument(
        "--peer-gguf",
        metavar="PATH",
        default=None,
        help="the GGUF llama-server loads (default: the config's model's own GGUF); its vocabulary must be ours",
    )
    p.add_argument(
        "--echo-tokens", type=int, default=200, help="length of the echo-scoring cost measurement's text ('0' skips it)"
    )
    p.add_argument("--echo-repeats", type=int, default=5, help="runs of each side of the echo-scoring measurement")
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


@dataclass
class PeerReply:
    """One completion from a peer server."""

    text: str
    seconds: float  # the request's wall time, loopback HTTP included
    tokens: int  # tokens generated, by the peer's own count
    server_seconds: float | None  # the peer's own prompt + generation time, when it reports it


def peer_completion_body(prompt: str, max_tokens: int) -> dict[str, Any]:
    """Greedy, as our rows; `cache_prompt` off, so every prompt is processed whole as our samplers
    do (llama-server otherwise reuses the KV of the previous request's common prefix)."""
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": False, "cache_prompt": False}


def peer_reply(body: dict[str, Any], seconds: float) -> PeerReply:
    """A `/v1/completions` answer as a PeerReply (llama-server adds `timings` in milliseconds)."""
    timings = body.get("timings") or {}
    ms = timings.get("prompt_ms", 0.0) + timings.get("predicted_ms", 0.0) if timings else None
    return PeerReply(
        text=body["choices"][0]["text"],
        seconds=seconds,
        tokens=int((body.get("usage") or {}).get("completion_tokens", 0)),
        server_seconds=None if ms is None else ms / 1000,
    )


class LlamaServerPeer:
    """llama.cpp's `llama-server` on the same GGUF, a row of the bench (docs/parallel.md,
    Benchmark): one slot, the bench's thread count, one greedy request at a time through its
    OpenAI `/v1/completions`. Started on a free loopback port; use it as a context manager."""

    def __init__(self, exe: str, gguf: Path, max_tokens: int, threads: int) -> None:
        self.gguf = gguf
        self.threads = threads
        self.max_tokens = max_tokens
        self.server = LiveServer.llama_server(exe, gguf, parallel=1, max_tokens=max_tokens, threads=threads)

    def __enter__(self) -> LlamaServerPeer:
        self.server.wait_ready(timeout=600)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.server.stop()

    def complete(self, prompt: str, max_tokens: int | None = None) -> PeerReply:
        body = peer_completion_body(prompt, self.max_tokens if max_tokens is None else max_tokens)
        start = time.perf_counter()
        r = httpx.post(f"{self.server.base_url}/v1/completions", json=body, timeout=600)
        seconds = time.perf_counter() - start
        r.raise_for_status()
        return peer_reply(r.json(), seconds)


def add_peer_reply(result: Result, reply: PeerReply, tok: Any) -> None:
    """Record a peer's completion: its text re-tokenized with our tokenizer (same vocabulary),
    so exact match, ROUGE-L and perplexity compare like with like; forwards = its token count
    (one decode per token, as our AR counts its prefill's first token)."""
    result.outputs.append(list(tok(reply.text, add_special_tokens=False).input_ids))
    result.seconds.append(reply.seconds)
    result.forwards.append(reply.tokens)
    if reply.server_seconds is not None:
        result.server_seconds.append(reply.server_seconds)


class Scorer:
    """Scores every row alike: exact match and ROUGE-L against AR's output (and against float32
    AR's when the bench runs another dtype), perplexity of the output under the float32 model,
    speed against AR's. Each (prompt, output) pair's perplexity is computed once."""

    def __init__(
        self,
        f32_model: torch.nn.Module,
        tok: Any,
        prompt_ids: list[list[int]],
        ar: Result,
        f32_ref: list[list[int]] | None,
    ) -> None:
        from rouge_score import rouge_scorer

        self.rouge = rouge_scorer.RougeScorer(["rougeL"])
        self.f32_model, self.tok, self.prompt_ids, self.ar, self.f32_ref = f32_model, tok, prompt_ids, ar, f32_ref
        self.ar_texts = self.texts(ar.outputs)
        self.f32_texts = self.texts(f32_ref) if f32_ref is not None else None
        self._ppl: dict[tuple[int, ...], tuple[float, int]] = {}

    def texts(self, outputs: list[list[int]]) -> list[str]:
        return [self.tok.decode(o, skip_special_tokens=True) for o in outputs]

    def perplexity(self, outputs: list[list[int]]) -> float:
        nll = count = 0.0
        for ids, out in zip(self.prompt_ids, outputs, strict=True):
            key = (len(ids), *ids, -1, *out)
            if key not in self._ppl:
                self._ppl[key] = perplexity(self.f32_model, ids, out)
            nll += self._ppl[key][0]
            count += self._ppl[key][1]
        return math.exp(nll / count) if count else float("nan")

    def rouge_l(self, refs: list[str], texts: list[str]) -> float:
        return statistics.fmean(_rouge_l(self.rouge, a, t) for a, t in zip(refs, texts, strict=True))

    def row(self, r: Result, dtype: str) -> dict[str, Any]:
        ar, n = self.ar, len(self.prompt_ids)
        texts = self.texts(r.outputs)
        rates = [a / b for a, b in zip(r.per_prompt_rate(), ar.per_prompt_rate(), strict=True)]
        row = {
            "sampler": r.sampler,
            "steps": r.steps,
            "dtype": r.dtype or dtype,
            "tokens_per_s": r.tokens_per_s,
            "ratio_vs_ar": r.tokens_per_s / ar.tokens_per_s,
            "ratio_vs_ar_median": statistics.median(rates),
            "tokens_per_forward": r.tokens / max(sum(r.forwards), 1),
            "exact_match_rate": sum(o == a for o, a in zip(r.outputs, ar.outputs, strict=True)) / n,
            "rouge_l": self.rouge_l(self.ar_texts, texts),
            "perplexity": self.perplexity(r.outputs),
            "tokens": r.tokens,
            "forwards": sum(r.forwards),
            "seconds": sum(r.seconds),
        }
        if self.f32_ref is not None and self.f32_texts is not None:
            row["exact_match_vs_f32_ar"] = sum(o == a for o, a in zip(r.outputs, self.f32_ref, strict=True)) / n
            row["rouge_l_vs_f32_ar"] = self.rouge_l(self.f32_texts, texts)
        if r.server_seconds:
            row["tokens_per_s_in_server"] = sum(r.forwards) / max(sum(r.server_seconds), 1e-9)
        return row


def echo_text_ids(tok: Any, texts: list[str], n: int) -> list[int]:
    """`n` token ids of `texts` joined (repeated until long enough), BOS first as in a request."""
    ids = list(tok("\n\n".join(texts)).input_ids)
    body = ids[1:] if ids and ids[0] == tok.bos_token_id else ids
    while len(ids) < n and body:
        ids += body
    return ids[:n]


def echo_cost(make_ar: Callable[[], BatchSampler], ids: list[int], repeats: int) -> dict[str, Any]:
    """Scoring `ids` as `/v1/completions` echo + max_tokens 0 does (ar's prompt logprobs, every
    row's logits: sampler/ar.py `_prefill_chunk`) against a plain prefill of the same ids
    (max_tokens 1, no logprobs), each run on a fresh sampler (no prefix-cache hit), the two
    alternating; best and median of `repeats` runs, and the forwards each took."""
    sides = {
        "scoring": SamplingParams(max_tokens=0, prompt_logprobs=1),
        "prefill": SamplingParams(max_tokens=1, temperature=0.0),
    }
    for params in sides.values():  # warm-up at this length, not counted
        generate(make_ar(), ids, params)
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    forwards: dict[str, int] = {}
    for i in range(repeats):
        for name in sides if i % 2 == 0 else reversed(sides):
            _, secs, fw = generate(make_ar(), ids, sides[name])
            seconds[name].append(secs)
            forwards[name] = max(forwards.get(name, 0), fw)
    out: dict[str, Any] = {"tokens": len(ids), "repeats": repeats}
    for name in sides:
        out[f"{name}_s"] = min(seconds[name])
        out[f"{name}_s_median"] = statistics.median(seconds[name])
        out[f"{name}_forwards"] = forwards[name]
    out["scoring_vs_prefill"] = out["scoring_s"] / max(out["prefill_s"], 1e-9)
    return out


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


def _resolved_dtype(args: argparse.Namespace, config: Any) -> str:
    """The dtype the bench loads, `auto` resolved as the server resolves it, so the float32
    reference is loaded only when needed and the table names what ran."""
    from sampler.runtime.loading import choose_dtype, resolve_device

    chosen, _ = choose_dtype(args.dtype or config.dtype, resolve_device(config.device))
    return str(chosen).removeprefix("torch.")


def _peer_gguf(args: argparse.Namespace, config: Any) -> Path | None:
    """The GGUF the llama-server peer loads (None without a peer); resolved before our model
    loads, so a config without one fails at once."""
    if not args.peer_llama_server:
        return None
    return Path(args.peer_gguf).expanduser() if args.peer_gguf else llama_server_gguf(config)


def _main_runs(
    make: Callable[[Any], BatchSampler],
    prompts: list[str],
    prompt_ids: list[list[int]],
    params: SamplingParams,
    steps_list: list[int | None],
    peer: LlamaServerPeer | None,
    tok: Any,
) -> tuple[list[Result], Result | None]:
    """AR and every steps setting interleaved step by step on each prompt (the order rotating),
    then the peer on the same prompt while ours are idle. Returns (our results, the peer's)."""
    for kind in ("ar", None):  # warm-up: first forwards pay one-off allocation costs, not counted
        generate(make(kind), prompt_ids[0], SamplingParams(max_tokens=4, temperature=0.0))
    peer_result = None
    if peer is not None:
        peer.complete(prompts[0], 4)
        peer_result = Result("llama-server", "llama-server", None, dtype="gguf")
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
        if peer is not None and peer_result is not None:
            add_peer_reply(peer_result, peer.complete(prompts[i]), tok)
        line = " ".join(
            f"{r.label.replace('parallel steps=', 's=')}:{len(r.outputs[-1]) / max(r.seconds[-1], 1e-9):.1f}"
            for r in results + ([peer_result] if peer_result else [])
        )
        print(f"[{i + 1}/{len(prompts)}] tok/s {line}", file=sys.stderr, flush=True)
    return results, peer_result


def _run(args: argparse.Namespace, config: Any) -> int:
    from sampler.runtime.loading import load_model

    dtype = _resolved_dtype(args, config)
    peer_gguf = _peer_gguf(args, config)
    prompts = load_prompts(args.prompts, args.limit)
    if not prompts:
        print("dgserve bench: no prompts", file=sys.stderr)
        return 2
    steps_list = _parse_steps(args.steps)
    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    options = dict(config.parallel)

    print(f"loading {config.model} ({dtype}, device {config.device}) ...", file=sys.stderr, flush=True)
    loaded = load_model(
        config.model, dtype=dtype, device=config.device, cpu_gemm=config.cpu_gemm, quantization=config.quantization
    )
    # The reference is float32 with the weights as loaded: not the run itself under quantization.
    exact = dtype == "float32" and config.quantization == "none"
    f32 = loaded if exact else load_model(config.model, dtype="float32", device=config.device, cpu_gemm=config.cpu_gemm)
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

    peer = None
    if peer_gguf is not None:  # started once our model is loaded: no process to leak if that fails
        peer = LlamaServerPeer(args.peer_llama_server, peer_gguf, args.max_tokens, torch.get_num_threads())
    with peer or nullcontext():
        results, peer_result = _main_runs(make, prompts, prompt_ids, params, steps_list, peer, tok)

    f32_ref: list[list[int]] | None = None
    if not exact and not args.no_f32_reference:
        print("float32 AR reference run ...", file=sys.stderr, flush=True)
        f32_ref = [generate(ARSampler(f32.model, f32.device), ids, params)[0] for ids in prompt_ids]
    scorer = Scorer(f32.model, tok, prompt_ids, results[0], f32_ref)
    label = dtype if config.quantization == "none" else f"{dtype}, {config.quantization} weights"
    runs = [scorer.row(r, label) for r in results + ([peer_result] if peer_result else [])]

    scaling = _scaling_rows(make, prompt_ids[: min(args.scaling_prompts, len(prompts))], params, lengths)
    temperatures = [float(x) for x in args.temperatures.split(",") if x.strip()]
    sampling = [_sampling_row(make, prompt_ids, params, t) for t in temperatures]
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    concurrency = [_concurrency_row(make, prompt_ids, params, n) for n in levels]
    echo = None
    if args.echo_tokens > 0:
        print(f"echo-scoring cost, {args.echo_tokens} tokens ...", file=sys.stderr, flush=True)
        ar_options = config.sampler_options("ar")  # the served ar's prefill budget and prefix cache
        echo_ids = echo_text_ids(tok, load_prompts(args.prompts), args.echo_tokens)
        echo = echo_cost(lambda: ARSampler(loaded.model, loaded.device, **ar_options), echo_ids, args.echo_repeats)

    report = {
        "model": config.model,
        "dtype": dtype,
        "quantization": config.quantization,
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
        "echo_cost": echo,
    }
    if peer is not None:
        report["peer_llama_server"] = {"exe": args.peer_llama_server, "gguf": str(peer.gguf), "threads": peer.threads}
    print(format_table(report))
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot(report, args.plot)
    return 0


def _scaling_rows(
    make: Callable[[Any], BatchSampler], prompt_ids: list[list[int]], params: SamplingParams, lengths: list[int]
) -> list[dict[str, Any]]:
    """The default parallel config against AR at each output length, interleaved on `prompt_ids`."""
    scaling: list[dict[str, Any]] = []
    for length in lengths if prompt_ids else []:
        p_len = SamplingParams(max_tokens=length, temperature=0.0, stop_token_ids=params.stop_token_ids)
        pair = {"ar": [0, 0.0], "parallel": [0, 0.0]}
        for i, ids in enumerate(prompt_ids):
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
                "prompts": len(prompt_ids),
                "ar_tokens_per_s": ar_rate,
                "parallel_tokens_per_s": par_rate,
                "ratio_vs_ar": par_rate / ar_rate,
            }
        )
    return scaling


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
        head += ["exact vs f32 AR", "ROUGE-L vs f32 AR"]
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
            cells += [f"{r['exact_match_vs_f32_ar']:.0%}", f"{r['rouge_l_vs_f32_ar']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += _peer_note(report)
    if report["scaling"]:
        lines += ["", "| new tokens (default config) | AR tok/s | parallel tok/s | x AR |", "|---|---|---|---|"]
        for s in report["scaling"]:
            lines.append(
                f"| {s['max_tokens']} | {s['ar_tokens_per_s']:.1f} | {s['parallel_tokens_per_s']:.1f} | "
                f"{s['ratio_vs_ar']:.2f} |"
            )
    return "\n".join(lines + _extra_tables(report) + _echo_lines(report))


def _peer_note(report: dict[str, Any]) -> list[str]:
    """What the llama-server row measured (empty without one)."""
    peer = report.get("peer_llama_server")
    row = next((r for r in report["runs"] if r["sampler"] == "llama-server"), None)
    if not peer or row is None:
        return []
    own = row.get("tokens_per_s_in_server")
    return [
        "",
        f"llama-server: llama.cpp on {Path(peer['gguf']).name}, {peer['threads']} threads, one greedy request at a "
        "time; its tok/s is the request's wall time and includes loopback HTTP"
        + (f" (its own timings: {own:.1f} tok/s)" if own else "")
        + "; its text is re-tokenized with our tokenizer and scored like the other rows.",
    ]


def _echo_lines(report: dict[str, Any]) -> list[str]:
    """The echo-scoring cost line (empty when it did not run)."""
    e = report.get("echo_cost")
    if not e:
        return []

    def fw(n: int) -> str:
        return f"{n} forward{'s' if n != 1 else ''}"

    return [
        "",
        f"echo scoring of a {e['tokens']}-token text (ar, max_tokens=0, prompt_logprobs=1): "
        f"{1000 * e['scoring_s']:.1f} ms, {fw(e['scoring_forwards'])}; plain prefill (max_tokens=1): "
        f"{1000 * e['prefill_s']:.1f} ms, {fw(e['prefill_forwards'])}; scoring / prefill "
        f"{e['scoring_vs_prefill']:.2f}x (best of {e['repeats']}, alternating)",
    ]


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
