"""Logprobs and echo through a live dgserve process: the openai SDK's typed objects and raw HTTP
(the lm-evaluation-harness scoring request, streamed chat)."""

from __future__ import annotations

import httpx
import openai
import pytest

from bench.sse import iter_sse_json

MODEL = "tiny-gemma3"


@pytest.fixture(scope="module")
def client(tiny_server):
    return openai.OpenAI(base_url=f"{tiny_server.base_url}/v1", api_key="unused", max_retries=0)


def test_sdk_chat_logprobs_streamed_and_not(client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0)
    r = client.chat.completions.create(logprobs=True, top_logprobs=3, **kwargs)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    assert all(len(c.top_logprobs) == 3 and c.logprob <= 0 for c in content)
    assert all(c.top_logprobs[0].logprob >= c.logprob - 1e-6 for c in content)
    assert "".join(c.token for c in content) == r.choices[0].message.content
    stream = client.chat.completions.create(logprobs=True, top_logprobs=3, stream=True, **kwargs)
    streamed = [t for chunk in stream for ch in chunk.choices if ch.logprobs for t in ch.logprobs.content]
    assert [t.model_dump() for t in streamed] == [t.model_dump() for t in content]
    assert client.chat.completions.create(**kwargs).choices[0].logprobs is None


def test_sdk_completions_echo_scoring(client):
    r = client.completions.create(model=MODEL, prompt="Hello, world!", max_tokens=0, echo=True, logprobs=1)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == "Hello, world!"
    assert lp.token_logprobs[0] is None and all(v <= 0 for v in lp.token_logprobs[1:])
    assert len(lp.tokens) == len(lp.text_offset) == r.usage.prompt_tokens
    assert r.usage.completion_tokens == 0


def test_sdk_completions_logprobs_0(client):
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0, logprobs=0)
    assert len(r.choices[0].logprobs.token_logprobs) == 4


def test_raw_http_lm_eval_request_and_streamed_chat(tiny_server):
    base = tiny_server.base_url
    body = {
        "model": MODEL,
        "prompt": [2, 40, 120, 7, 300],
        "max_tokens": 0,
        "echo": True,
        "logprobs": 1,
        "temperature": 0,
    }
    r = httpx.post(f"{base}/v1/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"][0]["logprobs"]["token_logprobs"]) == 5
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json={**chat, "logprobs": True}, timeout=30) as s:
        chunks = list(iter_sse_json(s.iter_lines()))
    entries = [e for c in chunks for ch in c["choices"] if ch["logprobs"] for e in ch["logprobs"]["content"]]
    assert len(entries) == 4 and all(e["top_logprobs"] == [] for e in entries)
    r = httpx.post(f"{base}/v1/chat/completions", json={**chat, "logprobs": True, "top_logprobs": 21}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"
