"""Map the exceptions an RPC raises to gRPC status codes, in one server interceptor.

The servicer raises domain errors and never builds a status itself; this interceptor turns
them into codes so that every failure reaches the client as a status, never as a successful
answer carrying an error string:

    AdapterNotFound      -> NOT_FOUND
    AdapterExists        -> ALREADY_EXISTS
    AdapterTooLarge      -> FAILED_PRECONDITION (not "retry later": it needs --host-cache-mb raised)
    AdapterError (other) -> INVALID_ARGUMENT (a refused adapter or adapter request)
    RouterDisabled       -> FAILED_PRECONDITION ("auto", Route or example prompts without a router)
    InvalidRequest       -> INVALID_ARGUMENT
    AdaptersDisabled     -> FAILED_PRECONDITION
    EngineOverloaded     -> RESOURCE_EXHAUSTED, with the trailer `grpc-retry-pushback-ms`
    EngineUnavailable    -> UNAVAILABLE
    NotImplementedError  -> UNIMPLEMENTED
    RequestTimedOut      -> DEADLINE_EXCEEDED (the server's --request-timeout)
    GenerationFailed     -> INTERNAL (the engine's message, logged)
    anything else        -> INTERNAL (a generic message; the traceback goes to the log)

RESOURCE_EXHAUSTED means "retry later" and is sent only for a full queue; the pushback trailer
(gRPC's own retry hint) tells clients, the HTTP shim included (429 + Retry-After), when. gRPC
itself answers RESOURCE_EXHAUSTED "message larger than max" for a request over the server's
receive limit (`server.grpc_server.MAX_RECEIVE_BYTES`). Every status message is cut to
MAX_STATUS_MESSAGE_BYTES of valid UTF-8, so that no echoed input can outgrow gRPC's metadata
limit (which the client would report as RESOURCE_EXHAUSTED).

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
from server.preparation import RouterDisabled
from server.quoting import encodable

logger = logging.getLogger(__name__)

INFERENCE_METHOD_PREFIX = "/loramux.v1.Inference/"
# Far below gRPC's 8 KiB metadata limit even when every byte is percent-encoded (x3).
MAX_STATUS_MESSAGE_BYTES = 1024
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"
OVERLOAD_RETRY_AFTER_MS = 1000


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
    (AdapterTooLarge, grpc.StatusCode.FAILED_PRECONDITION),
    (AdapterError, grpc.StatusCode.INVALID_ARGUMENT),
    (RouterDisabled, grpc.StatusCode.FAILED_PRECONDITION),
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (AdaptersDisabled, grpc.StatusCode.FAILED_PRECONDITION),
    (EngineOverloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (EngineUnavailable, grpc.StatusCode.UNAVAILABLE),
    (NotImplementedError, grpc.StatusCode.UNIMPLEMENTED),
    (RequestTimedOut, grpc.StatusCode.DEADLINE_EXCEEDED),
    (GenerationFailed, grpc.StatusCode.INTERNAL),
)


def status_for(exc: BaseException, method: str) -> tuple[grpc.StatusCode, str]:
    """The status code and client-facing message (bounded, valid UTF-8) for an exception of `method`."""
    for error_type, code in _STATUS_BY_ERROR:
        if isinstance(exc, error_type):
            return code, encodable(str(exc) or error_type.__name__, MAX_STATUS_MESSAGE_BYTES)
    return grpc.StatusCode.INTERNAL, f"internal error in {method} ({type(exc).__name__}); see the server log"


def _trailer(exc: BaseException) -> tuple[tuple[str, str], ...]:
    """The trailing metadata of a failed call: a retry hint for a full queue only."""
    if isinstance(exc, EngineOverloaded):
        return ((RETRY_PUSHBACK_KEY, str(OVERLOAD_RETRY_AFTER_MS)),)
    return ()


async def _abort(context: grpc.aio.ServicerContext, exc: Exception, method: str) -> None:
    if isinstance(exc, grpc.aio.AbortError):  # the handler already set a status
        raise exc
    code, message = status_for(exc, method)
    if code == grpc.StatusCode.INTERNAL:
        logger.error("%s failed: %s", method, message, exc_info=exc)
    else:
        logger.info("%s -> %s: %s", method, code.name, message)
    await context.abort(code, message, trailing_metadata=_trailer(exc))


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
