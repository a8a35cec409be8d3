"""Defects a review of the OpenAI contract found (issue 10), each pinned by a test that failed before
its fix: environment strings, error params, oversized requests, the assistant-message rule, 404/405
metrics, the busy switch and sibling choices, strict booleans. See docs/openai.md."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from sampler.types import SamplingParams
from server import __version__
from server.app import create_app
from server.config import ServerConfig, load_config
from server.scheduler import Scheduler, SequenceRequest

MODEL = "tiny-gemma3"
HELLO = [{"role": "user", "content": "Hello"}]


def make_client(tiny_loaded, **cfg) -> TestClient:
    config = ServerConfig(model=MODEL, device="cpu", default_max_tokens=8, **cfg)
    return TestClient(create_app(config, loaded=tiny_loaded))


@pytest.fixture(scope="module")
def client(tiny_loaded):
    with make_client(tiny_loaded, max_queue=4) as c:
        yield c


def chat(client, **body):
    return client.post("/v1/chat/completions", json={"model": MODEL, "messages": HELLO, "max_tokens": 4, **body})


def error_of(response, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


# ---- environment values of string fields are strings ---------------------------------------------
@pytest.mark.parametrize("key", ["null", "~", "123456", "yes", "0123", "1.0", "true"])
def test_api_key_from_the_environment_is_taken_as_written(key):
    assert load_config(None, environ={"DGSERVE_API_KEY": key}).api_key == key


def test_served_model_name_from_the_environment_is_text():
    cfg = load_config(None, environ={"DGSERVE_SERVED_MODEL_NAME": "1.0", "DGSERVE_MODEL": "0123"})
    assert cfg.model_name == "1.0" and cfg.model == "0123"


def test_typed_fields_from_the_environment_keep_their_yaml_meaning():
    env = {"DGSERVE_PORT": "9100", "DGSERVE_SAMPLER_WHEN_BUSY": "null", "DGSERVE_TEMPERATURE": "0.5"}
    cfg = load_config(None, environ=env)
    assert cfg.port == 9100 and cfg.sampler_when_busy is None and cfg.temperature == 0.5


# ---- validation errors name the parameter; strings are not booleans ------------------------------
@pytest.mark.parametrize(
    "extra,param,code",
    [
        ({"stream": "yes"}, "stream", "invalid_value"),
        ({"stream": 1}, "stream", "invalid_value"),
        ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage", "invalid_value"),
        ({"stream": True, "stream_refinements": "true"}, "stream_refinements", "invalid_value"),
        ({"strict": True}, "strict", "unknown_parameter"),
        ({"structured_outputs": {}}, "structured_outputs", "unknown_parameter"),
        ({"integer_thing": 1}, "integer_thing", "unknown_parameter"),
        ({"stop": 5}, "stop", "invalid_value"),
    ],
)
def test_validation_errors_name_the_parameter(client, extra, param, code):
    error = error_of(chat(client, **extra))
    assert error["param"] == param and error["code"] == code


def test_nested_union_errors_name_the_message_field(client):
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    assert error_of(chat(client, messages=messages))["param"] == "messages.0.content"


# ---- more choices than the queue holds: 400, not "retry later" -------------------------------------
def test_more_choices_than_the_queue_holds_is_a_400(client):
    error = error_of(chat(client, n=5))
    assert error["param"] == "n" and error["type"] == "invalid_request_error"
    body = {"model": MODEL, "prompt": ["a", "b", "c", "d", "e"], "max_tokens": 2}
    assert error_of(client.post("/v1/completions", json=body))["param"] == "prompt"
    assert chat(client, n=4).status_code == 200  # exactly max_queue still fits


# ---- the assistant-message rule agrees with its message -------------------------------------------
def test_assistant_only_conversations_are_refused(client):
    for messages in ([{"role": "assistant", "content": "a"}], [{"role": "assistant", "content": "a"}] * 2):
        error = error_of(chat(client, messages=messages))
        assert error["param"] == "messages" and "user" in error["message"]
    assert chat(client, messages=[*HELLO, {"role": "assistant", "content": "Hi"}]).status_code == 200


# ---- 404 and 405 are counted as request errors ---------------------------------------------------
def _errors_with_code(client, code: str) -> float:
    pattern = re.compile(r'^dgserve_request_errors_total\{[^}]*code="' + code + r'"[^}]*\} (\S+)$', re.M)
    return sum(float(v) for v in pattern.findall(client.get("/metrics").text))


def test_unknown_routes_and_methods_are_counted(client):
    before = _errors_with_code(client, "not_found"), _errors_with_code(client, "method_not_allowed")
    assert error_of(client.get("/v1/nothing"), 404)["code"] == "not_found"
    assert error_of(client.get("/v1/chat/completions"), 405)["code"] == "method_not_allowed"
    after = _errors_with_code(client, "not_found"), _errors_with_code(client, "method_not_allowed")
    assert after == (before[0] + 1, before[1] + 1)


# ---- the busy switch: only other requests make the engine busy ------------------------------------
def _seq(group: str | None) -> SequenceRequest:
    return SequenceRequest([1], SamplingParams(max_tokens=1), "parallel", sampler_when_busy="ar", group=group)


def test_sibling_choices_do_not_make_the_engine_busy():
    scheduler = Scheduler(max_num_seqs=8, max_queue=8)
    siblings = [_seq("req-a"), _seq("req-a")]
    scheduler.enqueue(siblings)
    assert [scheduler.choose_sampler(r) for r in scheduler.admit()] == ["parallel", "parallel"]
    other = _seq("req-b")
    scheduler.enqueue([other])
    scheduler.admit()
    assert scheduler.choose_sampler(other) == "ar"
    ungrouped = [_seq(None), _seq(None)]  # sequences without a group are each their own request
    scheduler.enqueue(ungrouped)
    assert [scheduler.choose_sampler(r) for r in scheduler.admit()] == ["ar", "ar"]


def test_a_lone_n2_request_keeps_its_sampler(tiny_loaded):
    with make_client(tiny_loaded, sampler="parallel", sampler_when_busy="ar") as c:
        body = chat(c, n=2, temperature=0, max_tokens=3).json()
        assert body["timings"]["sampler"] == "parallel"
        assert body["system_fingerprint"] == f"fp_dgserve-{__version__}-parallel-float32"
