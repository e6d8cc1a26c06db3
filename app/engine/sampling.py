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
        probs = torch.softmax(sorted_logits, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least the best token).
        remove = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
    return logits


# Below this, dividing by the temperature overflows float32; the limit of sampling as T -> 0 is
# greedy decoding anyway.
MIN_SAMPLING_TEMPERATURE = 1e-4


def _finite(logits: torch.Tensor) -> torch.Tensor:
    """Extreme penalties or temperatures can overflow: keep the ranking, drop the infinities."""
    return torch.nan_to_num(logits, nan=float("-inf"), posinf=torch.finfo(torch.float32).max)


def choose_token(
    logits: torch.Tensor, params: SamplingParams, seen: Sequence[int], generator: torch.Generator
) -> int:
    logits = _finite(apply_repetition_penalty(logits.float(), seen, params.repetition_penalty))
    if params.greedy or params.temperature < MIN_SAMPLING_TEMPERATURE:
        return int(torch.argmax(logits))
    scaled = _finite(logits / params.temperature)
    filtered = filter_top_k_top_p(scaled, params.top_k, params.top_p)
    probs = torch.softmax(filtered.double(), dim=-1)
    if not torch.isfinite(probs).all() or probs.sum() <= 0:
        return int(torch.argmax(logits))
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))
