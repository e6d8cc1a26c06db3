"""Fine-tune a causal LM on HellaSwag with Hugging Face Accelerate; export into the model store.

Runs the same on one CPU, one GPU or many processes (data-parallel, same global batch):

    # CPU, cheap: LoRA on the top layers, MC objective, 1 hour budget
    python -m app.training.train --lora 16 --freeze-layers 20 --lr 2e-4 --batch-size 8 \
        --max-train-examples 1600 --epochs 1 --output_dir runs/lora-cpu
    # the seed's flags verbatim (full fine-tune, lr 1e-5, 3 epochs, batch 16; bf16 on GPU)
    python -m app.training.train --dataset hellaswag --model facebook/MobileLLM-125M --output_dir ./fine_tuned_model
    # several processes, data-parallel with the same global batch (torchrun-based launcher;
    # gloo on a CPU-only host, NCCL on GPUs)
    accelerate launch --multi_gpu --num_processes 2 -m app.training.train --batch-size 8 ...
    # continue after a crash / kill -9 from the last complete checkpoint
    python -m app.training.train ... --resume

Writes into ``--output_dir``: ``checkpoints/step-N`` (model, optimizer, scheduler, RNG states,
step, data position, config; each published by renaming a finished temp folder), ``metrics.jsonl``,
``curves.png`` and ``report.json``; and exports the final model as a model-store entry
(``--export-name``) with a manifest marking it fine-tuned.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from app.data.hellaswag import Example, default_dataset_dir, fixed_sample, load_examples, split_examples, split_fingerprint
from app.training.objectives import compute_loss, encode_examples

CHECKPOINT_STATE = "trainer_state.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Fine-tune on HellaSwag (Accelerate)")
    p.add_argument("--dataset", default="hellaswag", help="'hellaswag' (embedded split), an arrow folder, or a hub name")
    p.add_argument("--model", default=None, help="model-store name, local path or hub id (default: the embedded base)")
    p.add_argument("--output_dir", "--output-dir", dest="output_dir", type=Path, default=Path("runs/finetune"))
    p.add_argument("--train-file", type=Path, help="rowanz-format JSONL for training (e.g. hellaswag_train.jsonl)")
    p.add_argument("--eval-file", type=Path, help="rowanz-format JSONL for evaluation")
    p.add_argument("--export-name", help="model-store entry to write (default: derived from the run)")
    p.add_argument("--model-store", type=Path, default=None)
    p.add_argument("--data-dir", type=Path, default=None)
    # optimisation (seed defaults)
    p.add_argument("--lr", "--learning_rate", dest="lr", type=float, default=1e-5)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup-ratio", type=float, default=0.06)
    p.add_argument("--epochs", "--num_train_epochs", dest="epochs", type=float, default=3)
    p.add_argument("--batch-size", "--per_device_train_batch_size", dest="batch_size", type=int, default=16)
    p.add_argument("--grad-accum", "--gradient_accumulation_steps", dest="grad_accum", type=int, default=1)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--max-train-examples", type=int, default=None)
    p.add_argument("--seed", type=int, default=42)
    # what to train
    p.add_argument("--objective", choices=["mc", "lm"], default="mc")
    p.add_argument("--lm-weight", type=float, default=0.0, help="mc only: add this x LM loss on the gold ending")
    p.add_argument("--mc-temperature", type=float, default=1.0,
                   help="mc only: softmax temperature over the length-normalized log-likelihoods")
    p.add_argument("--lora", type=int, default=0, metavar="R", help="LoRA rank (0 = full fine-tune)")
    p.add_argument("--lora-alpha", type=float, default=None)
    p.add_argument("--merge-lora", action="store_true", help="export merged full weights instead of the adapter")
    p.add_argument("--freeze-layers", type=int, default=0, help="freeze embeddings and the lowest N decoder layers")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--mixed-precision", choices=["auto", "no", "bf16", "fp16"], default="auto")
    # bookkeeping
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N optimizer steps")
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--eval-examples", type=int, default=500, help="fixed held-out subset for the learning curve")
    p.add_argument("--eval-at", default="0,250,500,1000,2000,4000,8000,16000",
                   help="training examples seen at which to evaluate (plus the end)")
    p.add_argument("--no-eval", action="store_true")
    p.add_argument("--skip-final-eval", action="store_true",
                   help="no subset eval at the end (when a full held-out evaluation follows anyway)")
    p.add_argument("--no-export", action="store_true")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


@dataclass
class Plan:
    global_batch: int
    steps_per_epoch: int
    total_steps: int


def make_plan(n_examples: int, args, world: int) -> Plan:
    global_batch = args.batch_size * world * args.grad_accum
    steps_per_epoch = max(n_examples // global_batch, 1)
    total = math.ceil(steps_per_epoch * args.epochs)
    if args.max_steps is not None:
        total = min(total, args.max_steps) if args.epochs else args.max_steps
    return Plan(global_batch, steps_per_epoch, max(total, 1))


@functools.lru_cache(maxsize=2)
def epoch_order(seed: int, n: int) -> tuple[int, ...]:
    """The epoch's shuffle, computed once per epoch instead of once per micro-batch."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return tuple(order)


def batch_for(step: int, micro: int, rank: int, world: int, args, plan: Plan, n: int) -> list[int]:
    """Indices of the examples this process trains on at (step, micro). Depends only on the
    seed, the step and the global batch: the data position is the step, so resume and any
    process count see the same global batches."""
    epoch, within = divmod(step, plan.steps_per_epoch)
    order = epoch_order(args.seed + epoch, n)
    start = within * plan.global_batch + micro * args.batch_size * world
    global_micro = order[start : start + args.batch_size * world]
    return global_micro[rank::world]


def _checkpoint_step(path: Path) -> int:
    return int(path.name.split("-")[1])


def latest_checkpoint(output_dir: Path) -> Path | None:
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return None
    complete = [p for p in root.iterdir() if p.name.startswith("step-") and (p / CHECKPOINT_STATE).exists()]
    return max(complete, key=_checkpoint_step, default=None)


def build_model(args, store_dir: Path, trust_remote_code: bool = False):
    from app.model_store import load_model, resolve_model

    entry = resolve_model(args.model, store_dir) if args.model else resolve_model_base(store_dir)
    loaded = load_model(entry, store_dir=store_dir, device="cpu", dtype="float32", trust_remote_code=trust_remote_code)
    model, tokenizer = loaded.model, loaded.tokenizer
    model.requires_grad_(True)
    layers = model.model.layers if hasattr(model, "model") and hasattr(model.model, "layers") else None
    if args.lora:
        from peft import LoraConfig, get_peft_model

        n_layers = len(layers) if layers is not None else None
        config = LoraConfig(
            r=args.lora, lora_alpha=args.lora_alpha or 2 * args.lora, lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            layers_to_transform=list(range(args.freeze_layers, n_layers)) if (args.freeze_layers and n_layers) else None,
        )
        model = get_peft_model(model, config)
    elif args.freeze_layers:
        model.get_input_embeddings().requires_grad_(False)
        for layer in layers[: args.freeze_layers]:
            layer.requires_grad_(False)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    model.train()
    return model, tokenizer, entry


def resolve_model_base(store_dir: Path):
    from app.assets import BASE_MODEL_NAME
    from app.model_store import list_models, resolve_model

    names = [e.name for e in list_models(store_dir) if e.kind == "base"]
    return resolve_model(BASE_MODEL_NAME if BASE_MODEL_NAME in names else (names[0] if names else None), store_dir)


def _part(args, data_dir: Path, own_file: Path | None, part: str) -> list[Example]:
    """A JSONL file given for this part wins; else that part of the grouped split."""
    if own_file:
        return load_examples(own_file, "all")
    source = default_dataset_dir(data_dir) if args.dataset in ("hellaswag", "embedded") else args.dataset
    return split_examples(load_examples(source, "all"), part)  # type: ignore[arg-type]


def load_train_eval(args, data_dir: Path) -> tuple[list[Example], list[Example]]:
    train = _part(args, data_dir, args.train_file, "train")
    held = _part(args, data_dir, args.eval_file, "held_out")
    if args.max_train_examples is not None and args.max_train_examples < len(train):
        train = random.Random(args.seed).sample(train, args.max_train_examples)
    return train, fixed_sample(held, args.eval_examples)


def atomic_save(accelerator, target: Path, state: dict) -> None:
    """All ranks write into a temp folder; the main rank renames it into place when complete."""
    tmp = target.parent / f".tmp-{target.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / CHECKPOINT_STATE).write_text(json.dumps(state, indent=1))  # written last: the marker
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    accelerator.wait_for_everyone()


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    root = output_dir / "checkpoints"
    done = sorted((p for p in root.iterdir() if p.name.startswith("step-")), key=_checkpoint_step)
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def evaluate_subset(model, tokenizer, examples) -> dict:
    from app.evaluate import score_examples, summarize

    was_training = model.training
    model.eval()
    records, seconds = score_examples(model, tokenizer, examples, batch_size=8, progress=False)
    if was_training:
        model.train()
    s = summarize(records, seconds)
    return {"acc": s["acc"], "acc_norm": s["acc_norm"], "gold_loss": s["gold_loss"], "n": s["n"]}


def plot_curves(metrics_path: Path, out_png: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [r for r in rows if r.get("type") == "train"]
    evals = [r for r in rows if r.get("type") == "eval"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    if train:
        xs, ys = [r["examples_seen"] for r in train], [r["loss"] for r in train]
        a.plot(xs, ys, lw=0.6, alpha=0.4, label="per step")
        window = max(len(ys) // 10, 1)  # per-step losses of small batches are noisy
        smooth = [sum(ys[max(0, i - window + 1) : i + 1]) / len(ys[max(0, i - window + 1) : i + 1]) for i in range(len(ys))]
        a.plot(xs, smooth, lw=1.5, label=f"mean of last {window}")
        a.legend()
    a.set_xlabel("training examples")
    a.set_ylabel("training loss")
    if evals:
        b.plot([r["examples_seen"] for r in evals], [100 * r["acc_norm"] for r in evals], marker="o")
    b.set_xlabel("training examples")
    b.set_ylabel("held-out acc_norm % (fixed subset)")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def export(model, tokenizer, args, base_entry, store_dir: Path, name: str, train: list[Example], final: dict) -> Path:
    from app.model_store import write_manifest

    target = store_dir / name
    tmp = store_dir / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    is_adapter = bool(args.lora) and not args.merge_lora
    if args.lora and args.merge_lora:
        model = model.merge_and_unload()
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    write_manifest(
        tmp, name=name, kind="fine-tuned", dtype="float32",
        parameters=sum(p.numel() for p in model.parameters()),
        base_model=base_entry.name if is_adapter or base_entry.path is not None else base_entry.hub_id,
        source={"training": "app.training.train", "base_model": base_entry.name, "base_identity": base_entry.identity},
        extra={"train_examples": len(train), "train_split_fingerprint": split_fingerprint(train),
               "training_config": config, "final_metrics": final},
    )
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def main(argv: list[str] | None = None) -> int:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_cosine_schedule_with_warmup

    from app.config import Settings

    args = parse_args(argv)
    settings = Settings()
    store_dir = args.model_store or settings.model_store_dir
    data_dir = args.data_dir or settings.data_dir
    mp = args.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() else "no"  # bf16 is ~5x slower than fp32 on AVX2 CPUs
    # cpu=True is what makes a multi-process launch on a GPU-less host use gloo (MULTI_CPU)
    # instead of silently running each process alone.
    accelerator = Accelerator(mixed_precision=mp, cpu=not torch.cuda.is_available())
    set_seed(args.seed)
    world, rank = accelerator.num_processes, accelerator.process_index
    args.output_dir.mkdir(parents=True, exist_ok=True)

    train, held = load_train_eval(args, data_dir)
    model, tokenizer, base_entry = build_model(args, store_dir, settings.trust_remote_code)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    plan = make_plan(len(train), args, world)
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=args.lr
    )
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(args.warmup_ratio * plan.total_steps), plan.total_steps)
    # The scheduler stays outside prepare(): Accelerate would step it once per process, but
    # here a step is one global batch whatever the process count.
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)

    start_step = 0
    history: list[dict] = []
    eval_points = sorted({int(x) for x in args.eval_at.split(",") if x.strip()})
    metrics_path = args.output_dir / "metrics.jsonl"
    if args.resume and (ckpt := latest_checkpoint(args.output_dir)) is not None:
        accelerator.load_state(str(ckpt))
        state = json.loads((ckpt / CHECKPOINT_STATE).read_text())
        start_step, history = state["step"], state.get("eval_history", [])
        if accelerator.is_main_process:
            print(f"resumed from {ckpt} at step {start_step}")
            # Drop log lines written after that checkpoint: the resumed run writes them again.
            if metrics_path.exists():
                kept = [l for l in metrics_path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= start_step]
                metrics_path.write_text("".join(k + "\n" for k in kept))
    elif accelerator.is_main_process and metrics_path.exists():
        metrics_path.unlink()

    def log(row: dict) -> None:
        if accelerator.is_main_process:
            with open(metrics_path, "a") as fh:
                fh.write(json.dumps(row) + "\n")

    unwrapped = lambda: accelerator.unwrap_model(model)  # noqa: E731
    evaluated = {h["examples_seen"] for h in history}

    def maybe_eval(step: int, force: bool = False) -> None:
        seen = step * plan.global_batch
        previous = (step - 1) * plan.global_batch
        due = force or (step == 0 and 0 in eval_points) or any(previous < p <= seen for p in eval_points if p > 0)
        if args.no_eval or not held or not due or seen in evaluated:
            return
        if accelerator.is_main_process:
            result = {"type": "eval", "step": step, "examples_seen": seen, **evaluate_subset(unwrapped(), tokenizer, held)}
            history.append(result)
            log(result)
            if not args.quiet:
                tqdm.write(f"eval @ {seen} examples: acc_norm {100 * result['acc_norm']:.1f}%")
        evaluated.add(seen)
        accelerator.wait_for_everyone()

    config_blob = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    maybe_eval(start_step)
    bar = tqdm(total=plan.total_steps, initial=start_step, desc="train", disable=args.quiet or not accelerator.is_main_process)
    t_last, ex_since = time.perf_counter(), 0
    loss_value = float("nan")
    for step in range(start_step, plan.total_steps):
        total_loss = torch.zeros((), device=accelerator.device)
        for micro in range(args.grad_accum):
            idx = batch_for(step, micro, rank, world, args, plan, len(train))
            examples = [train[i] for i in idx]
            items = encode_examples(tokenizer, examples)
            sync = micro == args.grad_accum - 1
            ctx = accelerator.no_sync(model) if (not sync and world > 1) else _nullcontext()
            with ctx:
                loss = compute_loss(args.objective, model, items, examples, pad_id, args.lm_weight, args.mc_temperature) / args.grad_accum
                accelerator.backward(loss)
            total_loss += loss.detach()
            ex_since += len(idx) * world
        if args.max_grad_norm:
            accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = accelerator.reduce(total_loss, "mean").item()
        now = time.perf_counter()
        rate = ex_since / (now - t_last)
        t_last, ex_since = now, 0
        lr = scheduler.get_last_lr()[0]
        log({"type": "train", "step": step + 1, "examples_seen": (step + 1) * plan.global_batch, "loss": loss_value, "lr": lr, "examples_per_s": rate})
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", ex_s=f"{rate:.2f}")
        bar.update()
        maybe_eval(step + 1, force=step + 1 == plan.total_steps and not args.skip_final_eval)
        if (step + 1) % args.save_every == 0 or step + 1 == plan.total_steps:
            state = {"step": step + 1, "examples_seen": (step + 1) * plan.global_batch, "data_position": step + 1,
                     "epoch": (step + 1) / plan.steps_per_epoch, "config": config_blob, "eval_history": history, "loss": loss_value}
            atomic_save(accelerator, args.output_dir / "checkpoints" / f"step-{step + 1:06d}", state)
            if accelerator.is_main_process:
                prune_checkpoints(args.output_dir, args.keep_checkpoints)
    bar.close()

    final = history[-1] if history else {}
    report = {"config": config_blob, "plan": vars(plan), "final_train_loss": loss_value, "eval_history": history,
              "train_examples": len(train), "world_size": world}
    if accelerator.is_main_process:
        plot_curves(metrics_path, args.output_dir / "curves.png")
        if not args.no_export:
            name = args.export_name or f"{base_entry.name}-hellaswag-{args.objective}" + (f"-lora{args.lora}" if args.lora else "")
            target = export(unwrapped(), tokenizer, args, base_entry, store_dir, name, train, final)
            report["exported"] = str(target)
            print(f"exported {target}")
        (args.output_dir / "report.json").write_text(json.dumps(report, indent=1))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    raise SystemExit(main())
