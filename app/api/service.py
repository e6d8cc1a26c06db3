"""Turns validated requests into engine jobs and engine results into responses, through the
response cache. Knows the settings' limits and the tokenizer; knows nothing of HTTP."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

from app.cache import ResponseCache, cache_key
from app.config import Settings
from app.engine.client import AsyncSink, EngineClient
from app.engine.engine import Engine
from app.engine.types import GenerateJob, GenerateResult, SamplingParams, ScoreJob, ScoreResult, TokenEvent
from app.errors import ContextLengthExceeded, InvalidRequest
from app.model.scoring import argmax, encode_item, normalize, softmax
from app.model_store import LoadedModel
from app.schemas import CompletionRequest, GenerateRequest, ScoreRequest


@dataclass
class PreparedGenerate:
    job_args: dict
    normalized: dict
    deterministic: bool


class InferenceService:
    def __init__(self, settings: Settings, loaded: LoadedModel, engine: Engine, cache: ResponseCache):
        self.settings = settings
        self.loaded = loaded
        self.engine = engine
        self.client = EngineClient(engine)
        self.cache = cache
        self.tokenizer = loaded.tokenizer
        self.model_name = loaded.entry.name
        self.model_identity = loaded.entry.identity + f"|{loaded.dtype}|{loaded.quantization}"

    # ------------------------------------------------------------ shared helpers
    def _deadline(self, timeout_s: float | None) -> float:
        limit = min(timeout_s or self.settings.request_timeout_s, self.settings.max_request_timeout_s)
        return time.monotonic() + limit

    def _sink(self) -> AsyncSink:
        return AsyncSink(asyncio.get_running_loop())

    def _encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            vocab = len(self.tokenizer)
            if any(not (0 <= t < vocab) for t in prompt):
                raise InvalidRequest(f"token ids must be in [0, {vocab})", param="prompt")
            return list(prompt)
        return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]

    def _plan_generation(
        self, prompt_ids: list[int], max_new_tokens: int | None, max_length: int | None, truncate: bool
    ) -> tuple[list[int], int]:
        s, context = self.settings, self.loaded.context_length
        if not prompt_ids:
            raise InvalidRequest("prompt encodes to no tokens", param="prompt")
        new = max_new_tokens if max_new_tokens is not None else None
        if max_length is not None:
            room = max_length - len(prompt_ids)
            if room < 1 and not truncate:
                raise ContextLengthExceeded(
                    f"max_length {max_length} leaves no room after the prompt's {len(prompt_ids)} tokens",
                    param="max_length",
                )
            new = room if new is None else min(new, room)
        if new is None:
            new = s.default_max_new_tokens
        new = max(new, 1)
        if new > s.max_new_tokens_cap:
            raise InvalidRequest(
                f"max_new_tokens {new} exceeds this server's cap of {s.max_new_tokens_cap}", param="max_new_tokens"
            )
        limit = min(context, self.engine.limits.max_batch_tokens)
        if new >= limit:
            raise ContextLengthExceeded(
                f"{new} new tokens do not fit the model's {limit}-token window", param="max_new_tokens"
            )
        if len(prompt_ids) + new > limit:
            if not truncate:
                raise ContextLengthExceeded(
                    f"prompt has {len(prompt_ids)} tokens and {new} new tokens were asked for, but the limit "
                    f"is {limit} tokens in all; shorten the prompt, lower max_new_tokens or set truncate=true",
                    param="prompt",
                )
            prompt_ids = prompt_ids[-(limit - new):]  # keep the tail: it conditions the continuation
        return prompt_ids, new

    # ------------------------------------------------------------ /generate
    def _prepared(
        self, prompt_ids: list[int], new: int, *, temperature: float, top_p: float = 1.0, top_k: int = 0,
        repetition_penalty: float = 1.0, stop: list[str] | None = None, seed: int | None = None,
        timeout_s: float | None = None,
    ) -> PreparedGenerate:
        greedy = temperature == 0
        # Knobs that cannot change a greedy result are normalized away so equal requests hit.
        params = SamplingParams(
            max_new_tokens=new,
            temperature=temperature,
            top_p=1.0 if greedy else top_p,
            top_k=0 if greedy else top_k,
            repetition_penalty=repetition_penalty,
            stop=tuple(stop or ()),
            seed=None if greedy else seed,
        )
        normalized = {
            "prompt_ids": prompt_ids,
            **{k: getattr(params, k) for k in ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed")},
            "stop": list(params.stop),
        }
        return PreparedGenerate(
            {"prompt_ids": tuple(prompt_ids), "params": params, "deadline": self._deadline(timeout_s)},
            normalized,
            deterministic=greedy or seed is not None,
        )

    def prepare_generate(self, req: GenerateRequest) -> PreparedGenerate:
        prompt_ids, new = self._plan_generation(
            self._encode_prompt(req.prompt), req.max_new_tokens, req.max_length, req.truncate
        )
        return self._prepared(
            prompt_ids, new, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
            repetition_penalty=req.repetition_penalty, stop=req.stop, seed=req.seed, timeout_s=req.timeout_s,
        )

    def _generate_response(self, result: GenerateResult) -> dict:
        return {
            "text": result.text,
            "finish_reason": result.finish_reason,
            "usage": {
                "prompt_tokens": result.prompt_tokens,
                "completion_tokens": result.completion_tokens,
                "total_tokens": result.prompt_tokens + result.completion_tokens,
            },
            "model": self.model_name,
        }

    async def generate(self, req: GenerateRequest) -> tuple[dict, bool]:
        prepared = self.prepare_generate(req)

        async def compute() -> dict:
            job = GenerateJob(sink=self._sink(), **prepared.job_args)
            return self._generate_response(await self.client.result(job))

        if self.cache.enabled and req.cache and prepared.deterministic:
            key = cache_key(self.model_identity, "generate", prepared.normalized)
            return await self.cache.get_or_compute(key, compute)
        return await compute(), False

    def cached_generate(self, req: GenerateRequest, prepared: PreparedGenerate) -> tuple[str | None, dict | None]:
        if not (self.cache.enabled and req.cache and prepared.deterministic):
            return None, None
        key = cache_key(self.model_identity, "generate", prepared.normalized)
        hit = self.cache.get(key)
        if hit is not None:
            self.cache.hits += 1
        return key, hit

    def start_stream(self, prepared: PreparedGenerate) -> GenerateJob:
        """Submit now, so a full queue fails the HTTP request before any byte is streamed."""
        job = GenerateJob(sink=self._sink(), stream=True, **prepared.job_args)
        self.engine.submit(job)
        return job

    async def stream_events(self, job: GenerateJob, cache_key_: str | None) -> AsyncIterator[TokenEvent | dict]:
        async for event in self.client.stream(job):
            if isinstance(event, GenerateResult):
                final = self._generate_response(event)
                if cache_key_ is not None:
                    self.cache.misses += 1
                    self.cache.put(cache_key_, final)  # only a finished stream populates the cache
                yield final
            else:
                yield event

    # ------------------------------------------------------------ /score
    def prepare_score(self, context: str, endings: list[str], truncate: bool):
        s = self.settings
        if len(endings) > s.max_endings:
            raise InvalidRequest(f"at most {s.max_endings} endings per request (got {len(endings)})", param="endings")
        item = encode_item(self.tokenizer, context, endings)
        if any(len(c) == 0 for c in item.continuations):
            raise InvalidRequest("an ending encodes to no tokens", param="endings")
        limit = min(self.loaded.context_length, self.engine.limits.max_batch_tokens)
        longest = max(len(c) for c in item.continuations)
        need_window = len(item.context_ids) + longest
        if need_window > self.loaded.context_length or item.packed_length > self.engine.limits.max_batch_tokens:
            room_ctx = min(self.loaded.context_length - longest, limit - sum(max(len(c) - 1, 0) for c in item.continuations))
            if not truncate or room_ctx < 1:
                raise ContextLengthExceeded(
                    f"context ({len(item.context_ids)} tokens) plus endings need {item.packed_length} packed tokens "
                    f"(longest sequence {need_window}); limits: {self.loaded.context_length}-token window, "
                    f"{self.engine.limits.max_batch_tokens} batch tokens. Shorten it or set truncate=true",
                    param="context",
                )
            item = type(item)(item.context_ids[-room_ctx:], item.continuations)
        return item

    def _score_response(self, endings: list[str], result: ScoreResult) -> dict:
        norms = normalize(result.logprobs, endings)
        return {
            "scores": [
                {"logprob": lp, "logprob_norm": n, "num_tokens": k}
                for lp, n, k in zip(result.logprobs, norms, result.num_tokens)
            ],
            "best": argmax(norms),
            "best_unnormalized": argmax(result.logprobs),
            "probabilities": softmax(norms),
            "model": self.model_name,
        }

    async def score(self, req: ScoreRequest) -> tuple[dict, bool]:
        item = self.prepare_score(req.context, req.endings, req.truncate)

        async def compute() -> dict:
            job = ScoreJob(
                sink=self._sink(), deadline=self._deadline(req.timeout_s),
                context_ids=item.context_ids, continuations=item.continuations,
            )
            return self._score_response(req.endings, await self.client.result(job))

        if self.cache.enabled and req.cache:
            key = cache_key(self.model_identity, "score", {"context_ids": list(item.context_ids), "continuations": [list(c) for c in item.continuations], "endings": req.endings})
            return await self.cache.get_or_compute(key, compute)
        return await compute(), False

    # ------------------------------------------------------------ /v1/completions
    async def token_logprobs(self, ids: list[int], first_scored: int, top: int, deadline: float) -> ScoreResult:
        """Log-probs of ids[first_scored:] given what precedes them (echo / logprobs support)."""
        job = ScoreJob(
            sink=self._sink(), deadline=deadline, top_logprobs=top,
            context_ids=tuple(ids[:first_scored]), continuations=(tuple(ids[first_scored:]),),
        )
        return await self.client.result(job)

    def completion_prompts(self, req: CompletionRequest) -> list[str | list[int]]:
        p = req.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise InvalidRequest("prompt must not be empty", param="prompt")
        if all(isinstance(x, int) for x in p):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]

    def prepare_completion(self, req: CompletionRequest, prompt: str | list[int]) -> tuple[list[int], PreparedGenerate | None]:
        prompt_ids = self._encode_prompt(prompt)
        if not prompt_ids:
            raise InvalidRequest("prompt encodes to no tokens", param="prompt")
        if req.max_tokens == 0:
            return prompt_ids, None
        prompt_ids, new = self._plan_generation(prompt_ids, req.max_tokens, None, False)
        stop = [req.stop] if isinstance(req.stop, str) else req.stop
        return prompt_ids, self._prepared(prompt_ids, new, temperature=req.temperature, top_p=req.top_p, stop=stop, seed=req.seed)

    async def completion_choice(self, req: CompletionRequest, prompt: str | list[int], index: int) -> tuple[dict, dict]:
        prompt_ids, prepared = self.prepare_completion(req, prompt)
        prompt_text = prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt_ids)
        text, finish, gen_ids = "", "length", []
        if prepared is not None:
            result, _ = await self._generate_with_ids(prepared)
            text, finish, gen_ids = result["text"], result["finish_reason"], result["token_ids"]
        logprobs = None
        if req.logprobs is not None:
            logprobs = await self._completion_logprobs(prompt_ids, gen_ids, req.echo, req.logprobs)
        choice = {
            "index": index,
            "text": (prompt_text + text) if req.echo else text,
            "logprobs": logprobs,
            "finish_reason": finish,
        }
        return choice, {"prompt_tokens": len(prompt_ids), "completion_tokens": len(gen_ids)}

    async def _completion_logprobs(self, prompt_ids: list[int], gen_ids: list[int], echo: bool, top: int) -> dict:
        full = prompt_ids + list(gen_ids)
        # With echo the prompt's own tokens are scored too; the very first has no context.
        first = 1 if echo else len(prompt_ids)
        lps: list[float | None] = []
        tops: list[dict | None] = []
        if first < len(full):
            scored = await self.token_logprobs(full, first, top, self._deadline(None))
            lps = list(scored.token_logprobs[0])
            tops = [{self.tokenizer.decode([t]): lp for t, lp in alts} for alts in scored.top_logprobs[0]] if top else [None] * len(lps)
        shown = full if echo else full[first:]
        if echo:
            lps, tops = [None, *lps], [None, *tops]
        tokens = [self.tokenizer.decode([t]) for t in shown]
        offsets, pos = [], 0
        for tok in tokens:
            offsets.append(pos)
            pos += len(tok)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    async def _generate_with_ids(self, prepared: PreparedGenerate) -> tuple[dict, bool]:
        async def compute() -> dict:
            job = GenerateJob(sink=self._sink(), **prepared.job_args)
            result = await self.client.result(job)
            return {**self._generate_response(result), "token_ids": list(result.token_ids)}

        if self.cache.enabled and prepared.deterministic:
            key = cache_key(self.model_identity, "generate+ids", prepared.normalized)
            return await self.cache.get_or_compute(key, compute)
        return await compute(), False

    def info(self) -> dict[str, Any]:
        loaded, s = self.loaded, self.settings
        return {
            "model": {
                "name": self.model_name,
                "identity": self.model_identity,
                "path": str(loaded.entry.path) if loaded.entry.path else None,
                "hub_id": loaded.entry.hub_id,
                "kind": loaded.entry.kind,
                "fine_tuned": loaded.entry.is_fine_tuned,
                "manifest": loaded.entry.manifest,
                "dtype": str(loaded.dtype).removeprefix("torch."),
                "device": loaded.device,
                "quantization": loaded.quantization,
                "parameters": loaded.parameters,
                "context_length": loaded.context_length,
            },
            "settings": {
                k: getattr(s, k)
                for k in (
                    "max_batch_size", "score_max_batch_size", "max_batch_tokens", "max_wait_ms", "max_queue",
                    "default_max_new_tokens", "max_new_tokens_cap", "max_endings", "request_timeout_s",
                    "max_request_timeout_s", "drain_timeout_s", "cache_enabled", "cache_max_entries",
                    "cache_max_bytes", "cache_ttl_s", "max_body_bytes",
                )
            } | {"auth_enabled": bool(s.api_keys)},
            "engine": self.engine.stats.as_dict(),
        }
