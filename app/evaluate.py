"""Held-out HellaSwag evaluation, and base-vs-fine-tuned comparison with a paired test.

Scores every ending with the same shared-context code the server uses (``app.model.scoring``),
so the numbers here are the numbers /score would give. Metrics follow lm-evaluation-harness:
acc (argmax of summed log-prob), acc_norm (argmax of log-prob / characters of the ending,
leading space included), plus the gold ending's mean token loss and perplexity.

    python -m app.evaluate                                   # served default, full held-out split
    python -m app.evaluate --model smollm2-135m-instruct --limit 200
    python -m app.evaluate --compare smollm2-135m-instruct my-finetune   # writes docs/results.md
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from app.data.hellaswag import Example, default_dataset_dir, fixed_sample, load_examples, split_fingerprint
from app.model.scoring import argmax, encode_item, normalize, score_items


@dataclass
class Record:
    row: int
    label: int
    pred: int
    pred_norm: int
    gold_logprob: float
    gold_tokens: int
    split_type: str
    source: str

    @property
    def correct(self) -> bool:
        return self.pred == self.label

    @property
    def correct_norm(self) -> bool:
        return self.pred_norm == self.label


@torch.no_grad()
def score_examples(model, tokenizer, examples: Sequence[Example], batch_size: int = 8, progress: bool = True) -> tuple[list[Record], float]:
    """Score all endings of every example; returns records (in input order) and seconds taken."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = [encode_item(tokenizer, ex.context, ex.endings) for ex in examples]
    # Length-sorted batches waste little on padding.
    order = sorted(range(len(examples)), key=lambda i: encoded[i].packed_length)
    results: dict[int, list[float]] = {}
    t0 = time.perf_counter()
    bar = tqdm(total=len(examples), desc="evaluate", unit="ex", disable=not progress)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        for i, lps in zip(idx, score_items(model, [encoded[i] for i in idx], pad_id=pad)):
            results[i] = lps
        bar.update(len(idx))
    bar.close()
    seconds = time.perf_counter() - t0
    records = []
    for i, ex in enumerate(examples):
        lps = results[i]
        records.append(Record(
            row=ex.row, label=ex.label, pred=argmax(lps), pred_norm=argmax(normalize(lps, ex.endings)),
            gold_logprob=lps[ex.label], gold_tokens=len(encoded[i].continuations[ex.label]),
            split_type=ex.split_type, source=ex.source,
        ))
    return records, seconds


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (0.0, 0.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (centre - half, centre + half)


def summarize(records: Sequence[Record], seconds: float | None = None) -> dict:
    n = len(records)
    if n == 0:
        return {"n": 0}
    acc = sum(r.correct for r in records)
    acc_norm = sum(r.correct_norm for r in records)
    per_ex_loss = [-r.gold_logprob / r.gold_tokens for r in records]
    tokens = sum(r.gold_tokens for r in records)
    loss = -sum(r.gold_logprob for r in records) / tokens  # token-weighted, as perplexity is defined
    mean = sum(per_ex_loss) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in per_ex_loss) / max(n - 1, 1))
    half = 1.96 * sd / math.sqrt(n)
    out = {
        "n": n,
        "acc": acc / n,
        "acc_ci95": wilson_interval(acc, n),
        "acc_norm": acc_norm / n,
        "acc_norm_ci95": wilson_interval(acc_norm, n),
        "gold_loss": loss,
        "gold_loss_ci95": (loss - half, loss + half),
        "gold_perplexity": math.exp(loss),
        "gold_perplexity_ci95": (math.exp(loss - half), math.exp(loss + half)),
    }
    if seconds:
        out["examples_per_s"] = n / seconds
    return out


def breakdown(records: Sequence[Record]) -> dict:
    out = {}
    for field in ("split_type", "source"):
        for value in sorted({getattr(r, field) for r in records}):
            subset = [r for r in records if getattr(r, field) == value]
            s = summarize(subset)
            out[f"{field}={value}"] = {k: s[k] for k in ("n", "acc", "acc_norm", "acc_norm_ci95", "gold_loss")}
    return out


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> dict:
    """Exact (binomial) McNemar test on paired correctness."""
    only_a = sum(x and not y for x, y in zip(a, b))
    only_b = sum(y and not x for x, y in zip(a, b))
    n = only_a + only_b
    if n == 0:
        return {"only_base": 0, "only_finetuned": 0, "p_value": 1.0}
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return {"only_base": only_a, "only_finetuned": only_b, "p_value": min(1.0, 2 * tail)}


def load_eval_examples(data: str | None, data_dir: Path, split: str, limit: int | None, seed: int = 0) -> list[Example]:
    if data:
        examples = load_examples(data, "all")
    else:
        examples = load_examples(default_dataset_dir(data_dir), split)  # type: ignore[arg-type]
    return fixed_sample(examples, limit, seed)


def evaluate(model_spec: str | None, examples: Sequence[Example], settings, batch_size: int, progress: bool = True) -> dict:
    from app.model_store import load_model, resolve_model

    entry = resolve_model(model_spec, settings.model_store_dir)
    loaded = load_model(entry, store_dir=settings.model_store_dir, device=settings.device, dtype=settings.dtype,
                        quantization=settings.quantization, trust_remote_code=settings.trust_remote_code)
    records, seconds = score_examples(loaded.model, loaded.tokenizer, examples, batch_size, progress)
    return {
        "model": entry.name,
        "kind": entry.kind,
        "device": loaded.device,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "quantization": loaded.quantization,
        "examples_fingerprint": split_fingerprint(list(examples)),
        "overall": summarize(records, seconds),
        "breakdown": breakdown(records),
        "records": [asdict(r) for r in records],
    }


def learning_curve_md(run_dir: Path, base: dict, tuned: dict) -> str:
    """Held-out acc_norm on the training run's fixed subset after 0 / ... / all training examples.

    The 0 and final points are read off the full held-out reports (the subset is part of them),
    so the curve costs no extra scoring."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    report = json.loads((run_dir / "report.json").read_text())
    cfg = report["config"]
    held = load_examples(default_dataset_dir(Path(cfg.get("data_dir") or "data")), "held_out")
    subset = {e.row for e in fixed_sample(held, cfg.get("eval_examples"))}

    def subset_acc(rep: dict) -> float:
        recs = [r for r in rep["records"] if r["row"] in subset]
        return sum(r["pred_norm"] == r["label"] for r in recs) / len(recs)

    points = [(0, subset_acc(base))]
    points += [(r["examples_seen"], r["acc_norm"]) for r in rows if r.get("type") == "eval" and r["examples_seen"] > 0]
    final_seen = report["plan"]["total_steps"] * report["plan"]["global_batch"]
    if all(seen != final_seen for seen, _ in points):
        points.append((final_seen, subset_acc(tuned)))
    train_rows = [r for r in rows if r.get("type") == "train"]
    speed = sum(r["examples_per_s"] for r in train_rows) / len(train_rows) if train_rows else 0
    lines = [
        "## Learning curve",
        "",
        f"Held-out acc_norm on a fixed {len(subset)}-row subset of the held-out split after N training examples "
        f"(run `{run_dir}`; training throughput {speed:.2f} examples/s on this machine).",
        "",
        "| training examples | acc_norm % |",
        "|---|---|",
    ]
    lines += [f"| {seen} | {100 * acc:.1f} |" for seen, acc in sorted(points)]
    cmd = (run_dir / "COMMAND").read_text().strip() if (run_dir / "COMMAND").exists() else json.dumps(cfg)
    lines += ["", "Reproduce the fine-tuned model:", "", "```bash", cmd, "```"]
    return "\n".join(lines)


def _fmt_ci(lo_hi) -> str:
    return f"[{100 * lo_hi[0]:.1f}, {100 * lo_hi[1]:.1f}]"


def write_comparison(base: dict, tuned: dict, out_md: Path, out_png: Path | None, extra_md: str = "") -> dict:
    a = [r["pred_norm"] == r["label"] for r in base["records"]]
    b = [r["pred_norm"] == r["label"] for r in tuned["records"]]
    test = mcnemar(a, b)
    lines = [
        "# Held-out HellaSwag results",
        "",
        f"{base['overall']['n']} held-out rows (grouped split, see README), identical for both models "
        f"(fingerprint `{base['examples_fingerprint']}`). Intervals are 95% (Wilson for accuracies).",
        "",
        "| model | kind | acc % | acc_norm % | acc_norm 95% CI | gold loss | gold ppl | examples/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rep in (base, tuned):
        o = rep["overall"]
        lines.append(
            f"| {rep['model']} | {rep['kind']} | {100 * o['acc']:.1f} | {100 * o['acc_norm']:.1f} | {_fmt_ci(o['acc_norm_ci95'])} "
            f"| {o['gold_loss']:.3f} | {o['gold_perplexity']:.2f} | {o.get('examples_per_s', 0):.2f} |"
        )
    delta = tuned["overall"]["acc_norm"] - base["overall"]["acc_norm"]
    lines += [
        "",
        f"acc_norm delta: {100 * delta:+.1f} points; McNemar exact test: only base right {test['only_base']}, "
        f"only fine-tuned right {test['only_finetuned']}, p = {test['p_value']:.3g}.",
        "",
        "## Breakdown (acc_norm %)",
        "",
        "| slice | n | base | fine-tuned |",
        "|---|---|---|---|",
    ]
    for key in base["breakdown"]:
        lines.append(f"| {key} | {base['breakdown'][key]['n']} | {100 * base['breakdown'][key]['acc_norm']:.1f} | {100 * tuned['breakdown'][key]['acc_norm']:.1f} |")
    lines += ["", "Published reference points (different eval sets and harness settings, for orientation only): "
              "MobileLLM-125M 38.9 zero-shot; SmolLM2-135M 42.1, SmolLM2-135M-Instruct 40.9; the seed's claimed 62.8 fine-tuned.", ""]
    if extra_md:
        lines += [extra_md, ""]
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text("\n".join(lines))
    if out_png is not None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(6, 4))
            names = [base["model"], tuned["model"]]
            for offset, metric in ((-0.2, "acc"), (0.2, "acc_norm")):
                vals = [100 * rep["overall"][metric] for rep in (base, tuned)]
                errs = [[100 * (rep["overall"][metric] - rep["overall"][metric + "_ci95"][0]) for rep in (base, tuned)],
                        [100 * (rep["overall"][metric + "_ci95"][1] - rep["overall"][metric]) for rep in (base, tuned)]]
                ax.bar([i + offset for i in range(2)], vals, width=0.4, yerr=errs, capsize=4, label=metric)
            ax.axhline(25, color="grey", linestyle=":", label="chance")
            ax.set_xticks(range(2), names)
            ax.set_ylabel("held-out accuracy %")
            ax.legend()
            fig.tight_layout()
            fig.savefig(out_png, dpi=120)
            plt.close(fig)
        except ImportError:
            pass
    return test


def main(argv: list[str] | None = None) -> int:
    from app.config import Settings

    settings = Settings()
    p = argparse.ArgumentParser(description="Evaluate models on held-out HellaSwag")
    p.add_argument("--model", help="model-store name, path or hub id (default: what the server would serve)")
    p.add_argument("--compare", nargs=2, metavar=("BASE", "FINETUNED"))
    p.add_argument("--compare-reports", nargs=2, type=Path, metavar=("BASE.json", "FINETUNED.json"),
                   help="write the comparison from two saved --out reports (same examples) without rescoring")
    p.add_argument("--training-run", type=Path, help="a training output_dir: adds its learning curve to the comparison")
    p.add_argument("--notes", type=Path, help="a Markdown file appended to the comparison page")
    p.add_argument("--data", help="a rowanz-format JSONL file (default: the embedded held-out split)")
    p.add_argument("--split", default="held_out", choices=["held_out", "train", "all"])
    p.add_argument("--limit", type=int, help="random subset of N examples (fixed seed)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", type=Path, help="write the JSON report here")
    p.add_argument("--results-md", type=Path, default=Path("docs/results.md"))
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    if args.compare_reports:
        reports = [json.loads(path.read_text()) for path in args.compare_reports]
        if reports[0]["examples_fingerprint"] != reports[1]["examples_fingerprint"]:
            p.error("the two reports were computed on different examples")
        extra = learning_curve_md(args.training_run, reports[0], reports[1]) if args.training_run else ""
        if args.notes:
            extra += "\n\n" + args.notes.read_text()
        test = write_comparison(reports[0], reports[1], args.results_md, args.results_md.with_suffix(".png"), extra)
        json.dump({"base": reports[0]["overall"], "finetuned": reports[1]["overall"], "mcnemar": test}, sys.stdout, indent=2)
        print()
        return 0
    examples = load_eval_examples(args.data, settings.data_dir, args.split, args.limit)
    if args.compare:
        reports = [evaluate(m, examples, settings, args.batch_size, not args.quiet) for m in args.compare]
        test = write_comparison(reports[0], reports[1], args.results_md, args.results_md.with_suffix(".png"))
        summary = {"base": reports[0]["overall"], "finetuned": reports[1]["overall"], "mcnemar": test}
        if args.out:
            args.out.write_text(json.dumps({"reports": reports, "mcnemar": test}, indent=1))
    else:
        report = evaluate(args.model, examples, settings, args.batch_size, not args.quiet)
        summary = {"model": report["model"], **report["overall"], "breakdown": report["breakdown"]}
        if args.out:
            args.out.write_text(json.dumps(report, indent=1))
    json.dump(summary, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
