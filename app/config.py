"""One validated settings object for the service, read from the environment (prefix ``APP_``).

Nothing here reads the environment at import time: ``Settings()`` does it when called, so
tests and the CLI build their own instances.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="APP_", extra="ignore", protected_namespaces=())

    # --- model ---
    model: str | None = Field(
        None,
        description="Model-store name, local checkpoint path or hub id. Unset: newest fine-tuned "
        "model in the store, else the embedded base model.",
    )
    model_store_dir: Path = Path("model_store")
    data_dir: Path = Path("data")
    asset_cache_dir: Path = Path(".cache/assets")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    quantization: Literal["none", "int8"] = Field(
        "none", description="int8: dynamic int8 linear layers, CPU only"
    )
    trust_remote_code: bool = False
    allow_pickle_weights: bool = Field(
        False, description="Permit .bin (pickle) checkpoints. Off: safetensors only."
    )
    fetch_assets_on_start: bool = Field(
        True, description="Fetch and convert the embedded default when the store is empty."
    )

    # --- HTTP ---
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # NoDecode: accept "k1,k2" from the environment as well as a JSON list.
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    metrics_require_auth: bool = False
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    max_body_bytes: int = Field(1_000_000, ge=1024)
    log_level: str = "info"

    # --- batching / engine ---
    max_batch_size: int = Field(32, ge=1, description="Max sequences decoding together")
    score_max_batch_size: int = Field(8, ge=1, description="Max /score requests per forward")
    max_batch_tokens: int = Field(
        8192, ge=16, description="Token budget per batch (prompt + max new tokens per sequence)"
    )
    max_wait_ms: float = Field(5.0, ge=0, description="How long a lone /score job waits for mates")
    max_queue: int = Field(512, ge=1, description="Waiting requests beyond this get 503")
    default_max_new_tokens: int = Field(64, ge=1)
    max_new_tokens_cap: int = Field(1024, ge=1)
    max_endings: int = Field(16, ge=1)
    warmup: bool = True

    # --- timeouts / shutdown ---
    request_timeout_s: float = Field(120.0, gt=0)
    max_request_timeout_s: float = Field(600.0, gt=0)
    drain_timeout_s: float = Field(30.0, ge=0)

    # --- response cache ---
    cache_enabled: bool = True
    cache_max_entries: int = Field(4096, ge=0)
    cache_max_bytes: int = Field(64 * 1024 * 1024, ge=0)
    cache_ttl_s: float | None = Field(None, gt=0)

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _split_csv(cls, value):
        if isinstance(value, str):
            stripped = value.strip()
            if stripped.startswith("["):
                return json.loads(stripped)
            return [part.strip() for part in stripped.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _check_limits(self) -> "Settings":
        if self.default_max_new_tokens > self.max_new_tokens_cap:
            raise ValueError("default_max_new_tokens must not exceed max_new_tokens_cap")
        if self.request_timeout_s > self.max_request_timeout_s:
            raise ValueError("request_timeout_s must not exceed max_request_timeout_s")
        return self
