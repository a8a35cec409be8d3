import torch

from sampler.ar import ARSampler
from sampler.types import SamplingParams
from server.engine_core import run_to_completion
from tests.fakes import ScriptedModel, counting_script

V = 20


def run_alone(sampler, prompt, params, seq_id="s"):
    done = run_to_completion(sampler, {seq_id: (prompt, params)})
    return done.tokens[seq_id], done.finish_reasons[seq_id], done.forward_passes[seq_id]


def test_max_tokens_gives_length():
    model = ScriptedModel(V, counting_script(V))
    tokens, reason, forwards = run_alone(
        ARSampler(model, torch.device("cpu")), [3], SamplingParams(max_tokens=5, temperature=0)
    )
    assert tokens == [4, 5, 6, 7, 8]
    assert reason == "length"
    assert forwards == 5 == model.forward_calls


def test_stop_token_ends_without_being_emitted():
    model = ScriptedModel(V, counting_script(V, eos=1, eos_after=4))
    tokens, reason, _ = run_alone(
        ARSampler(model, torch.device("cpu")),
        [3],
        SamplingParams(max_tokens=50, temperature=0, stop_token_ids=frozenset({1})),
    )
    assert tokens == [4, 5, 6]
    assert reason == "stop"


def test_cancel_removes_sequence():
    sampler = ARSampler(ScriptedModel(V, counting_script(V)), torch.device("cpu"))
    sampler.add("a", [1], SamplingParams(max_tokens=10, temperature=0))
    sampler.step()
    sampler.cancel("a")
    assert sampler.num_active == 0 and sampler.step() == {}


def test_greedy_matches_transformers_generate(tiny_loaded):
    model, tok = tiny_loaded.model, tiny_loaded.tokenizer
    prompt = tok("def fibonacci(n):")["input_ids"]
    ours, reason, _ = run_alone(
        ARSampler(model, torch.device("cpu")), prompt, SamplingParams(max_tokens=40, temperature=0)
    )
    ref = model.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False, eos_token_id=None)[
        0, len(prompt) :
    ].tolist()
    assert ours == ref  # 40 tokens: crosses the tiny model's 16-token sliding window
    assert reason == "length"


def test_seeded_sampling_reproducible_and_batch_invariant(tiny_loaded):
    model, tok = tiny_loaded.model, tiny_loaded.tokenizer
    prompt = tok("Once upon a time")["input_ids"]
    params = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=42)
    alone, _, _ = run_alone(ARSampler(model, torch.device("cpu")), prompt, params)
    again, _, _ = run_alone(ARSampler(model, torch.device("cpu")), prompt, params)
    assert alone == again
    other, _, _ = run_alone(
        ARSampler(model, torch.device("cpu")),
        prompt,
        SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=43),
    )
    assert other != alone
    # The same request sharing steps with others gives the same tokens.
    sampler = ARSampler(model, torch.device("cpu"))
    got = run_to_completion(
        sampler,
        {
            "x": (tok("Hello, world")["input_ids"], SamplingParams(max_tokens=30, temperature=1.0, seed=1)),
            "me": (prompt, params),
        },
    ).tokens["me"]
    assert got == alone


def test_config_ar_options_reach_the_sampler(tiny_loaded):
    from sampler.registry import build_sampler
    from server.config import ServerConfig

    cfg = ServerConfig(model="tiny-gemma3", ar={"prefix_cache_mb": 0, "max_prefill_tokens": 64})
    sampler = build_sampler("ar", tiny_loaded, cfg.sampler_options("ar"))
    assert isinstance(sampler, ARSampler)
    assert sampler.prefix_cache is None and sampler.max_prefill_tokens == 64
    assert ServerConfig().max_num_seqs == 16
    default = build_sampler("ar", tiny_loaded, ServerConfig().sampler_options("ar"))
    assert isinstance(default, ARSampler) and default.prefix_cache is not None
