"""Turns a benchmark results dict into docs/benchmarks.md and a throughput chart."""

from __future__ import annotations

from pathlib import Path


def _f(x, fmt="{:.2f}"):
    return "n/a" if x is None else fmt.format(x)


def _ms(x):
    return "n/a" if x is None else f"{1000 * x:.0f}"


def write_report(r: dict, out_md: Path) -> None:
    # Levels may come back from JSON with string keys; the chart needs numbers.
    for section in ("score", "generate"):
        r[section]["levels"] = {int(k): v for k, v in sorted(r[section]["levels"].items(), key=lambda kv: int(kv[0]))}
    m = r["machine"]
    h = r["headline"]
    L = ["# Benchmarks", "",
         f"Run {r['started']} with `{r['command']}` (wall {r['wall_s'] / 60:.1f} min).", "",
         f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, device {m['device']}; "
         f"torch {m['torch']}, transformers {m['transformers']}, Python {m['python']}. "
         "Model: SmolLM2-135M-Instruct, fp32 on CPU. Every row of a table comes from the same run.", "",
         "## Headline", "",
         "| figure | value |", "|---|---|",
         f"| /score examples/s, service / naive baseline, 16 clients | {_f(h['score_c16_ratio'])}x |",
         f"| /generate tokens/s, service / one-at-a-time baseline, 16 clients | {_f(h['generate_c16_ratio'])}x |",
         f"| /generate tokens/s, service / llama.cpp server, 16 clients | {_f(h['peer_llamacpp_c16_ratio'])}x |",
         f"| p50 overhead at concurrency 1 over a direct in-process call | {_f(h['overhead_c1'] and 100 * h['overhead_c1'], '{:.1f}')}% |",
         f"| cache hit p50 / miss p50 (/score) | {_ms(h['cache_hit_p50_s'])} ms / {_ms(h['cache_miss_p50_s'])} ms |",
         "", "## /score (held-out HellaSwag examples, 4 endings each)", "",
         "Baseline: the same model behind a plain FastAPI app, one request at a time, each ending as a "
         "full sequence (`bench/baseline_server.py`).", "",
         "| clients | service ex/s | mean batch | service p50 / p95 s | baseline ex/s | baseline p50 / p95 s | service peak RSS MB | errors |",
         "|---|---|---|---|---|---|---|---|"]
    for c, row in r["score"]["levels"].items():
        s, b = row["service"], row.get("baseline")
        L.append(f"| {c} | {s['requests_per_s']:.2f} | {_f(s.get('mean_batch_size'), '{:.1f}')} | {_f(s['latency_p50'])} / {_f(s['latency_p95'])} | "
                 f"{_f(b and b['requests_per_s'])} | {_f(b and b['latency_p50'])} / {_f(b and b['latency_p95'])} | "
                 f"{s['peak_rss'] / 2**20:.0f} | {s['errors'] + (b['errors'] if b else 0)} |")
    sc = r["score"]
    saving = list(sc["levels"].values())[-1]["service"].get("prefix_token_saving")
    if saving is not None:
        L += ["", f"Prefix reuse: the service computed {100 * saving:.1f}% fewer tokens than scoring each ending as its own sequence."]
    L += ["", f"Choices identical to the baseline on {sc['choices_compared']} examples: **{sc['identical_choices']}**; "
              f"acc_norm of those examples: {100 * sc['accuracy_norm_of_scored']:.1f}% (the evaluation module's rule).", "",
          "## /generate (64 new tokens, greedy, streamed)", "",
          "Baseline: sequential `model.generate` per request behind the same kind of HTTP layer (not streamed, so no TTFT). "
          "Peer: llama.cpp's server (`llama-cpp-python[server]`, same GGUF file) on its OpenAI completions endpoint.", "",
          "| clients | service tok/s | TTFT p50 / p95 ms | ITL p50 / p95 ms | baseline tok/s | llama.cpp tok/s | llama.cpp TTFT p50 ms | service peak RSS MB | errors |",
          "|---|---|---|---|---|---|---|---|---|"]
    for c, row in r["generate"]["levels"].items():
        s, b, p = row["service"], row.get("baseline"), row.get("llamacpp")
        errs = s["errors"] + (b["errors"] if b else 0) + (p["errors"] if p else 0)
        L.append(f"| {c} | {s['tokens_per_s']:.1f} | {_ms(s['ttft_p50'])} / {_ms(s['ttft_p95'])} | {_ms(s['itl_p50'])} / {_ms(s['itl_p95'])} | "
                 f"{_f(b and b['tokens_per_s'], '{:.1f}')} | {_f(p and p['tokens_per_s'], '{:.1f}')} | {_ms(p and p['ttft_p50'])} | "
                 f"{s['peak_rss'] / 2**20:.0f} | {errs} |")
    if "peer_note" in r:
        L += ["", r["peer_note"]]
    o = r.get("overhead", {})
    if o:
        L += ["", "## Overhead at concurrency 1", "",
              f"Same greedy request ({o['tokens']} new tokens): service p50 {o['service_p50_s']:.2f} s, direct `model.generate` "
              f"in-process p50 {o['direct_p50_s']:.2f} s: overhead {100 * o['overhead']:+.1f}%."]
    i8 = r.get("int8")
    if i8:
        L += ["", "## CPU int8 (`APP_QUANTIZATION=int8`, dynamic int8 linear layers)", "",
              f"/generate at 16 clients: {i8['generate_c16_tokens_per_s']:.1f} tok/s; /score at 16 clients: {i8['score_c16_examples_per_s']:.2f} ex/s. "
              f"acc_norm on {i8['accuracy_examples']} held-out examples: fp32 {100 * i8['acc_norm_none']:.1f}%, int8 {100 * i8['acc_norm_int8']:.1f}% "
              f"(in-process scoring {i8['eval_examples_per_s_none']:.2f} vs {i8['eval_examples_per_s_int8']:.2f} ex/s)."]
    extra = out_md.parent / "benchmarks_notes.md"
    if extra.exists():
        L += ["", extra.read_text()]
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text("\n".join(L) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
        levels = list(r["generate"]["levels"])
        for key, label in (("service", "service"), ("baseline", "baseline"), ("llamacpp", "llama.cpp")):
            xs = [c for c in levels if key in r["generate"]["levels"][c]]
            if xs:
                a.plot(xs, [r["generate"]["levels"][c][key]["tokens_per_s"] for c in xs], marker="o", label=label)
            xs = [c for c in r["score"]["levels"] if key in r["score"]["levels"][c]]
            if xs:
                b.plot(xs, [r["score"]["levels"][c][key]["requests_per_s"] for c in xs], marker="o", label=label)
        for ax, title, unit in ((a, "/generate", "tokens/s"), (b, "/score", "examples/s")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrent clients")
            ax.set_ylabel(unit)
            ax.set_title(title)
            ax.legend()
        fig.tight_layout()
        fig.savefig(out_md.with_suffix(".png"), dpi=110)
        plt.close(fig)
    except ImportError:
        pass
