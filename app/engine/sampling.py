"""Next-token choice for one row of logits: greedy, or temperature / top-k / top-p sampling with
HF-style repetition penalty and a per-request generator (so a ``seed`` reproduces exactly)."""

from __future__ import annotations

from typing import Sequence

import torch

from app.engine.types import SamplingParams


def make_generator(seed: int | None) -> torch.Generator:
    gen = torch.Generator(device="cpu")
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def apply_repetition_penalty(logits: torch.Tensor, seen: Sequence[int], penalty: float) -> torch.Tensor:
    if penalty == 1.0 or not seen:
        return logits
    index = torch.tensor(sorted(set(seen)), device=logits.device)
    picked = logits[index]
    logits = logits.clone()
    logits[index] = torch.where(picked < 0, picked * penalty, picked / penalty)
    return logits


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least the best token).
        remove = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
    return logits


def choose_token(
    logits: torch.Tensor, params: SamplingParams, seen: Sequence[int], generator: torch.Generator
) -> int:
    logits = apply_repetition_penalty(logits.float(), seen, params.repetition_penalty)
    if params.greedy:
        return int(torch.argmax(logits))
    logits = filter_top_k_top_p(logits / params.temperature, params.top_k, params.top_p)
    probs = torch.softmax(logits, dim=-1).cpu()
    return int(torch.multinomial(probs, 1, generator=generator))
