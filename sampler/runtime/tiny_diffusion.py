"""A tiny random DiffusionGemma (block diffusion) model and the tiny tokenizer, no downloads.

Same classes as the released checkpoint (`DiffusionGemmaForBlockDiffusion`: causal encoder
writing the KV cache, bidirectional decoder denoising a canvas, self-conditioning, MoE
layers), at about a million weights: ~25 ms a denoising step on two CPU cores at canvas 32.
Everything is seeded, so the tiny model is the same in every process.
"""

from __future__ import annotations

from typing import Any

import torch

from sampler.diffusion_settings import RELEASED_DEFAULTS
from sampler.runtime.model import TINY_DIFFUSION, LoadedModel
from sampler.runtime.tiny import TINY_DECODER_SHAPE, build_seeded


def tiny_diffusion_config(
    vocab_size: int = 1024,
    canvas_length: int = 32,
    *,
    pad_token_id: int = 0,
    eos_token_id: int | list[int] = 1,
    bos_token_id: int = 2,
) -> Any:
    """The CPU-sized config from the field notes: 2 layers (sliding 16 + full), 4 experts."""
    from transformers import DiffusionGemmaConfig

    text = dict(
        vocab_size=vocab_size,
        **TINY_DECODER_SHAPE,
        global_head_dim=64,
        num_global_key_value_heads=1,
        num_experts=4,
        top_k_experts=2,
        moe_intermediate_size=64,
        use_bidirectional_attention="vision",
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=bos_token_id,
    )
    vision = dict(
        model_type="gemma4_vision",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
    )
    config = DiffusionGemmaConfig(text_config=text, vision_config=vision, canvas_length=canvas_length)
    config.architectures = ["DiffusionGemmaForBlockDiffusion"]
    return config


def build_tiny_diffusion(
    vocab_size: int = 1024,
    canvas_length: int = 32,
    *,
    eos_token_ids: list[int] | None = None,
    pad_token_id: int = 0,
    bos_token_id: int = 2,
    usable_vocab: int | None = None,
    weight_std: float = 0.5,
    seed: int = 0,
) -> torch.nn.Module:
    """A random `DiffusionGemmaForBlockDiffusion` with the released sampler defaults.

    Weights are drawn with std `weight_std` instead of the default 0.02: the default gives
    near-uniform logits (every position at maximal entropy, one token accepted per step, no
    early stop), while larger weights give peaked predictions, several tokens accepted per
    step and blocks that stop early, so tests exercise every branch of the sampler.
    The embedding rows (tied to the LM head) of the EOS ids and of ids >= `usable_vocab`
    (ids the tokenizer cannot decode) are zeroed: their logit is then 0 while the maximum
    over the other random logits is positive, so text runs to max_tokens. EOS tests bias
    the logits explicitly.
    """
    from transformers import DiffusionGemmaForBlockDiffusion, DiffusionGemmaGenerationConfig, EntropyBoundSamplerConfig

    eos_token_ids = list(eos_token_ids or [1])
    config = tiny_diffusion_config(
        vocab_size, canvas_length, pad_token_id=pad_token_id, eos_token_id=eos_token_ids, bos_token_id=bos_token_id
    )
    # Encoder, decoder and LM head share weights: build_seeded redraws each tied tensor once.
    model = build_seeded(lambda: DiffusionGemmaForBlockDiffusion(config), seed, weight_std=weight_std)
    with torch.no_grad():
        embed = model.get_input_embeddings().weight
        embed[eos_token_ids] = 0.0  # (indexing with a list copies: assign, don't zero_)
        if usable_vocab is not None and usable_vocab < vocab_size:
            embed[usable_vocab:].zero_()
    defaults = dict(RELEASED_DEFAULTS)
    model.generation_config = DiffusionGemmaGenerationConfig(
        max_new_tokens=256,
        max_denoising_steps=defaults.pop("max_denoising_steps"),
        sampler_config=EntropyBoundSamplerConfig(entropy_bound=defaults.pop("entropy_bound")),
        **defaults,
        eos_token_id=eos_token_ids,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
    )
    return model.eval()


def load_tiny_diffusion(dtype: torch.dtype, device: torch.device) -> LoadedModel:
    """`load_model('tiny-diffusion')`: the tiny model plus the tiny byte-level tokenizer."""
    from sampler.runtime.tiny import END_OF_TURN, EOS, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    eos_ids = [tokenizer.convert_tokens_to_ids(EOS), tokenizer.convert_tokens_to_ids(END_OF_TURN)]
    model = build_tiny_diffusion(
        1024,
        32,
        eos_token_ids=eos_ids,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        usable_vocab=len(tokenizer),
    ).to(device=device, dtype=dtype)
    return LoadedModel.of(
        model, tokenizer, "diffusion", source=TINY_DIFFUSION, device=device, dtype=dtype, eos_token_ids=eos_ids
    )
