"""Map the exceptions an RPC raises to gRPC status codes, in one server interceptor.

The servicer raises domain errors and never builds a status itself; this interceptor turns
them into codes so that every failure reaches the client as a status, never as a successful
answer carrying an error string:

    AdapterNotFound      -> NOT_FOUND
    AdapterExists        -> ALREADY_EXISTS
    AdapterTooLarge      -> RESOURCE_EXHAUSTED
    AdapterError (other) -> INVALID_ARGUMENT (a refused adapter or adapter request)
    InvalidRequest       -> INVALID_ARGUMENT
    AdaptersDisabled     -> FAILED_PRECONDITION
    EngineOverloaded     -> RESOURCE_EXHAUSTED
    EngineUnavailable    -> UNAVAILABLE
    NotImplementedError  -> UNIMPLEMENTED
    RequestTimedOut      -> DEADLINE_EXCEEDED (the server's --request-timeout)
    GenerationFailed     -> INTERNAL (the engine's message, logged)
    anything else        -> INTERNAL (a generic message; the traceback goes to the log)

It wraps only the methods of `loramux.v1.Inference`; health and reflection pass through.
It knows nothing about what the RPCs do.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio

from adapters_store.errors import AdapterError, AdapterExists, AdapterNotFound, AdapterTooLarge
from server.engine.request import EngineOverloaded, EngineUnavailable, InvalidRequest

logger = logging.getLogger(__name__)

INFERENCE_METHOD_PREFIX = "/loramux.v1.Inference/"


class GenerationFailed(RuntimeError):
    """The engine finished a request with FinishReason.ERROR (maps to INTERNAL)."""


class RequestTimedOut(RuntimeError):
    """A generation ran past the server's request timeout (maps to DEADLINE_EXCEEDED)."""


class AdaptersDisabled(RuntimeError):
    """An adapter RPC on a server started without adapters, `--max-slots 0` (maps to FAILED_PRECONDITION)."""


# Order matters: the first matching class wins.
_STATUS_BY_ERROR: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (AdapterNotFound, grpc.StatusCode.NOT_FOUND),
    (AdapterExists, grpc.StatusCode.ALREADY_EXISTS),
    (AdapterTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (AdapterError, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (AdaptersDisabled, grpc.StatusCode.FAILED_PRECONDITION),
    (EngineOverloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (EngineUnavailable, grpc.StatusCode.UNAVAILABLE),
    (NotImplementedError, grpc.StatusCode.UNIMPLEMENTED),
    (RequestTimedOut, grpc.StatusCode.DEADLINE_EXCEEDED),
    (GenerationFailed, grpc.StatusCode.INTERNAL),
)


def status_for(exc: BaseException, method: str) -> tuple[grpc.StatusCode, str]:
    """The status code and client-facing message for an exception raised by `method`."""
    for error_type, code in _STATUS_BY_ERROR:
        if isinstance(exc, error_type):
            return code, str(exc) or error_type.__name__
    return grpc.StatusCode.INTERNAL, f"internal error in {method} ({type(exc).__name__}); see the server log"


async def _abort(context: grpc.aio.ServicerContext, exc: Exception, method: str) -> None:
    if isinstance(exc, grpc.aio.AbortError):  # the handler already set a status
        raise exc
    code, message = status_for(exc, method)
    if code == grpc.StatusCode.INTERNAL:
        logger.error("%s failed: %s", method, message, exc_info=exc)
    else:
        logger.info("%s -> %s: %s", method, code.name, message)
    await context.abort(code, message)


def _wrap_unary(behavior: Callable[..., Awaitable[Any]], method: str) -> Callable[..., Awaitable[Any]]:
    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behavior(request, context)
        except Exception as exc:
            await _abort(context, exc, method)

    return unary


def _wrap_stream(
    behavior: Callable[..., AsyncIterator[Any]], method: str
) -> Callable[..., AsyncIterator[Any]]:
    async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for response in behavior(request, context):
                yield response
        except Exception as exc:
            await _abort(context, exc, method)

    return stream


class StatusInterceptor(grpc.aio.ServerInterceptor):
    """Wraps each `loramux.v1.Inference` handler so that exceptions become status codes."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler: Any = await continuation(handler_call_details)
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        if handler is None or not method.startswith(INFERENCE_METHOD_PREFIX):
            return handler
        # RpcMethodHandler is a namedtuple: replace the one behaviour that is set.
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=_wrap_unary(handler.unary_unary, method))
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=_wrap_stream(handler.unary_stream, method))
        return handler
