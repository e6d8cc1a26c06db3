"""The engine without HTTP: batching, batch invariance, OOM split, failures, cancellation."""

import queue
import time

import pytest

from app.engine.engine import Engine
from app.engine.runner import InjectedOOM, ModelRunner
from app.engine.types import BatchLimits, ErrorEvent, GenerateJob, GenerateResult, SamplingParams, ScoreJob, ScoreResult
from app.errors import EngineDead, InsufficientMemory, ModelError
from app.model.scoring import encode_item, reference_logprob


class QueueSink:
    def __init__(self):
        self.events = queue.Queue()

    def emit(self, event):
        self.events.put(event)

    def final(self, timeout=60):
        while True:
            event = self.events.get(timeout=timeout)
            if isinstance(event, (GenerateResult, ScoreResult, ErrorEvent)):
                return event


@pytest.fixture()
def engine(tiny_loaded):
    runner = ModelRunner(tiny_loaded.model, tiny_loaded.tokenizer, context_length=256,
                         eos_ids=[tiny_loaded.tokenizer.eos_token_id])
    eng = Engine(runner, BatchLimits(max_batch_size=16, score_max_batch_size=8, max_batch_tokens=4096, max_wait_s=0.05))
    eng.start()
    yield eng
    eng.stop()


def encode(tok, text):
    return tuple(tok(text, add_special_tokens=False)["input_ids"])


def submit_scores(engine, items) -> list[QueueSink]:
    sinks = []
    for item in items:
        sink = QueueSink()
        engine.submit(ScoreJob(sink=sink, context_ids=item.context_ids, continuations=item.continuations))
        sinks.append(sink)
    return sinks


def gen(engine, tok, text, new=12, **params):
    sink = QueueSink()
    job = GenerateJob(sink=sink, prompt_ids=encode(tok, text), params=SamplingParams(max_new_tokens=new, **params))
    engine.submit(job)
    return job, sink


PROMPTS = [
    "The chef is preparing a meal. He takes out a knife and",
    "Kids",
    "How to make tea: boil the water, add the leaves and wait three minutes. Then",
    "A man is sitting on a roof.",
]


def test_generate_is_batch_invariant(engine, tiny_loaded):
    tok = tiny_loaded.tokenizer
    alone = []
    for p in PROMPTS:
        _, sink = gen(engine, tok, p, new=16)
        alone.append(sink.final().token_ids)
    # Now all at once, plus late joiners that enter while the others are mid-decode.
    sinks = [gen(engine, tok, p, new=16)[1] for p in PROMPTS[:2]]
    time.sleep(0.02)
    sinks += [gen(engine, tok, p, new=16)[1] for p in PROMPTS[2:]]
    together = [s.final().token_ids for s in sinks]
    assert together == alone
    assert engine.stats.max_batch_size["decode"] > 1  # they really shared decode steps


def test_seeded_sampling_reproducible(engine, tiny_loaded):
    tok = tiny_loaded.tokenizer
    runs = [gen(engine, tok, PROMPTS[0], new=10, temperature=5.0, seed=7)[1].final().token_ids for _ in range(2)]
    assert runs[0] == runs[1]
    other = gen(engine, tok, PROMPTS[0], new=10, temperature=5.0, seed=8)[1].final().token_ids
    assert other != runs[0]


def test_score_batches_and_matches_reference(engine, tiny_loaded):
    tok, model = tiny_loaded.tokenizer, tiny_loaded.model
    items = [encode_item(tok, p, [" and then it ends.", " runs.", " plays with the dog"]) for p in PROMPTS]
    results = [s.final() for s in submit_scores(engine, items)]
    worst = max(
        abs(lp - reference_logprob(model, item.context_ids, cont))
        for item, res in zip(items, results)
        for cont, lp in zip(item.continuations, res.logprobs)
    )
    assert worst < 1e-3
    assert engine.stats.max_batch_size["score"] > 1


def test_oom_splits_batch_and_everyone_succeeds(engine, tiny_loaded):
    tok = tiny_loaded.tokenizer

    def fault(stage, size):
        if size > 1:
            raise InjectedOOM("CUDA out of memory (injected)")

    engine.runner.fault_hook = fault
    items = [encode_item(tok, p, [" yes.", " no."]) for p in PROMPTS]
    results = [s.final() for s in submit_scores(engine, items)]
    assert all(isinstance(r, ScoreResult) for r in results)
    # generation: prefill of several prompts splits too, decode of >1 preempts down to one
    gens = [gen(engine, tok, p, new=4)[1] for p in PROMPTS[:3]]
    assert all(isinstance(s.final(), GenerateResult) for s in gens)
    assert engine.stats.oom_retries > 0


def test_lone_request_that_never_fits_gets_insufficient_memory(engine, tiny_loaded):
    engine.runner.fault_hook = lambda stage, size: (_ for _ in ()).throw(InjectedOOM("oom")) if stage == "score" else None
    item = encode_item(tiny_loaded.tokenizer, "Kids", [" play."])
    sink = QueueSink()
    engine.submit(ScoreJob(sink=sink, context_ids=item.context_ids, continuations=item.continuations))
    event = sink.final()
    assert isinstance(event, ErrorEvent) and isinstance(event.error, InsufficientMemory)
    engine.runner.fault_hook = None
    assert isinstance(gen(engine, tiny_loaded.tokenizer, "Kids", new=3)[1].final(), GenerateResult)


def test_failed_batch_fails_every_member_and_engine_survives(engine, tiny_loaded):
    tok = tiny_loaded.tokenizer
    calls = {"n": 0}

    def fault(stage, size):
        if stage == "score" and calls["n"] == 0:
            calls["n"] += 1
            raise RuntimeError("kernel exploded")

    engine.runner.fault_hook = fault
    engine.limits = engine.scheduler.limits = BatchLimits(score_max_batch_size=8, max_wait_s=0.2)
    events = [s.final() for s in submit_scores(engine, [encode_item(tok, p, [" a.", " b."]) for p in PROMPTS])]
    failed = [e for e in events if isinstance(e, ErrorEvent)]
    assert failed and all(isinstance(e.error, ModelError) for e in failed)
    assert len({str(e.error) for e in failed}) == 1  # the same typed error for every member
    assert engine.stats.failed_batches == 1
    assert isinstance(gen(engine, tok, "Kids", new=3)[1].final(), GenerateResult)


def test_cancelled_jobs_leave_and_engine_keeps_serving(engine, tiny_loaded):
    tok = tiny_loaded.tokenizer
    jobs = [gen(engine, tok, p, new=200)[0] for p in PROMPTS * 5]
    time.sleep(0.05)
    for job in jobs:
        job.cancel()
    engine.wake()
    deadline = time.monotonic() + 10
    while (engine.running or engine.queue_depth) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.running == 0 and engine.queue_depth == 0
    assert engine.stats.cancelled == len(jobs)
    assert isinstance(gen(engine, tok, "Kids", new=3)[1].final(), GenerateResult)


def test_loop_fault_kills_engine_and_fails_waiters(engine, tiny_loaded, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("scheduler bug")

    _, sink = gen(engine, tiny_loaded.tokenizer, "Kids", new=50)
    monkeypatch.setattr(engine.scheduler, "plan", broken)
    engine.wake()
    event = sink.final()
    assert isinstance(event, ErrorEvent) and isinstance(event.error, EngineDead)
    deadline = time.monotonic() + 5
    while engine.alive and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not engine.alive and "scheduler bug" in engine.dead_reason
    with pytest.raises(EngineDead):
        gen(engine, tiny_loaded.tokenizer, "Kids")
