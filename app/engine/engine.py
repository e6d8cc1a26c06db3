"""The background engine: one thread owns the model and loops scheduler -> runner -> deliver.

HTTP handlers only ``submit`` jobs and await their sinks; they never touch the model. A failed
batch fails every member with the same typed error and the loop goes on; an OOM splits the batch
and retries the halves (one request that alone cannot fit gets ``InsufficientMemory``); an error
outside any batch kills the engine, fails everything waiting and flips readiness.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Iterable

from app.engine.runner import DecodeBatch, ModelRunner, RunningSequence, is_oom
from app.engine.scheduler import Scheduler
from app.engine.types import (
    BatchLimits,
    EngineObserver,
    EngineStats,
    ErrorEvent,
    GenerateJob,
    GenerateResult,
    Job,
    NullObserver,
    ScoreJob,
    ScoreResult,
    TokenEvent,
)
from app.errors import (
    EngineDead,
    InsufficientMemory,
    InvalidRequest,
    ModelError,
    QueueFull,
    RequestCancelled,
    RequestTimeout,
    ServiceError,
    ServiceUnavailable,
)

log = logging.getLogger(__name__)

CLEAN_STEPS_TO_GROW = 32


class Engine:
    def __init__(self, runner: ModelRunner, limits: BatchLimits, observer: EngineObserver | None = None):
        self.runner = runner
        self.limits = limits
        self.observer: EngineObserver = observer or NullObserver()
        self.stats = EngineStats()
        self.scheduler = Scheduler(limits)
        self.batch = DecodeBatch()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.accepting = True
        self.dead_reason: str | None = None
        self._busy = False
        # After a decode OOM the batch may not grow back past this until it has run cleanly
        # for a while; without it a preempted sequence is re-admitted and preempted forever.
        self._slot_cap: int | None = None
        self._clean_steps = 0

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def stop_accepting(self) -> None:
        self.accepting = False

    @property
    def alive(self) -> bool:
        return self.dead_reason is None and self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------ state for metrics / drain
    @property
    def queue_depth(self) -> int:
        return self.scheduler.waiting

    @property
    def running(self) -> int:
        return len(self.batch)

    @property
    def idle(self) -> bool:
        return self.scheduler.waiting == 0 and len(self.batch) == 0 and not self._busy

    # ------------------------------------------------------------ submission (any thread)
    def check_fits(self, job: Job) -> None:
        if job.cost_tokens > self.limits.max_batch_tokens:
            raise InvalidRequest(
                f"request needs {job.cost_tokens} tokens (prompt + max new tokens) but the batch "
                f"token budget is {self.limits.max_batch_tokens}; shorten it or lower max_new_tokens"
            )

    def submit(self, job: Job) -> None:
        self.check_fits(job)
        with self._cond:
            if self.dead_reason is not None:
                raise EngineDead(f"engine is not running: {self.dead_reason}")
            if not self.accepting:
                raise ServiceUnavailable("server is shutting down")
            if self.scheduler.waiting >= self.limits.max_queue:
                raise QueueFull(f"queue is full ({self.limits.max_queue} waiting requests), retry later")
            self.scheduler.add(job)
            self._cond.notify()

    def wake(self) -> None:
        """Called after a job is cancelled so an idle loop drops it promptly."""
        with self._cond:
            self._cond.notify()

    # ------------------------------------------------------------ the loop
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    if self._stopping:
                        break
                    now = time.monotonic()
                    plan = self.scheduler.plan(now, len(self.batch), self.batch.reserved_tokens, self._slot_cap)
                    if not plan.has_work and not self.batch.seqs and not plan.dropped:
                        timeout = plan.wait_s
                        deadline = self.scheduler.earliest_deadline()
                        if deadline is not None:
                            until = max(deadline - now, 0.0) + 0.001
                            timeout = until if timeout is None else min(timeout, until)
                        self._cond.wait(timeout)
                        continue
                    self._busy = True
                try:
                    self._drop(plan.dropped)
                    if plan.admit:
                        self._admit(plan.admit)
                    if plan.score_batch:
                        self._score(plan.score_batch)
                    if self.batch.seqs:
                        self._decode()
                finally:
                    self._busy = False
        except BaseException as exc:  # noqa: BLE001 - anything here means the loop itself broke
            log.exception("engine loop died")
            self.dead_reason = f"{type(exc).__name__}: {exc}"
            self._fail_everything(EngineDead(f"engine failed: {self.dead_reason}"))
            return
        self._fail_everything(ServiceUnavailable("server is shutting down"))

    def _fail_everything(self, error: ServiceError) -> None:
        with self._cond:
            jobs = self.scheduler.drain_all()
        jobs += [s.job for s in self.batch.seqs]
        self.batch = DecodeBatch()
        for job in jobs:
            self._fail(job, error)

    # ------------------------------------------------------------ delivery helpers
    def _fail(self, job: Job, error: BaseException) -> None:
        if job.finished:
            return
        job.finished = True
        job.sink.emit(ErrorEvent(error))

    def _drop(self, jobs: Iterable[Job]) -> None:
        now = time.monotonic()
        for job in jobs:
            kind = "score" if isinstance(job, ScoreJob) else "generate"
            if job.cancelled:
                self.stats.cancelled += 1
                self.observer.on_cancel(kind)
                self._fail(job, RequestCancelled("client went away"))
            elif job.expired(now):
                self.stats.timed_out += 1
                self._fail(job, RequestTimeout("request did not finish before its deadline"))

    # ------------------------------------------------------------ /score
    def _score(self, jobs: list[ScoreJob]) -> None:
        started = time.monotonic()
        for job in jobs:
            self.observer.on_queue_wait("score", started - job.arrival)
        try:
            results = self._with_oom_split("score", jobs, self.runner.score)
        except BaseException as exc:  # noqa: BLE001
            self._fail_batch("score", jobs, exc)
            return
        elapsed = time.monotonic() - started
        tokens = sum(j.cost_tokens for j in jobs)
        self.stats.record_batch("score", len(jobs))
        self.observer.on_batch("score", len(jobs), tokens, elapsed)
        for job, outcome in zip(jobs, results):
            if isinstance(outcome, BaseException):
                self._fail(job, outcome)
                continue
            per_cont, tops = outcome
            self.stats.score_tokens_packed += job.cost_tokens
            self.stats.score_tokens_naive += sum(len(job.context_ids) + len(c) - 1 for c in job.continuations)
            self.stats.completed += 1
            self.observer.on_tokens(job.cost_tokens, 0)
            job.finished = True
            job.sink.emit(
                ScoreResult(
                    logprobs=tuple(sum(lps) for lps in per_cont),
                    token_logprobs=tuple(tuple(lps) for lps in per_cont),
                    num_tokens=tuple(len(c) for c in job.continuations),
                    queue_wait_s=started - job.arrival,
                    top_logprobs=tuple(tuple(tuple(alts) for alts in cont) for cont in tops),
                )
            )

    def _with_oom_split(self, stage: str, jobs: list, fn) -> list:
        """Run ``fn(jobs)``; on OOM free memory, split in halves and retry, down to one job.

        Returns one result per job; a lone job that still does not fit gets an
        ``InsufficientMemory`` instance in its slot instead of a result.
        """
        try:
            return list(fn(jobs))
        except BaseException as exc:  # noqa: BLE001
            if not is_oom(exc):
                raise
            self.runner.free_memory()
            self.stats.oom_retries += 1
            self.observer.on_oom_retry()
            if len(jobs) == 1:
                log.warning("%s: a single request does not fit in device memory", stage)
                return [InsufficientMemory("request does not fit in device memory; shorten it or retry later")]
            log.warning("%s: out of memory at batch %d, retrying as two halves", stage, len(jobs))
            half = len(jobs) // 2
            return self._with_oom_split(stage, jobs[:half], fn) + self._with_oom_split(stage, jobs[half:], fn)

    def _fail_batch(self, kind: str, jobs: list[Job], exc: BaseException) -> None:
        self.stats.failed_batches += 1
        log.error("%s batch of %d failed: %s: %s", kind, len(jobs), type(exc).__name__, exc)
        error = exc if isinstance(exc, ServiceError) else ModelError(f"model failed on this batch: {type(exc).__name__}")
        for job in jobs:
            self._fail(job, error)

    # ------------------------------------------------------------ generate
    def _admit(self, jobs: list[GenerateJob]) -> None:
        started = time.monotonic()
        seqs = [self.runner.new_sequence(job) for job in jobs]
        for job in jobs:
            self.observer.on_queue_wait("generate", started - job.arrival)

        def prefill_group(group: list[RunningSequence]):
            cache, mask, logits = self.runner.prefill(group)
            return [(group, cache, mask, logits)] * len(group)

        try:
            outcomes = self._with_oom_split("prefill", seqs, prefill_group)
        except BaseException as exc:  # noqa: BLE001
            self._fail_batch("prefill", jobs, exc)
            return
        self.stats.record_batch("prefill", len(jobs))
        self.observer.on_batch("prefill", len(jobs), sum(len(j.prompt_ids) for j in jobs), time.monotonic() - started)
        seen_groups: set[int] = set()
        for seq, outcome in zip(seqs, outcomes):
            if isinstance(outcome, BaseException):
                self._fail(seq.job, outcome)
                continue
            group, cache, mask, logits = outcome
            if id(group) in seen_groups:
                continue
            seen_groups.add(id(group))
            self.runner.join(self.batch, group, cache, mask)
            greedy = logits.argmax(-1).tolist()
            for row, s in enumerate(group):
                self.observer.on_tokens(len(s.job.prompt_ids), 0)
                self._advance(s, logits[row], greedy[row])
        self._retire_finished()

    def _advance(self, seq: RunningSequence, logits, greedy_token: int | None = None) -> None:
        """Choose the next token for ``seq`` from its logits and deliver what it releases.

        Sampling is per request: a failure here fails this sequence only, not its batch mates."""
        if seq.job.finished:
            return
        try:
            token = self.runner.choose(seq, logits, greedy_token)
        except Exception as exc:  # noqa: BLE001
            log.error("sampling failed for request %d: %s: %s", seq.job.id, type(exc).__name__, exc)
            self._fail(seq.job, ModelError(f"sampling failed: {type(exc).__name__}"))
            return
        now = time.monotonic()
        if seq.first_token_at is None:
            seq.first_token_at = now
            self.observer.on_first_token(now - seq.job.arrival)
        elif seq.last_token_at is not None:
            self.observer.on_inter_token(now - seq.last_token_at)
        seq.last_token_at = now
        delta = seq.stop.append(token)
        seq.next_token = token
        if seq.job.stream and delta and not seq.job.cancelled:
            seq.job.sink.emit(TokenEvent(delta, (token,)))

    def _retire_finished(self) -> None:
        now = time.monotonic()
        keep = []
        for row, seq in enumerate(self.batch.seqs):
            job = seq.job
            if job.finished:  # failed individually (e.g. sampling): just leave the batch
                continue
            if seq.stop.finished:
                completion = len(seq.stop.token_ids)
                self.stats.completed += 1
                self.observer.on_tokens(0, completion + (1 if seq.stop.finish_reason == "eos" else 0))
                job.finished = True
                job.sink.emit(
                    GenerateResult(
                        text=seq.stop.text,
                        finish_reason=seq.stop.finish_reason or "length",
                        prompt_tokens=len(job.prompt_ids),
                        completion_tokens=completion,
                        token_ids=tuple(seq.stop.token_ids),
                        queue_wait_s=seq.admitted_at - job.arrival,
                        time_to_first_token_s=(seq.first_token_at - job.arrival) if seq.first_token_at else None,
                    )
                )
            elif job.cancelled or job.expired(now):
                self._drop([job])
            else:
                keep.append(row)
        self.runner.remove(self.batch, keep)

    def _decode(self) -> None:
        self._retire_finished()  # cancellations that arrived since the last step
        if not self.batch.seqs:
            return
        started = time.monotonic()
        size = len(self.batch)
        try:
            logits = self.runner.decode_step(self.batch)
        except BaseException as exc:  # noqa: BLE001
            if is_oom(exc):
                self._preempt_after_oom()
            else:
                jobs = [s.job for s in self.batch.seqs]
                self.batch = DecodeBatch()
                self._fail_batch("decode", jobs, exc)
            return
        self.stats.record_batch("decode", size)
        if self._slot_cap is not None:
            self._clean_steps += 1
            if self._clean_steps >= CLEAN_STEPS_TO_GROW:
                self._slot_cap, self._clean_steps = self._slot_cap + 1, 0
                if self._slot_cap >= self.limits.max_batch_size:
                    self._slot_cap = None
        self.observer.on_batch("decode", size, int(self.batch.mask.sum()), time.monotonic() - started)
        greedy = logits.argmax(-1).tolist()  # one op for the whole batch
        for row, seq in enumerate(self.batch.seqs):
            self._advance(seq, logits[row], greedy[row])
        self._retire_finished()

    def _preempt_after_oom(self) -> None:
        """Decode ran out of memory: send the newest sequence back to the queue (it restarts from
        its prompt, like vLLM's recompute preemption); a lone sequence fails instead."""
        self.runner.free_memory()
        self.stats.oom_retries += 1
        self.observer.on_oom_retry()
        self._slot_cap, self._clean_steps = max(len(self.batch) - 1, 1), 0
        if len(self.batch) == 1:
            job = self.batch.seqs[0].job
            self.batch = DecodeBatch()
            self._fail(job, InsufficientMemory("sequence no longer fits in device memory"))
            return
        newest = max(range(len(self.batch)), key=lambda r: self.batch.seqs[r].admitted_at)
        victim = self.batch.seqs[newest].job
        log.warning("decode out of memory at batch %d: preempting request %d", len(self.batch), victim.id)
        self.runner.remove(self.batch, [r for r in range(len(self.batch)) if r != newest])
        if victim.stream:
            # Tokens already streamed cannot be taken back: fail rather than repeat them.
            self._fail(victim, InsufficientMemory("preempted for memory mid-stream; retry"))
        else:
            with self._cond:
                self.scheduler.requeue_front(victim)
