"""The asyncio gRPC servicer of `loramux.v1.Inference` over one engine.

Each RPC is `from_pb -> domain call -> to_pb`. A generate call is validated (input, sampling,
adapter, lengths), tokenized on a helper thread, submitted to the engine with a sink that
hops engine outputs onto the event loop, and answered as one response or a stream of chunks.
A call that ends early (client cancel, disconnect, deadline) aborts its engine request in a
`finally`, so its KV slot is freed at once.

Errors are raised, never returned: `server.grpc_errors.StatusInterceptor` maps them to
status codes. Server assembly (health, reflection, ports) lives in `server.grpc_server`.

This module does not know how the engine schedules or samples, nor how adapters are stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc.aio

from loramux.v1 import inference_pb2 as pb
from loramux.v1 import inference_pb2_grpc as pb_grpc
from server import grpc_convert as convert
from server.adapter_names import select_adapter
from server.engine.request import (
    EngineUnavailable,
    FinishReason,
    GenerationRequest,
    InvalidRequest,
    RequestOutput,
)
from server.grpc_errors import GenerationFailed
from server.prompts import check_input, check_prompt_tokens, tokenize

if TYPE_CHECKING:
    from server.engine.engine import Engine

MAX_REQUEST_ID_CHARS = 256
# How often a call waiting for output checks that the engine thread is still alive.
ENGINE_LIVENESS_POLL_S = 1.0
_ADAPTERS_LATER = "arrives with the multi-adapter work"


@dataclass(frozen=True)
class _Prepared:
    generation: GenerationRequest
    adapter: str  # the adapter that serves it, echoed in answers


class InferenceServicer(pb_grpc.InferenceServicer):
    """`loramux.v1.Inference` over one started engine. Must be used from one event loop."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._live_request_ids: set[str] = set()  # touched on the event loop only
        # One thread: tokenizing stays off the event loop and never runs concurrently.
        self._tokenizer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loramux-tokenize")
        self._loaded_adapters: frozenset[str] = frozenset()  # none until adapters arrive

    def close(self) -> None:
        self._tokenizer_thread.shutdown(wait=False, cancel_futures=True)

    # -- generation ------------------------------------------------------------------------

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        prepared = await self._prepare(request)
        async with contextlib.aclosing(self._run(prepared.generation)) as outputs:
            parts = [output async for output in outputs]
        return convert.response_to_pb(prepared.generation.request_id, parts, prepared.adapter)

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateStreamChunk]:
        prepared = await self._prepare(request)
        # aclosing: if the client goes away while a chunk is in flight, the engine request is
        # aborted when this generator is closed, not whenever the inner one is collected.
        async with contextlib.aclosing(self._run(prepared.generation)) as outputs:
            async for output in outputs:
                yield convert.chunk_to_pb(output, prepared.adapter)

    async def _prepare(self, request: pb.GenerateRequest) -> _Prepared:
        """Validate a request and tokenize its prompt; raises InvalidRequest and friends."""
        info = self._engine.info
        request_id = request.request_id or uuid.uuid4().hex
        if len(request_id) > MAX_REQUEST_ID_CHARS:
            raise InvalidRequest(
                f"request_id is {len(request_id)} characters; at most {MAX_REQUEST_ID_CHARS}"
            )
        adapter = select_adapter(request.adapter, convert.mixture_from_pb(request), self._loaded_adapters)
        prompt = convert.prompt_from_pb(request)
        check_input(prompt, info.max_model_len)
        sampling = convert.sampling_from_pb(request)
        sampling.validate(info.vocab_size)
        loop = asyncio.get_running_loop()
        token_ids = await loop.run_in_executor(
            self._tokenizer_thread, tokenize, self._engine.tokenizer, prompt
        )
        check_prompt_tokens(token_ids, sampling.max_tokens, info.vocab_size, info.max_model_len)
        generation = GenerationRequest(request_id, tuple(token_ids), sampling, adapter=adapter)
        return _Prepared(generation, adapter)

    async def _run(self, request: GenerationRequest) -> AsyncGenerator[RequestOutput, None]:
        """Submit `request` and yield its outputs until the finished one; abort if left early."""
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
        submitted = finished = False
        try:
            self._engine.submit(request, sink)
            submitted = True
            while not finished:
                output = await self._next_output(queue)
                finished = output.finished
                if output.finish_reason is FinishReason.ERROR:
                    raise GenerationFailed(f"generation failed: {output.error or 'unknown engine error'}")
                yield output
        finally:
            self._live_request_ids.discard(request_id)
            if submitted and not finished:
                self._engine.abort(request_id)

    async def _next_output(self, queue: asyncio.Queue[RequestOutput]) -> RequestOutput:
        while True:
            try:
                return await asyncio.wait_for(queue.get(), timeout=ENGINE_LIVENESS_POLL_S)
            except TimeoutError:
                if not self._engine.alive:
                    raise EngineUnavailable("the engine stopped while generating; retry later") from None

    # -- adapters (the multi-adapter work implements these) --------------------------------

    async def LoadAdapter(
        self, request: pb.LoadAdapterRequest, context: grpc.aio.ServicerContext
    ) -> pb.LoadAdapterResponse:
        """UNIMPLEMENTED for now."""
        raise NotImplementedError(f"LoadAdapter {_ADAPTERS_LATER}")

    async def UnloadAdapter(
        self, request: pb.UnloadAdapterRequest, context: grpc.aio.ServicerContext
    ) -> pb.UnloadAdapterResponse:
        """UNIMPLEMENTED for now."""
        raise NotImplementedError(f"UnloadAdapter {_ADAPTERS_LATER}")

    async def ListAdapters(
        self, request: pb.ListAdaptersRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAdaptersResponse:
        """An empty list for now: no adapter can be registered yet (true, and clients need no special case)."""
        return pb.ListAdaptersResponse(adapters=[])

    async def Route(self, request: pb.RouteRequest, context: grpc.aio.ServicerContext) -> pb.RouteResponse:
        """UNIMPLEMENTED for now."""
        raise NotImplementedError(f"Route (the router) {_ADAPTERS_LATER}")

    # -- server information ----------------------------------------------------------------

    async def GetInfo(
        self, request: pb.GetInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetInfoResponse:
        return convert.info_to_pb(self._engine.info)
