"""AdapterBatch: the per-step grouping of tokens by adapter slot, on hand-made steps."""

from __future__ import annotations

import pytest
import torch

from kernels import AdapterBatch


def rows_of(rows: slice | torch.Tensor) -> list[int]:
    return list(range(rows.start, rows.stop)) if isinstance(rows, slice) else rows.tolist()


def test_groups_scattered_tokens_by_slot_in_row_order() -> None:
    batch = AdapterBatch.build([2, 0, 2, -1, 0, 0, 5])
    assert batch.num_tokens == 7 and batch.num_adapted_tokens == 6 and batch.has_adapters
    assert batch.slot_ids.dtype == torch.int32 and batch.slot_ids.tolist() == [2, 0, 2, -1, 0, 0, 5]
    assert batch.segment_slots == (0, 2, 5)  # the step's unique slots
    assert batch.segment_lengths == (3, 2, 1)  # tokens per slot
    assert batch.segment_starts == (0, 3, 5)
    assert batch.max_segment_length == 3 and batch.num_segments == 3
    assert batch.token_order.tolist() == [1, 4, 5, 0, 2, 6]  # the sort permutation, stable
    assert batch.segment_table.dtype == torch.int32
    assert batch.segment_table.tolist() == [[0, 2, 5], [0, 3, 5], [3, 2, 1]]
    assert [rows_of(r) for r in batch.segment_rows] == [[1, 4, 5], [0, 2], [6]]
    assert rows_of(batch.adapted_rows) == [0, 1, 2, 4, 5, 6]
    assert batch.adapted_slot_ids.tolist() == [2, 0, 2, 0, 0, 5]


def test_contiguous_runs_become_slices() -> None:
    """Prefill chunks (and decode tokens laid out by slot) need no gather: their rows are slices."""
    batch = AdapterBatch.build([1, 1, 1, 3, 3, 0])
    assert batch.segment_rows == (slice(5, 6), slice(0, 3), slice(3, 5))
    assert batch.adapted_rows == slice(0, 6)
    assert batch.token_order.tolist() == [5, 0, 1, 2, 3, 4]


def test_step_without_adapters() -> None:
    batch = AdapterBatch.build([-1, -1, -1])
    assert not batch.has_adapters and batch.num_segments == 0 and batch.max_segment_length == 0
    assert tuple(batch.segment_table.shape) == (3, 0) and batch.token_order.numel() == 0
    empty = AdapterBatch.build([])
    assert empty.num_tokens == 0 and not empty.has_adapters


def test_tensor_and_list_input_agree() -> None:
    ids = [4, -1, 4, 2]
    a, b = AdapterBatch.build(ids), AdapterBatch.build(torch.tensor(ids, dtype=torch.int32))
    assert (a.segment_slots, a.segment_starts, a.segment_lengths) == (
        b.segment_slots,
        b.segment_starts,
        b.segment_lengths,
    )
    assert torch.equal(a.token_order, b.token_order) and torch.equal(a.slot_ids, b.slot_ids)


def test_rejects_bad_slot_ids() -> None:
    with pytest.raises(ValueError, match="-2 at row 1"):
        AdapterBatch.build([0, -2])
