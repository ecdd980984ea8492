"""API key and admin token over gRPC and HTTP (the official `openai` client), against a live server.

One tiny engine is served over gRPC with an API key and an admin token; an HTTP shim in front of
it presents the same secrets. Health and reflection stay open; no secret reaches the log.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx2 as httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from loramux.v1 import inference_pb2 as pb
from loramux.v1 import inference_pb2_grpc as pb_grpc
from server import cli
from server.auth import AuthConfig, bearer_token, check, token_matches
from server.config import EngineConfig, ServerConfig
from server.engine.engine import Engine
from server.grpc_server import GrpcServer, serve_grpc
from server.http.app import create_app
from server.http.server import HttpServer
from tests.conftest import start_engine
from tests.test_grpc_service import _greedy

API_KEY = "sk-test-key-0123456789"
ADMIN_TOKEN = "admin-token-9876543210"


class KeyedServers:
    """A keyed gRPC server and an HTTP shim over it, on one event loop in a thread."""

    def __init__(self, engine: Engine, auth: AuthConfig, **grpc_options: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-auth", daemon=True)
        self.thread.start()
        self.grpc: GrpcServer = self.call(serve_grpc(engine, "127.0.0.1", 0, auth=auth, **grpc_options))
        self.target = f"127.0.0.1:{self.grpc.port}"
        app = create_app(self.target, enable_admin=True, api_key=auth.api_key, admin_token=auth.admin_token)
        self.http = HttpServer(app, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.call(self.http.start())}"

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
    engine_ = start_engine(
        make_tiny_model(), EngineConfig(max_running=2, max_queue=8, max_model_len=128, max_batched_tokens=32)
    )
    yield engine_
    engine_.shutdown()


@pytest.fixture(scope="module")
def servers(engine: Engine) -> Iterator[KeyedServers]:
    running = KeyedServers(engine, AuthConfig(api_key=API_KEY, admin_token=ADMIN_TOKEN))
    yield running
    running.close()


@pytest.fixture()
def stub(servers: KeyedServers) -> Iterator[pb_grpc.InferenceStub]:
    with grpc.insecure_channel(servers.target) as channel:
        yield pb_grpc.InferenceStub(channel)


def _bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


# -- the checks themselves -----------------------------------------------------------------


def test_bearer_parsing_and_comparison() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer abc ") == "abc"
    assert bearer_token("Basic abc") is None
    assert bearer_token(None) is None
    assert token_matches("abc", "abc") and not token_matches("abd", "abc") and not token_matches(None, "abc")
    both = AuthConfig(api_key="k", admin_token="a")
    assert check(both, "k", admin=False) is None
    assert check(both, "a", admin=False) is None  # the admin token passes everywhere
    assert check(both, "x", admin=False) == "unauthenticated"
    assert check(both, "k", admin=True) == "permission_denied"
    assert check(both, "x", admin=True) == "unauthenticated"
    assert check(AuthConfig(admin_token="a"), None, admin=True) == "permission_denied"
    # Admin calls: refused unless admin is enabled or an admin token is set (then it is needed).
    assert check(AuthConfig(), None, admin=True) == "admin_disabled"
    assert check(AuthConfig(api_key="k"), "k", admin=True) == "admin_disabled"
    assert check(AuthConfig(enable_admin=True), None, admin=True) is None
    assert check(AuthConfig(api_key="k", enable_admin=True), "k", admin=True) is None
    assert check(AuthConfig(api_key="k", enable_admin=True), None, admin=True) == "unauthenticated"
    assert check(AuthConfig(admin_token="a", enable_admin=True), None, admin=True) == "permission_denied"
    assert check(AuthConfig(), None, admin=False) is None
    assert repr(both) == "AuthConfig(enable_admin=False)"  # no secret in a repr


# -- gRPC ----------------------------------------------------------------------------------


@pytest.mark.parametrize("metadata", [None, _bearer("wrong"), [("authorization", API_KEY)]])
def test_grpc_without_the_right_key_is_unauthenticated(stub: pb_grpc.InferenceStub, metadata: Any) -> None:
    for call in (
        lambda: stub.Generate(_greedy(max_tokens=2), timeout=10, metadata=metadata),
        lambda: list(stub.GenerateStream(_greedy(max_tokens=2), timeout=10, metadata=metadata)),
        lambda: stub.GetInfo(pb.GetInfoRequest(), timeout=10, metadata=metadata),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert API_KEY not in (caught.value.details() or "")


def test_grpc_with_the_key_generates(stub: pb_grpc.InferenceStub) -> None:
    response = stub.Generate(_greedy(max_tokens=3), timeout=30, metadata=_bearer(API_KEY))
    assert response.completion_tokens == 3
    chunks = list(stub.GenerateStream(_greedy(max_tokens=3), timeout=30, metadata=_bearer(ADMIN_TOKEN)))
    assert chunks[-1].finished


def test_health_and_reflection_stay_open(servers: KeyedServers) -> None:
    with grpc.insecure_channel(servers.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(service="loramux.v1.Inference"), timeout=10)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        assert "loramux.v1.Inference" in set(ProtoReflectionDescriptorDatabase(channel).get_services())


def test_adapter_rpcs_need_the_admin_token(stub: pb_grpc.InferenceStub) -> None:
    request = pb.UnloadAdapterRequest(name="nope")
    with pytest.raises(grpc.RpcError) as caught:
        stub.UnloadAdapter(request, timeout=10, metadata=_bearer(API_KEY))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as caught:  # past the check: this server serves no adapters
        stub.UnloadAdapter(request, timeout=10, metadata=_bearer(ADMIN_TOKEN))
    assert caught.value.code() not in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)


def test_cli_client_commands_take_the_key(
    servers: KeyedServers, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert cli.main(["info", "--target", servers.target]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert cli.main(["info", "--target", servers.target, "--api-key", API_KEY]) == 0
    assert '"model_name"' in capsys.readouterr().out
    monkeypatch.setenv(cli.API_KEY_ENV, API_KEY)  # the env var keeps the key out of `ps`
    argv = ["generate", "--target", servers.target, "--prompt", "hi", "--max-tokens", "2"]
    assert cli.main(argv) == 0


# -- HTTP ----------------------------------------------------------------------------------


def test_openai_client_with_a_bad_key_is_an_authentication_error(servers: KeyedServers) -> None:
    for key in ("wrong", ADMIN_TOKEN + "x"):
        client = openai.OpenAI(base_url=servers.url + "/v1", api_key=key, max_retries=0)
        with pytest.raises(openai.AuthenticationError) as caught:
            client.completions.create(model="x", prompt="hi", max_tokens=2)
        assert caught.value.status_code == 401
        with pytest.raises(openai.AuthenticationError):
            client.models.list()


def test_openai_client_with_the_key_works(servers: KeyedServers) -> None:
    client = openai.OpenAI(base_url=servers.url + "/v1", api_key=API_KEY, max_retries=0)
    model = client.models.list().data[0].id
    answer = client.completions.create(model=model, prompt="hi", max_tokens=3, temperature=0.0)
    assert answer.usage is not None and answer.usage.completion_tokens == 3
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True
    )
    assert any(chunk.choices and chunk.choices[0].finish_reason for chunk in stream)


def test_http_health_is_open_and_admin_routes_need_the_token(servers: KeyedServers) -> None:
    assert httpx.get(servers.url + "/health", timeout=10).status_code == 200
    body = {"lora_name": "nope"}
    user = httpx.post(
        servers.url + "/v1/unload_lora_adapter", json=body, headers={"Authorization": f"Bearer {API_KEY}"}
    )
    assert user.status_code == 403
    assert user.json()["error"]["type"] == "permission_error"
    admin = httpx.post(
        servers.url + "/v1/unload_lora_adapter", json=body, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    )
    assert admin.status_code not in (401, 403)  # the shim presented the admin token to gRPC


def test_standalone_shim_without_the_key_gets_401_from_grpc(servers: KeyedServers) -> None:
    """A shim that checks nothing itself but lacks the server's key passes on UNAUTHENTICATED."""
    shim = HttpServer(create_app(servers.target), "127.0.0.1", 0)
    url = f"http://127.0.0.1:{servers.call(shim.start())}"
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="anything", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
    finally:
        servers.call(shim.stop())


def test_no_key_in_the_logs(servers: KeyedServers, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    openai_client = openai.OpenAI(base_url=servers.url + "/v1", api_key="wrong-" + API_KEY, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        openai_client.models.list()
    with grpc.insecure_channel(servers.target) as channel:
        with pytest.raises(grpc.RpcError):
            pb_grpc.InferenceStub(channel).GetInfo(
                pb.GetInfoRequest(), timeout=10, metadata=_bearer("x" + API_KEY)
            )
        pb_grpc.InferenceStub(channel).GetInfo(pb.GetInfoRequest(), timeout=10, metadata=_bearer(ADMIN_TOKEN))
    logging.getLogger("test").info("config %r", ServerConfig(api_key=API_KEY, admin_token=ADMIN_TOKEN))
    assert caplog.records
    assert API_KEY not in caplog.text and ADMIN_TOKEN not in caplog.text


def test_serve_flags_and_env_fill_the_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(cli.API_KEY_ENV, API_KEY)
    monkeypatch.setenv(cli.ADMIN_TOKEN_ENV, ADMIN_TOKEN)
    args = cli.build_parser().parse_args(["serve", "--request-timeout", "5", "--drain-timeout", "2"])
    config = cli.server_config(args)
    assert (config.api_key, config.admin_token) == (API_KEY, ADMIN_TOKEN)
    assert (config.request_timeout_s, config.drain_timeout_s) == (5.0, 2.0)
    assert API_KEY not in repr(config) and ADMIN_TOKEN not in repr(config)
