"""`dgserve bench`: routes to the benchmark that fits the config's model.

Causal Gemma weights: parallel refinement vs AR (bench/refine.py). DiffusionGemma: our
block-diffusion sampler vs transformers' reference generate (bench/diffusion_bench.py).
"""

from __future__ import annotations


def main(argv: list[str]) -> int:
    from server.config import load_config

    config_path = None
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            config_path = argv[i + 1]
        elif arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
    config = load_config(config_path) if config_path else None
    if config is not None and (config.sampler == "diffusion" or "diffusion" in config.model):
        from bench.diffusion_bench import run
    else:
        from bench.refine import run
    return run(argv)
