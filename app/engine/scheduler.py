"""Decides what runs next. Pure: no torch, no threads, no clocks of its own (``now`` is passed in).

The engine asks for a ``Plan`` each iteration: which expired or cancelled jobs to drop, which
waiting generate jobs join the running decode batch (continuous batching: they join at the next
step, they do not wait for the batch to drain), and which /score jobs form the next forward.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Iterable

from app.engine.types import BatchLimits, GenerateJob, Job, ScoreJob


def collate_requests(queue: deque, max_size: int, max_tokens: int) -> list:
    """Pop jobs from the front of ``queue`` while the padded batch stays within both limits.

    The padded cost is ``len(batch) * longest``, which is what a padded forward really computes
    and allocates. The first job is always taken, so an oversized lone job still runs (the
    engine rejects jobs that could never fit before they are queued).
    """
    batch: list = []
    longest = 0
    while queue and len(batch) < max_size:
        job = queue[0]
        new_longest = max(longest, job.cost_tokens)
        if batch and new_longest * (len(batch) + 1) > max_tokens:
            break
        batch.append(queue.popleft())
        longest = new_longest
    return batch


@dataclass
class Plan:
    dropped: list[Job] = field(default_factory=list)  # cancelled or past deadline
    admit: list[GenerateJob] = field(default_factory=list)
    score_batch: list[ScoreJob] = field(default_factory=list)
    wait_s: float | None = None  # nothing ready: sleep at most this long (None = until woken)

    @property
    def has_work(self) -> bool:
        return bool(self.admit or self.score_batch)


class Scheduler:
    def __init__(self, limits: BatchLimits):
        self.limits = limits
        self.score_queue: deque[ScoreJob] = deque()
        self.generate_queue: deque[GenerateJob] = deque()

    def add(self, job: Job) -> None:
        if isinstance(job, ScoreJob):
            self.score_queue.append(job)
        elif isinstance(job, GenerateJob):
            self.generate_queue.append(job)
        else:
            raise TypeError(f"unknown job type {type(job).__name__}")

    def requeue_front(self, job: GenerateJob) -> None:
        """A preempted sequence goes back first in line (it restarts from its prompt)."""
        self.generate_queue.appendleft(job)

    @property
    def waiting(self) -> int:
        return len(self.score_queue) + len(self.generate_queue)

    def drain_all(self) -> list[Job]:
        jobs: list[Job] = [*self.score_queue, *self.generate_queue]
        self.score_queue.clear()
        self.generate_queue.clear()
        return jobs

    @staticmethod
    def _purge(queue: deque, now: float) -> list[Job]:
        dropped = [job for job in queue if job.cancelled or job.expired(now)]
        if dropped:
            keep = [job for job in queue if not (job.cancelled or job.expired(now))]
            queue.clear()
            queue.extend(keep)
        return dropped

    def plan(self, now: float, running: int, running_tokens: int, slot_cap: int | None = None) -> Plan:
        """``slot_cap`` lowers the decode batch limit after an OOM (see Engine)."""
        plan = Plan()
        plan.dropped = self._purge(self.score_queue, now) + self._purge(self.generate_queue, now)
        lim = self.limits

        slots = min(lim.max_batch_size, slot_cap or lim.max_batch_size) - running
        budget = lim.max_batch_tokens - running_tokens
        while self.generate_queue and slots > 0:
            job = self.generate_queue[0]
            lone = running == 0 and not plan.admit
            if job.cost_tokens > budget and not lone:
                break
            plan.admit.append(self.generate_queue.popleft())
            slots -= 1
            budget -= job.cost_tokens

        if self.score_queue:
            oldest_wait = now - self.score_queue[0].arrival
            full = len(self.score_queue) >= lim.score_max_batch_size or (
                sum(j.cost_tokens for j in self.score_queue) >= lim.max_batch_tokens
            )
            # While other work runs, mates arrive anyway: holding the batch back buys nothing.
            busy = running > 0 or bool(plan.admit)
            if full or busy or oldest_wait >= lim.max_wait_s:
                plan.score_batch = collate_requests(
                    self.score_queue, lim.score_max_batch_size, lim.max_batch_tokens
                )
            else:
                plan.wait_s = lim.max_wait_s - oldest_wait
        return plan

    def earliest_deadline(self) -> float | None:
        deadlines = [j.deadline for j in (*self.score_queue, *self.generate_queue) if j.deadline is not None]
        return min(deadlines) if deadlines else None

    def jobs(self) -> Iterable[Job]:
        yield from self.score_queue
        yield from self.generate_queue
