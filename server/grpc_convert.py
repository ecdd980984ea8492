"""Translate between the protobuf messages of `loramux.v1` and the engine's domain types.

`*_from_pb` functions read a request into plain values (no checks beyond what the wire
format itself forces; validation is the domain's job), `*_to_pb` functions build answers.
Unset `optional` fields get the defaults documented in the .proto here, and only here.

This module knows both vocabularies and nothing else: no engine calls, no gRPC status codes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from importlib import metadata
from typing import TYPE_CHECKING, Any

from loramux.v1 import inference_pb2 as pb
from server.engine.request import (
    FinishReason,
    InvalidRequest,
    RequestOutput,
    SamplingParams,
    StructuredOutput,
    TokenLogprob,
)
from server.prompts import PromptInput, max_prompt_chars

if TYPE_CHECKING:
    from server.config import RouterConfig
    from server.engine.adapters import AdapterStatus
    from server.engine.engine import EngineInfo
    from server.router.decision import RouteDecision

DEFAULT_MAX_TOKENS = 64
DEFAULT_TEMPERATURE = 1.0  # OpenAI's default; 0 = greedy
DEFAULT_TOP_P = 1.0

_FINISH_REASON_TO_PB = {
    None: pb.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
    # ERROR never reaches the wire as a finish reason: the call fails with INTERNAL instead.
}


# The adapter store's format names (adapters_store.FORMATS and those to come).
_FORMAT_TO_PB = {
    "peft-lora": pb.ADAPTER_FORMAT_PEFT_LORA,
    "mos": pb.ADAPTER_FORMAT_MOS,
    "compeft": pb.ADAPTER_FORMAT_COMPEFT,
}
_FORMAT_FROM_PB: dict[int, str | None] = {
    pb.ADAPTER_FORMAT_UNSPECIFIED: None,  # detect it from the directory
    **{number: name for name, number in _FORMAT_TO_PB.items()},
}
_TIER_TO_PB = {"disk": pb.ADAPTER_TIER_DISK, "host": pb.ADAPTER_TIER_HOST, "device": pb.ADAPTER_TIER_DEVICE}


def prompt_from_pb(request: pb.GenerateRequest) -> PromptInput:
    return PromptInput(
        text=request.prompt if request.HasField("prompt") else None,
        token_ids=tuple(request.token_ids),
        messages=tuple((message.role, message.content) for message in request.messages),
    )


def sampling_from_pb(request: pb.GenerateRequest) -> SamplingParams:
    return SamplingParams(
        max_tokens=request.max_tokens if request.HasField("max_tokens") else DEFAULT_MAX_TOKENS,
        temperature=request.temperature if request.HasField("temperature") else DEFAULT_TEMPERATURE,
        top_k=request.top_k,
        top_p=request.top_p if request.HasField("top_p") else DEFAULT_TOP_P,
        seed=request.seed if request.HasField("seed") else None,
        stop=tuple(request.stop),
        stop_token_ids=tuple(request.stop_token_ids),
        ignore_eos=request.ignore_eos,
        **_controls_from_pb(request),
        logprobs=request.logprobs if request.HasField("logprobs") else None,
        prompt_logprobs=request.prompt_logprobs if request.HasField("prompt_logprobs") else None,
        structured=structured_from_pb(request),
    )


def _controls_from_pb(request: pb.GenerateRequest) -> dict[str, Any]:
    """The sampling controls of fields 18-23; an unset one keeps SamplingParams' default (off)."""
    controls: dict[str, Any] = {
        name: getattr(request, name)
        for name in ("presence_penalty", "frequency_penalty", "repetition_penalty", "min_p", "min_tokens")
        if request.HasField(name)
    }
    if request.logit_bias:
        controls["logit_bias"] = tuple(sorted(request.logit_bias.items()))
    return controls


def structured_from_pb(request: pb.GenerateRequest) -> StructuredOutput | None:
    """The request's structured_output (None: free text); the choices travel as a JSON list."""
    if not request.HasField("structured_output"):
        return None
    given = request.structured_output
    kind = given.WhichOneof("kind")
    if kind is None:
        return None
    if kind == "json_object":
        if not given.json_object:
            raise InvalidRequest(
                "structured_output.json_object must be true (leave structured_output unset for free text)"
            )
        return StructuredOutput("json_object")
    if kind == "choice":
        return StructuredOutput("choice", json.dumps(list(given.choice.choices), ensure_ascii=False))
    return StructuredOutput(kind, getattr(given, kind))


def mixture_from_pb(request: pb.GenerateRequest) -> tuple[tuple[str, float], ...]:
    return tuple((entry.name, entry.weight) for entry in request.adapters)


def route_top_k_from_pb(request: pb.GenerateRequest) -> int | None:
    """None = the server's default."""
    return request.route_top_k if request.HasField("route_top_k") else None


def route_prompt_from_pb(request: pb.RouteRequest) -> PromptInput:
    return PromptInput(
        text=request.prompt if request.HasField("prompt") else None,
        token_ids=tuple(request.token_ids),
        messages=tuple((message.role, message.content) for message in request.messages),
    )


def routing_to_pb(
    decision: RouteDecision, top_k: int = 0, served: Mapping[str, float] | None = None
) -> pb.RouteResponse:
    """The router's decision: its `top_k` best candidates (0 = all), each with its weight in the
    mixture that `served` (none: 0)."""
    served = served or {}
    candidates = decision.candidates[:top_k] if top_k else decision.candidates
    return pb.RouteResponse(
        candidates=[
            pb.RouteCandidate(adapter=c.adapter, score=c.score, by=c.by, weight=served.get(c.adapter, 0.0))
            for c in candidates
        ],
        fallback_to_base=decision.fallback,
        reason=decision.reason,
        route_seconds=decision.seconds,
    )


def router_info_to_pb(config: RouterConfig, by_examples: int, by_weights: int) -> pb.RouterInfo:
    return pb.RouterInfo(
        threshold=config.threshold,
        top_k=config.top_k,
        layer=config.layer,
        adapters=config.adapters,
        adapters_by_examples=by_examples,
        adapters_by_weights=by_weights,
    )


def adapter_format_from_pb(value: int) -> str | None:
    """The store's name of a LoadAdapterRequest.format; None = detect it from the directory."""
    if value not in _FORMAT_FROM_PB:  # an enum number from a newer client
        raise InvalidRequest(f"format {value} is not an AdapterFormat this server knows")
    return _FORMAT_FROM_PB[value]


def adapter_info_to_pb(status: AdapterStatus) -> pb.AdapterInfo:
    return pb.AdapterInfo(
        name=status.name,
        format=_FORMAT_TO_PB.get(status.format, pb.ADAPTER_FORMAT_UNSPECIFIED),  # "" = not read yet
        rank=status.rank,
        bytes=status.nbytes,
        tier=_TIER_TO_PB.get(status.tier, pb.ADAPTER_TIER_UNSPECIFIED),
        pinned=status.pinned,
        load_count=status.load_count,
        requests_served=status.requests_served,
        target_modules=status.target_modules,
        source=status.source,
        error=status.error,
    )


def finish_reason_to_pb(reason: FinishReason | None) -> pb.FinishReason:
    return _FINISH_REASON_TO_PB.get(reason, pb.FINISH_REASON_UNSPECIFIED)


def chunk_to_pb(
    output: RequestOutput, adapter: str, routing: pb.RouteResponse | None = None
) -> pb.GenerateStreamChunk:
    return pb.GenerateStreamChunk(
        request_id=output.request_id,
        text=output.text,
        token_ids=output.token_ids,
        finished=output.finished,
        finish_reason=finish_reason_to_pb(output.finish_reason),
        prompt_tokens=output.prompt_tokens,
        completion_tokens=output.completion_tokens,
        adapter=adapter,
        routing=routing,
        adapter_tier=output.adapter_tier,
        logprobs=logprobs_to_pb(output.logprobs),
        prompt_logprobs=logprobs_to_pb(output.prompt_logprobs),
    )


def response_to_pb(
    request_id: str,
    outputs: Sequence[RequestOutput],
    adapter: str,
    routing: pb.RouteResponse | None = None,
) -> pb.GenerateResponse:
    """Join a finished request's increments into one answer."""
    last = outputs[-1] if outputs else RequestOutput(request_id, "", ())
    return pb.GenerateResponse(
        request_id=request_id,
        text="".join(output.text for output in outputs),
        token_ids=[token for output in outputs for token in output.token_ids],
        finish_reason=finish_reason_to_pb(last.finish_reason),
        prompt_tokens=last.prompt_tokens,
        completion_tokens=last.completion_tokens,
        adapter=adapter,
        routing=routing,
        adapter_tier=last.adapter_tier,  # the same on every output
        logprobs=logprobs_to_pb([entry for output in outputs for entry in output.logprobs]),
        prompt_logprobs=logprobs_to_pb([entry for output in outputs for entry in output.prompt_logprobs]),
    )


def logprobs_to_pb(entries: Sequence[TokenLogprob]) -> list[pb.TokenLogprob]:
    return [
        pb.TokenLogprob(
            token_id=entry.token_id,
            text=entry.text,
            logprob=entry.logprob,  # None (the prompt's first token) leaves it unset
            rank=entry.rank,
            top=[pb.TopLogprob(token_id=t.token_id, text=t.text, logprob=t.logprob) for t in entry.top],
        )
        for entry in entries
    ]


def info_to_pb(info: EngineInfo, router: pb.RouterInfo | None = None) -> pb.GetInfoResponse:
    return pb.GetInfoResponse(
        model_name=info.model_name,
        max_model_len=info.max_model_len,
        max_running=info.max_running,
        max_queue=info.max_queue,
        max_prompt_tokens=max(info.max_model_len - 1, 0),
        max_prompt_chars=max_prompt_chars(info.max_model_len),
        kernels_backend=info.kernels_backend,
        device=info.device,
        dtype=info.dtype,
        vocab_size=info.vocab_size,
        default_max_tokens=DEFAULT_MAX_TOKENS,
        server_version=_server_version(),
        router=router,
    )


def _server_version() -> str:
    try:
        return metadata.version("loramux")
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"
