"""Server-sent events over GenerateStream calls, cancelled at once when the client goes away.

`open_streams` starts one GenerateStream per choice and waits for each call's first chunk, so a
refused request (unknown model, bad sampling, full queue) still answers with its HTTP status
rather than a 200 stream that carries an error. `merge` then yields `(choice index, chunk)` as
the calls produce them. `EventStreamResponse` watches for the client's disconnect while it
streams and, however the stream ends, closes its body generator, whose `finally` cancels the
gRPC calls so the engine frees their slots at once.

This module does not know the OpenAI chunk formats.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import anyio
import grpc.aio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from loramux.v1 import inference_pb2 as pb
from loramux.v1 import inference_pb2_grpc as pb_grpc

DONE = "data: [DONE]\n\n"
StreamCall = Any  # grpc.aio.UnaryStreamCall[pb.GenerateRequest, pb.GenerateStreamChunk]


class OpenStreams:
    """Running GenerateStream calls with the first chunk of each already read."""

    def __init__(self, calls: list[StreamCall], first_chunks: list[pb.GenerateStreamChunk]) -> None:
        self.calls = calls
        self.first_chunks = first_chunks

    def cancel(self) -> None:
        for call in self.calls:
            call.cancel()


async def open_streams(stub: pb_grpc.InferenceStub, requests: Sequence[pb.GenerateRequest]) -> OpenStreams:
    """Start every call and read its first chunk; on any error cancel them all and raise it."""
    calls = [stub.GenerateStream(request) for request in requests]
    try:
        first = await asyncio.gather(*(call.read() for call in calls))
    except BaseException:
        for call in calls:
            call.cancel()
        raise
    for chunk in first:
        if chunk is grpc.aio.EOF:  # the server always ends with a finished chunk; this is a bug
            raise RuntimeError("GenerateStream ended without a chunk")
    return OpenStreams(calls, list(first))


async def merge(streams: OpenStreams) -> AsyncIterator[tuple[int, pb.GenerateStreamChunk]]:
    """Yield (choice index, chunk) from all calls as they arrive, until each has finished."""
    queue: asyncio.Queue[tuple[int, pb.GenerateStreamChunk | BaseException]] = asyncio.Queue()

    async def pump(index: int, call: StreamCall, chunk: pb.GenerateStreamChunk) -> None:
        try:
            while True:
                await queue.put((index, chunk))
                if chunk.finished:
                    return
                next_chunk = await call.read()
                if next_chunk is grpc.aio.EOF:
                    raise RuntimeError("GenerateStream ended without a finished chunk")
                chunk = next_chunk
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            await queue.put((index, exc))

    pumps = [
        asyncio.create_task(pump(index, call, first))
        for index, (call, first) in enumerate(zip(streams.calls, streams.first_chunks, strict=True))
    ]
    try:
        unfinished = len(pumps)
        while unfinished:
            index, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            if item.finished:
                unfinished -= 1
            yield index, item
    finally:
        for task in pumps:
            task.cancel()
        streams.cancel()  # a no-op on calls that finished


def compact_json(payload: object) -> str:
    """JSON as pydantic's model_dump_json writes it (no spaces, UTF-8 as is), so that every event of
    both APIs' streams reads alike."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False)


def sse(payload: str) -> str:
    return f"data: {payload}\n\n"


class EventStreamResponse(StreamingResponse):
    """A `text/event-stream` that stops (and closes its generator) as soon as the client leaves."""

    def __init__(self, body: AsyncIterator[str]) -> None:
        super().__init__(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._body = body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Starlette stops listening for disconnects under ASGI 2.4 and notices a gone client only
        # when a send fails; a request still waiting for a slot or a token would keep running.
        try:
            async with anyio.create_task_group() as tasks:

                async def watch() -> None:
                    await self.listen_for_disconnect(receive)
                    tasks.cancel_scope.cancel()

                tasks.start_soon(watch)
                with contextlib.suppress(OSError):  # the client left while we were sending
                    await self.stream_response(send)
                tasks.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(self._body, "aclose", None)
                if aclose is not None:
                    await aclose()
