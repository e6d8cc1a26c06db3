"""How /score computes: each ending as its own padded sequence (naive) vs the context packed once
with all endings under a tree-shaped attention mask (what the engine does). Same examples, same
process, one after the other; also the largest |log-prob difference| against the independent
full-sequence reference.

    .venv/bin/python -m bench.score_strategies --examples 48 --batch 8
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from app.data.hellaswag import load_examples
from app.model.scoring import ScoreItem, encode_item, reference_logprob, score_items
from app.model_store import load_model, resolve_model

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def naive_batched(model, items: list[ScoreItem], pad_id: int) -> list[list[float]]:
    """Every (context, ending) pair as a separate right-padded row of one batch: no sharing."""
    rows = [(i, k, list(it.context_ids) + list(c), len(it.context_ids)) for i, it in enumerate(items) for k, c in enumerate(it.continuations)]
    width = max(len(r[2]) for r in rows)
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, (_, _, seq, _) in enumerate(rows):
        ids[j, : len(seq)] = torch.tensor(seq)
        mask[j, : len(seq)] = 1
    logprobs = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
    out = [[0.0] * len(it.continuations) for it in items]
    for j, (i, k, seq, ctx) in enumerate(rows):
        targets = torch.tensor(seq[ctx:])
        out[i][k] = logprobs[j, ctx - 1 : len(seq) - 1].gather(1, targets[:, None]).sum().item()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--examples", type=int, default=48)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "score_strategies.json")
    args = p.parse_args(argv)
    store = ROOT / "model_store"
    loaded = load_model(resolve_model("smollm2-135m-instruct", store), store_dir=store, device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    held = load_examples(ROOT / "data" / "hellaswag-validation", "held_out")
    examples = random.Random(3).sample(held, args.examples)
    items = [encode_item(tok, ex.context, ex.endings) for ex in examples]
    pad = tok.pad_token_id
    results = {}
    for name, fn in (("naive", naive_batched), ("packed", score_items)):
        fn(model, items[: args.batch], pad)  # warm-up
        t0 = time.perf_counter()
        scores = []
        for s in range(0, len(items), args.batch):
            scores += fn(model, items[s : s + args.batch], pad)
        secs = time.perf_counter() - t0
        results[name] = {"examples_per_s": len(items) / secs, "scores": scores}
    worst = 0.0
    for item, got in zip(items[:12], results["packed"]["scores"][:12]):
        for cont, lp in zip(item.continuations, got):
            worst = max(worst, abs(lp - reference_logprob(model, item.context_ids, cont)))
    packed_tokens = sum(it.packed_length for it in items)
    naive_tokens = sum(it.naive_tokens for it in items)
    summary = {
        "examples": len(items), "batch": args.batch,
        "naive_examples_per_s": results["naive"]["examples_per_s"],
        "packed_examples_per_s": results["packed"]["examples_per_s"],
        "speedup": results["packed"]["examples_per_s"] / results["naive"]["examples_per_s"],
        "max_abs_logprob_diff_vs_reference": worst,
        "tokens_naive": naive_tokens, "tokens_packed": packed_tokens, "token_saving": 1 - packed_tokens / naive_tokens,
        "same_choices": [max(range(4), key=r.__getitem__) for r in results["naive"]["scores"]]
        == [max(range(4), key=r.__getitem__) for r in results["packed"]["scores"]],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
