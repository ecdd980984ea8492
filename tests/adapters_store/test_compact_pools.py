"""MosSlotPool and CompeftSlotPool: what they accept, what a slot costs, and that their terms equal a
LoRA pool holding the same adapters materialized (`lora_weights()`).

The model is the toy stand-in of test_device_slots.py (per layer one adapted linear per fused
group). The compact pools run the kernels' torch references with the torch backend (fast, the
bulk of the cases) and the Triton kernels with the triton backend (interpreted on CPU: one small
step, since the interpreter costs ~25 ms per program instance).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from adapters_store import (
    AdapterError,
    BaseModelSpec,
    CompeftAdapter,
    LoadedAdapter,
    LoraAdapter,
    LoraWeights,
    ModuleKey,
    MosAdapter,
    TernaryFactors,
)
from adapters_store.compact_pools import CompeftSlotPool, MosSlotPool
from adapters_store.device_slots import DeviceSlots
from adapters_store.slot_pools import LoraSlotPool
from kernels import LoraBackend, TorchBackend, select_backend
from tests.adapters_store.test_device_slots import FUSED, ToyModel
from tests.kernels.lora_cases import interpreting

SPEC = BaseModelSpec.llama(
    num_layers=2, hidden_size=16, intermediate_size=24, q_size=16, kv_size=8, max_rank=16
)
ALL = tuple(SPEC.features)


@dataclass(frozen=True, eq=False)
class SignsAdapter(CompeftAdapter):
    """A ComPEFT adapter whose host form is simply its decoded signs (the file formats live elsewhere)."""

    factors: Mapping[ModuleKey, TernaryFactors]

    def ternary(self) -> Mapping[ModuleKey, TernaryFactors]:
        return self.factors


def mos_adapter(
    name: str,
    rank: int,
    shards: int,
    pool_rank: int,
    projections: tuple[str, ...] = ALL,
    seed: int = 0,
    skip: tuple[ModuleKey, ...] = (),
    spec: BaseModelSpec = SPEC,
) -> MosAdapter:
    """Pools of N = pool_rank * L * l rows per projection, random tables; `skip` leaves modules out."""
    g = torch.Generator().manual_seed(seed)
    rows = pool_rank * spec.num_layers * shards
    pools = {
        p: (
            torch.randn(rows, spec.features[p][0] // shards, generator=g) * 0.3,
            torch.randn(rows, spec.features[p][1] // shards, generator=g) * 0.3,
        )
        for p in projections
    }
    indices = {
        (layer, p): (
            torch.randint(0, rows, (rank * shards,), generator=g),
            torch.randint(0, rows, (rank * shards,), generator=g),
        )
        for layer in range(spec.num_layers)
        for p in projections
        if (layer, p) not in skip
    }
    return MosAdapter(
        name=name,
        format="mos",
        source=Path(f"/adapters/{name}"),
        checksum=f"sha256:mos{seed}",
        nbytes=sum(a.numel() * 4 + b.numel() * 4 for a, b in pools.values()),
        rank=rank,
        target_modules=projections,
        r=rank,
        shards_per_vector=shards,
        lora_alpha=2.0 * rank,
        pools=pools,
        indices=indices,
    )


def compeft_adapter(
    name: str,
    rank: int,
    projections: tuple[str, ...] = ALL,
    seed: int = 0,
    gamma: float = 0.3,
    spec: BaseModelSpec = SPEC,
) -> SignsAdapter:
    g = torch.Generator().manual_seed(seed)

    def signs(*shape: int) -> torch.Tensor:
        keep = torch.rand(*shape, generator=g) < 0.3
        return (torch.randint(0, 2, shape, generator=g) * 2 - 1).mul(keep).to(torch.int8)

    factors = {
        (layer, p): TernaryFactors(
            sign_A=signs(rank, spec.features[p][0]), sign_B=signs(spec.features[p][1], rank), scale=2.0 / rank
        )
        for layer in range(spec.num_layers)
        for p in projections
    }
    return SignsAdapter(
        name=name,
        format="compeft",
        source=Path(f"/adapters/{name}"),
        checksum=f"sha256:compeft{seed}",
        nbytes=sum(f.sign_A.numel() + f.sign_B.numel() for f in factors.values()) // 4,
        rank=rank,
        target_modules=projections,
        gamma=gamma,
        density=0.3,
        factors=factors,
    )


def lora_adapter(name: str, rank: int, seed: int, spec: BaseModelSpec = SPEC) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    modules = {
        (layer, p): LoraWeights(
            A=torch.randn(rank, spec.features[p][0], generator=g) * 0.3,
            B=torch.randn(spec.features[p][1], rank, generator=g) * 0.3,
            scale=0.5,
        )
        for layer in range(spec.num_layers)
        for p in ALL
    }
    return LoraAdapter(
        name=name,
        format="peft-lora",
        source=Path(f"/adapters/{name}"),
        checksum=f"sha256:lora{seed}",
        nbytes=sum(w.nbytes for w in modules.values()),
        rank=rank,
        target_modules=ALL,
        modules=modules,
    )


def compact_slots(backend: LoraBackend, slots: int = 3) -> DeviceSlots:
    """[LoRA rank <= 16, MoS, ComPEFT] as the server builds them for the triton backend."""
    return DeviceSlots(
        [
            LoraSlotPool(SPEC, FUSED, slots, backend, "cpu"),
            MosSlotPool(SPEC, FUSED, slots, backend, "cpu", max_shards=4),
            CompeftSlotPool(SPEC, FUSED, slots, backend, "cpu"),
        ]
    )


def lora_slots(backend: LoraBackend, slots: int = 9) -> DeviceSlots:
    return DeviceSlots([LoraSlotPool(SPEC, FUSED, slots, backend, "cpu")])


ADAPTERS: dict[str, LoadedAdapter] = {
    "mos": mos_adapter("mos", rank=8, shards=2, pool_rank=2, seed=1),
    "mos-q-up": mos_adapter(
        "mos-q-up",
        rank=5,
        shards=4,
        pool_rank=1,
        projections=("q_proj", "up_proj"),
        seed=2,
        skip=((1, "q_proj"),),
    ),
    "compeft": compeft_adapter("compeft", rank=8, seed=3),
    "compeft-kv": compeft_adapter(
        "compeft-kv", rank=3, projections=("k_proj", "v_proj", "down_proj"), seed=4
    ),
    "lora": lora_adapter("lora", rank=4, seed=5),
}
STEP = [  # (adapter, weight) pairs per token: single adapters, mixtures across pools, no adapter
    [("mos", 1.0)],
    [("compeft", 1.0), ("lora", 0.5)],
    [],
    [("mos-q-up", 0.7), ("compeft-kv", 1.3), ("mos", -0.4)],
    [("lora", 1.0)],
    [("compeft", 1.0)],
]


def run_model(
    slots: DeviceSlots, names: list[str], steps: list[list[tuple[str, float]]]
) -> list[torch.Tensor]:
    """Load `names`, run one step of every toy linear; outputs per linear."""
    model = ToyModel()
    slots.attach(model)
    slot_of = {}
    for name in names:
        slot = slots.acquire(slots.prepare(ADAPTERS[name]))
        assert slot is not None
        slot_of[name] = slot
    step = slots.step([[(slot_of[n], w) for n, w in pairs] for pairs in steps], "cpu")
    g = torch.Generator().manual_seed(7)
    outputs = []
    for linear in model.linears:
        x = torch.randn(len(steps), linear.weight.shape[1], generator=g)
        outputs.append(linear(x, step))
    return outputs


def assert_same(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_compressed_adapters_go_to_their_compact_pools() -> None:
    slots = compact_slots(TorchBackend())
    lora, mos, compeft = slots.pools
    assert mos.slot_nbytes < lora.slot_nbytes and compeft.slot_nbytes < lora.slot_nbytes
    assert compeft.slot_nbytes * 4 < lora.slot_nbytes  # 2 bits a weight vs fp32
    assert {name: slots.prepare(a).pool for name, a in ADAPTERS.items()} == {
        "mos": 1,
        "mos-q-up": 1,
        "compeft": 2,
        "compeft-kv": 2,
        "lora": 0,
    }


def test_pools_refuse_other_formats_and_what_does_not_fit() -> None:
    mos = MosSlotPool(SPEC, FUSED, 2, TorchBackend(), "cpu", max_rank=8, max_pool_rank=2, max_shards=4)
    compeft = CompeftSlotPool(SPEC, FUSED, 2, TorchBackend(), "cpu", max_rank=8)
    assert "only MoS adapters" in str(mos.refusal(ADAPTERS["lora"]))
    assert "only MoS adapters" in str(mos.refusal(ADAPTERS["compeft"]))
    assert "only ComPEFT adapters" in str(compeft.refusal(ADAPTERS["mos"]))
    assert mos.accepts(ADAPTERS["mos"]) and compeft.accepts(ADAPTERS["compeft"])
    assert "rank 9 exceeds" in str(mos.refusal(mos_adapter("m", rank=9, shards=2, pool_rank=1)))
    assert "shards_per_vector 8 is not in 1..4" in str(
        mos.refusal(mos_adapter("m", rank=4, shards=8, pool_rank=1))
    )
    assert "capacity" in str(mos.refusal(mos_adapter("m", rank=4, shards=2, pool_rank=3)))
    assert "rank 9 exceeds" in str(compeft.refusal(compeft_adapter("c", rank=9)))


def test_a_compressed_adapter_the_compact_pool_refuses_is_materialized_into_a_lora_slot() -> None:
    big = mos_adapter("big", rank=8, shards=2, pool_rank=12, seed=9)  # pools beyond the MoS capacity
    backend = TorchBackend()
    slots = compact_slots(backend)
    ADAPTERS["big"] = big
    try:
        assert slots.prepare(big).pool == 0
        steps = [[("big", 1.0)], [("mos", 1.0)], [("big", 0.5), ("mos", 0.5)]]
        assert_same(
            run_model(slots, ["big", "mos"], steps), run_model(lora_slots(backend), ["big", "mos"], steps)
        )
    finally:
        del ADAPTERS["big"]
    tiny = DeviceSlots(
        [
            LoraSlotPool(SPEC, FUSED, 1, backend, "cpu", max_rank=2),
            MosSlotPool(SPEC, FUSED, 1, backend, "cpu", max_rank=4),
        ]
    )
    with pytest.raises(AdapterError, match="lora pool 0: rank 8 exceeds .*mos pool 1: .*rank 8 exceeds"):
        tiny.prepare(ADAPTERS["mos"])


@pytest.mark.parametrize("strategy", ["segments", "gather"])
def test_terms_equal_a_lora_pool_with_the_materialized_adapters(strategy: str) -> None:
    backend = TorchBackend(strategy)  # type: ignore[arg-type]
    names = list(ADAPTERS)
    assert_same(run_model(compact_slots(backend), names, STEP), run_model(lora_slots(backend), names, STEP))


@pytest.mark.skipif(not interpreting(), reason="Triton on CPU needs TRITON_INTERPRET=1")
def test_triton_terms_equal_a_lora_pool_with_the_materialized_adapters() -> None:
    steps = STEP[:4]  # small grids: the interpreter is slow
    names = list(ADAPTERS)
    got = run_model(compact_slots(select_backend("cpu", "triton")), names, steps)
    assert_same(got, run_model(lora_slots(TorchBackend()), names, steps))


def test_refill_and_clear_leave_nothing_behind() -> None:
    """A slot reused by a smaller adapter (fewer rows, other l, lower rank) computes only the new one;
    a cleared slot adds nothing."""
    backend = TorchBackend()
    mos = MosSlotPool(SPEC, FUSED, 1, backend, "cpu")
    compeft = CompeftSlotPool(SPEC, FUSED, 1, backend, "cpu")
    for pool, first, second in (
        (mos, ADAPTERS["mos"], ADAPTERS["mos-q-up"]),
        (compeft, ADAPTERS["compeft"], ADAPTERS["compeft-kv"]),
    ):
        slots = DeviceSlots([pool])
        model = ToyModel()
        slots.attach(model)
        pool.fill(0, pool.prepare(first))
        pool.fill(0, pool.prepare(second))
        step = slots.step([[(0, 1.0)], []], "cpu")
        fresh = DeviceSlots([LoraSlotPool(SPEC, FUSED, 1, backend, "cpu")])
        reference = ToyModel()
        fresh.attach(reference)
        fresh.pools[0].fill(0, fresh.pools[0].prepare(second))
        fresh_step = fresh.step([[(0, 1.0)], []], "cpu")
        g = torch.Generator().manual_seed(1)
        for linear, expected in zip(model.linears, reference.linears, strict=True):
            x = torch.randn(2, linear.weight.shape[1], generator=g)
            torch.testing.assert_close(linear(x, step), expected(x, fresh_step), rtol=1e-4, atol=1e-4)
        pool.clear(0)
        for linear in model.linears:
            x = torch.randn(2, linear.weight.shape[1], generator=g)
            torch.testing.assert_close(linear(x, step), linear(x, None))


def test_prepare_refuses_malformed_compact_forms() -> None:
    mos = MosSlotPool(SPEC, FUSED, 1, TorchBackend(), "cpu")
    good = ADAPTERS["mos"]
    assert isinstance(good, MosAdapter)
    rows = next(iter(good.pools.values()))[0].shape[0]
    indices = dict(good.indices)
    index_a, index_b = indices[1, "o_proj"]
    indices[1, "o_proj"] = (index_a, index_b + rows)  # past the pool's rows
    bad = MosAdapter(**{**good.__dict__, "indices": indices})
    with pytest.raises(ValueError, match=r"'mos' o_proj: layer 1 projection 0: index_B out of the pool's"):
        mos.prepare(bad)
    compeft = CompeftSlotPool(SPEC, FUSED, 1, TorchBackend(), "cpu")
    adapter = compeft_adapter("c", rank=2, projections=("q_proj",))
    factors = dict(adapter.factors)
    f = factors[0, "q_proj"]
    factors[0, "q_proj"] = TernaryFactors(sign_A=f.sign_A * 2, sign_B=f.sign_B, scale=f.scale)
    with pytest.raises(ValueError, match="layer 0 q_proj: ternary signs must be -1, 0 or 1"):
        compeft.prepare(SignsAdapter(**{**adapter.__dict__, "factors": factors}))


def test_compeft_slot_images_equal_the_codes_written_projection_by_projection() -> None:
    """prepare packs a whole adapter into every stack's slot image at once (kernels.ternary's
    pack_ternary_words, then one gather by a plan cached per module layout); the slots must hold
    what TernaryStack.set_slot writes from each module packed alone: ranks below the pool's and
    above 16 (B rows of one and of two words), projections left out, two adapters of one layout
    (one plan, their own gammas), a refill over an occupied slot."""
    from kernels.ternary import pack_ternary

    spec = BaseModelSpec.llama(
        num_layers=2, hidden_size=48, intermediate_size=40, q_size=48, kv_size=16, max_rank=20
    )
    adapters = [
        compeft_adapter("low", rank=3, projections=("q_proj", "v_proj", "down_proj"), seed=1, spec=spec),
        compeft_adapter(
            "same-layout", rank=3, projections=("q_proj", "v_proj", "down_proj"), seed=2, spec=spec, gamma=0.7
        ),
        compeft_adapter("wide", rank=18, seed=3, spec=spec),
    ]
    imaged = CompeftSlotPool(spec, FUSED, 2, TorchBackend(), "cpu", max_rank=20)
    written = CompeftSlotPool(spec, FUSED, 2, TorchBackend(), "cpu", max_rank=20)
    for adapter in [*adapters, adapters[0]]:
        imaged.fill(1, imaged.prepare(adapter))
        factors = adapter.ternary()
        for (layer, group), stack in written._stacks.items():
            found = [factors.get((layer, p)) for p in group]
            stack.set_slot(
                1,
                [None if f is None else pack_ternary(f.sign_A) for f in found],
                [None if f is None else pack_ternary(f.sign_B) for f in found],
                [0.0 if f is None else f.scale * adapter.gamma**2 for f in found],
            )
        for key, stack in imaged._stacks.items():
            other = written._stacks[key]
            assert torch.equal(stack.codes_a, other.codes_a), (adapter.name, key)
            assert torch.equal(stack.codes_b_buffer, other.codes_b_buffer), (adapter.name, key)
            assert torch.equal(stack.scale, other.scale) and torch.equal(stack.slot_ranks, other.slot_ranks)
            assert stack.host_ranks == other.host_ranks
    assert len(imaged._plans) == 2  # "low" and "same-layout" share one
    assert int(imaged._stacks[0, FUSED[0]].codes_a[0].count_nonzero()) == 0  # slot 0 untouched
