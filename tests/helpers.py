"""Shared builders for tests: a tiny random-weight Llama with a real byte-level BPE tokenizer,
saved as a model-store entry, and a real uvicorn server on 127.0.0.1 in a background thread."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]

CORPUS = [
    "The chef is preparing a meal. He takes out a knife and cuts the onions.",
    "A man is sitting on a roof. He starts pulling up roofing on a roof.",
    "She picks up the ball and throws it to the dog, who runs across the yard.",
    "How to make tea: boil the water, add the leaves and wait three minutes.",
    "Kids are playing in the park while their parents watch from a bench.",
] * 20


def build_tokenizer(vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.model_max_length = 256
    return fast


def build_tiny_model(seed: int = 0, vocab_size: int = 400, layers: int = 2):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    model = LlamaForCausalLM(config).eval()
    # Random init gives near-uniform logits; widen them so greedy choices are not coin flips.
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(20)
    return model


def save_tiny_entry(store: Path, name: str = "tiny", kind: str = "base", seed: int = 0, **extra) -> Path:
    from app.model_store import write_manifest

    folder = store / name
    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    model = build_tiny_model(seed=seed, vocab_size=len(tok))
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    write_manifest(folder, name=name, kind=kind, source={"test": True}, dtype="float32",
                   parameters=sum(p.numel() for p in model.parameters()), **extra)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadedServer:
    """A real uvicorn server on 127.0.0.1 serving ``create_app(settings)``."""

    def __init__(self, settings):
        import uvicorn

        from app.main import create_app

        self.settings = settings.model_copy(update={"port": free_port(), "host": "127.0.0.1"})
        self.app = create_app(self.settings)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.settings.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.settings.port}"

    @property
    def svc(self):
        return self.app.state.svc

    def __enter__(self) -> "ThreadedServer":
        self.thread.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.svc.load_error:
                raise RuntimeError(self.svc.load_error)
            time.sleep(0.05)
        raise TimeoutError("server did not become ready")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def metric_value(text: str, name: str, labels: dict | None = None) -> float | None:
    """Read one sample from Prometheus exposition text (parsed with prometheus-client's parser)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                return sample.value
    return None


def _permute_for_gguf(weights, n_head: int):
    # llama.cpp's convert script reorders q/k rows for its RoPE layout; transformers undoes it on load.
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def write_tiny_gguf(path: Path, model, tokenizer) -> Path:
    """Write ``model`` (a tiny LlamaForCausalLM) + its byte-level BPE tokenizer as an F32 GGUF."""
    import json as _json

    import gguf
    import numpy as np

    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-test-llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(cfg.rope_theta if hasattr(cfg, "rope_theta") else 10000.0)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(0)

    spec = _json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t == "<|endoftext|>" else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_bos_token_id(tokenizer.eos_token_id)
    w.add_pad_token_id(tokenizer.eos_token_id)
    w.add_add_bos_token(False)

    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    names = {
        "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    }
    for i in range(cfg.num_hidden_layers):
        for hf, gg in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                t = _permute_for_gguf(t, cfg.num_attention_heads)
            elif gg == "attn_k":
                t = _permute_for_gguf(t, cfg.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{gg}.weight", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---- training fixtures ----
WORDS = ["runs to the park", "eats the cake", "opens the door", "plays the guitar", "reads a book", "cuts the onions"]


def synthetic_rows(n: int, seed: int = 0) -> list[dict]:
    import random

    rnd = random.Random(seed)
    rows = []
    for i in range(n):
        endings = rnd.sample(WORDS, 4)
        rows.append({"activity_label": "Daily life", "ctx_a": f"Scene {i % 7}: a person", "ctx_b": "then",
                     "endings": endings, "label": str(rnd.randrange(4)), "source_id": f"activitynet~v_{i}",
                     "split_type": "indomain", "ind": i})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def examples_from(rows):
    from app.data.hellaswag import to_example

    return [to_example(r, i) for i, r in enumerate(rows)]



def train_cmd(out: Path, store: Path, data: Path, *extra: str, launcher: list[str] | None = None) -> list[str]:
    args = ["--model", "tiny", "--model-store", str(store), "--train-file", str(data / "train.jsonl"),
            "--eval-file", str(data / "eval.jsonl"), "--output_dir", str(out), "--batch-size", "4",
            "--lr", "1e-3", "--epochs", "1", "--eval-examples", "8", "--eval-at", "16", "--quiet", *extra]
    return (launcher or [sys.executable, "-m", "app.training.train"]) + args




async def disconnect_storm(url: str, give_up: int, hang_up: int, give_up_after_s: float) -> list:
    """``give_up`` clients that time out mid-queue/mid-decode, then ``hang_up`` streaming
    clients that read one event and close. Returns the give-up clients' outcomes."""
    async with httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=give_up + 8)) as c:
        body = {"max_new_tokens": 200, "cache": False}
        tasks = [c.post("/generate", json={"prompt": f"give up {i}", **body}, timeout=give_up_after_s) for i in range(give_up)]
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        for i in range(hang_up):
            async with c.stream("POST", "/generate", json={"prompt": f"hang up {i}", "stream": True, **body}, timeout=30) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data"):
                        break
    return outcomes


def wait_engine_idle(engine, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while (engine.running or engine.queue_depth) and time.monotonic() < deadline:
        time.sleep(0.05)
