"""The adapter RPCs and adapter generation over a real grpc.aio server, with PEFT as the oracle.

A tiny random Llama engine with two device slots serves real PEFT LoRA adapters saved in a temp
adapter root; the tests drive it through sync stubs and the `loramux` CLI, as a client would.
Each test uses adapter names of its own, so the order they run in does not matter.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from loramux.v1 import inference_pb2 as pb
from loramux.v1 import inference_pb2_grpc as pb_grpc
from server import cli
from server.config import AdapterConfig
from server.engine.engine import Engine
from tests.conftest import start_adapter_engine
from tests.test_adapters_engine import _save_adapter
from tests.test_grpc_service import ServerThread, _wait_until

PROMPT = [17, 300, 42, 901, 5, 77, 1200]
NEW_TOKENS = 8
QV4: dict[str, Any] = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
ALL8: dict[str, Any] = dict(r=8, lora_alpha=16, target_modules="all-linear")
KO2: dict[str, Any] = dict(r=2, lora_alpha=4, target_modules=["k_proj", "o_proj"])


@pytest.fixture(scope="module")
def dirs(make_tiny_model: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """base model, adapter root (qv4, all8, listed, team/sub, corrupt, escape -> outside) and outside."""
    base = make_tiny_model(kind="llama", kv_heads=2, tied=False)
    top = tmp_path_factory.mktemp("grpc-adapters")
    root, outside = top / "root", top / "outside"
    _save_adapter(base, root / "qv4", QV4, seed=1)
    _save_adapter(base, root / "all8", ALL8, seed=2)
    _save_adapter(base, root / "listed", QV4, seed=3)
    _save_adapter(base, root / "team" / "sub", KO2, seed=4)  # not at the top: served only once loaded
    _save_adapter(base, outside / "evil", QV4, seed=5)
    (root / "escape").symlink_to(outside / "evil", target_is_directory=True)
    corrupt = root / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text((root / "qv4" / "adapter_config.json").read_text())
    (corrupt / "adapter_model.safetensors").write_bytes(
        (root / "qv4" / "adapter_model.safetensors").read_bytes()[:100]
    )
    return {"base": base, "root": root, "outside": outside}


@pytest.fixture(scope="module")
def peft_greedy(dirs: dict[str, Path]) -> Callable[[str | None], list[int]]:
    """peft_greedy(adapter dir relative to the root, or None for the base) -> PEFT's greedy tokens."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cache: dict[str | None, list[int]] = {}

    def greedy(relative: str | None) -> list[int]:
        if relative not in cache:
            model = AutoModelForCausalLM.from_pretrained(dirs["base"], dtype=torch.float32)
            if relative is not None:
                model = PeftModel.from_pretrained(model, dirs["root"] / relative)
            with torch.no_grad():
                out = model.eval().generate(
                    input_ids=torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, do_sample=False
                )
            cache[relative] = out[0, len(PROMPT) :].tolist()
        return cache[relative]

    return greedy


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


def _greedy(**fields: Any) -> pb.GenerateRequest:
    fields.setdefault("token_ids", PROMPT)
    return pb.GenerateRequest(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, **fields)


def _listed(stub: pb_grpc.InferenceStub) -> dict[str, pb.AdapterInfo]:
    return {info.name: info for info in stub.ListAdapters(pb.ListAdaptersRequest(), timeout=30).adapters}


def _refused(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def _slots_idle(engine: Engine) -> bool:
    return engine.adapters is not None and engine.adapters.slots.stats().pinned == 0


# -- generation ----------------------------------------------------------------------------


def test_generate_with_an_adapter_gives_pefts_greedy_tokens(
    stub: pb_grpc.InferenceStub, peft_greedy: Callable[[str | None], list[int]]
) -> None:
    base = stub.Generate(_greedy(), timeout=60)
    assert list(base.token_ids) == peft_greedy(None) and base.adapter == ""
    for name in ("qv4", "all8"):
        response = stub.Generate(_greedy(adapter=name), timeout=60)
        assert list(response.token_ids) == peft_greedy(name), name
        assert response.token_ids != base.token_ids
        assert response.adapter == name
        chunks = list(stub.GenerateStream(_greedy(adapter=name), timeout=60))
        assert [t for chunk in chunks for t in chunk.token_ids] == peft_greedy(name)
        assert {chunk.adapter for chunk in chunks} == {name}


def test_each_request_prepares_its_adapter_once_and_a_resident_one_not_at_all(
    stub: pb_grpc.InferenceStub,
    engine: Engine,
    dirs: dict[str, Path],
    peft_greedy: Callable[[str | None], list[int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The service loads a request's adapters before submitting it (to refuse a bad one with its
    # own status); the engine takes those loads over instead of starting its own.
    _save_adapter(dirs["base"], dirs["root"] / "once", KO2, seed=6)
    assert engine.adapters is not None
    slots = engine.adapters.slots
    prepared: list[str] = []
    prepare = slots.prepare

    def counted(adapter: Any) -> Any:
        prepared.append(adapter.name)
        return prepare(adapter)

    monkeypatch.setattr(slots, "prepare", counted)
    first = stub.Generate(_greedy(adapter="once"), timeout=60)
    assert list(first.token_ids) == peft_greedy("once") and prepared == ["once"]
    second = stub.Generate(_greedy(adapter="once"), timeout=60)  # in its device slot now
    assert list(second.token_ids) == peft_greedy("once") and prepared == ["once"]


def test_unknown_and_malformed_adapter_names_are_not_found(stub: pb_grpc.InferenceStub) -> None:
    stream = lambda request, timeout: list(stub.GenerateStream(request, timeout=timeout))  # noqa: E731
    for rpc in (stub.Generate, stream):
        error = _refused(lambda rpc=rpc: rpc(_greedy(adapter="no-such-lora"), timeout=30))
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert "adapter 'no-such-lora' is not loaded" in error.details()
        for malformed in ("../qv4", "team/sub", "-x"):
            error = _refused(lambda rpc=rpc, name=malformed: rpc(_greedy(adapter=name), timeout=30))
            assert error.code() == grpc.StatusCode.NOT_FOUND  # no adapter can have that name
            assert "not a valid adapter name" in error.details()


def test_auto_needs_a_router_and_a_mixture_needs_known_adapters(stub: pb_grpc.InferenceStub) -> None:
    error = _refused(lambda: stub.Generate(_greedy(adapter="auto"), timeout=30))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION  # this server runs without a router
    assert "the router is disabled on this server (started with --no-router)" in error.details()
    unknown = [pb.WeightedAdapter(name="qv4", weight=1.0), pb.WeightedAdapter(name="nope", weight=1.0)]
    assert _refused(lambda: stub.Generate(_greedy(adapters=unknown), timeout=30)).code() == (
        grpc.StatusCode.NOT_FOUND
    )


def test_a_corrupt_adapter_is_invalid_argument_before_generation(
    stub: pb_grpc.InferenceStub, engine: Engine
) -> None:
    for _ in range(2):  # the failed load is retried, and refused again
        error = _refused(lambda: stub.Generate(_greedy(adapter="corrupt"), timeout=30))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "corrupt" in error.details() and "not a valid safetensors file" in error.details()
    assert engine.stats().num_waiting == 0
    assert stub.Generate(_greedy(adapter="qv4"), timeout=60).completion_tokens == NEW_TOKENS


# -- ListAdapters --------------------------------------------------------------------------


def test_list_adapters_shows_tier_usage_and_shape(stub: pb_grpc.InferenceStub, engine: Engine) -> None:
    before = _listed(stub)
    assert {"qv4", "all8", "listed", "corrupt"} <= set(before)
    assert "escape" not in before and "team" not in before  # a symlink out of the root; no adapter
    assert list(before) == sorted(before)
    info = before["listed"]
    # not read yet: what its config says (format, rank, targets), no bytes in memory
    assert (info.tier, info.format, info.rank, info.bytes) == (
        pb.ADAPTER_TIER_DISK,
        pb.ADAPTER_FORMAT_PEFT_LORA,
        4,
        0,
    )
    assert list(info.target_modules) == ["q_proj", "v_proj"]
    assert (info.pinned, info.load_count, info.requests_served) == (False, 0, 0)

    for _ in range(2):
        stub.Generate(_greedy(adapter="listed"), timeout=60)
    assert _wait_until(lambda: _slots_idle(engine))
    info = _listed(stub)["listed"]
    assert info.tier == pb.ADAPTER_TIER_DEVICE
    assert info.format == pb.ADAPTER_FORMAT_PEFT_LORA
    assert info.rank == 4
    # q: A [4, 64] + B [64, 4], v: A [4, 64] + B [32, 4], fp32, two layers
    assert info.bytes == 2 * (4 * 64 + 64 * 4 + 4 * 64 + 32 * 4) * 4
    assert list(info.target_modules) == ["q_proj", "v_proj"]
    assert (info.pinned, info.load_count, info.requests_served) == (False, 1, 2)


# -- LoadAdapter / UnloadAdapter -----------------------------------------------------------


def test_load_a_subdirectory_under_another_name_then_generate(
    stub: pb_grpc.InferenceStub, dirs: dict[str, Path], peft_greedy: Callable[[str | None], list[int]]
) -> None:
    assert "sub" not in _listed(stub)  # below the top level of the root: not served until loaded
    loaded = stub.LoadAdapter(pb.LoadAdapterRequest(name="team-sub", path="team/sub"), timeout=60).adapter
    assert loaded.name == "team-sub"
    assert (loaded.format, loaded.rank, loaded.tier) == (pb.ADAPTER_FORMAT_PEFT_LORA, 2, pb.ADAPTER_TIER_HOST)
    assert list(loaded.target_modules) == ["k_proj", "o_proj"] and loaded.load_count == 1
    response = stub.Generate(_greedy(adapter="team-sub"), timeout=60)
    assert list(response.token_ids) == peft_greedy("team/sub")
    assert response.adapter == "team-sub"
    # An absolute path inside the root works too.
    absolute = str(dirs["root"] / "team" / "sub")
    also = stub.LoadAdapter(pb.LoadAdapterRequest(name="team-sub-abs", path=absolute), timeout=60)
    assert also.adapter.rank == 2
    assert {"team-sub", "team-sub-abs"} <= set(_listed(stub))


REFUSED_LOADS = [
    ("dotdot", dict(path="../outside/evil"), grpc.StatusCode.INVALID_ARGUMENT, "must not contain '..'"),
    ("absolute", dict(path="<outside>/evil"), grpc.StatusCode.INVALID_ARGUMENT, "outside the adapter roots"),
    ("symlink", dict(path="escape"), grpc.StatusCode.INVALID_ARGUMENT, "symlinks may not point out"),
    ("corrupt", dict(path="corrupt"), grpc.StatusCode.INVALID_ARGUMENT, "not a valid safetensors file"),
    ("missing", dict(path="nope"), grpc.StatusCode.NOT_FOUND, "does not exist in the adapter roots"),
    ("not-a-dir", dict(path="qv4/adapter_config.json"), grpc.StatusCode.INVALID_ARGUMENT, "not a directory"),
    ("bad-name", dict(name="a/b", path="qv4"), grpc.StatusCode.INVALID_ARGUMENT, "not a valid adapter name"),
    ("reserved", dict(name="auto", path="qv4"), grpc.StatusCode.INVALID_ARGUMENT, "reserved"),
    (
        "mos",
        dict(format=pb.ADAPTER_FORMAT_MOS),
        grpc.StatusCode.INVALID_ARGUMENT,
        "qv4 is not a mos adapter (no mos_config.json): it holds a peft-lora adapter",
    ),
    (
        "compeft",
        dict(format=pb.ADAPTER_FORMAT_COMPEFT),
        grpc.StatusCode.INVALID_ARGUMENT,
        "qv4 is not a compeft adapter (no compeft_config.json): it holds a peft-lora adapter",
    ),
    ("enum", dict(format=42), grpc.StatusCode.INVALID_ARGUMENT, "format 42"),
    ("pin", dict(pin=True), grpc.StatusCode.UNIMPLEMENTED, "pin is not supported yet"),
]


@pytest.mark.parametrize(
    ("case", "fields", "code", "message"), REFUSED_LOADS, ids=[c[0] for c in REFUSED_LOADS]
)
def test_load_refusals_say_what_is_wrong_and_change_nothing(
    stub: pb_grpc.InferenceStub,
    dirs: dict[str, Path],
    case: str,
    fields: dict[str, Any],
    code: grpc.StatusCode,
    message: str,
) -> None:
    fields = {"name": f"refused-{case}", "path": "qv4", **fields}
    fields["path"] = fields["path"].replace("<outside>", str(dirs["outside"]))
    error = _refused(lambda: stub.LoadAdapter(pb.LoadAdapterRequest(**fields), timeout=60))
    assert error.code() == code, error.details()
    assert message in error.details()
    assert not any(name.startswith("refused-") for name in _listed(stub))


def test_a_taken_name_needs_replace(
    stub: pb_grpc.InferenceStub, peft_greedy: Callable[[str | None], list[int]]
) -> None:
    load = lambda path, replace=False: stub.LoadAdapter(  # noqa: E731
        pb.LoadAdapterRequest(name="swap", path=path, replace=replace), timeout=60
    )
    load("qv4")
    assert list(stub.Generate(_greedy(adapter="swap"), timeout=60).token_ids) == peft_greedy("qv4")
    error = _refused(lambda: load("all8"))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "already registered" in error.details() and "replace" in error.details()
    load("qv4")  # the same directory again: nothing changes
    load("all8", replace=True)
    assert list(stub.Generate(_greedy(adapter="swap"), timeout=60).token_ids) == peft_greedy("all8")
    # A root adapter's name is taken by its directory.
    root_name = _refused(lambda: stub.LoadAdapter(pb.LoadAdapterRequest(name="qv4", path="all8"), timeout=60))
    assert root_name.code() == grpc.StatusCode.ALREADY_EXISTS


def test_unload_then_generate_is_not_found(stub: pb_grpc.InferenceStub, engine: Engine) -> None:
    stub.LoadAdapter(pb.LoadAdapterRequest(name="temp", path="qv4"), timeout=60)
    assert stub.Generate(_greedy(adapter="temp"), timeout=60).adapter == "temp"
    assert stub.UnloadAdapter(pb.UnloadAdapterRequest(name="temp"), timeout=60) == pb.UnloadAdapterResponse()
    error = _refused(lambda: stub.Generate(_greedy(adapter="temp"), timeout=30))
    assert error.code() == grpc.StatusCode.NOT_FOUND and "'temp' is not loaded" in error.details()
    assert "temp" not in _listed(stub)
    assert _wait_until(lambda: _slots_idle(engine))
    assert all(slot.name != "temp" for slot in engine.adapters.slots.slots())  # type: ignore[union-attr]
    again = _refused(lambda: stub.UnloadAdapter(pb.UnloadAdapterRequest(name="temp"), timeout=30))
    assert again.code() == grpc.StatusCode.NOT_FOUND


# -- CLI -----------------------------------------------------------------------------------


def test_cli_generate_with_an_adapter_prints_its_text(
    server: ServerThread, stub: pb_grpc.InferenceStub, capsys: pytest.CaptureFixture[str]
) -> None:
    chat = [pb.ChatMessage(role="user", content="Hi!")]
    expected = stub.Generate(
        pb.GenerateRequest(messages=chat, adapter="all8", temperature=0.0, max_tokens=6), timeout=60
    )
    base = stub.Generate(pb.GenerateRequest(messages=chat, temperature=0.0, max_tokens=6), timeout=60)
    assert expected.token_ids != base.token_ids
    argv = [
        "generate",
        "--target",
        server.target,
        "--prompt",
        "Hi!",
        "--max-tokens",
        "6",
        "--adapter",
        "all8",
    ]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out == expected.text + "\n" and captured.err == ""


def test_cli_adapters_load_list_unload(server: ServerThread, capsys: pytest.CaptureFixture[str]) -> None:
    target = ["--target", server.target]
    assert cli.main(["adapters", "load", "cli-sub", "team/sub", "--format", "peft-lora", *target]) == 0
    loaded = json.loads(capsys.readouterr().out)
    assert loaded["name"] == "cli-sub"
    assert (loaded["format"], loaded["rank"], loaded["tier"]) == ("peft-lora", 2, "host")

    assert cli.main(["adapters", "list", *target]) == 0
    listed = {entry["name"]: entry for entry in json.loads(capsys.readouterr().out)}
    assert listed["cli-sub"] == loaded
    assert set(listed["qv4"]) == {
        "name", "format", "rank", "bytes", "tier", "pinned", "load_count", "requests_served", "target_modules",
    }  # fmt: skip

    assert cli.main(["adapters", "unload", "cli-sub", *target]) == 0
    assert capsys.readouterr().out == "unloaded cli-sub\n"
    assert cli.main(["adapters", "unload", "cli-sub", *target]) == 1
    assert capsys.readouterr().err.startswith("error: NOT_FOUND: adapter 'cli-sub' is not loaded")
    assert cli.main(["adapters", "load", "x", "../outside/evil", *target]) == 1
    assert "error: INVALID_ARGUMENT: adapter path '../outside/evil'" in capsys.readouterr().err


def test_cli_serve_flags_make_the_adapter_config() -> None:
    argv = ["serve", "--adapter-root", "a", "--adapter-root", "b", "--max-slots", "3"]
    args = cli.build_parser().parse_args(
        [*argv, "--max-rank", "32", "--host-cache-mb", "64", "--max-adapter-mb", "16"]
    )
    assert cli.server_config(args).adapters == AdapterConfig(
        roots=("a", "b"), max_slots=3, max_rank=32, host_cache_mb=64, max_adapter_mb=16
    )
    defaults = cli.server_config(cli.build_parser().parse_args(["serve"])).adapters
    assert defaults == AdapterConfig()
    no_adapters = cli.build_parser().parse_args(["serve", "--max-slots", "0"])
    assert cli.server_config(no_adapters).adapters.max_slots == 0


def test_cli_serve_refuses_a_missing_adapter_root(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, dirs: dict[str, Path]
) -> None:
    argv = [
        "serve",
        "--model",
        str(dirs["base"]),
        "--grpc-port",
        "0",
        "--adapter-root",
        str(tmp_path / "nope"),
    ]
    assert cli.main(argv) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: adapter root") and "nope" in error and "is not a directory" in error


def test_a_cancelled_call_does_not_cancel_the_shared_adapter_load() -> None:
    """The engine waits on the same load future; a client that gives up must not cancel it."""
    import asyncio
    from concurrent.futures import Future

    from server.grpc_service import _wait_shared

    shared: Future[str] = Future()  # pending, as a load queued behind others on the loader thread

    async def give_up() -> None:
        waiting = asyncio.create_task(_wait_shared(shared))
        await asyncio.sleep(0.01)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting

    asyncio.run(give_up())
    assert not shared.cancelled()
    shared.set_result("loaded")
