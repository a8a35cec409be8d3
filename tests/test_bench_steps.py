"""`dgserve bench-steps` (bench/step_cost.py): the CLI end to end on the tiny model, and its
ratios on a scripted clock."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from bench import step_cost


def test_bench_steps_smoke(tmp_path, dgserve_cli):
    out = tmp_path / "steps.json"
    argv = "bench-steps --config configs/tiny.yaml --dtypes float32 --batches 1,3 --block-rows 1,4 --steps 3"
    proc = dgserve_cli(*argv.split(), "--context", "20", "--repeats", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())["dtypes"]["float32"]
    assert [r["batch"] for r in report["decode"]] == [1, 3]
    assert [r["rows"] for r in report["block"]] == [1, 4]
    one, three = report["decode"]
    assert one["batching_ceiling"] == 1.0 and one["ms_per_step"] > 0
    assert three["batching_ceiling"] > 0  # its arithmetic: test_decode_costs_on_a_scripted_clock
    assert report["block"][0]["vs_one_row"] == 1.0 and report["block"][1]["ms"] > 0
    assert "decode batch" in proc.stdout  # the table
    # The CPU's flags and the kernels chosen, in the JSON and the table header.
    from sampler.runtime.cpu_features import detect

    data = json.loads(out.read_text())
    assert data["cpu"]["isa"] == detect().isa()
    assert proc.stdout.startswith(f"CPU: {detect().describe()}")
    assert report["dtype"] == "float32" and report["dtype_reason"] == "configured"
    assert report["cpu_gemm"] == "auto" and report["kernels"]
    for shape, plan in report["kernels"].items():
        assert f"kernels {shape}: {plan}" in proc.stdout
    assert [r["rows"] for r in report["head"]] == [1, 16] and all(r["ms"] > 0 for r in report["head"])


def test_bench_steps_modes_dtype_auto_and_cpu_gemm(tmp_path, dgserve_cli):
    import torch

    from sampler.runtime.loading import choose_dtype

    out = tmp_path / "steps.json"
    argv = "bench-steps --config configs/tiny.yaml --dtypes auto --cpu-gemm flags,native --batches 1 --block-rows 1"
    proc = dgserve_cli(*argv.split(), "--head-rows", "2", "--steps", "1", "--repeats", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    modes = json.loads(out.read_text())["dtypes"]
    assert set(modes) == {"auto/flags", "auto/native"}
    expected, reason = choose_dtype("auto", torch.device("cpu"))
    assert {m["dtype"] for m in modes.values()} == {str(expected).removeprefix("torch.")}
    assert modes["auto/flags"]["dtype_reason"] == reason and reason in proc.stdout
    assert modes["auto/flags"]["kernels"] and modes["auto/native"]["kernels"] == {}  # native: stock nn.Linear


class ScriptedClock:
    """Stands in for the `time` module: each timed span (two perf_counter calls) lasts the next
    of `spans` seconds."""

    def __init__(self, spans: list[float]) -> None:
        self._readings = self._timestamps(spans)

    @staticmethod
    def _timestamps(spans: list[float]) -> Iterator[float]:
        now = 0.0
        for span in spans:
            yield now
            now += span
            yield now
            now += 100.0  # time between spans must not count

    def perf_counter(self) -> float:
        return next(self._readings)


def test_decode_costs_on_a_scripted_clock(monkeypatch, tiny_loaded, one_torch_thread):
    # 3 steps of batch 1 in 30 ms, of batch 4 in 60 ms: 10 and 20 ms a step.
    monkeypatch.setattr(step_cost, "time", ScriptedClock([0.030, 0.060]))
    one, four = step_cost._decode_costs(tiny_loaded, [5, 6, 7], [1, 4], steps=3)
    assert (one["ms_per_step"], four["ms_per_step"]) == (pytest.approx(10.0), pytest.approx(20.0))
    assert (one["tokens_per_s"], four["tokens_per_s"]) == (pytest.approx(100.0), pytest.approx(200.0))
    # Four rows cost twice one row: batching can at most double the token rate.
    assert (one["batching_ceiling"], four["batching_ceiling"]) == (pytest.approx(1.0), pytest.approx(2.0))


def test_block_costs_keep_the_best_repeat(monkeypatch, tiny_loaded, one_torch_thread):
    # Per row count: a warm-up forward, then two repeats; the fastest one counts.
    spans = [0.500, 0.004, 0.002, 0.900, 0.003, 0.005]
    monkeypatch.setattr(step_cost, "time", ScriptedClock(spans))
    one, four = step_cost._block_costs(tiny_loaded, context=8, block_rows=[1, 4], repeats=2)
    assert (one["ms"], four["ms"]) == (pytest.approx(2.0), pytest.approx(3.0))
    assert (one["vs_one_row"], four["vs_one_row"]) == (pytest.approx(1.0), pytest.approx(1.5))
