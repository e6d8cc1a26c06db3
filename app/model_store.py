"""The model store: named checkpoint folders, each with a ``manifest.json``, plus resolution/loading.

Layout (see ``model_store/README.md``)::

    model_store/<name>/manifest.json        what it is, where it came from, file sizes + digests
    model_store/<name>/model.safetensors    full weights (base or fine-tuned), or
    model_store/<name>/adapter_model.safetensors + adapter_config.json   a LoRA delta on a base

A folder counts only when its manifest exists and every file it lists has the recorded size:
writers publish by renaming a finished temporary folder, so a crash never leaves a valid-looking
half checkpoint.

Resolution for the server: an explicit setting wins (store name, local path or hub id); else the
newest fine-tuned entry; else the base model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from app.errors import ModelStoreError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
WEIGHT_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(
    folder: Path,
    *,
    name: str,
    kind: str,
    source: dict,
    dtype: str,
    parameters: int,
    base_model: str | None = None,
    extra: dict | None = None,
) -> dict:
    """Write the manifest last: it is the marker that the folder is complete."""
    if kind not in ("base", "fine-tuned"):
        raise ValueError(f"kind must be base or fine-tuned, not {kind!r}")
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            rel = str(path.relative_to(folder))
            entry: dict[str, Any] = {"bytes": path.stat().st_size}
            if path.suffix in WEIGHT_SUFFIXES:
                entry["sha256"] = _sha256(path)
            files[rel] = entry
    manifest = {
        "name": name,
        "kind": kind,
        "base_model": base_model,
        "adapter": (folder / "adapter_config.json").exists(),
        "source": source,
        "dtype": dtype,
        "parameters": int(parameters),
        "created_at": datetime.now(timezone.utc).isoformat(),
        "files": files,
        **(extra or {}),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ModelStoreError(f"{folder} has no {MANIFEST}: incomplete or not a model-store entry") from exc
    except json.JSONDecodeError as exc:
        raise ModelStoreError(f"{path} is not valid JSON: the entry is corrupt") from exc


def check_model_dir(folder: Path) -> dict:
    """Return the manifest, or raise ModelStoreError saying exactly what is missing or truncated."""
    manifest = read_manifest(folder)
    problems = []
    for rel, meta in manifest.get("files", {}).items():
        path = folder / rel
        if not path.exists():
            problems.append(f"missing {rel}")
        elif path.stat().st_size != meta.get("bytes"):
            problems.append(f"{rel} has {path.stat().st_size} bytes, manifest says {meta.get('bytes')}")
    if not any(rel.endswith(WEIGHT_SUFFIXES) for rel in manifest.get("files", {})):
        problems.append("no safetensors weights listed")
    if problems:
        raise ModelStoreError(f"model folder {folder} is corrupt or partial: " + "; ".join(problems))
    return manifest


def is_complete_model_dir(folder: Path) -> bool:
    try:
        check_model_dir(folder)
        return True
    except ModelStoreError:
        return False


@dataclass
class ModelEntry:
    name: str
    path: Path | None  # None for a hub id
    manifest: dict = field(default_factory=dict)
    hub_id: str | None = None

    @property
    def kind(self) -> str:
        return self.manifest.get("kind", "unknown")

    @property
    def is_fine_tuned(self) -> bool:
        return self.kind == "fine-tuned"

    @property
    def identity(self) -> str:
        """Changes whenever the weights change: part of every response-cache key."""
        digests = [m.get("sha256", str(m.get("bytes"))) for _, m in sorted(self.manifest.get("files", {}).items())]
        if digests:
            return f"{self.name}@{hashlib.sha256('|'.join(digests).encode()).hexdigest()[:16]}"
        if self.path is not None:
            stamp = "|".join(
                f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
                for p in sorted(self.path.iterdir())
                if p.is_file()
            )
            return f"{self.name}@{hashlib.sha256(stamp.encode()).hexdigest()[:16]}"
        return f"{self.name}@hub"


def list_models(store_dir: Path) -> list[ModelEntry]:
    """Complete entries only; broken ones are logged and skipped."""
    entries = []
    if not store_dir.is_dir():
        return entries
    for folder in sorted(store_dir.iterdir()):
        if not folder.is_dir() or folder.name.startswith("."):
            continue
        try:
            entries.append(ModelEntry(folder.name, folder, check_model_dir(folder)))
        except ModelStoreError as exc:
            log.warning("skipping %s", exc)
    return entries


def resolve_model(spec: str | None, store_dir: Path) -> ModelEntry:
    if spec:
        in_store = store_dir / spec
        if "/" not in spec and in_store.is_dir():
            return ModelEntry(spec, in_store, check_model_dir(in_store))
        path = Path(spec).expanduser()
        if path.is_dir():
            manifest = check_model_dir(path) if (path / MANIFEST).exists() else {}
            if not manifest and not (path / "config.json").exists():
                raise ModelStoreError(f"{path} is neither a model-store entry nor a transformers checkpoint (no config.json)")
            return ModelEntry(path.name, path, manifest)
        if path.exists():
            raise ModelStoreError(f"{path} is a file; pass the checkpoint folder")
        if _HUB_ID.match(spec):
            return ModelEntry(spec, None, {}, hub_id=spec)
        raise ModelStoreError(f"model {spec!r} is not in {store_dir}, not a local folder and not a hub id")
    entries = list_models(store_dir)
    tuned = [e for e in entries if e.is_fine_tuned]
    if tuned:
        return max(tuned, key=lambda e: e.manifest.get("created_at", ""))
    bases = [e for e in entries if e.kind == "base"]
    if bases:
        return max(bases, key=lambda e: e.manifest.get("created_at", ""))
    raise ModelStoreError(
        f"no model in {store_dir}: run `hellaswag-fetch-assets` (or `make assets`) to fetch the embedded default"
    )


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelStoreError(f"device {device} requested but CUDA is not available")
    return device


def pick_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    entry: ModelEntry
    device: str
    dtype: Any
    quantization: str = "none"

    @property
    def context_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def _check_weight_format(path: Path, allow_pickle: bool) -> None:
    files = [p.name for p in path.iterdir() if p.is_file()]
    has_safe = any(n.endswith(WEIGHT_SUFFIXES) for n in files)
    has_pickle = any(n.endswith(PICKLE_SUFFIXES) for n in files)
    if not has_safe and has_pickle and not allow_pickle:
        raise ModelStoreError(
            f"{path} holds only pickle weights (.bin); they can run arbitrary code on load. "
            "Convert to safetensors or set APP_ALLOW_PICKLE_WEIGHTS=true if you trust the source."
        )
    if not has_safe and not has_pickle:
        raise ModelStoreError(f"{path} has no weights (*.safetensors)")


def load_model(
    entry: ModelEntry,
    *,
    store_dir: Path,
    device: str = "auto",
    dtype: str = "auto",
    quantization: str = "none",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> LoadedModel:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = pick_device(device)
    torch_dtype = pick_dtype(dtype, device)
    common = {"trust_remote_code": trust_remote_code}
    base_entry = None
    if entry.manifest.get("adapter"):
        base_name = entry.manifest.get("base_model")
        if not base_name:
            raise ModelStoreError(f"adapter {entry.name} does not name its base_model")
        base_entry = resolve_model(base_name, store_dir)
    weights_entry = base_entry or entry
    source = str(weights_entry.path) if weights_entry.path is not None else weights_entry.hub_id
    if weights_entry.path is not None:
        _check_weight_format(weights_entry.path, allow_pickle)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(entry.path) if entry.path and (entry.path / "tokenizer_config.json").exists() else source, **common)
        model = AutoModelForCausalLM.from_pretrained(
            source,
            dtype=torch_dtype,
            attn_implementation="sdpa",
            use_safetensors=None if allow_pickle else True,
            **common,
        )
        if base_entry is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(entry.path)).merge_and_unload()
    except ModelStoreError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelStoreError(f"could not load model {entry.name} from {source}: {exc}") from exc
    model.eval()
    model.requires_grad_(False)
    if quantization == "int8":
        if device != "cpu":
            raise ModelStoreError("int8 dynamic quantization is CPU-only; use dtype=bfloat16 on GPU")
        from torch.ao.quantization import quantize_dynamic

        model = quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    model.to(device)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, entry, device, torch_dtype, quantization)
