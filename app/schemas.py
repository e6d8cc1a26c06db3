"""Request and response bodies. Field limits here are static; limits that depend on settings
(max new tokens cap, max endings, the model's context) are checked by the routes."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


def _encodable(value: str, what: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # JSON allows lone surrogates (\ud800); no tokenizer can encode them.
        raise ValueError(f"{what} contains invalid Unicode (a lone surrogate)") from None
    return value


def _not_blank(value: str, what: str) -> str:
    _encodable(value, what)
    if not value.strip():
        raise ValueError(f"{what} must contain non-whitespace text")
    return value


class GenerateRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"prompt": "The chef is preparing a meal. He takes out a knife and", "max_new_tokens": 32}]},
    )

    prompt: str = Field(..., min_length=1, max_length=200_000)
    max_new_tokens: int | None = Field(None, ge=1, description="Default from settings; capped by settings")
    max_length: int | None = Field(None, ge=1, description="Total length incl. the prompt (the tighter of the two wins)")
    temperature: float = Field(0.0, ge=0.0, le=100.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=1_000_000, description="0 = off")
    repetition_penalty: float = Field(1.0, gt=0.0, le=100.0)
    stop: list[str] | None = Field(None, max_length=16)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    cache: bool = Field(True, description="false bypasses the response cache")
    timeout_s: float | None = Field(None, ge=0.1, description="Per-request deadline in seconds (at least 0.1; capped by settings)")
    truncate: bool = Field(False, description="Keep the prompt's tail instead of rejecting a too-long prompt")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str) -> str:
        return _not_blank(v, "prompt")

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and any(not s or len(s) > 256 for s in v):
            raise ValueError("stop strings must be 1 to 256 characters")
        for s in v or ():
            _encodable(s, "stop")
        return v


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GenerateResponse(BaseModel):
    text: str
    finish_reason: Literal["length", "stop", "eos"]
    usage: Usage
    model: str
    cached: bool = False


class ScoreRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"context": "A man is sitting on a roof. He", "endings": ["is using wrap to wrap a pair of skis.", "starts pulling up roofing on a roof."]}]},
    )

    context: str = Field(..., min_length=1, max_length=200_000)
    endings: list[str] = Field(..., min_length=1, max_length=1024)
    cache: bool = True
    timeout_s: float | None = Field(None, ge=0.1, description="Per-request deadline in seconds (at least 0.1; capped by settings)")
    truncate: bool = Field(False, description="Drop the context's head instead of rejecting a too-long request")

    @field_validator("context")
    @classmethod
    def _context(cls, v: str) -> str:
        return _not_blank(v, "context")

    @field_validator("endings")
    @classmethod
    def _endings(cls, v: list[str]) -> list[str]:
        for i, ending in enumerate(v):
            _encodable(ending, f"endings[{i}]")
            if not ending.strip():
                raise ValueError(f"endings[{i}] must contain non-whitespace text")
            if len(ending) > 100_000:
                raise ValueError(f"endings[{i}] is too long")
        return v


class EndingScore(BaseModel):
    logprob: float = Field(..., description="sum of log p(ending tokens | context)")
    logprob_norm: float = Field(..., description="logprob / characters of the ending as sent (acc_norm)")
    num_tokens: int


class ScoreResponse(BaseModel):
    scores: list[EndingScore]
    best: int = Field(..., description="argmax of logprob_norm")
    best_unnormalized: int = Field(..., description="argmax of logprob")
    probabilities: list[float] = Field(..., description="softmax of logprob_norm over the endings")
    model: str
    cached: bool = False


# ---------------- OpenAI-compatible ----------------


def _check_texts(value, what: str):
    """Every string in a str-or-list field must be non-empty valid Unicode (token ids pass)."""
    items = [value] if isinstance(value, str) else (value or [])
    for text in (x for x in items if isinstance(x, str)):
        _encodable(text, what)
        if not text:
            raise ValueError(f"{what} must not be empty")
    return value


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1, description="only 1 is supported")
    best_of: int | None = Field(None, ge=1, le=1)
    stream: bool = False
    stream_options: dict | None = None
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0, description="not supported: must be 0")
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0, description="not supported: must be 0")
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    suffix: str | None = Field(None, max_length=0)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        return _check_texts(v, "prompt")

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        return _check_texts(v, "stop")

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v):
        if v:
            raise ValueError("logit_bias is not supported")
        return v


class ErrorBody(BaseModel):
    type: str
    message: str
    param: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
