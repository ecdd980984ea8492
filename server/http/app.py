"""The OpenAI-compatible HTTP API, served by FastAPI as a client of the gRPC service.

    GET  /v1/models                 the base model, every adapter the server can serve, and "auto"
                                    when the server has a router
    GET  /v1/models/{model}         one of them
    POST /v1/completions            text completion (`model` picks the adapter; "auto" the router)
    POST /v1/chat/completions       chat completion; the server applies the chat template
    POST /v1/router/route           which adapters "auto" would run for a prompt, ranked
    POST /v1/load_lora_adapter      vLLM's runtime adapter loading (only with enable_admin)
    POST /v1/unload_lora_adapter    and unloading
    POST /v1/router/examples        teach the router an adapter's example prompts (only with enable_admin)
    GET  /health                    200 {"status": "ok"} while the gRPC server reports SERVING, else 503
    GET  /metrics                   Prometheus text exposition of `metrics_registry` (`loramux serve`:
                                    the engine's metrics; `loramux http` alone: this process only)

Each request becomes Generate / GenerateStream calls on `grpc_target`, so HTTP and gRPC share
one code path: validation, limits and error messages come from the gRPC server. The `model`
of an answer is what served it: the base model's id, an adapter, or a mixture's names joined by
'+'. A weighted mixture is asked for with the body's `adapters` and the base model's id as
`model`. Two loramux fields extend an answer at the top level, on the first event when streamed
(absent where they do not apply): model "auto" answers carry `routing` (the router's decision),
and answers an adapter served carry `adapter_tier`, where it was when the request arrived:
"device" (in a device slot), "host" (in host memory only) or "disk" (a cold start); the coldest
of a mixture's adapters and of the answer's choices; absent when the base model served.
With an API key, every `/v1/*` route needs `Authorization: Bearer <key>` (401 otherwise); with an
admin token, the admin routes need it (403). `/health` (and `/metrics`) stay open. The shim
presents its own key / admin token to the gRPC server. While the gRPC server drains, new
requests answer 503 (its UNAVAILABLE). A request body over `limits.max_body_mb` is answered 413
before it is parsed (`server.http.body_limit`); each route documents the statuses it can answer.

This module maps OpenAI shapes to the wire API and back; it does not know how generation works.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
import prometheus_client
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.routing import APIRoute
from prometheus_client import CollectorRegistry

from adapters_store.errors import shown
from loramux.v1 import inference_pb2 as pb
from server import auth as authn
from server.config import HttpLimits
from server.http import logprobs
from server.http import openai_types as oa
from server.http.backend import AUTO_MODEL, Backend, bearer_channel, finish_reason, generate_requests
from server.http.body_limit import BodyLimit
from server.http.client_words import unknown_model
from server.http.errors import ApiError, error_body, error_response, from_rpc_error, install_handlers
from server.http.streaming import DONE, EventStreamResponse, compact_json, merge, open_streams, sse
from server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for these error statuses, each OpenAI's error JSON."""
    return {status: {"model": oa.ErrorResponse} for status in statuses}


# What every /v1 route can answer: no or a wrong API key, an internal error, the gRPC server
# unreachable or draining, its deadline passed; plus what each kind of route adds.
_V1 = (401, 500, 503, 504)
_LIST_ERRORS = _errors(*_V1)
_MODEL_ERRORS = _errors(*_V1, 404)
_GENERATE_RESPONSES = {
    **_errors(*_V1, 400, 404, 413, 429, 501),
    200: {  # besides the response model's JSON
        "content": {
            "text/event-stream": {
                "schema": {  # one server-sent event; its data a chunk's JSON, an error's, or [DONE]
                    "description": "with stream=true: the answer as server-sent events",
                    "type": "object",
                    "properties": {"data": {"type": "string"}},
                    "required": ["data"],
                }
            }
        }
    },
}
# vLLM answers the admin routes in plain text. response_class=Response (no media type) keeps
# FastAPI from filing the JSON errors under text/plain.
_ADMIN_RESPONSES = {
    **_errors(*_V1, 400, 403, 404, 413),
    200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
}
_ROUTE_ERRORS = _errors(*_V1, 400, 413)
_EXAMPLES_ERRORS = _errors(*_V1, 400, 403, 404, 413)
_ADMIN_PATHS = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/v1/router/examples"})
_GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
# How often a non-streamed generation checks that its client is still there.
DISCONNECT_POLL_S = 0.25
# Adapter tiers from coldest to warmest (GenerateResponse.adapter_tier); one this shim does not
# know (a newer server's) counts as colder than all of them.
TIERS_COLD_FIRST = ("disk", "host", "device")


def create_app(
    grpc_target: str,
    *,
    enable_admin: bool = False,
    api_key: str | None = None,
    admin_token: str | None = None,
    metrics_registry: CollectorRegistry | None = None,
    limits: HttpLimits | None = None,
    on_refused: Callable[[str | None], None] | None = None,
) -> FastAPI:
    """The shim for the gRPC server at `grpc_target` (HOST:PORT); admin routes answer 403 unless enabled.

    `api_key` / `admin_token`: what HTTP clients must present, and what the shim presents to gRPC.
    `limits`: its `max_body_mb` applies here (the connection limits to `HttpServer`).
    `on_refused(model)`: told of every generation request the shim refuses itself (a body that
    fails its schema: `n: 0`, `max_tokens: -1`, ...; one over the size limit), with the body's
    `model` (None when it has none or was not read), so that `loramux serve` counts them as the
    engine counts the refusals it sees.
    """
    limits = limits or HttpLimits()
    auth = authn.AuthConfig(api_key=api_key, admin_token=admin_token)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        channel = bearer_channel(grpc_target, api_key)
        app.state.backend = Backend(channel, admin_token)
        try:
            yield
        finally:
            await channel.close()

    async def authorize(request: Request) -> None:
        path = request.url.path
        if not path.startswith("/v1/"):
            return
        token = authn.bearer_token(request.headers.get("authorization"))
        refused = authn.check(auth, token, admin=path in _ADMIN_PATHS)
        if refused == "unauthenticated":
            raise ApiError(401, authn.UNAUTHENTICATED_MESSAGE, code="invalid_api_key")
        if refused == "permission_denied":
            raise ApiError(403, authn.PERMISSION_DENIED_MESSAGE)
        # "admin_disabled" (no --enable-admin, no admin token): the admin routes say so themselves

    app = FastAPI(
        title="loramux OpenAI-compatible API",
        lifespan=lifespan,
        dependencies=[Depends(authorize)],
    )
    install_handlers(app, on_refused, generation_paths=_GENERATION_PATHS)

    def too_large(path: str) -> None:  # its model is in the body nobody read: counted as unknown
        if on_refused is not None and path in _GENERATION_PATHS:
            on_refused(None)

    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes, refused=too_large)

    def backend(request: Request) -> Backend:
        return request.app.state.backend  # type: ignore[no-any-return]

    @app.get("/health", response_model=oa.HealthResponse, responses=_errors(503))
    async def health(request: Request) -> Any:
        if not await backend(request).serving():
            return error_response(503, "the engine is not serving (starting, stopped or unreachable)")
        return oa.HealthResponse()

    registry = metrics_registry if metrics_registry is not None else prometheus_client.REGISTRY

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        # generate_latest reads the engine's state (locks held for microseconds): fine on the loop
        return Response(prometheus_client.generate_latest(registry), media_type=METRICS_CONTENT_TYPE)

    @app.get("/v1/models", response_model=oa.ModelList, responses=_LIST_ERRORS)
    async def list_models(request: Request) -> oa.ModelList:
        return oa.ModelList(data=await _model_cards(backend(request)))

    @app.get("/v1/models/{model}", response_model=oa.ModelCard, responses=_MODEL_ERRORS)
    async def get_model(model: str, request: Request) -> oa.ModelCard:
        cards = await _model_cards(backend(request))
        for card in cards:
            if card.id == model:
                return card
        message = unknown_model(model, [card.id for card in cards])
        raise ApiError(404, message, param="model", code="model_not_found")

    @app.post("/v1/completions", response_model=oa.CompletionResponse, responses=_GENERATE_RESPONSES)
    async def completions(body: oa.CompletionRequest, request: Request) -> Any:
        return await _generate(request, body, _completion_answer, _completion_chunks)

    @app.post("/v1/chat/completions", response_model=oa.ChatCompletionResponse, responses=_GENERATE_RESPONSES)
    async def chat_completions(body: oa.ChatCompletionRequest, request: Request) -> Any:
        return await _generate(request, body, _chat_answer, _chat_chunks)

    @app.post(
        "/v1/load_lora_adapter",
        response_class=Response,
        responses=_ADMIN_RESPONSES,
        include_in_schema=enable_admin,
    )
    async def load_lora_adapter(body: oa.LoadLoraAdapterRequest, request: Request) -> Response:
        _check_admin(enable_admin)
        await backend(request).load_adapter(body.lora_name, body.lora_path, replace=body.load_inplace)
        return PlainTextResponse(f"Success: LoRA adapter {shown(body.lora_name)} added successfully.")

    @app.post(
        "/v1/unload_lora_adapter",
        response_class=Response,
        responses=_ADMIN_RESPONSES,
        include_in_schema=enable_admin,
    )
    async def unload_lora_adapter(body: oa.UnloadLoraAdapterRequest, request: Request) -> Response:
        _check_admin(enable_admin)
        await backend(request).unload_adapter(body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter {shown(body.lora_name)} removed successfully.")

    @app.post("/v1/router/route", response_model=oa.RouteResponse, responses=_ROUTE_ERRORS)
    async def route_prompt(body: oa.RouteRequest, request: Request) -> oa.RouteResponse:
        decision = await backend(request).route(body)
        return oa.RouteResponse(
            candidates=[
                oa.RouteCandidate(adapter=c.adapter, score=c.score, by=c.by) for c in decision.candidates
            ],
            fallback_to_base=decision.fallback_to_base,
            reason=decision.reason,
            route_seconds=decision.route_seconds,
        )

    @app.post(
        "/v1/router/examples",
        response_model=oa.RegisterExamplesResponse,
        responses=_EXAMPLES_ERRORS,
        include_in_schema=enable_admin,
    )
    async def register_examples(
        body: oa.RegisterExamplesRequest, request: Request
    ) -> oa.RegisterExamplesResponse:
        _check_admin(enable_admin)
        learned = await backend(request).register_examples(body.adapter, body.prompts)
        return oa.RegisterExamplesResponse(
            adapter=learned.adapter, examples=learned.examples, steps=learned.steps, seconds=learned.seconds
        )

    for route in app.routes:  # readable operation ids in the OpenAPI schema
        if isinstance(route, APIRoute):
            route.operation_id = route.name
    return app


def _check_admin(enabled: bool) -> None:
    if not enabled:
        raise ApiError(
            403,
            "loading and unloading adapters and registering their example prompts over HTTP is disabled; "
            "start the server with --enable-admin",
        )


async def _model_cards(backend: Backend) -> list[oa.ModelCard]:
    info = await backend.info()
    now = int(time.time())
    base = info.model_name
    cards = [oa.ModelCard(id=base, created=now, root=base, max_model_len=info.max_model_len)]
    if info.HasField("router"):  # the router picks the adapter(s) of each request
        cards.append(oa.ModelCard(id=AUTO_MODEL, created=now, root=base, parent=base))
    for adapter in await backend.list_adapters():
        card = oa.ModelCard(id=adapter.name, created=now, root=adapter.source or adapter.name, parent=base)
        if adapter.error:  # found broken without serving it (server.engine.adapters)
            card.status, card.error = "invalid", adapter.error
        cards.append(card)
    return cards


# -- generation ----------------------------------------------------------------------------

Body = oa.CompletionRequest | oa.ChatCompletionRequest
Answer = Callable[[str, str, Body, list[pb.GenerateResponse]], Any]


@dataclass(frozen=True)
class Extensions:
    """loramux's top-level fields of an answer (the first event's, when streamed); None = absent."""

    routing: oa.Routing | None = None
    adapter_tier: str | None = None

    def absent(self) -> set[str]:
        """The fields to leave out of the answer's JSON."""
        return {name for name in ("routing", "adapter_tier") if getattr(self, name) is None}


NO_EXTENSIONS = Extensions()
Chunks = Callable[
    [str, str, Body, Extensions, AsyncIterator[tuple[int, pb.GenerateStreamChunk]]],
    AsyncGenerator[str, None],
]


async def _generate(http_request: Request, body: Body, answer: Answer, chunks: Chunks) -> Any:
    try:
        return await _generate_known(http_request, body, answer, chunks)
    except grpc.aio.AioRpcError as err:
        if err.code() == grpc.StatusCode.NOT_FOUND:  # a model (or mixture adapter) nobody serves
            raise await _unknown_model(http_request.app.state.backend, body, err) from None
        raise


async def _unknown_model(backend: Backend, body: Body, err: grpc.aio.AioRpcError) -> ApiError:
    """404 naming the model (or the mixture's adapter) that does not exist, and those that do; the
    server's own words when every name is listed (it went away in between)."""
    models = [card.id for card in await _model_cards(backend)]
    name, param = body.model, "model"
    missing = [entry.name for entry in body.adapters or () if entry.name not in models]
    if missing:
        name, param = missing[0], "adapters"
    elif name in models:
        return from_rpc_error(err)
    return ApiError(404, unknown_model(name, models, param), param=param, code="model_not_found")


async def _generate_known(http_request: Request, body: Body, answer: Answer, chunks: Chunks) -> Any:
    backend: Backend = http_request.app.state.backend
    adapter = await backend.adapter_for(body.model, mixture=bool(body.adapters))
    requests = generate_requests(body, adapter)
    prefix = "chatcmpl" if isinstance(body, oa.ChatCompletionRequest) else "cmpl"
    answer_id = f"{prefix}-{uuid.uuid4().hex}"
    for index, request in enumerate(requests):
        request.request_id = f"{answer_id}-{index}"
    if not body.stream:
        generation = _gather(*(backend.stub.Generate(request) for request in requests))
        responses = await _unless_disconnected(http_request, generation)
        if responses is None:  # the client left: its engine requests are aborted, nobody reads this
            return Response(status_code=499)
        result = answer(answer_id, await backend.model_id(responses[0].adapter), body, responses)
        extensions = _extensions(responses)
        result.routing, result.adapter_tier = extensions.routing, extensions.adapter_tier
        return JSONResponse(result.model_dump(mode="json", exclude=extensions.absent()))
    streams = await open_streams(backend.stub, requests)
    model = await backend.model_id(streams.first_chunks[0].adapter)
    extensions = _extensions(streams.first_chunks)
    return EventStreamResponse(_with_errors(chunks(answer_id, model, body, extensions, merge(streams))))


def _extensions(answers: Sequence[pb.GenerateResponse] | Sequence[pb.GenerateStreamChunk]) -> Extensions:
    """The loramux fields of an answer from its choices' gRPC answers (or first chunks): the first
    one's routing (every choice is routed alike) and the coldest adapter tier ("" = base model)."""
    first = answers[0]
    tier = min((a.adapter_tier for a in answers), key=_warmth)
    return Extensions(
        routing=_routing(first.routing) if first.HasField("routing") else None,
        adapter_tier=tier or None,
    )


def _warmth(tier: str) -> int:
    return TIERS_COLD_FIRST.index(tier) if tier in TIERS_COLD_FIRST else -1


def _routing(routing: pb.RouteResponse) -> oa.Routing:
    return oa.Routing(
        candidates=[
            oa.ServedCandidate(adapter=c.adapter, score=c.score, by=c.by, weight=c.weight)
            for c in routing.candidates
        ],
        fallback_to_base=routing.fallback_to_base,
        reason=routing.reason,
        route_seconds=routing.route_seconds,
    )


async def _unless_disconnected(request: Request, work: Any) -> Any:
    """Await `work`, or cancel it (and so its gRPC calls and engine requests) and return None as
    soon as the client disconnects."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                return None
    finally:
        task.cancel()


async def _gather(*calls: Any) -> list[Any]:
    """Await all calls; the first failure cancels the others (and so their engine requests)."""
    tasks = [asyncio.ensure_future(call) for call in calls]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()


async def _with_errors(events: AsyncGenerator[str, None]) -> AsyncIterator[str]:
    """The SSE events, then `[DONE]`; an error after the 200 went out becomes an error event."""
    try:
        async for event in events:
            yield event
    except grpc.aio.AioRpcError as err:
        error = from_rpc_error(err)
        yield sse(compact_json(error_body(error.status, error.message, code=error.code)))
    finally:
        await events.aclose()
    yield DONE


def _usage(prompt_tokens: int, completion_tokens: int) -> oa.Usage:
    return oa.Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


def _total_usage(body: Body, prompt_tokens: list[int], completion_tokens: list[int]) -> oa.Usage:
    # OpenAI counts each prompt once, however many choices (n) it has.
    return _usage(sum(prompt_tokens[:: body.n]), sum(completion_tokens))


def _completion_answer(
    answer_id: str, model: str, body: Body, responses: list[pb.GenerateResponse]
) -> oa.CompletionResponse:
    assert isinstance(body, oa.CompletionRequest)
    choices = []
    for i, r in enumerate(responses):
        text, entries = r.text, list(r.logprobs)
        if body.echo:  # the prompt first, as vLLM echoes it
            text, entries = (
                logprobs.echo_text(body, i, r.prompt_logprobs) + text,
                [*r.prompt_logprobs, *entries],
            )
        choice = oa.CompletionChoice(index=i, text=text, finish_reason=finish_reason(r.finish_reason))  # type: ignore[arg-type]
        if body.logprobs is not None:
            choice.logprobs = logprobs.completion_logprobs(entries, body.logprobs)
        choices.append(choice)
    usage = _total_usage(body, [r.prompt_tokens for r in responses], [r.completion_tokens for r in responses])
    return oa.CompletionResponse(
        id=answer_id, created=int(time.time()), model=model, choices=choices, usage=usage
    )


def _chat_answer(
    answer_id: str, model: str, body: Body, responses: list[pb.GenerateResponse]
) -> oa.ChatCompletionResponse:
    choices = [
        oa.ChatChoice(
            index=i,
            message=oa.ChatMessageOut(content=r.text),
            finish_reason=finish_reason(r.finish_reason),  # type: ignore[arg-type]
            logprobs=logprobs.chat_logprobs(r.logprobs) if body.logprobs else None,
        )
        for i, r in enumerate(responses)
    ]
    usage = _total_usage(body, [r.prompt_tokens for r in responses], [r.completion_tokens for r in responses])
    return oa.ChatCompletionResponse(
        id=answer_id, created=int(time.time()), model=model, choices=choices, usage=usage
    )


def _include_usage(body: Body) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


async def _completion_chunks(
    answer_id: str,
    model: str,
    body: Body,
    extensions: Extensions,
    chunks: AsyncIterator[tuple[int, pb.GenerateStreamChunk]],
) -> AsyncGenerator[str, None]:
    assert isinstance(body, oa.CompletionRequest)
    created = int(time.time())
    last: dict[int, pb.GenerateStreamChunk] = {}
    sent: dict[int, int] = {}  # characters of text sent per choice (where text_offset goes on)
    async for index, chunk in chunks:
        first = index not in last
        last[index] = chunk
        text, entries = chunk.text, list(chunk.logprobs)
        if body.echo and first:  # the prompt first, in the choice's first event
            text, entries = (
                logprobs.echo_text(body, index, chunk.prompt_logprobs) + text,
                [
                    *chunk.prompt_logprobs,
                    *entries,
                ],
            )
        if not text and not chunk.finished and not entries:
            continue
        choice = oa.CompletionChoice(
            index=index,
            text=text,
            finish_reason=finish_reason(chunk.finish_reason) if chunk.finished else None,  # type: ignore[arg-type]
        )
        if body.logprobs is not None:
            choice.logprobs = logprobs.completion_logprobs(entries, body.logprobs, sent.get(index, 0))
        sent[index] = sent.get(index, 0) + len(text)
        event = oa.CompletionResponse(
            id=answer_id,
            created=created,
            model=model,
            choices=[choice],
            routing=extensions.routing,
            adapter_tier=extensions.adapter_tier,
        )
        yield sse(event.model_dump_json(exclude={"usage"} | extensions.absent()))
        extensions = NO_EXTENSIONS  # on the first event only
    if _include_usage(body):
        usage = _stream_usage(body, last)
        event = oa.CompletionResponse(id=answer_id, created=created, model=model, choices=[], usage=usage)
        yield sse(event.model_dump_json(exclude=NO_EXTENSIONS.absent()))


async def _chat_chunks(
    answer_id: str,
    model: str,
    body: Body,
    extensions: Extensions,
    chunks: AsyncIterator[tuple[int, pb.GenerateStreamChunk]],
) -> AsyncGenerator[str, None]:
    created = int(time.time())
    last: dict[int, pb.GenerateStreamChunk] = {}

    def event(
        choices: list[oa.ChatChunkChoice], usage: oa.Usage | None = None, extras: Extensions = NO_EXTENSIONS
    ) -> str:
        chunk = oa.ChatCompletionChunk(
            id=answer_id,
            created=created,
            model=model,
            choices=choices,
            usage=usage,
            routing=extras.routing,
            adapter_tier=extras.adapter_tier,
        )
        left_out = extras.absent() | ({"usage"} if usage is None else set())
        payload = chunk.model_dump(mode="json", exclude=left_out)
        for choice in payload["choices"]:  # a delta carries only what changed
            choice["delta"] = {key: value for key, value in choice["delta"].items() if value is not None}
        return sse(compact_json(payload))

    async for index, chunk in chunks:
        if index not in last:  # OpenAI opens every choice with the assistant's role
            opening = oa.ChatChunkChoice(index=index, delta=oa.ChatDelta(role="assistant", content=""))
            yield event([opening], extras=extensions)
            extensions = NO_EXTENSIONS  # on the first event only
        last[index] = chunk
        if not chunk.text and not chunk.finished and not chunk.logprobs:
            continue
        reason = finish_reason(chunk.finish_reason) if chunk.finished else None
        delta = oa.ChatDelta(content=chunk.text or None)
        choice = oa.ChatChunkChoice(index=index, delta=delta, finish_reason=reason)  # type: ignore[arg-type]
        if body.logprobs:
            choice.logprobs = logprobs.chat_logprobs(chunk.logprobs)
        yield event([choice])
    if _include_usage(body):
        yield event([], _stream_usage(body, last))


def _stream_usage(body: Body, last: dict[int, pb.GenerateStreamChunk]) -> oa.Usage:
    ordered = [last[index] for index in sorted(last)]
    return _total_usage(body, [c.prompt_tokens for c in ordered], [c.completion_tokens for c in ordered])
