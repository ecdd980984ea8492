"""The asyncio gRPC servicer of `loramux.v1.Inference` over one engine.

Each RPC is `from_pb -> domain call -> to_pb`. A generate call is prepared on a helper thread
(`server.preparation`: every check, tokenizing, the adapter choice), waits for its adapters'
disk -> host loads (so a refused adapter answers INVALID_ARGUMENT, not a failed generation), is
submitted to the engine with a sink that hops engine outputs onto the event loop, and is
answered as one response or a stream of chunks. Each answer says where its adapters were when
it arrived (`adapter_tier`: device | host | disk, "" for the base model), looked at before its
own loads start. A call that ends early (client cancel, disconnect, deadline) aborts its own
submission (by the handle `submit` returned) in a `finally`, so its KV slot is freed at once;
so does one that runs past the server's `request_timeout_s` (DEADLINE_EXCEEDED). The adapter
RPCs call the engine's AdapterManager on helper threads (they read files).

With a router, adapter "auto" is routed while it is prepared (on the preparation thread: the
router reads the prompt with the base model's first layers) and the answer carries the decision
(`routing`); Route asks the same question without generating. Learning example prompts
(RegisterExamples, LoadAdapter's example_prompts) runs seconds on a router thread of its own, and
UnloadAdapter has the router forget an adapter that is no longer servable at all. Routing
decisions and learned examples are reported to `RouterEvents` (the server's metrics).

Errors are raised, never returned: `server.grpc_errors.StatusInterceptor` maps them to
status codes. Server assembly (health, reflection, ports) lives in `server.grpc_server`.

This module does not know how the engine schedules or samples, nor how adapters are stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import grpc.aio

from adapters_store import FORMATS, AdapterError, AdapterNotFound
from adapters_store.errors import shown
from loramux.v1 import inference_pb2 as pb
from loramux.v1 import inference_pb2_grpc as pb_grpc
from server import grpc_convert as convert
from server.access_log import AccessRecord, access_logged, api_of
from server.engine.request import (
    EngineUnavailable,
    FinishReason,
    InvalidRequest,
    PreparedRequest,
    RequestOutput,
)
from server.engine.threads import one_intra_op_thread
from server.grpc_errors import AdaptersDisabled, GenerationFailed, RequestTimedOut
from server.preparation import AUTO_ADAPTER, RequestInput, RequestPreparer
from server.running_kernels import adapter_settings, kernels_info

if TYPE_CHECKING:
    from server.engine.adapters import AdapterManager
    from server.engine.engine import Engine
    from server.router.router import Router
    from server.router.selector import LearnReport

logger = logging.getLogger(__name__)
T = TypeVar("T")

# How often a call waiting for output checks that the engine thread is still alive.
ENGINE_LIVENESS_POLL_S = 1.0


class RouterEvents(Protocol):
    """What the servicer reports about routing (server.metrics.Metrics); quick, never raises."""

    def request_routed(self, adapter: str, fallback_reason: str, seconds: float) -> None:
        """An "auto" request was routed: `adapter` is the label that serves it (the base model's
        name on a fallback), `fallback_reason` "" unless it fell back."""

    def examples_learned(self, count: int) -> None:
        """The router learned `count` example prompts at run time."""


class NoRouterEvents:
    def request_routed(self, adapter: str, fallback_reason: str, seconds: float) -> None:
        pass

    def examples_learned(self, count: int) -> None:
        pass


class InferenceServicer(pb_grpc.InferenceServicer):
    """`loramux.v1.Inference` over one started engine (and its router, if any). Must be used from
    one event loop."""

    def __init__(
        self,
        engine: Engine,
        *,
        request_timeout_s: float = 0.0,
        router: Router | None = None,
        router_events: RouterEvents | None = None,
    ) -> None:
        self._engine = engine
        self._request_timeout_s = request_timeout_s  # 0 = no server-side cap
        self._router = router
        self._router_events: RouterEvents = router_events or NoRouterEvents()
        self._preparer = RequestPreparer.for_engine(engine, router)
        self._live_request_ids: set[str] = set()  # touched on the event loop only
        # One thread: preparing (tokenizing, looking at adapter roots, routing) stays off the event
        # loop and never runs concurrently.
        self._prepare_thread = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="loramux-prepare", initializer=one_intra_op_thread
        )
        # One thread: LoadAdapter / UnloadAdapter read files and run one at a time, in arrival order.
        self._adapter_thread = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="loramux-adapter-rpc", initializer=one_intra_op_thread
        )
        # One thread: the router learns (seconds) and forgets, in arrival order.
        self._router_thread = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="loramux-router", initializer=one_intra_op_thread
        )

    @property
    def running(self) -> int:
        """Generations in progress (submitted or about to be)."""
        return len(self._live_request_ids)

    def close(self) -> None:
        self._prepare_thread.shutdown(wait=False, cancel_futures=True)
        self._adapter_thread.shutdown(wait=False, cancel_futures=True)
        self._router_thread.shutdown(wait=False, cancel_futures=True)

    # -- generation ------------------------------------------------------------------------

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        with access_logged(api_of(context.invocation_metadata()), "unary") as record:
            prepared, tier, loads = await self._prepare(request, record)
            async with contextlib.aclosing(self._run(prepared, tier, loads)) as outputs:
                parts = [output async for output in outputs]
            record.saw(parts[-1])
        return convert.response_to_pb(prepared.request_id, parts, prepared.adapters.label, _routing(prepared))

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateStreamChunk]:
        with access_logged(api_of(context.invocation_metadata()), "stream") as record:
            prepared, tier, loads = await self._prepare(request, record)
            # aclosing: if the client goes away while a chunk is in flight, the engine request is
            # aborted when this generator is closed, not whenever the inner one is collected.
            routing = _routing(prepared)  # on the first chunk only
            async with contextlib.aclosing(self._run(prepared, tier, loads)) as outputs:
                async for output in outputs:
                    record.saw(output)
                    yield convert.chunk_to_pb(output, prepared.adapters.label, routing)
                    routing = None

    async def _prepare(
        self, request: pb.GenerateRequest, record: AccessRecord
    ) -> tuple[PreparedRequest, str, tuple[Future[Any], ...]]:
        """Prepare a request off the event loop and wait for its adapters' loads; raises
        InvalidRequest and friends (and counts the refusal in the engine's metrics). Also returns
        where its adapters were before those loads (the answer's `adapter_tier`) and the loads (the
        engine takes them over: nothing is prepared twice); `record` (the access log's) learns the
        request id and adapter label as soon as they are known."""
        record.request_id = request.request_id or "-"
        record.adapter = request.adapter or "+".join(entry.name for entry in request.adapters) or "-"
        given = RequestInput(
            prompt=convert.prompt_from_pb(request),
            sampling=convert.sampling_from_pb(request),
            request_id=request.request_id,
            adapter=request.adapter,
            mixture=convert.mixture_from_pb(request),
            route_top_k=convert.route_top_k_from_pb(request),
        )
        try:
            loop = asyncio.get_running_loop()
            prepared = await loop.run_in_executor(self._prepare_thread, self._preparer.prepare, given)
            record.request_id = prepared.request_id
            record.adapter = self._engine.adapter_label(prepared.adapters.label)
            if prepared.routing is not None:
                label = self._engine.adapter_label(prepared.adapters.label)
                self._router_events.request_routed(label, prepared.routing.reason, prepared.routing.seconds)
            names = prepared.adapters.names
            tier = self._adapter_manager().tier(names) if names else ""  # before the loads below
            loads = tuple(self._adapter_manager().prefetch(name) for name in names)  # on its loader threads
            for load in loads:
                await _wait_shared(load)  # a refused adapter raises
            return prepared, tier, loads
        except Exception as exc:
            names = (request.adapter,) if request.adapter else tuple(name for name, _ in given.mixture)
            self._engine.record_refused(names, exc, AUTO_ADAPTER if request.adapter == AUTO_ADAPTER else None)
            raise

    async def _run(
        self, request: PreparedRequest, adapter_tier: str, adapter_loads: tuple[Future[Any], ...]
    ) -> AsyncGenerator[RequestOutput, None]:
        """Submit `request` (its adapters found in `adapter_tier`, loaded by `adapter_loads`) and
        yield its outputs until the finished one; abort if left early."""
        request_id = request.request_id
        if request_id in self._live_request_ids:
            raise InvalidRequest(
                f"request_id {request_id!r} belongs to a request that is still running; "
                "use a unique id or leave it empty"
            )
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()

        def sink(output: RequestOutput) -> None:  # called on the engine thread
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
                loop.call_soon_threadsafe(queue.put_nowait, output)

        self._live_request_ids.add(request_id)
        handle = None
        finished = False
        deadline = loop.time() + self._request_timeout_s if self._request_timeout_s > 0 else None
        try:
            handle = self._engine.submit(
                request, sink, adapter_tier=adapter_tier, adapter_loads=adapter_loads
            )
            while not finished:
                output = await self._next_output(queue, deadline)
                finished = output.finished
                if output.finish_reason is FinishReason.ERROR:
                    if not self._engine.alive:  # the engine thread died under this request
                        raise EngineUnavailable("the engine stopped while generating; retry later")
                    raise GenerationFailed(f"generation failed: {output.error or 'unknown engine error'}")
                yield output
        finally:
            self._live_request_ids.discard(request_id)
            if handle is not None and not finished:
                self._engine.abort(handle)

    async def _next_output(
        self, queue: asyncio.Queue[RequestOutput], deadline: float | None
    ) -> RequestOutput:
        loop = asyncio.get_running_loop()
        while True:
            wait = ENGINE_LIVENESS_POLL_S
            if deadline is not None:
                left = deadline - loop.time()
                if left <= 0:
                    raise RequestTimedOut(
                        f"the request ran longer than the server's limit of {self._request_timeout_s:g} s "
                        "(--request-timeout); ask for fewer tokens or retry"
                    )
                wait = min(wait, left)
            try:
                return await asyncio.wait_for(queue.get(), timeout=wait)
            except TimeoutError:
                if not self._engine.alive:
                    raise EngineUnavailable("the engine stopped while generating; retry later") from None

    # -- adapters --------------------------------------------------------------------------

    async def LoadAdapter(
        self, request: pb.LoadAdapterRequest, context: grpc.aio.ServicerContext
    ) -> pb.LoadAdapterResponse:
        manager = self._adapter_manager()
        format = convert.adapter_format_from_pb(request.format)
        if format is not None and format not in FORMATS:
            raise AdapterError(
                f"adapter format {shown(format)} is not supported yet; this server reads {', '.join(FORMATS)} "
                "(leave format unset to detect it)"
            )
        if request.pin:
            raise NotImplementedError(
                "pin is not supported yet: an adapter stays in its device slot while requests use it "
                "and is evicted least-recently-used otherwise; load it without pin"
            )
        router: Router | None = None
        examples: tuple[str, ...] = ()
        if request.example_prompts:  # checked before loading: refused prompts load nothing
            router = _routable(self._preparer.router_or_refuse(), request.name)
            examples = _checked_examples(request.example_prompts, "example_prompts")
        load = functools.partial(manager.load, request.name, request.path, format, replace=request.replace)
        await self._in_adapter_thread(load)
        if router is not None:
            await self._learn(router, request.name, examples)
        if self._router is not None and self._router.config.allows(request.name):
            # In the background, after any learning above (one router thread): the router reads the
            # directory's examples.jsonl, or builds the adapter's weight prototypes when it has none.
            syncing = self._router_thread.submit(self._router.reconcile, (request.name,))
            syncing.add_done_callback(_log_failure)
        return pb.LoadAdapterResponse(adapter=await self._adapter_info(manager, request.name))

    async def UnloadAdapter(
        self, request: pb.UnloadAdapterRequest, context: grpc.aio.ServicerContext
    ) -> pb.UnloadAdapterResponse:
        manager = self._adapter_manager()
        await self._in_adapter_thread(functools.partial(manager.unload, request.name))
        if self._router is not None:  # in the background: the router's lock may be held by learning
            forgetting = self._router_thread.submit(_forget_if_gone, self._router, manager, request.name)
            forgetting.add_done_callback(_log_failure)
        return pb.UnloadAdapterResponse()

    async def ListAdapters(
        self, request: pb.ListAdaptersRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAdaptersResponse:
        manager = self._adapter_manager()
        listed = await asyncio.get_running_loop().run_in_executor(None, manager.list)  # scans the roots
        return pb.ListAdaptersResponse(adapters=[convert.adapter_info_to_pb(status) for status in listed])

    def _adapter_manager(self) -> AdapterManager:
        if self._engine.adapters is None:
            raise AdaptersDisabled(
                "this server serves no adapters (started with --max-slots 0); restart it with "
                "--max-slots N (and --adapter-root DIR) to serve adapters"
            )
        return self._engine.adapters

    async def _in_adapter_thread(self, call: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._adapter_thread, call)

    async def _adapter_info(self, manager: AdapterManager, name: str) -> pb.AdapterInfo:
        listed = await asyncio.get_running_loop().run_in_executor(None, manager.list)
        status = next((status for status in listed if status.name == name), None)
        if status is None:  # unloaded by another call in between
            raise AdapterNotFound(f"adapter {shown(name)} was unloaded while it was being loaded")
        return convert.adapter_info_to_pb(status)

    # -- routing ---------------------------------------------------------------------------

    async def Route(self, request: pb.RouteRequest, context: grpc.aio.ServicerContext) -> pb.RouteResponse:
        prompt = convert.route_prompt_from_pb(request)
        loop = asyncio.get_running_loop()
        decision = await loop.run_in_executor(self._prepare_thread, self._preparer.route, prompt)
        return convert.routing_to_pb(decision, request.top_k)

    async def RegisterExamples(
        self, request: pb.RegisterExamplesRequest, context: grpc.aio.ServicerContext
    ) -> pb.RegisterExamplesResponse:
        manager = self._adapter_manager()
        router = _routable(self._preparer.router_or_refuse(), request.adapter)
        examples = _checked_examples(request.prompts, "prompts")
        await self._in_adapter_thread(functools.partial(manager.check_known, request.adapter))  # NOT_FOUND
        report = await self._learn(router, request.adapter, examples)
        return pb.RegisterExamplesResponse(
            adapter=report.adapter, examples=report.examples, steps=report.steps, seconds=report.seconds
        )

    async def _learn(self, router: Router, adapter: str, examples: tuple[str, ...]) -> LearnReport:
        """Teach the router `adapter`'s examples on the router thread (seconds)."""
        learn = functools.partial(router.learn, adapter, examples)
        report = await asyncio.get_running_loop().run_in_executor(self._router_thread, learn)
        self._router_events.examples_learned(report.examples)
        return report

    # -- server information ----------------------------------------------------------------

    async def GetInfo(
        self, request: pb.GetInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetInfoResponse:
        router = None
        if self._router is not None:
            router = convert.router_info_to_pb(self._router.config, *self._router.routable_counts())
        info = convert.info_to_pb(self._engine.info, router)
        info.kernels.CopyFrom(kernels_info(self._engine))
        if self._engine.adapters is not None:
            info.adapter_settings.CopyFrom(adapter_settings(self._engine.adapters))
        return info


def _routing(prepared: PreparedRequest) -> pb.RouteResponse | None:
    """An "auto" request's decision as its answer carries it, with the weights that served."""
    if prepared.routing is None:
        return None
    return convert.routing_to_pb(prepared.routing, served=dict(prepared.adapters.adapters))


def _checked_examples(prompts: Sequence[str], field: str) -> tuple[str, ...]:
    """Example prompts the router can learn, or InvalidRequest saying which one is not."""
    from server.router.examples import ExamplesError, check_prompts

    try:
        return check_prompts(list(prompts), field)
    except ExamplesError as exc:
        raise InvalidRequest(str(exc)) from None


def _routable(router: Router, adapter: str) -> Router:
    """`router`, unless its settings keep it from ever picking `adapter` (InvalidRequest)."""
    if not router.config.allows(adapter):
        patterns = ",".join(router.config.adapters)
        raise InvalidRequest(
            f"adapter {shown(adapter)} is not one the router may pick (--router-adapters {patterns}); "
            "its example prompts would never be used"
        )
    return router


def _forget_if_gone(router: Router, manager: AdapterManager, name: str) -> None:
    """Have the router forget `name` unless the server can still serve it (e.g. from a root); its
    versions (compressed or exported copies), left out of routing while it was there, come back."""
    try:
        manager.check_known(name)
    except AdapterError:
        router.forget(name)
        logger.info("router: forgot %s (unloaded, not in the adapter roots)", shown(name))
        router.reconcile(())


def _log_failure(done: Future[Any]) -> None:
    """Log what a background router task (forget, reconcile) raised."""
    if not done.cancelled() and done.exception() is not None:
        logger.error("router: updating for a loaded or unloaded adapter failed", exc_info=done.exception())


async def _wait_shared(future: Future[T]) -> T:
    """Await a thread-pool future that others may share (the engine waits on the same adapter load).

    `asyncio.wrap_future` alone would cancel `future` when the awaiting call is cancelled; the
    shield keeps it running for the others, and the callback retrieves an outcome nobody awaits.
    """
    waiter = asyncio.wrap_future(future)
    waiter.add_done_callback(lambda done: done.cancelled() or done.exception())
    return await asyncio.shield(waiter)
