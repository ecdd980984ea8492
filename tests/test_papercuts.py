"""Issue 15, parts 4 and 5: errors in the client's language, and the operator's papercuts.

A tiny random Llama with an adapter root holding three good PEFT adapters and four broken ones
is served over gRPC (2 device slots, rank <= 8) with an OpenAI shim in front. Errors are checked
through the official `openai` client and through raw HTTP requests; the logs through caplog; the
invalid adapters, GetInfo, the admin rule and reflection v1 through gRPC stubs; the CLI in and
out of process.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import grpc
import httpx2 as httpx
import openai
import pytest
from google.protobuf import descriptor_pool, message_factory

from adapters_store.config_check import ConfigCheck
from adapters_store.host_cache import HostCache
from loramux.v1 import inference_pb2 as pb
from loramux.v1 import inference_pb2_grpc as pb_grpc
from server import cli
from server.access_log import KEYS
from server.auth import AuthConfig
from server.cli_support import BROKEN_PIPE_STATUS, exit_quietly_on_broken_pipe, grpc_target
from server.engine.engine import Engine
from server.http.client_words import MAX_LISTED_MODELS, for_http, unknown_model
from server.reflection import V1_METHOD, V1_SERVICE_NAME
from tests.conftest import start_adapter_engine
from tests.test_adapters_engine import _save_adapter
from tests.test_grpc_service import OpenAIServers, ServerThread, _greedy, _slow_down, _wait_until

QV4: dict[str, Any] = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
GOOD = ("qv4", "qv4b", "qv4c")
BROKEN = ("broken-json", "no-weights", "rank-too-big", "prefix-tuning")
PROMPT = "The capital of France is"
RPC_NAMES = ("ListAdapters", "LoadAdapter", "UnloadAdapter", "GetInfo", "GenerateStream", "RegisterExamples")
STATUS_NAMES = tuple(code.name for code in grpc.StatusCode)
ROOT_DIR = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dirs(make_tiny_model: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = make_tiny_model(kind="llama", kv_heads=2, tied=False)
    root = tmp_path_factory.mktemp("papercut-adapters")
    for seed, name in enumerate(GOOD):
        _save_adapter(base, root / name, QV4, seed=seed)
    _break_adapters(root)
    return {"base": base, "root": root}


def _break_adapters(root: Path) -> None:
    """Four adapters whose config alone says they cannot be served."""
    good = root / "qv4"
    (root / "broken-json").mkdir()
    (root / "broken-json" / "adapter_config.json").write_text('{"r": 4, "peft_type": "LORA",')
    shutil.copy(good / "adapter_model.safetensors", root / "broken-json")
    (root / "no-weights").mkdir()
    shutil.copy(good / "adapter_config.json", root / "no-weights")
    big = json.loads((good / "adapter_config.json").read_text()) | {"r": 64}
    (root / "rank-too-big").mkdir()
    (root / "rank-too-big" / "adapter_config.json").write_text(json.dumps(big))
    shutil.copy(good / "adapter_model.safetensors", root / "rank-too-big")
    prefix = json.loads((good / "adapter_config.json").read_text()) | {"peft_type": "PREFIX_TUNING"}
    (root / "prefix-tuning").mkdir()
    (root / "prefix-tuning" / "adapter_config.json").write_text(json.dumps(prefix))
    shutil.copy(good / "adapter_model.safetensors", root / "prefix-tuning")


@pytest.fixture(scope="module")
def engine(dirs: dict[str, Path]) -> Iterator[Engine]:
    engine_ = start_adapter_engine(dirs["base"], dirs["root"])
    yield engine_
    engine_.shutdown()


@pytest.fixture(scope="module")
def servers(engine: Engine) -> Iterator[OpenAIServers]:
    running = OpenAIServers(engine)
    yield running
    running.close()


@pytest.fixture()
def client(servers: OpenAIServers) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=servers.url + "/v1", api_key="unused", max_retries=0, timeout=60) as client_:
        yield client_


@pytest.fixture()
def stub(servers: OpenAIServers) -> Iterator[pb_grpc.InferenceStub]:
    with grpc.insecure_channel(servers.grpc.target) as channel:
        yield pb_grpc.InferenceStub(channel)


def _error(answer: httpx.Response) -> dict[str, Any]:
    """The error object of an OpenAI error answer, checked to have exactly OpenAI's four keys."""
    body = answer.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]  # type: ignore[no-any-return]


def _speaks_http(message: str) -> None:
    """`message` names neither gRPC RPCs nor gRPC status codes."""
    for word in (*RPC_NAMES, *STATUS_NAMES, "gRPC", "adapter ''"):
        assert word not in message, (word, message)


# -- 4. errors in the client's language ----------------------------------------------------------


def test_an_unknown_model_lists_the_models_base_first(
    client: openai.OpenAI, servers: OpenAIServers, engine: Engine
) -> None:
    base = engine.info.model_name
    calls = (
        lambda: client.completions.create(model="nope", prompt=PROMPT, max_tokens=2),
        lambda: client.completions.create(model="nope", prompt=PROMPT, max_tokens=2, stream=True),
        lambda: client.chat.completions.create(
            model="nope", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        ),
    )
    for call in calls:
        with pytest.raises(openai.NotFoundError) as caught:
            call()
        error = caught.value.body
        assert isinstance(error, dict)
        message = error["message"]
        assert message.startswith("the model 'nope' does not exist"), message
        assert error["param"] == "model" and error["code"] == "model_not_found"
        assert message.index(repr(base)) < message.index("'qv4'") < message.index("'qv4b'")
        _speaks_http(message)
    raw = httpx.post(servers.url + "/v1/completions", json={"model": "nope", "prompt": PROMPT}, timeout=30)
    assert raw.status_code == 404
    assert _error(raw)["message"] == message  # the same words over raw HTTP
    card = httpx.get(servers.url + "/v1/models/nope", timeout=30)
    assert card.status_code == 404 and repr(base) in _error(card)["message"]


def test_an_unknown_adapter_of_a_mixture_is_named(client: openai.OpenAI, engine: Engine) -> None:
    mixture = [{"name": "qv4", "weight": 1.0}, {"name": "ghost", "weight": 1.0}]
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(
            model=engine.info.model_name, prompt=PROMPT, max_tokens=2, extra_body={"adapters": mixture}
        )
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["param"] == "adapters"
    assert caught.value.body["message"].startswith("the adapter 'ghost' does not exist")


def test_a_long_model_list_is_cut() -> None:
    models = ["base", *(f"adapter-{i:02d}" for i in range(30))]
    message = unknown_model("nope", models)
    listed = [model for model in models if repr(model) in message]
    assert listed == models[:MAX_LISTED_MODELS]
    assert message.endswith(f"and {len(models) - MAX_LISTED_MODELS} more; GET /v1/models lists them")
    assert "and" not in unknown_model("nope", models[:3]).split("serves are:")[1]


def test_grpc_words_become_http_words() -> None:
    said = for_http(
        "adapter 'x' is not loaded and not in the adapter roots; load it first (LoadAdapter / --adapter-root) "
        "or list them with ListAdapters"
    )
    assert "GET /v1/models" in said and "POST /v1/load_lora_adapter" in said
    _speaks_http(said)
    _speaks_http(for_http("INVALID_ARGUMENT: the router is off; use adapter '' for the base model"))


def test_the_router_off_message_names_routes(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="auto", prompt=PROMPT, max_tokens=2)
    assert isinstance(caught.value.body, dict)
    message = caught.value.body["message"]
    assert "GET /v1/models" in message and caught.value.body["code"] is None
    _speaks_http(message)


@pytest.mark.parametrize(
    ("content", "headers", "says"),
    [
        (b'{"model": "x", "prompt": ', {"content-type": "application/json"}, "is not valid JSON"),
        (b"{bad}", {"content-type": "application/json"}, "is not valid JSON"),
        (b'{"model": "x", "prompt": "hi"}', {}, "has no Content-Type header"),
        (b'{"model": "x", "prompt": "hi"}', {"content-type": "text/plain"}, "was sent as 'text/plain'"),
        (b"", {"content-type": "application/json"}, "is empty"),
        (b"[1, 2]", {"content-type": "application/json"}, "must be a JSON object"),
    ],
)
def test_a_body_that_is_not_a_json_object_gets_one_sentence(
    servers: OpenAIServers, content: bytes, headers: dict[str, str], says: str
) -> None:
    for path in ("/v1/completions", "/v1/chat/completions"):
        answer = httpx.post(servers.url + path, content=content, headers=headers, timeout=30)
        assert answer.status_code == 400
        error = _error(answer)
        assert says in error["message"] and error["message"].count(". ") == 0, error
        assert error["type"] == "invalid_request_error" and error["param"] is None
        assert "application/json" in error["message"] or "JSON" in error["message"]


def test_the_openai_client_with_another_content_type_is_told_to_send_json(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(
            model="x", prompt=PROMPT, max_tokens=2, extra_headers={"Content-Type": "text/plain"}
        )
    assert isinstance(caught.value.body, dict)
    assert "'Content-Type: application/json'" in caught.value.body["message"]


@pytest.mark.parametrize(
    ("part", "says"),
    [
        ({"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}, "images are"),
        ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}, "audio is"),
        ({"type": "file", "file": {"file_id": "file-1"}}, "files are"),
    ],
)
def test_an_image_audio_or_file_part_is_not_supported(
    client: openai.OpenAI, servers: OpenAIServers, engine: Engine, part: dict[str, Any], says: str
) -> None:
    messages: Any = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, part]}]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=engine.info.model_name, messages=messages, max_tokens=2)
    assert isinstance(caught.value.body, dict)
    message = caught.value.body["message"]
    assert f"{says} not supported by loramux" in message and "part 1" in message
    assert caught.value.body["param"] == "messages.0.content"
    assert "Input should be" not in message and "Value error" not in message
    raw = httpx.post(
        servers.url + "/v1/chat/completions",
        json={"model": engine.info.model_name, "messages": messages},
        timeout=30,
    )
    assert raw.status_code == 400 and _error(raw)["message"] == message


# -- 5. access log and adapter lifecycle log -----------------------------------------------------


def _fields(line: str) -> dict[str, str]:
    pairs = [item.split("=", 1) for item in line.split(" ")]
    return {key: value for key, value in pairs}


def _access_lines(caplog: pytest.LogCaptureFixture, request_id_part: str) -> list[dict[str, str]]:
    return [
        _fields(record.getMessage())
        for record in caplog.records
        if record.name == "loramux.access" and request_id_part in record.getMessage()
    ]


def test_every_finished_request_gets_one_access_line(
    caplog: pytest.LogCaptureFixture, stub: pb_grpc.InferenceStub, client: openai.OpenAI, engine: Engine
) -> None:
    caplog.set_level(logging.INFO, logger="loramux.access")
    secret_prompt = "my secret prompt text"
    stub.Generate(
        _greedy(prompt=secret_prompt, max_tokens=3, adapter="qv4", request_id="pc-unary"), timeout=60
    )
    list(stub.GenerateStream(_greedy(prompt=PROMPT, max_tokens=2, request_id="pc-stream"), timeout=60))
    with pytest.raises(grpc.RpcError):
        stub.Generate(_greedy(adapter="ghost", request_id="pc-refused"), timeout=60)
    answer = client.completions.create(
        model=engine.info.model_name, prompt=secret_prompt, max_tokens=2, extra_body={"ignore_eos": True}
    )
    assert _wait_until(lambda: len(_access_lines(caplog, answer.id)) == 1)
    assert _wait_until(lambda: all(_access_lines(caplog, f"pc-{k}") for k in ("unary", "stream", "refused")))

    for record in caplog.records:
        if record.name == "loramux.access":
            message = record.getMessage()
            assert list(_fields(message)) == list(KEYS), message  # one stable key=value line
            assert secret_prompt.split()[1] not in message and "\n" not in message
    (unary,) = _access_lines(caplog, "pc-unary")
    assert unary["api"] == "grpc" and unary["method"] == "unary" and unary["adapter"] == "qv4"
    assert unary["completion_tokens"] == "3" and int(unary["prompt_tokens"]) > 0
    assert unary["outcome"] == "length" and float(unary["latency_ms"]) > 0
    (stream,) = _access_lines(caplog, "pc-stream")
    assert stream["method"] == "stream" and stream["adapter"] == engine.info.model_name
    (refused,) = _access_lines(caplog, "pc-refused")
    assert refused["outcome"] == "not_found" and refused["completion_tokens"] == "0"
    (http,) = _access_lines(caplog, answer.id)
    assert http["api"] == "http" and http["outcome"] == "length" and http["completion_tokens"] == "2"


def test_a_stream_the_client_leaves_is_logged_cancelled(
    caplog: pytest.LogCaptureFixture,
    stub: pb_grpc.InferenceStub,
    engine: Engine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.INFO, logger="loramux.access")
    _slow_down(engine, monkeypatch, seconds_per_output=0.05)
    call = stub.GenerateStream(_greedy(max_tokens=100, request_id="pc-left"), timeout=60)
    next(call)
    call.cancel()
    assert _wait_until(lambda: bool(_access_lines(caplog, "pc-left")))
    (left,) = _access_lines(caplog, "pc-left")
    assert left["outcome"] == "cancelled" and int(left["completion_tokens"]) < 100


def test_adapter_loads_evictions_and_refusals_are_logged(
    caplog: pytest.LogCaptureFixture, stub: pb_grpc.InferenceStub
) -> None:
    caplog.set_level(logging.INFO, logger="loramux.adapters")
    for name in GOOD:  # three adapters through two device slots: one is evicted
        stub.Generate(_greedy(max_tokens=1, adapter=name), timeout=60)
    for _ in range(2):
        with pytest.raises(grpc.RpcError) as caught:
            stub.Generate(_greedy(max_tokens=1, adapter="rank-too-big"), timeout=60)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    lines = [record.getMessage() for record in caplog.records if record.name == "loramux.adapters"]
    loaded = [
        _fields(line.removeprefix("adapter loaded ")) for line in lines if line.startswith("adapter loaded")
    ]
    assert {(entry["name"], entry["tier"]) for entry in loaded} >= {("qv4c", "host"), ("qv4c", "device")}
    host_load = next(entry for entry in loaded if entry["name"] == "qv4c" and entry["tier"] == "host")
    assert host_load["format"] == "peft-lora" and int(host_load["bytes"]) > 0 and host_load["rank"] == "4"
    assert float(host_load["seconds"]) >= 0 and host_load["source"] == "qv4c"
    evicted = [line for line in lines if line.startswith("adapter evicted") and "tier=device" in line]
    assert evicted, lines
    refused = [line for line in lines if line.startswith("adapter refused name=rank-too-big")]
    assert len(refused) == 1, lines  # once, not once per request
    assert "reason=" in refused[0] and "64" in refused[0]


def test_host_cache_evictions_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="loramux.adapters")

    class Sized:
        def __init__(self, name: str) -> None:
            self.name, self.nbytes = name, 60

    cache = HostCache(100, lambda name: Sized(name))  # type: ignore[arg-type, return-value]
    cache.get_or_load("a")
    cache.get_or_load("b")  # a is evicted to make room
    assert "adapter evicted name=a tier=host bytes=60" in [record.getMessage() for record in caplog.records]


# -- invalid adapters flagged at discovery -------------------------------------------------------


def test_invalid_adapters_are_flagged_in_models_and_list_adapters(
    servers: OpenAIServers, stub: pb_grpc.InferenceStub
) -> None:
    cards = {card["id"]: card for card in httpx.get(servers.url + "/v1/models", timeout=30).json()["data"]}
    for name in BROKEN:
        assert cards[name]["status"] == "invalid" and cards[name]["error"], cards[name]
    for name in GOOD:
        assert cards[name]["status"] == "ready" and cards[name]["error"] is None
    assert "adapter_config.json" in cards["broken-json"]["error"]
    assert "adapter_model.safetensors" in cards["no-weights"]["error"]
    assert "64" in cards["rank-too-big"]["error"]
    assert "PREFIX_TUNING" in cards["prefix-tuning"]["error"]
    listed = {info.name: info for info in stub.ListAdapters(pb.ListAdaptersRequest(), timeout=30).adapters}
    assert {name for name, info in listed.items() if info.error} == set(BROKEN)
    assert listed["no-weights"].error == cards["no-weights"]["error"]


def test_the_config_check_reads_only_the_weights_header_and_sees_a_fix(
    dirs: dict[str, Path], engine: Engine
) -> None:
    assert engine.adapters is not None
    check = ConfigCheck(engine.adapters.store.spec)
    root = dirs["root"]
    assert check.problem(root / "qv4", "qv4") is None
    weights = (root / "qv4" / "adapter_model.safetensors").read_bytes()
    garbage = root.parent / "garbage-weights"  # not safetensors: its header says so
    shutil.copytree(root / "qv4", garbage)
    (garbage / "adapter_model.safetensors").write_bytes(b"not safetensors")
    assert "not a valid safetensors file" in (check.problem(garbage, "garbage-weights") or "")
    truncated = root.parent / "truncated-weights"  # the header whole, the data cut short
    shutil.copytree(root / "qv4", truncated)
    (truncated / "adapter_model.safetensors").write_bytes(weights[:-16])
    assert "truncated" in (check.problem(truncated, "truncated-weights") or "")
    flipped = root.parent / "flipped-weights"  # data not read: a bad value is the loader's to find
    shutil.copytree(root / "qv4", flipped)
    (flipped / "adapter_model.safetensors").write_bytes(weights[:-4] + b"\xff\xff\xff\x7f")
    assert check.problem(flipped, "flipped-weights") is None
    fixed = root.parent / "fixed-later"
    shutil.copytree(root / "broken-json", fixed)
    assert check.problem(fixed, "fixed-later") is not None
    shutil.copy(root / "qv4" / "adapter_config.json", fixed / "adapter_config.json")
    assert check.problem(fixed, "fixed-later") is None  # the config's stat changed: checked again


def test_the_config_check_summarizes_what_it_can_serve(dirs: dict[str, Path], engine: Engine) -> None:
    from adapters_store.config_check import ConfigSummary

    assert engine.adapters is not None
    check = ConfigCheck(engine.adapters.store.spec)
    root = dirs["root"]
    assert check.summary(root / "qv4", "qv4") == ConfigSummary("peft-lora", 4, ("q_proj", "v_proj"))
    for name in BROKEN:
        assert check.summary(root / name, name) is None and check.problem(root / name, name)
    shipped = ROOT_DIR / "adapters"  # the default model's: checked against its own spec
    from tasks.compeft_alpha import model_spec

    smol = ConfigCheck(model_spec())
    all_linear = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert smol.summary(shipped / "sql-mos", "sql-mos") == ConfigSummary("mos", 4, all_linear)
    assert smol.summary(shipped / "sql-compeft-10", "sql-compeft-10") == ConfigSummary(
        "compeft", 3, all_linear
    )
    assert smol.summary(shipped / "sql", "sql") == ConfigSummary("peft-lora", 3, all_linear)


# -- GetInfo: kernels and adapter settings -------------------------------------------------------


def test_get_info_reports_the_kernels_running_and_the_adapter_settings(
    stub: pb_grpc.InferenceStub, engine: Engine
) -> None:
    from kernels import cpu_extension

    info = stub.GetInfo(pb.GetInfoRequest(), timeout=30)
    assert info.kernels.lora_backend == "torch" == info.kernels_backend  # CPU: the torch backend
    fused = cpu_extension.is_loaded()  # the server's default `--model-kernels auto` on fp32 CPU
    assert info.kernels.model_ops == ("fused-cpu" if fused else "torch")
    assert info.kernels.lora_gather == ("fused-cpu" if fused else "torch")
    assert not info.kernels.triton_interpreted
    settings = info.adapter_settings
    assert (settings.max_slots, settings.max_rank) == (2, 8)  # tests.conftest.start_adapter_engine
    assert settings.host_cache_bytes == 1024 << 20 == settings.max_adapter_bytes
    assert list(settings.target_modules) == [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
    ]  # fmt: skip
    assert [(p.kind, p.slots, p.max_rank) for p in settings.pools] == [("lora", 2, 8)]
    assert settings.adapter_roots == 1


def test_get_info_without_adapters_has_no_adapter_settings(tiny_engine: Engine) -> None:
    server = ServerThread(tiny_engine)
    try:
        with grpc.insecure_channel(server.target) as channel:
            info = pb_grpc.InferenceStub(channel).GetInfo(pb.GetInfoRequest(), timeout=30)
    finally:
        server.close()
    assert not info.HasField("adapter_settings")
    assert info.kernels.lora_backend == "none" == info.kernels.lora_gather
    assert info.kernels.model_ops in ("fused-cpu", "torch")


# -- the gRPC admin rule -------------------------------------------------------------------------


def _admin_calls(stub: pb_grpc.InferenceStub, metadata: Any = None) -> list[grpc.StatusCode]:
    """The status of LoadAdapter, UnloadAdapter and RegisterExamples (OK when they pass the gate)."""
    calls = (
        lambda: stub.LoadAdapter(
            pb.LoadAdapterRequest(name="qv4", path="qv4"), timeout=60, metadata=metadata
        ),
        lambda: stub.UnloadAdapter(pb.UnloadAdapterRequest(name="qv4"), timeout=60, metadata=metadata),
        lambda: stub.RegisterExamples(
            pb.RegisterExamplesRequest(adapter="qv4", prompts=["hi"]), timeout=60, metadata=metadata
        ),
    )
    codes = []
    for call in calls:
        try:
            call()
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as err:
            codes.append(err.code())
            if err.code() == grpc.StatusCode.PERMISSION_DENIED:
                assert "--enable-admin" in (err.details() or "") or "admin token" in (err.details() or "")
    return codes


def test_grpc_adapter_rpcs_follow_the_admin_rule(engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="loramux.adapters")
    denied = [grpc.StatusCode.PERMISSION_DENIED] * 3
    plain = ServerThread(engine, auth=AuthConfig())
    token = ServerThread(engine, auth=AuthConfig(admin_token="admin-secret"))
    enabled = ServerThread(engine, auth=AuthConfig(enable_admin=True))
    try:
        with grpc.insecure_channel(plain.target) as channel:
            assert _admin_calls(pb_grpc.InferenceStub(channel)) == denied
        with grpc.insecure_channel(token.target) as channel:
            stub = pb_grpc.InferenceStub(channel)
            assert _admin_calls(stub) == denied
            passed = _admin_calls(stub, [("authorization", "Bearer admin-secret")])
            assert passed[:2] == [grpc.StatusCode.OK] * 2  # RegisterExamples: no router here
            assert passed[2] == grpc.StatusCode.FAILED_PRECONDITION
        with grpc.insecure_channel(enabled.target) as channel:
            assert _admin_calls(pb_grpc.InferenceStub(channel))[:2] == [grpc.StatusCode.OK] * 2
        unloads = [r.getMessage() for r in caplog.records if r.getMessage() == "adapter unloaded name=qv4"]
        assert len(unloads) == 2  # the two UnloadAdapter calls that passed the gate
    finally:
        for server in (plain, token, enabled):
            server.close()


# -- reflection v1 -------------------------------------------------------------------------------


def test_reflection_answers_v1(servers: OpenAIServers) -> None:
    pool = descriptor_pool.Default()
    request_type = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionRequest")
    )
    response_type = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionResponse")
    )
    with grpc.insecure_channel(servers.grpc.target) as channel:
        reflect = channel.stream_stream(
            V1_METHOD,
            request_serializer=request_type.SerializeToString,
            response_deserializer=response_type.FromString,
        )
        answers = list(
            reflect(
                iter(
                    [
                        request_type(list_services=""),
                        request_type(file_containing_symbol="loramux.v1.Inference"),
                        request_type(file_containing_symbol=V1_SERVICE_NAME),
                    ]
                ),
                timeout=30,
            )
        )
    services = {service.name for service in answers[0].list_services_response.service}
    assert {"loramux.v1.Inference", V1_SERVICE_NAME, "grpc.reflection.v1alpha.ServerReflection"} <= services
    for answer in answers[1:]:
        assert answer.file_descriptor_response.file_descriptor_proto, answer
    assert not any(answer.HasField("error_response") for answer in answers)


# -- the CLI -------------------------------------------------------------------------------------


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"loramux {metadata.version('loramux')}"


def test_a_target_without_a_port_gets_the_default_port() -> None:
    parser = cli.build_parser()
    assert parser.parse_args(["info", "--target", "gpu-box"]).target == "gpu-box:50051"
    assert parser.parse_args(["adapters", "list", "--target", "10.0.0.7"]).target == "10.0.0.7:50051"
    assert parser.parse_args(["info", "--target", "gpu-box:6000"]).target == "gpu-box:6000"
    assert parser.parse_args(["http", "--grpc-target", "gpu-box"]).grpc_target == "gpu-box:50051"
    assert grpc_target("::1") == "[::1]:50051" and grpc_target("[::1]:7") == "[::1]:7"
    assert grpc_target("unix:/run/loramux.sock") == "unix:/run/loramux.sock"
    with pytest.raises(SystemExit):
        parser.parse_args(["info", "--target", "host:notaport"])


def test_a_broken_pipe_exits_quietly(servers: OpenAIServers) -> None:
    assert exit_quietly_on_broken_pipe(lambda: 0) == 0
    with subprocess.Popen(
        [sys.executable, "-m", "server.cli", "adapters", "list", "--target", servers.grpc.target],
        cwd=ROOT_DIR,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as child:
        assert child.stdout is not None and child.stderr is not None
        child.stdout.close()  # the reader leaves before the command prints (like `| head -0`)
        stderr = child.stderr.read().decode()
        status = child.wait(timeout=120)
    assert status == BROKEN_PIPE_STATUS, stderr
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr and "Exception ignored" not in stderr


def test_cli_max_tokens_past_the_api_limit_names_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["generate", "--prompt", "hi", "--max-tokens", "99999999999999"])
    assert exited.value.code == 2
    assert "argument --max-tokens: must be <= 4294967295" in capsys.readouterr().err
