"""`dgserve bench` (bench/refine.py) end to end on the tiny model: table, JSON and plot."""

from __future__ import annotations

import json

from bench.refine import load_prompts, run

REQUIRED = set(
    "sampler steps dtype tokens_per_s ratio_vs_ar tokens_per_forward exact_match_rate rouge_l perplexity".split()
)


def test_shipped_prompt_set():
    prompts = load_prompts("bench/prompts.jsonl")
    assert len(prompts) >= 24 and len(set(prompts)) == len(prompts)


def test_bench_smoke_tiny(tmp_path, capsys):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    flags = "--config configs/tiny.yaml --prompts bench/prompts.jsonl --limit 2 --max-tokens 8 --lengths 4,8"
    more = ["--temperatures", "0.7,1.0", "--concurrency", "1,3"]
    rc = run(
        [*flags.split(), *more, "--scaling-prompts", "2", "--threads", "1", "--json", str(out), "--plot", str(png)]
    )
    assert rc == 0
    report = json.loads(out.read_text())
    runs = report["runs"]
    assert [r["sampler"] for r in runs] == ["ar"] + ["parallel"] * 5
    assert [r["steps"] for r in runs[1:]] == [1, 2, 4, 8, None]
    for r in runs:
        assert REQUIRED <= set(r)
        assert r["tokens_per_s"] > 0 and r["perplexity"] > 0 and 0 <= r["rouge_l"] <= 1
    assert runs[0]["ratio_vs_ar"] == 1.0 and runs[0]["exact_match_rate"] == 1.0
    # Unlimited steps is exact: same tokens as AR on every prompt.
    assert runs[-1]["exact_match_rate"] == 1.0
    assert [s["max_tokens"] for s in report["scaling"]] == [4, 8]
    # Seeded sampling draws what AR draws, at every temperature.
    assert [s["temperature"] for s in report["sampling"]] == [0.7, 1.0]
    for s in report["sampling"]:
        assert s["exact_match_rate"] == 1.0 and s["tokens_per_forward"] >= 1 and s["parallel_tokens_per_s"] > 0
    # Concurrent greedy sequences through the engine core: batched parallel equals batched AR.
    assert [c["sequences"] for c in report["concurrency"]] == [1, 3]
    for c in report["concurrency"]:
        assert c["exact_match_rate"] == 1.0 and c["ar_tokens_per_forward"] == 1.0
    assert png.stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "| parallel | unlimited |" in printed
    assert "| temperature (seeded) |" in printed and "| concurrent sequences (greedy) |" in printed
