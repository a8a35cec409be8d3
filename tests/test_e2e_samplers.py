"""Every sampler through the whole HTTP path: the openai SDK against live servers, and the
refinement stream extension."""

from __future__ import annotations

import concurrent.futures as cf
import json

import httpx
import openai
import pytest

from bench.live_server import LiveServer
from bench.sse import sse_events


# ---- parallel refinement on the tiny Gemma (the session's tiny server) -----------------------
def test_parallel_sampler_equals_ar_over_http(tiny_server):
    client = openai.OpenAI(base_url=f"{tiny_server.base_url}/v1", api_key="x", max_retries=0)
    kwargs = dict(
        model="tiny-gemma3",
        prompt="The quick brown fox jumps over the lazy dog. The quick",
        max_tokens=40,
        temperature=0,
    )
    ar = client.completions.create(**kwargs)
    par = client.completions.create(extra_body={"sampler": "parallel"}, **kwargs)
    assert par.choices[0].text == ar.choices[0].text
    assert par.model_extra["timings"]["sampler"] == "parallel"
    assert par.model_extra["timings"]["forward_passes"] <= ar.model_extra["timings"]["forward_passes"]
    seeded = dict(kwargs, temperature=0.9, seed=11)
    assert (
        client.completions.create(extra_body={"sampler": "parallel"}, **seeded).choices[0].text
        == client.completions.create(**seeded).choices[0].text
    )


def test_parallel_refinement_events_opt_in(tiny_server):
    url = f"{tiny_server.base_url}/v1/chat/completions"
    body = {
        "model": "tiny-gemma3",
        "messages": [{"role": "user", "content": "Hello, world! Hello,"}],
        "max_tokens": 24,
        "temperature": 0,
        "stream": True,
        "sampler": "parallel",
    }
    plain = sse_events(httpx.post(url, json=body, timeout=60).text)
    assert all(name is None for name, _ in plain)
    rich = sse_events(httpx.post(url, json={**body, "stream_refinements": True}, timeout=60).text)
    drafts = [json.loads(d) for name, d in rich if name == "refinement"]
    assert drafts
    for chunk in drafts:
        assert chunk["object"] == "chat.completion.chunk" and chunk["choices"][0]["delta"] == {}
        r = chunk["refinement"]
        assert isinstance(r["draft_ids"], list) and isinstance(r["draft_text"], str) and r["index"] == 0

    def text(events: list[tuple[str | None, str]]) -> str:
        chunks = [json.loads(d) for n, d in events if n is None and d != "[DONE]"]
        return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])

    assert text(rich) == text(plain)
    # The SDK reads the same stream without tripping over the extension events.
    client = openai.OpenAI(base_url=f"{tiny_server.base_url}/v1", api_key="x", max_retries=0)
    stream = client.chat.completions.create(
        model="tiny-gemma3",
        messages=body["messages"],
        max_tokens=24,
        temperature=0,
        stream=True,
        extra_body={"sampler": "parallel", "stream_refinements": True},
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text(plain)


# ---- native block diffusion on the tiny DiffusionGemma ---------------------------------------
@pytest.fixture(scope="module")
def diffusion_server():
    with LiveServer.dgserve("configs/tiny-diffusion.yaml") as server:
        yield server.wait_ready()


def test_diffusion_with_the_openai_client(diffusion_server):
    client = openai.OpenAI(base_url=f"{diffusion_server.base_url}/v1", api_key="x", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny-diffusion"]
    chat = client.chat.completions.create(
        model="tiny-diffusion", messages=[{"role": "user", "content": "Hi"}], max_tokens=40, seed=3
    )
    assert chat.choices[0].finish_reason in ("stop", "length") and chat.usage.completion_tokens <= 40
    timings = chat.model_extra["timings"]
    assert timings["sampler"] == "diffusion" and timings["denoising_steps"] >= timings["blocks"] >= 1
    streamed = client.chat.completions.create(
        model="tiny-diffusion", messages=[{"role": "user", "content": "Hi"}], max_tokens=40, seed=3, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == chat.choices[0].message.content
    comp = client.completions.create(model="tiny-diffusion", prompt="Once upon a time", max_tokens=50, seed=5)
    assert comp.usage.completion_tokens == 50 and comp.choices[0].finish_reason == "length"
    streamed = client.completions.create(
        model="tiny-diffusion", prompt="Once upon a time", max_tokens=50, seed=5, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == comp.choices[0].text


def test_diffusion_blocks_stream_as_they_commit(diffusion_server):
    url = f"{diffusion_server.base_url}/v1/completions"
    body = {
        "model": "tiny-diffusion",
        "prompt": "Hello",
        "max_tokens": 70,
        "seed": 9,
        "stream": True,
        "stream_refinements": True,
        "stream_options": {"include_usage": True},
    }
    events = sse_events(httpx.post(url, json=body, timeout=120).text)
    assert events[-1] == (None, "[DONE]")
    content = [json.loads(d) for n, d in events[:-1] if n is None]
    drafts = [json.loads(d)["refinement"] for n, d in events if n == "refinement"]
    # Canvas 32: 70 tokens come as three committed blocks, each after its own denoising steps.
    deltas = [c for c in content if c["choices"] and c["choices"][0]["text"]]
    assert len(deltas) >= 2
    assert drafts and all(d["step"] >= 1 for d in drafts)
    assert content[-1]["usage"]["completion_tokens"] == 70
    assert content[-1]["timings"]["denoising_steps"] == len(drafts)


def test_diffusion_rejects_bad_schedule(diffusion_server):
    r = httpx.post(
        f"{diffusion_server.base_url}/v1/completions",
        timeout=30,
        json={"model": "tiny-diffusion", "prompt": "x", "t_min": 0.9, "t_max": 0.1},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "t_min"


# ---- sampler_when_busy: parallel alone, batched AR under load ----------------------------------
def test_busy_requests_go_to_the_batching_sampler():
    env = {"DGSERVE_SAMPLER": "parallel", "DGSERVE_SAMPLER_WHEN_BUSY": "ar"}
    with LiveServer.dgserve("configs/tiny.yaml", env=env) as server:
        server.wait_ready()
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0)
        kwargs = dict(model="tiny-gemma3", max_tokens=48, temperature=0)
        prompts = [f"{i} The quick brown fox jumps over the lazy dog." for i in range(6)]
        alone = [client.completions.create(prompt=p, **kwargs) for p in prompts]
        assert {r.model_extra["timings"]["sampler"] for r in alone} == {"parallel"}
        with cf.ThreadPoolExecutor(len(prompts)) as pool:
            together = list(pool.map(lambda p: client.completions.create(prompt=p, **kwargs), prompts))
        # Same text whichever sampler ran it (greedy, float32); most were admitted while busy.
        assert [r.choices[0].text for r in together] == [r.choices[0].text for r in alone]
        assert sum(r.model_extra["timings"]["sampler"] == "ar" for r in together) >= 1
        # A client that names its sampler, or watches refinements, keeps it under load too.
        with cf.ThreadPoolExecutor(3) as pool:
            named = list(
                pool.map(
                    lambda p: client.completions.create(prompt=p, extra_body={"sampler": "parallel"}, **kwargs),
                    prompts[:3],
                )
            )
        assert {r.model_extra["timings"]["sampler"] for r in named} == {"parallel"}
