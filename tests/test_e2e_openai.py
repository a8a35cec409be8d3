"""The contract with real clients: a live `dgserve` process driven by the official openai SDK
(sync and async) and by raw httpx."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from bench.polling import wait_until
from bench.sse import iter_sse_json

MODEL = "tiny-gemma3"


@pytest.fixture(scope="module")
def client(tiny_server):
    return openai.OpenAI(base_url=f"{tiny_server.base_url}/v1", api_key="unused", max_retries=0)


def test_models(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_chat_non_streaming(client):
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=10, temperature=0
    )
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 10
    assert r.model_extra["timings"]["generated_tokens"] == 10


def test_chat_streaming_equals_non_streaming(client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=20, temperature=0)
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    stream = client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs)
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert chunks[-1].usage.completion_tokens == 20
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_completions_both_ways(client):
    r = client.completions.create(model=MODEL, prompt="def fibonacci(n):", max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=MODEL, prompt="def fibonacci(n):", max_tokens=12, temperature=0, stream=True
        )
        if c.choices
    )
    assert streamed == r.choices[0].text


def test_seeded_requests_reproduce(client):
    kwargs = dict(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=1.0, seed=1234)
    assert client.completions.create(**kwargs).choices[0].text == client.completions.create(**kwargs).choices[0].text


def test_errors_surface_as_sdk_exceptions(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], logprobs=True, top_logprobs=21, max_tokens=2
        )
    assert err.value.body["param"] == "top_logprobs"


def test_async_client_concurrent(tiny_server):
    async def main():
        aclient = openai.AsyncOpenAI(base_url=f"{tiny_server.base_url}/v1", api_key="x", max_retries=0)
        prompts = ["Hello", "The quick", "def f(", "1. first"]
        results = await asyncio.gather(
            *[aclient.completions.create(model=MODEL, prompt=p, max_tokens=8, temperature=0) for p in prompts]
        )
        stream = await aclient.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hey"}], max_tokens=6, stream=True
        )
        pieces = [c.choices[0].delta.content async for c in stream if c.choices]
        await aclient.close()
        return results, pieces

    results, pieces = asyncio.run(main())
    assert all(r.usage.completion_tokens == 8 for r in results)
    assert pieces


def test_raw_sse_and_disconnect_frees_the_sequence(tiny_server):
    url = f"{tiny_server.base_url}/v1/completions"
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 4000, "temperature": 0, "stream": True}
    with httpx.stream("POST", url, json=body, timeout=30) as r:
        assert r.status_code == 200
        first = next(iter_sse_json(r.iter_lines()))
        assert first["object"] == "text_completion"
    # The client is gone: its sequence must leave the model thread within a step or two.
    wait_until(lambda: tiny_server.metric("dgserve_requests_running") == 0, timeout=10)
    assert tiny_server.metric("dgserve_requests_running") == 0


def test_non_streaming_disconnect_frees_the_sequence(tiny_server):
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 4000, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{tiny_server.base_url}/v1/completions", json=body, timeout=1.0)
    wait_until(lambda: tiny_server.metric("dgserve_requests_running") == 0, timeout=10)
    assert tiny_server.metric("dgserve_requests_running") == 0


def test_sdk_three_turn_conversation_appends_dumped_messages(client):
    """What chat frontends do: the previous reply goes back as the SDK dumps it (refusal,
    tool_calls, function_call, audio and annotations null or empty)."""
    messages: list[dict] = [{"role": "system", "content": "Be brief."}]
    prompt_tokens = []
    for question in ("Hi", "And then?", "Thanks"):
        messages.append({"role": "user", "content": question})
        r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
        dumped = r.choices[0].message.model_dump()
        assert {"refusal", "tool_calls", "function_call", "audio", "annotations"} <= dumped.keys()
        assert dumped["role"] == "assistant" and dumped["content"]
        assert r.system_fingerprint and r.system_fingerprint.startswith("fp_dgserve-")
        prompt_tokens.append(r.usage.prompt_tokens)
        messages.append(dumped)
    # Each turn's prompt holds the previous reply (6 tokens) and the new question.
    assert prompt_tokens[1] > prompt_tokens[0] + 6 and prompt_tokens[2] > prompt_tokens[1] + 6
    # The dumped replies render exactly as plain assistant messages would.
    plain = [m if m["role"] != "assistant" else {"role": "assistant", "content": m["content"]} for m in messages]
    again = client.chat.completions.create(model=MODEL, messages=plain[:-1], max_tokens=6, temperature=0)
    assert again.usage.prompt_tokens == prompt_tokens[2] and again.choices[0].message.content == messages[-1]["content"]
