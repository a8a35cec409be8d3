import json
import subprocess
import sys


def test_bench_steps_smoke(tmp_path):
    out = tmp_path / "steps.json"
    proc = subprocess.run([sys.executable, "-m", "server.cli", "bench-steps", "--config", "configs/tiny.yaml",
                           "--dtypes", "float32", "--batches", "1,3", "--block-rows", "1,4", "--steps", "3",
                           "--context", "20", "--repeats", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())["dtypes"]["float32"]
    assert [r["batch"] for r in report["decode"]] == [1, 3]
    assert [r["rows"] for r in report["block"]] == [1, 4]
    one, three = report["decode"]
    assert one["batching_ceiling"] == 1.0 and one["ms_per_step"] > 0
    assert abs(three["batching_ceiling"] - 3 * one["ms_per_step"] / three["ms_per_step"]) < 1e-9
    assert report["block"][0]["vs_one_row"] == 1.0 and report["block"][1]["ms"] > 0
    assert "decode batch" in proc.stdout  # the table
