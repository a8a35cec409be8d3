"""response_format JSON on the `parallel` sampler (issue 10 item 2): masked verification gives
exactly `ar`'s masked output (greedy and seeded), tokens the grammar forces are committed without
a forward, guesses the grammar forbids never take a row nor commit, and cut outputs still parse.
On the tiny random Gemma 3 and its byte-level tokenizer (docs/parallel.md, "Structured output")."""

from __future__ import annotations

import json

import jsonschema
import llguidance
import openai
import pytest
import torch

from sampler import parallel_tree
from sampler.ar import ARSampler
from sampler.constrained import Grammar, json_grammar
from sampler.ngram_pool import NgramPool
from sampler.parallel import ParallelSampler
from sampler.types import ParallelOptions, SamplingParams
from server.engine_core import run_to_completion
from tests.test_structured_output import SCHEMA

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PERSON = SCHEMA  # the person record tests/test_structured_output.py's ar tests use
ITEMS = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"id": {"type": "integer"}, "label": {"enum": ["alpha", "beta", "gamma"]}},
                "required": ["id", "label"],
                "additionalProperties": False,
            },
            "maxItems": 3,
        },
        "total": {"type": "integer"},
    },
    "required": ["items", "total"],
    "additionalProperties": False,
}
SCHEMAS = {"person": PERSON, "items": ITEMS, "json_object": None}


@pytest.fixture(scope="module")
def grammars(tiny_loaded) -> dict[str, Grammar]:
    return {name: json_grammar(tiny_loaded.tokenizer, schema) for name, schema in SCHEMAS.items()}


def _requests(loaded, grammar: Grammar, count: int, **params) -> dict[str, tuple[list[int], SamplingParams]]:
    stop = frozenset(loaded.eos_token_ids)
    return {
        f"s{i}": ([2, 40 + 7 * i, 120, 60 + i], SamplingParams(seed=i, stop_token_ids=stop, grammar=grammar, **params))
        for i in range(count)
    }


def _ar(loaded, requests):
    return run_to_completion(ARSampler(loaded.model, loaded.device, prefix_cache_mb=0), requests)


def _parallel(loaded, requests, **options):
    return run_to_completion(ParallelSampler(loaded.model, loaded.device, **options), requests)


def _valid(loaded, grammar: Grammar, schema, tokens: list[int]) -> None:
    """The tokens are a whole document the grammar accepts, and it validates."""
    matcher = llguidance.LLMatcher(grammar.tokenizer, grammar.text)
    assert matcher.validate_tokens(tokens) == len(tokens)
    jsonschema.validate(json.loads(loaded.tokenizer.decode(tokens)), schema or {"type": "object"})


# shortlist 64 (< half the tiny vocabulary) guesses the walk cheaply, as on Gemma; 0: full logits.
@pytest.mark.parametrize("shortlist_size", [64, 0])
@pytest.mark.parametrize("name", list(SCHEMAS))
def test_greedy_equals_ar_batched_with_and_without_forced_commits(tiny_loaded, grammars, name, shortlist_size):
    requests = _requests(tiny_loaded, grammars[name], 4, max_tokens=60, temperature=0.0)
    ar = _ar(tiny_loaded, requests)
    for commit_forced in (True, False):
        par = _parallel(tiny_loaded, requests, shortlist_size=shortlist_size, commit_forced=commit_forced)
        assert par.tokens == ar.tokens
        assert par.finish_reasons == ar.finish_reasons
    for seq_id, reason in ar.finish_reasons.items():
        if reason == "stop":
            _valid(tiny_loaded, grammars[name], SCHEMAS[name], ar.tokens[seq_id])


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.8, 40, 0.9)])
def test_seeded_sampling_equals_ar(tiny_loaded, grammars, temperature, top_k, top_p):
    """The noise is keyed by (seed, position) and the mask is applied before top-k / top-p, as
    AR does, so a seeded sample is AR's even where forced tokens skipped their forward."""
    for name in ("person", "items"):
        requests = _requests(
            tiny_loaded, grammars[name], 4, max_tokens=70, temperature=temperature, top_k=top_k, top_p=top_p
        )
        ar = _ar(tiny_loaded, requests)
        par = _parallel(tiny_loaded, requests, shortlist_size=64, block_size=4)
        assert par.tokens == ar.tokens
        assert par.finish_reasons == ar.finish_reasons
        assert len({tuple(t) for t in ar.tokens.values()}) > 1  # the seeds really differ


@pytest.mark.parametrize("name", ["person", "json_object"])
def test_outputs_cut_by_max_tokens_parse_and_validate(tiny_loaded, grammars, name):
    """Seeded temperature-1.0 samples over 20 budgets: every output parses and validates, those
    the budget ended were closed in time (AR's rule, same tokens as AR's)."""
    schema = SCHEMAS[name]
    budgets = list(range(32, 52)) if schema else list(range(4, 24))
    stop = frozenset(tiny_loaded.eos_token_ids)
    requests = {
        f"s{i}": ([2, 40 + i, 120], SamplingParams(max_tokens=b, seed=i, stop_token_ids=stop, grammar=grammars[name]))
        for i, b in enumerate(budgets)
    }
    par = _parallel(tiny_loaded, requests, shortlist_size=64)
    assert par.tokens == _ar(tiny_loaded, requests).tokens
    for seq_id, tokens in par.tokens.items():
        assert len(tokens) <= requests[seq_id][1].max_tokens
        _valid(tiny_loaded, grammars[name], schema, tokens)
    assert "length" in par.finish_reasons.values()  # some were closed by the budget


def test_forced_commits_save_forwards_and_change_nothing(tiny_loaded, grammars):
    """With fixed keys the grammar forces runs of tokens (`{"name":"` and every key on the
    byte-level tokenizer): committed without a forward, they cut the forwards per document."""
    requests = _requests(tiny_loaded, grammars["items"], 4, max_tokens=80, temperature=0.0)
    forced = _parallel(tiny_loaded, requests, shortlist_size=64)
    plain = _parallel(tiny_loaded, requests, shortlist_size=64, commit_forced=False)
    assert forced.tokens == plain.tokens
    tokens = sum(len(t) for t in forced.tokens.values())
    with_forced, without = sum(forced.forward_passes.values()), sum(plain.forward_passes.values())
    assert with_forced < 0.75 * without, (with_forced, without)
    assert tokens / with_forced > 1.5
    # The forced opening comes with the first forward's event, beside that forward's own tokens.
    for seq_id, events in forced.events.items():
        first = events[0].token_ids
        assert tiny_loaded.tokenizer.decode(first).startswith('{"items":[')
        assert len(first) > len(plain.events[seq_id][0].token_ids)


def test_a_forbidden_guess_never_takes_a_row_nor_commits(tiny_loaded, grammars, monkeypatch, request):
    """A model whose unmasked argmax is always one token the grammar never allows, and guesses
    (draft filler, n-gram candidates) full of it: the trees are pruned before the forward, the
    output is AR's masked one and parses."""
    model = tiny_loaded.model
    head = model.get_output_embeddings()
    bad = tiny_loaded.tokenizer.encode("~", add_special_tokens=False)[0]  # ITEMS has no free strings
    bias = torch.zeros(head.weight.shape[0])
    bias[bad] = 1e4
    # The head module is what both samplers call (AR through the model's forward).
    hook = head.register_forward_hook(lambda _module, _args, out: out + bias)
    request.addfinalizer(hook.remove)
    stop = frozenset(tiny_loaded.eos_token_ids)
    free = run_to_completion(
        ARSampler(model, tiny_loaded.device, prefix_cache_mb=0),
        {"s": ([bad] * 6, SamplingParams(max_tokens=8, temperature=0.0))},
    )
    assert set(free.tokens["s"]) == {bad}  # unmasked, the model says `bad` everywhere

    trees: list[list[int]] = []
    proposed: list[bool] = []
    real_guess_tree = parallel_tree.guess_tree

    def spy(draft, draft_len, candidates, *args, **kwargs):
        proposed.append(bad in draft or any(bad in c for c in candidates))
        tree, nodes = real_guess_tree(draft, draft_len, candidates, *args, **kwargs)
        trees.append(list(tree.tokens))
        return tree, nodes

    monkeypatch.setattr("sampler.parallel.guess_tree", spy)
    real_candidates = NgramPool.candidates

    def with_bad(self, count, length, **kwargs):  # `bad` alone, and after each real candidate
        found = real_candidates(self, count, length, **kwargs)
        return [[bad] * length] + [(c + [bad])[:length] for c in found]

    monkeypatch.setattr(NgramPool, "candidates", with_bad)
    params = SamplingParams(max_tokens=60, temperature=0.0, stop_token_ids=stop, grammar=grammars["items"])
    prompt = [bad] * 12
    ar = run_to_completion(ARSampler(model, tiny_loaded.device, prefix_cache_mb=0), {"s": (prompt, params)})
    par = run_to_completion(
        ParallelSampler(model, tiny_loaded.device, shortlist_size=64, lean_below=0.0), {"s": (prompt, params)}
    )
    assert par.tokens == ar.tokens and bad not in par.tokens["s"]
    assert any(proposed) and all(bad not in tokens for tokens in trees)
    if par.finish_reasons["s"] == "stop":
        _valid(tiny_loaded, grammars["items"], ITEMS, par.tokens["s"])


def test_steps_is_ignored_with_a_grammar(tiny_loaded, grammars):
    """`steps` would commit unverified draft tokens, which the grammar may forbid: JSON runs exact."""
    requests = _requests(
        tiny_loaded, grammars["person"], 2, max_tokens=50, temperature=0.0, parallel=ParallelOptions(steps=1)
    )
    assert _parallel(tiny_loaded, requests, block_size=4).tokens == _ar(tiny_loaded, requests).tokens


def test_logprobs_are_the_raw_models_and_no_token_is_committed_without_one(tiny_loaded, grammars):
    """With logprobs every token comes from a draw row (no forced commits, no closing: AR does
    not close either), one entry per token, the raw model's log-softmax as AR reports it."""
    requests = _requests(tiny_loaded, grammars["person"], 3, max_tokens=40, temperature=0.0, logprobs=2)
    ar, par = _ar(tiny_loaded, requests), _parallel(tiny_loaded, requests, shortlist_size=64)
    assert par.tokens == ar.tokens
    for seq_id in requests:
        ar_lp = [lp for e in ar.events[seq_id] for lp in e.logprobs or []]
        par_lp = [lp for e in par.events[seq_id] for lp in e.logprobs or []]
        assert [lp.token_id for lp in par_lp] == par.tokens[seq_id]
        for mine, theirs in zip(par_lp, ar_lp, strict=True):
            assert mine.logprob == pytest.approx(theirs.logprob, abs=1e-4)


def test_a_grammar_sequence_refuses_detach(tiny_loaded, grammars):
    sampler = ParallelSampler(tiny_loaded.model, tiny_loaded.device)
    requests = _requests(tiny_loaded, grammars["person"], 1, max_tokens=200, temperature=0.0)
    sampler.add("json", *requests["s0"])
    sampler.add("text", [5, 6, 7], SamplingParams(max_tokens=30, temperature=0.0))
    sampler.step()
    assert sampler.detach("json") is None and sampler.num_active == 2
    assert sampler.detach("text") is not None


@pytest.fixture(scope="module")
def client(tiny_server):
    return openai.OpenAI(base_url=f"{tiny_server.base_url}/v1", api_key="unused", max_retries=0)


def test_sdk_json_schema_on_parallel_equals_ar(client):
    """Through the server: `sampler: parallel` now serves JSON itself; greedy, it gives AR's text."""
    fmt = {"type": "json_schema", "json_schema": {"name": "items", "schema": ITEMS, "strict": True}}
    texts = {}
    for sampler in ("ar", "parallel"):
        r = client.chat.completions.create(
            model="tiny-gemma3",
            messages=[{"role": "user", "content": "Some items as JSON"}],
            response_format=fmt,
            temperature=0.0,
            max_tokens=120,
            extra_body={"sampler": sampler},
        )
        assert f"-{sampler}-" in r.system_fingerprint
        texts[sampler] = (r.choices[0].message.content, r.choices[0].finish_reason)
    assert texts["parallel"] == texts["ar"]
    jsonschema.validate(json.loads(texts["parallel"][0]), ITEMS)


def test_json_forward_bench_smoke(tmp_path, capsys):
    """bench/json_forward.py on the tiny model: three modes, the same outputs, a table and JSON."""
    from bench import json_forward

    out = tmp_path / "jf.json"
    args = ["--config", "configs/tiny.yaml", "--limit", "2", "--max-tokens", "24", "--json", str(out)]
    assert json_forward.main(args) == 0
    report = json.loads(out.read_text())
    rows = {row["mode"]: row for row in report["modes"]}
    assert list(rows) == ["ar", "parallel no-forced", "parallel forced"]
    assert all(row["same_as_ar"] == 1.0 and row["tokens"] == rows["ar"]["tokens"] for row in rows.values())
    assert rows["parallel forced"]["forwards"] < rows["parallel no-forced"]["forwards"]
    assert "| parallel forced |" in capsys.readouterr().out
