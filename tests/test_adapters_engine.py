"""Many PEFT LoRA adapters served at once, with PEFT itself as the oracle: a mixed batch gives the
logits of PEFT's `adapter_names=` batch, greedy generation through the engine equals PEFT's
`generate`, adapters come and go while requests run, and no slot leaks."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from adapters_store import AdapterError, AdapterNotFound
from server.config import AdapterConfig, EngineConfig, ServerConfig
from server.engine.engine import Engine
from server.engine.request import FinishReason, SamplingParams
from server.model.batch import DecodeSeq, StepBatch
from server.model.kv_cache import KVCache
from server.runtime import build_engine
from tests.test_engine import chat_ids, submit, wait_idle

CPU = torch.device("cpu")
ADAPTERS: dict[str, dict[str, Any]] = {
    "qv4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "all8": dict(r=8, lora_alpha=16, target_modules="all-linear"),
    "rs8": dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["k_proj", "o_proj", "down_proj"]),
    "pattern": dict(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "gate_proj", "up_proj"],
        rank_pattern={"gate_proj": 2},
        alpha_pattern={"up_proj": 3},
    ),
}


def _save_adapter(base_dir: Path, target: Path, config: dict[str, Any], seed: int) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(**config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:  # PEFT starts B at zero; make every adapter really change the output
                param.copy_(torch.randn(param.shape, generator=generator) * 0.15)
    peft_model.save_pretrained(target)


@pytest.fixture(scope="module")
def setup(make_tiny_model, tmp_path_factory) -> tuple[Path, Path]:
    base_dir = make_tiny_model(kind="llama", kv_heads=2, tied=False)
    root = tmp_path_factory.mktemp("adapter-root")
    for seed, (name, config) in enumerate(ADAPTERS.items()):
        _save_adapter(base_dir, root / name, config, seed)
    return base_dir, root


@pytest.fixture(scope="module")
def peft_model(setup) -> Any:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir, root = setup
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    names = list(ADAPTERS)
    model = PeftModel.from_pretrained(base, root / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(root / name, adapter_name=name)
    return model.eval()


def _engine(setup, max_slots: int = 4, **engine: Any) -> Engine:
    base_dir, root = setup
    config = ServerConfig(
        model=str(base_dir),
        device="cpu",
        engine=EngineConfig(**{"max_running": 8, "max_model_len": 256, "max_batched_tokens": 64, **engine}),
        adapters=AdapterConfig(roots=(str(root),), max_slots=max_slots, max_rank=8),
    )
    engine_ = build_engine(config)
    engine_.start()
    return engine_


@pytest.fixture(scope="module")
def engine(setup):
    engine_ = _engine(setup)
    yield engine_
    engine_.shutdown()


def _popularity(kind: str, rows: int, rng: random.Random) -> list[str]:
    """Adapter per row ('' = base model) for the four popularity patterns of the kernels' tests."""
    names = list(ADAPTERS)
    if kind == "distinct":
        return [(names + [""])[i % (len(names) + 1)] for i in range(rows)]
    if kind == "uniform":
        return [rng.choice(names[:2] + [""]) for _ in range(rows)]
    if kind == "zipf":
        weights = [1 / (i + 1) ** 1.5 for i in range(len(names) + 1)]
        return rng.choices(names + [""], weights=weights, k=rows)
    return [names[1]] * (rows - 1) + [""]  # identical, plus one base row


@pytest.mark.parametrize("popularity", ["distinct", "uniform", "zipf", "identical"])
def test_mixed_batch_logits_equal_peft_adapter_names(engine: Engine, peft_model, popularity: str) -> None:
    """One step mixes prefill chunks of different adapters, the next decodes them all at once."""
    rng = random.Random(popularity)
    rows = 7
    adapters = _popularity(popularity, rows, rng)
    prompts = [[rng.randrange(5, 4000) for _ in range(9)] for _ in range(rows)]
    manager = engine.adapters
    assert manager is not None
    loaded = {name: manager.prefetch(name).result() for name in set(adapters) if name}
    slot_of = {name: manager.slots.acquire(ready) for name, ready in loaded.items()}
    slot_of[""] = -1
    try:
        model, arch = engine.model, engine.model.arch
        kv = KVCache(arch.num_layers, rows, arch.num_kv_heads, arch.head_dim, 64, torch.float32, CPU)
        slots = [slot_of[a] for a in adapters]
        prefill = StepBatch.build(
            [],
            [(i, 0, p[:-1], True) for i, p in enumerate(prompts)],
            CPU,
            _adapter_step(manager, [s for s, p in zip(slots, prompts, strict=True) for _ in p[:-1]]),
        )
        ours_prefill = model(prefill, kv)
        decode = StepBatch.build(
            [DecodeSeq(i, len(p) - 1, p[-1]) for i, p in enumerate(prompts)],
            [],
            CPU,
            _adapter_step(manager, slots),
        )
        ours_decode = model(decode, kv)
        names = [a or "__base__" for a in adapters]
        with torch.no_grad():
            theirs = peft_model(torch.tensor(prompts), adapter_names=names).logits
        torch.testing.assert_close(ours_prefill, theirs[:, -2], atol=1e-4, rtol=0)
        torch.testing.assert_close(ours_decode, theirs[:, -1], atol=1e-4, rtol=0)
        # ... and each row equals its adapter run alone
        for row, name in enumerate(names):
            with torch.no_grad():
                alone = peft_model(torch.tensor([prompts[row]]), adapter_names=[name]).logits[0, -1]
            torch.testing.assert_close(ours_decode[row], alone, atol=1e-4, rtol=0)
    finally:
        for name in loaded:
            manager.slots.release(slot_of[name])


def _adapter_step(manager: Any, slot_ids: list[int]) -> Any:
    """The step's adapter metadata as the engine builds it: one (slot, 1.0) pair per adapted token."""
    return manager.slots.step([[(s, 1.0)] if s >= 0 else [] for s in slot_ids], CPU)


def test_two_slot_pools_in_one_model_equal_peft(setup, peft_model) -> None:
    """A rank-4 and a rank-8 LoRA pool in one model: each adapter lands in the smallest pool it fits,
    and a step mixing adapters of both pools gives PEFT's `adapter_names=` logits."""
    from server.model.loader import load_model
    from server.runtime import build_adapters

    base_dir, root = setup
    model = load_model(str(base_dir), CPU, torch.float32, 64).model
    arch = model.arch
    manager = build_adapters(model, AdapterConfig(roots=(str(root),), max_rank=8, pools=((4, 2), (8, 2))))
    assert manager is not None
    slots, store = manager.slots, manager.store
    ready = {name: slots.prepare(store.get(name)) for name in ADAPTERS}
    assert {name: r.pool for name, r in ready.items()} == {"qv4": 0, "all8": 1, "rs8": 1, "pattern": 0}
    slot_of = {name: slots.acquire(r) for name, r in ready.items()}
    assert sorted(slot_of.values()) == [0, 1, 2, 3]  # type: ignore[type-var]

    adapters = [*ADAPTERS, "", "all8", "qv4"]
    rng = random.Random(7)
    prompts = [[rng.randrange(5, 4000) for _ in range(6)] for _ in adapters]
    kv = KVCache(arch.num_layers, len(adapters), arch.num_kv_heads, arch.head_dim, 64, torch.float32, CPU)
    pairs = [[(slot_of[a], 1.0)] if a else [] for a in adapters]
    prefill = StepBatch.build(
        [],
        [(i, 0, p, True) for i, p in enumerate(prompts)],
        CPU,
        slots.step([token for token, p in zip(pairs, prompts, strict=True) for _ in p], CPU),
    )
    ours = model(prefill, kv)
    with torch.no_grad():
        theirs = peft_model(torch.tensor(prompts), adapter_names=[a or "__base__" for a in adapters]).logits
    torch.testing.assert_close(ours, theirs[:, -1], atol=1e-4, rtol=0)
    manager.shutdown()


def test_adapter_config_pools(setup) -> None:
    """AdapterConfig.pools: several LoRA pools from the config; default one pool of max_rank."""
    from server.model.loader import load_model
    from server.runtime import build_adapters

    with pytest.raises(ValueError, match="each slot pool needs"):
        AdapterConfig(max_rank=8, pools=((16, 2),))
    assert AdapterConfig(max_rank=8, max_slots=3).pool_shapes == ((8, 3),)
    assert AdapterConfig(max_slots=0, pools=((4, 2),)).pool_shapes == ()
    base_dir, root = setup
    model = load_model(str(base_dir), CPU, torch.float32, 64).model
    manager = build_adapters(model, AdapterConfig(roots=(str(root),), max_rank=8, pools=((4, 2), (8, 1))))
    assert manager is not None
    assert [pool.max_rank for pool in manager.slots.pools] == [4, 8]  # type: ignore[attr-defined]
    assert manager.slots.num_slots == 3 and manager.slots.offsets == (0, 2)
    assert manager.store.max_adapter_bytes == 1024 << 20  # default: the whole host cache
    manager.shutdown()
    capped = build_adapters(model, AdapterConfig(roots=(str(root),), max_rank=8, max_adapter_mb=2))
    assert capped is not None and capped.store.max_adapter_bytes == 2 << 20
    capped.shutdown()


def _peft_greedy(peft_model, adapter: str, prompt: list[int], new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        if adapter:
            peft_model.set_adapter(adapter)
            out = peft_model.generate(input_ids=ids, max_new_tokens=new_tokens, do_sample=False)
        else:
            with peft_model.disable_adapter():
                out = peft_model.generate(input_ids=ids, max_new_tokens=new_tokens, do_sample=False)
    return out[0, len(prompt) :].tolist()


GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def test_greedy_generation_through_the_engine_equals_peft_generate(engine: Engine, peft_model) -> None:
    prompt = [17, 300, 42, 901, 5, 77, 1200]
    requests = [*ADAPTERS, "", "all8", "qv4"]  # all at once, some adapters twice, one base-only
    sinks = [submit(engine, f"gen-{i}", prompt, GREEDY, adapter=name) for i, name in enumerate(requests)]
    for name, sink in zip(requests, sinks, strict=True):
        assert sink.wait().tokens == _peft_greedy(peft_model, name, prompt, 12), name
    wait_idle(engine)


def test_more_adapters_than_slots_all_complete_correctly(setup, peft_model) -> None:
    engine = _engine(setup, max_slots=2)
    try:
        prompt = [9, 8, 7, 6, 5, 4]
        names = [*ADAPTERS, *ADAPTERS, "", *reversed(ADAPTERS)]
        sinks = [submit(engine, f"many-{i}", prompt, GREEDY, adapter=n) for i, n in enumerate(names)]
        expected = {n: _peft_greedy(peft_model, n, prompt, 12) for n in set(names)}
        for name, sink in zip(names, sinks, strict=True):
            assert sink.wait().tokens == expected[name], name
        wait_idle(engine)
        assert engine.adapters is not None
        stats = engine.adapters.slots.stats()
        assert stats.pinned == 0 and stats.evictions > 0
    finally:
        engine.shutdown()


def test_unknown_and_malformed_adapter_names_are_refused_at_submit(engine: Engine) -> None:
    with pytest.raises(AdapterNotFound, match="not loaded"):
        submit(engine, "x1", [1, 2, 3], GREEDY, adapter="nope")
    with pytest.raises(AdapterError):
        submit(engine, "x2", [1, 2, 3], GREEDY, adapter="../escape")


def test_a_corrupt_adapter_fails_its_requests_and_the_engine_keeps_serving(
    setup, peft_model, tmp_path
) -> None:
    base_dir, root = setup
    bad = root / "corrupt"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((root / "qv4" / "adapter_config.json").read_text())
    (bad / "adapter_model.safetensors").write_bytes(
        (root / "qv4" / "adapter_model.safetensors").read_bytes()[:100]
    )
    engine = _engine(setup)
    try:
        failed = submit(engine, "bad", [1, 2, 3], GREEDY, adapter="corrupt").wait()
        assert failed.reason == FinishReason.ERROR and "corrupt" in (failed.outputs[-1].error or "")
        good = submit(engine, "good", [1, 2, 3], GREEDY, adapter="qv4").wait()
        assert good.tokens == _peft_greedy(peft_model, "qv4", [1, 2, 3], 12)
        wait_idle(engine)
    finally:
        engine.shutdown()
        for file in bad.iterdir():
            file.unlink()
        bad.rmdir()


def test_load_unload_reload_while_requests_run(setup, peft_model, tmp_path) -> None:
    engine = _engine(setup, max_slots=2)
    manager = engine.adapters
    assert manager is not None
    base_dir, root = setup
    try:
        prompt = [3, 1, 4, 1, 5, 9, 2, 6]
        long = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
        running = submit(engine, "long", prompt, long, adapter="all8")
        while not running.outputs:
            time.sleep(0.005)
        # register another name for a root adapter, use it, unload it while `long` keeps running
        manager.load("alias", "rs8")
        aliased = submit(engine, "alias-1", prompt, GREEDY, adapter="alias").wait()
        assert aliased.tokens == _peft_greedy(peft_model, "rs8", prompt, 12)
        manager.unload("alias")
        with pytest.raises(AdapterNotFound):
            submit(engine, "alias-2", prompt, GREEDY, adapter="alias")
        manager.unload("all8")  # in use by `long`: its slot is freed when `long` ends
        expected = _peft_greedy(peft_model, "all8", prompt, 40)
        assert running.wait().tokens == expected
        # a root adapter comes back on its next request
        again = submit(engine, "again", prompt, GREEDY, adapter="all8").wait()
        assert again.tokens == expected[:12]
        wait_idle(engine)
        assert engine.adapters.slots.stats().pinned == 0
    finally:
        engine.shutdown()


def test_thousands_of_adapter_requests_leak_no_slot(setup) -> None:
    engine = _engine(setup, max_slots=2, max_running=4, max_queue=64)
    try:
        names = [*ADAPTERS, ""]
        sinks = []
        for i in range(1000):
            while True:
                try:
                    sinks.append(
                        submit(
                            engine,
                            f"n{i}",
                            [i % 90 + 5, 7],
                            SamplingParams(max_tokens=2, temperature=0.0),
                            adapter=names[i % 5],
                        )
                    )
                    break
                except Exception as exc:  # queue full: back off
                    assert "queue is full" in str(exc)
                    time.sleep(0.01)
            if i % 9 == 0:
                engine.abort(sinks[-1].handle)
        for sink in sinks:
            sink.wait()
        wait_idle(engine)
        assert engine.adapters is not None
        assert engine.adapters.slots.stats().pinned == 0
        assert engine.scheduler.num_running == 0
    finally:
        engine.shutdown()


def test_smollm2_with_an_adapter_equals_peft(smollm2_dir, tokenizer, tmp_path) -> None:
    """The same oracle on the real default model: a mixed adapter/base batch and greedy decoding."""
    from peft import PeftModel

    root = tmp_path / "roots"
    _save_adapter(smollm2_dir, root / "smol", dict(r=4, lora_alpha=8, target_modules="all-linear"), seed=11)
    from transformers import AutoModelForCausalLM

    peft = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32),
        root / "smol",
        adapter_name="smol",
    ).eval()
    config = ServerConfig(
        device="cpu",
        engine=EngineConfig(max_running=4, max_model_len=256, max_batched_tokens=64),
        adapters=AdapterConfig(roots=(str(root),), max_slots=2, max_rank=8),
    )
    engine = build_engine(config)
    engine.start()
    try:
        prompt = chat_ids(tokenizer, "Name a primary color.")
        with_adapter = submit(engine, "smol-a", prompt, GREEDY, adapter="smol")
        base = submit(engine, "smol-b", prompt, GREEDY)
        assert with_adapter.wait().tokens == _peft_greedy(peft, "smol", prompt, 12)
        assert base.wait().tokens == _peft_greedy(peft, "", prompt, 12)
        assert with_adapter.tokens != base.tokens  # the adapter really changes the output
    finally:
        engine.shutdown()


class _Prepares:
    """Counts DeviceSlots.prepare per adapter name (wrapping the engine's own)."""

    def __init__(self, engine: Engine) -> None:
        assert engine.adapters is not None
        self.slots = engine.adapters.slots
        self.counts: dict[str, int] = {}
        prepare = self.slots.prepare

        def counted(adapter: Any) -> Any:
            self.counts[adapter.name] = self.counts.get(adapter.name, 0) + 1
            return prepare(adapter)

        self.slots.prepare = counted  # type: ignore[method-assign]


def _hold_the_kv_slot(engine: Engine, prompt: list[int]) -> Any:
    """A base-model request running to the context length (abort it to free its KV slot)."""
    params = SamplingParams(max_tokens=engine.info.max_model_len - len(prompt), ignore_eos=True)
    base = submit(engine, "base", prompt, params)
    while not base.outputs:
        time.sleep(0.005)
    return base


def _wait_for_loads(waiting: list[Any], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not all(s.handle.loads_done for s in waiting) and time.monotonic() < deadline:
        time.sleep(0.005)


def test_an_adapter_in_a_device_slot_is_not_prepared_again(setup, peft_model) -> None:
    engine = _engine(setup, max_slots=2)
    try:
        prepares = _Prepares(engine)
        prompt = [11, 12, 13, 14]
        expected = _peft_greedy(peft_model, "all8", prompt, 12)
        for i in range(3):
            assert submit(engine, f"again-{i}", prompt, GREEDY, adapter="all8").wait().tokens == expected
        wait_idle(engine)
        stats = engine.adapters.slots.stats() if engine.adapters else None
        assert prepares.counts == {"all8": 1}  # its form was decoded once, for the first request
        assert stats is not None and stats.loads == 1 and stats.pinned == 0
    finally:
        engine.shutdown()


def test_a_slot_taken_between_load_and_admission_prepares_the_form_again(setup, peft_model) -> None:
    # One device slot, one running request. qv4 sits in the slot; a long base-model request holds
    # the only KV slot while requests for all8 and then qv4 arrive: qv4's load finds it in its slot
    # (no form), then all8 is admitted first and takes that slot. qv4's request must be prepared
    # again on the loader and still get PEFT's answer, not fail and not stall.
    engine = _engine(setup, max_slots=1, max_running=1, max_model_len=4096)
    try:
        prepares = _Prepares(engine)
        prompt = [21, 22, 23, 24, 25]
        expected = {n: _peft_greedy(peft_model, n, prompt, 12) for n in ("qv4", "all8")}
        assert submit(engine, "first", prompt, GREEDY, adapter="qv4").wait().tokens == expected["qv4"]
        base = _hold_the_kv_slot(engine, prompt)
        other = submit(engine, "other", prompt, GREEDY, adapter="all8")
        lates = [submit(engine, f"late-{i}", prompt, GREEDY, adapter="qv4") for i in range(3)]
        _wait_for_loads([other, *lates])
        assert all(late.handle.adapter_loads[0].result().form is None for late in lates)  # in its slot
        assert not base.done.is_set()  # so none was admitted yet
        engine.abort(base.handle)
        assert other.wait().tokens == expected["all8"]
        assert all(late.wait().tokens == expected["qv4"] for late in lates)
        wait_idle(engine)
        # the three share their fresh preparation (a thread switch can split it once; apart: 1 + 3)
        assert prepares.counts["all8"] == 1 and prepares.counts["qv4"] in (2, 3)
        assert engine.adapters is not None and engine.adapters.slots.stats().pinned == 0
    finally:
        engine.shutdown()


def test_a_load_replaced_before_admission_serves_the_new_weights(setup, peft_model) -> None:
    # A request's form is ready but it waits for a KV slot; meanwhile its adapter is replaced
    # (LoadAdapter --replace). It must run the new weights, prepared afresh on the loader.
    engine = _engine(setup, max_slots=2, max_running=1, max_model_len=4096)
    manager = engine.adapters
    assert manager is not None
    try:
        prompt = [31, 32, 33, 34]
        manager.load("alias", "rs8")
        base = _hold_the_kv_slot(engine, prompt)
        waiting = submit(engine, "waiting", prompt, GREEDY, adapter="alias")
        _wait_for_loads([waiting])
        assert waiting.handle.adapter_loads[0].result().form is not None  # prepared, not admitted
        manager.load("alias", "qv4", replace=True)
        engine.abort(base.handle)
        assert waiting.wait().tokens == _peft_greedy(peft_model, "qv4", prompt, 12)
        assert submit(engine, "after", prompt, GREEDY, adapter="alias").wait().tokens == waiting.tokens
        wait_idle(engine)
        stale = [info for info in manager.slots.slots() if info.name == "alias" and not info.stale]
        assert len(stale) == 1  # only the new version's slot is current
        assert manager.slots.stats().pinned == 0
    finally:
        engine.shutdown()
