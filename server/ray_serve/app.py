"""The Ray Serve application: an OpenAI ingress in front of loramux replicas with adapter affinity.

    serve run server.ray_serve.app:build_app model=DIR adapter_root=DIR replicas=2 max_slots=8

`build_app(args)` takes `loramux ray`'s flags as key=value arguments (settings.flags), from
`serve run` or a `serve deploy` config's `args:` (deploy/ray/serve.yaml), and returns the bound
application; `application(config, ray_config)` is the same from parsed settings (`loramux ray`).

`LoramuxReplica` is one loramux server (local_server.LocalServer). Its adapters are Ray
multiplexed models: `@serve.multiplexed(max_num_models_per_replica=--max-slots)` warms the
adapter a request names (disk -> host tier) and tells Ray's router that this replica holds it,
so later requests for it go there while it has room (`RayConfig.max_ongoing`), else to another.
A replica whose engine thread died fails Ray's health check and is replaced.

`LoramuxIngress` answers Ray's HTTP proxy. A generation request's `model` becomes the call's
multiplexed model id when it names an adapter the replicas list (refreshed every
LISTING_REFRESH_S; a name they do not list goes to any replica, whose shim answers 404, so
garbage names cannot grow Ray's routing tables); the base model, "auto" (the replica's router
picks) and mixtures go to any replica. Every answer is the replica's shim's, with its
`x-loramux-replica` header. A replica that stops mid-request (killed, crashed) is a 503, or an
error event ending a stream that had begun: never a hang. Not forwarded: the admin routes
(adapters come from the adapter roots every replica reads) and /metrics (per replica; Ray exports
its own metrics).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError, RequestCancelledError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from server.config import ServerConfig
from server.http.backend import AUTO_MODEL
from server.http.errors import error_body, error_response
from server.http.streaming import DONE, sse
from server.ray_serve.local_server import LocalServer
from server.ray_serve.settings import RayConfig, flags
from server.ray_serve.wire import REPLICA_HEADER, Answer, Forwarded, StreamStart

logger = logging.getLogger(__name__)

GENERATE_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
ADMIN_PATHS = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/v1/router/examples"})
LISTING_REFRESH_S = 10.0
# Requests one ingress replica takes at once: it only forwards, so as many as clients send.
INGRESS_MAX_ONGOING = 1000
# Raised by a call whose replica stopped (killed, crashed, OOM) or by a deployment with none ready.
REPLICA_GONE = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)
REPLICA_GONE_MESSAGE = (
    "the loramux replica serving this request stopped before it finished (Ray starts a new one); "
    "retry the request"
)


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application `serve run MODULE:build_app key=value ...` (or `serve deploy`) runs."""
    from server.cli import ray_settings  # argparse lives in server/cli.py only

    config, ray_config = ray_settings(flags(args))
    return application(config, ray_config)


def application(config: ServerConfig, ray_config: RayConfig) -> serve.Application:
    """`ray_config.replicas` replicas of the server `config` describes, behind the ingress."""
    replicas = LoramuxReplica.options(  # type: ignore[attr-defined]
        num_replicas=ray_config.replicas,
        max_ongoing_requests=ray_config.max_ongoing or config.engine.max_running,
        ray_actor_options={"num_cpus": ray_config.replica_cpus, "num_gpus": ray_config.replica_gpus},
        graceful_shutdown_timeout_s=config.drain_timeout_s,
    ).bind(config)
    return LoramuxIngress.options(  # type: ignore[attr-defined,no-any-return]
        max_ongoing_requests=INGRESS_MAX_ONGOING, ray_actor_options={"num_cpus": 0}
    ).bind(replicas, config.adapters.max_slots > 0)


# -- replica ---------------------------------------------------------------------------------


@serve.deployment
class LoramuxReplica:
    """One loramux server; `forward` answers one OpenAI request through it."""

    async def __init__(self, config: ServerConfig) -> None:  # type: ignore[misc]  # Ray awaits it
        context = serve.get_replica_context()
        self.name = context.replica_id.unique_id
        # The replica that takes this one's place gets its rank, and so its router tables.
        rank = getattr(context.rank, "rank", None)
        tag = f"replica-{rank}" if rank is not None else f"replica-{self.name}"
        self.server = await LocalServer.start(config, router_tag=tag)

        async def hold(adapter: str) -> str:  # Ray keeps it, LRU, as one of the replica's models
            await self.server.warm(adapter)
            return adapter

        # Set here, not as a decorated method: the bound (--max-slots) is known only now.
        self.hold = serve.multiplexed(max_num_models_per_replica=max(1, config.adapters.max_slots))(hold)
        logger.info("loramux replica %s serving %s", self.name, self.server.model_name)

    async def forward(self, request: Forwarded) -> AsyncIterator[Answer | StreamStart | bytes]:
        adapter = serve.get_multiplexed_model_id()
        if adapter:
            try:
                await self.hold(adapter)
            except Exception as exc:  # the shim answers the request with the reason (404, 400, ...)
                logger.info("adapter %r not held: %s", adapter, exc)
        async for item in self.server.forward(request, ((REPLICA_HEADER.encode(), self.name.encode()),)):
            yield item

    async def adapter_names(self) -> frozenset[str]:
        """Every adapter this replica can serve (its roots scanned: off the event loop)."""
        adapters = self.server.engine.adapters
        if adapters is None:
            return frozenset()
        return frozenset(await asyncio.to_thread(lambda: [a.name for a in adapters.list()]))

    def check_health(self) -> None:
        if not self.server.alive:  # Ray replaces a replica that fails this
            raise RuntimeError("the engine thread died")

    async def __del__(self) -> None:
        server = getattr(self, "server", None)  # None when the constructor failed
        if server is not None:
            await server.stop()


# -- ingress ---------------------------------------------------------------------------------


@serve.deployment
class LoramuxIngress:
    """The OpenAI API over the replicas (Ray's HTTP proxy calls it for every request)."""

    def __init__(self, replicas: DeploymentHandle, adapters_on: bool) -> None:
        self.replicas = replicas
        self.adapters_on = adapters_on
        self.listing: frozenset[str] | None = None  # the adapters, as a replica last listed them
        self.listed_at = 0.0
        self.refreshing: asyncio.Task[None] | None = None

    async def __call__(self, request: Request) -> Response:
        path = request.scope["path"]
        if path in ADMIN_PATHS:
            return error_response(
                403,
                "changing adapters over HTTP is off under Ray Serve: every replica serves the adapters "
                "in its adapter roots, so add or remove them there",
            )
        if path == "/metrics":
            return error_response(
                404, "loramux's metrics are per replica; under Ray Serve use the metrics Ray exports"
            )
        body = await request.body()
        affinity = await self._affinity(body) if path in GENERATE_PATHS else ""
        forwarded = Forwarded(
            request.method, path, request.scope["query_string"], tuple(request.headers.raw), body
        )
        items = self.replicas.options(stream=True, multiplexed_model_id=affinity).forward.remote(forwarded)
        assert isinstance(items, DeploymentResponseGenerator)  # stream=True
        try:
            first = await items.__anext__()
        except REPLICA_GONE:
            items.cancel()
            return error_response(503, REPLICA_GONE_MESSAGE, code="replica_unavailable")
        except (RayTaskError, StopAsyncIteration) as exc:  # a bug in the replica, not the request
            logger.error("the replica failed: %s", exc)
            return error_response(500, "the loramux replica failed to answer (see its log)")
        if isinstance(first, Answer):
            return _response(Response(first.body, first.status), first.headers)
        assert isinstance(first, StreamStart)
        return _response(StreamingResponse(_rest(items), first.status), first.headers)

    async def _affinity(self, body: bytes) -> str:
        """The multiplexed model id of a generation request: the adapter it names, else ""."""
        if not self.adapters_on:
            return ""
        try:
            model = json.loads(body).get("model")
        except (ValueError, AttributeError):  # the replica's shim answers it with the reason
            return ""
        if not isinstance(model, str) or model in ("", AUTO_MODEL):
            return ""
        listing = await self._listing()
        return model if listing is not None and model in listing else ""

    async def _listing(self) -> frozenset[str] | None:
        """The replicas' adapters; refreshed in the background once stale (awaited only the first time)."""
        stale = time.monotonic() - self.listed_at > LISTING_REFRESH_S
        if stale and (self.refreshing is None or self.refreshing.done()):
            self.refreshing = asyncio.create_task(self._refresh())
        if self.listing is None and self.refreshing is not None:
            await asyncio.shield(self.refreshing)
        return self.listing

    async def _refresh(self) -> None:
        try:
            self.listing = await self.replicas.adapter_names.remote()
        except Exception as exc:  # routed without affinity meanwhile; retried on a later request
            logger.warning("listing the replicas' adapters failed: %s", exc)
            return
        self.listed_at = time.monotonic()


def _response(response: Response, headers: tuple[tuple[bytes, bytes], ...]) -> Response:
    response.raw_headers = list(headers)  # the replica's, Content-Length and x-loramux-replica included
    return response


async def _rest(items: DeploymentResponseGenerator) -> AsyncIterator[bytes]:
    """The rest of a streamed answer; a replica that stops ends it with an error event. A client
    that leaves closes this generator, which cancels the replica's call (and its engine requests)."""
    ended = False
    try:
        async for chunk in items:
            yield chunk
        ended = True
    except REPLICA_GONE:
        ended = True
        error = error_body(503, REPLICA_GONE_MESSAGE, code="replica_unavailable")
        yield (sse(json.dumps(error)) + DONE).encode()
    except RequestCancelledError:  # the client left, and Ray has cancelled the call
        ended = True
    finally:
        if not ended:
            items.cancel()
