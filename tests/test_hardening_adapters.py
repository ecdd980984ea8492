"""Issue 9 (hardening), adapter half, over a live gRPC server: a bad adapter is refused quickly
with INVALID_ARGUMENT (never INTERNAL) while other clients and gRPC health keep answering, a
refused adapter is answered from memory, files replaced on disk are served fresh (or refused,
never stale), and ListAdapters shows sources relative to their adapter root.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from adapters_store import store as store_module
from loramux.v1 import inference_pb2 as pb
from loramux.v1 import inference_pb2_grpc as pb_grpc
from server.engine.engine import Engine
from tests.adapters_store.adapter_cases import edit_config, rewrite_weights
from tests.conftest import start_adapter_engine
from tests.test_adapters_engine import _save_adapter
from tests.test_grpc_service import ServerThread

PROMPT = [17, 300, 42, 901, 5, 77, 1200]
QV4: dict[str, Any] = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
Q_KEY = "base_model.model.model.layers.0.self_attn.q_proj"

# name -> how its copy of a good adapter is broken
BROKEN: dict[str, Any] = {
    "regex": lambda d: edit_config(d, target_modules=r"model\.layers\.0(?:.|.|.)*Q" * 3),
    "backref": lambda d: edit_config(d, target_modules=r"(q)\1_proj"),
    "digits": lambda d: _replace_in_config(d, '"r": 4', '"r": ' + "9" * 5000),
    "nested": lambda d: _replace_in_config(d, '"r": 4', '"r": 4, "deep": ' + "[" * 200_000 + "]" * 200_000),
    "huge-a": lambda d: rewrite_weights(
        d, lambda t: t[f"{Q_KEY}.lora_A.weight"].view(-1).__setitem__(0, 3e38)
    ),
    "huge-b": lambda d: rewrite_weights(
        d, lambda t: t[f"{Q_KEY}.lora_B.weight"].view(-1).__setitem__(0, 1e30)
    ),
    "alpha": lambda d: edit_config(d, lora_alpha=1e37),
    "long-layer": lambda d: rewrite_weights(
        d,
        lambda t: t.__setitem__(
            Q_KEY.replace("layers.0", "layers." + "7" * 5000) + ".lora_A.weight",
            t[f"{Q_KEY}.lora_A.weight"].clone(),
        ),
    ),
}


def _replace_in_config(directory: Path, old: str, new: str) -> None:
    path = directory / "adapter_config.json"
    text = json.dumps(json.loads(path.read_text()))
    assert old in text
    path.write_text(text.replace(old, new))


@pytest.fixture(scope="module")
def dirs(make_tiny_model: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = make_tiny_model(kind="llama", kv_heads=2, tied=False)
    top = tmp_path_factory.mktemp("hardening")
    root, spare = top / "root", top / "spare"
    _save_adapter(base, root / "good", QV4, seed=1)
    _save_adapter(base, spare / "other", QV4, seed=2)
    _save_adapter(base, root / "team" / "sub", QV4, seed=3)
    for name, breaks in BROKEN.items():
        shutil.copytree(root / "good", root / name)
        breaks(root / name)
    return {"base": base, "root": root, "spare": spare}


@pytest.fixture(scope="module")
def engine(dirs: dict[str, Path]) -> Iterator[Engine]:
    engine_ = start_adapter_engine(dirs["base"], dirs["root"])
    yield engine_
    engine_.shutdown()


@pytest.fixture(scope="module")
def server(engine: Engine) -> Iterator[ServerThread]:
    running = ServerThread(engine)
    yield running
    running.close()


@pytest.fixture()
def stub(server: ServerThread) -> Iterator[pb_grpc.InferenceStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.InferenceStub(channel)


def _greedy(adapter: str = "", max_tokens: int = 6) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        token_ids=PROMPT, max_tokens=max_tokens, temperature=0.0, ignore_eos=True, adapter=adapter
    )


def _tokens(stub: pb_grpc.InferenceStub, adapter: str = "") -> list[int]:
    return list(stub.Generate(_greedy(adapter), timeout=60).token_ids)


def _refused(stub: pb_grpc.InferenceStub, adapter: str) -> tuple[grpc.RpcError, float]:
    started = time.perf_counter()
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(_greedy(adapter), timeout=60)
    return caught.value, time.perf_counter() - started


@pytest.mark.parametrize("name", list(BROKEN))
def test_a_bad_adapter_is_invalid_argument_quickly_while_others_are_served(
    server: ServerThread, stub: pb_grpc.InferenceStub, dirs: dict[str, Path], name: str
) -> None:
    answered: list[float] = []
    stop = threading.Event()

    def neighbour() -> None:  # another client: base-model generations and health checks, meanwhile
        with grpc.insecure_channel(server.target) as channel:
            other = pb_grpc.InferenceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            while not stop.is_set():
                started = time.perf_counter()
                other.Generate(_greedy(max_tokens=2), timeout=10)
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
                assert status == health_pb2.HealthCheckResponse.SERVING
                answered.append(time.perf_counter() - started)

    thread = threading.Thread(target=neighbour, daemon=True)
    thread.start()
    try:
        for _ in range(2):  # the second time comes from the refusal cache
            error, seconds = _refused(stub, name)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
            assert seconds < 2.0
            details = error.details() or ""
            assert len(details) < 1000
            assert str(dirs["root"]) not in details
    finally:
        time.sleep(0.3)
        stop.set()
        thread.join(timeout=30)
    assert answered and max(answered) < 2.0


def test_a_refused_adapter_is_not_read_again_until_its_files_change(
    engine: Engine, stub: pb_grpc.InferenceStub, dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = dirs["root"] / "fixable"
    shutil.copytree(dirs["root"] / "good", directory)
    good_config = (directory / "adapter_config.json").read_text()
    edit_config(directory, lora_alpha=1e37)
    assert engine.adapters is not None
    store = engine.adapters.store
    reads: list[str] = []
    read = store._read
    monkeypatch.setattr(store, "_read", lambda name, *args: reads.append(name) or read(name, *args))
    for _ in range(3):
        assert _refused(stub, "fixable")[0].code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reads == ["fixable"] and "fixable" in store.refused_names()
    (directory / "adapter_config.json").write_text(good_config)
    assert _tokens(stub, "fixable") == _tokens(stub, "good")
    assert reads.count("fixable") == 2


def test_files_replaced_on_disk_are_served_fresh_never_stale(
    engine: Engine, stub: pb_grpc.InferenceStub, dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "FRESHNESS_CHECK_S", 0.0)
    root = dirs["root"]
    shutil.copytree(root / "good", root / "swap")
    shutil.copytree(dirs["spare"] / "other", root / "other")
    before = _tokens(stub, "swap")  # now in a device slot
    assert before == _tokens(stub, "good")
    other = _tokens(stub, "other")
    assert other != before
    replacement = root / "swap.new"
    shutil.copytree(dirs["spare"] / "other", replacement)
    shutil.rmtree(root / "swap")
    replacement.rename(root / "swap")
    assert _tokens(stub, "swap") == other  # the new weights, not the slot's old ones
    edit_config(root / "swap", r=2)  # broken now: its shapes say rank 4
    error, _ = _refused(stub, "swap")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "swap/adapter_model.safetensors" in (error.details() or "")


def test_list_adapters_shows_sources_relative_to_the_root(
    stub: pb_grpc.InferenceStub, dirs: dict[str, Path]
) -> None:
    stub.LoadAdapter(pb.LoadAdapterRequest(name="sub", path="team/sub"), timeout=60)
    listed = {info.name: info for info in stub.ListAdapters(pb.ListAdaptersRequest(), timeout=30).adapters}
    assert listed["good"].source == "good"
    assert listed["sub"].source == "team/sub"
    assert all(not info.source.startswith("/") for info in listed.values())


def test_a_10000_character_name_or_path_gets_a_bounded_message(stub: pb_grpc.InferenceStub) -> None:
    error, _ = _refused(stub, "n" * 10_000)
    assert error.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
    assert len(error.details() or "") < 1000
    with pytest.raises(grpc.RpcError) as caught:
        stub.LoadAdapter(pb.LoadAdapterRequest(name="x", path="p" * 10_000), timeout=30)
    assert caught.value.code() != grpc.StatusCode.INTERNAL
    assert len(caught.value.details() or "") < 1000
