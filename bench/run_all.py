"""The benchmark suite: the service against a naive baseline and llama.cpp's server, side by side
in one run. Writes docs/benchmarks.md, docs/benchmarks.png and bench/results/latest.json.

    make bench                              # or: .venv/bin/python -m bench.run_all
    .venv/bin/python -m bench.run_all --quick   # smaller request counts (smoke run)

The llama.cpp peer is optional: build it once into a separate environment (it compiles from
source; it is not a project dependency):

    python3 -m venv bench/.venv-peer && CMAKE_ARGS="-DGGML_NATIVE=ON" \
        bench/.venv-peer/bin/pip install "llama-cpp-python[server]==0.3.36"
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from bench.loadgen import run_load, summarize

ROOT = Path(__file__).resolve().parents[1]
DEVICE = os.environ.get("APP_DEVICE", "cpu")
PEER_PY = ROOT / "bench" / ".venv-peer" / "bin" / "python"
GGUF = ROOT / ".cache" / "assets" / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR = ROOT / "model_store" / "smollm2-135m-instruct"
PROMPTS = [
    "The chef is preparing a meal. He takes out a knife and",
    "Write a short story about a lighthouse keeper who",
    "Explain why the sky is blue in simple words:",
    "A man is sitting on a roof. He",
    "How to make tea: first,",
    "The best way to learn a new language is",
    "Once upon a time in a small village,",
    "The football match was about to begin when",
]


class RssSampler:
    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                for line in open(f"/proc/{self.pid}/status"):
                    if line.startswith("VmRSS:"):
                        self.peak = max(self.peak, int(line.split()[1]) * 1024)
            except OSError:
                return
            time.sleep(0.1)

    def reset(self) -> int:
        peak, self.peak = self.peak, 0
        return peak

    def stop(self):
        self._stop.set()


class Proc:
    def __init__(self, name: str, cmd: list[str], port: int, ready_path: str, env: dict | None = None):
        self.name, self.port = name, port
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(ROOT / "bench" / "results" / f"{name}.log", "wb")
        self.proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited; see bench/results/{name}.log")
            try:
                if httpx.get(self.url + ready_path, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        else:
            raise TimeoutError(f"{name} not ready")
        self.rss = RssSampler(self.proc.pid)

    def close(self):
        self.rss.stop()
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def service(port: int, **env) -> Proc:
    e = {"APP_PORT": str(port), "APP_HOST": "127.0.0.1", "APP_MODEL": "smollm2-135m-instruct", "APP_DEVICE": DEVICE,
         "APP_MAX_QUEUE": "4096", "APP_MAX_BATCH_SIZE": "64", "APP_LOG_LEVEL": "warning", **env}
    return Proc("service" + ("-" + env["APP_QUANTIZATION"] if "APP_QUANTIZATION" in env else ""),
                [str(ROOT / "docker" / "entrypoint.sh"), "serve"], port, "/ready",
                env={**e, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"})


def load(url, path, payloads, c, **kw):
    outcomes, wall = asyncio.run(run_load(url, path, payloads, c, **kw))
    return outcomes, summarize(outcomes, wall)


def score_payloads(n: int, seed: int = 0):
    from app.data.hellaswag import load_examples

    held = load_examples(ROOT / "data" / "hellaswag-validation", "held_out")
    sample = random.Random(seed).sample(held, n)
    return sample, [{"context": ex.context, "endings": list(ex.endings), "cache": False} for ex in sample]


def gen_payloads(n: int, new: int = 64, offset: int = 0, **extra):
    # A distinct suffix per request so no cache or prefix trick makes them free.
    return [{"prompt": f"{PROMPTS[(i + offset) % len(PROMPTS)]} ({i + offset})", "max_new_tokens": new, **extra} for i in range(n)]


def machine() -> dict:
    import torch
    import transformers

    mem = next((int(l.split()[1]) * 1024 for l in open("/proc/meminfo") if l.startswith("MemTotal")), 0)
    model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    return {"cpu": model, "cores": os.cpu_count(), "memory_gib": round(mem / 2**30, 1),
            "device": "cuda:" + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--levels", default="1,4,16,64")
    p.add_argument("--out-md", type=Path, default=ROOT / "docs" / "benchmarks.md")
    p.add_argument("--out-json", type=Path, default=ROOT / "bench" / "results" / "latest.json")
    p.add_argument("--skip-peer", action="store_true")
    p.add_argument("--skip-int8", action="store_true")
    args = p.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]
    q = 0.5 if args.quick else 1.0
    n = lambda x: max(int(x * q), 1)  # noqa: E731
    results: dict = {"machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}
    t_start = time.perf_counter()

    # ---------------- /score ----------------
    svc = service(8301)
    base = Proc("baseline", [sys.executable, "-m", "bench.baseline_server", "--model", str(MODEL_DIR), "--port", "8302",
                             "--device", DEVICE], 8302, "/health")
    try:
        score_rows = {}
        examples, payloads = score_payloads(n(64))
        for c in levels:
            count = min(len(payloads), max(n(8), c * (2 if c < 64 else 1)))
            svc.rss.reset()
            before = httpx.get(svc.url + "/info").json()["engine"]
            _, s = load(svc.url, "/score", payloads[:count], c)
            after = httpx.get(svc.url + "/info").json()["engine"]
            s["peak_rss"] = svc.rss.reset()
            batches = after["batches"]["score"] - before["batches"]["score"]
            s["mean_batch_size"] = (after["batched_jobs"]["score"] - before["batched_jobs"]["score"]) / batches if batches else None
            s["prefix_token_saving"] = after["score_prefix_saving"]
            row = {"service": s}
            if c in (1, 16):
                bcount = n(8) if c == 1 else n(16)
                base.rss.reset()
                _, bs = load(base.url, "/score", payloads[:bcount], c)
                bs["peak_rss"] = base.rss.reset()
                row["baseline"] = bs
            score_rows[c] = row
            print(f"score c={c}: service {s['requests_per_s']:.2f} ex/s", flush=True)
        # identical choices and the accuracy of what was scored
        same_payloads = payloads[: n(16)]
        # Paired, in order: the service's picks (served from its cache of the runs above where
        # possible is avoided: cache is off in these payloads) against the baseline's.
        svc_picks = [httpx.post(svc.url + "/score", json=pl, timeout=300).json()["best"] for pl in same_payloads]
        base_picks = [httpx.post(base.url + "/score", json=pl, timeout=300).json()["best"] for pl in same_payloads]
        acc = sum(pk == ex.label for pk, ex in zip(svc_picks, examples)) / len(svc_picks)
        results["score"] = {"levels": score_rows, "identical_choices": svc_picks == base_picks,
                            "choices_compared": len(svc_picks), "accuracy_norm_of_scored": acc}

        # ---------------- cache hit vs miss ----------------
        miss_payloads = [dict(pl, cache=True) for pl in payloads[n(16): n(16) + n(8)]]
        miss = [httpx.post(svc.url + "/score", json=pl, timeout=300).elapsed.total_seconds() for pl in miss_payloads]
        hit = [httpx.post(svc.url + "/score", json=pl, timeout=300).elapsed.total_seconds() for pl in miss_payloads]
        results["cache"] = {"miss_p50_s": sorted(miss)[len(miss) // 2], "hit_p50_s": sorted(hit)[len(hit) // 2], "n": len(miss)}
        print(f"cache: miss {results['cache']['miss_p50_s']:.3f}s hit {results['cache']['hit_p50_s']*1000:.2f}ms", flush=True)

        # ---------------- /generate ----------------
        gen_rows = {}
        for c in levels:
            count = max(n(2), c)
            svc.rss.reset()
            _, s = load(svc.url, "/generate", gen_payloads(count, cache=False, stream=True), c, stream=True)
            s["peak_rss"] = svc.rss.reset()
            row = {"service": s}
            if c in (1, 4, 16):
                bcount = {1: n(2), 4: n(4), 16: n(8)}[c]
                base.rss.reset()
                _, bs = load(base.url, "/generate", gen_payloads(bcount, offset=100), c)
                bs["peak_rss"] = base.rss.reset()
                row["baseline"] = bs
            gen_rows[c] = row
            print(f"generate c={c}: service {s['tokens_per_s']:.1f} tok/s", flush=True)
        results["generate"] = {"levels": gen_rows}

        # ---------------- overhead at concurrency 1 ----------------
        results["overhead"] = overhead(svc, n(3))
    finally:
        svc.close()
        base.close()

    # ---------------- llama.cpp peer ----------------
    if not args.skip_peer and PEER_PY.exists() and GGUF.exists():
        peer = Proc("llamacpp", [str(PEER_PY), "-m", "llama_cpp.server", "--model", str(GGUF), "--n_threads", str(os.cpu_count()),
                                 "--n_ctx", "2048", "--port", "8303", "--host", "127.0.0.1"], 8303, "/v1/models")
        try:
            for c in levels:
                count = max(n(2), min(c, 32))
                payloads = [{"prompt": pl["prompt"], "max_tokens": 64, "temperature": 0, "stream": True} for pl in gen_payloads(count, offset=200)]
                peer.rss.reset()
                _, s = load(peer.url, "/v1/completions", payloads, c, stream=True,
                            chunk_text=lambda e: (e.get("choices") or [{}])[0].get("text"), usage_tokens=lambda e: None)
                s["peak_rss"] = peer.rss.reset()
                results["generate"]["levels"][c]["llamacpp"] = s
                print(f"llama.cpp c={c}: {s['tokens_per_s']:.1f} tok/s", flush=True)
        finally:
            peer.close()
    else:
        results["peer_note"] = "llama.cpp peer not installed (bench/.venv-peer); see the module docstring"

    # ---------------- CPU int8 ----------------
    if not args.skip_int8:
        results["int8"] = int8_check(n)

    results["wall_s"] = time.perf_counter() - t_start
    results["headline"] = headline(results)
    args.out_json.parent.mkdir(parents=True, exist_ok=True)
    args.out_json.write_text(json.dumps({**results["headline"], "results": results}, indent=1, default=str))
    from bench.report import write_report

    write_report(results, args.out_md)
    print(json.dumps(results["headline"], indent=1))
    return 0


def overhead(svc: Proc, reps: int) -> dict:
    """p50 of the same greedy 64-token request through HTTP vs calling the model in-process."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    dtype = torch.bfloat16 if DEVICE.startswith("cuda") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=dtype).to(DEVICE).eval()
    body = {"prompt": PROMPTS[0], "max_new_tokens": 64, "cache": False}
    http = []
    for _ in range(reps):
        t0 = time.perf_counter()
        r = httpx.post(svc.url + "/generate", json=body, timeout=300)
        http.append(time.perf_counter() - t0)
        assert r.status_code == 200
    n_new = r.json()["usage"]["completion_tokens"]
    direct = []
    ids = tok(PROMPTS[0], return_tensors="pt").input_ids.to(DEVICE)
    with torch.no_grad():
        for _ in range(reps):
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, pad_token_id=tok.eos_token_id)
            direct.append(time.perf_counter() - t0)
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return {"service_p50_s": med(http), "direct_p50_s": med(direct), "overhead": med(http) / med(direct) - 1, "tokens": n_new}


def int8_check(n) -> dict:
    """Serving speed with APP_QUANTIZATION=int8 and the held-out accuracy it costs."""
    from app.evaluate import score_examples, summarize as summ
    from app.model_store import load_model, resolve_model

    out = {}
    svc = service(8304, APP_QUANTIZATION="int8")
    try:
        _, s = load(svc.url, "/generate", gen_payloads(16, offset=300, cache=False, stream=True), 16, stream=True)
        out["generate_c16_tokens_per_s"] = s["tokens_per_s"]
        _, payloads = score_payloads(n(32), seed=1)
        _, s2 = load(svc.url, "/score", payloads, 16)
        out["score_c16_examples_per_s"] = s2["requests_per_s"]
    finally:
        svc.close()
    examples, _ = score_payloads(n(100), seed=2)
    store = ROOT / "model_store"
    for q in ("none", "int8"):
        loaded = load_model(resolve_model("smollm2-135m-instruct", store), store_dir=store, device="cpu", quantization=q)
        recs, secs = score_examples(loaded.model, loaded.tokenizer, examples, progress=False)
        out[f"acc_norm_{q}"] = summ(recs, secs)["acc_norm"]
        out[f"eval_examples_per_s_{q}"] = len(examples) / secs
    out["accuracy_examples"] = len(examples)
    return out


def headline(r: dict) -> dict:
    def ratio(a, b):
        return a / b if a and b else None

    s16 = r["score"]["levels"].get(16, {})
    g16 = r["generate"]["levels"].get(16, {})
    return {
        "score_c16_ratio": ratio(s16.get("service", {}).get("requests_per_s"), s16.get("baseline", {}).get("requests_per_s")),
        "generate_c16_ratio": ratio(g16.get("service", {}).get("tokens_per_s"), g16.get("baseline", {}).get("tokens_per_s")),
        "overhead_c1": r.get("overhead", {}).get("overhead"),
        "peer_llamacpp_c16_ratio": ratio(g16.get("service", {}).get("tokens_per_s"), g16.get("llamacpp", {}).get("tokens_per_s")),
        "cache_hit_p50_s": r.get("cache", {}).get("hit_p50_s"),
        "cache_miss_p50_s": r.get("cache", {}).get("miss_p50_s"),
        "machine": r["machine"],
    }


if __name__ == "__main__":
    raise SystemExit(main())
