"""Prometheus metrics: the one place where engine stats, cache counters and HTTP outcomes become
prometheus-client objects. Each app gets its own registry (several apps can live in a test)."""

from __future__ import annotations

import os
import resource
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from app.cache import ResponseCache
    from app.engine.engine import Engine

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
TOKEN_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10)
BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)
BATCH_TOKEN_BUCKETS = (16, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: fall back to the peak
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _LiveStateCollector:
    """Reads engine/cache/device state at scrape time (no background thread)."""

    def __init__(self, metrics: "Metrics"):
        self.m = metrics

    def collect(self):
        m = self.m
        cache = m.cache
        if cache is not None:
            yield CounterMetricFamily("llm_cache_hits", "Response cache hits", value=cache.hits)
            yield CounterMetricFamily("llm_cache_misses", "Response cache misses", value=cache.misses)
            yield CounterMetricFamily("llm_cache_evictions", "Entries evicted to make room", value=cache.evictions)
            yield GaugeMetricFamily("llm_cache_entries", "Entries in the response cache", value=cache.entries)
            yield GaugeMetricFamily("llm_cache_bytes", "Bytes held by the response cache", value=cache.bytes)
        engine = m.engine
        if engine is not None:
            yield GaugeMetricFamily("llm_queue_depth", "Requests waiting for the engine", value=engine.queue_depth)
            yield GaugeMetricFamily("llm_running_sequences", "Sequences in the running decode batch", value=engine.running)
            yield GaugeMetricFamily("llm_engine_alive", "1 while the engine loop runs", value=1 if engine.alive else 0)
            mem = GaugeMetricFamily("llm_device_memory_bytes", "Device memory (GPU) or process RSS (CPU)", labels=["kind"])
            stats = engine.runner.memory_stats()
            for kind, value in stats.items():
                mem.add_metric([kind.replace("_bytes", "")], value)
            mem.add_metric(["rss"], _rss_bytes())
            yield mem
        yield GaugeMetricFamily("llm_ready", "1 when /ready answers 200", value=1 if m.ready() else 0)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.cache: ResponseCache | None = None
        self.engine: Engine | None = None
        self.ready = lambda: False
        r = self.registry
        ProcessCollector(registry=r)
        self.requests = Counter("llm_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r)
        self.latency = Histogram("llm_request_latency_seconds", "End-to-end request latency", ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("llm_queue_wait_seconds", "Time from submit to first execution", ["kind"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("llm_time_to_first_token_seconds", "Time to first generated token", buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("llm_inter_token_latency_seconds", "Time between generated tokens of one sequence", buckets=TOKEN_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("llm_batch_size", "Jobs per executed batch", ["kind"], buckets=BATCH_SIZE_BUCKETS, registry=r)
        self.batch_tokens = Histogram("llm_batch_tokens", "Tokens per executed batch", ["kind"], buckets=BATCH_TOKEN_BUCKETS, registry=r)
        self.batch_seconds = Histogram("llm_batch_duration_seconds", "Time to execute one batch", ["kind"], buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("llm_prompt_tokens", "Prompt/context tokens processed", registry=r)
        self.generated_tokens = Counter("llm_generated_tokens", "Tokens generated", registry=r)
        self.oom_retries = Counter("llm_oom_retries", "Batches split or preempted after running out of memory", registry=r)
        self.cancellations = Counter("llm_cancellations", "Requests cancelled (client went away)", ["kind"], registry=r)
        self.model_info = Gauge("llm_model_info", "The loaded model (value is always 1)", ["name", "dtype", "device", "kind", "quantization"], registry=r)
        r.register(_LiveStateCollector(self))

    def bind(self, *, engine: "Engine", cache: "ResponseCache", ready) -> None:
        self.engine, self.cache, self.ready = engine, cache, ready

    def set_model(self, name: str, dtype: str, device: str, kind: str, quantization: str) -> None:
        self.model_info.labels(name, dtype, device, kind, quantization).set(1)

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    # --- EngineObserver ---
    def on_batch(self, kind: str, size: int, tokens: int, seconds: float) -> None:
        self.batch_size.labels(kind).observe(size)
        self.batch_tokens.labels(kind).observe(tokens)
        self.batch_seconds.labels(kind).observe(seconds)

    def on_queue_wait(self, kind: str, seconds: float) -> None:
        self.queue_wait.labels(kind).observe(seconds)

    def on_first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def on_inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def on_tokens(self, prompt: int, generated: int) -> None:
        if prompt:
            self.prompt_tokens.inc(prompt)
        if generated:
            self.generated_tokens.inc(generated)

    def on_oom_retry(self) -> None:
        self.oom_retries.inc()

    def on_cancel(self, kind: str) -> None:
        self.cancellations.labels(kind).inc()
