"""The response cache on its own: bounds, eviction counting, TTL, keys, single-flight."""

import asyncio
import time

import pytest

from app.cache import ResponseCache, cache_key


def test_key_changes_with_model_identity_endpoint_and_request():
    base = cache_key("m@abc", "score", {"context_ids": [1, 2], "endings": ["a"]})
    assert base == cache_key("m@abc", "score", {"endings": ["a"], "context_ids": [1, 2]})  # order-free
    assert base != cache_key("m@abd", "score", {"context_ids": [1, 2], "endings": ["a"]})  # new weights
    assert base != cache_key("m@abc", "generate", {"context_ids": [1, 2], "endings": ["a"]})
    assert base != cache_key("m@abc", "score", {"context_ids": [1, 3], "endings": ["a"]})


def test_entry_and_byte_bounds_evict_least_recently_used():
    cache = ResponseCache(max_entries=3, max_bytes=10_000)
    for i in range(3):
        cache.put(f"k{i}", {"v": i})
    assert cache.get("k0") == {"v": 0}  # k0 becomes most recent
    cache.put("k3", {"v": 3})
    assert cache.get("k1") is None and cache.get("k0") is not None
    assert cache.evictions == 1 and cache.entries == 3
    small = ResponseCache(max_entries=100, max_bytes=50)  # each entry below is 28 bytes
    small.put("a", {"t": "x" * 20})
    small.put("b", {"t": "y" * 20})
    assert small.get("a") is None and small.get("b") is not None and small.bytes <= 50
    small.put("huge", {"t": "z" * 500})  # larger than the whole cache: not stored, nothing evicted
    assert small.get("huge") is None and small.get("b") is not None


def test_ttl_expires_entries():
    cache = ResponseCache(max_entries=10, max_bytes=10_000, ttl_s=0.05)
    cache.put("k", {"v": 1})
    assert cache.get("k") == {"v": 1}
    time.sleep(0.08)
    assert cache.get("k") is None


def test_disabled_cache_stores_nothing():
    cache = ResponseCache(max_entries=0, max_bytes=10_000)
    cache.put("k", {"v": 1})
    assert not cache.enabled and cache.get("k") is None


def test_single_flight_computes_once_and_failures_do_not_stick():
    cache = ResponseCache(max_entries=10, max_bytes=10_000)
    calls = {"n": 0}

    async def compute():
        calls["n"] += 1
        await asyncio.sleep(0.05)
        return {"v": calls["n"]}

    async def many():
        return await asyncio.gather(*(cache.get_or_compute("k", compute) for _ in range(8)))

    results = asyncio.run(many())
    assert calls["n"] == 1 and {r[0]["v"] for r in results} == {1}
    assert sum(not cached for _, cached in results) == 1

    async def failing():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        asyncio.run(cache.get_or_compute("bad", failing))
    value, cached = asyncio.run(cache.get_or_compute("bad", compute))
    assert not cached and value["v"] == 2

