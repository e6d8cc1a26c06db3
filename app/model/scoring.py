"""Log-likelihood of endings given a context: the one implementation behind /score, evaluation
and the training MC loss.

Tokenization follows lm-evaluation-harness: trailing whitespace of the context moves to the
continuation, the context and context+continuation are tokenized separately, and the
continuation's tokens are the tail of the joint encoding past the context's length.

Scoring packs a context and all its endings into one sequence with a tree-shaped attention mask
(every ending sees the whole context and its own earlier tokens, never a sibling), so the
context is computed once per request instead of once per ending. Several requests are padded
into one batch; padding never leaks into real positions because the mask is explicit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch


def join_for_scoring(context: str, ending: str) -> tuple[str, str]:
    """Return (context, continuation) as lm-eval would feed them.

    One space joins the two unless the context already ends with whitespace or the ending
    starts with it; lm-eval then moves the context's trailing whitespace onto the continuation.
    """
    if context and ending and not context[-1].isspace() and not ending[0].isspace():
        continuation = " " + ending
    else:
        continuation = ending
    stripped = context.rstrip()
    moved = context[len(stripped):]
    return stripped, moved + continuation


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    return ctx, whole[len(ctx):]


@dataclass(frozen=True)
class ScoreItem:
    """One context and the continuations to score against it (all token ids)."""

    context_ids: tuple[int, ...]
    continuations: tuple[tuple[int, ...], ...]

    @property
    def packed_length(self) -> int:
        # The last token of each continuation is only ever a target, never an input.
        return len(self.context_ids) + sum(max(len(c) - 1, 0) for c in self.continuations)

    @property
    def naive_tokens(self) -> int:
        return sum(len(self.context_ids) + len(c) - 1 for c in self.continuations)


def encode_item(tokenizer, context: str, endings: Sequence[str]) -> ScoreItem:
    ctx_ids: list[int] | None = None
    conts = []
    for ending in endings:
        ctx_text, cont_text = join_for_scoring(context, ending)
        ctx, cont = encode_pair(tokenizer, ctx_text, cont_text)
        if ctx_ids is None:
            ctx_ids = ctx
        conts.append(tuple(cont))
    return ScoreItem(tuple(ctx_ids or ()), tuple(conts))


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # (B, L)
    position_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, 1, L, L) bool, True = may attend
    # For every target token: (batch row, input position whose output predicts it, token id)
    target_rows: torch.Tensor
    target_positions: torch.Tensor
    target_ids: torch.Tensor
    # target_owner[k] = (item index, continuation index) for target k, in order
    owners: list[tuple[int, int]]


def pack_items(items: Sequence[ScoreItem], pad_id: int = 0) -> PackedBatch:
    """Lay out each item as ``context | cont_1[:-1] | cont_2[:-1] | ...`` with a tree mask."""
    if not items:
        raise ValueError("nothing to pack")
    for item in items:
        if not item.context_ids:
            raise ValueError("context must encode to at least one token")
    length = max(item.packed_length for item in items)
    batch = len(items)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    position_ids = torch.zeros((batch, length), dtype=torch.long)
    mask = torch.zeros((batch, 1, length, length), dtype=torch.bool)
    rows, positions, targets, owners = [], [], [], []
    for b, item in enumerate(items):
        c = len(item.context_ids)
        input_ids[b, :c] = torch.tensor(item.context_ids)
        position_ids[b, :c] = torch.arange(c)
        mask[b, 0, :c, :c] = torch.tril(torch.ones(c, c, dtype=torch.bool))
        cursor = c
        for k, cont in enumerate(item.continuations):
            inputs = cont[:-1]
            n = len(inputs)
            span = slice(cursor, cursor + n)
            if n:
                input_ids[b, span] = torch.tensor(inputs)
                position_ids[b, span] = torch.arange(c, c + n)
                mask[b, 0, span, :c] = True
                mask[b, 0, span, span] = torch.tril(torch.ones(n, n, dtype=torch.bool))
            for j, token in enumerate(cont):
                rows.append(b)
                positions.append(c - 1 if j == 0 else cursor + j - 1)
                targets.append(token)
                owners.append((b, k))
            cursor += n
        # Padding rows attend only to themselves: a fully masked row would give NaN in SDPA.
        pad = torch.arange(cursor, length)
        mask[b, 0, pad, pad] = True
    return PackedBatch(
        input_ids,
        position_ids,
        mask,
        torch.tensor(rows, dtype=torch.long),
        torch.tensor(positions, dtype=torch.long),
        torch.tensor(targets, dtype=torch.long),
        owners,
    )


def _hidden_then_head(model, input_ids, position_ids, attention_mask, rows, positions):
    """Run the decoder, then the LM head only where a target needs it (saves the B*L*V logits)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if decoder is not None and head is not None:
        hidden = decoder(
            input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state
        return head(hidden[rows, positions]).float()
    logits = model(
        input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False
    ).logits
    return logits[rows, positions].float()


def _target_logprobs(model, items: Sequence[ScoreItem], pad_id: int):
    device = next(model.parameters()).device
    packed = pack_items(items, pad_id)
    logits = _hidden_then_head(
        model,
        packed.input_ids.to(device),
        packed.position_ids.to(device),
        packed.attention_mask.to(device),
        packed.target_rows.to(device),
        packed.target_positions.to(device),
    )
    logprobs = torch.log_softmax(logits, dim=-1)
    picked = logprobs.gather(1, packed.target_ids.to(device)[:, None]).squeeze(1)
    return packed, logprobs, picked


def continuation_logprob_tensors(model, items: Sequence[ScoreItem], pad_id: int = 0) -> list[torch.Tensor]:
    """Differentiable: per item, a 1-D tensor of summed log-probs, one per continuation."""
    packed, _, picked = _target_logprobs(model, items, pad_id)
    offsets = [0]
    for item in items:
        offsets.append(offsets[-1] + len(item.continuations))
    owner_index = torch.tensor([offsets[b] + k for b, k in packed.owners], device=picked.device)
    sums = torch.zeros(offsets[-1], dtype=picked.dtype, device=picked.device).index_add(0, owner_index, picked)
    return [sums[offsets[i] : offsets[i + 1]] for i in range(len(items))]


def per_token_logprobs(model, items: Sequence[ScoreItem], pad_id: int = 0, top_k: int = 0):
    """Per-token log-probs: ``lps[item][cont] = [lp, ...]``; with ``top_k`` also
    ``tops[item][cont][token] = [(token_id, lp), ...]`` (the k likeliest at that position)."""
    packed, logprobs, picked = _target_logprobs(model, items, pad_id)
    lps: list[list[list[float]]] = [[[] for _ in item.continuations] for item in items]
    tops: list[list[list[list[tuple[int, float]]]]] = [[[] for _ in item.continuations] for item in items]
    top_values = top_ids = None
    if top_k:
        top_values, top_ids = torch.topk(logprobs, top_k, dim=-1)
        top_values, top_ids = top_values.tolist(), top_ids.tolist()
    for n, (value, (b, k)) in enumerate(zip(picked.tolist(), packed.owners)):
        lps[b][k].append(value)
        if top_k:
            tops[b][k].append(list(zip(top_ids[n], top_values[n])))
    return lps, tops


@torch.no_grad()
def score_items(model, items: Sequence[ScoreItem], pad_id: int = 0) -> list[list[float]]:
    return [t.tolist() for t in continuation_logprob_tensors(model, items, pad_id)]


@torch.no_grad()
def reference_logprob(model, context_ids: Sequence[int], continuation_ids: Sequence[int]) -> float:
    """Independent full-sequence computation: the correctness yardstick (and the naive baseline)."""
    device = next(model.parameters()).device
    ids = torch.tensor([list(context_ids) + list(continuation_ids)], device=device)
    logprobs = torch.log_softmax(model(ids).logits.float(), dim=-1)[0]
    start = len(context_ids)
    targets = ids[0, start:]
    return logprobs[start - 1 : ids.shape[1] - 1].gather(1, targets[:, None]).sum().item()


def normalize(logprobs: Sequence[float], endings: Sequence[str]) -> list[float]:
    """lm-eval acc_norm: divide by the number of characters of the ending as sent."""
    return [lp / max(len(e), 1) for lp, e in zip(logprobs, endings)]


def softmax(values: Sequence[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: values[i])
