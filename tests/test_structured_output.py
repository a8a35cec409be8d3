"""response_format JSON (issue 10 item 2): outputs of the tiny random model, drawn at
temperature 1.0 under the grammar's masks, parse and validate against the schema; a cut output
is a prefix the grammar accepts; bad schemas and unservable samplers are 400s."""

from __future__ import annotations

import json

import httpx
import jsonschema
import llguidance
import openai
import pytest
from fastapi.testclient import TestClient

from sampler.ar import ARSampler
from sampler.constrained import json_grammar
from sampler.types import SamplingParams
from server.app import create_app
from server.config import ServerConfig
from server.protocol import ChatCompletionRequest

MODEL = "tiny-gemma3"
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["red", "green"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "ok"],
    "additionalProperties": False,
}
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}


@pytest.fixture(scope="module")
def client(tiny_server):
    return openai.OpenAI(base_url=f"{tiny_server.base_url}/v1", api_key="unused", max_retries=0)


def test_sdk_chat_json_schema_outputs_validate(client):
    texts = []
    for seed in range(4):
        r = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "A person as JSON"}],
            response_format=SCHEMA_FORMAT,
            temperature=1.0,
            max_tokens=200,
            seed=seed * 100,
            n=4,
        )
        for choice in r.choices:
            assert choice.finish_reason == "stop", choice.message.content
            texts.append(choice.message.content)
    assert len(set(texts)) > 1  # temperature 1.0 really samples
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)


def test_raw_http_completions_json_object(tiny_server):
    body = {
        "model": MODEL,
        "prompt": "Some JSON:",
        "response_format": {"type": "json_object"},
        "temperature": 1.0,
        "max_tokens": 300,
        "n": 8,
        "seed": 7,
    }
    r = httpx.post(f"{tiny_server.base_url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    done = [c["text"] for c in r.json()["choices"] if c["finish_reason"] == "stop"]
    assert done  # a random model's objects may run long, but most close within 300 tokens
    for text in done:
        assert isinstance(json.loads(text), dict)


def test_parallel_request_runs_on_parallel_and_a_cut_output_says_length(client):
    # parallel masks its verification (tests/test_parallel_json.py): it serves JSON itself.
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "JSON"}],
        response_format=SCHEMA_FORMAT,
        max_tokens=3,
        temperature=1.0,
        seed=3,
        extra_body={"sampler": "parallel"},
    )
    assert "-parallel-" in r.system_fingerprint
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    assert r.choices[0].message.content.startswith("{")


@pytest.mark.parametrize(
    ("response_format", "message"),
    [
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}, "objectx"),
        ({"type": "json_schema"}, "json_schema"),
        ({"type": "yaml"}, "type"),
    ],
)
def test_bad_response_format_is_400_naming_it(tiny_server, response_format, message):
    for path, prompt in (
        ("chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
        ("completions", {"prompt": "x"}),
    ):
        body = {"model": MODEL, "response_format": response_format, **prompt}
        r = httpx.post(f"{tiny_server.base_url}/v1/{path}", json=body, timeout=30)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"].startswith("response_format") and message in error["message"]


def _run_json(loaded, grammar, budgets: list[int], **extra) -> dict[str, tuple[list[int], str]]:
    sampler = ARSampler(loaded.model, loaded.model.device, prefix_cache_mb=0)
    stop = frozenset(loaded.eos_token_ids)
    for i, budget in enumerate(budgets):
        params = SamplingParams(max_tokens=budget, seed=i, stop_token_ids=stop, grammar=grammar, **extra)
        sampler.add(str(i), [2, 40 + i, 120], params)
    out: dict[str, tuple[list[int], str]] = {}
    while sampler.num_active:
        for seq_id, event in sampler.step().items():
            tokens, _ = out.get(seq_id, ([], ""))
            out[seq_id] = (tokens + event.token_ids, event.finish_reason or "")
    return out


def test_cut_outputs_are_prefixes_the_grammar_accepts(tiny_loaded):
    """Under max_tokens too small for any document the sampler commits only tokens the grammar
    allows: a fresh matcher accepts every one of them (an unmasked random model's would not be)."""
    grammar = json_grammar(tiny_loaded.tokenizer, SCHEMA)
    out = _run_json(tiny_loaded, grammar, [4 + i for i in range(8)])
    assert {reason for _, reason in out.values()} == {"length"}
    for seq_id, (ids, _) in out.items():
        matcher = llguidance.LLMatcher(grammar.tokenizer, grammar.text)
        assert matcher.validate_tokens(ids) == len(ids) == 4 + int(seq_id)


@pytest.mark.parametrize("schema", [SCHEMA, None], ids=["json_schema", "json_object"])
def test_outputs_cut_by_max_tokens_still_parse_and_validate(tiny_loaded, one_torch_thread, schema):
    """With a budget that holds a complete document the sampler closes it in time (the closing's
    tokens come with the last event, finish_reason "length"), at temperature 1.0 over many seeds."""
    grammar = json_grammar(tiny_loaded.tokenizer, schema)
    # The schema's shortest document is about 30 tiny tokens; budgets from just past it up.
    budgets = list(range(32, 52)) if schema else list(range(4, 24))
    out = _run_json(tiny_loaded, grammar, budgets)
    reasons = []
    for seq_id, (tokens, reason) in out.items():
        assert len(tokens) <= budgets[int(seq_id)]
        text = tiny_loaded.tokenizer.decode(tokens)
        value = json.loads(text)
        jsonschema.validate(value, schema or {"type": "object"})
        reasons.append(reason)
    assert "length" in reasons  # some documents were closed by the budget, not by the model


def test_a_closing_is_not_forced_on_requests_that_want_logprobs(tiny_loaded, one_torch_thread):
    # A closing's tokens have no distribution of their own: with logprobs every event keeps one
    # entry per token, so no closing was appended (the budget may then cut the document).
    grammar = json_grammar(tiny_loaded.tokenizer, None)
    sampler = ARSampler(tiny_loaded.model, tiny_loaded.model.device, prefix_cache_mb=0)
    for i in range(6):
        sampler.add(str(i), [2, 40 + i, 120], SamplingParams(max_tokens=6, seed=i, grammar=grammar, logprobs=0))
    while sampler.num_active:
        for event in sampler.step().values():
            assert event.logprobs is not None and len(event.logprobs) == len(event.token_ids) <= 1


def test_block_diffusion_refuses_json_with_the_reason():
    from sampler.runtime.loading import load_model
    from server.errors import APIError
    from server.jobs import _grammar

    loaded = load_model("tiny-diffusion", dtype="float32", device="cpu")
    req = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}}
    )
    with pytest.raises(APIError) as info:
        _grammar(req, loaded)
    assert info.value.status == 400 and info.value.param == "response_format"
    assert "block-diffusion" in info.value.message


def test_sdk_streamed_json_schema_joins_into_a_valid_document(client):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "A person as JSON"}],
        response_format=SCHEMA_FORMAT,
        temperature=1.0,
        max_tokens=200,
        seed=11,
        stream=True,
    )
    chunks = list(stream)
    text = "".join(ch.delta.content or "" for chunk in chunks for ch in chunk.choices)
    assert [ch.finish_reason for chunk in chunks for ch in chunk.choices if ch.finish_reason] == ["stop"]
    jsonschema.validate(json.loads(text), SCHEMA)


def test_start_up_builds_the_llguidance_tokenizer_so_requests_do_not(monkeypatch, caplog):
    """The tokenizer build (5-7 s on Gemma) happens in the start-up step, once: the first JSON
    request finds it built."""
    from sampler.runtime.loading import load_model

    loaded = load_model("tiny-gemma3", dtype="float32", device="cpu")  # a tokenizer no test has built for
    builds = []
    real = llguidance.hf.from_tokenizer
    monkeypatch.setattr(llguidance.hf, "from_tokenizer", lambda tok: builds.append(tok) or real(tok))
    config = ServerConfig(model=MODEL, device="cpu", default_max_tokens=8)
    with caplog.at_level("INFO", logger="dgserve.app"), TestClient(create_app(config, loaded=loaded)) as c:
        assert builds == [loaded.tokenizer]
        assert any("llguidance tokenizer" in r.message and " s" in r.message for r in caplog.records)
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_object"},
        }
        assert c.post("/v1/chat/completions", json=body).status_code == 200
    assert builds == [loaded.tokenizer]


def test_a_closing_inside_a_number_moves_on_to_the_required_keys(tiny_loaded):
    """Inside a number a digit is allowed too: the closing takes a separator first, so it goes on
    to the keys still required instead of growing the number until the budget runs out."""
    from sampler.constrained import Matcher

    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}}},
        "required": ["n", "tags"],
        "additionalProperties": False,
    }
    tok = tiny_loaded.tokenizer
    matcher = Matcher(json_grammar(tok, schema), frozenset(tiny_loaded.eos_token_ids))
    prefix = tok.encode('{"n":100', add_special_tokens=False)
    for token in prefix:
        matcher.advance(token)
    closing = matcher.closing(20)
    assert closing is not None
    jsonschema.validate(json.loads(tok.decode(prefix + closing)), schema)
