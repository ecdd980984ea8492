"""One loramux server inside this process, whose OpenAI API is called in-process.

`await LocalServer.start(config)` builds what `loramux serve` runs (server/serve_commands.py):
the engine, the router that serves "auto" (reconciled with the adapters in the background), the
gRPC service on a free loopback port, and the OpenAI HTTP app as a client of it. No HTTP port is
opened: `forward(request)` calls the app as an ASGI application and yields its answer as
`wire` items, so a request is parsed, validated and answered exactly as `loramux serve` would.
`start(config, router_tag=...)` keeps the router's tables in a file of that tag's own (beside
the one `loramux serve` would save: `<model>.<tag>.safetensors`), so replicas sharing a cache
directory never write one file at once. `warm(name)` reads an adapter into the host tier ahead of its requests (AdapterNotFound for a
name the server cannot serve). `stop()` closes all of it.

It runs on the caller's event loop (a Ray replica's) and does not know Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, MutableMapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from server.ray_serve.wire import Answer, Forwarded, Headers, StreamStart, header

if TYPE_CHECKING:
    from fastapi import FastAPI

    from server.config import ServerConfig
    from server.engine.engine import Engine
    from server.grpc_server import GrpcServer
    from server.serve_commands import BackgroundReconciler

logger = logging.getLogger(__name__)

Message = MutableMapping[str, Any]
# How long the app may take to wind up after its answer (closing its gRPC calls) before it is cancelled.
WIND_UP_S = 5.0
# Running generations get this long when the server stops; Ray has already drained the replica.
STOP_GRACE_S = 1.0


@dataclass
class LocalServer:
    """Engine + router + gRPC service + HTTP app; build it with `await LocalServer.start(config)`."""

    engine: Engine
    grpc: GrpcServer
    app: FastAPI
    lifespan: AbstractAsyncContextManager[Any]
    reconciler: BackgroundReconciler | None = None

    @classmethod
    async def start(cls, config: ServerConfig, router_tag: str | None = None) -> LocalServer:
        """Load the model (on a thread: seconds to minutes) and start serving on this event loop.
        Raises what `loramux serve` reports at start: OSError, ValueError, CpuExtensionError."""
        from server.auth import AuthConfig
        from server.grpc_server import serve_grpc
        from server.http.app import create_app
        from server.metrics import Metrics
        from server.runtime import build_engine, build_router
        from server.serve_commands import BackgroundReconciler

        metrics = Metrics(max_adapter_labels=config.metrics_max_adapters)
        engine = await asyncio.to_thread(build_engine, config, metrics)
        reconciler = None
        try:
            if router_tag is not None:
                config = _tagged_router_state(config, engine.info.model_name, router_tag)
            router = await asyncio.to_thread(build_router, engine, config)
            metrics.watch(engine.snapshot, model_name=engine.info.model_name)
            if router is not None:
                metrics.watch_router(router.routable_counts)
            engine.start()
            if router is not None:
                reconciler = BackgroundReconciler(router)
            grpc = await serve_grpc(
                engine,
                "127.0.0.1",
                0,
                auth=AuthConfig(api_key=config.api_key, admin_token=config.admin_token),
                request_timeout_s=config.request_timeout_s,
                router=router,
                router_events=metrics,
            )
        except BaseException:
            if reconciler is not None:
                reconciler.stop()
            engine.shutdown()
            raise
        # Adapters come from the adapter roots every replica reads: changing them over HTTP on one
        # replica would make the replicas disagree, so the admin routes stay off.
        app = create_app(
            f"127.0.0.1:{grpc.port}",
            metrics_registry=metrics.registry,
            api_key=config.api_key,
            admin_token=config.admin_token,
            limits=config.http_limits,
        )
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()  # opens the app's gRPC channel
        return cls(engine, grpc, app, lifespan, reconciler)

    @property
    def model_name(self) -> str:
        """The base model's id, as the OpenAI API names it."""
        return self.engine.info.model_name

    @property
    def alive(self) -> bool:
        return self.engine.alive

    async def warm(self, name: str) -> None:
        """Read adapter `name` into the host tier (a no-op when it is there); raises AdapterNotFound
        (a KeyError) for a name this server cannot serve, the adapter's refusal for a bad one."""
        adapters = self.engine.adapters
        if adapters is None:
            raise KeyError("this server serves no adapters (--max-slots 0)")
        await asyncio.to_thread(adapters.check_known, name)  # lists the roots: not on the loop
        await asyncio.wrap_future(adapters.prefetch(name))

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self.lifespan.__aexit__(None, None, None)
        await self.grpc.stop(STOP_GRACE_S)
        if self.reconciler is not None:
            await asyncio.to_thread(self.reconciler.stop)
        await asyncio.to_thread(self.engine.shutdown)

    def forward(
        self, request: Forwarded, extra_headers: Headers = ()
    ) -> AsyncIterator[Answer | StreamStart | bytes]:
        """`request` through the HTTP app: one Answer, or a StreamStart and then the body's bytes
        (server-sent events). `extra_headers` are added to the answer's."""
        return call_asgi(self.app, request, extra_headers)


async def call_asgi(
    app: Callable[[Message, Any, Any], Coroutine[Any, Any, None]],
    request: Forwarded,
    extra_headers: Headers = (),
) -> AsyncIterator[Answer | StreamStart | bytes]:
    """Run `request` through the ASGI `app` on this loop, as an HTTP server would.

    The app sees the body at once and a disconnect when the caller stops iterating (so a stream
    the client left is cancelled, and with it its gRPC calls and engine requests)."""
    scope: Message = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": "http",
        "path": request.path,
        "raw_path": request.path.encode(),
        "query_string": request.query,
        "root_path": "",
        "headers": list(request.headers),
        "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 0),
    }
    sent: asyncio.Queue[Message] = asyncio.Queue()
    gone = asyncio.Event()
    delivered = False

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        await sent.put(message)

    task: asyncio.Task[None] = asyncio.create_task(app(scope, receive, send))
    try:
        start = await _next(sent, task, "http.response.start")
        status, headers = start["status"], (*_raw(start.get("headers", ())), *extra_headers)
        streamed = (header(headers, b"content-type") or b"").startswith(b"text/event-stream")
        if streamed:
            yield StreamStart(status, headers)
        body = bytearray()
        while True:
            message = await _next(sent, task, "http.response.body")
            chunk = bytes(message.get("body", b""))
            if streamed and chunk:
                yield chunk
            elif chunk:
                body += chunk
            if not message.get("more_body", False):
                break
        if not streamed:
            yield Answer(status, headers, bytes(body))
    finally:
        gone.set()
        await _wind_up(task)


async def _next(sent: asyncio.Queue[Message], task: asyncio.Task[None], kind: str) -> Message:
    """The app's next message, which must be of `kind`; raises when the app ends without it."""
    if sent.empty():
        getting = asyncio.ensure_future(sent.get())
        try:
            await asyncio.wait({getting, task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not getting.done():
                getting.cancel()
        if getting.done() and not getting.cancelled():
            message = getting.result()
        elif not sent.empty():
            message = sent.get_nowait()
        else:  # the app ended without sending it: its error, or this
            task.result()
            raise RuntimeError(f"the HTTP app ended without sending {kind}")
    else:
        message = sent.get_nowait()
    if message["type"] != kind:
        raise RuntimeError(f"the HTTP app sent {message['type']} where {kind} was due")
    return message


async def _wind_up(task: asyncio.Task[None]) -> None:
    """Let the app finish its answer's clean-up; cancel it when it lingers. Its error (after the
    answer went out: the app has already answered 500 for it) is logged, not raised."""
    done, _ = await asyncio.wait({task}, timeout=WIND_UP_S)
    if not done:
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        try:
            await task
        except Exception:
            logger.exception("the HTTP app failed after answering")


def _tagged_router_state(config: ServerConfig, model_name: str, tag: str) -> ServerConfig:
    """`config` with the router's tables in `<name>.<tag>.safetensors` beside where they would be."""
    from server.model.loader import cache_root

    state = config.router.state_path
    if state is None:  # where build_router puts them
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_name)
        state = str(cache_root(config.cache_dir) / "router" / f"{safe}.safetensors")
    tagged = Path(state).with_suffix(f".{tag}.safetensors")
    return replace(config, router=replace(config.router, state_path=str(tagged)))


def _raw(headers: Any) -> Headers:
    return tuple((bytes(name).lower(), bytes(value)) for name, value in headers)
