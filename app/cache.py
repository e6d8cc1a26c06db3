"""LRU response cache (cachetools) for deterministic requests, with single-flight.

Keys hash the loaded model's identity (name + weight digest), the endpoint and the normalized
request (defaults filled in), so equal requests written differently hit and a model change can
never serve an old answer. Values are the serialized response, bounded by entries and bytes,
with an optional TTL. Identical requests that arrive while the first is computing await its
result instead of computing again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Any, Awaitable, Callable

from cachetools import LRUCache, TTLCache


class _EvictionCounting:
    evictions = 0

    def popitem(self):  # called by cachetools only when it must make room
        item = super().popitem()  # type: ignore[misc]
        self.evictions += 1
        return item


class _LRU(_EvictionCounting, LRUCache):
    pass


class _TTL(_EvictionCounting, TTLCache):
    pass


def cache_key(model_identity: str, endpoint: str, normalized: dict[str, Any]) -> str:
    blob = json.dumps([model_identity, endpoint, normalized], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


class ResponseCache:
    def __init__(self, max_entries: int, max_bytes: int, ttl_s: float | None = None):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.enabled = max_entries > 0 and max_bytes > 0
        size = len
        if ttl_s:
            self._data = _TTL(maxsize=max(max_bytes, 1), ttl=ttl_s, getsizeof=size)
        else:
            self._data = _LRU(maxsize=max(max_bytes, 1), getsizeof=size)
        self._inflight: dict[str, asyncio.Future] = {}
        self.hits = 0
        self.misses = 0

    @property
    def evictions(self) -> int:
        return self._data.evictions

    @property
    def entries(self) -> int:
        return len(self._data)

    @property
    def bytes(self) -> int:
        return int(self._data.currsize)

    def get(self, key: str) -> dict | None:
        if not self.enabled:
            return None
        blob = self._data.get(key)
        if blob is None:
            return None
        return json.loads(blob)

    def put(self, key: str, value: dict) -> None:
        if not self.enabled:
            return
        blob = json.dumps(value, separators=(",", ":")).encode()
        if len(blob) > self.max_bytes:
            return  # would evict everything else and still not fit
        self._data[key] = blob
        while len(self._data) > self.max_entries:
            self._data.popitem()

    async def get_or_compute(self, key: str, compute: Callable[[], Awaitable[dict]]) -> tuple[dict, bool]:
        """Return (response, was_cached). Concurrent callers with the same key share one compute."""
        hit = self.get(key)
        if hit is not None:
            self.hits += 1
            return hit, True
        leader = self._inflight.get(key)
        if leader is not None:
            try:
                value = await asyncio.shield(leader)
                self.hits += 1
                return value, True
            except BaseException:  # noqa: BLE001 - the leader failed or left: compute ourselves
                if asyncio.current_task() is not None and asyncio.current_task().cancelling():
                    raise
        self.misses += 1
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            value = await compute()
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters may be none
            raise
        else:
            self.put(key, value)
            future.set_result(value)
            return value, False
        finally:
            if self._inflight.get(key) is future:
                del self._inflight[key]
