"""Plain data for the engine: jobs, events, limits and stats. No torch, no pydantic, no FastAPI."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

_ids = itertools.count(1)


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class BatchLimits:
    max_batch_size: int = 32  # decoding sequences
    score_max_batch_size: int = 8  # /score requests per forward
    max_batch_tokens: int = 8192
    max_wait_s: float = 0.005
    max_queue: int = 512


class Sink(Protocol):
    """Where the engine delivers a job's events (thread-safe; the API bridges to asyncio)."""

    def emit(self, event: "Event") -> None: ...


@dataclass
class Job:
    sink: Sink
    deadline: float | None = None
    arrival: float = field(default_factory=time.monotonic)
    id: int = field(default_factory=lambda: next(_ids))
    cancelled: bool = False
    finished: bool = False

    def cancel(self) -> None:
        # Read by the engine thread at its next step; a plain bool is enough under the GIL.
        self.cancelled = True

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    @property
    def cost_tokens(self) -> int:
        raise NotImplementedError


@dataclass
class ScoreJob(Job):
    context_ids: tuple[int, ...] = ()
    continuations: tuple[tuple[int, ...], ...] = ()
    top_logprobs: int = 0  # also return the k likeliest tokens at every scored position

    @property
    def cost_tokens(self) -> int:
        return len(self.context_ids) + sum(max(len(c) - 1, 0) for c in self.continuations)


@dataclass
class GenerateJob(Job):
    prompt_ids: tuple[int, ...] = ()
    params: SamplingParams = field(default_factory=SamplingParams)
    stream: bool = False

    @property
    def cost_tokens(self) -> int:
        # Reserve the worst case so a running batch never outgrows the budget mid-decode.
        return len(self.prompt_ids) + self.params.max_new_tokens


# --- events delivered to sinks ---


@dataclass(frozen=True)
class TokenEvent:
    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class GenerateResult:
    text: str
    finish_reason: str  # length | stop | eos
    prompt_tokens: int
    completion_tokens: int
    token_ids: tuple[int, ...]
    queue_wait_s: float
    time_to_first_token_s: float | None


@dataclass(frozen=True)
class ScoreResult:
    logprobs: tuple[float, ...]
    token_logprobs: tuple[tuple[float, ...], ...]
    num_tokens: tuple[int, ...]
    queue_wait_s: float
    # top_logprobs[cont][token] = ((token_id, logprob), ...) when the job asked for them
    top_logprobs: tuple = ()


@dataclass(frozen=True)
class ErrorEvent:
    error: BaseException


Event = TokenEvent | GenerateResult | ScoreResult | ErrorEvent


class EngineObserver(Protocol):
    """Plain hooks the engine calls; ``app.metrics`` turns them into Prometheus metrics."""

    def on_batch(self, kind: str, size: int, tokens: int, seconds: float) -> None: ...
    def on_queue_wait(self, kind: str, seconds: float) -> None: ...
    def on_first_token(self, seconds: float) -> None: ...
    def on_inter_token(self, seconds: float) -> None: ...
    def on_tokens(self, prompt: int, generated: int) -> None: ...
    def on_oom_retry(self) -> None: ...
    def on_cancel(self, kind: str) -> None: ...


class NullObserver:
    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


@dataclass
class EngineStats:
    """Cumulative counters kept by the engine itself (tests and /info read them)."""

    batches: dict[str, int] = field(default_factory=lambda: {"score": 0, "prefill": 0, "decode": 0})
    batched_jobs: dict[str, int] = field(default_factory=lambda: {"score": 0, "prefill": 0, "decode": 0})
    max_batch_size: dict[str, int] = field(default_factory=lambda: {"score": 0, "prefill": 0, "decode": 0})
    oom_retries: int = 0
    cancelled: int = 0
    timed_out: int = 0
    failed_batches: int = 0
    completed: int = 0
    score_tokens_packed: int = 0
    score_tokens_naive: int = 0

    def record_batch(self, kind: str, size: int) -> None:
        self.batches[kind] += 1
        self.batched_jobs[kind] += size
        self.max_batch_size[kind] = max(self.max_batch_size[kind], size)

    def mean_batch_size(self, kind: str) -> float:
        return self.batched_jobs[kind] / self.batches[kind] if self.batches[kind] else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "batches": dict(self.batches),
            "batched_jobs": dict(self.batched_jobs),
            "mean_batch_size": {k: round(self.mean_batch_size(k), 3) for k in self.batches},
            "max_batch_size": dict(self.max_batch_size),
            "oom_retries": self.oom_retries,
            "cancelled": self.cancelled,
            "timed_out": self.timed_out,
            "failed_batches": self.failed_batches,
            "completed": self.completed,
            "score_prefix_saving": round(1 - self.score_tokens_packed / self.score_tokens_naive, 4)
            if self.score_tokens_naive
            else 0.0,
        }
