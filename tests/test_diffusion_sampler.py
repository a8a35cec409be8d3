"""DiffusionSampler behaviour: batching, seeds, EOS, max_tokens, drafts, config and loading."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from sampler.diffusion import DiffusionSampler
from sampler.runtime.tiny_diffusion import build_tiny_diffusion
from sampler.types import DiffusionOptions, SamplingParams, StepEvent
from server.engine_core import run_to_completion

CPU = torch.device("cpu")
EOS_IDS = frozenset({1, 5})
REPO = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return build_tiny_diffusion(1024, 32, eos_token_ids=sorted(EOS_IDS), usable_vocab=489)


def params(max_tokens: int = 64, steps: int | None = 4, **kw) -> SamplingParams:
    """Common fields by keyword; `steps` and DiffusionOptions' fields go into its diffusion options."""
    schedule = {name: kw.pop(name) for name in list(kw) if name in DiffusionOptions.__dataclass_fields__}
    options = DiffusionOptions(max_denoising_steps=steps, **schedule)
    return SamplingParams(max_tokens=max_tokens, stop_token_ids=EOS_IDS, diffusion=options, **kw)


def drive(
    sampler: DiffusionSampler,
    requests: dict[str, tuple[list[int], SamplingParams]],
    join_at: dict[str, int] | None = None,
) -> tuple[dict[str, list[int]], dict[str, list[StepEvent]]]:
    """Run to completion; request k joins before step join_at[k]. Returns tokens and events."""
    done = run_to_completion(sampler, requests, join_at=join_at)
    return done.tokens, done.events


A = ([2, 10, 20, 30, 40, 50], params(70, seed=7))
B = ([2, 11, 12], params(70, seed=8, steps=6, confidence_threshold=1.5))
C = ([2, *range(60, 100)], params(70, seed=9, temperature=0.7, entropy_bound=0.5))


def test_seeded_output_identical_alone_and_batched(model: torch.nn.Module) -> None:
    """Keyed noise and per-row forwards: a request's tokens ignore its neighbours."""
    alone = {
        k: drive(DiffusionSampler(model, CPU, batch_invariant=True), {k: r})[0][k]
        for k, r in {"a": A, "b": B, "c": C}.items()
    }
    sampler = DiffusionSampler(model, CPU, batch_invariant=True)
    together, _ = drive(sampler, {"a": A, "b": B, "c": C}, {"a": 0, "b": 1, "c": 5})
    assert together == alone
    assert all(len(t) == 70 for t in alone.values())
    assert alone["a"] != alone["b"]


def test_batched_forward_matches_batch_one(model: torch.nn.Module) -> None:
    """One decoder forward for rows at different blocks, steps and lengths (left padding,
    mixed self-conditioning) gives each row its batch-1 logits and noise."""
    solo = DiffusionSampler(model, CPU)
    solo.add("a", *A[:1], A[1])
    solo.step()
    batched = DiffusionSampler(model, CPU)
    batched.add("c", *C)  # a longer prompt, one step ahead
    batched.step()
    batched.add("a", *A)
    events = batched.step()
    assert set(events) == {"a", "c"} and batched.stats["decoder_passes"] == 2
    mine, theirs = solo._rows["a"], batched._rows["a"]
    torch.testing.assert_close(theirs.self_cond, mine.self_cond, rtol=1e-4, atol=1e-4)
    assert torch.equal(theirs.argmax, mine.argmax) and torch.equal(theirs.canvas, mine.canvas)


def test_batched_run_finishes_every_row(model: torch.nn.Module) -> None:
    sampler = DiffusionSampler(model, CPU)
    tokens, events = drive(sampler, {"a": A, "b": B, "c": C}, {"a": 0, "b": 1, "c": 5})
    assert {k: len(v) for k, v in tokens.items()} == {"a": 70, "b": 70, "c": 70}
    assert all(e[-1].finish_reason == "length" for e in events.values())
    # Rows were denoised together: fewer forwards than rows x steps.
    assert sampler.stats["decoder_passes"] < sampler.stats["row_steps"]


@pytest.fixture
def eos_at(model: torch.nn.Module) -> Iterator[list[int]]:
    """Canvas index i of every block is certainly EOS (id 5) for i in the yielded list."""
    where: list[int] = []

    def hook(module, inputs, output):
        for i in where:
            output[:, i, :] = -1e4
            output[:, i, 5] = 1e4
        return output

    handle = model.lm_head.register_forward_hook(hook)
    yield where
    handle.remove()


def test_eos_inside_a_block_stops(model: torch.nn.Module, eos_at: list[int]) -> None:
    eos_at.append(9)
    tokens, events = drive(DiffusionSampler(model, CPU), {"r": ([2, 3, 4], params(100, seed=1))})
    assert len(tokens["r"]) == 9 and not EOS_IDS & set(tokens["r"])
    last = events["r"][-1]
    assert last.finish_reason == "stop" and last.denoising_steps == 4 and last.token_ids == tokens["r"]
    assert [e.finish_reason for e in events["r"][:-1]] == [None] * 3


def test_max_tokens_before_eos_is_length(model: torch.nn.Module, eos_at: list[int]) -> None:
    """As in AR decoding: the budget ends the text before a later stop token."""
    eos_at.append(9)
    tokens, events = drive(DiffusionSampler(model, CPU), {"r": ([2, 3, 4], params(9, seed=1))})
    assert len(tokens["r"]) == 9 and events["r"][-1].finish_reason == "length"


@pytest.mark.parametrize("max_tokens,commits", [(40, [32, 8]), (32, [32]), (1, [1])])
def test_max_tokens_trims_the_block(model: torch.nn.Module, max_tokens: int, commits: list[int]) -> None:
    tokens, events = drive(DiffusionSampler(model, CPU), {"r": ([2, 3], params(max_tokens, seed=3))})
    assert [len(e.token_ids) for e in events["r"] if e.denoising_steps] == commits
    assert len(tokens["r"]) == max_tokens
    assert events["r"][-1].finish_reason == "length"
    assert all(e.finish_reason is None for e in events["r"][:-1])


def test_stream_refinements_drafts(model: torch.nn.Module, eos_at: list[int]) -> None:
    eos_at.append(20)
    _, events = drive(DiffusionSampler(model, CPU), {"r": ([2, 3], params(100, seed=4, stream_refinements=True))})
    evs = events["r"]
    assert [e.refinement_step for e in evs] == [1, 2, 3, 4]
    for e in evs:
        assert e.draft_ids is not None and len(e.draft_ids) == 20
        assert all(isinstance(t, int) and 0 <= t < 1024 for t in e.draft_ids)
        assert not EOS_IDS & set(e.draft_ids)
    assert evs[-1].token_ids == evs[-1].draft_ids


def test_drafts_absent_by_default_and_forward_counts(model: torch.nn.Module) -> None:
    _, events = drive(DiffusionSampler(model, CPU), {"r": ([2, 3], params(64, seed=4))})
    evs = events["r"]
    assert all(e.draft_ids is None and e.refinement_step is None for e in evs)
    # Encoder + decoder on a block's first step, decoder only afterwards.
    assert [e.forward_passes for e in evs] == [2, 1, 1, 1] * 2
    assert [e.denoising_steps for e in evs] == [None, None, None, 4] * 2


def test_greedy_is_deterministic_without_a_seed(model: torch.nn.Module) -> None:
    greedy = ([2, 7, 9], params(40, temperature=0.0))
    first, _ = drive(DiffusionSampler(model, CPU), {"r": greedy})
    second, _ = drive(DiffusionSampler(model, CPU), {"r": greedy})
    assert first == second


def test_request_overrides_and_validation(model: torch.nn.Module) -> None:
    sampler = DiffusionSampler(model, CPU, max_denoising_steps=7, entropy_bound=0.2)
    assert sampler.defaults.max_denoising_steps == 7 and sampler.defaults.t_max == 0.8
    chosen = sampler.settings_for(params(steps=3, t_min=0.1, t_max=0.3, stability_threshold=0))
    assert (
        chosen.max_denoising_steps,
        chosen.t_min,
        chosen.t_max,
        chosen.entropy_bound,
        chosen.stability_threshold,
    ) == (3, 0.1, 0.3, 0.2, 0)
    for bad in [dict(t_min=0.9), dict(steps=0), dict(entropy_bound=0.0), dict(confidence_threshold=-1.0)]:
        with pytest.raises(ValueError):
            sampler.add("x", [1, 2], params(**bad))
    with pytest.raises(ValueError):
        sampler.add("x", [], params())
    assert sampler.num_active == 0


def test_cancel_mid_block(model: torch.nn.Module) -> None:
    sampler = DiffusionSampler(model, CPU)
    sampler.add("a", [2, 3], params(64, seed=1))
    sampler.add("b", [2, 4], params(64, seed=2))
    sampler.step()
    sampler.cancel("a")
    sampler.cancel("missing")
    assert sampler.num_active == 1 and set(sampler.step()) == {"b"}


def test_registry_config_and_loader() -> None:
    from sampler.registry import build_sampler
    from sampler.runtime.loading import load_model
    from server.config import load_config

    config = load_config(REPO / "configs" / "tiny-diffusion.yaml")
    assert (config.model, config.sampler, config.dtype, config.device) == (
        "tiny-diffusion",
        "diffusion",
        "float32",
        "cpu",
    )
    loaded = load_model(config.model, dtype=config.dtype, device=config.device)
    assert loaded.kind == "diffusion" and len(loaded.tokenizer) <= loaded.model.config.text_config.vocab_size
    sampler = build_sampler(config.sampler, loaded, config.diffusion)
    assert isinstance(sampler, DiffusionSampler)
    prompt = loaded.tokenizer("Hello, world!")["input_ids"]
    tokens, _ = drive(
        sampler, {"r": (prompt, SamplingParams(max_tokens=12, seed=0, stop_token_ids=frozenset(loaded.eos_token_ids)))}
    )
    assert len(tokens["r"]) == 12 and loaded.tokenizer.decode(tokens["r"]).strip()

    gpu = load_config(REPO / "configs" / "diffusiongemma-26b.yaml")
    assert (gpu.model, gpu.sampler, gpu.dtype) == ("google/diffusiongemma-26B-A4B-it", "diffusion", "bfloat16")
    assert gpu.device.startswith("cuda")


def test_save_pretrained_round_trip(tmp_path: Path) -> None:
    """The real checkpoint's path: from_pretrained of a saved DiffusionGemma directory."""
    from sampler.runtime.loading import load_model

    tiny = load_model("tiny-diffusion", dtype="float32", device="cpu")
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), dtype="float32", device="cpu")
    assert loaded.kind == "diffusion" and type(loaded.model).__name__ == "DiffusionGemmaForBlockDiffusion"
    assert loaded.eos_token_ids == tiny.eos_token_ids
    saved = DiffusionSampler(loaded.model, CPU, loaded.generation_config).defaults
    assert saved == DiffusionSampler(tiny.model, CPU, tiny.generation_config).defaults
    for name, value in tiny.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], value), name
    request = {
        "r": (
            [2, 3, 4],
            SamplingParams(
                max_tokens=40,
                seed=11,
                diffusion=DiffusionOptions(max_denoising_steps=4),
                stop_token_ids=frozenset(tiny.eos_token_ids),
            ),
        )
    }
    reloaded, original = (drive(DiffusionSampler(m, CPU), request)[0] for m in (loaded.model, tiny.model))
    assert reloaded == original
