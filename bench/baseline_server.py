"""The naive baseline: what a plain FastAPI + transformers app does. One request at a time
(a global lock), each /score ending run as its own full sequence, `model.generate` per
/generate request, no batching, no prefix reuse, no cache.

    python -m bench.baseline_server --model model_store/smollm2-135m-instruct --port 8100
"""

from __future__ import annotations

import argparse
import threading

import torch
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from app.model.scoring import encode_pair, join_for_scoring, normalize, reference_logprob


class GenerateBody(BaseModel):
    prompt: str
    max_new_tokens: int = 64


class ScoreBody(BaseModel):
    context: str
    endings: list[str]


def create_app(model_path: str, device: str = "cpu") -> FastAPI:
    torch.set_grad_enabled(False)
    tok = AutoTokenizer.from_pretrained(model_path)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
    lock = threading.Lock()
    app = FastAPI()

    @app.post("/generate")
    def generate(body: GenerateBody):
        with lock:
            ids = tok(body.prompt, return_tensors="pt").input_ids.to(device)
            out = model.generate(ids, max_new_tokens=body.max_new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
            new = out[0, ids.shape[1]:]
            return {"text": tok.decode(new, skip_special_tokens=True),
                    "usage": {"prompt_tokens": ids.shape[1], "completion_tokens": int(new.shape[0])}}

    @app.post("/score")
    def score(body: ScoreBody):
        with lock:
            lps = []
            for ending in body.endings:
                ctx, cont = encode_pair(tok, *join_for_scoring(body.context, ending))
                lps.append(reference_logprob(model, ctx, cont))
            norms = normalize(lps, body.endings)
            return {"scores": [{"logprob": a, "logprob_norm": b} for a, b in zip(lps, norms)],
                    "best": max(range(len(norms)), key=norms.__getitem__)}

    @app.get("/health")
    def health():
        return {"status": "ok"}

    return app


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    uvicorn.run(create_app(args.model, args.device), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
