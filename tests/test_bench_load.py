import json
import subprocess
import sys


def test_bench_load_smoke(tmp_path):
    out = tmp_path / "load.json"
    proc = subprocess.run([sys.executable, "-m", "server.cli", "bench-load", "--config", "configs/tiny.yaml",
                           "--dtype", "float32", "--max-tokens", "6", "--limit", "2", "--concurrency", "1,2",
                           "--json", str(out)], capture_output=True, text=True, timeout=300)
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
    assert data["http_overhead"] == 1 - data["http_single_client_tokens_per_s"] / data["in_process_tokens_per_s"]
    assert data["levels"][-1]["in_process_tokens_per_s"] > 0  # the top level's no-server ceiling
    assert "conc" in proc.stdout  # the table


def test_same_texts_checks_every_repeat_of_a_prompt():
    from bench.load import _same_texts

    reference = {"texts": {0: ["a"], 1: ["b"]}}
    assert _same_texts({"texts": {0: ["a", "a"], 1: ["b"]}}, reference)
    assert not _same_texts({"texts": {0: ["a", "x"], 1: ["b"]}}, reference)  # the second repeat differs
