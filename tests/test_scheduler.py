from collections import deque

from app.engine.scheduler import Scheduler, collate_requests
from app.engine.types import BatchLimits, GenerateJob, SamplingParams, ScoreJob


class NullSink:
    def emit(self, event):
        pass


def score_job(tokens: int, arrival: float = 0.0, **kw) -> ScoreJob:
    return ScoreJob(sink=NullSink(), arrival=arrival, context_ids=tuple(range(tokens)), continuations=((1,),), **kw)


def gen_job(prompt: int, new: int, arrival: float = 0.0, **kw) -> GenerateJob:
    return GenerateJob(sink=NullSink(), arrival=arrival, prompt_ids=tuple(range(prompt)),
                       params=SamplingParams(max_new_tokens=new), **kw)


def test_collate_respects_size_limit():
    q = deque(score_job(10) for _ in range(5))
    batch = collate_requests(q, max_size=3, max_tokens=10_000)
    assert len(batch) == 3 and len(q) == 2


def test_collate_respects_padded_token_limit():
    q = deque([score_job(10), score_job(10), score_job(40), score_job(10)])
    # 2 x 10 = 20 fits in 50; adding the 40-token job makes 3 x 40 = 120 > 50
    batch = collate_requests(q, max_size=8, max_tokens=50)
    assert [j.cost_tokens for j in batch] == [10, 10]
    assert len(q) == 2


def test_collate_always_takes_one_even_if_oversized():
    q = deque([score_job(500), score_job(1)])
    assert len(collate_requests(q, max_size=8, max_tokens=50)) == 1


def test_score_waits_for_mates_until_max_wait():
    s = Scheduler(BatchLimits(score_max_batch_size=4, max_wait_s=0.010))
    s.add(score_job(5, arrival=100.0))
    plan = s.plan(now=100.004, running=0, running_tokens=0)
    assert plan.score_batch == [] and abs(plan.wait_s - 0.006) < 1e-9
    for _ in range(3):
        s.add(score_job(5, arrival=100.005))
    plan = s.plan(now=100.005, running=0, running_tokens=0)  # full: go now
    assert len(plan.score_batch) == 4


def test_score_does_not_wait_while_decoding():
    s = Scheduler(BatchLimits(score_max_batch_size=4, max_wait_s=10))
    s.add(score_job(5, arrival=0.0))
    assert len(s.plan(now=0.0, running=2, running_tokens=10).score_batch) == 1


def test_generate_admission_respects_slots_and_token_budget():
    s = Scheduler(BatchLimits(max_batch_size=3, max_batch_tokens=100))
    for _ in range(4):
        s.add(gen_job(prompt=10, new=20))  # 30 tokens each
    plan = s.plan(now=0.0, running=1, running_tokens=30)
    # slots: 2; budget 70 -> two jobs of 30
    assert len(plan.admit) == 2 and len(s.generate_queue) == 2
    plan = s.plan(now=0.0, running=3, running_tokens=90)
    assert plan.admit == []


def test_lone_job_admitted_even_over_budget():
    s = Scheduler(BatchLimits(max_batch_size=3, max_batch_tokens=10))
    s.add(gen_job(prompt=10, new=20))
    assert len(s.plan(now=0.0, running=0, running_tokens=0).admit) == 1


def test_cancelled_and_expired_jobs_are_dropped():
    s = Scheduler(BatchLimits())
    a, b, c = gen_job(3, 3), score_job(3, deadline=5.0), score_job(3)
    a.cancel()
    for j in (a, b, c):
        s.add(j)
    plan = s.plan(now=6.0, running=0, running_tokens=0)
    assert set(map(id, plan.dropped)) == {id(a), id(b)}
    assert plan.score_batch == [c]
