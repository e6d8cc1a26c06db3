"""Asyncio side of the engine: submit a job, await its events. Cancelling the awaiting task
(client disconnect, deadline) cancels the job, which the engine drops at its next step."""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator

from app.engine.engine import Engine
from app.engine.types import ErrorEvent, Event, GenerateResult, Job, ScoreResult, TokenEvent
from app.errors import RequestTimeout


class AsyncSink:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    def emit(self, event: Event) -> None:
        try:
            self._loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:
            pass  # loop already closed (shutdown): nobody is waiting any more


class EngineClient:
    def __init__(self, engine: Engine):
        self.engine = engine

    def _cancel(self, job: Job) -> None:
        if not job.finished:
            job.cancel()
            self.engine.wake()

    async def _next(self, sink: AsyncSink, job: Job) -> Event:
        timeout = None if job.deadline is None else max(job.deadline - time.monotonic(), 0.0) + 0.5
        try:
            return await asyncio.wait_for(sink.queue.get(), timeout)
        except asyncio.TimeoutError:
            # Backstop: the engine normally reports the deadline itself.
            self._cancel(job)
            raise RequestTimeout("request did not finish before its deadline") from None

    async def result(self, job: Job) -> GenerateResult | ScoreResult:
        """Submit and wait for the final result (token events are skipped)."""
        sink = job.sink
        assert isinstance(sink, AsyncSink)
        self.engine.submit(job)
        try:
            while True:
                event = await self._next(sink, job)
                if isinstance(event, ErrorEvent):
                    raise event.error
                if isinstance(event, (GenerateResult, ScoreResult)):
                    return event
        except BaseException:
            self._cancel(job)
            raise

    async def stream(self, job: Job) -> AsyncIterator[TokenEvent | GenerateResult]:
        """Submit (already done by the caller via ``submit_now``) and yield events as they come."""
        sink = job.sink
        assert isinstance(sink, AsyncSink)
        try:
            while True:
                event = await self._next(sink, job)
                if isinstance(event, ErrorEvent):
                    raise event.error
                yield event  # type: ignore[misc]
                if isinstance(event, GenerateResult):
                    return
        finally:
            self._cancel(job)
