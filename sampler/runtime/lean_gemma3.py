"""A leaner Gemma 3 decoder layer, swapped in for transformers' at load (same weights, same cache API).

Why: at one decode row a transformers Gemma 3 layer runs about 330 aten ops, most of them small
(six RMSNorms of ~12 ops each, rotary embeddings built from slices and a cat per tensor, three
projections where one would do), so on a 2-thread CPU dispatch costs as much as the weights'
arithmetic (docs/load.md, "Per-forward overhead"). This layer computes the same function with
fewer, larger ops:

* q, k and v come from one fused projection (the three weights concatenated along the output
  dimension), gate and up from another: 4 GEMMs per layer instead of 7, each streaming a larger
  weight, which also suits oneDNN / MKL better at one row;
* RMSNorm is `torch.rms_norm` with Gemma's `1 + weight` folded in at load (the same float32
  arithmetic: normalise in float32, scale, round back to the activation dtype);
* q and k are normalised and rotated together, as one (B, Hq + Hk, T, D) tensor whose per-head
  norm weights are stacked; rotate-half is a flip of the two halves times a signed sine.

Everything else is transformers' own: the model's forward (masks, rotary tables), the attention
kernel (`sdpa_attention_forward`, GQA handling included) and the cache's `update`, so every cache
the samplers pass (DynamicCache, the parallel sampler's TreeBatchCache, recording caches) works
unchanged. The swap applies only to `Gemma3ForCausalLM`; anything else is left as loaded.

Shapes: B batch rows, T new rows, Hq / Hk query / KV heads, D head dim, d hidden size.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

log = logging.getLogger("dgserve.lean_gemma3")


def _fused_linear(*linears: nn.Linear) -> nn.Linear:
    """One bias-free linear whose output is the given linears' outputs side by side."""
    weight = torch.cat([lin.weight.detach() for lin in linears], dim=0)
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    fused.weight = nn.Parameter(weight, requires_grad=False)
    return fused


def _norm_scale(norm: Any) -> torch.Tensor:
    """Gemma's RMSNorm multiplies by `1 + weight` in float32: folded once here."""
    return (1.0 + norm.weight.detach().float()).contiguous()


def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm over the last dim: float32 arithmetic, result in x's dtype."""
    out = torch.rms_norm(x.float(), (x.shape[-1],), scale, eps)
    return out if out.dtype == x.dtype else out.to(x.dtype)


class LeanRMSNorm(nn.Module):
    """Drop-in for Gemma3RMSNorm (the model's final norm)."""

    scale: torch.Tensor

    def __init__(self, norm: Any) -> None:
        super().__init__()
        self.eps = float(norm.eps)
        self.register_buffer("scale", _norm_scale(norm), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.scale, self.eps)


class LeanGemma3Layer(nn.Module):
    """One Gemma 3 decoder layer (attention + gated GELU MLP, Gemma's four sandwich norms)."""

    # Buffers (float32): the norms' folded `1 + weight` scales, (d,) each; q/k (Hq + Hk, 1, D); (D,) signs.
    input_layernorm: torch.Tensor
    post_attention_layernorm: torch.Tensor
    pre_feedforward_layernorm: torch.Tensor
    post_feedforward_layernorm: torch.Tensor
    qk_scale: torch.Tensor
    rotate_sign: torch.Tensor

    def __init__(self, layer: Any) -> None:
        super().__init__()
        attn, mlp = layer.self_attn, layer.mlp
        if attn.q_proj.bias is not None or getattr(attn, "attn_logit_softcapping", None) is not None:
            raise ValueError("lean Gemma 3 layer: attention bias and logit softcapping are not supported")
        # What sdpa_attention_forward reads from the module it is given.
        self.self_attn = _AttentionView(attn)
        self.layer_idx = attn.layer_idx
        self.head_dim = attn.head_dim
        self.num_heads = attn.q_proj.out_features // attn.head_dim
        self.num_kv_heads = attn.k_proj.out_features // attn.head_dim
        self.qkv_proj = _fused_linear(attn.q_proj, attn.k_proj, attn.v_proj)
        self.o_proj = attn.o_proj
        self.gate_up_proj = _fused_linear(mlp.gate_proj, mlp.up_proj)
        self.down_proj = mlp.down_proj
        self.act_fn = mlp.act_fn
        self.eps = float(layer.input_layernorm.eps)
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm"):
            self.register_buffer(name, _norm_scale(getattr(layer, name)), persistent=False)
        self.register_buffer(
            "post_feedforward_layernorm", _norm_scale(layer.post_feedforward_layernorm), persistent=False
        )
        # (Hq + Hk, 1, D): q heads take q_norm's scale, k heads k_norm's; broadcast over T.
        qk_scale = torch.cat(
            [
                _norm_scale(attn.q_norm).expand(self.num_heads, -1),
                _norm_scale(attn.k_norm).expand(self.num_kv_heads, -1),
            ]
        )
        self.register_buffer("qk_scale", qk_scale[:, None, :].contiguous(), persistent=False)
        self.qk_eps = float(attn.q_norm.eps)
        half = self.head_dim // 2
        # rotate_half(x) = cat(-x2, x1) = flip(halves) * [-1]*half + [+1]*half
        sign = torch.cat([-torch.ones(half), torch.ones(half)]).to(attn.q_proj.weight.device)
        self.register_buffer("rotate_sign", sign, persistent=False)

    def _rotate(self, qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotary embedding of (B, H, T, D) with (B, T, D) tables, as transformers computes it."""
        b, h, t, d = qk.shape
        cos, sin = cos[:, None], (sin * self.rotate_sign.to(sin.dtype))[:, None]
        swapped = qk.view(b, h, t, 2, d // 2).flip(-2).view(b, h, t, d)
        return qk * cos + swapped * sin

    def _attention(
        self,
        x: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: Any,
        cache: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        b, t, _ = x.shape
        hq, hk, d = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x).view(b, t, hq + 2 * hk, d).transpose(1, 2)  # (B, Hq + 2Hk, T, D)
        qk = qkv[:, : hq + hk]
        # Per-head RMSNorm of q and k: normalise in float32, then the stacked per-head scales.
        qk = (torch.rms_norm(qk.float(), (d,), None, self.qk_eps) * self.qk_scale).to(x.dtype)
        qk = self._rotate(qk, *position_embeddings)
        query, key, value = qk[:, :hq], qk[:, hq:], qkv[:, hq + hk :]
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
        out, _ = sdpa_attention_forward(
            self.self_attn,
            query,
            key,
            value,
            attention_mask,
            scaling=self.self_attn.scaling,
            sliding_window=self.self_attn.sliding_window,
        )
        return self.o_proj(out.reshape(b, t, hq * d))

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: Any = None,
        position_ids: torch.Tensor | None = None,
        cache: Any = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """(B, T, d) -> (B, T, d); appends this layer's KV rows to `cache` like transformers does."""
        x = rms_norm(hidden_states, self.input_layernorm, self.eps)
        x = self._attention(x, position_embeddings, attention_mask, cache, **kwargs)
        hidden_states = hidden_states + rms_norm(x, self.post_attention_layernorm, self.eps)
        x = rms_norm(hidden_states, self.pre_feedforward_layernorm, self.eps)
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        x = self.down_proj(self.act_fn(gate) * up)
        return hidden_states + rms_norm(x, self.post_feedforward_layernorm, self.eps)


class _AttentionView:
    """The attributes of transformers' Gemma3Attention that its attention functions read."""

    def __init__(self, attn: Any) -> None:
        self.num_key_value_groups = attn.num_key_value_groups
        self.is_causal = attn.is_causal
        self.scaling = attn.scaling
        self.sliding_window = attn.sliding_window
        self.training = False
        self.config = attn.config
        self.layer_idx = attn.layer_idx


def make_lean(model: nn.Module) -> bool:
    """Swap a Gemma3ForCausalLM's decoder layers and final norm for the lean ones, in place.
    Returns whether it did (other models are left alone)."""
    from transformers import Gemma3ForCausalLM

    if type(model) is not Gemma3ForCausalLM:
        return False
    config: Any = model.config
    if config._attn_implementation != "sdpa":
        return False
    body: Any = model.model
    body.layers = nn.ModuleList(LeanGemma3Layer(layer) for layer in body.layers)
    body.norm = LeanRMSNorm(body.norm)
    log.info("lean Gemma 3 layers: fused qkv and gate/up projections, one-op norms (%d layers)", len(body.layers))
    return True
