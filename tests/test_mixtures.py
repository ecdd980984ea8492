"""Weighted adapter mixtures: one request runs `sum_i w_i * s_i * B_i A_i` through per-token
(slot, weight) pairs, nothing merged. The oracle is PEFT's `add_weighted_adapter(...,
combination_type="cat")`, which builds the same delta as one LoRA of concatenated rank."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from loramux.v1 import inference_pb2 as pb
from server.config import AdapterConfig, EngineConfig, ServerConfig
from server.engine.engine import Engine
from server.engine.request import FinishReason, SamplingParams
from server.preparation import RequestInput, RequestPreparer
from server.prompts import PromptInput
from server.runtime import build_engine
from tests.test_adapters_engine import ADAPTERS, _save_adapter
from tests.test_engine import Collected, wait_idle

MIXTURE = (("qv4", 0.7), ("rs8", 1.6))
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def setup(make_tiny_model: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base_dir = make_tiny_model(kind="llama", kv_heads=2, tied=False)
    root = tmp_path_factory.mktemp("mixture-root")
    for seed, name in enumerate(("qv4", "rs8", "all8")):
        _save_adapter(base_dir, root / name, ADAPTERS[name], seed + 20)
    return base_dir, root


@pytest.fixture(scope="module")
def peft_mix(setup: tuple[Path, Path]) -> Any:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir, root = setup
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), root / "qv4", adapter_name="qv4"
    )
    for name in ("rs8", "all8"):
        model.load_adapter(root / name, adapter_name=name)
    names, weights = zip(*MIXTURE, strict=True)
    model.add_weighted_adapter(list(names), list(weights), "mix", combination_type="cat")
    return model.eval()


def _start(setup: tuple[Path, Path], max_slots: int) -> Engine:
    base_dir, root = setup
    config = ServerConfig(
        model=str(base_dir),
        device="cpu",
        engine=EngineConfig(max_running=4, max_model_len=256, max_batched_tokens=64),
        adapters=AdapterConfig(roots=(str(root),), max_slots=max_slots, max_rank=8),
    )
    engine = build_engine(config)
    engine.start()
    return engine


@pytest.fixture(scope="module")
def engine(setup: tuple[Path, Path]) -> Any:
    engine_ = _start(setup, max_slots=3)
    yield engine_
    engine_.shutdown()


def _submit(engine: Engine, rid: str, prompt: list[int], adapter: str = "", mixture: Any = ()) -> Collected:
    given = RequestInput(PromptInput(token_ids=tuple(prompt)), GREEDY, rid, adapter, tuple(mixture))
    sink = Collected()
    sink.handle = engine.submit(RequestPreparer.for_engine(engine).prepare(given), sink)
    return sink


def _peft_greedy(model: Any, adapter: str, prompt: list[int]) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        if adapter:
            model.set_adapter(adapter)
            out = model.generate(input_ids=ids, max_new_tokens=12, do_sample=False)
        else:
            with model.disable_adapter():
                out = model.generate(input_ids=ids, max_new_tokens=12, do_sample=False)
    return out[0, len(prompt) :].tolist()


def test_a_mixture_in_a_mixed_batch_equals_pefts_cat_adapter(engine: Engine, peft_mix: Any) -> None:
    prompt = [17, 4, 250, 9, 33]
    sinks = {
        "mix": _submit(engine, "mix", prompt, mixture=MIXTURE),
        "all8": _submit(engine, "single", prompt, adapter="all8"),
        "": _submit(engine, "base", prompt),
        "mix-again": _submit(engine, "mix-2", [5, 6, 7, 8], mixture=MIXTURE),
    }
    assert sinks["mix"].wait().tokens == _peft_greedy(peft_mix, "mix", prompt)
    assert sinks["all8"].wait().tokens == _peft_greedy(peft_mix, "all8", prompt)
    assert sinks[""].wait().tokens == _peft_greedy(peft_mix, "", prompt)
    assert sinks["mix-again"].wait().tokens == _peft_greedy(peft_mix, "mix", [5, 6, 7, 8])
    assert all(s.reason is FinishReason.LENGTH for s in sinks.values())
    wait_idle(engine)
    assert engine.adapters is not None and engine.adapters.slots.stats().pinned == 0


def test_mixture_logits_equal_peft(engine: Engine, peft_mix: Any) -> None:
    from server.model.batch import StepBatch
    from server.model.kv_cache import KVCache

    manager = engine.adapters
    assert manager is not None
    ready = {name: manager.prefetch(name).result() for name in ("qv4", "rs8", "all8")}
    slot = {name: manager.slots.acquire(form) for name, form in ready.items()}
    try:
        rows = {"mix": [(slot["qv4"], 0.7), (slot["rs8"], 1.6)], "all8": [(slot["all8"], 1.0)], "": []}
        prompts = [[11, 12, 13, 14, 15, 16], [21, 22, 23, 24, 25, 26], [31, 32, 33, 34, 35, 36]]
        arch = engine.model.arch
        kv = KVCache(
            arch.num_layers, 3, arch.num_kv_heads, arch.head_dim, 64, torch.float32, torch.device("cpu")
        )
        pairs = [pair for row, p in zip(rows.values(), prompts, strict=True) for pair in [row] * len(p)]
        batch = StepBatch.build(
            [],
            [(i, 0, p, True) for i, p in enumerate(prompts)],
            torch.device("cpu"),
            manager.step_metadata(pairs, torch.device("cpu")),
        )
        ours = engine.model(batch, kv)
        names = [name or "__base__" for name in rows]
        with torch.no_grad():
            theirs = peft_mix(torch.tensor(prompts), adapter_names=names).logits[:, -1]
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    finally:
        for s in slot.values():
            assert s is not None
            manager.slots.release(s)


def test_a_mixture_needs_as_many_slots_as_adapters(setup: tuple[Path, Path]) -> None:
    engine = _start(setup, max_slots=1)
    try:
        failed = _submit(engine, "too-many", [1, 2, 3], mixture=MIXTURE).wait()
        assert failed.reason is FinishReason.ERROR and "1 device slots" in (failed.outputs[-1].error or "")
        assert _submit(engine, "fine", [1, 2, 3], adapter="qv4").wait().reason is FinishReason.LENGTH
    finally:
        engine.shutdown()


def test_mixtures_over_grpc_name_their_adapters(engine: Engine) -> None:
    from loramux.v1 import inference_pb2_grpc as pb_grpc
    from tests.test_grpc_service import ServerThread

    server = ServerThread(engine)
    try:
        stub = pb_grpc.InferenceStub(grpc.insecure_channel(server.target))
        request = pb.GenerateRequest(
            token_ids=[17, 4, 250, 9, 33],
            max_tokens=12,
            temperature=0.0,
            ignore_eos=True,
            adapters=[pb.WeightedAdapter(name=n, weight=w) for n, w in MIXTURE],
        )
        answer = stub.Generate(request, timeout=60)
    finally:
        server.close()
    assert answer.adapter == "qv4+rs8"
    expected = _submit(engine, "direct", [17, 4, 250, 9, 33], mixture=MIXTURE).wait().tokens
    assert list(answer.token_ids) == expected
