"""One request to the server under test, timed token by token: gRPC (loramux) or OpenAI HTTP.

A client turns a `PlannedRequest` into a `RequestRecord`: when it was sent, when each output
token arrived, how it ended (an error kind from records.ERR_*, never an exception), the tier its
adapter was in on arrival and what served it when the server says so. Both clients stream, so
TTFT and inter-token gaps are what a user sees.

- `GrpcClient`: `loramux.v1.Inference/GenerateStream` with the prompt as token ids; each chunk
  carries its new token ids, so every token gets its own arrival time.
- `OpenAIClient`: `POST /v1/completions` with `stream: true` against any OpenAI-compatible server
  (loramux's shim, vLLM, SGLang, ...); the prompt is sent as token ids (the API allows it), the
  model is the adapter's name (the base model's id for the base model); `ignore_eos` goes in the
  body as vLLM and loramux accept it. A chunk's tokens are counted by the final `usage` when the
  server sends it; chunk times stand for token times otherwise (as `vllm bench serve` counts).

Neither client knows the workload or the clock's origin: the runner passes `clock()`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from bench.loadtest.records import (
    ERR_CLIENT,
    ERR_CONNECTION,
    ERR_INCOMPLETE,
    ERR_REFUSED,
    ERR_SERVER,
    ERR_TIMEOUT,
    PlannedRequest,
    RequestRecord,
)

BASE = ""  # the base model's adapter name
# Which replica answered, as loramux's Ray Serve ingress says (server/ray_serve/app.py).
REPLICA_HEADER = "x-loramux-replica"


@dataclass(frozen=True)
class Sampling:
    """What every load request asks for; canaries always decode greedily."""

    temperature: float = 1.0  # the APIs' default: what users run
    ignore_eos: bool = True  # every answer runs to max_tokens, so runs compare (vllm bench does the same)


class Client(Protocol):
    async def send(self, planned: PlannedRequest, record: RequestRecord, greedy: bool) -> None:
        """Send `planned`, filling `record` (sent_s already set) as the answer streams in."""

    async def adapters(self) -> list[str]:
        """The adapters the server offers (for `--adapters` left out)."""

    async def close(self) -> None: ...


def _detail(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


class GrpcClient:
    def __init__(
        self,
        target: str,
        sampling: Sampling,
        clock: Callable[[], float],
        api_key: str | None,
        timeout_s: float,
    ) -> None:
        import grpc

        from loramux.v1 import inference_pb2 as pb
        from loramux.v1 import inference_pb2_grpc as pb_grpc
        from server.auth import bearer_metadata

        self._grpc = grpc
        self._pb = pb
        # Many concurrent streams share one HTTP/2 connection; lift the message size caps only.
        self._channel = grpc.aio.insecure_channel(target, options=[("grpc.max_receive_message_length", -1)])
        self._stub = pb_grpc.InferenceStub(self._channel)
        self._metadata = bearer_metadata(api_key) if api_key else ()
        self._sampling = sampling
        self._clock = clock
        self._timeout_s = timeout_s

    async def send(self, planned: PlannedRequest, record: RequestRecord, greedy: bool) -> None:
        pb = self._pb
        request = pb.GenerateRequest(
            request_id=f"load-{planned.index}",
            adapter=planned.adapter,
            max_tokens=planned.max_tokens,
            temperature=0.0 if greedy else self._sampling.temperature,
            ignore_eos=False if greedy else self._sampling.ignore_eos,
        )
        if planned.prompt_text is not None:
            request.prompt = planned.prompt_text
        else:
            request.token_ids.extend(planned.prompt_token_ids)
        finished = False
        try:
            async for chunk in self._stub.GenerateStream(
                request, metadata=self._metadata, timeout=self._timeout_s
            ):
                now = self._clock()
                if chunk.token_ids:
                    if record.first_token_s is None:
                        record.first_token_s = now
                    record.token_times_s.extend([now] * len(chunk.token_ids))
                    if greedy:
                        record.token_ids.extend(chunk.token_ids)
                if greedy:
                    record.text += chunk.text
                if record.served_by is None:
                    record.served_by = chunk.adapter
                tier = getattr(chunk, "adapter_tier", "")  # servers before the field say nothing
                if tier and record.tier is None:
                    record.tier = tier
                if chunk.prompt_tokens:
                    record.prompt_tokens = chunk.prompt_tokens
                record.output_tokens = chunk.completion_tokens or len(record.token_times_s)
                if chunk.finished:
                    finished = True
                    if chunk.finish_reason == pb.FINISH_REASON_CANCELLED:
                        record.error, record.error_detail = ERR_INCOMPLETE, "the server cancelled it"
        except self._grpc.aio.AioRpcError as err:
            record.error, record.error_detail = (
                self._error_kind(err),
                _detail(f"{err.code().name}: {err.details()}"),
            )
        record.end_s = self._clock()
        if record.error is None and not finished:
            record.error, record.error_detail = ERR_INCOMPLETE, "the stream ended without a last chunk"

    def _error_kind(self, err: Any) -> str:
        code = self._grpc.StatusCode
        return {
            code.RESOURCE_EXHAUSTED: ERR_REFUSED,
            code.DEADLINE_EXCEEDED: ERR_TIMEOUT,
            code.INVALID_ARGUMENT: ERR_CLIENT,
            code.NOT_FOUND: ERR_CLIENT,
            code.FAILED_PRECONDITION: ERR_CLIENT,
            code.UNAUTHENTICATED: ERR_CLIENT,
            code.PERMISSION_DENIED: ERR_CLIENT,
            code.OUT_OF_RANGE: ERR_CLIENT,
            code.CANCELLED: ERR_INCOMPLETE,
        }.get(err.code(), ERR_CONNECTION if self._connection_failed(err) else ERR_SERVER)

    def _connection_failed(self, err: Any) -> bool:
        return err.code() == self._grpc.StatusCode.UNAVAILABLE and "connect" in (err.details() or "").lower()

    async def adapters(self) -> list[str]:
        listed = await self._stub.ListAdapters(self._pb.ListAdaptersRequest(), metadata=self._metadata)
        return sorted(a.name for a in listed.adapters)

    async def close(self) -> None:
        await self._channel.close()


class OpenAIClient:
    def __init__(
        self,
        base_url: str,
        sampling: Sampling,
        clock: Callable[[], float],
        api_key: str | None,
        timeout_s: float,
    ) -> None:
        import httpx2 as httpx

        self._httpx = httpx
        # No connection cap: a client-side pool limit would queue requests here and hide the
        # server's queueing (coordinated omission).
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers={"authorization": f"Bearer {api_key}"} if api_key else {},
            timeout=httpx.Timeout(timeout_s, connect=min(10.0, timeout_s)),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
        )
        self._sampling = sampling
        self._clock = clock
        self._base_model: str | None = None

    async def base_model(self) -> str:
        """The model id that serves the base model: the first listed model that is no adapter."""
        if self._base_model is None:
            models = (await self._get_models()).get("data", [])
            bases = [m["id"] for m in models if not m.get("parent") and m.get("id") != "auto"]
            if not bases:
                raise RuntimeError("the server's /v1/models lists no base model")
            self._base_model = bases[0]
        return self._base_model

    async def _get_models(self) -> dict[str, Any]:
        response = await self._http.get("/v1/models")
        response.raise_for_status()
        return response.json()

    async def adapters(self) -> list[str]:
        models = (await self._get_models()).get("data", [])
        return sorted(m["id"] for m in models if m.get("parent") and m.get("id") != "auto")

    async def send(self, planned: PlannedRequest, record: RequestRecord, greedy: bool) -> None:
        body: dict[str, Any] = {
            "model": planned.adapter or await self.base_model(),
            "prompt": planned.prompt_text
            if planned.prompt_text is not None
            else list(planned.prompt_token_ids),
            "max_tokens": planned.max_tokens,
            "temperature": 0.0 if greedy else self._sampling.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self._sampling.ignore_eos and not greedy:
            body["ignore_eos"] = True
        finished = False
        chunks = 0
        httpx = self._httpx
        try:
            async with self._http.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    text = (await response.aread()).decode(errors="replace")
                    record.error = self._status_kind(response.status_code)
                    record.error_detail = _detail(f"HTTP {response.status_code}: {text}")
                    record.end_s = self._clock()
                    return
                record.replica = response.headers.get(REPLICA_HEADER)
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    now = self._clock()
                    event = json.loads(data)
                    if "error" in event:  # an error after the 200 went out
                        error = event["error"]
                        record.error = ERR_SERVER
                        record.error_detail = _detail(str(error.get("message", error)))
                        break
                    if record.tier is None and event.get("adapter_tier"):
                        record.tier = event["adapter_tier"]
                    if record.served_by is None and event.get("model"):
                        record.served_by = event["model"]
                    usage = event.get("usage")
                    if usage:
                        record.prompt_tokens = usage.get("prompt_tokens") or record.prompt_tokens
                        record.output_tokens = usage.get("completion_tokens", chunks)
                    for choice in event.get("choices") or ():
                        if choice.get("text"):
                            chunks += 1
                            if record.first_token_s is None:
                                record.first_token_s = now
                            record.token_times_s.append(now)
                            if greedy:
                                record.text += choice["text"]
                        if choice.get("finish_reason"):
                            finished = choice["finish_reason"] in ("stop", "length")
                            if not finished:
                                record.error = ERR_INCOMPLETE
                                record.error_detail = f"finish_reason {choice['finish_reason']}"
        except httpx.TimeoutException as exc:
            record.error, record.error_detail = ERR_TIMEOUT, _detail(f"{type(exc).__name__}: {exc}")
        except (httpx.TransportError, httpx.StreamError) as exc:
            record.error, record.error_detail = ERR_CONNECTION, _detail(f"{type(exc).__name__}: {exc}")
        except json.JSONDecodeError as exc:
            record.error, record.error_detail = ERR_SERVER, _detail(f"not JSON in the event stream: {exc}")
        record.end_s = self._clock()
        if not record.output_tokens:
            record.output_tokens = chunks
        if record.error is None and not finished:
            record.error, record.error_detail = ERR_INCOMPLETE, "the stream ended without a finish_reason"

    @staticmethod
    def _status_kind(status: int) -> str:
        if status == 429:
            return ERR_REFUSED
        if status == 408 or status == 504:
            return ERR_TIMEOUT
        return ERR_CLIENT if 400 <= status < 500 else ERR_SERVER

    async def close(self) -> None:
        await self._http.aclose()


def make_client(
    target: str,
    sampling: Sampling,
    clock: Callable[[], float],
    api_key: str | None = None,
    timeout_s: float = 600.0,
) -> Client:
    """`http://` or `https://` targets speak OpenAI HTTP; `HOST:PORT` speaks loramux gRPC."""
    if target.startswith(("http://", "https://")):
        return OpenAIClient(target, sampling, clock, api_key, timeout_s)
    return GrpcClient(target, sampling, clock, api_key, timeout_s)


class RunClock:
    """Seconds since the run's start; `restart()` when a run (or a sweep's point) begins."""

    def __init__(self) -> None:
        self._start = time.monotonic()

    def restart(self) -> None:
        self._start = time.monotonic()

    @property
    def start_s(self) -> float:
        """The run's start as a `time.monotonic()` value."""
        return self._start

    def __call__(self) -> float:
        return time.monotonic() - self._start
