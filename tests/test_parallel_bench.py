"""`dgserve bench` (bench/refine.py) end to end on the tiny model: table, JSON and plot; the
llama-server peer row against a fake llama-server; the scoring of a peer's text; the echo-scoring
cost."""

from __future__ import annotations

import json

import pytest

from bench.refine import (
    PeerReply,
    Result,
    Scorer,
    add_peer_reply,
    echo_text_ids,
    load_prompts,
    peer_reply,
    run,
)
from tests.test_bench_load import fake_llama_server

REQUIRED = set(
    "sampler steps dtype tokens_per_s ratio_vs_ar tokens_per_forward exact_match_rate rouge_l perplexity".split()
)


def test_shipped_prompt_set():
    prompts = load_prompts("bench/prompts.jsonl")
    assert len(prompts) >= 24 and len(set(prompts)) == len(prompts)


def test_bench_smoke_tiny(tmp_path, capsys):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    flags = "--config configs/tiny.yaml --prompts bench/prompts.jsonl --limit 2 --max-tokens 8 --lengths 4,8"
    more = ["--temperatures", "0.7,1.0", "--concurrency", "1,3", "--echo-repeats", "2"]
    rc = run(
        [*flags.split(), *more, "--scaling-prompts", "2", "--threads", "1", "--json", str(out), "--plot", str(png)]
    )
    assert rc == 0
    report = json.loads(out.read_text())
    runs = report["runs"]
    assert [r["sampler"] for r in runs] == ["ar"] + ["parallel"] * 5
    assert [r["steps"] for r in runs[1:]] == [1, 2, 4, 8, None]
    for r in runs:
        assert REQUIRED <= set(r)
        assert r["tokens_per_s"] > 0 and r["perplexity"] > 0 and 0 <= r["rouge_l"] <= 1
    assert runs[0]["ratio_vs_ar"] == 1.0 and runs[0]["exact_match_rate"] == 1.0
    # Unlimited steps is exact: same tokens as AR on every prompt.
    assert runs[-1]["exact_match_rate"] == 1.0
    assert [s["max_tokens"] for s in report["scaling"]] == [4, 8]
    # Seeded sampling draws what AR draws, at every temperature.
    assert [s["temperature"] for s in report["sampling"]] == [0.7, 1.0]
    for s in report["sampling"]:
        assert s["exact_match_rate"] == 1.0 and s["tokens_per_forward"] >= 1 and s["parallel_tokens_per_s"] > 0
    # Concurrent greedy sequences through the engine core: batched parallel equals batched AR.
    assert [c["sequences"] for c in report["concurrency"]] == [1, 3]
    for c in report["concurrency"]:
        assert c["exact_match_rate"] == 1.0 and c["ar_tokens_per_forward"] == 1.0
    # Echo scoring of a 200-token text costs one forward, as a plain prefill of it does.
    echo = report["echo_cost"]
    assert echo["tokens"] == 200 and echo["repeats"] == 2
    assert echo["scoring_forwards"] == 1 and echo["prefill_forwards"] == 1
    assert echo["scoring_s"] > 0 and echo["prefill_s"] > 0 and echo["scoring_s_median"] >= echo["scoring_s"]
    assert png.stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "| parallel | unlimited |" in printed
    assert "| temperature (seeded) |" in printed and "| concurrent sequences (greedy) |" in printed
    assert "echo scoring of a 200-token text" in printed and "1 forward; plain prefill" in printed


def test_llama_server_peer_row_against_a_fake_server(tmp_path, capsys):
    exe, gguf = fake_llama_server(tmp_path)
    out = tmp_path / "bench.json"
    flags = "--config configs/tiny.yaml --limit 2 --max-tokens 5 --steps none --scaling-prompts 0 --echo-tokens 0"
    peer = ["--peer-llama-server", str(exe), "--peer-gguf", str(gguf)]
    assert run([*flags.split(), "--temperatures", "", "--threads", "1", *peer, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    argv = json.loads((tmp_path / "model.gguf.argv.json").read_text())
    opt = dict(zip(argv[::2], argv[1::2], strict=True))
    assert opt["-m"] == str(gguf) and opt["--parallel"] == "1" and opt["-t"] == "1"  # the bench's threads
    # A warm-up, then each prompt once: greedy, the bench's max tokens, no prompt cache.
    bodies = [json.loads(line) for line in (tmp_path / "model.gguf.requests.jsonl").read_text().splitlines()]
    prompts = load_prompts("bench/prompts.jsonl", 2)
    assert [b["prompt"] for b in bodies] == [prompts[0], *prompts]
    assert [b["max_tokens"] for b in bodies] == [4, 5, 5]
    assert all(b["temperature"] == 0 and b["cache_prompt"] is False and not b["stream"] for b in bodies)
    peer_row = report["runs"][-1]
    assert [r["sampler"] for r in report["runs"]] == ["ar", "parallel", "llama-server"]
    assert peer_row["dtype"] == "gguf" and peer_row["tokens_per_s"] > 0 and peer_row["perplexity"] > 0
    # The fake's text (the prompt's first words in capitals) is nothing like AR's.
    assert peer_row["exact_match_rate"] == 0 and peer_row["rouge_l"] < 1
    assert peer_row["tokens_per_s_in_server"] > 0  # from the reply's `timings`
    assert report["peer_llama_server"]["gguf"] == str(gguf) and report["echo_cost"] is None
    printed = capsys.readouterr().out
    assert "| llama-server | - | gguf |" in printed and "includes loopback HTTP" in printed


@pytest.fixture(scope="module")
def scorer_inputs(tiny_loaded):
    """Two prompts and an 'AR' result whose outputs are known texts (the tiny random model's own
    greedy text is mostly broken UTF-8, which no text round trip keeps)."""
    tok = tiny_loaded.tokenizer
    prompt_ids = [list(tok(p).input_ids) for p in ("Name three colours:", "Count to five:")]
    texts = [" red, green and blue", " one two three four five"]
    ar = Result("ar", "ar", None)
    for text in texts:
        add_peer_reply(ar, PeerReply(text, seconds=1.0, tokens=4, server_seconds=None), tok)
    return tok, prompt_ids, ar, texts


def test_a_peer_text_is_scored_like_our_own_rows(tiny_loaded, scorer_inputs):
    tok, prompt_ids, ar, texts = scorer_inputs
    scorer = Scorer(tiny_loaded.model, tok, prompt_ids, ar, f32_ref=None)
    same, other = Result("p", "llama-server", None, dtype="gguf"), Result("q", "llama-server", None, dtype="gguf")
    for text in texts:  # the same text, twice as slow over HTTP
        add_peer_reply(same, PeerReply(text, seconds=2.0, tokens=4, server_seconds=1.5), tok)
    for text in (" red, green and black", texts[1]):  # one word differs on the first prompt
        add_peer_reply(other, PeerReply(text, seconds=1.0, tokens=4, server_seconds=None), tok)
    ar_row, same_row, other_row = scorer.row(ar, "float32"), scorer.row(same, "float32"), scorer.row(other, "float32")
    assert same_row["exact_match_rate"] == 1.0 and same_row["rouge_l"] == 1.0 and same_row["dtype"] == "gguf"
    assert same_row["perplexity"] == ar_row["perplexity"]
    assert same_row["ratio_vs_ar"] == pytest.approx(0.5) and same_row["ratio_vs_ar_median"] == pytest.approx(0.5)
    assert same_row["tokens_per_s_in_server"] == pytest.approx(8 / 3.0)
    assert other_row["exact_match_rate"] == 0.5 and 0.5 < other_row["rouge_l"] < 1.0
    assert other_row["perplexity"] != ar_row["perplexity"]
    assert "tokens_per_s_in_server" not in other_row and "exact_match_vs_f32_ar" not in other_row


def test_rows_are_also_scored_against_float32_ar(tiny_loaded, scorer_inputs):
    tok, prompt_ids, ar, texts = scorer_inputs
    f32_ref = [list(tok(texts[0], add_special_tokens=False).input_ids), [7, 8, 9]]
    row = Scorer(tiny_loaded.model, tok, prompt_ids, ar, f32_ref).row(ar, "bfloat16")
    assert row["exact_match_vs_f32_ar"] == 0.5 and row["rouge_l_vs_f32_ar"] < 1.0 and row["dtype"] == "bfloat16"


def test_peer_reply_reads_text_usage_and_llama_server_timings():
    body = {
        "choices": [{"text": " Paris."}],
        "usage": {"completion_tokens": 3},
        "timings": {"prompt_ms": 120.0, "predicted_ms": 380.0},
    }
    assert peer_reply(body, 0.6) == PeerReply(" Paris.", seconds=0.6, tokens=3, server_seconds=0.5)
    plain = peer_reply({"choices": [{"text": "x"}], "usage": {"completion_tokens": 1}}, 0.1)
    assert plain.server_seconds is None and plain.tokens == 1  # an OpenAI server without timings


def test_echo_text_is_exactly_n_tokens_of_the_prompts_repeated(tiny_loaded):
    tok = tiny_loaded.tokenizer
    ids = echo_text_ids(tok, ["one", "two"], 200)
    once = list(tok("one\n\ntwo").input_ids)
    assert len(ids) == 200 and ids[: len(once)] == once and ids[len(once) : 2 * len(once)] == once
