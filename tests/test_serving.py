"""Serving internals the HTTP contract tests cannot see: where prompts are templated and tokenized."""

from __future__ import annotations

import dataclasses
import threading

from fastapi.testclient import TestClient

from server.app import create_app
from server.config import ServerConfig

MODEL = "tiny-gemma3"


class _ThreadRecordingTokenizer:
    """Proxies a tokenizer and records the thread of every encode (a call on the tokenizer)."""

    def __init__(self, tok):
        self._tok = tok
        self.encode_threads: list[str] = []

    def __call__(self, *args, **kwargs):
        self.encode_threads.append(threading.current_thread().name)
        return self._tok(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def test_prompts_are_tokenized_off_the_event_loop(tiny_loaded):
    recording = _ThreadRecordingTokenizer(tiny_loaded.tokenizer)
    loaded = dataclasses.replace(tiny_loaded, tokenizer=recording)
    config = ServerConfig(model=MODEL, device="cpu", default_max_tokens=4)
    with TestClient(create_app(config, loaded=loaded)) as client:
        loop_thread = client.portal.call(lambda: threading.current_thread().name)
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        assert client.post("/v1/chat/completions", json=chat).status_code == 200
        completion = {"model": MODEL, "prompt": ["Hello", "there"], "max_tokens": 2}
        assert client.post("/v1/completions", json=completion).status_code == 200
    assert len(recording.encode_threads) == 3
    assert loop_thread not in recording.encode_threads
