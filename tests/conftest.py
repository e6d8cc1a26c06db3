from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import ROOT, ThreadedServer, save_tiny_entry, synthetic_rows, write_jsonl  # noqa: E402


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("store")
    save_tiny_entry(store, "tiny")
    return store


@pytest.fixture(scope="session")
def tiny_loaded(tiny_store):
    from app.model_store import load_model, resolve_model

    return load_model(resolve_model("tiny", tiny_store), store_dir=tiny_store, device="cpu")


@pytest.fixture()
def tiny_settings(tiny_store, tmp_path):
    from app.config import Settings

    return Settings(
        model="tiny", model_store_dir=tiny_store, data_dir=tmp_path / "data", asset_cache_dir=tmp_path / "cache",
        device="cpu", fetch_assets_on_start=False, max_wait_ms=20, request_timeout_s=60,
    )


@pytest.fixture()
def server(tiny_settings):
    with ThreadedServer(tiny_settings) as srv:
        yield srv


REAL_STORE = Path(__file__).resolve().parents[1] / "model_store"
REAL_DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(scope="session")
def real_assets():
    """The embedded default, fetched and converted by the same code users run (cached)."""
    from app.assets import fetch_assets

    report = fetch_assets(REAL_STORE, REAL_DATA, Path(__file__).resolve().parents[1] / ".cache" / "assets")
    return report


@pytest.fixture()
def train_env(tmp_path, tiny_store):
    store = tmp_path / "store"
    shutil.copytree(tiny_store / "tiny", store / "tiny")
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", synthetic_rows(48, seed=2))
    write_jsonl(data / "eval.jsonl", synthetic_rows(8, seed=3))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return store, data, env
