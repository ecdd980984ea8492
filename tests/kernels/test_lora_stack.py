"""LoraStack: writing adapters into slots, in either memory layout, and what the kernels then see."""

from __future__ import annotations

import pytest
import torch

from kernels import AdapterBatch, LoraStack, LoraTerm, select_backend
from tests.kernels.lora_cases import make_case

LAYOUTS = ["triton", "torch"]


def test_both_layouts_hold_the_same_logical_tensors() -> None:
    ids = [0, 1, 2]
    a, b = make_case(ids, layout="triton"), make_case(ids, layout="torch")
    assert torch.equal(a.stack.lora_a, b.stack.lora_a)
    assert all(torch.equal(p, q) for p, q in zip(a.stack.lora_b, b.stack.lora_b, strict=True))
    assert torch.equal(a.stack.scale, b.stack.scale) and a.stack.host_ranks == b.stack.host_ranks
    assert b.stack.lora_a.transpose(1, 2).is_contiguous()  # the layout embedding_bag reads
    assert all(t.transpose(1, 2).is_contiguous() for t in b.stack.lora_b)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_set_slot_pads_smaller_ranks_and_untargeted_projections(layout: str) -> None:
    stack = LoraStack.empty(4, 8, 16, (12, 4), layout=layout)  # type: ignore[arg-type]
    a0, b0 = torch.ones(3, 16), torch.full((12, 3), 2.0)
    stack.set_slot(2, [a0, None], [b0, None], [0.5, 1.0])
    assert stack.host_ranks[2] == 3 and stack.slot_ranks.tolist() == [0, 0, 3, 0]
    assert stack.host_scales[2] == (0.5, 1.0) and stack.scale[2].tolist() == [0.5, 1.0]
    a = stack.lora_a[2].view(2, 8, 16)
    assert torch.equal(a[0, :3], a0) and not a[0, 3:].any() and not a[1].any()
    assert torch.equal(stack.lora_b[0][2, :, :3], b0) and not stack.lora_b[0][2, :, 3:].any()
    assert not stack.lora_b[1][2].any()
    assert not stack.lora_a[[0, 1, 3]].any()  # other slots untouched


@pytest.mark.parametrize("layout", LAYOUTS)
def test_reusing_a_slot_for_a_lower_rank_adapter_clears_the_old_one(layout: str) -> None:
    stack = LoraStack.empty(2, 8, 16, (8,), layout=layout)  # type: ignore[arg-type]
    stack.set_slot(1, [torch.ones(8, 16)], [torch.ones(8, 8)], [1.0])
    stack.set_slot(1, [torch.ones(2, 16)], [torch.ones(8, 2)], [1.0])
    assert stack.host_ranks[1] == 2
    assert not stack.lora_a[1, 2:].any() and not stack.lora_b[0][1, :, 2:].any()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cleared_slot_adds_nothing(layout: str) -> None:
    case = make_case([0, 1, 0, -1], layout=layout)  # type: ignore[arg-type]
    case.stack.clear_slot(0)
    assert case.stack.host_ranks[0] == 0 and not case.stack.lora_a[0].any()
    term = LoraTerm(select_backend("cpu"), case.stack)
    y = case.y.clone()
    term(case.x, y, case.batch)
    assert torch.equal(y[[0, 2, 3]], case.y[[0, 2, 3]]) and not torch.equal(y[1], case.y[1])


def test_set_slot_rejects_wrong_shapes_with_a_clear_message() -> None:
    stack = LoraStack.empty(2, 4, 16, (8, 4), layout="torch")
    with pytest.raises(ValueError, match="exceeds this stack's max rank 4"):
        stack.set_slot(0, [torch.ones(5, 16), None], [torch.ones(8, 5), None], [1.0, 1.0])
    with pytest.raises(ValueError, match=r"projection 1: expected A \[2, 16\] and B \[4, 2\]"):
        stack.set_slot(0, [None, torch.ones(2, 16)], [None, torch.ones(8, 2)], [1.0, 1.0])
    with pytest.raises(ValueError, match="both A and B or neither"):
        stack.set_slot(0, [torch.ones(2, 16), None], [None, None], [1.0, 1.0])
    with pytest.raises(ValueError, match="expected 2 A, B and scale entries"):
        stack.set_slot(0, [torch.ones(2, 16)], [torch.ones(8, 2)], [1.0])
    with pytest.raises(ValueError, match="unknown stack layout"):
        LoraStack.empty(2, 4, 16, (8,), layout="rows")  # type: ignore[arg-type]


def test_adapter_term_is_what_adapted_linear_calls() -> None:
    """AdaptedLinear calls adapter_term(x, y, batch) with y = x W^T; the term adds the LoRA part."""
    stack = LoraStack.empty(2, 4, 6, (3, 3), layout="torch")
    a, b = torch.randn(4, 6), torch.randn(3, 4)
    stack.set_slot(1, [a, a], [b, 2 * b], [0.5, 0.25])
    x, y = torch.randn(2, 6), torch.zeros(2, 6)
    LoraTerm(select_backend("cpu"), stack)(x, y, AdapterBatch.build([1, -1]))
    expected = torch.cat([0.5 * (x[0] @ a.T) @ b.T, 0.25 * (x[0] @ a.T) @ (2 * b).T])
    torch.testing.assert_close(y[0], expected)
    assert not y[1].any()
