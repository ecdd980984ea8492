"""Staying up under pressure, over HTTP and gRPC: overload, disconnect, request timeout, drain, engine failure.

Servers run in-process on a thread's event loop (see tests/test_auth.py), except the SIGTERM drain,
which runs `loramux serve` as a subprocess and signals it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx2 as httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loramux.v1 import inference_pb2_grpc as pb_grpc
from server.auth import AuthConfig
from server.config import EngineConfig
from server.engine.engine import Engine
from tests.conftest import start_engine
from tests.test_auth import KeyedServers
from tests.test_grpc_service import _engine, _greedy, _idle, _slow_down, _wait_until

LONG = 100  # tokens: with _slow_down, a request that runs for a second or more
CONFIG = EngineConfig(max_running=1, max_queue=1, max_model_len=128, max_batched_tokens=16)


@pytest.fixture(scope="module")
def model_dir(make_tiny_model: Any) -> Path:
    return make_tiny_model()


@pytest.fixture()
def engine(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Engine]:
    engine_ = start_engine(model_dir, CONFIG)
    _slow_down(engine_, monkeypatch)
    yield engine_
    engine_.shutdown()


def _servers(engine: Engine, **grpc_options: Any) -> KeyedServers:
    return KeyedServers(engine, AuthConfig(), **grpc_options)


def _completion(url: str, model: str, max_tokens: int = 2, **extra: Any) -> httpx.Response:
    body = {"model": model, "prompt": "hi", "max_tokens": max_tokens, "ignore_eos": True, **extra}
    return httpx.post(url + "/v1/completions", json=body, timeout=60)


def _health(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        request = health_pb2.HealthCheckRequest(service="loramux.v1.Inference")
        return health_pb2_grpc.HealthStub(channel).Check(request, timeout=10).status  # type: ignore[no-any-return]


def test_full_queue_answers_429_at_once(engine: Engine) -> None:
    servers = _servers(engine)
    try:
        with grpc.insecure_channel(servers.target) as channel:
            stub = pb_grpc.InferenceStub(channel)
            first = stub.GenerateStream(_greedy(max_tokens=LONG), timeout=60)
            next(first)  # in the only slot
            second = stub.GenerateStream(_greedy(max_tokens=LONG), timeout=60)  # in the only queue place
            assert _wait_until(lambda: engine.stats().num_waiting == 1), engine.stats()
            started = time.monotonic()
            answer = _completion(servers.url, engine.info.model_name)
            assert time.monotonic() - started < 5
            first.cancel()
            second.cancel()
        assert answer.status_code == 429, answer.text
        assert answer.json()["error"]["type"] == "rate_limit_error"
        assert answer.headers["retry-after"] == "1"  # OpenAI clients retry a 429 by themselves
        assert _wait_until(lambda: _idle(engine))
    finally:
        servers.close()


def test_http_disconnect_mid_stream_frees_the_engine(engine: Engine) -> None:
    servers = _servers(engine)
    try:
        body = {
            "model": engine.info.model_name,
            "prompt": "hi",
            "max_tokens": LONG,
            "ignore_eos": True,
            "stream": True,
        }
        with httpx.stream("POST", servers.url + "/v1/completions", json=body, timeout=60) as response:
            assert response.status_code == 200
            next(response.iter_lines())  # the first event arrived: the request is running
            assert engine.stats().num_running == 1
        assert _wait_until(lambda: _idle(engine)), engine.stats()
    finally:
        servers.close()


def test_http_disconnect_of_a_non_streamed_request_frees_the_engine(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    _slow_down(engine, monkeypatch, 0.1)  # on top of the fixture's: LONG tokens now take ~11 s
    servers = _servers(engine)
    try:
        body = {"model": engine.info.model_name, "prompt": "hi", "max_tokens": LONG, "ignore_eos": True}
        with pytest.raises(httpx.TimeoutException):  # the client gives up and closes the connection
            httpx.post(servers.url + "/v1/completions", json=body, timeout=0.5)
        # aborted well before it could have finished on its own (3 s was once too short in the full suite)
        assert _wait_until(lambda: _idle(engine), timeout=5), engine.stats()
    finally:
        servers.close()


def test_request_timeout_aborts_with_504(engine: Engine) -> None:
    servers = _servers(engine, request_timeout_s=0.3)
    try:
        with grpc.insecure_channel(servers.target) as channel, pytest.raises(grpc.RpcError) as caught:
            pb_grpc.InferenceStub(channel).Generate(_greedy(max_tokens=LONG), timeout=60)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "--request-timeout" in caught.value.details()
        answer = _completion(servers.url, engine.info.model_name, max_tokens=LONG)
        assert answer.status_code == 504, answer.text
        assert _wait_until(lambda: _idle(engine)), engine.stats()
        assert (
            _completion(servers.url, engine.info.model_name).status_code == 200
        )  # short requests still pass
    finally:
        servers.close()


def test_drain_lets_running_requests_finish_and_refuses_new_ones(engine: Engine) -> None:
    servers = _servers(engine)
    try:
        with grpc.insecure_channel(servers.target) as channel:
            stub = pb_grpc.InferenceStub(channel)
            stream = stub.GenerateStream(_greedy(max_tokens=LONG), timeout=60)
            next(stream)
            drained: list[bool] = []
            drainer = threading.Thread(
                target=lambda: drained.append(servers.call(servers.grpc.drain(30), 60))
            )
            drainer.start()
            assert _wait_until(lambda: _health(servers.target) == health_pb2.HealthCheckResponse.NOT_SERVING)
            with pytest.raises(grpc.RpcError) as caught:
                stub.Generate(_greedy(max_tokens=2), timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "draining" in caught.value.details()
            assert _completion(servers.url, engine.info.model_name).status_code == 503
            chunks = list(stream)  # the running request completes normally
            assert chunks[-1].finished and chunks[-1].completion_tokens == LONG
            drainer.join(timeout=30)
        assert drained == [True]
    finally:
        servers.close()


def test_drain_timeout_aborts_what_is_left(engine: Engine) -> None:
    servers = _servers(engine)
    try:
        with grpc.insecure_channel(servers.target) as channel:
            stream = pb_grpc.InferenceStub(channel).GenerateStream(_greedy(max_tokens=LONG), timeout=60)
            next(stream)
            assert servers.call(servers.grpc.drain(0.2)) is False  # still running
            servers.call(servers.grpc.stop(0))  # what `loramux serve` does next
            with pytest.raises(grpc.RpcError):
                list(stream)
        assert _wait_until(lambda: _idle(engine)), engine.stats()
    finally:
        servers.close()


def test_dead_engine_is_503_and_unhealthy_over_http(model_dir: Path) -> None:
    engine = _engine(model_dir, CONFIG)  # never started: as if its thread had died
    servers = _servers(engine)
    try:
        assert httpx.get(servers.url + "/health", timeout=10).status_code == 503
        answer = _completion(servers.url, engine.info.model_name)
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["type"] == "service_unavailable_error"
    finally:
        servers.close()


class _Crash(BaseException):
    """Not an Exception: escapes the engine's per-step handler and kills its thread."""


def test_engine_thread_dying_fails_a_running_request(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    servers = _servers(engine)
    try:
        with grpc.insecure_channel(servers.target) as channel:
            stream = pb_grpc.InferenceStub(channel).GenerateStream(_greedy(max_tokens=LONG), timeout=60)
            next(stream)

            def crash() -> None:
                raise _Crash("simulated engine crash")

            monkeypatch.setattr(engine, "step", crash)  # the engine thread dies under the request
            with pytest.raises(grpc.RpcError) as caught:
                list(stream)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert _wait_until(lambda: _health(servers.target) == health_pb2.HealthCheckResponse.NOT_SERVING)
        assert httpx.get(servers.url + "/health", timeout=10).status_code == 503
    finally:
        servers.close()


def _serve(model_dir: Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    """`loramux serve` in a subprocess (API key from the env) and its gRPC target."""
    argv = [sys.executable, "-m", "server.cli", "serve", "--model", str(model_dir), "--grpc-port", "0"]
    argv += ["--http-port", "0", "--max-model-len", "512", "--max-running", "2", "--max-batched-tokens", "64"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LORAMUX_API_KEY": "k"}
    process = subprocess.Popen([*argv, *extra], stderr=subprocess.PIPE, text=True, env=env)
    assert process.stderr is not None
    log: list[str] = []
    for line in process.stderr:
        log.append(line)
        found = re.search(r"loramux serving \S+ on (127\.0\.0\.1:\d+)", line)
        if found:
            return process, found.group(1)
    process.wait()
    pytest.fail("serve exited without serving:\n" + "".join(log))


KEY = [("authorization", "Bearer k")]


def test_sigterm_drains_then_exits_0(model_dir: Path) -> None:
    process, target = _serve(model_dir, "--drain-timeout", "60")
    try:
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.InferenceStub(channel)
            stream = stub.GenerateStream(_greedy(max_tokens=480), timeout=120, metadata=KEY)
            next(stream)
            process.send_signal(signal.SIGTERM)
            time.sleep(0.1)
            with pytest.raises(grpc.RpcError) as caught:  # a new request during the drain
                stub.Generate(_greedy(max_tokens=2), timeout=10, metadata=KEY)
            chunks = list(stream)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
        assert "draining" in caught.value.details()
        assert chunks[-1].finished and chunks[-1].completion_tokens == 480
        assert process.wait(timeout=60) == 0
        assert process.stderr is not None and "draining" in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()


def test_a_second_sigterm_cuts_the_drain_short(model_dir: Path) -> None:
    process, target = _serve(model_dir, "--drain-timeout", "600")
    try:
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.InferenceStub(channel)
            stream = stub.GenerateStream(_greedy(max_tokens=480), timeout=120, metadata=KEY)
            next(stream)
            process.send_signal(signal.SIGTERM)
            time.sleep(0.1)
            process.send_signal(signal.SIGTERM)
            with pytest.raises(grpc.RpcError):
                list(stream)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()


def test_serve_with_fused_kernels_that_cannot_build_exits_with_the_reason(
    model_dir: Path, tmp_path: Path
) -> None:
    """`--model-kernels fused` where the kernels cannot be built: a clear error and exit 1, no traceback
    (`auto` would fall back to torch ops with a warning instead)."""
    argv = [sys.executable, "-m", "server.cli", "serve", "--model", str(model_dir), "--grpc-port", "0"]
    argv += ["--http-port", "0", "--model-kernels", "fused"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LORAMUX_CACHE": str(tmp_path), "CXX": "/bin/false"}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 1
    assert "error: compiling model_ops.cpp failed" in done.stderr
    assert "Traceback" not in done.stderr
