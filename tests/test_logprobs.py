"""Logprobs and echo (issue 10 item 1), in-process over the tiny model in float32: every value is
checked against a direct forward of the model (log-softmax of its raw logits), not against the
server's own arithmetic."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient

from bench.sse import iter_sse_json
from sampler.ar import ARSampler
from server.app import create_app
from server.chat import chat_prompt_ids
from server.config import ServerConfig
from server.protocol import ChatMessage

MODEL = "tiny-gemma3"
PROMPT_IDS = [40, 120, 7, 300, 55, 9, 211, 64]


@pytest.fixture(scope="module")
def client(tiny_loaded, one_torch_thread):
    config = ServerConfig(model=MODEL, device="cpu", default_max_tokens=16)
    with TestClient(create_app(config, loaded=tiny_loaded)) as c:
        yield c


@torch.inference_mode()
def reference(model, ids: list[int]) -> torch.Tensor:
    """(len(ids), V) float32 log-softmax of one plain forward over `ids` (row i predicts i + 1)."""
    return model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)


@torch.inference_mode()
def greedy(model, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens by full forwards (no KV cache, no sampler code)."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(reference(model, ids)[-1].argmax()))
    return ids[len(prompt) :]


def text_of(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def post(client, path: str, **body):
    return client.post(path, json={"model": MODEL, **body})


def test_chat_logprobs_equal_a_direct_forward(client, tiny_loaded):
    messages = [{"role": "user", "content": "Hello there"}]
    r = post(
        client, "/v1/chat/completions", messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    content = choice["logprobs"]["content"]
    prompt = chat_prompt_ids(tiny_loaded.tokenizer, [ChatMessage(role="user", content="Hello there")])
    tokens = greedy(tiny_loaded.model, prompt, 6)
    ref = reference(tiny_loaded.model, prompt + tokens)
    assert len(content) == 6
    for i, (entry, token) in enumerate(zip(content, tokens, strict=True)):
        row = ref[len(prompt) - 1 + i]
        assert entry["logprob"] == pytest.approx(float(row[token]), abs=1e-4)
        assert entry["bytes"] == list(entry["token"].encode("utf-8"))
        values, ids = row.topk(3)
        assert [t["token"] for t in entry["top_logprobs"]] == [text_of(tiny_loaded.tokenizer, int(t)) for t in ids]
        assert [t["logprob"] for t in entry["top_logprobs"]] == pytest.approx(values.tolist(), abs=1e-4)
    # The tokens' texts are the detokenizer's: they join into the message.
    assert "".join(e["token"] for e in content) == choice["message"]["content"]


def test_logprobs_are_before_temperature_top_k_and_top_p(tiny_loaded):
    """Sampled at temperature 0.7 with top-k and top-p, the reported values are still the raw
    distribution's (vLLM's default), for generated and echoed prompt tokens alike."""
    from sampler.types import SamplingParams

    sampler = ARSampler(tiny_loaded.model, tiny_loaded.device)
    params = SamplingParams(max_tokens=5, temperature=0.7, top_k=5, top_p=0.9, seed=11, logprobs=2, prompt_logprobs=2)
    sampler.add("a", PROMPT_IDS, params)
    events = []
    while sampler.num_active:
        events.append(sampler.step()["a"])
    tokens = [t for e in events for t in e.token_ids]
    got_prompt = events[0].prompt_logprobs
    got = [lp for e in events for lp in e.logprobs or []]
    ref = reference(tiny_loaded.model, PROMPT_IDS + tokens)
    assert got_prompt[0] is None and len(got_prompt) == len(PROMPT_IDS)
    for i, scored in enumerate(got_prompt[1:], start=1):
        assert scored.token_id == PROMPT_IDS[i]
        assert scored.logprob == pytest.approx(float(ref[i - 1, PROMPT_IDS[i]]), abs=1e-4)
    assert [g.token_id for g in got] == tokens
    for i, scored in enumerate(got):
        row = ref[len(PROMPT_IDS) - 1 + i]
        assert scored.logprob == pytest.approx(float(row[tokens[i]]), abs=1e-4)
        assert [t for t, _ in scored.top] == row.topk(2).indices.tolist()


def test_echo_with_max_tokens_0_scores_the_prompt_in_one_forward(client, tiny_loaded):
    r = post(client, "/v1/completions", prompt=PROMPT_IDS, max_tokens=0, echo=True, logprobs=1)
    assert r.status_code == 200, r.text
    body = r.json()
    choice = body["choices"][0]
    lp = choice["logprobs"]
    ref = reference(tiny_loaded.model, PROMPT_IDS)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert len(lp["tokens"]) == len(PROMPT_IDS)
    expected = [float(ref[i - 1, PROMPT_IDS[i]]) for i in range(1, len(PROMPT_IDS))]
    assert lp["token_logprobs"][1:] == pytest.approx(expected, abs=1e-4)
    assert choice["text"] == tiny_loaded.tokenizer.decode(PROMPT_IDS, skip_special_tokens=True)
    assert choice["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 0
    assert body["timings"]["forward_passes"] == 1  # the whole prompt in one forward
    for i, top in enumerate(lp["top_logprobs"][1:], start=1):
        best = int(ref[i - 1].argmax())
        assert top[text_of(tiny_loaded.tokenizer, best)] == pytest.approx(float(ref[i - 1, best]), abs=1e-4)


def test_echo_then_generate_offsets_and_values(client, tiny_loaded):
    r = post(client, "/v1/completions", prompt=PROMPT_IDS, max_tokens=4, temperature=0, echo=True, logprobs=2)
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    tokens = greedy(tiny_loaded.model, PROMPT_IDS, 4)
    ref = reference(tiny_loaded.model, PROMPT_IDS + tokens)
    all_ids = PROMPT_IDS + tokens
    assert len(lp["tokens"]) == len(all_ids)
    expected = [float(ref[i - 1, all_ids[i]]) for i in range(1, len(all_ids))]
    assert lp["token_logprobs"][1:] == pytest.approx(expected, abs=1e-4)
    prompt_text = tiny_loaded.tokenizer.decode(PROMPT_IDS, skip_special_tokens=True)
    assert choice["text"].startswith(prompt_text)
    for token, offset in zip(lp["tokens"], lp["text_offset"], strict=True):
        assert choice["text"][offset : offset + len(token)] == token
    assert lp["text_offset"][len(PROMPT_IDS)] == len(prompt_text)


def test_echo_without_logprobs_and_string_prompts(client):
    r = post(client, "/v1/completions", prompt="Hello world", max_tokens=3, temperature=0, echo=True)
    plain = post(client, "/v1/completions", prompt="Hello world", max_tokens=3, temperature=0).json()
    choice = r.json()["choices"][0]
    assert choice["logprobs"] is None
    assert choice["text"] == "Hello world" + plain["choices"][0]["text"]


def test_logprobs_0_returns_the_sampled_tokens_logprob(client, tiny_loaded):
    r = post(client, "/v1/completions", prompt=PROMPT_IDS, max_tokens=3, temperature=0, logprobs=0)
    lp = r.json()["choices"][0]["logprobs"]
    tokens = greedy(tiny_loaded.model, PROMPT_IDS, 3)
    ref = reference(tiny_loaded.model, PROMPT_IDS + tokens)
    expected = [float(ref[len(PROMPT_IDS) - 1 + i, t]) for i, t in enumerate(tokens)]
    assert lp["token_logprobs"] == pytest.approx(expected, abs=1e-4)
    # The chosen token is always in top_logprobs (OpenAI's legacy shape: up to k + 1 keys).
    assert [list(top) for top in lp["top_logprobs"]] == [[t] for t in lp["tokens"]]


def test_streamed_logprobs_equal_non_streamed(client):
    body = dict(messages=[{"role": "user", "content": "Tell me"}], max_tokens=8, temperature=0, logprobs=True)
    whole = post(client, "/v1/chat/completions", top_logprobs=2, **body).json()["choices"][0]["logprobs"]["content"]
    r = post(client, "/v1/chat/completions", top_logprobs=2, stream=True, **body)
    chunks = list(iter_sse_json(r.text.splitlines()))
    streamed = [
        c for ch in chunks for choice in ch["choices"] if choice["logprobs"] for c in choice["logprobs"]["content"]
    ]
    assert streamed == whole


def test_streamed_echo_comes_first(client, tiny_loaded):
    body = dict(prompt=PROMPT_IDS, max_tokens=3, temperature=0, echo=True, logprobs=1, stream=True)
    r = post(client, "/v1/completions", **body)
    chunks = list(iter_sse_json(r.text.splitlines()))
    first = chunks[0]["choices"][0]
    assert first["logprobs"]["token_logprobs"][0] is None
    assert first["text"].startswith(tiny_loaded.tokenizer.decode(PROMPT_IDS, skip_special_tokens=True))
    offsets = [o for ch in chunks for c in ch["choices"] if c["logprobs"] for o in c["logprobs"]["text_offset"]]
    whole = post(client, "/v1/completions", **{**body, "stream": False}).json()["choices"][0]
    assert offsets == whole["logprobs"]["text_offset"]
    assert "".join(c["text"] for ch in chunks for c in ch["choices"]) == whole["text"]


def test_n_choices_each_get_their_logprobs(client):
    r = post(client, "/v1/completions", prompt="Hello", max_tokens=3, n=2, temperature=1.0, seed=3, logprobs=1)
    for choice in r.json()["choices"]:
        assert len(choice["logprobs"]["tokens"]) == 3


@pytest.mark.parametrize(
    "path,body,param",
    [
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        ("/v1/chat/completions", {"top_logprobs": 3}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": "yes"}, "logprobs"),
        ("/v1/chat/completions", {"max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"logprobs": 6}, "logprobs"),
        ("/v1/completions", {"logprobs": True}, "logprobs"),
        ("/v1/completions", {"max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"echo": "true"}, "echo"),
    ],
)
def test_bounds_are_400s_naming_the_parameter(client, path, body, param):
    prompt = {"messages": [{"role": "user", "content": "x"}]} if "chat" in path else {"prompt": "x"}
    r = post(client, path, **{"max_tokens": 2, **prompt, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_top_logprobs_20_is_allowed(client):
    r = post(
        client,
        "/v1/chat/completions",
        messages=[{"role": "user", "content": "x"}],
        max_tokens=2,
        logprobs=True,
        top_logprobs=20,
    )
    assert r.status_code == 200, r.text
    assert all(len(c["top_logprobs"]) == 20 for c in r.json()["choices"][0]["logprobs"]["content"])


def test_a_request_without_logprobs_computes_none(client, monkeypatch):
    """No log-softmax over the vocabulary unless asked: the functions must not be reached."""

    def forbidden(*args, **kwargs):
        raise AssertionError("logprobs computed for a request that did not ask")

    monkeypatch.setattr("sampler.ar.token_logprobs", forbidden)
    monkeypatch.setattr("sampler.ar.prompt_logprobs", forbidden)
    r = post(client, "/v1/completions", prompt="Hello", max_tokens=4, echo=True)
    assert r.status_code == 200 and r.json()["choices"][0]["logprobs"] is None
    r = post(client, "/v1/chat/completions", messages=[{"role": "user", "content": "x"}], max_tokens=4)
    assert r.status_code == 200 and r.json()["choices"][0]["logprobs"] is None
