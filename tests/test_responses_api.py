"""POST /v1/responses (server/responses_api.py): in-process over the tiny model for shapes,
logprobs, JSON output and errors, and through the openai SDK's `client.responses.create` /
`client.responses.stream` / `client.responses.parse` against a live server."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel

from bench.sse import sse_events
from server.app import create_app
from server.config import ServerConfig

MODEL = "tiny-gemma3"
LOGPROBS = ["message.output_text.logprobs"]
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "ok"],
    "additionalProperties": False,
}
SCHEMA_FORMAT = {"type": "json_schema", "name": "person", "schema": SCHEMA, "strict": True}
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


def delta_events(text: str) -> list[dict]:
    return [json.loads(data) for name, data in sse_events(text) if name == "response.output_text.delta"]


def test_logprobs_with_include_are_chats_per_token_logprobs(client):
    body = respond(client, max_output_tokens=6, temperature=0, include=LOGPROBS, top_logprobs=2).json()
    part = body["output"][0]["content"][0]
    messages = [{"role": "user", "content": "Hello"}]
    chat = chat_text(client, messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
    assert part["logprobs"] == chat["choices"][0]["logprobs"]["content"]
    assert len(part["logprobs"]) == body["usage"]["output_tokens"] == 6
    assert "".join(lp["token"] for lp in part["logprobs"]) == part["text"]
    for lp in part["logprobs"]:
        assert set(lp) == {"token", "logprob", "bytes", "top_logprobs"} and lp["logprob"] <= 0
        alternatives = [alt["logprob"] for alt in lp["top_logprobs"]]
        # Greedy: the chosen token is the most likely one.
        assert len(alternatives) == 2 and alternatives == sorted(alternatives, reverse=True)
        assert lp["logprob"] == alternatives[0]
    assert body["top_logprobs"] == 2


def test_top_logprobs_alone_returns_no_logprobs_as_openai(client):
    body = respond(client, max_output_tokens=3, temperature=0, top_logprobs=3).json()
    assert body["output"][0]["content"][0]["logprobs"] == []
    plain = respond(client, max_output_tokens=3, temperature=0, stream=True)
    assert all(event["logprobs"] == [] for event in delta_events(plain.text))


def test_streamed_logprobs_arrive_with_their_deltas(client):
    ask = dict(max_output_tokens=8, temperature=1.0, seed=5, include=LOGPROBS, top_logprobs=1)
    whole = respond(client, **ask).json()["output"][0]["content"][0]
    r = respond(client, **ask, stream=True)
    deltas = delta_events(r.text)
    assert all("".join(lp["token"] for lp in d["logprobs"]) == d["delta"] for d in deltas)
    assert [lp for d in deltas for lp in d["logprobs"]] == whole["logprobs"]
    events = [json.loads(data) for _, data in sse_events(r.text)]
    done = next(e for e in events if e["type"] == "response.output_text.done")
    part_done = next(e for e in events if e["type"] == "response.content_part.done")
    assert done["logprobs"] == part_done["part"]["logprobs"] == whole["logprobs"]


def test_text_json_schema_outputs_validate_and_are_echoed(client):
    documents = []
    for seed in range(6):
        body = respond(client, text={"format": SCHEMA_FORMAT}, max_output_tokens=200, temperature=1.0, seed=seed)
        body = body.json()
        assert body["status"] == "completed", body["output"]
        assert body["text"] == {"format": SCHEMA_FORMAT}
        documents.append(json.loads(body["output"][0]["content"][0]["text"]))
    assert len({json.dumps(d) for d in documents}) > 1  # temperature 1.0 really samples
    for document in documents:
        jsonschema.validate(document, SCHEMA)
    assert body["timings"]["sampler"] == "ar"  # JSON runs on ar (docs/openai.md)


def test_text_json_object_and_plain_text(client):
    ask = dict(text={"format": {"type": "json_object"}}, max_output_tokens=100, temperature=1.0)
    bodies = [respond(client, **ask, seed=seed).json() for seed in range(3, 5)]
    # A random model's free strings may run long; the ones that close parse as objects.
    done = [b["output"][0]["content"][0]["text"] for b in bodies if b["status"] == "completed"]
    assert done and all(isinstance(json.loads(text), dict) for text in done)
    assert all(b["text"] == {"format": {"type": "json_object"}} for b in bodies)
    plain = respond(client, text={"format": {"type": "text"}}, max_output_tokens=5, temperature=0).json()
    default = respond(client, max_output_tokens=5, temperature=0).json()
    assert plain["output"][0]["content"][0]["text"] == default["output"][0]["content"][0]["text"]
    assert plain["text"] == default["text"] == {"format": {"type": "text"}}


def test_streamed_json_schema_joins_into_a_valid_document(client):
    r = respond(client, text={"format": SCHEMA_FORMAT}, max_output_tokens=200, temperature=1.0, seed=4, stream=True)
    events = [json.loads(data) for _, data in sse_events(r.text)]
    assert events[-1]["type"] == "response.completed"
    assert events[-1]["response"]["text"] == {"format": SCHEMA_FORMAT}
    jsonschema.validate(json.loads("".join(d["delta"] for d in delta_events(r.text))), SCHEMA)


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": -1}, "top_logprobs"),
        ({"top_logprobs": "2"}, "top_logprobs"),
        ({"include": ["reasoning.encrypted_content"]}, "include.0"),
        ({"include": "message.output_text.logprobs"}, "include"),
        ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "objectx"}}}}, "text.format"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format"),
        ({"text": {"format": {"type": "json_object", "schema": {}}}}, "text.format"),
        ({"text": {"format": {"type": "json_schema", "name": "a b", "schema": {}}}}, "text.format.name"),
        ({"text": {"format": {"type": "json_schema", "name": "x", "schema": []}}}, "text.format.schema"),
        ({"text": {"format": {"type": "yaml"}}}, "text.format.type"),
        ({"text": {"verbosity": "low"}}, "text.verbosity"),
        ({"text": {"formats": {"type": "text"}}}, "text.formats"),
    ],
)
def test_bad_logprobs_and_text_name_the_parameter(client, extra, param):
    r = respond(client, **extra)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_block_diffusion_refuses_text_format_json_naming_it():
    from sampler.runtime.loading import load_model
    from server.errors import APIError
    from server.jobs import _grammar
    from server.responses_api import ResponsesRequest

    loaded = load_model("tiny-diffusion", dtype="float32", device="cpu")
    req = ResponsesRequest.model_validate({"model": "m", "input": "x", "text": {"format": {"type": "json_object"}}})
    with pytest.raises(APIError) as info:
        _grammar(req.to_chat(), loaded)
    assert info.value.status == 400 and info.value.param == "text.format"
    assert "block-diffusion" in info.value.message


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


def test_sdk_logprobs_create_and_stream(sdk):
    kwargs = dict(model=MODEL, input="Hello", max_output_tokens=6, temperature=0, include=LOGPROBS, top_logprobs=2)
    r = sdk.responses.create(**kwargs)
    logprobs = r.output[0].content[0].logprobs
    assert len(logprobs) == r.usage.output_tokens == 6 and r.top_logprobs == 2
    assert "".join(lp.token for lp in logprobs) == r.output_text
    assert all(len(lp.top_logprobs) == 2 and lp.top_logprobs[0].token == lp.token for lp in logprobs)
    with sdk.responses.stream(**kwargs) as stream:
        events = list(stream)
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert [(lp.token, lp.logprob) for d in deltas for lp in d.logprobs] == [(lp.token, lp.logprob) for lp in logprobs]
    # Cut by max_output_tokens: the SDK's get_final_response wants response.completed; read the last event.
    assert events[-1].type == "response.incomplete" and events[-1].response.output[0].content[0].logprobs == logprobs


def test_sdk_text_json_schema_validates(sdk):
    for seed in range(3):
        r = sdk.responses.create(
            model=MODEL,
            input="A person as JSON",
            text={"format": SCHEMA_FORMAT},
            max_output_tokens=200,
            temperature=1.0,
            extra_body={"seed": seed},
        )
        assert r.status == "completed" and r.text.format.type == "json_schema" and r.text.format.name == "person"
        jsonschema.validate(json.loads(r.output_text), SCHEMA)


class Flags(BaseModel):
    ok: bool
    colour: str | None


def test_sdk_parse_with_a_pydantic_text_format(sdk):
    """The SDK turns the model into a strict json_schema text.format and parses the output back."""
    r = sdk.responses.parse(
        model=MODEL, input="Flags", text_format=Flags, max_output_tokens=200, temperature=1.0, extra_body={"seed": 3}
    )
    assert r.status == "completed" and isinstance(r.output_parsed, Flags)
    assert r.text.format.type == "json_schema" and r.text.format.strict is True
