"""Thin HTTP routes: validate -> (cache) -> engine -> respond. No model code here."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from typing import Any, Awaitable

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from app.api.errors import error_body
from app.engine.types import TokenEvent
from app.errors import InvalidRequest, RequestCancelled, ServiceError, ServiceUnavailable, Unauthorized
from app.schemas import CompletionRequest, ErrorResponse, GenerateRequest, GenerateResponse, ScoreRequest, ScoreResponse

DISCONNECT_POLL_S = 0.05


def state(request: Request):
    return request.app.state.svc


def require_key(request: Request) -> None:
    keys: list[str] = state(request).settings.api_keys
    if not keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    supplied = token.strip().encode() if scheme.lower() == "bearer" else b""
    # Compare against every key, always, so timing says nothing about which one nearly matched.
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(supplied, key.encode())
    if not ok:
        raise Unauthorized("missing or invalid API key (send Authorization: Bearer <key>)",
                           headers={"WWW-Authenticate": "Bearer"})


def require_metrics_key(request: Request) -> None:
    if state(request).settings.metrics_require_auth:
        require_key(request)


def service(request: Request):
    svc = state(request)
    if svc.draining:
        raise ServiceUnavailable("server is shutting down")
    if svc.inference is None:
        raise ServiceUnavailable(svc.load_error or "model is loading")
    return svc.inference


async def until_disconnect(request: Request, work: Awaitable[Any]) -> Any:
    """Await ``work``; if the client goes away first, cancel it (which cancels the engine job)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise RequestCancelled("client disconnected")
    finally:
        if not task.done():
            task.cancel()


def no_cache(request: Request) -> bool:
    return "no-cache" in request.headers.get("cache-control", "").lower()


def _errors(*codes: int) -> dict:
    described = {400: "invalid request", 401: "missing or invalid API key", 413: "body too large",
                 422: "request does not match the schema", 499: "client went away", 503: "overloaded, loading or draining",
                 504: "deadline exceeded", 500: "model failed on this batch"}
    return {c: {"model": ErrorResponse, "description": described[c]} for c in codes}


INFERENCE_ERRORS = _errors(400, 401, 413, 422, 499, 500, 503, 504)

router = APIRouter(responses=_errors(413))
protected = APIRouter(dependencies=[Depends(require_key)], responses=_errors(401, 413, 503))


@router.get("/health", tags=["ops"])
async def health() -> dict:
    """Process liveness: answers even while the model loads or runs."""
    return {"status": "ok"}


@router.get("/ready", tags=["ops"], responses=_errors(503))
async def ready(request: Request):
    svc = state(request)
    if svc.ready:
        return {"status": "ready", "model": svc.inference.model_name}
    reason = "draining" if svc.draining else (svc.load_error or svc.engine_problem() or "loading")
    return JSONResponse(error_body("not_ready", reason), status_code=503, headers={"Retry-After": "5"})


@router.get("/metrics", tags=["ops"], dependencies=[Depends(require_metrics_key)], response_class=PlainTextResponse,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus exposition"}, **_errors(401)})
async def metrics(request: Request):
    return Response(state(request).metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")


@protected.get("/info", tags=["ops"])
async def info(request: Request) -> dict:
    return service(request).info()


def _sse(payload: dict | str, event: str | None = None) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return ((f"event: {event}\n" if event else "") + f"data: {data}\n\n").encode()


@protected.post("/generate", response_model=GenerateResponse, tags=["inference"],
                responses={200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE when stream=true"}, **INFERENCE_ERRORS})
async def generate(body: GenerateRequest, request: Request):
    inference = service(request)
    if body.stream:
        return _stream_generate(body, request, inference)
    if no_cache(request):
        body = body.model_copy(update={"cache": False})
    response, cached = await until_disconnect(request, inference.generate(body))
    return {**response, "cached": cached}


def _stream_generate(body: GenerateRequest, request: Request, inference):
    prepared = inference.prepare_generate(body)
    key, hit = inference.cached_generate(body.model_copy(update={"cache": body.cache and not no_cache(request)}), prepared)
    if hit is not None:
        async def replay():
            yield _sse({"text": hit["text"]})
            yield _sse({"text": "", **hit, "cached": True})
            yield _sse("[DONE]")
        return StreamingResponse(replay(), media_type="text/event-stream")
    job = inference.start_stream(prepared)

    async def events():
        try:
            async for event in inference.stream_events(job, key):
                if isinstance(event, TokenEvent):
                    yield _sse({"text": event.text})
                else:
                    yield _sse({**event, "text": "", "cached": False})
            yield _sse("[DONE]")
        except ServiceError as exc:
            yield _sse(error_body(exc.error_type, exc.message), event="error")

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@protected.post("/score", response_model=ScoreResponse, tags=["inference"], responses=INFERENCE_ERRORS)
async def score(body: ScoreRequest, request: Request):
    inference = service(request)
    if no_cache(request):
        body = body.model_copy(update={"cache": False})
    response, cached = await until_disconnect(request, inference.score(body))
    return {**response, "cached": cached}


# The seed's clients post to the trailing-slash paths; answer there directly (no redirect).
protected.add_api_route("/generate/", generate, methods=["POST"], include_in_schema=False)
protected.add_api_route("/score/", score, methods=["POST"], include_in_schema=False)


@protected.get("/v1/models", tags=["openai"])
async def list_models(request: Request) -> dict:
    inference = service(request)
    return {"object": "list", "data": [{"id": inference.model_name, "object": "model", "created": 0, "owned_by": "local"}]}


@protected.post("/v1/completions", tags=["openai"], responses={200: {"content": {"text/event-stream": {}}}, **INFERENCE_ERRORS})
async def completions(body: CompletionRequest, request: Request):
    inference = service(request)
    prompts = inference.completion_prompts(body)
    created = int(time.time())
    ident = f"cmpl-{uuid.uuid4().hex[:24]}"
    if body.stream:
        if len(prompts) != 1 or body.logprobs is not None or body.echo:
            raise InvalidRequest("stream supports one prompt without echo/logprobs", param="stream")
        return _stream_completion(body, prompts[0], request, inference, ident, created)

    async def run_all():
        return await asyncio.gather(*(inference.completion_choice(body, p, i) for i, p in enumerate(prompts)))

    results = await until_disconnect(request, run_all())
    usage = {"prompt_tokens": sum(u["prompt_tokens"] for _, u in results), "completion_tokens": sum(u["completion_tokens"] for _, u in results)}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return {
        "id": ident, "object": "text_completion", "created": created, "model": inference.model_name,
        "choices": [c for c, _ in results], "usage": usage,
    }


def _stream_completion(body: CompletionRequest, prompt, request: Request, inference, ident: str, created: int):
    _, prepared = inference.prepare_completion(body, prompt)
    if prepared is None:
        raise InvalidRequest("stream needs max_tokens > 0", param="max_tokens")
    job = inference.start_stream(prepared)

    def chunk(text: str, finish: str | None, usage: dict | None = None) -> bytes:
        payload = {"id": ident, "object": "text_completion", "created": created, "model": inference.model_name,
                   "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
        if usage is not None:
            payload["usage"] = usage
        return _sse(payload)

    async def events():
        try:
            async for event in inference.stream_events(job, None):
                if isinstance(event, TokenEvent):
                    yield chunk(event.text, None)
                else:
                    yield chunk("", event["finish_reason"], event["usage"])
            yield _sse("[DONE]")
        except ServiceError as exc:
            yield _sse(error_body(exc.error_type, exc.message), event="error")

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
