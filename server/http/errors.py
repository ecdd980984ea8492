"""Errors of the HTTP shim in OpenAI's JSON shape, with the HTTP status a client expects.

Every failure answers `{"error": {"message", "type", "param", "code"}}`:

    gRPC INVALID_ARGUMENT, FAILED_PRECONDITION, ALREADY_EXISTS,
         OUT_OF_RANGE; a request body that does not parse  -> 400 invalid_request_error
    gRPC UNAUTHENTICATED (missing or wrong API key)        -> 401 authentication_error
    gRPC PERMISSION_DENIED (admin token needed)            -> 403 permission_error
    gRPC NOT_FOUND (an unknown model or adapter)           -> 404 not_found_error
    a request body over the shim's size limit, or gRPC
         RESOURCE_EXHAUSTED "message larger than max"      -> 413 invalid_request_error
    gRPC RESOURCE_EXHAUSTED (the engine's queue is full)   -> 429 rate_limit_error, with Retry-After
    gRPC UNIMPLEMENTED                                     -> 501 not_implemented_error
    gRPC UNAVAILABLE (engine stopped, server unreachable)  -> 503 service_unavailable_error
    gRPC DEADLINE_EXCEEDED                                 -> 504 timeout_error
    anything else                                          -> 500 server_error

The gRPC server already says what was wrong; its message is passed on in HTTP terms (no RPC or
status-code names: `server.http.client_words`), cut to MAX_MESSAGE_BYTES of valid UTF-8 like every
message here; `code` is OpenAI's (invalid_api_key, model_not_found, rate_limit_exceeded, ...) or
null. A body that is not a JSON object sent as JSON gets one sentence saying so. 429 means "retry later" (OpenAI's
clients do, by themselves), so only a full queue gets it, with the server's retry hint
(`grpc-retry-pushback-ms`) as Retry-After; a too-large request must not be retried: 413.
Starlette's own errors keep their headers (405's Allow). This module does not know the routes.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from http import HTTPStatus
from typing import Any

import grpc
import grpc.aio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters_store.errors import shown
from server.engine.request import CONTEXT_LENGTH_EXCEEDED
from server.http.client_words import body_problem, for_http
from server.quoting import LONE_SURROGATE, encodable

logger = logging.getLogger(__name__)

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    501: "not_implemented_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}

_HTTP_STATUS_BY_GRPC = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ALREADY_EXISTS: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
# OpenAI's `code` of an error, where it has one (null otherwise).
_CODE_BY_STATUS = {
    401: "invalid_api_key",
    404: "not_found",
    413: "request_too_large",
    429: "rate_limit_exceeded",
}
MAX_MESSAGE_BYTES = 2048
DEFAULT_RETRY_AFTER_S = 1
# What gRPC says when a message or its metadata is over a size limit (RESOURCE_EXHAUSTED too).
_TOO_LARGE_MARKERS = ("larger than max", "size exceeds limit")
_PUSHBACK_KEY = "grpc-retry-pushback-ms"
# Validation errors that say what is wrong with a value (ours, and unparseable text).
_OWN_CHECKS = frozenset({"value_error", "string_unicode"})
_VALUE_ERROR = "Value error, "  # pydantic's prefix to the message of a ValueError


class ApiError(Exception):
    """An error the shim itself answers with (not one that came from the gRPC server)."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = dict(headers or {})


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error JSON for an HTTP status; the message bounded and valid UTF-8."""
    error_type = _TYPE_BY_STATUS.get(status, "server_error")
    message = encodable(message, MAX_MESSAGE_BYTES)
    if param is not None:
        param = encodable(param, MAX_MESSAGE_BYTES)
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def from_rpc_error(err: grpc.aio.AioRpcError, prompt_field: str | None = None) -> ApiError:
    """The HTTP error for a failed gRPC call, in HTTP terms (`client_words.for_http`): no RPC or
    status-code names; `code` is OpenAI's where it has one. `prompt_field` names the request's
    prompt (chat: messages, completions: prompt) for a prompt over the context length."""
    status = _HTTP_STATUS_BY_GRPC.get(err.code(), 500)
    details = err.details() or ""
    message = for_http(details) or HTTPStatus(status).phrase
    headers: dict[str, str] = {}
    if err.code() == grpc.StatusCode.UNAVAILABLE and "failed to connect" in details.lower():
        logger.warning("the gRPC server is not reachable: %s", details)
        message = "the loramux engine is not reachable (starting, stopped or restarting); retry later"
    if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
        if any(marker in details for marker in _TOO_LARGE_MARKERS):
            status = 413
            message = f"the request is too large ({message}); send less"
        else:
            headers["Retry-After"] = str(_retry_after_s(err))
    param = _named_field(message) if err.code() == grpc.StatusCode.INVALID_ARGUMENT else None
    code = _CODE_BY_STATUS.get(status)
    if err.code() == grpc.StatusCode.INVALID_ARGUMENT and CONTEXT_LENGTH_EXCEEDED in message:
        param, code = prompt_field, "context_length_exceeded"  # OpenAI's words for it
    return ApiError(status, message, param=param, code=code, headers=headers)


# Sampling fields whose refusals the engine words as "<field> must ...": the error's `param`.
_SAMPLING_FIELDS = frozenset(
    {
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "logprobs",
        "top_logprobs",
        "prompt_logprobs",
        "max_tokens",
        "n",
        "route_top_k",
    }
)


def prompt_field_of(path: str) -> str | None:
    """The field that holds the prompt of a request to `path` (None: not a generation)."""
    if path.endswith("/chat/completions"):
        return "messages"
    return "prompt" if path.endswith("/completions") else None


def _named_field(message: str) -> str | None:
    """The request field a refusal begins with ("temperature must be in [0, 100], got -1"), if known."""
    first = message.split(" ", 1)[0].rstrip(":,")
    return first if first in _SAMPLING_FIELDS else None


def _retry_after_s(err: grpc.aio.AioRpcError) -> int:
    """Whole seconds from the server's retry hint (grpc-retry-pushback-ms), at least 1."""
    for key, value in err.trailing_metadata() or ():
        if key == _PUSHBACK_KEY and isinstance(value, str) and value.isdigit():
            return max(1, math.ceil(int(value) / 1000))
    return DEFAULT_RETRY_AFTER_S


def install_handlers(
    app: FastAPI,
    on_refused: Callable[[str | None], None] | None = None,
    generation_paths: frozenset[str] = frozenset(),
) -> None:
    """Make every error of `app` answer OpenAI's error JSON; a body refused on one of
    `generation_paths` is reported to `on_refused` with its `model` (None: not found)."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(grpc.aio.AioRpcError)
    async def rpc_error(request: Request, exc: grpc.aio.AioRpcError) -> JSONResponse:
        error = from_rpc_error(exc, prompt_field_of(request.url.path))
        if error.status >= 500:
            logger.warning("%s %s -> %d: %s", request.method, request.url.path, error.status, error.message)
        return error_response(error.status, error.message, error.param, error.code, error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        # OpenAI answers a malformed body with 400, not FastAPI's 422.
        if on_refused is not None and request.url.path in generation_paths:
            on_refused(await _model_of(request))
        problems = exc.errors()
        whole_body = body_problem(request.headers.get("content-type"), problems)
        if whole_body is not None:  # not JSON, not sent as JSON, empty, or not an object
            return error_response(400, whole_body)
        first = _most_telling(problems)
        location = [str(part) for part in first.get("loc", ()) if _is_field(part)]
        param = ".".join(location) or None
        message = first.get("msg", "the request body is invalid").removeprefix(_VALUE_ERROR)
        if first.get("type") == "string_unicode":  # pydantic's JSON parser met a lone surrogate
            message = LONE_SURROGATE
        if param:
            message = f"{param}: {message}"
        if len(problems) > 1:
            message += f" (and {len(problems) - 1} more problem(s))"
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {shown(request.url.path)}; see /docs for the API"
        return error_response(exc.status_code, message, headers=exc.headers)


async def _model_of(request: Request) -> str | None:
    """The `model` of a request body already read (FastAPI keeps it), if it is a JSON object with one."""
    try:
        body = json.loads(await request.body())
    except (ValueError, RuntimeError):
        return None
    model = body.get("model") if isinstance(body, dict) else None
    return model if isinstance(model, str) else None


def _most_telling(problems: Sequence[Any]) -> dict[str, Any]:
    """The problem to report: one of our own checks (a value error) first, then the deepest field.

    A union such as `prompt` fails once per branch it could have been; the branch that got
    furthest (or that ran our check) says what is really wrong.
    """
    if not problems:
        return {}

    def rank(problem: Any) -> tuple[bool, int]:
        depth = sum(1 for part in problem.get("loc", ()) if _is_field(part))
        return problem.get("type") not in _OWN_CHECKS, -depth

    return dict(min(problems, key=rank))


def _is_field(part: object) -> bool:
    """A field name or list index of a validation error's location; not "body" and not the
    union branch pydantic tried (`function-after[...]`, `list[str]`)."""
    text = str(part)
    return text != "body" and "[" not in text and "-" not in text
