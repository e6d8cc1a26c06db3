"""The one place where errors become HTTP: every error body is {"error": {type, message, param}}."""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.errors import ServiceError

log = logging.getLogger(__name__)


def error_body(error_type: str, message: str, param: str | None = None) -> dict:
    return {"error": {"type": error_type, "message": message, "param": param}}


def error_response(status: int, error_type: str, message: str, param: str | None = None, headers=None) -> JSONResponse:
    return JSONResponse(error_body(error_type, message, param), status_code=status, headers=headers)


def service_error_response(exc: ServiceError) -> JSONResponse:
    return error_response(exc.status_code, exc.error_type, exc.message, exc.param, exc.headers)


def _describe_validation(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        return "request body is not valid JSON", None
    if kind == "extra_forbidden":
        return f"unknown field {param!r}", param
    msg = first.get("msg", "invalid value")
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return (f"{param}: {msg}{more}" if param else f"{msg}{more}"), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service(_: Request, exc: ServiceError):
        return service_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        message, param = _describe_validation(exc)
        return error_response(422, "invalid_request_error", message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed", 401: "authentication_error"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, kind, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(UnicodeDecodeError)
    async def _unicode(_: Request, exc: UnicodeDecodeError):
        return error_response(400, "invalid_request_error", "request body is not valid UTF-8")

    @app.exception_handler(json.JSONDecodeError)
    async def _json(_: Request, exc: json.JSONDecodeError):
        return error_response(400, "invalid_request_error", "request body is not valid JSON")

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        # Logged with the traceback here; the client never sees one.
        log.exception("unhandled error")
        return error_response(500, "internal_error", "internal server error")
