"""Hardening of the transport (issue 9): bad input gets its clear error at once, and other clients,
/health and gRPC health keep answering meanwhile.

Each break found by the attack probe is a regression test against a live gRPC server and HTTP
shim on 127.0.0.1 (one event loop in a thread, as `loramux serve` runs them), with the HTTP
limits shortened so that every test stays within a few seconds: lone surrogates, oversized
bodies and names, half-sent requests, a flood of one log line, and the schema's promises
(`/health`'s body, 405's Allow).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import grpc.aio
import httpx2 as httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from adapters_store import AdapterTooLarge
from loramux.v1 import inference_pb2 as pb
from loramux.v1 import inference_pb2_grpc as pb_grpc
from server import cli
from server.config import EngineConfig, HttpLimits
from server.engine.engine import Engine
from server.engine.request import EngineOverloaded, InvalidRequest
from server.grpc_errors import MAX_STATUS_MESSAGE_BYTES, status_for
from server.grpc_server import MAX_RECEIVE_BYTES, GrpcServer, serve_grpc
from server.http.app import create_app
from server.http.connections import RESERVED_FDS, connection_cap, open_file_limit, raise_open_file_limit
from server.http.errors import from_rpc_error
from server.http.server import HttpServer
from server.log_limits import BURST, RepeatFilter, install
from server.serve_commands import configure_logging
from tests.conftest import start_engine

LIMITS = HttpLimits(max_body_mb=1.0, header_timeout_s=1.0, body_timeout_s=1.0, max_connections=50)
HALF_SENT = 250  # connections, five times the cap
SHORT = 1200  # bytes: an error message that quotes a bounded prefix, not the whole input
LONG_NAME = "x" * 10_000


class Servers:
    """gRPC + an HTTP shim under LIMITS (admin routes on), on one event loop in a thread."""

    def __init__(self, engine: Engine) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-hardening", daemon=True)
        self.thread.start()
        self.grpc: GrpcServer = self.call(serve_grpc(engine, "127.0.0.1", 0))
        self.target = f"127.0.0.1:{self.grpc.port}"
        self.http = self.shim(LIMITS)
        self.port = self.http.port
        self.url = f"http://127.0.0.1:{self.port}"

    def shim(self, limits: HttpLimits) -> HttpServer:
        http = HttpServer(create_app(self.target, enable_admin=True, limits=limits), "127.0.0.1", 0, limits)
        self.call(http.start())
        return http

    def call(self, coroutine: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=timeout)

    def close(self) -> None:
        self.call(self.http.stop())
        self.call(self.grpc.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture(scope="module")
def engine(make_tiny_model: Any) -> Iterator[Engine]:
    config = EngineConfig(max_running=2, max_queue=8, max_model_len=128, max_batched_tokens=32)
    engine_ = start_engine(make_tiny_model(), config)
    yield engine_
    engine_.shutdown()


@pytest.fixture(scope="module")
def servers(engine: Engine) -> Iterator[Servers]:
    running = Servers(engine)
    yield running
    running.close()


def _post(url: str, body: Any, timeout: float = 10) -> httpx.Response:
    """POST `body` as JSON; json.dumps escapes a lone surrogate as "\\ud800", as a client would."""
    content = json.dumps(body).encode("ascii")
    return httpx.post(url, content=content, headers={"content-type": "application/json"}, timeout=timeout)


def _error(response: httpx.Response) -> dict[str, Any]:
    assert response.headers["content-type"].startswith("application/json"), response.text[:300]
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    return error  # type: ignore[no-any-return]


def _still_serving(servers: Servers) -> None:
    """/health, gRPC health and a gRPC generation all answer."""
    assert httpx.get(servers.url + "/health", timeout=5).json() == {"status": "ok"}
    with grpc.insecure_channel(servers.target) as channel:
        request = health_pb2.HealthCheckRequest(service="loramux.v1.Inference")
        status = health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        answer = pb_grpc.InferenceStub(channel).Generate(
            pb.GenerateRequest(prompt="hi", max_tokens=2, ignore_eos=True), timeout=30
        )
        assert answer.completion_tokens == 2


# -- 6. lone surrogates --------------------------------------------------------------------

LONE = "\ud800"


def _surrogate_cases(model: str) -> list[tuple[str, dict[str, Any], str]]:
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    completion = {"model": model, "prompt": "hi", "max_tokens": 1}
    return [
        ("/v1/completions", {**completion, "prompt": "a" + LONE}, "prompt"),
        ("/v1/completions", {**completion, "prompt": ["ok", LONE]}, "prompt.1"),
        ("/v1/completions", {**completion, "stop": LONE}, "stop"),
        ("/v1/completions", {**completion, "stop": ["ok", LONE]}, "stop.1"),
        ("/v1/completions", {**completion, "model": LONE}, "model"),
        ("/v1/completions", {**completion, "user": LONE}, "user"),
        (
            "/v1/chat/completions",
            {**chat, "messages": [{"role": "user", "content": LONE}]},
            "messages.0.content",
        ),
        (
            "/v1/chat/completions",
            {**chat, "messages": [{"role": "user", "content": [{"type": "text", "text": LONE}]}]},
            "messages.0.content.0.text",
        ),
        ("/v1/chat/completions", {**chat, "messages": [{"role": LONE, "content": "hi"}]}, "messages.0.role"),
        ("/v1/chat/completions", {**chat, "model": LONE}, "model"),
        ("/v1/load_lora_adapter", {"lora_name": LONE, "lora_path": "a"}, "lora_name"),
        ("/v1/load_lora_adapter", {"lora_name": "a", "lora_path": LONE}, "lora_path"),
        ("/v1/unload_lora_adapter", {"lora_name": LONE}, "lora_name"),
    ]


def test_lone_surrogates_are_400_naming_the_field(servers: Servers, engine: Engine) -> None:
    for path, body, param in _surrogate_cases(engine.info.model_name):
        answer = _post(servers.url + path, body)
        assert answer.status_code == 400, (path, param, answer.text[:300])
        error = _error(answer)
        assert error["param"] == param, (path, error)
        if param != "messages.0.role":  # a role is one of four words; the rest say what is wrong
            assert "surrogate" in error["message"], error
    answer = httpx.get(servers.url + "/v1/models/%ED%A0%80", timeout=10)  # \ud800 in UTF-8, in the path
    assert answer.status_code == 404 and _error(answer)["param"] == "model"
    _still_serving(servers)


def test_a_prompt_of_no_tokens_is_400_and_its_neighbours_are_served(servers: Servers, engine: Engine) -> None:
    """Found by `loramux bench attack`: "\x04" tokenizes to nothing; such a sequence reached the
    engine, decoded from an empty output and failed the whole step (500 for every neighbour)."""
    model = engine.info.model_name
    assert engine.tokenizer.encode("\x04") == []
    answer = _post(
        servers.url + "/v1/completions", {"model": model, "prompt": ["hi", "\x04"], "max_tokens": 2}
    )
    assert answer.status_code == 400 and "no tokens" in _error(answer)["message"]
    with ThreadPoolExecutor(4) as pool:
        bodies = [
            {"model": model, "prompt": prompt, "max_tokens": 2} for prompt in ("hi", "\x04", "yo", "\x16")
        ]
        answers = list(pool.map(lambda body: _post(servers.url + "/v1/completions", body), bodies))
    assert [a.status_code for a in answers] == [200, 400, 200, 400]
    _still_serving(servers)


# -- 7. too large: 400/413 with short messages, never 429 ------------------------------------


def test_a_body_over_the_limit_is_413_before_it_is_read(servers: Servers, engine: Engine) -> None:
    big = b'{"model": "m", "prompt": "' + b"a" * (2 * 2**20) + b'"}'
    started = time.monotonic()
    answer = httpx.post(
        servers.url + "/v1/completions", content=big, headers={"content-type": "application/json"}, timeout=10
    )
    assert answer.status_code == 413 and "--http-max-body-mb" in _error(answer)["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams in
        yield b'{"model": "m", "prompt": "'
        for _ in range(40):
            yield b"a" * 65536
        yield b'"}'

    answer = httpx.post(servers.url + "/v1/completions", content=chunks(), timeout=10)
    assert answer.status_code == 413, answer.text[:300]
    assert len(_error(answer)["message"]) < SHORT
    assert time.monotonic() - started < 5
    assert HttpLimits().max_body_mb == 4.0  # the documented default
    _still_serving(servers)


def test_a_long_prompt_under_the_body_limit_is_400_not_429(servers: Servers, engine: Engine) -> None:
    body = {"model": engine.info.model_name, "prompt": "a" * 500_000, "max_tokens": 1}
    answer = _post(servers.url + "/v1/completions", body)
    assert answer.status_code == 400 and len(_error(answer)["message"]) < SHORT


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_prompt_over_the_context_length_is_openais_context_length_exceeded(
    servers: Servers, engine: Engine, path: str, stream: bool
) -> None:
    """400 with OpenAI's code and the field that holds the prompt, as its clients expect (streamed
    too: refused before the stream starts)."""
    words = " ".join(["word"] * 200)  # past max_model_len=128 tokens, far under every size limit
    prompt = (
        {"prompt": words} if path == "/v1/completions" else {"messages": [{"role": "user", "content": words}]}
    )
    body = {"model": engine.info.model_name, "max_tokens": 4, "stream": stream, **prompt}
    answer = _post(servers.url + path, body)
    assert answer.status_code == 400, answer.text[:300]
    error = _error(answer)
    assert error["code"] == "context_length_exceeded" and "max_model_len=128" in error["message"]
    assert error["param"] == ("prompt" if path == "/v1/completions" else "messages")
    _still_serving(servers)


def test_a_message_over_grpcs_limit_is_413_over_http(servers: Servers, engine: Engine) -> None:
    roomy = servers.shim(HttpLimits(max_body_mb=16))  # lets a body reach gRPC's 4 MiB limit
    try:
        body = {"model": engine.info.model_name, "prompt": "a" * (MAX_RECEIVE_BYTES + 1000), "max_tokens": 1}
        answer = _post(f"http://127.0.0.1:{roomy.port}/v1/completions", body, timeout=30)
        assert answer.status_code == 413, answer.text[:300]
        assert "retry-after" not in answer.headers
    finally:
        servers.call(roomy.stop())
    with grpc.insecure_channel(servers.target) as channel, pytest.raises(grpc.RpcError) as caught:
        pb_grpc.InferenceStub(channel).Generate(pb.GenerateRequest(prompt="a" * (MAX_RECEIVE_BYTES + 1)))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # gRPC's own, documented


def test_long_names_are_quoted_as_bounded_prefixes(servers: Servers, engine: Engine) -> None:
    model = engine.info.model_name
    answers = [
        _post(servers.url + "/v1/chat/completions", {"model": model, "messages": [{"role": LONG_NAME}]}),
        _post(servers.url + "/v1/completions", {"model": LONG_NAME, "prompt": "hi"}),
        _post(servers.url + "/v1/load_lora_adapter", {"lora_name": LONG_NAME, "lora_path": LONG_NAME}),
        httpx.get(servers.url + "/v1/models/" + LONG_NAME, timeout=10),
        httpx.get(servers.url + "/v1/" + LONG_NAME, timeout=10),
    ]
    for answer in answers:
        assert answer.status_code in (400, 404), answer.text[:300]
        assert len(answer.content) < SHORT + 200, answer.text[:300]
    with grpc.insecure_channel(servers.target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        for request in (
            pb.GenerateRequest(messages=[pb.ChatMessage(role=LONG_NAME, content="hi")]),
            pb.GenerateRequest(prompt="hi", adapter=LONG_NAME),
            pb.GenerateRequest(prompt="hi", request_id=LONG_NAME),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                stub.Generate(request, timeout=10)
            assert caught.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
            assert len(caught.value.details().encode()) <= MAX_STATUS_MESSAGE_BYTES


def test_status_messages_are_bounded_and_encodable() -> None:
    code, message = status_for(InvalidRequest("no " + "x" * 100_000 + LONE), "/m")
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert len(message.encode("utf-8")) <= MAX_STATUS_MESSAGE_BYTES
    _code, message = status_for(InvalidRequest("role " + LONE), "/m")
    assert message.encode("utf-8")  # escaped, not an encoding error
    # too large for the host cache is not "retry later": the operator must raise --host-cache-mb
    assert status_for(AdapterTooLarge("too big"), "/m")[0] == grpc.StatusCode.FAILED_PRECONDITION
    assert status_for(EngineOverloaded("queue is full"), "/m")[0] == grpc.StatusCode.RESOURCE_EXHAUSTED


def _rpc_error(code: grpc.StatusCode, details: str, trailers: tuple[tuple[str, str], ...] = ()) -> Any:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailers), details=details)


def test_only_overload_is_429_with_retry_after() -> None:
    overload = from_rpc_error(
        _rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue is full", (("grpc-retry-pushback-ms", "1500"),))
    )
    assert overload.status == 429 and overload.headers["Retry-After"] == "2"
    too_big = from_rpc_error(
        _rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "Received message larger than max (5 vs. 4)")
    )
    assert too_big.status == 413 and "Retry-After" not in too_big.headers
    assert from_rpc_error(_rpc_error(grpc.StatusCode.FAILED_PRECONDITION, "too big")).status == 400


# -- 8. slow clients -------------------------------------------------------------------------


def _read_until_closed(sock: socket.socket, deadline: float) -> bytes:
    """What the server sent before it closed the connection (b"" for a reset: a connection
    closed before the server read what the client had sent)."""
    data = b""
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(4096)  # socket.timeout (a test failure) if the server keeps it open
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def test_half_sent_requests_are_closed_while_others_keep_answering(servers: Servers) -> None:
    sockets: list[socket.socket] = []
    try:
        for _ in range(HALF_SENT):
            sock = socket.create_connection(("127.0.0.1", servers.port), timeout=5)
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le")  # and no more
            sockets.append(sock)
        opened = time.monotonic()
        _still_serving(servers)  # /health gets a connection: the slowest half-sent one makes room
        book = servers.http._server.config.http.book  # the server's count of open connections
        assert book.open <= LIMITS.max_connections and len(book.waiting) <= LIMITS.max_connections
        deadline = opened + LIMITS.header_timeout_s + 3
        answers = [_read_until_closed(sock, deadline) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()
    assert {answer[:13] for answer in answers} <= {b"HTTP/1.1 408 ", b""}, {a[:20] for a in answers}
    assert sum(1 for answer in answers if answer) >= LIMITS.max_connections  # the last ones waited
    _still_serving(servers)


def test_a_body_that_stops_coming_is_408(servers: Servers) -> None:
    with socket.create_connection(("127.0.0.1", servers.port), timeout=5) as sock:
        sock.sendall(b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"model"')
        started = time.monotonic()
        answer = _read_until_closed(sock, started + LIMITS.body_timeout_s + 3)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b"body" in answer and time.monotonic() - started >= LIMITS.body_timeout_s * 0.9


def test_a_kept_alive_connection_serves_again_after_its_deadlines(servers: Servers) -> None:
    with httpx.Client(base_url=servers.url, timeout=5) as client:
        assert client.get("/health").status_code == 200
        time.sleep(LIMITS.header_timeout_s + 0.2)  # idle, not half-sent: uvicorn's keep-alive rules
        assert client.get("/health").status_code == 200


def test_connection_cap_leaves_descriptors_for_grpc() -> None:
    assert connection_cap(1000, 1024) == 1024 - RESERVED_FDS
    assert connection_cap(50, 1 << 20) == 50
    assert connection_cap(1000, 10) == 1
    assert raise_open_file_limit() >= 1 and open_file_limit() >= 1


def test_limits_are_flags_of_serve_and_http() -> None:
    flags = ["--http-max-body-mb", "8", "--http-header-timeout", "5", "--http-body-timeout", "20"]
    flags += ["--http-max-connections", "64"]
    limits = HttpLimits(max_body_mb=8, header_timeout_s=5, body_timeout_s=20, max_connections=64)
    serve = cli.build_parser().parse_args(["serve", *flags])
    assert cli.server_config(serve).http_limits == limits
    assert cli.http_limits(cli.build_parser().parse_args(["http", *flags])) == limits
    with pytest.raises(ValueError):
        HttpLimits(header_timeout_s=0)


def test_a_flood_of_one_log_line_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    install(handler)
    log = logging.getLogger("loramux.test.flood")
    monkeypatch.setattr(log, "propagate", False)
    log.addHandler(handler)
    try:
        for index in range(10_000):
            log.warning("socket.accept() out of system resource: %d", index)
        log.warning("a different line")
    finally:
        log.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert len(lines) == BURST + 1 and lines[-1] == "a different line"
    assert "suppressed" in lines[BURST - 1]

    now = [0.0]
    repeat = RepeatFilter(burst=2, interval_s=10, clock=lambda: now[0])
    records = [logging.LogRecord("x", logging.WARNING, "", 0, "again %d", (i,), None) for i in range(6)]
    passed = [repeat.filter(record) for record in records[:5]]
    assert passed == [True, True, False, False, False]
    now[0] = 11.0
    assert repeat.filter(records[5]) and "suppressed 3 similar lines" in records[5].getMessage()


def test_configure_logging_installs_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", root.level)
    configure_logging("warning")
    assert root.handlers and all(
        any(isinstance(f, RepeatFilter) for f in handler.filters) for handler in root.handlers
    )


# -- 10. the schema says what the server does --------------------------------------------------


def test_schema_promises_hold(servers: Servers) -> None:
    health = httpx.get(servers.url + "/health", timeout=5)
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    refused = httpx.delete(servers.url + "/v1/completions", timeout=5)
    assert refused.status_code == 405 and refused.headers["allow"] == "POST"
    paths = httpx.get(servers.url + "/openapi.json", timeout=5).json()["paths"]
    health_json = paths["/health"]["get"]["responses"]["200"]["content"]["application/json"]
    assert health_json["schema"]["$ref"].endswith("/HealthResponse")
    for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        assert {"401", "403", "413"} <= set(paths[path]["post"]["responses"])
    assert {"401", "413", "429"} <= set(paths["/v1/completions"]["post"]["responses"])
