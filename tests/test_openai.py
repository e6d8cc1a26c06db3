"""The OpenAI-compatible surface, driven by the real `openai` client."""

import math

import httpx
import pytest

openai = pytest.importorskip("openai")


def test_openai_client_completions(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    out = client.completions.create(model="tiny", prompt="Kids are playing", max_tokens=6, temperature=0)
    assert out.choices[0].finish_reason in ("length", "stop") and out.usage.completion_tokens <= 6
    plain = httpx.post(server.url + "/generate", json={"prompt": "Kids are playing", "max_new_tokens": 6}).json()
    assert out.choices[0].text == plain["text"]
    batch = client.completions.create(model="tiny", prompt=["one", "two"], max_tokens=3, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1]
    chunks = list(client.completions.create(model="tiny", prompt="Kids are playing", max_tokens=6, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == plain["text"]


def test_echo_logprobs_for_loglikelihood(server):
    """What lm-evaluation-harness's local-completions sends for loglikelihood requests."""
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    out = client.completions.create(model="tiny", prompt="The chef is preparing a meal", max_tokens=0, echo=True, logprobs=1, temperature=0)
    lp = out.choices[0].logprobs
    assert out.choices[0].text == "The chef is preparing a meal"
    assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:])
    assert "".join(lp.tokens) == "The chef is preparing a meal"
    # the same numbers /score gives for the last word
    ctx, ending = "The chef is preparing a", " meal"
    scored = httpx.post(server.url + "/score", json={"context": ctx, "endings": [ending]}).json()["scores"][0]
    n = scored["num_tokens"]
    assert math.isclose(sum(lp.token_logprobs[-n:]), scored["logprob"], abs_tol=1e-3)
    for tok_lp, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert max(top.values()) >= tok_lp - 1e-5
