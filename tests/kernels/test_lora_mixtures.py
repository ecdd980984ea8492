"""Mixtures of adapters: several (slot, weight) pairs per token, on every backend.

y[t] += sum_k w_tk * scale[s_tk] * B[s_tk] (A[s_tk] x[t]), checked against the torch reference run
pass by pass and against that formula written out per token; the fused CPU kernel's weight
argument against its own reference. Sweeps the popularities, 1-3 pairs per token, mixed ranks
and tokens without adapter.
"""

from __future__ import annotations

import random

import pytest
import torch

from kernels import AdapterStep, cpu_extension
from kernels.expand import lora_expand_ref
from kernels.shrink import lora_shrink_ref
from kernels.torch_backend import lora_gather_ref
from tests.cpu_kernels import require_compiler
from tests.kernels.lora_cases import NUM_SLOTS, POPULARITIES, Case, make_case, slot_ids_for
from tests.kernels.test_lora_ops import BACKENDS, FP32, backend_for

TokenPairs = list[list[tuple[int, float]]]


def mixture_pairs(popularity: str, num_tokens: int, max_pairs: int, seed: int = 0) -> TokenPairs:
    """Each token's first pair follows the popularity; up to max_pairs - 1 more, distinct slots."""
    rng = random.Random(seed)
    pairs: TokenPairs = []
    for first in slot_ids_for(popularity, num_tokens, seed):
        if first < 0:
            pairs.append([])
            continue
        slots = [first] + rng.sample([s for s in range(NUM_SLOTS) if s != first], rng.randrange(max_pairs))
        pairs.append([(s, round(rng.uniform(-1.0, 1.5), 3)) for s in slots])
    return pairs


def reference(case: Case, step: AdapterStep) -> torch.Tensor:
    """The single-adapter references summed over the step's passes (each with its weights)."""
    y = case.y.clone()
    for batch in step.passes:
        h = lora_shrink_ref(case.x, case.stack.lora_a, batch, case.stack.scale)
        lora_expand_ref(h, case.stack.lora_b, batch, y)
    return y


def per_token_formula(case: Case, pairs: TokenPairs) -> torch.Tensor:
    stack, y = case.stack, case.y.clone()
    r = stack.max_rank
    for t, token_pairs in enumerate(pairs):
        for slot, weight in token_pairs:
            offset = 0
            for p, b in enumerate(stack.lora_b):
                h = weight * stack.scale[slot, p] * (case.x[t] @ stack.lora_a[slot, p * r : (p + 1) * r].T)
                y[t, offset : offset + b.shape[1]] += h @ b[slot].T
                offset += b.shape[1]
    return y


def test_passes_hold_each_row_once_and_single_adapter_steps_have_no_weights() -> None:
    step = AdapterStep.build([[(3, 0.5), (1, 0.5)], [], [(2, 1.0)], [(1, 1.0), (4, 2.0), (3, 1.0)]])
    assert [b.slot_ids.tolist() for b in step.passes] == [[3, -1, 2, 1], [1, -1, -1, 4], [-1, -1, -1, 3]]
    assert step.passes[0].host_weights == (0.5, 0.0, 1.0, 1.0)
    assert step.passes[1].weights is not None and step.passes[1].weights.tolist() == [0.5, 0.0, 0.0, 2.0]
    assert step.passes[2].weights is None  # every weight 1.0: nothing to multiply
    assert step.slots == (1, 2, 3, 4) and step.has_adapters
    single = AdapterStep.build([[(2, 1.0)], [], [(0, 1.0)]])
    assert len(single.passes) == 1 and single.passes[0].weights is None
    assert single.passes[0].slot_ids.tolist() == AdapterStep.single([2, -1, 0]).passes[0].slot_ids.tolist()
    empty = AdapterStep.build([[], []])
    assert not empty.has_adapters and len(empty.passes) == 1
    with pytest.raises(ValueError, match="token 1"):
        AdapterStep.build([[], [(-1, 1.0)]])


@pytest.mark.parametrize("max_pairs", [1, 2, 3])
@pytest.mark.parametrize("popularity", POPULARITIES)
@pytest.mark.parametrize(("name", "strategy", "device"), BACKENDS)
def test_mixture_matches_reference(
    name: str, strategy: str, device: str, popularity: str, max_pairs: int
) -> None:
    num_tokens = 7 if name == "triton" else 33  # the interpreter: small grids
    pairs = mixture_pairs(popularity, num_tokens, max_pairs)
    layout = "triton" if name == "triton" else "torch"
    case = make_case(slot_ids_for(popularity, num_tokens), layout=layout, device=device)
    backend = backend_for(name, strategy, device)
    step = AdapterStep.build(pairs, device)
    step = step.with_plan(backend.plan_step(step, [case.stack]))
    y = case.y.clone()
    backend.add_lora(case.x, y, case.stack, step)
    expected = reference(case, step)
    torch.testing.assert_close(y, expected, **FP32)
    if device == "cpu":
        torch.testing.assert_close(expected, per_token_formula(case, pairs), **FP32)


@pytest.mark.parametrize(("name", "strategy", "device"), BACKENDS)
def test_weighted_shrink_matches_reference(name: str, strategy: str, device: str) -> None:
    """The public shrink op scales each row by its pair weight (Triton: the HAS_WEIGHTS path)."""
    pairs = mixture_pairs("zipf", 7, 1, seed=2)
    case = make_case(slot_ids_for("zipf", 7, seed=2), device=device)
    (batch,) = AdapterStep.build(pairs, device).passes
    assert batch.weights is not None
    stack = case.stack
    h = backend_for(name, strategy, device).shrink(
        case.x, stack.lora_a, batch, stack.scale, slot_ranks=stack.slot_ranks
    )
    torch.testing.assert_close(h, lora_shrink_ref(case.x, stack.lora_a, batch, stack.scale), **FP32)


def test_fused_gather_weights_match_its_reference() -> None:
    require_compiler()
    cpu_extension.load()
    case = make_case(slot_ids_for("zipf", 33), layout="torch", slices=(24, 8, 8))
    stack = case.stack
    a_t, b_t = stack.transposed
    rows = torch.tensor([0, 5, 2, 30, 17], dtype=torch.int64)
    slots = torch.tensor([1, 3, 1, 7, 9], dtype=torch.int64)
    weights = torch.tensor([0.5, -1.0, 2.0, 1.0, 0.25])
    for w in (weights, None):
        y, expected = case.y.clone(), case.y.clone()
        torch.ops.loramux_cpu.lora_gather(case.x, y, rows, slots, a_t, b_t, stack.scale, stack.slot_ranks, w)
        lora_gather_ref(case.x, expected, rows, slots, a_t, b_t, stack.scale, stack.slot_ranks, w)
        torch.testing.assert_close(y, expected, **FP32)
    with pytest.raises(RuntimeError, match="weights must be a contiguous float32"):
        torch.ops.loramux_cpu.lora_gather(
            case.x, case.y.clone(), rows, slots, a_t, b_t, stack.scale, stack.slot_ranks, weights[:3]
        )
