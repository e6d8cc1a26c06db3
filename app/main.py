"""FastAPI app factory, lifespan (load -> warm up -> serve -> drain) and the ``serve`` CLI.

    hellaswag-serve                       # embedded default (fetched on first start), :8000
    hellaswag-serve --model my-finetune   # a model-store name, a local checkpoint or a hub id
    APP_DEVICE=cpu APP_MAX_BATCH_SIZE=16 hellaswag-serve --host 0.0.0.0
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import threading
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app.api.errors import install_error_handlers
from app.api.middleware import BodyLimitMiddleware, MetricsMiddleware
from app.api.routes import protected, router
from app.cache import ResponseCache
from app.config import Settings
from app.errors import AssetError, ModelStoreError
from app.metrics import Metrics

log = logging.getLogger("app")


class ServiceState:
    """Everything the routes need, owned by one app instance."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = Metrics()
        self.cache = ResponseCache(
            settings.cache_max_entries if settings.cache_enabled else 0, settings.cache_max_bytes, settings.cache_ttl_s
        )
        self.inference = None
        self.engine = None
        self.loaded = None
        self.warm = False
        self.draining = False
        self.load_error: str | None = None
        self.metrics.bind(engine=None, cache=self.cache, ready=lambda: self.ready)

    @property
    def ready(self) -> bool:
        return self.warm and not self.draining and self.engine is not None and self.engine.alive

    def engine_problem(self) -> str | None:
        if self.engine is not None and self.engine.dead_reason:
            return f"engine failed: {self.engine.dead_reason}"
        return None

    # ---------------------------------------------------------------- startup
    def load(self) -> None:
        """Blocking: resolve + load the model, start the engine, warm it up."""
        from app.api.service import InferenceService
        from app.engine.engine import Engine
        from app.engine.runner import ModelRunner
        from app.engine.types import BatchLimits
        from app.assets import BASE_MODEL_NAME
        from app.model_store import is_complete_model_dir, load_model, resolve_model

        s = self.settings
        t0 = time.perf_counter()
        if s.model is None and s.fetch_assets_on_start and not is_complete_model_dir(s.model_store_dir / BASE_MODEL_NAME):
            # Also when only a shipped fine-tuned adapter is present: it needs its base.
            from app.assets import fetch_assets

            log.info("embedded base model missing: fetching it")
            fetch_assets(s.model_store_dir, s.data_dir, s.asset_cache_dir)
        entry = resolve_model(s.model, s.model_store_dir)
        log.info("loading model %s (%s)", entry.name, entry.kind)
        loaded = load_model(
            entry, store_dir=s.model_store_dir, device=s.device, dtype=s.dtype, quantization=s.quantization,
            trust_remote_code=s.trust_remote_code, allow_pickle=s.allow_pickle_weights,
        )
        eos = loaded.model.generation_config.eos_token_id if loaded.model.generation_config else None
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if loaded.tokenizer.eos_token_id is not None:
            eos_ids.add(loaded.tokenizer.eos_token_id)
        runner = ModelRunner(loaded.model, loaded.tokenizer, context_length=loaded.context_length, eos_ids=eos_ids)
        limits = BatchLimits(
            max_batch_size=s.max_batch_size, score_max_batch_size=s.score_max_batch_size,
            max_batch_tokens=s.max_batch_tokens, max_wait_s=s.max_wait_ms / 1000, max_queue=s.max_queue,
        )
        engine = Engine(runner, limits, observer=self.metrics)
        engine.start()
        self.loaded, self.engine = loaded, engine
        self.metrics.bind(engine=engine, cache=self.cache, ready=lambda: self.ready)
        self.metrics.set_model(
            entry.name, str(loaded.dtype).removeprefix("torch."), loaded.device, entry.kind, loaded.quantization
        )
        self.inference = InferenceService(s, loaded, engine, self.cache)
        log.info("model loaded in %.1fs on %s (%s)", time.perf_counter() - t0, loaded.device, loaded.dtype)

    async def warm_up(self) -> None:
        from app.schemas import GenerateRequest, ScoreRequest

        if self.settings.warmup:
            t0 = time.perf_counter()
            await self.inference.generate(GenerateRequest(prompt="Hello", max_new_tokens=2, cache=False))
            await self.inference.score(ScoreRequest(context="The sky is", endings=["blue.", "green."], cache=False))
            log.info("warm-up done in %.2fs", time.perf_counter() - t0)
        self.warm = True

    async def start(self) -> None:
        try:
            await asyncio.to_thread(self.load)
            await self.warm_up()
            log.info("ready")
        except (ModelStoreError, AssetError) as exc:
            self.load_error = f"model failed to load: {exc}"
            log.error("%s", self.load_error)
        except Exception as exc:  # noqa: BLE001 - reported on /ready and in the log
            self.load_error = f"model failed to load: {type(exc).__name__}: {exc}"
            log.exception("model failed to load")

    # ---------------------------------------------------------------- shutdown
    def begin_drain(self) -> None:
        self.draining = True
        if self.engine is not None:
            self.engine.stop_accepting()

    async def wait_drained(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.engine is None or self.engine.idle:
                return True
            await asyncio.sleep(0.05)
        return False

    def close(self) -> None:
        if self.engine is not None:
            self.engine.stop()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    svc = ServiceState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = asyncio.create_task(svc.start())
        app.state.loader = loader
        try:
            yield
        finally:
            svc.begin_drain()
            await svc.wait_drained(settings.drain_timeout_s)
            loader.cancel()
            svc.close()

    app = FastAPI(
        title="HellaSwag LM service",
        version="0.1.0",
        description="Batched /generate and /score (multiple choice) for a small causal LM, plus OpenAI-compatible /v1/completions.",
        lifespan=lifespan,
    )
    app.state.svc = svc
    _publish_limits_in_schema(app, settings)
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(protected)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"], allow_headers=["*"])
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=svc.metrics)
    return app


def _publish_limits_in_schema(app: FastAPI, settings: Settings) -> None:
    """Put this server's configured caps into /openapi.json so clients (and fuzzers) see them."""
    base_openapi = app.openapi

    def set_bound(prop: dict, json_type: str, key: str, value) -> None:
        # Optional fields are ``anyOf: [{type: ...}, {type: null}]``; required ones are plain.
        for variant in prop.get("anyOf", [prop]):
            if variant.get("type") == json_type:
                variant[key] = value

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = base_openapi()
            models = schema.get("components", {}).get("schemas", {})
            gen = models.get("GenerateRequest", {}).get("properties", {})
            set_bound(gen.get("max_new_tokens", {}), "integer", "maximum", settings.max_new_tokens_cap)
            set_bound(gen.get("timeout_s", {}), "number", "maximum", settings.max_request_timeout_s)
            score = models.get("ScoreRequest", {}).get("properties", {})
            set_bound(score.get("endings", {}), "array", "maxItems", settings.max_endings)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


class DrainingServer:
    """uvicorn with graceful SIGTERM: stop admitting (503, /ready fails), let in-flight work
    finish for up to the drain timeout, then exit 0."""

    def __init__(self, app: FastAPI, settings: Settings):
        import uvicorn

        self.app = app
        self.settings = settings
        config = uvicorn.Config(
            app, host=settings.host, port=settings.port, log_level=settings.log_level,
            timeout_graceful_shutdown=max(int(settings.drain_timeout_s), 1), access_log=False,
        )
        self.server = uvicorn.Server(config)
        self._signalled = threading.Event()

    def _on_signal(self, signum, frame) -> None:
        if self._signalled.is_set():  # second signal: stop now
            self.server.force_exit = True
            self.server.should_exit = True
            return
        self._signalled.set()
        log.info("received %s: draining (up to %.0fs)", signal.Signals(signum).name, self.settings.drain_timeout_s)
        svc: ServiceState = self.app.state.svc
        svc.begin_drain()

        def wait_then_exit() -> None:
            deadline = time.monotonic() + self.settings.drain_timeout_s
            while time.monotonic() < deadline and svc.engine is not None and not svc.engine.idle:
                time.sleep(0.05)
            self.server.should_exit = True

        threading.Thread(target=wait_then_exit, daemon=True).start()

    def run(self) -> None:
        # uvicorn installs its own handlers inside serve(); ours are put back right after startup.
        async def serve() -> None:
            task = asyncio.create_task(self.server.serve())
            while not self.server.started and not task.done():
                await asyncio.sleep(0.05)
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._on_signal)
            await task

        asyncio.run(serve())


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve the HellaSwag LM (settings also from APP_* env vars)")
    parser.add_argument("--model", help="model-store name, local checkpoint folder or hub id")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--device")
    parser.add_argument("--dtype")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    settings = Settings(**overrides)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    DrainingServer(create_app(settings), settings).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
