"""Bearer-token checks for gRPC and HTTP, and the server-side gate that refuses calls while draining.

Two secrets, both optional:
  - the API key: every `loramux.v1.Inference` call carries metadata `authorization: Bearer <key>`
    (HTTP: the `Authorization` header on `/v1/*`); a missing or wrong key is UNAUTHENTICATED (401);
  - the admin token: LoadAdapter / UnloadAdapter / RegisterExamples (HTTP: the admin routes) need it
    when set, and a call without it is PERMISSION_DENIED (403). The admin token also passes where the API key does.
The admin calls are refused (PERMISSION_DENIED, "admin_disabled") unless admin is enabled
(`--enable-admin`, `AuthConfig.enable_admin`) or an admin token is set, over gRPC as over HTTP.
Health and reflection stay open: load balancers probe them without credentials.

Comparisons are constant-time (`hmac.compare_digest`) and no key is ever logged or echoed.
This module knows nothing about what the RPCs do.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio

INFERENCE_METHOD_PREFIX = "/loramux.v1.Inference/"
ADMIN_METHODS = frozenset(
    INFERENCE_METHOD_PREFIX + method for method in ("LoadAdapter", "UnloadAdapter", "RegisterExamples")
)
BEARER = "bearer "


@dataclass(frozen=True)
class AuthConfig:
    """The secrets a server checks; None = not required. repr never shows them."""

    api_key: str | None = field(default=None, repr=False)
    admin_token: str | None = field(default=None, repr=False)
    enable_admin: bool = False  # admin calls allowed without an admin token (--enable-admin)

    @property
    def admin_allowed(self) -> bool:
        """Whether admin calls can pass at all: admin enabled, or an admin token to present."""
        return self.enable_admin or self.admin_token is not None


def bearer_token(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` value, or None."""
    if header is None or not header.lower().startswith(BEARER):
        return None
    return header[len(BEARER) :].strip()


def token_matches(given: str | None, expected: str) -> bool:
    """Constant-time comparison of a presented token with the expected one."""
    if given is None:
        return False
    return hmac.compare_digest(given.encode(), expected.encode())


def check(auth: AuthConfig, token: str | None, *, admin: bool) -> str | None:
    """None if `token` may make the call; else "unauthenticated", "permission_denied" or, for an
    admin call on a server where admin is neither enabled nor guarded by a token, "admin_disabled"."""
    if admin and not auth.admin_allowed:
        return "admin_disabled"
    if admin and auth.admin_token is not None:
        if token_matches(token, auth.admin_token):
            return None
        if auth.api_key is not None and not token_matches(token, auth.api_key):
            return "unauthenticated"
        return "permission_denied"
    if auth.api_key is None:
        return None
    if token_matches(token, auth.api_key):
        return None
    if auth.admin_token is not None and token_matches(token, auth.admin_token):
        return None
    return "unauthenticated"


UNAUTHENTICATED_MESSAGE = "missing or wrong API key; send it as 'Authorization: Bearer <key>'"
PERMISSION_DENIED_MESSAGE = (
    "loading and unloading adapters, and registering their example prompts, needs the admin token "
    "('Authorization: Bearer <token>')"
)
ADMIN_DISABLED_MESSAGE = (
    "loading and unloading adapters and registering their example prompts is disabled on this server; "
    "start it with --enable-admin, or with --admin-token TOKEN and present that token"
)


def _metadata_token(metadata: Sequence[tuple[str, Any]] | None) -> str | None:
    for key, value in metadata or ():
        if key.lower() == "authorization":
            return bearer_token(value if isinstance(value, str) else value.decode())
    return None


def _refusal(code: grpc.StatusCode, message: str, handler: Any) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that aborts with `code` before doing anything."""

    async def abort_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)

    async def abort_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator

    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            abort_stream,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    return grpc.unary_unary_rpc_method_handler(
        abort_unary,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class GateInterceptor(grpc.aio.ServerInterceptor):
    """Refuses `loramux.v1.Inference` calls that lack credentials, and every new one while draining."""

    def __init__(self, auth: AuthConfig) -> None:
        self._auth = auth
        self.draining = False

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler: Any = await continuation(handler_call_details)
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        if handler is None or not method.startswith(INFERENCE_METHOD_PREFIX):
            return handler  # type: ignore[no-any-return]
        if self.draining:
            return _refusal(
                grpc.StatusCode.UNAVAILABLE, "server is draining (shutting down); retry elsewhere", handler
            )
        token = _metadata_token(handler_call_details.invocation_metadata)  # type: ignore[attr-defined]
        refused = check(self._auth, token, admin=method in ADMIN_METHODS)
        if refused == "unauthenticated":
            return _refusal(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE, handler)
        if refused == "permission_denied":
            return _refusal(grpc.StatusCode.PERMISSION_DENIED, PERMISSION_DENIED_MESSAGE, handler)
        if refused == "admin_disabled":
            return _refusal(grpc.StatusCode.PERMISSION_DENIED, ADMIN_DISABLED_MESSAGE, handler)
        return handler  # type: ignore[no-any-return]


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """gRPC call metadata that presents `token` (empty for None)."""
    return (("authorization", f"Bearer {token}"),) if token else ()
