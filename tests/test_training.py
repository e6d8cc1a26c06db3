"""Training with the tiny model: objectives, MC loss by hand, resume after kill -9,
2-process data parallel, export picked up by the server, evaluation metrics."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from app.evaluate import Record, mcnemar, summarize, wilson_interval
from app.model.scoring import reference_logprob
from app.training.objectives import compute_loss, encode_examples
from helpers import ROOT, examples_from, synthetic_rows, train_cmd

def test_mc_loss_equals_hand_computation(tiny_loaded):
    model, tok = tiny_loaded.model, tiny_loaded.tokenizer
    examples = examples_from(synthetic_rows(2))
    items = encode_examples(tok, examples)
    for temperature in (1.0, 0.1):
        loss = compute_loss("mc", model, items, examples, tok.pad_token_id, temperature=temperature)
        by_hand = []
        for ex, item in zip(examples, items):
            norm = torch.tensor([reference_logprob(model, item.context_ids, c) / len(e) for c, e in zip(item.continuations, ex.endings)])
            by_hand.append(-torch.log_softmax(norm / temperature, 0)[ex.label])
        assert loss.item() == pytest.approx(torch.stack(by_hand).mean().item(), abs=1e-3)
    lm = compute_loss("lm", model, items, examples, tok.pad_token_id)
    gold = [(item.context_ids, item.continuations[ex.label]) for ex, item in zip(examples, items)]
    expected = -sum(reference_logprob(model, c, g) for c, g in gold) / sum(len(g) for _, g in gold)
    assert lm.item() == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("objective", ["mc", "lm"])
def test_objectives_decrease_loss(objective, tiny_store):
    from app.model_store import load_model, resolve_model

    loaded = load_model(resolve_model("tiny", tiny_store), store_dir=tiny_store, device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    model.requires_grad_(True).train()
    examples = examples_from(synthetic_rows(8, seed=1))
    items = encode_examples(tok, examples)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(15):
        loss = compute_loss(objective, model, items, examples, tok.pad_token_id)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first, (first, loss.item())


def losses(out: Path) -> list[float]:
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["type"] == "train"]


def test_resume_after_kill_matches_uninterrupted_run(tmp_path, train_env):
    store, data, env = train_env
    full = tmp_path / "full"
    subprocess.run(train_cmd(full, store, data, "--save-every", "2", "--export-name", "ft-full"), env=env, check=True, cwd=ROOT)
    crashed = tmp_path / "crashed"
    proc = subprocess.Popen(train_cmd(crashed, store, data, "--save-every", "2", "--export-name", "ft-resumed"), env=env, cwd=ROOT)
    marker = crashed / "checkpoints" / "step-000004" / "trainer_state.json"
    deadline = time.monotonic() + 120
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert marker.exists()
    # A half-written checkpoint (temp folder) may be left behind; it must never be picked up.
    from app.training.train import latest_checkpoint

    assert latest_checkpoint(crashed).name.startswith("step-")
    subprocess.run(train_cmd(crashed, store, data, "--save-every", "2", "--export-name", "ft-resumed", "--resume"), env=env, check=True, cwd=ROOT)
    a, b = losses(full), losses(crashed)
    assert len(a) == len(b) == 12
    assert a == pytest.approx(b, abs=1e-5)
    from safetensors.torch import load_file

    wa = load_file(store / "ft-full" / "model.safetensors")
    wb = load_file(store / "ft-resumed" / "model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_two_process_data_parallel_matches_one_process(tmp_path, train_env):
    store, data, env = train_env
    one = tmp_path / "one"
    subprocess.run(train_cmd(one, store, data, "--batch-size", "8", "--no-eval", "--no-export", "--max-steps", "4"),
                   env=env, check=True, cwd=ROOT)
    two = tmp_path / "two"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533",
                "-m", "app.training.train"]
    subprocess.run(train_cmd(two, store, data, "--batch-size", "4", "--no-eval", "--no-export", "--max-steps", "4", launcher=launcher),
                   env=env, check=True, cwd=ROOT, timeout=300)
    report = json.loads((two / "report.json").read_text())
    assert report["world_size"] == 2
    assert losses(one) == pytest.approx(losses(two), abs=1e-4)


def test_lora_export_is_served_by_resolution_rule(tmp_path, train_env):
    store, data, env = train_env
    subprocess.run(train_cmd(tmp_path / "lora", store, data, "--lora", "4", "--max-steps", "3", "--export-name", "tiny-lora"),
                   env=env, check=True, cwd=ROOT)
    from app.model_store import load_model, resolve_model

    entry = resolve_model(None, store)
    assert entry.name == "tiny-lora" and entry.is_fine_tuned and entry.manifest["adapter"]
    assert entry.manifest["base_model"] == "tiny" and entry.manifest["training_config"]["lora"] == 4
    assert (store / "tiny-lora" / "adapter_model.safetensors").stat().st_size < 1_000_000
    loaded = load_model(entry, store_dir=store, device="cpu")
    base = load_model(resolve_model("tiny", store), store_dir=store, device="cpu")
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert not torch.allclose(loaded.model(ids).logits, base.model(ids).logits)
    assert (tmp_path / "lora" / "curves.png").exists()


def test_evaluation_numbers_on_hand_made_set():
    recs = [
        Record(0, 0, 0, 0, -2.0, 2, "indomain", "activitynet"),  # right, right
        Record(1, 1, 0, 1, -4.0, 4, "indomain", "wikihow"),  # wrong, right
        Record(2, 2, 2, 3, -3.0, 1, "zeroshot", "wikihow"),  # right, wrong
        Record(3, 3, 0, 0, -1.0, 1, "zeroshot", "activitynet"),  # wrong, wrong
    ]
    s = summarize(recs, seconds=2.0)
    assert s["acc"] == 0.5 and s["acc_norm"] == 0.5 and s["examples_per_s"] == 2.0
    assert s["gold_loss"] == pytest.approx(10 / 8) and s["gold_perplexity"] == pytest.approx(math.exp(10 / 8))
    lo, hi = wilson_interval(2, 4)
    assert lo < 0.5 < hi and s["acc_ci95"] == (lo, hi)
    test = mcnemar([True, True, False, False], [True, False, True, True])
    assert (test["only_base"], test["only_finetuned"]) == (1, 2) and test["p_value"] == pytest.approx(1.0)
    assert mcnemar([False] * 20, [True] * 20)["p_value"] < 1e-5
