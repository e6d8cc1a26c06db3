"""Executes batches on the device: /score forwards, generate prefill and decode steps.

The decode batch is a left-padded ``DynamicCache`` that sequences join (their prefilled cache is
left-padded to the common length and concatenated) and leave (rows selected away) between
steps. Positions are explicit per sequence, so padding never shifts a sequence's RoPE phase and
a request's output does not depend on its batch mates.
"""

from __future__ import annotations

import gc
import inspect
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from app.engine.sampling import choose_token, make_generator
from app.engine.stopping import StopState
from app.engine.types import GenerateJob, ScoreJob
from app.model.scoring import ScoreItem, per_token_logprobs

log = logging.getLogger(__name__)


class InjectedOOM(RuntimeError):
    """Stands in for ``torch.cuda.OutOfMemoryError`` so the OOM path is testable on CPU."""


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, (torch.cuda.OutOfMemoryError, InjectedOOM)) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


@dataclass
class RunningSequence:
    job: GenerateJob
    stop: StopState
    generator: torch.Generator
    seen: list[int]  # prompt + generated ids, for the repetition penalty
    next_token: int = -1
    first_token_at: float | None = None
    last_token_at: float | None = None
    admitted_at: float = field(default_factory=time.monotonic)


@dataclass
class DecodeBatch:
    seqs: list[RunningSequence] = field(default_factory=list)
    cache: DynamicCache | None = None
    mask: torch.Tensor | None = None  # (B, T) 1 = real token

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def reserved_tokens(self) -> int:
        return sum(s.job.cost_tokens for s in self.seqs)


def _layers_kv(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    if width == 0:
        return t
    pad = [0, 0] * (t.dim() - dim - 1) + [width, 0]
    return F.pad(t, pad)


class ModelRunner:
    def __init__(self, model, tokenizer, *, context_length: int, eos_ids: Sequence[int]):
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.context_length = context_length
        self.eos_ids = frozenset(eos_ids)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        # Tests set this to raise InjectedOOM / RuntimeError at a chosen stage and batch size.
        self.fault_hook: Callable[[str, int], None] | None = None
        # transformers 5.x renamed the forward's cache argument; older releases only know the old name.
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    def _fault(self, stage: str, size: int) -> None:
        if self.fault_hook is not None:
            self.fault_hook(stage, size)

    def free_memory(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def memory_stats(self) -> dict[str, int]:
        if self.device.type == "cuda":
            return {
                "allocated_bytes": torch.cuda.memory_allocated(self.device),
                "reserved_bytes": torch.cuda.memory_reserved(self.device),
            }
        return {}

    # ---------------- /score ----------------
    @torch.inference_mode()
    def score(self, jobs: Sequence[ScoreJob]) -> list[tuple[list[list[float]], list]]:
        """Per job: (per-continuation token log-probs, per-token top alternatives or [])."""
        self._fault("score", len(jobs))
        items = [ScoreItem(j.context_ids, j.continuations) for j in jobs]
        top = max(j.top_logprobs for j in jobs)
        lps, tops = per_token_logprobs(self.model, items, pad_id=self.pad_id, top_k=top)
        return [
            (lp, [[alts[: job.top_logprobs] for alts in cont] for cont in tp] if job.top_logprobs else [])
            for job, lp, tp in zip(jobs, lps, tops)
        ]

    # ---------------- generate ----------------
    def new_sequence(self, job: GenerateJob) -> RunningSequence:
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        stop = StopState(
            decode=decode,
            stop=job.params.stop,
            eos_ids=self.eos_ids,
            max_new_tokens=job.params.max_new_tokens,
            max_total_tokens=self.context_length,
            prompt_tokens=len(job.prompt_ids),
        )
        return RunningSequence(job, stop, make_generator(job.params.seed), list(job.prompt_ids))

    @torch.inference_mode()
    def prefill(self, seqs: Sequence[RunningSequence]) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
        """Run the prompts (left-padded) and return their cache, mask and last-position logits."""
        self._fault("prefill", len(seqs))
        width = max(len(s.job.prompt_ids) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            n = len(s.job.prompt_ids)
            ids[row, width - n:] = torch.tensor(s.job.prompt_ids)
            mask[row, width - n:] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        out = self.model(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device),
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_kw: cache},
        )
        return cache, mask.to(self.device), out.logits[:, -1, :]

    def join(self, batch: DecodeBatch, seqs: Sequence[RunningSequence], cache: DynamicCache, mask: torch.Tensor) -> None:
        if batch.cache is None:
            batch.cache, batch.mask, batch.seqs = cache, mask, list(seqs)
            return
        old_t, new_t = batch.mask.shape[1], mask.shape[1]
        width = max(old_t, new_t)
        merged = []
        for (ko, vo), (kn, vn) in zip(_layers_kv(batch.cache), _layers_kv(cache)):
            merged.append((
                torch.cat([_left_pad(ko, width - old_t, 2), _left_pad(kn, width - new_t, 2)], 0),
                torch.cat([_left_pad(vo, width - old_t, 2), _left_pad(vn, width - new_t, 2)], 0),
            ))
        batch.cache = DynamicCache(ddp_cache_data=merged)
        batch.mask = torch.cat([_left_pad(batch.mask, width - old_t, 1), _left_pad(mask, width - new_t, 1)], 0)
        batch.seqs.extend(seqs)

    def remove(self, batch: DecodeBatch, keep_rows: list[int]) -> None:
        if not keep_rows:
            batch.seqs, batch.cache, batch.mask = [], None, None
            return
        if len(keep_rows) == len(batch.seqs):
            return
        index = torch.tensor(keep_rows, device=self.device)
        batch.seqs = [batch.seqs[i] for i in keep_rows]
        batch.mask = batch.mask.index_select(0, index)
        # Columns that are padding for every remaining row are dead weight in every later step.
        first_live = int((batch.mask.sum(0) > 0).nonzero().min())
        batch.mask = batch.mask[:, first_live:]
        batch.cache = DynamicCache(ddp_cache_data=[
            (k.index_select(0, index)[:, :, first_live:], v.index_select(0, index)[:, :, first_live:])
            for k, v in _layers_kv(batch.cache)
        ])

    @torch.inference_mode()
    def decode_step(self, batch: DecodeBatch) -> torch.Tensor:
        self._fault("decode", len(batch))
        ids = torch.tensor([[s.next_token] for s in batch.seqs], device=self.device)
        positions = batch.mask.sum(-1, keepdim=True)
        batch.mask = torch.cat([batch.mask, torch.ones_like(batch.mask[:, :1])], dim=1)
        try:
            out = self.model(
                input_ids=ids,
                attention_mask=batch.mask,
                position_ids=positions,
                use_cache=True,
                **{self._cache_kw: batch.cache},
            )
        except BaseException:
            # Layers that ran before the failure appended a column: cut back to a consistent cache.
            batch.mask = batch.mask[:, :-1]
            for layer in batch.cache.layers:
                layer.crop(batch.mask.shape[1])
            raise
        return out.logits[:, -1, :]

    def choose(self, seq: RunningSequence, logits: torch.Tensor, greedy_token: int | None = None) -> int:
        """``greedy_token``: the row's argmax computed for the whole batch at once, used when
        nothing (sampling, repetition penalty) can change the pick."""
        params = seq.job.params
        if greedy_token is not None and params.greedy and params.repetition_penalty == 1.0:
            token = greedy_token
        else:
            token = choose_token(logits, params, seq.seen, seq.generator)
        seq.seen.append(token)
        return token
