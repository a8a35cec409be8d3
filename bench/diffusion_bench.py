"""`dgserve bench` for DiffusionGemma: our block-diffusion sampler vs transformers' `generate`.

In one process, on the same tiny random DiffusionGemma (2 layers, 4 experts) at each
(vocabulary, canvas) size, it times one block of a fixed number of denoising steps:
- ours: `DiffusionSampler.step()` (keyed noise, fused Gumbel-max + entropy), profiled
  into decoder forward, sampling + acceptance, and encoder time;
- reference: `model.generate` (softmax + multinomial + Categorical entropy), its
  `_denoising_step` and decoder `forward` timed by wrappers on the instance.
A step is "steady" from its second step on (with self-conditioning input). The random
model never meets the stopping rule, so both run exactly `steps` steps per block.
Also times the vocabulary-sized math alone at the largest size (fused vs reference).
Run it with `--threads 1` on a shared machine: two intra-op threads stall whenever the
other core is busy, which swamps every figure.
Prints a table; writes JSON (--json) and a PNG (--plot, needs matplotlib).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dgserve bench", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="YAML config: its device and dtype are used")
    p.add_argument("--vocab", type=int, nargs="+", default=[1024, 262144])
    p.add_argument("--canvas", type=int, nargs="+", default=[32, 256])
    p.add_argument("--steps", type=int, default=6, help="denoising steps per block (vocab <= 32768)")
    p.add_argument("--large-steps", type=int, default=3, help="denoising steps per block above vocab 32768")
    p.add_argument("--repeats", type=int, default=2, help="blocks per side at vocab <= 32768 (best kept)")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--device")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-math", action="store_true", help="skip the math-only timing")
    p.add_argument("--json", dest="json_out")
    p.add_argument("--plot")
    return p


class _Clock:
    """perf_counter that first waits for the device, so GPU phases are timed, not queued."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def _timed(fn: Callable[..., Any], sink: list[float], clock: _Clock) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = clock()
        out = fn(*args, **kwargs)
        sink.append(clock() - started)
        return out

    return wrapper


def _reference_block(model: Any, prompt: list[int], steps: int, device: torch.device, clock: _Clock) -> dict[str, Any]:
    """One `generate` block of `steps` steps, with per-step and per-forward times."""
    step_times: list[float] = []
    forward_times: list[float] = []
    model._denoising_step = _timed(type(model)._denoising_step.__get__(model), step_times, clock)
    model.forward = _timed(type(model).forward.__get__(model), forward_times, clock)
    try:
        torch.manual_seed(0)
        started = clock()
        model.generate(
            torch.tensor([prompt], device=device), max_new_tokens=model.config.canvas_length, max_denoising_steps=steps
        )
        block = clock() - started
    finally:
        del model._denoising_step, model.forward
    assert len(step_times) == steps, f"reference ran {len(step_times)} steps, expected {steps}"
    return {"block_s": block, "step_s": step_times, "forward_s": forward_times}


def _our_block(model: Any, prompt: list[int], steps: int, device: torch.device, clock: _Clock) -> dict[str, Any]:
    from sampler.diffusion import DiffusionSampler
    from sampler.types import SamplingParams

    sampler = DiffusionSampler(model, device, max_denoising_steps=steps, profile=True)
    sampler.add("bench", prompt, SamplingParams(max_tokens=model.config.canvas_length, seed=0))
    step_times, decoder, sampling = [], [], []
    encoder = 0.0
    started = clock()
    while sampler.num_active:
        before = dict(sampler.stats)
        t0 = clock()
        sampler.step()
        step_times.append(clock() - t0)
        decoder.append(sampler.stats["decoder_s"] - before["decoder_s"])
        sampling.append(sampler.stats["sampling_s"] - before["sampling_s"])
        encoder += sampler.stats["encoder_s"] - before["encoder_s"]
    block = clock() - started
    assert len(step_times) == steps, f"ours ran {len(step_times)} steps, expected {steps}"
    return {"block_s": block, "step_s": step_times, "decoder_s": decoder, "sampling_s": sampling, "encoder_s": encoder}


def _steady(values: list[float]) -> float:
    """Mean over steps 2.. (the first step of a block has no self-conditioning input)."""
    return statistics.fmean(values[1:] if len(values) > 1 else values)


def _math(vocab: int, canvas: int, device: torch.device, clock: _Clock, repeats: int = 3) -> dict[str, float]:
    """Sample + entropy + acceptance of one (canvas, vocab) step, three ways:
    reference (softmax + multinomial + Categorical entropy), fused Gumbel-max + entropy at
    every position, and the sampler's path (argmax + entropy sweep, then Gumbel-max at the
    accepted positions only)."""
    from sampler.diffusion_math import (
        NOISE_SAMPLE,
        entropy_bound_accept,
        gumbel_max,
        gumbel_max_entropy,
        keyed_generator,
        reference_sample_entropy,
    )

    gen = torch.Generator(device=device).manual_seed(0)
    # Logit scale of the tiny model's tempered logits: a handful of positions are accepted.
    z = torch.randn(1, canvas, vocab, device=device, generator=gen) * 3.0
    bound = torch.full((1, 1), 0.1, device=device)

    def noise(position: int) -> torch.Generator:
        return keyed_generator(1, 0, 1, NOISE_SAMPLE, device, position)

    def reference() -> None:
        _, _, entropy = reference_sample_entropy(z)
        entropy_bound_accept(entropy, bound)

    def fused() -> None:
        _, _, entropy = gumbel_max_entropy(z[0], noise)
        entropy_bound_accept(entropy[None], bound)

    accepted_count = [0]

    def sampler_path() -> None:
        _, _, entropy = gumbel_max_entropy(z[0], None)
        accepted = entropy_bound_accept(entropy[None], bound)[0].nonzero().view(-1).tolist()
        gumbel_max(z[0], accepted, noise)
        accepted_count[0] = len(accepted)

    timers = {"reference_s": reference, "fused_all_positions_s": fused, "sampler_path_s": sampler_path}
    best = dict.fromkeys(timers, float("inf"))
    for _ in range(repeats):  # interleaved, best of: the machine may be shared
        for name, fn in timers.items():
            t0 = clock()
            fn()
            best[name] = min(best[name], clock() - t0)
    return {
        **best,
        "accepted_positions": accepted_count[0],
        "fused_speedup": best["reference_s"] / best["fused_all_positions_s"],
        "sampler_path_speedup": best["reference_s"] / best["sampler_path_s"],
    }


def _plot(runs: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"V={r['vocab']}\nC={r['canvas']}" for r in runs]
    x = range(len(runs))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar([i - 0.2 for i in x], [r["reference"]["step_ms"] for r in runs], 0.4, label="transformers generate")
    ax.bar([i + 0.2 for i in x], [r["ours"]["step_ms"] for r in runs], 0.4, label="dgserve diffusion")
    ax.set_xticks(list(x), labels)
    ax.set_yscale("log")
    ax.set_ylabel("ms per denoising step (log)")
    ax.set_title("Block diffusion step time, tiny DiffusionGemma")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run(argv: list[str]) -> int:
    args, _unknown = _parser().parse_known_args(argv)  # `dgserve bench` may pass refine's flags
    from sampler.runtime.loading import choose_dtype, resolve_device
    from sampler.runtime.tiny_diffusion import build_tiny_diffusion

    device_name, dtype_name = args.device, args.dtype
    if args.config:
        from server.config import load_config

        config = load_config(args.config)
        device_name, dtype_name = device_name or config.device, dtype_name or config.dtype
    device = resolve_device(device_name or "cpu")
    dtype, _reason = choose_dtype(dtype_name or "float32", device)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = _Clock(device)
    prompt = list(range(3, 3 + args.prompt_len))
    started = time.perf_counter()

    # First calls pay one-off costs (lazy imports, allocator warm-up): pay them on a small model.
    warm = build_tiny_diffusion(1024, 32).to(device=device, dtype=dtype)
    _reference_block(warm, prompt, 2, device, clock)
    _our_block(warm, prompt, 2, device, clock)

    runs = []
    with torch.inference_mode():
        for vocab in args.vocab:
            for canvas in args.canvas:
                large = vocab > 32768
                steps = args.large_steps if large else args.steps
                model = build_tiny_diffusion(vocab, canvas).to(device=device, dtype=dtype)
                ours: dict[str, Any] | None = None
                ref: dict[str, Any] | None = None
                for _ in range(1 if large else args.repeats):  # interleaved; keep each side's best block
                    r = _reference_block(model, prompt, steps, device, clock)
                    o = _our_block(model, prompt, steps, device, clock)
                    ref = r if ref is None or r["block_s"] < ref["block_s"] else ref
                    ours = o if ours is None or o["block_s"] < ours["block_s"] else ours
                assert ours is not None and ref is not None
                ref_step, ref_fwd = _steady(ref["step_s"]), _steady(ref["forward_s"])
                our_step, our_dec, our_smp = (
                    _steady(ours["step_s"]),
                    _steady(ours["decoder_s"]),
                    _steady(ours["sampling_s"]),
                )
                runs.append(
                    {
                        "vocab": vocab,
                        "canvas": canvas,
                        "steps": steps,
                        "ours": {
                            "step_ms": 1e3 * our_step,
                            "block_s": ours["block_s"],
                            "decoder_ms": 1e3 * our_dec,
                            "sampling_ms": 1e3 * our_smp,
                            "encoder_ms": 1e3 * ours["encoder_s"],
                            "sampling_share_of_forward": our_smp / our_dec,
                        },
                        "reference": {
                            "step_ms": 1e3 * ref_step,
                            "block_s": ref["block_s"],
                            "decoder_ms": 1e3 * ref_fwd,
                            "sampling_ms": 1e3 * (ref_step - ref_fwd),
                            "sampling_share_of_forward": (ref_step - ref_fwd) / ref_fwd,
                        },
                        "step_speedup": ref_step / our_step,
                        "block_speedup": ref["block_s"] / ours["block_s"],
                    }
                )
                del model

    math_result = None
    if not args.no_math:
        math_result = {
            "vocab": max(args.vocab),
            "canvas": max(args.canvas),
            **_math(max(args.vocab), max(args.canvas), device, clock),
        }

    header = (
        f"{'vocab':>7} {'canvas':>6} {'steps':>5} | {'ours ms/step':>12} {'ref ms/step':>11} {'x':>5} | "
        f"{'ours s/block':>12} {'ref s/block':>11} {'x':>5} | {'ours smp/fwd':>12} {'ref smp/fwd':>11}"
    )
    print(
        f"block diffusion, tiny DiffusionGemma, {device} {dtype_name or 'float32'}, {torch.get_num_threads()} threads"
    )
    print(header)
    print("-" * len(header))
    for r in runs:
        o, f = r["ours"], r["reference"]
        print(
            f"{r['vocab']:>7} {r['canvas']:>6} {r['steps']:>5} | {o['step_ms']:>12.1f} {f['step_ms']:>11.1f} "
            f"{r['step_speedup']:>5.2f} | {o['block_s']:>12.3f} {f['block_s']:>11.3f} {r['block_speedup']:>5.2f} | "
            f"{o['sampling_share_of_forward']:>11.0%} {f['sampling_share_of_forward']:>11.0%}"
        )
    if math_result:
        m = math_result
        print(
            f"sample + entropy + acceptance of one step at vocab {m['vocab']}, canvas {m['canvas']}: "
            f"reference (multinomial + Categorical) {1e3 * m['reference_s']:.0f} ms; fused Gumbel-max at every "
            f"position {1e3 * m['fused_all_positions_s']:.0f} ms ({m['fused_speedup']:.1f}x); sampler path "
            f"(sweep + Gumbel-max at the {m['accepted_positions']} accepted) {1e3 * m['sampler_path_s']:.0f} ms "
            f"({m['sampler_path_speedup']:.1f}x)"
        )
    total = time.perf_counter() - started
    print(f"({total:.0f} s; smp/fwd = sampling and acceptance time over decoder forward time, steady steps)")

    result = {
        "benchmark": "diffusion",
        "device": str(device),
        "dtype": dtype_name or "float32",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "machine": platform.processor() or platform.machine(),
        "runs": runs,
        "math": math_result,
        "seconds": total,
    }
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(result, indent=2))
    if args.plot:
        try:
            _plot(runs, args.plot)
        except ImportError:
            print("matplotlib is not installed: no plot")
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(run(sys.argv[1:]))
