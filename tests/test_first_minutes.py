"""A person's first five minutes (issue 11): what they see when something is off.

The unknown model's 404 names the served one; `/` with the playground off points at the API; a
refusal while draining says the server is shutting down; the "ready" line repeats the URLs; the
first-start conversion logs how long each step took and keeps no second copy of the built-in GGUF.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from bench.polling import wait_until
from sampler.runtime import loading
from server.app import create_app
from server.config import ServerConfig
from server.startup import where_to_go

MODEL = "tiny-gemma3"


def _client(tiny_loaded: Any = None, **cfg: Any) -> TestClient:
    config = ServerConfig(model=MODEL, device="cpu", default_max_tokens=8, **cfg)
    return TestClient(create_app(config, loaded=tiny_loaded))


# ---- the unknown model's 404 -------------------------------------------------------------------


@pytest.mark.parametrize("served", [None, "my-gemma"])
def test_unknown_model_404_names_the_served_model(tiny_loaded, served):
    name = served or MODEL
    with _client(tiny_loaded, served_model_name=served) as client:
        replies = [
            client.post("/v1/completions", json={"model": "gpt-4", "prompt": "Hi", "max_tokens": 2}),
            client.post(
                "/v1/chat/completions", json={"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}
            ),
            client.get("/v1/models/gpt-4"),
        ]
        for r in replies:
            error = r.json()["error"]
            assert r.status_code == 404 and error["code"] == "model_not_found" and error["param"] == "model"
            assert "'gpt-4'" in error["message"] and f"serves '{name}'" in error["message"], error
        # The name the message gives is one the server then accepts.
        ok = client.post("/v1/completions", json={"model": name, "prompt": "Hi", "max_tokens": 2})
        assert ok.status_code == 200


# ---- `/` in a browser --------------------------------------------------------------------------


def test_root_with_playground_off_points_at_the_api(tiny_loaded):
    with _client(tiny_loaded, playground=False) as client:
        r = client.get("/")
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
        body = r.json()
        assert body["name"] == "dgserve" and body["version"] and "playground: false" in body["playground"]
        # Every GET link answers (the POST endpoints are listed for reading, not for a browser).
        for key in ("models", "health", "ready", "metrics", "version", "openapi"):
            assert client.get(body["links"][key]).status_code == 200, key
        assert body["links"]["chat_completions"] == "/v1/chat/completions"
        assert client.get("/playground").status_code == 404  # the page itself stays off


def test_root_with_playground_on_is_the_page(tiny_loaded):
    with _client(tiny_loaded) as client:
        r = client.get("/")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")


# ---- draining ----------------------------------------------------------------------------------


def test_refusal_while_draining_says_shutting_down(tiny_loaded):
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
    with _client(tiny_loaded) as client:
        state = client.app.state.dg
        # The engine stops accepting first (the core's NotAccepting) ...
        state.engine.stop_accepting()
        r = client.post("/v1/completions", json=body)
        error = r.json()["error"]
        assert (r.status_code, error["code"], error["type"]) == (503, "shutting_down", "server_error")
        assert "shutting down" in error["message"] and r.headers["retry-after"] == "5"
        # ... and the handlers refuse at the door once the signal handler set `draining`.
        state.draining = True
        r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"


# ---- the start-up log --------------------------------------------------------------------------


def test_ready_line_repeats_the_urls(caplog):
    caplog.set_level(logging.INFO, logger="dgserve.app")
    with _client(port=8123) as client:  # no model given: it loads in the background, as served
        wait_until(lambda: client.app.state.dg.engine is not None, timeout=120)
        wait_until(lambda: any(r.message.startswith("ready:") for r in caplog.records), timeout=10)
    messages = [r.message for r in caplog.records]
    ready = next(m for m in messages if m.startswith("ready:"))
    # Said when loading starts (when uvicorn prints its URL): what to wait for.
    assert messages.index(f"loading {MODEL}; /ready answers 503 until the 'ready:' line below") < messages.index(ready)
    assert "open http://127.0.0.1:8123/ for the playground" in ready
    assert "API base http://127.0.0.1:8123/v1" in ready


def test_where_to_go_for_wildcard_and_ipv6_binds():
    wildcard = where_to_go(ServerConfig(host="0.0.0.0", port=9000))
    assert wildcard == "open http://127.0.0.1:9000/ for the playground, API base http://127.0.0.1:9000/v1"
    assert where_to_go(ServerConfig(host="::1", port=80, playground=False)) == (
        "playground off, API base http://[::1]:80/v1"
    )


# ---- first-start conversion: step timings and the built-in GGUF's copy ---------------------------

STEP_S = 0.3  # what each fake transformers step sleeps


class _FakeSaver:
    """Stands in for transformers' tokenizer and model: slow to build, writes a file when saved."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.config = SimpleNamespace()

    def save_pretrained(self, out: Path) -> None:
        time.sleep(STEP_S)
        (Path(out) / f"{self.name}.bin").write_bytes(b"x")


@pytest.fixture
def fake_conversion(monkeypatch, tmp_path):
    """transformers' GGUF loaders replaced by sleeps, the cache in tmp_path, the built-in GGUF
    'assembled' as the package would (counted)."""
    import transformers

    def slow(name: str) -> Any:
        def load(*args: Any, **kwargs: Any) -> _FakeSaver:
            time.sleep(STEP_S)
            return _FakeSaver(name)

        return load

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", slow("tokenizer"))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", slow("model"))
    monkeypatch.setenv("DGSERVE_CACHE", str(tmp_path / "cache"))
    assembled: list[Path] = []

    def assemble() -> Path:
        gguf = loading.cache_root() / "gguf" / "gemma-3-270m-q4_k_m.gguf"
        gguf.parent.mkdir(parents=True, exist_ok=True)
        gguf.write_bytes(b"GGUF" * 1000)
        assembled.append(gguf)
        return gguf

    monkeypatch.setattr(loading, "builtin_gemma3_270m_gguf", assemble)
    return assembled


def test_conversion_logs_how_long_each_step_took(fake_conversion, caplog):
    caplog.set_level(logging.INFO, logger="dgserve.loading")
    loading.builtin_gemma3_270m_dir()
    done = [r.message for r in caplog.records if " took " in r.message]
    # tokenizer (load + save), weights (load), safetensors (save): each measured, not announced.
    assert len(done) == 3, [r.message for r in caplog.records]
    for line, steps in zip(done, (2, 1, 1), strict=True):
        took = float(line.split(" took ")[1].split(" s")[0])
        assert steps * STEP_S - 0.05 <= took <= steps * STEP_S + 1.0, line
    total = next(r.message for r in caplog.records if r.message.startswith("conversion done in "))
    assert 4 * STEP_S - 0.05 <= float(total.split(" in ")[1].split(" s")[0]) <= 4 * STEP_S + 2.0, total


def test_built_in_gguf_copy_is_removed_after_conversion(fake_conversion):
    out = loading.builtin_gemma3_270m_dir()
    assert (out / "dgserve-cache.json").exists() and (out / "model.bin").exists()
    assert len(fake_conversion) == 1 and not fake_conversion[0].exists()
    # A warm start neither re-assembles nor needs the GGUF.
    assert loading.builtin_gemma3_270m_dir() == out and len(fake_conversion) == 1


def test_a_users_gguf_file_is_never_removed(fake_conversion, tmp_path, monkeypatch):
    users = tmp_path / "mine" / "model.gguf"
    users.parent.mkdir()
    users.write_bytes(b"GGUF")
    loaded: list[str] = []
    monkeypatch.setattr(
        loading, "_load_pretrained", lambda path, dtype, device: loaded.append(path) or SimpleNamespace()
    )
    loading._load(str(users), torch.float32, torch.device("cpu"))
    assert users.read_bytes() == b"GGUF" and (Path(loaded[0]) / "dgserve-cache.json").exists()
