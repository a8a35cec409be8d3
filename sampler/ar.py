"""The autoregressive baseline: prefill, then one token per forward for every sequence.

Every speed claim of the other samplers is a ratio against this sampler on the same weights
in the same run, so it is kept plain and fast: newcomers prefill alone (batch 1, last
logits only), then all running sequences decode together in ONE batched forward per step
over a shared left-padded KV cache (sampler/runtime/kv_batch.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sampler.logits import sample_tokens
from sampler.runtime.kv_batch import KVBatch
from sampler.sequence import check_prompt, commit_token, resolve_seed
from sampler.types import SamplingParams, StepEvent


@dataclass
class _Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    generated: list[int] = field(default_factory=list)
    prefilled: bool = False

    @property
    def next_position(self) -> int:
        return len(self.prompt_ids) + len(self.generated)


def sample_rows(logits: torch.Tensor, seqs: list[_Sequence]) -> list[int]:
    """One token per row of (B, V) `logits`, each with its own sequence's parameters."""
    tokens = [0] * len(seqs)
    greedy = [i for i, s in enumerate(seqs) if s.params.greedy]
    if greedy:
        # Indexing copies (B, V) logits (10 ms for 16 rows of Gemma's 262144): skip it when all are greedy.
        picked = (logits if len(greedy) == len(seqs) else logits[greedy]).argmax(dim=-1).tolist()
        for i, token in zip(greedy, picked, strict=True):
            tokens[i] = token
    for i, seq in enumerate(seqs):
        if not seq.params.greedy:
            p = seq.params
            tokens[i] = int(
                sample_tokens(
                    logits[i : i + 1],
                    [seq.next_position],
                    temperature=p.temperature,
                    top_k=p.top_k,
                    top_p=p.top_p,
                    seed=seq.seed,
                )[0]
            )
    return tokens


class ARSampler:
    """One token per forward per sequence; all running sequences share each forward."""

    name = "ar"

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.model = model
        self.device = device
        self._seqs: dict[str, _Sequence] = {}
        self._batch = KVBatch()

    @property
    def num_active(self) -> int:
        return len(self._seqs)

    def add(self, seq_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        check_prompt(prompt_ids)
        self._seqs[seq_id] = _Sequence(list(prompt_ids), params, resolve_seed(params))

    def cancel(self, seq_id: str) -> None:
        if self._seqs.pop(seq_id, None) is not None:
            self._batch.remove({seq_id})

    @torch.inference_mode()
    def _prefill(self, seq_id: str, seq: _Sequence) -> torch.Tensor:
        """Batch-1 forward over the prompt; the cache joins the batch. Returns logits (V,)."""
        out = self.model(input_ids=torch.tensor([seq.prompt_ids], device=self.device), use_cache=True, logits_to_keep=1)
        self._batch.join(seq_id, out.cache, len(seq.prompt_ids))
        seq.prefilled = True
        return out.logits[0, -1]

    @torch.inference_mode()
    def _decode(self) -> torch.Tensor:
        """One forward over each batch row's newest token. Returns logits (B, V)."""
        batch = self._batch
        last = [[self._seqs[s].generated[-1]] for s in batch.seq_ids]
        positions = [[r] for r in batch.lengths]
        mask = batch.mask_for_step()
        # Without padding the model's own causal mask is the same and cheaper to build.
        out = self.model(
            input_ids=torch.tensor(last, device=self.device),
            attention_mask=mask if batch.has_padding else None,
            position_ids=torch.tensor(positions, device=self.device),
            cache=batch.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        batch.advance(mask)
        return out.logits[:, -1]

    def step(self) -> dict[str, StepEvent]:
        events: dict[str, StepEvent] = {}
        # Rows already in the batch decode together; newcomers prefill (and join) after,
        # so every sequence gets exactly one new token per step.
        rows = list(self._batch.seq_ids)
        if rows:
            logits = self._decode()
            seqs = [self._seqs[s] for s in rows]
            for seq_id, seq, token in zip(rows, seqs, sample_rows(logits, seqs), strict=True):
                events[seq_id] = commit_token(seq.generated, token, seq.params)
        for seq_id, seq in list(self._seqs.items()):
            if not seq.prefilled:
                logits = self._prefill(seq_id, seq)
                events[seq_id] = commit_token(seq.generated, sample_rows(logits[None], [seq])[0], seq.params)
        finished = {s for s, e in events.items() if e.finish_reason is not None}
        for seq_id in finished:
            del self._seqs[seq_id]
        self._batch.remove(finished)
        for event in events.values():
            event.forward_passes = 1
        return events
