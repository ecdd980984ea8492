"""DeviceSlots over two LoRA pools of different max ranks in one model, against plain torch.

The model here is a toy stand-in for server.model (adapters_store never imports server): per layer
one adapted linear per fused projection group, y = x W^T + its pool terms. The reference is
computed from the adapters' own factors, x @ W^T + sum over a token's pairs of
w * scale * B (A x), without kernels, stacks or slots.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from adapters_store import AdapterError, BaseModelSpec, LoraAdapter, LoraWeights
from adapters_store.device_slots import DeviceSlots, DeviceStep, NotResident
from adapters_store.slot_pools import LoraSlotPool
from kernels import TorchBackend

SPEC = BaseModelSpec.llama(
    num_layers=2, hidden_size=16, intermediate_size=24, q_size=16, kv_size=8, max_rank=16
)
FUSED = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


class ToyLinear:
    def __init__(self, layer: int, projections: tuple[str, ...], generator: torch.Generator) -> None:
        self.layer = layer
        self.projections = projections
        in_features = SPEC.features[projections[0]][0]
        out = sum(SPEC.features[p][1] for p in projections)
        self.weight = torch.randn(out, in_features, generator=generator)
        self.adapter_terms: tuple[Any, ...] = ()

    def __call__(self, x: torch.Tensor, step: DeviceStep | None) -> torch.Tensor:
        y = x @ self.weight.T
        if step is not None:
            for term in self.adapter_terms:
                term(x, y, step)
        return y


class ToyModel:
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.linears = [ToyLinear(layer, group, g) for layer in range(SPEC.num_layers) for group in FUSED]

    def adapted_linears(self) -> list[tuple[int, ToyLinear]]:
        return [(linear.layer, linear) for linear in self.linears]


def lora_adapter(name: str, rank: int, projections: tuple[str, ...], seed: int) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    modules = {
        (layer, p): LoraWeights(
            A=torch.randn(rank, SPEC.features[p][0], generator=g) * 0.3,
            B=torch.randn(SPEC.features[p][1], rank, generator=g) * 0.3,
            scale=0.5 + 0.1 * seed,
        )
        for layer in range(SPEC.num_layers)
        for p in projections
    }
    return LoraAdapter(
        name=name,
        format="peft-lora",
        source=Path(f"/adapters/{name}"),
        checksum=f"sha256:{seed}",
        nbytes=sum(w.nbytes for w in modules.values()),
        rank=rank,
        target_modules=projections,
        modules=modules,
    )


ALL = tuple(SPEC.features)
ADAPTERS = {
    "r2": lora_adapter("r2", 2, ("q_proj", "v_proj", "down_proj"), 1),
    "r4": lora_adapter("r4", 4, ALL, 2),
    "r12": lora_adapter("r12", 12, ("k_proj", "o_proj", "gate_proj"), 3),
    "r16": lora_adapter("r16", 16, ALL, 4),
}


def two_pools(small_slots: int = 2, large_slots: int = 2, backend: Any = None) -> DeviceSlots:
    backend = backend or TorchBackend()
    return DeviceSlots(
        [
            LoraSlotPool(SPEC, FUSED, small_slots, backend, "cpu", max_rank=4),
            LoraSlotPool(SPEC, FUSED, large_slots, backend, "cpu", max_rank=16),
        ]
    )


def reference(
    linear: ToyLinear, x: torch.Tensor, pairs: list[list[tuple[LoraAdapter, float]]]
) -> torch.Tensor:
    y = x @ linear.weight.T
    for t, token_pairs in enumerate(pairs):
        offset = 0
        for p in linear.projections:
            width = SPEC.features[p][1]
            for adapter, weight in token_pairs:
                w = adapter.modules.get((linear.layer, p))
                if w is not None:
                    y[t, offset : offset + width] += weight * w.scale * (w.B @ (w.A @ x[t]))
            offset += width
    return y


@pytest.mark.parametrize("backend", ["auto", "segments", "gather"])
def test_two_pools_serve_mixtures_in_one_model(backend: str) -> None:
    slots = two_pools(backend=TorchBackend(backend))  # type: ignore[arg-type]
    model = ToyModel()
    slots.attach(model)
    ready = {name: slots.prepare(adapter) for name, adapter in ADAPTERS.items()}
    # The smallest max rank that fits: rank <= 4 in the rank-4 pool (global slots 0-1), others above.
    assert {name: r.pool for name, r in ready.items()} == {"r2": 0, "r4": 0, "r12": 1, "r16": 1}
    slot = {name: slots.acquire(r) for name, r in ready.items()}
    assert sorted(slot.values()) == [0, 1, 2, 3]  # type: ignore[type-var]
    names = [
        [("r2", 0.7), ("r12", 0.3)],
        [],
        [("r4", 1.0)],
        [("r16", 1.0), ("r2", -0.5), ("r4", 2.0)],
        [("r12", 1.0)],
        [("r4", 0.25), ("r16", 0.75)],
        [("r2", 1.0)],
    ]
    step = slots.step([[(slot[n], w) for n, w in pairs] for pairs in names], "cpu")  # type: ignore[misc]
    assert step is not None and all(s is not None for s in step.pools)
    x = torch.randn(len(names), 16, generator=torch.Generator().manual_seed(9))
    pairs = [[(ADAPTERS[n], w) for n, w in token] for token in names]
    for linear in model.linears:
        xi = x if linear.weight.shape[1] == 16 else torch.randn(len(names), linear.weight.shape[1])
        torch.testing.assert_close(linear(xi, step), reference(linear, xi, pairs), rtol=1e-4, atol=1e-4)


def test_a_step_in_one_pool_leaves_the_other_out() -> None:
    slots = two_pools()
    r2 = slots.acquire(slots.prepare(ADAPTERS["r2"]))
    step = slots.step([[(r2, 1.0)], []], "cpu")  # type: ignore[list-item]
    assert step is not None and step.pools[1] is None and step.pools[0] is not None
    assert slots.step([[], []], "cpu") is None  # base only: no metadata at all
    with pytest.raises(ValueError, match="slot 9 is not a device slot"):
        slots.step([[(9, 1.0)]], "cpu")


def test_adapter_too_large_for_every_pool_is_refused_with_the_reason() -> None:
    slots = two_pools()
    too_big = lora_adapter("big", 20, ("q_proj",), 5)
    with pytest.raises(AdapterError, match="rank 20 exceeds the pool's max rank 16"):
        slots.prepare(too_big)


def test_lru_pins_and_stale_slots_per_pool() -> None:
    slots = two_pools(small_slots=1, large_slots=1)
    r2, r4, r12 = (slots.prepare(ADAPTERS[n]) for n in ("r2", "r4", "r12"))
    s2 = slots.acquire(r2)
    assert s2 == 0 and slots.acquire(r4) is None  # the rank-4 pool's only slot is pinned
    assert slots.acquire(r12) == 1  # ... the other pool still has room
    assert slots.acquire(r2) == 0 and slots.stats().pinned == 2  # a resident adapter: no copy
    assert slots.stats().loads == 2
    slots.release(0)
    slots.release(0)
    assert slots.acquire(r4) == 0 and slots.stats().evictions == 1  # LRU within its pool
    slots.invalidate("r4")
    info = {i.name: i for i in slots.slots()}
    assert info["r4"].stale and info["r4"].pins == 1
    slots.release(0)  # last user gone: the stale slot is cleared
    assert [i.name for i in slots.slots()] == ["r12"]
    with pytest.raises(RuntimeError, match="released more often"):
        slots.release(0)


def test_resident_stands_in_for_prepare_only_while_a_current_slot_holds_that_version() -> None:
    slots = two_pools(small_slots=1, large_slots=1)
    assert slots.resident(ADAPTERS["r2"]) is None  # in no slot yet
    slot = slots.acquire(slots.prepare(ADAPTERS["r2"]))
    slots.release(slot)  # idle, still holding r2
    found = slots.resident(ADAPTERS["r2"])
    assert found is not None and found.form is None and found.pool == 0
    changed = lora_adapter("r2", 2, ("q_proj",), 7)  # same name, other weights: another version
    assert slots.resident(changed) is None
    loads = slots.stats().loads
    assert slots.acquire(found) == slot and slots.stats().loads == loads  # pinned, nothing copied
    slots.release(slot)
    slots.release(slots.acquire(slots.prepare(ADAPTERS["r4"])))  # takes the rank-4 pool's one slot
    with pytest.raises(NotResident, match="'r2' left its device slot"):
        slots.acquire(found)
    assert slots.stats().pinned == 0
    found = slots.resident(ADAPTERS["r4"])
    slots.invalidate("r4")  # unloaded: a stale slot is never handed out by key
    assert found is not None and slots.resident(ADAPTERS["r4"]) is None
    with pytest.raises(NotResident):
        slots.acquire(found)


class BlockingPool(LoraSlotPool):
    """A pool whose copy waits for a signal, to show what the lock does not hold up."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.copying = threading.Event()
        self.go = threading.Event()

    def fill(self, slot: int, form: Any) -> None:
        self.copying.set()
        assert self.go.wait(10)
        super().fill(slot, form)


def test_the_copy_runs_outside_the_lock() -> None:
    pool = BlockingPool(SPEC, FUSED, 2, TorchBackend(), "cpu", max_rank=16)
    slots = DeviceSlots([pool])
    ready = slots.prepare(ADAPTERS["r12"])
    result: list[int | None] = []
    engine = threading.Thread(target=lambda: result.append(slots.acquire(ready)))
    engine.start()
    assert pool.copying.wait(10)
    # While the engine thread copies, RPC threads list, count and unload without waiting.
    assert [i.name for i in slots.slots()] == ["r12"] and slots.stats().pinned == 1
    slots.invalidate("r12")  # unloaded mid-copy: the acquiring request keeps it, nobody else gets it
    pool.go.set()
    engine.join(10)
    assert result == [0]
    assert slots.slots()[0].stale
    slots.release(0)
    assert slots.slots() == [] and slots.acquire(slots.prepare(ADAPTERS["r12"])) == 0
