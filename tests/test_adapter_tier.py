"""Every answer says where its adapter was when the request arrived (a cold start or a warm one),
at each layer: the engine's outputs, the gRPC answers, the OpenAI shim's extra field, the metrics.

A tiny random Llama engine with two device slots serves three adapters from an adapter root. Two
oracles judge each answer: the adapter's tier as ListAdapters shows it just before the request
(another code path: the store's listing and the device slots' table), and the scenario's own
expectation: the first request of an adapter finds it on disk, the next one in its device slot,
and once two other adapters have taken both slots, in host memory. Each test first unloads its
adapters, so it starts cold whatever ran before; requests run one at a time.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx2 as httpx
import openai
import pytest

from loramux.v1 import inference_pb2 as pb
from loramux.v1 import inference_pb2_grpc as pb_grpc
from server.config import AdapterConfig, EngineConfig, ServerConfig
from server.engine.engine import Engine
from server.engine.request import SamplingParams
from server.http.app import create_app
from server.http.server import HttpServer
from server.metrics import Metrics
from server.preparation import RequestInput, RequestPreparer
from server.prompts import PromptInput
from server.runtime import build_engine
from tests.test_adapters_engine import _save_adapter
from tests.test_engine import Collected
from tests.test_grpc_service import ServerThread
from tests.test_metrics import scrape_text, value

QV4: dict[str, Any] = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
PROMPT = (17, 300, 42, 901, 5, 77, 1200)
GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
TEXT = "The capital of France is"
HTTP_GREEDY: dict[str, Any] = dict(max_tokens=4, temperature=0.0, extra_body={"ignore_eos": True})
_TIER_OF_PB = {pb.ADAPTER_TIER_DISK: "disk", pb.ADAPTER_TIER_HOST: "host", pb.ADAPTER_TIER_DEVICE: "device"}


class Served:
    """The engine (two device slots, its own metrics), its gRPC server and an HTTP shim over it."""

    def __init__(self, base: Path, root: Path) -> None:
        config = ServerConfig(
            model=str(base),
            device="cpu",
            engine=EngineConfig(max_running=4, max_queue=16, max_model_len=256, max_batched_tokens=64),
            adapters=AdapterConfig(roots=(str(root),), max_slots=2, max_rank=8),
        )
        self.metrics = Metrics(process_metrics=False)
        self.engine = build_engine(config, self.metrics)
        self.metrics.watch(self.engine.snapshot)
        self.engine.start()
        self.grpc = ServerThread(self.engine)
        self.http = HttpServer(create_app(self.grpc.target), "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.grpc._call(self.http.start())}"
        self.base_id = base.name

    def close(self) -> None:
        self.grpc._call(self.http.stop())
        self.grpc.close()
        self.engine.shutdown()


@pytest.fixture(scope="module")
def served(make_tiny_model: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    base = make_tiny_model(kind="llama", kv_heads=2, tied=False)
    root = tmp_path_factory.mktemp("tier-adapters")
    for seed, name in enumerate(("a", "b", "c")):
        _save_adapter(base, root / name, QV4, seed=seed)
    running = Served(base, root)
    yield running
    running.close()


@pytest.fixture()
def stub(served: Served) -> Iterator[pb_grpc.InferenceStub]:
    with grpc.insecure_channel(served.grpc.target) as channel:
        yield pb_grpc.InferenceStub(channel)


@pytest.fixture()
def client(served: Served) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=60) as client_:
        yield client_


def _cold(engine: Engine, *names: str) -> None:
    """Unload `names` (they stay in the root): host copy and device slot freed, on disk only."""
    assert engine.adapters is not None
    for name in names:
        engine.adapters.unload(name)
    listed = {status.name: status.tier for status in engine.adapters.list()}
    assert all(listed[name] == "disk" for name in names), listed


def _listed_tier(stub: pb_grpc.InferenceStub, names: tuple[str, ...]) -> str:
    """The oracle: the coldest tier ListAdapters shows for `names` ("" for none)."""
    listed = {
        info.name: _TIER_OF_PB[info.tier] for info in stub.ListAdapters(pb.ListAdaptersRequest()).adapters
    }
    tiers = [listed[name] for name in names]
    return min(tiers, key=("disk", "host", "device").index) if tiers else ""


def _run(engine: Engine, mixture: tuple[tuple[str, float], ...]) -> Collected:
    """Submit straight to the engine (not through gRPC); wait for the finished output."""
    given = RequestInput(PromptInput(token_ids=PROMPT), GREEDY, mixture=mixture)
    sink = Collected()
    sink.handle = engine.submit(RequestPreparer.for_engine(engine).prepare(given), sink)
    return sink.wait()


def _generate(stub: pb_grpc.InferenceStub, *names: str) -> pb.GenerateResponse:
    adapters = [pb.WeightedAdapter(name=name, weight=1.0) for name in names] if len(names) > 1 else []
    adapter = names[0] if len(names) == 1 else ""
    request = pb.GenerateRequest(
        token_ids=PROMPT, max_tokens=4, temperature=0.0, ignore_eos=True, adapter=adapter, adapters=adapters
    )
    response: pb.GenerateResponse = stub.Generate(request, timeout=60)
    assert response.completion_tokens == 4
    return response


# -- the engine ----------------------------------------------------------------------------


def test_engine_outputs_carry_the_tier_the_request_found(served: Served) -> None:
    engine = served.engine
    _cold(engine, "a", "b", "c")
    scenario = [("a",), ("a",), ("b",), ("c",), ("a",), (), ("a", "b"), ("a", "b")]
    found = []
    with grpc.insecure_channel(served.grpc.target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        for names in scenario:
            listed = _listed_tier(stub, names)
            outputs = _run(engine, tuple((name, 1.0) for name in names)).outputs
            assert outputs[-1].completion_tokens == 4
            assert {output.adapter_tier for output in outputs} == {listed}, names  # on every output
            found.append(listed)
    # a cold; a in its slot; b and c cold, c takes a's slot (least recently used); a in host memory
    # (it takes b's slot); the base model; the mixture of a (device) and b (host), then both in slots.
    assert found == ["disk", "device", "disk", "disk", "host", "", "host", "device"]


# -- gRPC ----------------------------------------------------------------------------------


def test_grpc_answers_say_disk_then_device_then_host(served: Served, stub: pb_grpc.InferenceStub) -> None:
    _cold(served.engine, "a", "b", "c")
    # The service reads a cold adapter into host memory before it submits: the answer must still
    # say what the request found, "disk".
    assert _generate(stub, "a").adapter_tier == "disk"
    stream = stub.GenerateStream(
        pb.GenerateRequest(token_ids=PROMPT, max_tokens=4, temperature=0.0, ignore_eos=True, adapter="a"),
        timeout=60,
    )
    chunks = list(stream)
    assert chunks[-1].finished and len(chunks) >= 2
    assert [chunk.adapter_tier for chunk in chunks] == ["device"] * len(chunks)  # on every chunk
    assert _generate(stub, "b").adapter_tier == "disk"
    assert _generate(stub, "c").adapter_tier == "disk"  # takes a's slot
    assert _listed_tier(stub, ("a",)) == "host"
    assert _generate(stub, "a").adapter_tier == "host"
    assert _generate(stub).adapter_tier == ""  # the base model
    assert _generate(stub, "a", "b").adapter_tier == "host"  # a mixture: its coldest (b)
    assert _generate(stub, "a", "b").adapter_tier == "device"
    stub.UnloadAdapter(pb.UnloadAdapterRequest(name="b"))
    assert _generate(stub, "a", "b").adapter_tier == "disk"


def test_metrics_count_requests_by_tier(served: Served, stub: pb_grpc.InferenceStub) -> None:
    def counts() -> dict[str, float]:
        samples = scrape_text(served.metrics.exposition().decode())
        return {
            tier: value(samples, "loramux_requests_by_tier_total", tier=tier)
            for tier in ("disk", "host", "device")
        }

    _cold(served.engine, "a", "b", "c")
    before = counts()
    for names in [("a",), ("a",), ("b",), ("c",), ("a",), ()]:
        _generate(stub, *names)
    after = counts()
    # The base-model request is counted by no tier.
    assert {tier: after[tier] - before[tier] for tier in after} == {"disk": 3, "host": 1, "device": 1}


# -- the OpenAI shim -----------------------------------------------------------------------


def test_http_answers_carry_the_adapter_tier(served: Served, client: openai.OpenAI) -> None:
    _cold(served.engine, "a")
    cold = client.completions.create(model="a", prompt=TEXT, **HTTP_GREEDY)
    assert cold.model_extra is not None and cold.model_extra["adapter_tier"] == "disk"
    assert cold.to_dict()["adapter_tier"] == "disk"
    chat = client.chat.completions.create(
        model="a", messages=[{"role": "user", "content": TEXT}], **HTTP_GREEDY
    )
    assert chat.to_dict()["adapter_tier"] == "device"
    base = client.completions.create(model=served.base_id, prompt=TEXT, **HTTP_GREEDY)
    assert "adapter_tier" not in base.to_dict()  # the base model: absent, as `routing` is without "auto"
    base_chat = client.chat.completions.create(
        model=served.base_id, messages=[{"role": "user", "content": TEXT}], **HTTP_GREEDY
    )
    assert "adapter_tier" not in base_chat.to_dict()


def test_http_streams_carry_the_tier_on_the_first_event_only(served: Served, client: openai.OpenAI) -> None:
    _cold(served.engine, "a")
    chunks = list(
        client.chat.completions.create(
            model="a", messages=[{"role": "user", "content": TEXT}], stream=True, **HTTP_GREEDY
        )
    )
    assert len(chunks) >= 2
    assert chunks[0].to_dict()["adapter_tier"] == "disk"
    assert all("adapter_tier" not in chunk.to_dict() for chunk in chunks[1:])
    pieces = list(client.completions.create(model="a", prompt=TEXT, stream=True, **HTTP_GREEDY))
    assert pieces[0].to_dict()["adapter_tier"] == "device"
    assert all("adapter_tier" not in piece.to_dict() for piece in pieces[1:])
    base = list(client.completions.create(model=served.base_id, prompt=TEXT, stream=True, **HTTP_GREEDY))
    assert all("adapter_tier" not in piece.to_dict() for piece in base)


def test_http_choices_answer_their_coldest_tier(served: Served, client: openai.OpenAI) -> None:
    _cold(served.engine, "a")
    # Two choices are two requests: whichever is prepared first finds "a" on disk.
    answer = client.completions.create(model="a", prompt=TEXT, n=2, **HTTP_GREEDY)
    assert len(answer.choices) == 2 and answer.to_dict()["adapter_tier"] == "disk"


def test_openapi_documents_the_adapter_tier(served: Served) -> None:
    schema = httpx.get(served.url + "/openapi.json", timeout=30).json()["components"]["schemas"]
    for name in ("CompletionResponse", "ChatCompletionResponse"):  # streamed events are not in the schema
        description = schema[name]["properties"]["adapter_tier"]["description"]
        assert "device" in description and "disk" in description, json.dumps(schema[name])
