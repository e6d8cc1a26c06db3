"""Integration over a real uvicorn server on 127.0.0.1 with the tiny model."""

import asyncio
import json

import httpx
import pytest

from app.model.scoring import encode_item, reference_logprob
from helpers import ThreadedServer, disconnect_storm, metric_value, wait_engine_idle

SEED_BODY = {"prompt": "The chef is preparing a meal. He takes out a knife and", "max_length": 100}


def test_health_ready_info(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert httpx.get(server.url + "/ready").status_code == 200
    info = httpx.get(server.url + "/info").json()
    assert info["model"]["name"] == "tiny" and info["model"]["device"] == "cpu"
    assert info["model"]["dtype"] == "float32" and info["model"]["parameters"] > 0
    assert httpx.get(server.url + "/docs").status_code == 200


def test_seed_example_verbatim_at_trailing_slash(server):
    r = httpx.post(server.url + "/generate/", json=SEED_BODY, follow_redirects=False)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"] <= 100
    assert body["finish_reason"] in ("length", "eos", "stop") and body["model"] == "tiny"
    assert body["cached"] is False


def test_max_length_and_max_new_tokens_tighter_wins(server):
    r = httpx.post(server.url + "/generate", json={**SEED_BODY, "max_new_tokens": 3}).json()
    assert r["usage"]["completion_tokens"] <= 3
    prompt_tokens = r["usage"]["prompt_tokens"]
    r = httpx.post(server.url + "/generate", json={**SEED_BODY, "max_length": prompt_tokens + 2, "max_new_tokens": 50}).json()
    assert r["usage"]["completion_tokens"] <= 2


def test_stream_sends_token_events_then_final(server):
    body = {"prompt": "Kids are playing", "max_new_tokens": 8, "stream": True, "cache": False}
    events = []
    with httpx.stream("POST", server.url + "/generate", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    final = json.loads(events[-2])
    chunks = [json.loads(e)["text"] for e in events[:-2]]
    assert final["finish_reason"] in ("length", "eos") and "usage" in final
    plain = httpx.post(server.url + "/generate", json={**body, "stream": False}).json()
    assert "".join(chunks) == plain["text"]
    assert final["usage"] == plain["usage"]


def test_score_equals_reference_under_concurrency(server):
    loaded = server.svc.loaded
    tok, model = loaded.tokenizer, loaded.model
    requests = [
        {"context": f"Kids are playing in the park number {i}. They", "endings": ["run.", "play with the dog.", "sit on a bench and watch"][: 1 + i % 3]}
        for i in range(16)
    ]

    async def go():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            return await asyncio.gather(*(c.post("/score", json=r) for r in requests))

    before = server.svc.engine.stats.batches["score"]
    responses = asyncio.run(go())
    worst = 0.0
    for req, resp in zip(requests, responses):
        assert resp.status_code == 200, resp.text
        body = resp.json()
        item = encode_item(tok, req["context"], req["endings"])
        for cont, s, ending in zip(item.continuations, body["scores"], req["endings"]):
            worst = max(worst, abs(s["logprob"] - reference_logprob(model, item.context_ids, cont)))
            assert s["num_tokens"] == len(cont)
            assert s["logprob_norm"] == pytest.approx(s["logprob"] / len(ending))
        norms = [s["logprob_norm"] for s in body["scores"]]
        assert body["best"] == norms.index(max(norms))
        assert sum(body["probabilities"]) == pytest.approx(1.0)
    assert worst < 1e-3
    batches = server.svc.engine.stats.batches["score"] - before
    assert batches < len(requests)  # 16 requests shared forwards


def test_concurrent_generates_share_decode_steps(server):
    async def go():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            return await asyncio.gather(*(
                c.post("/generate", json={"prompt": f"Story {i}: once", "max_new_tokens": 12, "cache": False}) for i in range(8)
            ))

    assert all(r.status_code == 200 for r in asyncio.run(go()))
    text = httpx.get(server.url + "/metrics").text
    assert server.svc.engine.stats.max_batch_size["decode"] > 1
    # the histogram saw batches bigger than 1: its +Inf count exceeds the count in the le=1 bucket
    le1 = metric_value(text, "llm_batch_size_bucket", {"kind": "decode", "le": "1.0"})
    total = metric_value(text, "llm_batch_size_count", {"kind": "decode"})
    assert total > le1


@pytest.mark.parametrize(
    "path, body, status, param",
    [
        ("/generate", {"prompt": "   "}, 422, "prompt"),
        ("/generate", {"prompt": ""}, 422, "prompt"),
        ("/generate", {"prompt": "hi", "max_new_tokens": -1}, 422, "max_new_tokens"),
        ("/generate", {"prompt": "hi", "max_new_tokens": 10**9}, 400, "max_new_tokens"),
        ("/generate", {"prompt": "hi", "temperature": -0.5}, 422, "temperature"),
        ("/generate", {"prompt": "hi", "top_p": 0}, 422, "top_p"),
        ("/generate", {"prompt": "hi", "top_p": 1.5}, 422, "top_p"),
        ("/generate", {"prompt": 5}, 422, "prompt"),
        ("/generate", {"prompt": "hi", "bogus": 1}, 422, "bogus"),
        ("/generate", {"prompt": "word " * 400}, 400, "prompt"),
        ("/score", {"context": "hi", "endings": []}, 422, "endings"),
        ("/score", {"context": "hi", "endings": ["a", " "]}, 422, "endings"),
        ("/score", {"context": " ", "endings": ["a"]}, 422, "context"),
        ("/score", {"context": "hi", "endings": ["a"] * 17}, 400, "endings"),
        ("/score", {"context": "word " * 400, "endings": ["a"]}, 400, "context"),
    ],
)
def test_bad_input_gets_clear_4xx(server, path, body, status, param):
    r = httpx.post(server.url + path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"type", "message", "param"} and err["message"]
    assert err["param"] == param


def test_truncate_keeps_tail_instead_of_rejecting(server):
    r = httpx.post(server.url + "/generate", json={"prompt": "word " * 400, "max_new_tokens": 4, "truncate": True, "cache": False})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] + 4 <= 256


def test_malformed_bodies(server):
    r = httpx.post(server.url + "/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(server.url + "/generate", content=b'{"prompt": "\xff\xfe"}', headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500 and "error" in r.json()
    r = httpx.post(server.url + "/generate", content=b"x" * 2_000_000, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["type"] == "payload_too_large"
    assert httpx.get(server.url + "/nope").json()["error"]["type"] == "not_found"


def test_cache_hit_bypass_and_single_flight(server):
    body = {"context": "The dog runs across the yard. It", "endings": ["barks.", "sleeps."]}
    first = httpx.post(server.url + "/score", json=body).json()
    second = httpx.post(server.url + "/score", json=body).json()
    assert first["cached"] is False and second["cached"] is True
    assert {**first, "cached": True} == second
    assert httpx.post(server.url + "/score", json={**body, "cache": False}).json()["cached"] is False
    assert httpx.post(server.url + "/score", json=body, headers={"Cache-Control": "no-cache"}).json()["cached"] is False
    # defaults filled in: an explicit default equals the implicit one
    g1 = httpx.post(server.url + "/generate", json={"prompt": "Kids play"}).json()
    g2 = httpx.post(server.url + "/generate", json={"prompt": "Kids play", "max_new_tokens": 64, "temperature": 0, "top_p": 0.5}).json()
    assert g1["cached"] is False and g2["cached"] is True and g1["text"] == g2["text"]
    # sampled without seed is never cached
    s = {"prompt": "Kids play", "temperature": 1.0, "max_new_tokens": 4}
    assert [httpx.post(server.url + "/generate", json=s).json()["cached"] for _ in range(2)] == [False, False]

    completed = server.svc.engine.stats.completed
    same = {"prompt": "Single flight prompt", "max_new_tokens": 20}

    async def go():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            return await asyncio.gather(*(c.post("/generate", json=same) for _ in range(6)))

    bodies = [r.json() for r in asyncio.run(go())]
    assert len({b["text"] for b in bodies}) == 1
    assert sum(not b["cached"] for b in bodies) == 1
    assert server.svc.engine.stats.completed == completed + 1  # computed once


def test_metrics_exposition_moves_with_traffic(server):
    before = httpx.get(server.url + "/metrics").text
    httpx.post(server.url + "/generate", json={"prompt": "metrics check", "max_new_tokens": 5, "cache": False})
    after = httpx.get(server.url + "/metrics").text
    ok = {"endpoint": "/generate", "status": "200"}
    assert (metric_value(after, "llm_requests_total", ok) or 0) == (metric_value(before, "llm_requests_total", ok) or 0) + 1
    assert metric_value(after, "llm_generated_tokens_total") > (metric_value(before, "llm_generated_tokens_total") or 0)
    assert metric_value(after, "llm_time_to_first_token_seconds_count") >= 1
    assert metric_value(after, "llm_queue_depth") == 0 and metric_value(after, "llm_running_sequences") == 0
    assert metric_value(after, "llm_device_memory_bytes", {"kind": "rss"}) > 10_000_000
    assert metric_value(after, "llm_model_info", {"name": "tiny", "device": "cpu", "kind": "base"}) == 1
    for name in ("llm_cache_hits_total", "llm_cache_misses_total", "llm_cache_evictions_total", "llm_cache_entries",
                 "llm_oom_retries_total", "llm_inter_token_latency_seconds_count", "llm_queue_wait_seconds_count",
                 "llm_batch_tokens_count", "llm_prompt_tokens_total", "llm_request_latency_seconds_count"):
        assert metric_value(after, name) is not None, name


def test_disconnects_free_their_slots(server):
    engine = server.svc.engine
    cancelled_before = engine.stats.cancelled

    outcomes = asyncio.run(disconnect_storm(server.url, give_up=12, hang_up=4, give_up_after_s=0.3))
    assert all(isinstance(r, httpx.TimeoutException) for r in outcomes)
    wait_engine_idle(engine, 20)
    assert engine.running == 0 and engine.queue_depth == 0
    assert engine.stats.cancelled - cancelled_before >= 12
    r = httpx.post(server.url + "/generate", json={"prompt": "after", "max_new_tokens": 3, "cache": False}, timeout=30)
    assert r.status_code == 200


def test_queue_full_gets_503_with_retry_after(tiny_settings):
    with ThreadedServer(tiny_settings.model_copy(update={"max_queue": 2, "max_batch_size": 1})) as srv:
        async def go():
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
                return await asyncio.gather(*(
                    c.post("/generate", json={"prompt": f"p{i}", "max_new_tokens": 30, "cache": False}) for i in range(12)
                ))

        statuses = [r.status_code for r in asyncio.run(go())]
        assert set(statuses) <= {200, 503} and 503 in statuses and 200 in statuses
        r503 = [r for r in asyncio.run(go()) if r.status_code == 503][0]
        assert r503.headers["retry-after"] and r503.json()["error"]["type"] == "overloaded"


def test_deadline_gives_504(server):
    r = httpx.post(server.url + "/generate", json={"prompt": "slow", "max_new_tokens": 200, "timeout_s": 0.1, "cache": False}, timeout=30)
    assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"


def test_api_key_auth(tiny_settings):
    with ThreadedServer(tiny_settings.model_copy(update={"api_keys": ["k1", "k2"]})) as srv:
        assert httpx.get(srv.url + "/health").status_code == 200
        assert httpx.get(srv.url + "/ready").status_code == 200
        assert httpx.get(srv.url + "/metrics").status_code == 200
        r = httpx.post(srv.url + "/generate", json={"prompt": "hi", "max_new_tokens": 2})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        r = httpx.post(srv.url + "/generate", json={"prompt": "hi", "max_new_tokens": 2}, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        r = httpx.post(srv.url + "/generate", json={"prompt": "hi", "max_new_tokens": 2}, headers={"Authorization": "Bearer k2"})
        assert r.status_code == 200
