"""A small async load generator (httpx): N concurrent clients work through a list of requests.

Every response's status is counted; streamed responses are timed per event (time to first
token, inter-token latency). A run with errors says so in its summary.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import httpx


@dataclass
class Outcome:
    status: int
    latency: float
    ttft: float | None = None
    itls: list[float] = field(default_factory=list)
    tokens: int = 0
    body: dict | None = None
    error: str | None = None


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


async def _one(client: httpx.AsyncClient, path: str, payload: dict, stream: bool,
               chunk_text: Callable[[dict], str | None], usage_tokens: Callable[[dict], int | None]) -> Outcome:
    t0 = time.perf_counter()
    try:
        if not stream:
            r = await client.post(path, json=payload)
            latency = time.perf_counter() - t0
            body = r.json() if r.headers.get("content-type", "").startswith("application/json") else None
            tokens = (usage_tokens(body) or 0) if (body and r.status_code == 200) else 0
            return Outcome(r.status_code, latency, body=body, tokens=tokens)
        ttft, last, itls, chunks, tokens_final = None, None, [], 0, None
        async with client.stream("POST", path, json=payload) as r:
            if r.status_code != 200:
                await r.aread()
                return Outcome(r.status_code, time.perf_counter() - t0)
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                now = time.perf_counter()
                text = chunk_text(event)
                if text:
                    chunks += 1
                    if ttft is None:
                        ttft = now - t0
                    elif last is not None:
                        itls.append(now - last)
                    last = now
                tokens_final = usage_tokens(event) or tokens_final
        return Outcome(200, time.perf_counter() - t0, ttft, itls, tokens_final or chunks)
    except httpx.HTTPError as exc:
        return Outcome(0, time.perf_counter() - t0, error=f"{type(exc).__name__}: {exc}")


async def run_load(base_url: str, path: str, payloads: list[dict], concurrency: int, *, stream: bool = False,
                   chunk_text: Callable[[dict], str | None] = lambda e: e.get("text"),
                   usage_tokens: Callable[[dict], int | None] = lambda e: (e.get("usage") or {}).get("completion_tokens"),
                   timeout: float = 900, headers: dict | None = None) -> tuple[list[Outcome], float]:
    queue: asyncio.Queue = asyncio.Queue()
    for p in payloads:
        queue.put_nowait(p)
    outcomes: list[Outcome] = []
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout, limits=limits, headers=headers) as client:
        async def worker():
            while True:
                try:
                    payload = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                outcomes.append(await _one(client, path, payload, stream, chunk_text, usage_tokens))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return outcomes, wall


def summarize(outcomes: list[Outcome], wall: float) -> dict:
    ok = [o for o in outcomes if o.status == 200]
    statuses: dict[str, int] = {}
    for o in outcomes:
        statuses[str(o.status)] = statuses.get(str(o.status), 0) + 1
    lat = [o.latency for o in ok]
    ttft = [o.ttft for o in ok if o.ttft is not None]
    itl = [x for o in ok for x in o.itls]
    tokens = sum(o.tokens for o in ok)
    return {
        "requests": len(outcomes),
        "ok": len(ok),
        "errors": len(outcomes) - len(ok),
        "statuses": statuses,
        "wall_s": wall,
        "requests_per_s": len(ok) / wall if wall else 0.0,
        "tokens": tokens,
        "tokens_per_s": tokens / wall if wall else 0.0,
        "latency_p50": _pct(lat, 0.5),
        "latency_p95": _pct(lat, 0.95),
        "ttft_p50": _pct(ttft, 0.5),
        "ttft_p95": _pct(ttft, 0.95),
        "itl_p50": _pct(itl, 0.5),
        "itl_p95": _pct(itl, 0.95),
        "mean_latency": statistics.fmean(lat) if lat else None,
    }
