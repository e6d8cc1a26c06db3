"""Training losses, built on the one implementation of "log-likelihood of an ending"
(``app.model.scoring``) that /score and evaluation use.

* ``mc``: softmax cross-entropy over the endings' length-normalized log-likelihoods: exactly
  the quantity /score ranks by, so training moves the served pick. Optionally plus the LM loss
  on the gold ending (``lm_weight``).
* ``lm``: token-level NLL of context + gold ending with the context masked out (the seed trained
  on every ending, wrong ones included, which teaches the wrong answers).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from app.data.hellaswag import Example
from app.model.scoring import ScoreItem, continuation_logprob_tensors, encode_item


def encode_examples(tokenizer, examples: Sequence[Example]) -> list[ScoreItem]:
    return [encode_item(tokenizer, ex.context, ex.endings) for ex in examples]


def mc_loss(model, items: Sequence[ScoreItem], examples: Sequence[Example], pad_id: int, lm_weight: float = 0.0,
            temperature: float = 1.0) -> torch.Tensor:
    """``temperature`` < 1 sharpens the softmax: per-character log-prob gaps between endings are
    small (tenths of a nat), so at 1.0 the loss can only fall by inflating every log-prob's
    magnitude, which wrecks the LM (seen: gold-ending loss 3.0 -> 5.5 at lr 3e-4)."""
    sums = continuation_logprob_tensors(model, items, pad_id=pad_id)
    losses = []
    for item, ex, lp in zip(items, examples, sums):
        lengths = torch.tensor([max(len(e), 1) for e in ex.endings], dtype=lp.dtype, device=lp.device)
        logits = lp / lengths / temperature  # the acc_norm score /score picks by
        loss = F.cross_entropy(logits[None], torch.tensor([ex.label], device=lp.device))
        if lm_weight:
            loss = loss + lm_weight * (-lp[ex.label] / len(item.continuations[ex.label]))
        losses.append(loss)
    return torch.stack(losses).mean()


def lm_loss(model, items: Sequence[ScoreItem], examples: Sequence[Example], pad_id: int) -> torch.Tensor:
    gold_items = [ScoreItem(it.context_ids, (it.continuations[ex.label],)) for it, ex in zip(items, examples)]
    sums = continuation_logprob_tensors(model, gold_items, pad_id=pad_id)
    total = torch.stack([s[0] for s in sums]).sum()
    tokens = sum(len(it.continuations[0]) for it in gold_items)
    return -total / tokens


def compute_loss(objective: str, model, items, examples, pad_id: int, lm_weight: float = 0.0,
                 temperature: float = 1.0) -> torch.Tensor:
    if objective == "mc":
        return mc_loss(model, items, examples, pad_id, lm_weight, temperature)
    if objective == "lm":
        return lm_loss(model, items, examples, pad_id)
    raise ValueError(f"unknown objective {objective!r}")
