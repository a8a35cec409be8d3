"""`dgserve bench-load` (bench/load.py): the CLI end to end on the tiny model, and its arithmetic on
scripted measurements."""

from __future__ import annotations

import json

import pytest

from bench import load


def test_bench_load_smoke(tmp_path, dgserve_cli):
    out = tmp_path / "load.json"
    argv = "bench-load --config configs/tiny.yaml --dtype float32 --max-tokens 6 --limit 2 --concurrency 1,2"
    proc = dgserve_cli(*argv.split(), "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    assert [lvl["concurrency"] for lvl in data["levels"]] == [1, 2]
    # Levels keep every client busy for several requests: max(prompts, 4 x concurrency).
    assert [lvl["requests"] for lvl in data["levels"]] == [4, 8]
    for lvl in data["levels"]:
        assert lvl["aggregate_tokens_per_s"] > 0 and lvl["ttft_p95_s"] >= lvl["ttft_p50_s"] >= 0
        assert lvl["texts_identical_to_first_level"]
    assert data["sampler"] == "ar"  # tiny.yaml serves ar; the in-process baseline runs the same sampler
    assert data["in_process_tokens_per_s"] > 0 and data["http_single_client_tokens_per_s"] > 0
    assert data["http_overhead"] < 1  # HTTP delivered tokens (its arithmetic: the test below)
    assert data["levels"][-1]["in_process_tokens_per_s"] > 0  # the top level's no-server ceiling
    assert "conc" in proc.stdout  # the table


def test_http_overhead_weighs_tokens_over_time_and_skips_the_warm_ups(monkeypatch):
    # (tokens, seconds) per call: the warm-up first on each side, then prompts "a" and "b".
    http = iter([(1, 100.0), (10, 1.0), (30, 2.0)])
    in_process = iter([(1, 100.0), (10, 0.5), (30, 1.5)])

    async def one_request(client, model, prompt, max_tokens):
        tokens, seconds = next(http)
        return {"tokens": tokens, "latency_s": seconds, "ttft_s": 0.0, "text": ""}

    monkeypatch.setattr(load, "_one", one_request)
    monkeypatch.setattr(load, "_run_in_process", lambda *args: next(in_process))
    result = load._http_overhead("http://127.0.0.1:9", "m", None, None, ["a", "b"], 8)
    # 40 tokens in 3 s over HTTP, 40 in 2 s in process: a third of the in-process rate is lost.
    assert result["http_single_client_tokens_per_s"] == pytest.approx(40 / 3)
    assert result["in_process_tokens_per_s"] == pytest.approx(20.0)
    assert result["http_overhead"] == pytest.approx(1 / 3)
    assert next(http, None) is None and next(in_process, None) is None  # one call per side per prompt


def test_percentile_picks_the_nearest_rank():
    values = [float(v) for v in (7, 1, 20, 3, 5, 2, 4, 6, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19)]
    assert load._percentile(values, 0.0) == 1.0
    assert load._percentile(values, 0.5) == 11.0  # rank round(9.5) = 10 of ranks 0..19
    assert load._percentile(values, 0.95) == 19.0  # rank round(18.05) = 18
    assert load._percentile(values, 1.0) == 20.0
    assert load._percentile([4.0], 0.95) == 4.0


def test_same_texts_checks_every_repeat_of_a_prompt():
    reference = {"texts": {0: ["a"], 1: ["b"]}}
    assert load._same_texts({"texts": {0: ["a", "a"], 1: ["b"]}}, reference)
    assert not load._same_texts({"texts": {0: ["a", "x"], 1: ["b"]}}, reference)  # the second repeat differs
