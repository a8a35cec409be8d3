"""`dgserve bench-load`: the server under concurrent streaming clients, over real HTTP.

It starts `dgserve` with the given config as a subprocess on a free loopback port and sends
the prompts at each concurrency level (every client streams, greedy). A level sends enough
requests to keep every client busy for several requests in a row (by default
max(prompts, 4 x concurrency), prompts cycled), so its figure is the server at that concurrency
and not mostly the ramp-down of one wave. Then, with the server still up, it measures the HTTP
overhead by alternating, prompt by prompt, one streaming HTTP request and the same prompt on the
in-process sampler: on a shared machine, side by side is the only fair comparison. Prints a
table and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from bench.live_server import LiveServer, free_port, llama_server_gguf
from bench.sse import aiter_sse_json

# Pooled connections idle longer than this are not reused: below the 5 s after which common
# servers (llama-server's cpp-httplib, uvicorn) close them, so a request never races a close.
_KEEPALIVE_S = 2.0


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


@contextlib.asynccontextmanager
async def _stream_with_retry(client: httpx.AsyncClient, body: dict[str, Any]) -> AsyncIterator[httpx.Response]:
    """POST /v1/completions streaming; a request the server dropped before answering (a pooled
    keep-alive connection it closed as the request went out: llama-server's HTTP library closes
    idle connections after 5 s) is sent once more on a fresh connection, since no work was done."""
    for attempt in (1, 2):
        answered = False
        try:
            async with client.stream("POST", "/v1/completions", json=body) as r:
                answered = True
                yield r
                return
        except httpx.RemoteProtocolError as dropped:
            if answered or attempt == 2 or "without sending a response" not in str(dropped):
                raise


async def _one(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    ttft, text, tokens, text_chunks = None, "", 0, 0
    async with _stream_with_retry(client, body) as r:
        r.raise_for_status()
        async for chunk in aiter_sse_json(r.aiter_lines()):
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                if choice.get("text") and ttft is None:
                    ttft = time.perf_counter() - start
                text_chunks += bool(choice.get("text"))
                text += choice.get("text") or ""
    # A server that sends no usage (some llama-server builds) streams one token per chunk.
    tokens = tokens or text_chunks
    return {"ttft_s": ttft or 0.0, "latency_s": time.perf_counter() - start, "tokens": tokens, "text": text}


async def _level(
    base_url: str, model: str, prompts: list[str], concurrency: int, max_tokens: int, requests: int
) -> dict[str, Any]:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(
        base_url=base_url,
        timeout=600,
        limits=httpx.Limits(max_connections=concurrency + 4, keepalive_expiry=_KEEPALIVE_S),
    ) as client:

        async def run(i: int) -> dict[str, Any]:
            async with sem:
                return {"prompt": i % len(prompts), **await _one(client, model, prompts[i % len(prompts)], max_tokens)}

        start = time.perf_counter()
        results = await asyncio.gather(*[run(i) for i in range(requests)])
        wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    texts: dict[int, list[str]] = {}
    for r in results:
        texts.setdefault(r["prompt"], []).append(r["text"])
    return {
        "concurrency": concurrency,
        "requests": requests,
        "aggregate_tokens_per_s": tokens / wall,
        "ttft_p50_s": _percentile([r["ttft_s"] for r in results], 0.5),
        "ttft_p95_s": _percentile([r["ttft_s"] for r in results], 0.95),
        "latency_p50_s": _percentile([r["latency_s"] for r in results], 0.5),
        "latency_p95_s": _percentile([r["latency_s"] for r in results], 0.95),
        "texts": texts,  # prompt index -> the text of every request that sent it
    }


def _same_texts(level: dict[str, Any], reference: dict[str, Any]) -> bool:
    """Whether every request of `level` got the text its prompt got first at `reference`."""
    return all(
        text == reference["texts"][k][0]
        for k, texts in level["texts"].items()
        for text in texts
        if k in reference["texts"]
    )


def _in_process_sampler(config: Any) -> tuple[Any, Any]:
    """The served sampler on its own copy of the model, in this process: (loaded, sampler)."""
    from sampler.registry import build_sampler
    from server.startup import load_configured

    loaded = load_configured(config)  # as the server loads it
    return loaded, build_sampler(config.sampler, loaded, config.sampler_options(config.sampler))


def _greedy(loaded: Any, max_tokens: int) -> Any:
    from sampler.types import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0, stop_token_ids=frozenset(loaded.eos_token_ids))


def _http_overhead(
    base_url: str, model: str, loaded: Any, sampler: Any, prompts: list[str], max_tokens: int
) -> dict[str, float]:
    """Single-client HTTP against the in-process sampler, alternating prompt by prompt.

    The server is idle while the in-process sampler runs and the other way round, so both see
    the same machine; a drift in the machine's speed lands on both sides.
    """

    def in_process(prompt: str) -> tuple[int, float]:
        return _run_in_process(loaded, sampler, [prompt], 1, 1, max_tokens)

    async def over_http(prompt: str) -> tuple[int, float]:
        async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:
            r = await _one(client, model, prompt, max_tokens)
        return r["tokens"], r["latency_s"]

    if not prompts:  # --overhead-prompts 0: not measured
        return {}
    in_process(prompts[0])  # warm-up, both sides
    asyncio.run(over_http(prompts[0]))
    totals = {"http": [0, 0.0], "in_process": [0, 0.0]}
    for prompt in prompts:
        for side, run in (("http", lambda p: asyncio.run(over_http(p))), ("in_process", in_process)):
            tokens, seconds = run(prompt)
            totals[side][0] += tokens
            totals[side][1] += seconds
    http = totals["http"][0] / totals["http"][1]
    local = totals["in_process"][0] / totals["in_process"][1]
    return {
        "http_single_client_tokens_per_s": http,
        "in_process_tokens_per_s": local,
        "http_overhead": 1 - http / local,
    }


def _run_in_process(
    loaded: Any, sampler: Any, prompts: list[str], concurrency: int, requests: int, max_tokens: int
) -> tuple[int, float]:
    """Run `requests` greedy requests (prompts cycled) on the sampler alone with `concurrency`
    sequences always in flight (a finished one is replaced at once). Returns (tokens, seconds)."""
    from server.engine_core import run_to_completion

    ids = [list(loaded.tokenizer(p)["input_ids"]) for p in prompts]
    jobs = {f"in-process-{i}": (ids[i % len(ids)], _greedy(loaded, max_tokens)) for i in range(requests)}
    start = time.perf_counter()
    done = run_to_completion(sampler, jobs, max_num_seqs=concurrency)  # the engine's FIFO admission
    return sum(len(t) for t in done.tokens.values()), time.perf_counter() - start


def _in_process_closed_loop(
    loaded: Any, sampler: Any, prompts: list[str], concurrency: int, requests: int, max_tokens: int
) -> float:
    """Aggregate tokens/s of the sampler alone, the level's requests always `concurrency` in
    flight: what a level could reach with no server, no HTTP and no client in the way."""
    tokens, seconds = _run_in_process(loaded, sampler, prompts, concurrency, requests, max_tokens)
    return tokens / seconds


def _requests_for(concurrency: int, prompts: list[str], requests_per_level: int) -> int:
    return requests_per_level or max(len(prompts), 4 * concurrency)


def _load_levels(
    base: str, model: str, prompts: list[str], levels: list[int], max_tokens: int, requests_per_level: int, label: str
) -> list[dict[str, Any]]:
    asyncio.run(_level(base, model, prompts[:1], 1, 8, 1))  # warm-up
    rows = []
    for c in levels:
        requests = _requests_for(c, prompts, requests_per_level)
        rows.append(asyncio.run(_level(base, model, prompts, c, max_tokens, requests)))
        print(f"  {label} concurrency {c}: {rows[-1]['aggregate_tokens_per_s']:.1f} tok/s", flush=True)
    return rows


def _resolved_dtype(dtype: str) -> str:
    """A dtype name as the server would load it here (`auto` resolved for this CPU), so the
    peers load the same weights and the table names what ran."""
    from sampler.runtime.loading import choose_dtype, resolve_device

    chosen, _ = choose_dtype(dtype, resolve_device("auto"))
    return str(chosen).removeprefix("torch.")


def _peer_transformers_serve(
    model_dir: str, dtype: str, prompts: list[str], levels: list[int], max_tokens: int, requests_per_level: int
) -> list[dict[str, Any]]:
    port = free_port()
    exe = str(Path(sys.executable).with_name("transformers"))
    command = [
        exe,
        "serve",
        "--continuous-batching",
        "--dtype",
        dtype,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        model_dir,
    ]
    with LiveServer(command, port, ready_path="/health") as peer:
        peer.wait_ready(timeout=600)
        return _load_levels(
            peer.base_url, model_dir, prompts, levels, max_tokens, requests_per_level, "transformers serve"
        )


def _peer_llama_server(
    exe: str, gguf: Path, prompts: list[str], levels: list[int], max_tokens: int, requests_per_level: int
) -> list[dict[str, Any]]:
    """llama.cpp's `llama-server` at `exe` on the same GGUF, prompts and levels, one slot per
    client of the top level, the torch thread count dgserve runs with; started on a free loopback
    port and stopped after the levels."""
    import torch

    parallel, threads = max(levels), torch.get_num_threads()
    with LiveServer.llama_server(exe, gguf, parallel=parallel, max_tokens=max_tokens, threads=threads) as peer:
        peer.wait_ready(timeout=600)
        return _load_levels(peer.base_url, gguf.name, prompts, levels, max_tokens, requests_per_level, "llama-server")


def _print_peer(name: str, rows: list[dict[str, Any]]) -> None:
    for r in rows:
        print(
            f"{name} @ {r['concurrency']}: {r['aggregate_tokens_per_s']:.1f} tok/s, "
            f"ttft p50 {r['ttft_p50_s']:.3f} s, same text {r['texts_identical_to_first_level']}"
        )


def run(argv: list[str]) -> int:
    from sampler.registry import SAMPLER_NAMES

    p = argparse.ArgumentParser(prog="dgserve bench-load")
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--prompts", default="bench/prompts.jsonl")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument(
        "--dtype", default=None, help="the weights' dtype (default: the config's; auto as the server resolves it)"
    )
    p.add_argument(
        "--sampler",
        choices=SAMPLER_NAMES,
        default=None,
        help="the sampler to serve (default: the config's)",
    )
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument(
        "--requests-per-level",
        type=int,
        default=0,
        help="requests at each level (default: max(number of prompts, 4 x concurrency), prompts cycled)",
    )
    p.add_argument("--limit", type=int, default=0, help="use only the first N prompts")
    p.add_argument(
        "--overhead-prompts",
        type=int,
        default=8,
        help="prompts for the alternating HTTP vs in-process overhead measurement",
    )
    p.add_argument("--json", dest="json_out")
    p.add_argument(
        "--peer-transformers-serve",
        action="store_true",
        help="also load-test `transformers serve --continuous-batching` on the same weights",
    )
    p.add_argument(
        "--peer-llama-server",
        metavar="PATH",
        help="also load-test llama.cpp's llama-server binary at PATH on the same GGUF",
    )
    args = p.parse_args(argv)

    from sampler.runtime.cpu_features import detect
    from server.config import load_config

    overrides = {**({"dtype": args.dtype} if args.dtype else {}), **({"sampler": args.sampler} if args.sampler else {})}
    config = load_config(args.config, overrides)
    args.dtype = _resolved_dtype(config.dtype)
    prompts = [json.loads(line)["prompt"] for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    if args.limit:
        prompts = prompts[: args.limit]
    levels = [int(c) for c in args.concurrency.split(",")]
    env = {
        "DGSERVE_DTYPE": args.dtype,
        "DGSERVE_SAMPLER": config.sampler,
        "DGSERVE_MAX_NUM_SEQS": str(max(levels)),
        "DGSERVE_MAX_QUEUE": str(max(1024, 4 * max(levels))),
    }
    with LiveServer.dgserve(args.config, env=env) as server:
        server.wait_ready(timeout=600)
        rows = _load_levels(
            server.base_url, config.model_name, prompts, levels, args.max_tokens, args.requests_per_level, "dgserve"
        )
        loaded, sampler = _in_process_sampler(config)
        overhead = _http_overhead(
            server.base_url, config.model_name, loaded, sampler, prompts[: args.overhead_prompts], args.max_tokens
        )
    top = max(rows, key=lambda r: r["concurrency"])
    top["in_process_tokens_per_s"] = _in_process_closed_loop(
        loaded, sampler, prompts, top["concurrency"], top["requests"], args.max_tokens
    )
    del loaded, sampler
    peer_rows: list[dict[str, Any]] = []
    if args.peer_transformers_serve:
        from sampler.runtime.loading import builtin_gemma3_270m_dir
        from sampler.runtime.model import BUILTIN_GEMMA3_270M

        model_dir = str(builtin_gemma3_270m_dir()) if config.model == BUILTIN_GEMMA3_270M else config.model
        peer_rows = _peer_transformers_serve(
            model_dir, args.dtype, prompts, levels, args.max_tokens, args.requests_per_level
        )
    llama_rows: list[dict[str, Any]] = []
    if args.peer_llama_server:
        llama_rows = _peer_llama_server(
            args.peer_llama_server, llama_server_gguf(config), prompts, levels, args.max_tokens, args.requests_per_level
        )
    single = next((r for r in rows if r["concurrency"] == 1), None)
    for r in rows:
        r["texts_identical_to_first_level"] = _same_texts(r, rows[0])
    out = {
        "config": args.config,
        "model": config.model,
        "sampler": config.sampler,
        "dtype": args.dtype,
        "max_tokens": args.max_tokens,
        "prompts": len(prompts),
        "cpu": detect().isa(),
        "levels": [{k: v for k, v in r.items() if k != "texts"} for r in rows],
        **overhead,
    }
    if peer_rows:
        for r in peer_rows:
            r["texts_identical_to_first_level"] = _same_texts(r, peer_rows[0])
        out["peer_transformers_serve"] = [{k: v for k, v in r.items() if k != "texts"} for r in peer_rows]
    for r in llama_rows:
        r["texts_identical_to_first_level"] = _same_texts(r, llama_rows[0])
    if llama_rows:
        out["peer_llama_server"] = [{k: v for k, v in r.items() if k != "texts"} for r in llama_rows]
    if single:
        out["scaling_top_vs_single"] = top["aggregate_tokens_per_s"] / single["aggregate_tokens_per_s"]
    print(f"\nCPU: {detect().describe()}; dgserve {args.config}, dtype {args.dtype}")
    print(
        f"{'conc':>5} {'reqs':>5} {'tok/s':>8} {'ttft p50':>9} {'ttft p95':>9} {'lat p50':>8} "
        f"{'lat p95':>8} {'same text':>9}"
    )
    for r in rows:
        print(
            f"{r['concurrency']:>5} {r['requests']:>5} {r['aggregate_tokens_per_s']:>8.1f} {r['ttft_p50_s']:>9.3f} "
            f"{r['ttft_p95_s']:>9.3f} {r['latency_p50_s']:>8.2f} {r['latency_p95_s']:>8.2f} "
            f"{str(r['texts_identical_to_first_level']):>9}"
        )
    _print_peer("transformers serve", peer_rows)
    _print_peer("llama-server", llama_rows)
    if "http_overhead" in out:
        print(
            f"HTTP overhead, one client, alternating prompt by prompt with the in-process {config.sampler} sampler: "
            f"{out['http_single_client_tokens_per_s']:.1f} vs {out['in_process_tokens_per_s']:.1f} tok/s "
            f"({100 * out['http_overhead']:.1f} %)"
        )
    print(
        f"the {config.sampler} sampler in process, {top['concurrency']} sequences always in flight, same requests: "
        f"{top['in_process_tokens_per_s']:.1f} tok/s (HTTP: {top['aggregate_tokens_per_s']:.1f})"
    )
    if single:
        print(f"scaling at {top['concurrency']}: {out['scaling_top_vs_single']:.2f}x")
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(out, indent=2))
    return 0
