"""Shared builders for tests: a tiny random-weight Llama with a real byte-level BPE tokenizer,
saved as a model-store entry, and a real uvicorn server on 127.0.0.1 in a background thread."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import httpx

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
