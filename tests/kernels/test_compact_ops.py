"""MoS and ternary kernels against their torch references, and the references against dense math.

The kernels (interpreted on CPU, compiled on CUDA under the `gpu` marker) are swept over adapter
popularity (distinct | uniform | zipf | identical), odd token counts, mixed ranks in one stack (an
empty slot included), tokens without adapter, fused q|k|v-like unequal slices and mixture weights.
MoS slots mix shards_per_vector (1, 2, 4), pool sizes and unadapted (layer, projection)s. The
references are checked against an independent dense computation from the host tensors the slots
were filled from: `scale * (x @ A.T) @ B.T` with A and B materialized by plain indexing.
Grids stay small: the interpreter costs ~25 ms per program instance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from kernels import AdapterBatch, AdapterStep
from kernels.mos import MosStack, mos_add, mos_expand, mos_expand_ref, mos_shrink, mos_shrink_ref
from kernels.ternary import (
    TernaryStack,
    pack_ternary,
    pack_ternary_words,
    ternary_add,
    ternary_expand,
    ternary_expand_ref,
    ternary_shrink,
    ternary_shrink_ref,
    unpack_ternary,
)
from tests.kernels.lora_cases import MIXED_RANKS, NUM_SLOTS, POPULARITIES, interpreting, slot_ids_for

DEVICES = [
    pytest.param(
        "cpu",
        id="interpreted",
        marks=pytest.mark.skipif(not interpreting(), reason="Triton on CPU needs TRITON_INTERPRET=1"),
    ),
    pytest.param(
        "cuda",
        id="cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")],
    ),
]
TOKEN_COUNTS = (1, 7, 13)
IN_FEATURES, SLICES, MAX_RANK, LAYERS = 40, (24, 8, 8), 8, 2
SHARDS = (1, 2, 4)  # per slot: all divide 40, 24 and 8
TOL = {"rtol": 1e-4, "atol": 1e-4}


@dataclass
class TernaryCase:
    stack: TernaryStack
    signs: dict[int, tuple[list[torch.Tensor | None], list[torch.Tensor | None], list[float]]]


def ternary_case(device: str, seed: int = 0) -> TernaryCase:
    """Every slot of NUM_SLOTS filled with sparse random signs of mixed ranks (rank 0 = empty)."""
    g = torch.Generator().manual_seed(seed)
    stack = TernaryStack.empty(NUM_SLOTS, MAX_RANK, IN_FEATURES, SLICES, device=device)
    signs: dict[int, tuple[list[torch.Tensor | None], list[torch.Tensor | None], list[float]]] = {}

    def random_signs(*shape: int) -> torch.Tensor:
        keep = torch.rand(*shape, generator=g) < 0.4
        return (torch.randint(0, 2, shape, generator=g) * 2 - 1).mul(keep).to(torch.int8)

    for slot in range(NUM_SLOTS):
        rank = MIXED_RANKS[slot % len(MIXED_RANKS)]
        if rank == 0:
            continue
        a: list[torch.Tensor | None] = [random_signs(rank, IN_FEATURES) for _ in SLICES]
        b: list[torch.Tensor | None] = [random_signs(width, rank) for width in SLICES]
        if slot % 7 == 3:  # does not adapt projection 1
            a[1] = b[1] = None
        scales = [0.02 * (1 + p) + 0.001 * slot for p in range(len(SLICES))]
        signs[slot] = (a, b, scales)
        stack.set_slot(
            slot,
            [None if t is None else pack_ternary(t).to(device) for t in a],
            [None if t is None else pack_ternary(t).to(device) for t in b],
            scales,
        )
    return TernaryCase(stack, signs)


ModuleTables = tuple[torch.Tensor, torch.Tensor]
Pools = list[tuple[torch.Tensor, torch.Tensor] | None]
# per projection pools or None, per layer per projection tables or None, r, l, scale
MosParts = tuple[Pools, list[list[ModuleTables | None]], int, int, float]


@dataclass
class MosCase:
    stack: MosStack
    adapters: dict[int, MosParts]  # by slot


def mos_case(device: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> MosCase:
    """Every slot filled with a random MoS adapter: mixed r (0 = empty), l and pool rows per slot."""
    g = torch.Generator().manual_seed(seed)
    stack = MosStack.empty(
        NUM_SLOTS,
        LAYERS,
        IN_FEATURES,
        SLICES,
        max_rank=MAX_RANK,
        max_shards=4,
        capacity_a=3 * 12 * IN_FEATURES,
        capacity_b=12 * sum(SLICES),
        dtype=dtype,
        device=device,
    )
    adapters: dict[int, MosParts] = {}
    for slot in range(NUM_SLOTS):
        rank = MIXED_RANKS[slot % len(MIXED_RANKS)]
        if rank == 0:
            continue
        shards = SHARDS[slot % len(SHARDS)]
        rows = 3 + slot % 7
        pools: Pools = [
            (
                torch.randn(rows, IN_FEATURES // shards, generator=g) * IN_FEATURES**-0.5,
                torch.randn(rows, width // shards, generator=g) * 0.5,
            )
            for width in SLICES
        ]
        if slot % 7 == 3:  # does not adapt projection 1
            pools[1] = None
        tables: list[list[ModuleTables | None]] = [
            [
                None
                if pair is None or (layer == 1 and p == 2 and slot % 2)  # some layers leave v out
                else (
                    torch.randint(0, rows, (rank * shards,), generator=g),
                    torch.randint(0, rows, (rank * shards,), generator=g),
                )
                for p, pair in enumerate(pools)
            ]
            for layer in range(LAYERS)
        ]
        scale = 2.0 / rank + 0.01 * slot
        pools_dtype: Pools = [
            None if pair is None else (pair[0].to(dtype), pair[1].to(dtype)) for pair in pools
        ]
        stack.set_slot(slot, stack.slot_data(pools_dtype, tables, num_shards=shards, rank=rank, scale=scale))
        adapters[slot] = (pools_dtype, tables, rank, shards, scale)
    return MosCase(stack, adapters)


def inputs(
    num_tokens: int, device: str, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(num_tokens)
    x = torch.randn(num_tokens, IN_FEATURES, generator=g).to(device, dtype)
    y = torch.randn(num_tokens, sum(SLICES), generator=g).to(device, dtype)
    return x, y


def mixture_pairs(num_tokens: int, seed: int = 3) -> list[list[tuple[int, float]]]:
    """Per token 0-3 (slot, weight) pairs (some tokens without adapter)."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(num_tokens):
        k = int(torch.randint(0, 4, (1,), generator=g))
        slots = torch.randperm(NUM_SLOTS, generator=g)[:k].tolist()
        pairs.append([(s, float(torch.rand(1, generator=g)) * 2 - 0.5) for s in slots])
    return pairs


# ---- ternary -------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [1, 15, 16, 17, 40, 64])
def test_ternary_codes_round_trip(length: int) -> None:
    signs = torch.randint(-1, 2, (3, length), generator=torch.Generator().manual_seed(length)).to(torch.int8)
    words = pack_ternary(signs)
    assert words.dtype == torch.int32 and words.shape == (3, -(-length // 16))
    assert torch.equal(unpack_ternary(words, length), signs)
    minus_ones = pack_ternary(torch.full((16,), -1, dtype=torch.int8))
    assert int(minus_ones) == -1  # 0b11 sixteen times: every bit set, top bit read as int32's sign
    with pytest.raises(ValueError, match="-1, 0 or 1"):
        pack_ternary(torch.tensor([0, 2], dtype=torch.int8))


def test_matrices_packed_in_one_pass_equal_each_packed_alone() -> None:
    """Rows of any length (whole words, padded, shorter than a word, empty), matrices at any offset
    with other signs between them, in any number: the words pack_ternary gives each."""
    generator = torch.Generator().manual_seed(3)

    def signs(*shape: int) -> torch.Tensor:
        return torch.randint(-1, 2, shape, generator=generator).to(torch.int8)

    lengths = [0, 1, 3, 15, 16, 17, 31, 32, 33, 100, 576]
    for trial in range(30):
        matrices, parts, layout, offset = [], [], [], 0
        for i in range(1 + trial % 8):
            gap = signs(int(torch.randint(0, 5, (), generator=generator)))
            m = signs(
                int(torch.randint(0, 9, (), generator=generator)), lengths[(trial + 3 * i) % len(lengths)]
            )
            layout.append((offset + gap.numel(), *m.shape))
            parts += [gap, m.reshape(-1)]
            offset += gap.numel() + m.numel()
            matrices.append(m)
        words, firsts = pack_ternary_words(torch.cat(parts), layout)
        assert words.dtype == np.int32
        for first, m in zip(firsts, matrices, strict=True):
            count = m.shape[0] * -(-m.shape[1] // 16)
            mine = torch.from_numpy(words[first : first + count]).view(m.shape[0], -(-m.shape[1] // 16))
            assert torch.equal(mine, pack_ternary(m)), (trial, tuple(m.shape))
        assert words.size == sum(m.shape[0] * -(-m.shape[1] // 16) for m in matrices)  # nothing else
    with pytest.raises(ValueError, match="-1, 0 or 1"):
        pack_ternary_words(torch.tensor([0, 2], dtype=torch.int8), [(0, 1, 2)])
    with pytest.raises(ValueError, match="outside the 5 signs"):
        pack_ternary_words(torch.zeros(5, dtype=torch.int8), [(2, 2, 2)])
    with pytest.raises(ValueError, match="1-D int8"):
        pack_ternary_words(torch.zeros(4), [(0, 2, 2)])


@pytest.mark.parametrize("num_tokens", TOKEN_COUNTS)
@pytest.mark.parametrize("popularity", POPULARITIES)
@pytest.mark.parametrize("device", DEVICES)
def test_ternary_kernels_match_reference(device: str, popularity: str, num_tokens: int) -> None:
    case = ternary_case(device)
    stack, slot_ids = case.stack, slot_ids_for(popularity, num_tokens)
    batch = AdapterBatch.build(slot_ids, device)
    x, y = inputs(num_tokens, device)
    h = ternary_shrink(x, stack.codes_a, batch, stack.scale, slot_ranks=stack.slot_ranks)
    expected_h = ternary_shrink_ref(x, stack.codes_a, batch, stack.scale)
    torch.testing.assert_close(h, expected_h, **TOL)
    assert not h[torch.tensor(slot_ids, device=device) < 0].any()
    got, expected = y.clone(), y.clone()
    ternary_expand(expected_h, stack.codes_b, batch, got, slot_ranks=stack.slot_ranks)
    ternary_expand_ref(expected_h, stack.codes_b, batch, expected)
    torch.testing.assert_close(got, expected, **TOL)
    no_adapter = torch.tensor(slot_ids, device=device) < 0
    assert torch.equal(got[no_adapter], y[no_adapter])


@pytest.mark.parametrize("device", DEVICES)
def test_ternary_mixture_and_bf16_match_reference(device: str) -> None:
    case = ternary_case(device)
    step = AdapterStep.build(mixture_pairs(11), device)
    assert len(step.passes) > 1 and any(p.weights is not None for p in step.passes)
    for dtype, tol in ((torch.float32, TOL), (torch.bfloat16, {"rtol": 2e-2, "atol": 2e-2})):
        x, y = inputs(11, device, dtype)
        got, expected = y.clone(), y.clone()
        ternary_add(x, got, case.stack, step)
        ternary_add(x, expected, case.stack, step, reference=True)
        torch.testing.assert_close(got.float(), expected.float(), **tol)


def test_ternary_reference_matches_dense() -> None:
    """scale * gamma^2 * S_B (S_A x) per token pair, from the int8 signs the slots were packed from."""
    case = ternary_case("cpu", seed=5)
    pairs = mixture_pairs(13, seed=8)
    x, y = inputs(13, "cpu")
    got = y.clone()
    ternary_add(x, got, case.stack, AdapterStep.build(pairs, "cpu"), reference=True)
    expected = y.clone()
    for t, token_pairs in enumerate(pairs):
        for slot, weight in token_pairs:
            if slot not in case.signs:
                continue
            a, b, scales = case.signs[slot]
            offset = 0
            for sign_a, sign_b, scale, width in zip(a, b, scales, SLICES, strict=True):
                if sign_a is not None and sign_b is not None:
                    delta = sign_b.float() @ (sign_a.float() @ x[t])
                    expected[t, offset : offset + width] += weight * scale * delta
                offset += width
    torch.testing.assert_close(got, expected, **TOL)


# ---- MoS -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_tokens", TOKEN_COUNTS)
@pytest.mark.parametrize("popularity", POPULARITIES)
@pytest.mark.parametrize("device", DEVICES)
def test_mos_kernels_match_reference(device: str, popularity: str, num_tokens: int) -> None:
    case = mos_case(device)
    slot_ids = slot_ids_for(popularity, num_tokens)
    batch = AdapterBatch.build(slot_ids, device)
    x, y = inputs(num_tokens, device)
    no_adapter = torch.tensor(slot_ids, device=device) < 0
    for layer in range(LAYERS):
        view = case.stack.layer(layer)
        h = mos_shrink(x, view, batch)
        expected_h = mos_shrink_ref(x, view, batch)
        torch.testing.assert_close(h, expected_h, **TOL)
        assert not h[no_adapter].any()
        got, expected = y.clone(), y.clone()
        mos_expand(expected_h, view, batch, got)
        mos_expand_ref(expected_h, view, batch, expected)
        torch.testing.assert_close(got, expected, **TOL)
        assert torch.equal(got[no_adapter], y[no_adapter])


@pytest.mark.parametrize("device", DEVICES)
def test_mos_mixture_and_bf16_match_reference(device: str) -> None:
    step = AdapterStep.build(mixture_pairs(11), device)
    for dtype, tol in ((torch.float32, TOL), (torch.bfloat16, {"rtol": 2e-2, "atol": 2e-2})):
        view = mos_case(device, dtype=dtype).stack.layer(1)
        x, y = inputs(11, device, dtype)
        got, expected = y.clone(), y.clone()
        mos_add(x, got, view, step)
        mos_add(x, expected, view, step, reference=True)
        torch.testing.assert_close(got.float(), expected.float(), **tol)


@pytest.mark.parametrize("layer", range(LAYERS))
def test_mos_reference_matches_dense(layer: int) -> None:
    """scale * B (A x) with A = pool_A[index_A].reshape(r, d_in), B = pool_B[index_B].reshape(r, out).T."""
    case = mos_case("cpu", seed=2)
    pairs = mixture_pairs(13, seed=4)
    x, y = inputs(13, "cpu")
    got = y.clone()
    mos_add(x, got, case.stack.layer(layer), AdapterStep.build(pairs, "cpu"), reference=True)
    expected = y.clone()
    for t, token_pairs in enumerate(pairs):
        for slot, weight in token_pairs:
            if slot not in case.adapters:
                continue
            pools, tables, rank, _, scale = case.adapters[slot]
            offset = 0
            for p, width in enumerate(SLICES):
                pair, table = pools[p], tables[layer][p]
                if pair is not None and table is not None:
                    a = pair[0][table[0]].reshape(rank, IN_FEATURES)
                    b = pair[1][table[1]].reshape(rank, width).T
                    expected[t, offset : offset + width] += weight * scale * (b @ (a @ x[t]))
                offset += width
    torch.testing.assert_close(got, expected, **TOL)


def test_mos_slot_data_refuses_what_does_not_fit() -> None:
    stack = mos_case("cpu").stack
    pools = [(torch.zeros(4, 20), torch.zeros(4, w // 2)) for w in SLICES]
    tables = [[(torch.zeros(8, dtype=torch.long), torch.zeros(8, dtype=torch.long))] * 3] * LAYERS
    with pytest.raises(ValueError, match="rank 9 exceeds"):
        stack.slot_data(pools, tables, num_shards=2, rank=9, scale=1.0)
    with pytest.raises(ValueError, match="shards_per_vector 3 does not divide"):
        stack.slot_data(pools, tables, num_shards=3, rank=4, scale=1.0)
    with pytest.raises(ValueError, match="exceed the MoS slot's capacity"):
        big = [(torch.zeros(400, 20), torch.zeros(400, w // 2)) for w in SLICES]
        stack.slot_data(big, tables, num_shards=2, rank=4, scale=1.0)
    bad = [[(torch.full((8,), 4), torch.zeros(8, dtype=torch.long))] * 3] * LAYERS
    with pytest.raises(ValueError, match="index_A out of the pool's 4 rows"):
        stack.slot_data(pools, bad, num_shards=2, rank=4, scale=1.0)
    short = [[(torch.zeros(6, dtype=torch.long), torch.zeros(6, dtype=torch.long))] * 3] * LAYERS
    with pytest.raises(ValueError, match="expected r \\* l = 8"):
        stack.slot_data(pools, short, num_shards=2, rank=4, scale=1.0)


def test_cleared_slots_add_nothing() -> None:
    mos, ternary = mos_case("cpu"), ternary_case("cpu")
    slot_ids = [1, 2, -1, 1]
    batch = AdapterBatch.build(slot_ids)
    for slot in (1, 2):
        mos.stack.clear_slot(slot)
        ternary.stack.clear_slot(slot)
    x, y = inputs(4, "cpu")
    got = y.clone()
    mos_add(x, got, mos.stack.layer(0), batch, reference=True)
    ternary_add(x, got, ternary.stack, batch, reference=True)
    assert torch.equal(got, y)
    assert mos.stack.host_ranks[1] == 0 and not any(per_layer[1] for per_layer in mos.stack.host_adapted)
