"""End to end over a real grpc.aio server on 127.0.0.1 (port 0) and a tiny random Llama engine.

The server runs on its own event loop in a background thread; the tests use plain sync stubs.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from loramux.v1 import inference_pb2 as pb
from loramux.v1 import inference_pb2_grpc as pb_grpc
from server import cli
from server.auth import AuthConfig
from server.config import EngineConfig
from server.engine.engine import Engine
from server.grpc_server import GrpcServer, serve_grpc
from server.model.loader import load_model

MAX_MODEL_LEN = 512


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model_dir(make_tiny_model) -> Path:
    """A 2-layer random Llama with the real SmolLM2 tokenizer (see tests/conftest.py)."""
    return make_tiny_model()


def _engine(model_dir: Path, config: EngineConfig) -> Engine:
    loaded = load_model(str(model_dir), torch.device("cpu"), torch.float32, config.max_model_len)
    return Engine(loaded, config)


class ServerThread:
    """A GrpcServer on its own event loop in a daemon thread; `options` go to `serve_grpc`. Without
    an `auth`, the adapter RPCs are enabled (a server started with --enable-admin)."""

    def __init__(self, engine: Engine, **options: Any) -> None:
        options.setdefault("auth", AuthConfig(enable_admin=True))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-grpc", daemon=True)
        self.thread.start()
        self.server: GrpcServer = self._call(serve_grpc(engine, "127.0.0.1", 0, **options))
        self.target = f"127.0.0.1:{self.server.port}"

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=30)

    def close(self) -> None:
        self._call(self.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


class OpenAIServers:
    """gRPC (adapter RPCs enabled) and an OpenAI shim over it, on one event loop in a thread."""

    def __init__(self, engine: Engine) -> None:
        from server.http.app import create_app
        from server.http.server import HttpServer

        self.grpc = ServerThread(engine)
        self.http = HttpServer(create_app(self.grpc.target), "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.grpc._call(self.http.start())}"

    def close(self) -> None:
        self.grpc._call(self.http.stop())
        self.grpc.close()


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Iterator[Engine]:
    config = EngineConfig(max_running=4, max_queue=8, max_model_len=MAX_MODEL_LEN, max_batched_tokens=64)
    engine = _engine(tiny_model_dir, config)
    engine.start()
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def server(engine: Engine) -> Iterator[ServerThread]:
    running = ServerThread(engine)
    yield running
    running.close()


@pytest.fixture()
def channel(server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as channel:
        yield channel


@pytest.fixture()
def stub(channel: grpc.Channel) -> pb_grpc.InferenceStub:
    return pb_grpc.InferenceStub(channel)


def _greedy(**fields: Any) -> pb.GenerateRequest:
    fields.setdefault("prompt", "The capital of France is")
    fields.setdefault("max_tokens", 12)
    fields.setdefault("temperature", 0.0)
    fields.setdefault("ignore_eos", True)
    return pb.GenerateRequest(**fields)


def _wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def _idle(engine: Engine) -> bool:
    stats = engine.stats()
    return stats.num_running == 0 and stats.num_waiting == 0 and stats.kv_slots_used == 0


def _slow_down(engine: Engine, monkeypatch: pytest.MonkeyPatch, seconds_per_output: float = 0.01) -> None:
    """Make every output take a while, so "long" requests cannot finish before a test acts."""
    real_submit = engine.submit

    def slow_submit(request: Any, sink: Callable[[Any], None], **options: Any) -> Any:
        def slow_sink(output: Any) -> None:
            time.sleep(seconds_per_output)
            sink(output)

        return real_submit(request, slow_sink, **options)

    monkeypatch.setattr(engine, "submit", slow_submit)


# -- generation ----------------------------------------------------------------------------


def test_unary_generate_returns_the_whole_completion(stub: pb_grpc.InferenceStub) -> None:
    response = stub.Generate(_greedy(request_id="unary-1"), timeout=30)
    assert response.request_id == "unary-1"
    assert response.completion_tokens == 12 == len(response.token_ids)
    assert response.finish_reason == pb.FINISH_REASON_LENGTH
    assert response.prompt_tokens > 0
    assert response.text
    assert response.adapter == ""


def test_stream_chunks_concatenate_to_the_unary_answer(stub: pb_grpc.InferenceStub) -> None:
    unary = stub.Generate(_greedy(), timeout=30)
    chunks = list(stub.GenerateStream(_greedy(request_id="stream-1"), timeout=30))
    assert len(chunks) > 1
    assert all(chunk.request_id == "stream-1" for chunk in chunks)
    assert [chunk.finished for chunk in chunks] == [False] * (len(chunks) - 1) + [True]
    assert "".join(chunk.text for chunk in chunks) == unary.text
    assert [t for chunk in chunks for t in chunk.token_ids] == list(unary.token_ids)
    assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert chunks[-1].completion_tokens == unary.completion_tokens
    assert [chunk.completion_tokens for chunk in chunks] == sorted(
        chunk.completion_tokens for chunk in chunks
    )


def test_server_generates_a_request_id_when_none_is_given(stub: pb_grpc.InferenceStub) -> None:
    first = stub.Generate(_greedy(max_tokens=1), timeout=30)
    second = stub.Generate(_greedy(max_tokens=1), timeout=30)
    assert len(first.request_id) == 32 and first.request_id != second.request_id


def test_max_tokens_defaults_to_64(stub: pb_grpc.InferenceStub) -> None:
    request = pb.GenerateRequest(prompt="Once upon a time", temperature=0.0, ignore_eos=True)
    response = stub.Generate(request, timeout=60)
    assert response.completion_tokens == 64
    assert response.finish_reason == pb.FINISH_REASON_LENGTH


def test_token_ids_input_is_used_as_is(stub: pb_grpc.InferenceStub) -> None:
    response = stub.Generate(_greedy(prompt=None, token_ids=[5, 17, 300, 9], max_tokens=3), timeout=30)
    assert response.prompt_tokens == 4
    assert response.completion_tokens == 3


def test_chat_messages_get_the_chat_template(stub: pb_grpc.InferenceStub, engine: Engine) -> None:
    messages = [pb.ChatMessage(role="user", content="Hello there")]
    response = stub.Generate(_greedy(prompt=None, messages=messages, max_tokens=2), timeout=30)
    expected = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello there"}], add_generation_prompt=True, tokenize=True
    )["input_ids"]
    assert response.prompt_tokens == len(expected)


@pytest.fixture()
def aborted(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The request ids the service aborts (the engine still aborts them for real); slows outputs."""
    _slow_down(engine, monkeypatch)
    calls: list[str] = []
    real_abort = engine.abort

    def spy_abort(handle: Any) -> None:
        calls.append(handle.request.request_id)
        real_abort(handle)

    monkeypatch.setattr(engine, "abort", spy_abort)
    return calls


def test_cancelling_a_stream_frees_the_engine_slot(
    stub: pb_grpc.InferenceStub, engine: Engine, aborted: list[str]
) -> None:
    request = _greedy(request_id="to-cancel", prompt="Tell me a long story", max_tokens=MAX_MODEL_LEN - 32)
    call = stub.GenerateStream(request, timeout=60)
    received = [next(call), next(call)]
    assert not received[-1].finished
    assert engine.stats().num_running == 1
    call.cancel()
    assert _wait_until(lambda: _idle(engine), timeout=10), f"engine still busy: {engine.stats()}"
    assert aborted == ["to-cancel"]
    # The engine keeps serving.
    assert stub.Generate(_greedy(max_tokens=2), timeout=30).completion_tokens == 2


def test_deadline_exceeded_aborts_the_request(
    stub: pb_grpc.InferenceStub, engine: Engine, aborted: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _slow_down(engine, monkeypatch)  # the request must outlive its 1 s deadline on any machine
    request = _greedy(request_id="too-slow", prompt="Count to a thousand", max_tokens=MAX_MODEL_LEN - 32)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(request, timeout=1.0)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert _wait_until(lambda: _idle(engine), timeout=10), f"engine still busy: {engine.stats()}"
    assert aborted == ["too-slow"]


def test_a_running_request_id_cannot_be_reused(
    stub: pb_grpc.InferenceStub, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    _slow_down(engine, monkeypatch)
    call = stub.GenerateStream(_greedy(request_id="dup", max_tokens=MAX_MODEL_LEN - 32), timeout=60)
    next(call)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(_greedy(request_id="dup"), timeout=30)
    call.cancel()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "dup" in caught.value.details() and "still running" in caught.value.details()
    assert _wait_until(lambda: _idle(engine))


# -- validation ----------------------------------------------------------------------------

INVALID = [
    (dict(prompt=""), "prompt is empty"),
    (dict(prompt=None), "no input"),
    (dict(token_ids=[1, 2]), "exactly one of prompt, token_ids or messages"),
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=1e9), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(max_tokens=0), "max_tokens must be >= 1"),
    (dict(max_tokens=MAX_MODEL_LEN), f"exceeds the model's context length max_model_len={MAX_MODEL_LEN}"),
    (dict(prompt=None, token_ids=[1, 10**9]), "token_ids[1] = 1000000000 is outside the vocabulary"),
    (dict(stop_token_ids=[10**9]), "stop token id"),
    (dict(seed=2**63), "seed"),
    (dict(prompt=None, messages=[pb.ChatMessage(role="wizard", content="hi")]), "messages[0].role"),
    (dict(prompt="x" * (32 * MAX_MODEL_LEN + 1)), "characters, more than the limit"),
    (dict(request_id="r" * 300), "request_id"),
    (dict(adapter="a", adapters=[pb.WeightedAdapter(name="b", weight=1.0)]), "not both"),
    (dict(adapters=[pb.WeightedAdapter(name="b", weight=-1.0)]), "weight"),
]


@pytest.mark.parametrize(("fields", "message"), INVALID, ids=[m for _, m in INVALID])
def test_invalid_requests_get_invalid_argument(
    stub: pb_grpc.InferenceStub, fields: dict[str, Any], message: str
) -> None:
    for rpc in (stub.Generate, lambda request, timeout: list(stub.GenerateStream(request, timeout=timeout))):
        with pytest.raises(grpc.RpcError) as caught:
            rpc(_greedy(**fields), timeout=30)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
        assert message in caught.value.details()


def test_too_long_names_the_numbers(stub: pb_grpc.InferenceStub) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(_greedy(prompt=None, token_ids=[7] * 100, max_tokens=MAX_MODEL_LEN - 50), timeout=30)
    assert f"prompt (100 tokens) + max_tokens ({MAX_MODEL_LEN - 50}) = {MAX_MODEL_LEN + 50}" in (
        caught.value.details()
    )


def test_unknown_adapter_is_not_found(stub: pb_grpc.InferenceStub) -> None:
    for fields in (dict(adapter="my-lora"), dict(adapters=[pb.WeightedAdapter(name="my-lora", weight=1.0)])):
        with pytest.raises(grpc.RpcError) as caught:
            stub.Generate(_greedy(**fields), timeout=30)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert "adapter 'my-lora' is not loaded" in caught.value.details()


def test_a_name_no_adapter_can_have_is_not_found_with_the_naming_rule(stub: pb_grpc.InferenceStub) -> None:
    for fields in (
        dict(adapter="../etc/passwd"),
        dict(adapters=[pb.WeightedAdapter(name="a/b", weight=1.0)]),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            stub.Generate(_greedy(**fields), timeout=30)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert "is not a valid adapter name: use 1-128 letters" in caught.value.details()


def test_auto_adapter_and_route_need_a_router(stub: pb_grpc.InferenceStub) -> None:
    """This module's server has no router (and its engine no adapters, as `--max-slots 0`)."""
    for call in (
        lambda: stub.Generate(_greedy(adapter="auto"), timeout=30),
        lambda: stub.Route(pb.RouteRequest(prompt="hi"), timeout=30),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "needs the router" in caught.value.details() and "--max-slots 0" in caught.value.details()


def test_adapter_rpcs_without_adapters_are_failed_precondition(stub: pb_grpc.InferenceStub) -> None:
    """This module's engine is built without an AdapterManager, as `--max-slots 0` does."""
    calls = [
        lambda: stub.LoadAdapter(pb.LoadAdapterRequest(name="a", path="a"), timeout=30),
        lambda: stub.UnloadAdapter(pb.UnloadAdapterRequest(name="a"), timeout=30),
        lambda: stub.ListAdapters(pb.ListAdaptersRequest(), timeout=30),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "--max-slots 0" in caught.value.details()


def test_unexpected_errors_are_internal_without_details(
    stub: pb_grpc.InferenceStub, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_submit(request: Any, sink: Any, **options: Any) -> None:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(engine, "submit", broken_submit)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(_greedy(), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in caught.value.details()
    assert "see the server log" in caught.value.details()


# -- engine state: overload and unavailability ---------------------------------------------


def test_full_queue_is_resource_exhausted(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = EngineConfig(max_running=1, max_queue=1, max_model_len=MAX_MODEL_LEN, max_batched_tokens=64)
    engine = _engine(tiny_model_dir, config)
    _slow_down(engine, monkeypatch)
    engine.start()
    running = ServerThread(engine)
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.InferenceStub(channel)
            long = _greedy(max_tokens=MAX_MODEL_LEN - 32)
            first = stub.GenerateStream(long, timeout=60)
            next(first)  # running in the only slot
            second = stub.GenerateStream(long, timeout=60)  # waits in the only queue place
            assert _wait_until(lambda: engine.stats().num_waiting == 1), engine.stats()
            with pytest.raises(grpc.RpcError) as caught:
                stub.Generate(_greedy(), timeout=30)
            first.cancel()
            second.cancel()
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue is full" in caught.value.details()
        # gRPC's retry hint: RESOURCE_EXHAUSTED from loramux always means "retry later"
        assert ("grpc-retry-pushback-ms", "1000") in caught.value.trailing_metadata()
    finally:
        running.close()
        engine.shutdown()


def test_stopped_engine_is_unavailable_and_not_serving(tiny_model_dir: Path) -> None:
    engine = _engine(
        tiny_model_dir, EngineConfig(max_running=1, max_queue=1, max_model_len=64, max_batched_tokens=8)
    )
    running = ServerThread(engine)  # the engine is never started
    try:
        with grpc.insecure_channel(running.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            status = health.Check(health_pb2.HealthCheckRequest(service="loramux.v1.Inference"), timeout=10)
            assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as caught:
                pb_grpc.InferenceStub(channel).Generate(_greedy(max_tokens=2), timeout=30)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        running.close()


# -- health, reflection, info --------------------------------------------------------------


def test_health_is_serving(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "loramux.v1.Inference"):
        response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_services(channel: grpc.Channel) -> None:
    database = ProtoReflectionDescriptorDatabase(channel)
    services = set(database.get_services())
    assert {
        "loramux.v1.Inference",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= services
    described = database.FindFileContainingSymbol("loramux.v1.Inference")
    assert described.package == "loramux.v1"


def test_get_info_describes_the_engine(stub: pb_grpc.InferenceStub, engine: Engine) -> None:
    info = stub.GetInfo(pb.GetInfoRequest(), timeout=10)
    assert info.model_name == engine.info.model_name
    assert info.max_model_len == MAX_MODEL_LEN
    assert info.max_prompt_tokens == MAX_MODEL_LEN - 1
    assert info.max_running == 4 and info.max_queue == 8
    assert info.vocab_size == engine.info.vocab_size == len(engine.tokenizer)
    assert info.device == "cpu" and info.dtype == "float32"
    assert info.kernels_backend == engine.info.kernels_backend
    assert info.default_max_tokens == 64
    assert info.max_prompt_chars == 32 * MAX_MODEL_LEN


def test_port_in_use_is_a_clear_error(server: ServerThread, engine: Engine) -> None:
    async def second_server() -> None:
        await serve_grpc(engine, "127.0.0.1", server.server.port)

    with pytest.raises(OSError, match="could not listen on 127.0.0.1"):
        asyncio.run(second_server())


# -- CLI -----------------------------------------------------------------------------------


def test_cli_generate_prints_only_the_text(
    server: ServerThread, stub: pb_grpc.InferenceStub, capsys: pytest.CaptureFixture[str]
) -> None:
    expected = stub.Generate(
        pb.GenerateRequest(
            messages=[pb.ChatMessage(role="user", content="Hi!")], temperature=0.0, max_tokens=10
        ),
        timeout=30,
    )
    assert cli.main(["generate", "--target", server.target, "--prompt", "Hi!", "--max-tokens", "10"]) == 0
    captured = capsys.readouterr()
    assert captured.out == expected.text + "\n"
    assert captured.err == ""


def test_cli_generate_raw_sends_plain_text(
    server: ServerThread, stub: pb_grpc.InferenceStub, capsys: pytest.CaptureFixture[str]
) -> None:
    expected = stub.Generate(pb.GenerateRequest(prompt="Hi!", temperature=0.0, max_tokens=6), timeout=30)
    argv = ["generate", "--target", server.target, "--prompt", "Hi!", "--max-tokens", "6", "--raw"]
    assert cli.main(argv) == 0
    assert capsys.readouterr().out == expected.text + "\n"


def test_cli_generate_reports_errors_on_stderr(
    server: ServerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["generate", "--target", server.target, "--prompt", "Hi", "--adapter", "missing"]
    assert cli.main(argv) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: NOT_FOUND: adapter 'missing' is not loaded")


def test_cli_info_prints_json(server: ServerThread, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["info", "--target", server.target]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["max_model_len"] == MAX_MODEL_LEN
    assert info["device"] == "cpu"


def test_cli_serve_runs_until_sigterm(tiny_model_dir: Path) -> None:
    argv = [
        sys.executable,
        "-m",
        "server.cli",
        "serve",
        "--model",
        str(tiny_model_dir),
        "--grpc-port",
        "0",
        "--no-router",
    ]
    argv += ["--max-model-len", "128", "--max-running", "2", "--max-batched-tokens", "16"]
    process = subprocess.Popen(
        argv, stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    try:
        assert process.stderr is not None
        log: list[str] = []
        for line in process.stderr:  # the log line names the bound port
            log.append(line)
            found = re.search(r"loramux serving \S+ on (127\.0\.0\.1:\d+)", line)
            if found:
                break
        else:
            pytest.fail("serve exited without serving:\n" + "".join(log))
        target = found.group(1)
        with grpc.insecure_channel(target) as channel:
            response = pb_grpc.InferenceStub(channel).Generate(_greedy(max_tokens=3), timeout=30)
        assert response.completion_tokens == 3
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()


def test_cli_serve_reports_a_missing_model(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert cli.main(["serve", "--model", str(tmp_path / "nope"), "--grpc-port", "0"]) == 1
    assert "error:" in capsys.readouterr().err
