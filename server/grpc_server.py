"""Assemble and run the gRPC server: the Inference servicer, health checking and reflection.

`GrpcServer(engine, host, port)` builds a `grpc.aio` server with
  - `loramux.v1.Inference` behind the status-mapping interceptor,
  - the standard `grpc.health.v1.Health` service, SERVING for "" and "loramux.v1.Inference"
    while the engine thread is alive and NOT_SERVING otherwise (and once shutdown begins),
  - server reflection (grpc.reflection.v1 and v1alpha), so `grpcurl` works without the .proto files.
`await server.start()` binds the port (port 0 picks a free one; `server.port` is the bound
port) and `await server.stop(grace)` lets running calls finish for `grace` seconds.
`await server.drain(timeout)` first refuses new Inference calls (UNAVAILABLE, health NOT_SERVING)
and waits up to `timeout` seconds for running generations to finish. An `AuthConfig` makes the
calls present the API key / admin token (`server.auth`); `request_timeout_s` caps each generation;
a `router` serves adapter "auto", Route and RegisterExamples, reporting to `router_events`.
A request message over MAX_RECEIVE_BYTES (4 MiB) gets gRPC's own RESOURCE_EXHAUSTED.

It owns neither the engine's lifecycle (the caller starts and shuts down the engine) nor
the event loop (the caller runs it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from loramux.v1 import inference_pb2, inference_pb2_grpc
from server.auth import AuthConfig, GateInterceptor
from server.grpc_errors import StatusInterceptor
from server.grpc_service import InferenceServicer
from server.reflection import enable_reflection

if TYPE_CHECKING:
    from server.engine.engine import Engine
    from server.grpc_service import RouterEvents
    from server.router.router import Router

logger = logging.getLogger(__name__)

INFERENCE_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
HEALTH_POLL_S = 1.0
# The largest request message accepted (gRPC's default, stated): a bigger one is refused by
# gRPC itself with RESOURCE_EXHAUSTED "Received message larger than max" (HTTP 413 via the shim).
MAX_RECEIVE_BYTES = 4 * 2**20
_OPTIONS = [
    # Without this, a second server on a busy port binds "successfully" and shares it.
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
]


class GrpcServer:
    """One grpc.aio server over one engine; create, `await start()`, later `await stop()`."""

    def __init__(
        self,
        engine: Engine,
        host: str = "127.0.0.1",
        port: int = 50051,
        *,
        auth: AuthConfig | None = None,
        request_timeout_s: float = 0.0,
        router: Router | None = None,
        router_events: RouterEvents | None = None,
    ) -> None:
        self._engine = engine
        self._address = f"{host}:{port}"
        self._servicer = InferenceServicer(
            engine, request_timeout_s=request_timeout_s, router=router, router_events=router_events
        )
        self._health = health.aio.HealthServicer()
        self._health_task: asyncio.Task[None] | None = None
        self._gate = GateInterceptor(auth or AuthConfig())
        self._server = grpc.aio.server(interceptors=[self._gate, StatusInterceptor()], options=_OPTIONS)
        inference_pb2_grpc.add_InferenceServicer_to_server(self._servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        enable_reflection([INFERENCE_SERVICE, health.SERVICE_NAME], self._server)  # v1 and v1alpha
        self.port = 0

    async def start(self) -> int:
        """Bind the port, start serving and return the bound port."""
        try:
            self.port = self._server.add_insecure_port(self._address)
        except RuntimeError as exc:
            raise OSError(
                f"could not listen on {self._address} (is the port in use or the host wrong?): {exc}"
            ) from exc
        await self._server.start()
        await self._set_health(self._engine.alive)
        self._health_task = asyncio.create_task(self._watch_engine(), name="loramux-health")
        logger.info("gRPC listening on %s", self.address)
        return self.port

    @property
    def address(self) -> str:
        """host:port with the bound port."""
        return f"{self._address.rsplit(':', 1)[0]}:{self.port}"

    async def stop(self, grace: float | None = 5.0) -> None:
        """Report NOT_SERVING, refuse new calls and give running ones `grace` seconds."""
        await self._health.enter_graceful_shutdown()
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        await self._server.stop(grace)
        self._servicer.close()

    async def drain(self, timeout: float, give_up: asyncio.Event | None = None) -> bool:
        """Refuse new calls, report NOT_SERVING and wait up to `timeout` s for running generations.

        True if all finished in time (or before `give_up` was set); the caller then stops the
        server, which aborts the rest.
        """
        self._gate.draining = True
        await self._set_health(False)
        deadline = asyncio.get_running_loop().time() + timeout
        while self._servicer.running and asyncio.get_running_loop().time() < deadline:
            if give_up is not None and give_up.is_set():
                break
            await asyncio.sleep(0.05)
        return not self._servicer.running

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()

    async def _watch_engine(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_POLL_S)
            await self._set_health(self._engine.alive and not self._gate.draining)

    async def _set_health(self, alive: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if alive else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", INFERENCE_SERVICE):
            await self._health.set(service, status)


async def serve_grpc(
    engine: Engine,
    host: str = "127.0.0.1",
    port: int = 50051,
    *,
    auth: AuthConfig | None = None,
    request_timeout_s: float = 0.0,
    router: Router | None = None,
    router_events: RouterEvents | None = None,
) -> GrpcServer:
    """Build and start a GrpcServer over a started engine (and its router, if any)."""
    server = GrpcServer(
        engine,
        host,
        port,
        auth=auth,
        request_timeout_s=request_timeout_s,
        router=router,
        router_events=router_events,
    )
    await server.start()
    return server
