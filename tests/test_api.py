"""The HTTP contract, in-process (FastAPI TestClient) over the tiny model: fast and thorough."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from bench.live_server import metric_value
from bench.sse import sse_events
from server.app import create_app
from server.config import ServerConfig

MODEL = "tiny-gemma3"


def make_client(tiny_loaded, **cfg) -> TestClient:
    config = ServerConfig(model=MODEL, device="cpu", default_max_tokens=16, **cfg)
    return TestClient(create_app(config, loaded=tiny_loaded))


@pytest.fixture(scope="module")
def client(tiny_loaded):
    with make_client(tiny_loaded) as c:
        yield c


def complete(client, **body):
    return client.post("/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 8, **body})


def chat(client, **body):
    messages = body.pop("messages", [{"role": "user", "content": "Hello"}])
    return client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 8, **body})


def test_probes_and_models(client):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").status_code == 200
    assert client.get("/version").json()["version"]
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == MODEL
    assert client.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
    assert client.get("/v1/models/other").status_code == 404


def test_completion_object_shape(client):
    body = complete(client, temperature=0).json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert body["model"] == MODEL and isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length" and choice["text"]
    assert body["usage"]["completion_tokens"] == 8
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 8
    t = body["timings"]
    assert t["generated_tokens"] == 8 and t["forward_passes"] == 8 and t["tokens_per_forward"] == 1.0
    assert t["time_to_first_token_s"] > 0 and t["tokens_per_s"] > 0


def test_chat_object_shape(client):
    body = chat(
        client,
        temperature=0,
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Again"},
        ],
    ).json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["finish_reason"] in ("stop", "length")


def test_prompt_forms_and_n(client):
    body = complete(client, prompt=["Hello", "Once upon"], n=2, seed=3, temperature=1.0).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    again = complete(client, prompt=["Hello", "Once upon"], n=2, seed=3, temperature=1.0).json()
    assert [c["text"] for c in body["choices"]] == [c["text"] for c in again["choices"]]
    assert body["choices"][0]["text"] != body["choices"][1]["text"]  # n choices differ
    ids = complete(client, prompt=[5, 6, 7], temperature=0).json()
    assert ids["usage"]["prompt_tokens"] == 3
    nested = complete(client, prompt=[[5, 6, 7], [8, 9]], temperature=0).json()
    assert nested["choices"][0]["text"] == ids["choices"][0]["text"]


def test_greedy_is_deterministic_and_max_completion_tokens(client):
    a = chat(client, temperature=0, max_tokens=None, max_completion_tokens=6).json()
    b = chat(client, temperature=0, max_tokens=None, max_completion_tokens=6).json()
    assert a["choices"][0]["message"] == b["choices"][0]["message"]
    assert a["usage"]["completion_tokens"] == 6


def test_stop_string_truncates_and_streaming_matches(client):
    full = complete(client, temperature=0, max_tokens=16).json()["choices"][0]["text"]
    stop = full[5:8]
    assert stop and stop in full
    cut = complete(client, temperature=0, max_tokens=16, stop=[stop]).json()
    assert cut["choices"][0]["text"] == full[: full.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    streamed = client.post(
        "/v1/completions",
        json={"model": MODEL, "prompt": "Hello", "max_tokens": 16, "temperature": 0, "stop": stop, "stream": True},
    )
    text = "".join(
        json.loads(d)["choices"][0]["text"]
        for _, d in sse_events(streamed.text)
        if d != "[DONE]" and json.loads(d)["choices"]
    )
    assert text == cut["choices"][0]["text"]


def test_chat_stream_format(client):
    r = chat(client, temperature=0, stream=True, stream_options={"include_usage": True})
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == (None, "[DONE]")
    chunks = [json.loads(d) for _, d in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]].count("length") == 1
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 8
    assert all(c["usage"] is None for c in chunks[:-1])
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1])
    assert streamed == chat(client, temperature=0).json()["choices"][0]["message"]["content"]
    no_usage = [json.loads(d) for _, d in sse_events(chat(client, stream=True).text)[:-1]]
    assert all("usage" not in c for c in no_usage)


BAD_REQUESTS = [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user"}], "temperature": "hot"}, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "top_p": 0}, "top_p"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 0}, "n"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 1000}, "n"),
    ({"messages": [{"role": "user", "content": "x"}], "bogus_field": 1}, "bogus_field"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": 1}, "logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
    # json_object and json_schema are served (tests/test_structured_output.py); a schema is required.
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema"}}, "response_format"),
    ({"messages": [{"role": "user", "content": "x"}], "frequency_penalty": 0.5}, "frequency_penalty"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        "messages.0.content",
    ),
    ({"messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": [""]}, "stop"),
    ({"messages": [{"role": "user", "content": "x"}], "sampler": "diffusion"}, "sampler"),
]


@pytest.mark.parametrize("body,param", BAD_REQUESTS)
def test_bad_chat_requests_get_400_naming_the_parameter(client, body, param):
    r = client.post("/v1/chat/completions", json={"model": MODEL, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param


def test_noop_values_of_unsupported_parameters_are_accepted(client):
    r = chat(client, logprobs=False, frequency_penalty=0, presence_penalty=0.0, tools=[], user="u1")
    assert r.status_code == 200, r.text


def test_malformed_bodies(client):
    r = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = client.post("/v1/completions", content=b'{"model": "\xff\xfe"}', headers={"content-type": "application/json"})
    assert r.status_code == 400
    r = client.post("/v1/completions", json=[1, 2])
    assert r.status_code == 400
    r = complete(client, prompt=[10**9])
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = complete(client, prompt=[])
    assert r.status_code == 400


def test_unknown_model_is_404(client):
    r = complete(client, model="gpt-4")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_context_length_exceeded(client):
    r = complete(client, max_tokens=5000)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = complete(client, prompt=[5] * 4096, max_tokens=1)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_body_size_limit(tiny_loaded):
    with make_client(tiny_loaded, max_request_bytes=4096) as c:
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": "x" * 10_000})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_unknown_route_is_openai_shaped(client):
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()


def test_api_key(tiny_loaded):
    with make_client(tiny_loaded, api_key="s3cret") as c:
        assert c.get("/v1/models").status_code == 401
        r = c.get("/v1/models", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        for open_path in ("/health", "/ready", "/metrics"):
            assert c.get(open_path).status_code == 200


def test_cors_preflight(client):
    r = client.options(
        "/v1/chat/completions",
        headers={
            "Origin": "http://localhost:3000",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,authorization",
        },
    )
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] in ("*", "http://localhost:3000")


def _metric(client, name: str) -> float:
    return metric_value(client.get("/metrics").text, name)


def test_generation_tokens_metric_equals_usage(client):
    before = _metric(client, "dgserve_generation_tokens_total")
    served = 0
    for body in ({"max_tokens": 5}, {"max_tokens": 7, "n": 2}, {"max_tokens": 9, "stop": ["e"]}):
        served += complete(client, **body).json()["usage"]["completion_tokens"]
    r = chat(client, stream=True, stream_options={"include_usage": True}, max_tokens=6)
    served += json.loads(sse_events(r.text)[-2][1])["usage"]["completion_tokens"]
    assert _metric(client, "dgserve_generation_tokens_total") - before == served
    for name in (
        "dgserve_time_to_first_token_seconds_count",
        "dgserve_e2e_request_latency_seconds_count",
        "dgserve_request_queue_time_seconds_count",
        "dgserve_tokens_per_forward_count",
        "dgserve_inter_token_latency_seconds_count",
        "dgserve_forward_passes_total",
        "dgserve_prompt_tokens_total",
    ):
        assert _metric(client, name) > 0, name
    assert _metric(client, "dgserve_requests_running") == 0


def test_system_fingerprint_on_every_completion_object(client):
    from server import __version__

    expected = f"fp_dgserve-{__version__}-ar-float32"  # version, sampler, dtype of the loaded weights
    assert complete(client).json()["system_fingerprint"] == expected
    assert chat(client).json()["system_fingerprint"] == expected
    for response in (
        chat(client, stream=True, stream_options={"include_usage": True}),
        complete(client, stream=True),
    ):
        chunks = [json.loads(d) for _, d in sse_events(response.text)[:-1]]
        assert chunks and all(c["system_fingerprint"] == expected for c in chunks)
    assert complete(client, sampler="parallel").json()["system_fingerprint"] == expected.replace("-ar-", "-parallel-")


def test_sdk_dumped_assistant_messages_are_accepted(client):
    dumped = {"role": "assistant", "content": "Hi.", "refusal": None, "annotations": [], "audio": None}
    dumped |= {"function_call": None, "tool_calls": None}
    turns = [{"role": "user", "content": "Hello"}, dumped, {"role": "user", "content": "More"}]
    plain = [*turns[:1], {"role": "assistant", "content": "Hi."}, *turns[2:]]
    a, b = chat(client, temperature=0, messages=turns).json(), chat(client, temperature=0, messages=plain).json()
    assert a["usage"] == b["usage"] and a["choices"][0]["message"] == b["choices"][0]["message"]
    assert a["choices"][0]["message"]["refusal"] is None and a["choices"][0]["message"]["annotations"] == []
    # A refusal with null content stands for its turn.
    refusal = {"role": "assistant", "content": None, "refusal": "I can't help with that.", "tool_calls": []}
    as_text = {"role": "assistant", "content": "I can't help with that."}
    with_refusal = chat(client, temperature=0, messages=[turns[0], refusal, turns[2]]).json()
    with_text = chat(client, temperature=0, messages=[turns[0], as_text, turns[2]]).json()
    assert with_refusal["usage"] == with_text["usage"]


@pytest.mark.parametrize(
    "message,param",
    [
        (
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function"}]},
            "messages.1.tool_calls",
        ),
        ({"role": "assistant", "content": "x", "audio": {"id": "a1"}}, "messages.1.audio"),
        ({"role": "assistant", "content": "x", "function_call": {"name": "f"}}, "messages.1.function_call"),
        ({"role": "user", "content": "x", "refusal": "no"}, "messages.1"),
    ],
)
def test_assistant_fields_the_server_cannot_serve_are_refused(client, message, param):
    r = chat(client, messages=[{"role": "user", "content": "Hello"}, message])
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
