"""LoRA, ComPEFT and MoS adapters and the base model in one batch: every request gets the logits it
gets alone, and those of PEFT running each adapter's materialized LoRA (`loramux export`), over the
four popularity patterns (max abs diff <= 1e-4, fp32). On CPU each compressed adapter is decoded
into a plain LoRA slot on the loader thread; the compact GPU slots are tests/adapters_store/
test_compact_*."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from adapters_store import MosLayout, load_adapter
from adapters_store.compeft import compress_compeft, save_compeft
from adapters_store.export import export_peft_lora
from adapters_store.spec import BaseModelSpec
from server.config import AdapterConfig, EngineConfig, ServerConfig
from server.engine.engine import Engine
from server.model.batch import DecodeSeq, StepBatch
from server.model.kv_cache import KVCache
from server.runtime import build_engine
from tests.adapters_store.mos_cases import random_mos
from tests.test_adapters_engine import _save_adapter

CPU = torch.device("cpu")
# the tiny Llama of tests/conftest.py: hidden 64, intermediate 112, 4 heads of 16, 2 kv heads
SPEC = BaseModelSpec.llama(
    num_layers=2, hidden_size=64, intermediate_size=112, q_size=64, kv_size=32, max_rank=8
)
NAMES = ("lora", "compeft", "mos")  # and "" = the base model


@pytest.fixture(scope="module")
def setup(make_tiny_model, tmp_path_factory) -> dict[str, Any]:
    base_dir = make_tiny_model(kind="llama", kv_heads=2, tied=False)
    root = tmp_path_factory.mktemp("formats-root")
    _save_adapter(base_dir, root / "lora", dict(r=4, lora_alpha=8, target_modules="all-linear"), seed=1)
    source = tmp_path_factory.mktemp("source") / "dense"
    _save_adapter(
        base_dir, source, dict(r=6, lora_alpha=6, target_modules=["q_proj", "v_proj", "down_proj"]), seed=2
    )
    codes = compress_compeft(load_adapter(source, SPEC, "dense"), density=0.2, alpha=3.0)
    save_compeft(codes, root / "compeft", base_model="tiny")
    random_mos(root / "mos", SPEC, MosLayout(r=4, R=3, shards=4, private_rank=0.5, num_layers=2), std=0.15)
    exported = tmp_path_factory.mktemp("exported")
    for name in NAMES:  # the oracle: each adapter as the dense PEFT LoRA it stands for
        export_peft_lora(load_adapter(root / name, SPEC, name), SPEC, exported / name)
    return {"base": base_dir, "root": root, "exported": exported}


@pytest.fixture(scope="module")
def peft_model(setup) -> Any:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(setup["base"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, setup["exported"] / NAMES[0], adapter_name=NAMES[0])
    for name in NAMES[1:]:
        model.load_adapter(setup["exported"] / name, adapter_name=name)
    return model.eval()


@pytest.fixture(scope="module")
def engine(setup):
    config = ServerConfig(
        model=str(setup["base"]),
        device="cpu",
        engine=EngineConfig(max_running=8, max_model_len=256, max_batched_tokens=64),
        adapters=AdapterConfig(roots=(str(setup["root"]),), max_slots=4, max_rank=8),
    )
    engine_ = build_engine(config)
    engine_.start()
    yield engine_
    engine_.shutdown()


def _popularity(kind: str, rows: int, rng: random.Random) -> list[str]:
    names = [*NAMES, ""]
    if kind == "distinct":
        return [names[i % len(names)] for i in range(rows)]
    if kind == "uniform":
        return [rng.choice(names) for _ in range(rows)]
    if kind == "zipf":
        return rng.choices(names, weights=[1 / (i + 1) ** 1.5 for i in range(len(names))], k=rows)
    return ["compeft"] * (rows - 1) + [""]  # identical, plus one base row


def _logits(engine: Engine, prompts: list[list[int]], slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Our model's prefill (all but the last token) and decode (the last) logits for these rows at
    once, on the engine's device and in its dtype, returned as fp32 on the CPU."""
    manager, model, arch = engine.adapters, engine.model, engine.model.arch
    assert manager is not None
    device, dtype = model.device, model.dtype
    kv = KVCache(arch.num_layers, len(prompts), arch.num_kv_heads, arch.head_dim, 64, dtype, device)

    def step(slot_ids: list[int]) -> Any:
        return manager.slots.step([[(s, 1.0)] if s >= 0 else [] for s in slot_ids], device)

    prefill_slots = [s for s, p in zip(slots, prompts, strict=True) for _ in p[:-1]]
    prefill = StepBatch.build(
        [], [(i, 0, p[:-1], True) for i, p in enumerate(prompts)], device, step(prefill_slots)
    )
    first = model(prefill, kv).float().cpu()
    decode = StepBatch.build(
        [DecodeSeq(i, len(p) - 1, p[-1]) for i, p in enumerate(prompts)], [], device, step(slots)
    )
    return first, model(decode, kv).float().cpu()


def batch_case(popularity: str, rows: int = 8) -> tuple[list[str], list[list[int]]]:
    """The adapter ('' = the base model) and prompt of each row of one batch, for a popularity pattern."""
    rng = random.Random(popularity)
    adapters = _popularity(popularity, rows, rng)
    return adapters, [[rng.randrange(5, 4000) for _ in range(7)] for _ in range(rows)]


@contextlib.contextmanager
def pinned(engine: Engine, adapters: list[str]) -> Iterator[list[int]]:
    """Each row's device slot (-1: the base model), its adapter loaded and pinned until the end."""
    manager = engine.adapters
    assert manager is not None
    ready = {name: manager.prefetch(name).result() for name in set(adapters) if name}
    slot_of = {name: manager.slots.acquire(r) for name, r in ready.items()}
    try:
        yield [slot_of.get(a, -1) for a in adapters]
    finally:
        for name in ready:
            manager.slots.release(slot_of[name])


@pytest.mark.parametrize("popularity", ["distinct", "uniform", "zipf", "identical"])
def test_one_batch_of_every_format_gives_each_request_its_logits_alone(
    engine: Engine, peft_model, popularity: str
) -> None:
    adapters, prompts = batch_case(popularity)
    rows = len(prompts)
    with pinned(engine, adapters) as slots:
        prefill, decode = _logits(engine, prompts, slots)
        names = [a or "__base__" for a in adapters]
        with torch.no_grad():
            theirs = peft_model(torch.tensor(prompts), adapter_names=names).logits
        torch.testing.assert_close(prefill, theirs[:, -2], atol=1e-4, rtol=0)
        torch.testing.assert_close(decode, theirs[:, -1], atol=1e-4, rtol=0)
        for row in range(rows):  # ... and each row equals itself run alone, through us and through PEFT
            alone_prefill, alone_decode = _logits(engine, [prompts[row]], [slots[row]])
            torch.testing.assert_close(decode[row], alone_decode[0], atol=1e-4, rtol=0)
            torch.testing.assert_close(prefill[row], alone_prefill[0], atol=1e-4, rtol=0)
            with torch.no_grad():
                alone = peft_model(torch.tensor([prompts[row]]), adapter_names=[names[row]]).logits[0, -1]
            torch.testing.assert_close(decode[row], alone, atol=1e-4, rtol=0)


def test_every_format_changes_the_output(engine: Engine) -> None:
    """Guards the test above: no adapter is a no-op, and no two are the same."""
    manager = engine.adapters
    assert manager is not None
    prompt = [[11, 22, 33, 44, 55]]
    ready = {name: manager.prefetch(name).result() for name in NAMES}
    slot_of = {name: manager.slots.acquire(r) for name, r in ready.items()}
    try:
        outputs = [_logits(engine, prompt, [slot_of.get(name, -1)])[1][0] for name in [*NAMES, ""]]
    finally:
        for name in ready:
            manager.slots.release(slot_of[name])
    for i in range(len(outputs)):
        for j in range(i + 1, len(outputs)):
            assert (outputs[i] - outputs[j]).abs().max() > 1e-2, (i, j)
