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
    for lvl in data["levels"]:
        assert lvl["aggregate_tokens_per_s"] > 0 and lvl["ttft_p95_s"] >= lvl["ttft_p50_s"] >= 0
        assert lvl["texts_identical_to_first_level"]
    assert data["sampler"] == "ar"  # tiny.yaml serves ar; the in-process baseline runs the same sampler
    assert data["in_process_tokens_per_s"] > 0 and data["http_overhead"] is not None
    assert "conc" in proc.stdout  # the table
