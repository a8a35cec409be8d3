"""POST /v1/responses (server/responses_api.py): in-process over the tiny model for shapes and
errors, and through the openai SDK's `client.responses.create` / `client.responses.stream` against
a live server."""

from __future__ import annotations

import json

import openai
import pytest
from fastapi.testclient import TestClient

from bench.sse import sse_events
from server.app import create_app
from server.config import ServerConfig

MODEL = "tiny-gemma3"
# A seed whose sample (temperature 1, input "Hello", no instructions) ends with the end-of-turn
# token after 19 tokens on the seeded tiny model: the "completed" path. Greedy runs to the limit.
STOPPING_SEED = 9


@pytest.fixture(scope="module")
def client(tiny_loaded):
    config = ServerConfig(model=MODEL, device="cpu", default_max_tokens=16)
    with TestClient(create_app(config, loaded=tiny_loaded)) as c:
        yield c


def respond(client, **body):
    return client.post("/v1/responses", json={"model": MODEL, "input": "Hello", **body})


def chat_text(client, messages, **body) -> dict:
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, **body})
    return r.json()


def test_text_equals_the_chat_endpoint_with_instructions_as_system(client):
    body = respond(client, instructions="Be brief.", max_output_tokens=6, temperature=0).json()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    reference = chat_text(client, messages, max_tokens=6, temperature=0)
    assert body["object"] == "response" and body["id"].startswith("resp_")
    (item,) = body["output"]
    assert item["type"] == "message" and item["role"] == "assistant"
    assert item["content"][0]["type"] == "output_text"
    assert item["content"][0]["text"] == reference["choices"][0]["message"]["content"]
    assert body["usage"]["input_tokens"] == reference["usage"]["prompt_tokens"]
    assert body["usage"]["output_tokens"] == 6 and body["usage"]["total_tokens"] == body["usage"]["input_tokens"] + 6
    assert body["status"] == "incomplete" and body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["instructions"] == "Be brief." and body["max_output_tokens"] == 6 and body["store"] is False
    assert body["timings"]["generated_tokens"] == 6


def test_message_list_input_and_replayed_output(client):
    first = respond(client, max_output_tokens=4, temperature=0).json()
    replay = [{"role": "user", "content": "Hello"}, first["output"][0], {"role": "user", "content": "More"}]
    parts = [{"role": "user", "content": [{"type": "input_text", "text": "Hel"}, {"type": "input_text", "text": "lo"}]}]
    reply = first["output"][0]["content"][0]["text"]
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": reply}]
    messages.append({"role": "user", "content": "More"})
    reference = chat_text(client, messages, max_tokens=4, temperature=0)
    again = respond(client, input=replay, max_output_tokens=4, temperature=0).json()
    assert again["output"][0]["content"][0]["text"] == reference["choices"][0]["message"]["content"]
    split = respond(client, input=parts, max_output_tokens=4, temperature=0).json()
    assert split["output"][0]["content"][0]["text"] == reply


def test_completed_when_the_model_ends_its_turn(client):
    body = respond(client, max_output_tokens=64, temperature=1.0, seed=STOPPING_SEED).json()
    assert body["status"] == "completed" and body["incomplete_details"] is None
    assert body["output"][0]["status"] == "completed" and body["usage"]["output_tokens"] < 64


def test_stream_events_in_order_and_text_agrees(client):
    body = respond(client, max_output_tokens=8, temperature=0).json()
    r = respond(client, max_output_tokens=8, temperature=0, stream=True)
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [(name, json.loads(data)) for name, data in sse_events(r.text)]
    assert all(name == data["type"] for name, data in events)
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    types = [data["type"] for _, data in events]
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert types[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    deltas = [data["delta"] for _, data in events if data["type"] == "response.output_text.delta"]
    text = body["output"][0]["content"][0]["text"]
    assert deltas and "".join(deltas) == text and events[-4][1]["text"] == text
    final = events[-1][1]["response"]
    assert final["usage"] == body["usage"] and final["output"][0]["content"][0]["text"] == text
    assert {data["response"]["id"] for _, data in events if "response" in data} == {final["id"]}


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"store": True}, "store"),
        ({"store": "false"}, "store"),
        ({"stream": "yes"}, "stream"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"max_output_tokens": 100_000}, "max_output_tokens"),
        ({"input": []}, "input"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input.0.content"),
        ({"input": [{"role": "assistant", "content": "only me"}]}, "input"),
        ({"tools": [{"type": "web_search"}]}, "tools"),
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"temperature": 3}, "temperature"),
        ({"sampler": "diffusion"}, "sampler"),
        ({"max_tokens": 5}, "max_tokens"),
    ],
)
def test_bad_requests_name_the_parameter(client, extra, param):
    r = respond(client, **extra)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param


def test_store_false_and_extensions_are_accepted(client):
    body = respond(client, store=False, max_output_tokens=3, sampler="parallel", top_k=5, seed=1).json()
    assert body["timings"]["sampler"] == "parallel" and body["store"] is False


# ---- through the openai SDK, against a live server -------------------------------------------------
@pytest.fixture(scope="module")
def sdk(tiny_server):
    return openai.OpenAI(base_url=f"{tiny_server.base_url}/v1", api_key="unused", max_retries=0)


def test_sdk_responses_create(sdk):
    r = sdk.responses.create(model=MODEL, input="Hello", instructions="Be brief.", max_output_tokens=6, temperature=0)
    assert r.object == "response" and r.status == "incomplete"
    assert r.incomplete_details.reason == "max_output_tokens"
    assert r.output_text and r.usage.output_tokens == 6
    chat = sdk.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
        max_tokens=6,
        temperature=0,
    )
    assert r.output_text == chat.choices[0].message.content


def test_sdk_responses_stream_completed(sdk):
    kwargs = dict(model=MODEL, input="Hello", max_output_tokens=64, temperature=1.0, store=False)
    whole = sdk.responses.create(**kwargs, extra_body={"seed": STOPPING_SEED})
    with sdk.responses.stream(**kwargs, extra_body={"seed": STOPPING_SEED}) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert final.status == "completed" and whole.status == "completed"
    assert "".join(deltas) == final.output_text == whole.output_text
    assert final.usage.output_tokens == whole.usage.output_tokens


def test_sdk_responses_stream_cut_by_max_output_tokens(sdk):
    with sdk.responses.stream(model=MODEL, input="Hello", max_output_tokens=5, temperature=0) as stream:
        events = list(stream)
    assert events[0].type == "response.created" and events[-1].type == "response.incomplete"
    done = next(e for e in events if e.type == "response.output_text.done")
    assert done.text == "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert events[-1].response.usage.output_tokens == 5
