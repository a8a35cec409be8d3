"""The diffusion benchmark runs end to end at toy sizes and writes its JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_bench_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bench.diffusion_bench import run

    out = tmp_path / "bench.json"
    flags = "--vocab 512 --canvas 16 --steps 3 --repeats 1 --threads 1"
    code = run([*flags.split(), "--json", str(out), "--prompts", "ignored.jsonl"])  # refine's flags are tolerated
    assert code == 0
    result = json.loads(out.read_text())
    (row,) = result["runs"]
    assert (row["vocab"], row["canvas"], row["steps"]) == (512, 16, 3)
    for side in ("ours", "reference"):
        assert row[side]["step_ms"] > 0 and row[side]["block_s"] > 0
        assert row[side]["sampling_share_of_forward"] > 0
    assert result["math"]["reference_s"] > 0 and result["math"]["sampler_path_s"] > 0
    assert "ms/step" in capsys.readouterr().out
