"""The shim's side of the gRPC wire: an Inference client and the OpenAI -> GenerateRequest mapping.

`Backend` wraps one `grpc.aio` channel: it caches GetInfo (the base model's id, whether there is
a router) once the server has answered, maps an OpenAI `model` to an adapter name, lists adapters
(none when the server serves no adapters), and asks the router (Route, RegisterExamples).
`generate_requests` turns a completion or chat body into one GenerateRequest per choice (with
`adapters`, a weighted mixture; with model "auto", its `route_top_k`). `bearer_channel` opens the channel so that every call presents the
shim's API key as `authorization` metadata; the adapter RPCs present the admin token when one is
set. gRPC errors propagate as `grpc.aio.AioRpcError`;
`server.http.errors` turns them into HTTP answers.

It does not know HTTP routes, nor how the server generates.
"""

from __future__ import annotations

from typing import Any, cast

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from adapters_store.errors import shown
from loramux.v1 import inference_pb2 as pb
from loramux.v1 import inference_pb2_grpc as pb_grpc
from server.access_log import API_METADATA_KEY
from server.auth import bearer_metadata
from server.http import logprobs
from server.http.errors import ApiError
from server.http.openai_types import (
    MAX_CHOICES,
    ChatCompletionRequest,
    CompletionRequest,
    RouteRequest,
    SamplingParams,
)
from server.http.structured import structured_output_pb

INFO_TIMEOUT_S = 10.0
ADAPTER_RPC_TIMEOUT_S = 120.0  # LoadAdapter reads and validates files; RegisterExamples trains
ROUTE_TIMEOUT_S = 60.0
INFERENCE_SERVICE = "loramux.v1.Inference"
AUTO_MODEL = "auto"  # server.preparation.AUTO_ADAPTER


class _Bearer:
    """Adds `authorization: Bearer <key>` to calls that carry no authorization of their own, and
    says that the call comes from the HTTP shim (`loramux-api: http`, for the access log)."""

    def __init__(self, token: str | None) -> None:
        self._metadata = bearer_metadata(token)

    def _details(self, details: Any) -> Any:
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        if "authorization" not in metadata:
            for key, value in self._metadata:
                metadata.add(key, value)
        metadata.add(API_METADATA_KEY, "http")
        return details._replace(metadata=metadata)


# grpc.aio files an interceptor under its first matching kind only: one class per kind.
class _BearerUnary(_Bearer, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _BearerStream(_Bearer, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


def bearer_channel(target: str, api_key: str | None) -> grpc.aio.Channel:
    """An insecure channel to `target` whose calls present `api_key` (none when None)."""
    interceptors: Any = [_BearerUnary(api_key), _BearerStream(api_key)]
    return grpc.aio.insecure_channel(target, interceptors=interceptors)


class Backend:
    """One gRPC client of `loramux.v1.Inference` (and of the health service) for the app's loop."""

    def __init__(self, channel: grpc.aio.Channel, admin_token: str | None = None) -> None:
        self.stub = pb_grpc.InferenceStub(channel)
        self._health = health_pb2_grpc.HealthStub(channel)
        self._info: pb.GetInfoResponse | None = None
        self._admin_metadata = bearer_metadata(admin_token) or None

    async def info(self) -> pb.GetInfoResponse:
        """GetInfo, asked once: the base model does not change while a server runs."""
        if self._info is None:
            self._info = await self.stub.GetInfo(pb.GetInfoRequest(), timeout=INFO_TIMEOUT_S)
        return self._info

    async def adapter_for(self, model: str, mixture: bool = False) -> str:
        """The adapter name an OpenAI `model` asks for: "" for the base model's id, else `model` as is
        (the gRPC server's preparation refuses a name it cannot serve: NOT_FOUND, 404). With a
        `mixture` (the body's `adapters`), `model` must be the base model's id."""
        info = await self.info()
        if mixture and model != info.model_name:
            raise ApiError(
                400,
                f"with adapters (a weighted mixture), set model to the base model's id {shown(info.model_name)}, "
                f"not {shown(model)}; the answer's model then names the mixture",
                param="model",
            )
        return "" if model == info.model_name else model

    async def model_id(self, adapter: str) -> str:
        """The OpenAI `model` of an answer: the adapter that served it, or the base model's id."""
        return adapter or (await self.info()).model_name

    async def list_adapters(self) -> list[pb.AdapterInfo]:
        try:
            response = await self.stub.ListAdapters(pb.ListAdaptersRequest(), timeout=INFO_TIMEOUT_S)
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.FAILED_PRECONDITION:  # started without adapters
                return []
            raise
        return list(response.adapters)

    async def load_adapter(self, name: str, path: str, replace: bool) -> pb.AdapterInfo:
        request = pb.LoadAdapterRequest(name=name, path=path, replace=replace)
        response = await self.stub.LoadAdapter(
            request, timeout=ADAPTER_RPC_TIMEOUT_S, metadata=self._admin_metadata
        )
        return response.adapter

    async def unload_adapter(self, name: str) -> None:
        await self.stub.UnloadAdapter(
            pb.UnloadAdapterRequest(name=name), timeout=ADAPTER_RPC_TIMEOUT_S, metadata=self._admin_metadata
        )

    async def route(self, body: RouteRequest) -> pb.RouteResponse:
        request = pb.RouteRequest(top_k=body.top_k)
        if isinstance(body.prompt, str):
            request.prompt = body.prompt
        elif body.prompt is not None:
            request.token_ids.extend(body.prompt)
        for message in body.messages or ():
            request.messages.add(role=message.role, content=message.text())
        return await self.stub.Route(request, timeout=ROUTE_TIMEOUT_S)

    async def register_examples(self, adapter: str, prompts: list[str]) -> pb.RegisterExamplesResponse:
        request = pb.RegisterExamplesRequest(adapter=adapter, prompts=prompts)
        return await self.stub.RegisterExamples(
            request, timeout=ADAPTER_RPC_TIMEOUT_S, metadata=self._admin_metadata
        )

    async def serving(self) -> bool:
        """True if the server's health service says the Inference service is SERVING."""
        request = health_pb2.HealthCheckRequest(service=INFERENCE_SERVICE)
        try:
            response = await self._health.Check(request, timeout=INFO_TIMEOUT_S)
        except grpc.aio.AioRpcError:
            return False
        return response.status == health_pb2.HealthCheckResponse.SERVING


def generate_requests(
    body: CompletionRequest | ChatCompletionRequest, adapter: str
) -> list[pb.GenerateRequest]:
    """One GenerateRequest per choice: for each prompt, `n` of them (choice i seeded seed + i)."""
    refused = body.unsupported()
    if refused is not None:
        raise ApiError(400, f"{refused} is not supported by loramux; leave it unset", param=refused)
    logprobs.check(body)
    prompts = _prompts(body)
    if body.model == AUTO_MODEL and len(prompts) > 1:
        raise ApiError(
            400,
            f"model 'auto' routes one prompt per request, got {len(prompts)}; send them in separate requests",
            param="prompt",
        )
    if len(prompts) * body.n > MAX_CHOICES:
        raise ApiError(
            400, f"{len(prompts)} prompts x n={body.n} is more than {MAX_CHOICES} choices in one request"
        )
    requests = []
    for prompt in prompts:
        for i in range(body.n):
            request = _sampling(body, adapter)
            request.MergeFrom(prompt)
            logprobs.ask(body, request)
            if body.seed is not None:
                request.seed = (body.seed + i) % 2**64
            requests.append(request)
    return requests


def _prompts(body: CompletionRequest | ChatCompletionRequest) -> list[pb.GenerateRequest]:
    """The inputs of a body, each as a GenerateRequest holding only its prompt."""
    if isinstance(body, ChatCompletionRequest):
        messages = [pb.ChatMessage(role=m.role, content=m.text()) for m in body.messages]
        return [pb.GenerateRequest(messages=messages)]
    prompt = body.prompt
    if isinstance(prompt, str):
        return [pb.GenerateRequest(prompt=prompt)]
    if not prompt:
        raise ApiError(400, "prompt is empty", param="prompt")
    if all(isinstance(item, int) for item in prompt):
        return [pb.GenerateRequest(token_ids=cast(list[int], prompt))]
    return [
        pb.GenerateRequest(prompt=item)
        if isinstance(item, str)
        else pb.GenerateRequest(token_ids=cast(list[int], item))
        for item in prompt
    ]


def _sampling(body: SamplingParams, adapter: str) -> pb.GenerateRequest:
    request = pb.GenerateRequest(adapter=adapter, ignore_eos=body.ignore_eos)
    max_tokens = body.max_completion_tokens if isinstance(body, ChatCompletionRequest) else None
    max_tokens = max_tokens or body.max_tokens
    if max_tokens is not None:
        request.max_tokens = max_tokens
    if body.temperature is not None:
        request.temperature = body.temperature
    if body.top_p is not None:
        request.top_p = body.top_p
    if body.top_k is not None:
        request.top_k = body.top_k
    if body.stop is not None:
        request.stop.extend([body.stop] if isinstance(body.stop, str) else body.stop)
    if body.stop_token_ids:
        request.stop_token_ids.extend(body.stop_token_ids)
    if body.route_top_k is not None:
        request.route_top_k = body.route_top_k
    _controls(body, request)
    for entry in body.adapters or ():
        request.adapters.add(name=entry.name, weight=entry.weight)
    structured = structured_output_pb(body)
    if structured is not None:
        request.structured_output.CopyFrom(structured)
    return request


def _controls(body: SamplingParams, request: pb.GenerateRequest) -> None:
    """The sampling controls (penalties, min_p, min_tokens, logit_bias) that the body sets."""
    for name in ("presence_penalty", "frequency_penalty", "repetition_penalty", "min_p", "min_tokens"):
        value = getattr(body, name)
        if value is not None:
            setattr(request, name, value)
    for token, bias in (body.logit_bias or {}).items():  # keys checked: token ids < 2**32
        request.logit_bias[int(token)] = bias


FINISH_REASONS = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_CANCELLED: "abort",
}


def finish_reason(reason: int) -> str | None:
    return FINISH_REASONS.get(reason)  # type: ignore[call-overload]
