"""Typed service errors. The API maps them to HTTP in one place (``app.api.errors``)."""

from __future__ import annotations


class ServiceError(Exception):
    """Base class: carries the HTTP status and a stable machine-readable type."""

    status_code = 500
    error_type = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}


class InvalidRequest(ServiceError):
    status_code = 400
    error_type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    error_type = "context_length_exceeded"


class Unauthorized(ServiceError):
    status_code = 401
    error_type = "authentication_error"


class NotFound(ServiceError):
    status_code = 404
    error_type = "not_found"


class PayloadTooLarge(ServiceError):
    status_code = 413
    error_type = "payload_too_large"


class QueueFull(ServiceError):
    status_code = 503
    error_type = "overloaded"

    def __init__(self, message: str = "server is at capacity, retry later", retry_after_s: int = 1):
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class ServiceUnavailable(ServiceError):
    status_code = 503
    error_type = "service_unavailable"

    def __init__(self, message: str, retry_after_s: int = 5):
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class EngineDead(ServiceUnavailable):
    error_type = "engine_dead"


class InsufficientMemory(ServiceUnavailable):
    error_type = "insufficient_memory"


class RequestTimeout(ServiceError):
    status_code = 504
    error_type = "timeout"


class RequestCancelled(ServiceError):
    # 499 is nginx's "client closed request": nobody reads it, it only shows in metrics.
    status_code = 499
    error_type = "cancelled"


class ModelError(ServiceError):
    """The model failed on a batch (the engine survives and keeps serving)."""

    status_code = 500
    error_type = "model_error"


class AssetError(Exception):
    """Fetching, verifying or converting the embedded default failed (CLI-facing)."""


class ModelStoreError(Exception):
    """A model could not be found or a model folder is incomplete/corrupt (CLI-facing)."""
