"""The real Gemma 3 270M (from the PyPI package) through the whole HTTP path."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.config import load_config


@pytest.fixture(scope="module")
def gemma_loaded():
    from sampler.runtime.loading import load_model

    return load_model("gemma3-270m", dtype="float32", device="cpu")


@pytest.mark.slow
def test_greedy_completion_is_deterministic_and_sane(gemma_loaded):
    # The shipped default config: exact parallel refinement, AR when busy.
    config = load_config("configs/default.yaml", {"device": "cpu"}, environ={})
    body = {"model": "gemma3-270m", "prompt": "def fibonacci(n):", "max_tokens": 24, "temperature": 0}
    with TestClient(create_app(config, loaded=gemma_loaded)) as client:
        first = client.post("/v1/completions", json=body).json()
        second = client.post("/v1/completions", json=body).json()
        ar = client.post("/v1/completions", json={**body, "sampler": "ar"}).json()
    text = first["choices"][0]["text"]
    assert first["timings"]["sampler"] == config.sampler == "parallel"
    assert text == second["choices"][0]["text"] == ar["choices"][0]["text"]
    assert first["usage"]["completion_tokens"] == 24
    # A base model continuing a Python signature writes Python: an indented `if` / `return`.
    assert "return" in text or "if n" in text, text
    assert len(gemma_loaded.tokenizer) == 262144 and gemma_loaded.kind == "causal"
