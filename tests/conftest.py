from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import ThreadedServer, build_tiny_model, build_tokenizer, save_tiny_entry  # noqa: E402


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
