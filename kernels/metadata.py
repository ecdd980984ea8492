"""Per-step adapter metadata: which device slot each token uses, grouped by slot.

Built once per engine step from the step's token -> slot list and passed to every adapted layer,
so that no layer groups tokens again (30 layers x up to 4 calls per step read the same grouping).
A *segment* is the set of tokens of one slot, in row order; segments are ordered by slot.
Tokens with slot -1 use no adapter and are in no segment.

This module does not know about weights, ranks or backends' strategies; it only describes the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

Rows = slice | torch.Tensor  # a run of rows, or an int64 index of rows


@dataclass(frozen=True, eq=False)
class AdapterBatch:
    """The adapter slot of every token of one step, grouped by slot.

    Host-side fields (tuples, ints) drive Python-level decisions without device syncs; tensor
    fields live on the step's device and feed the kernels.
    """

    num_tokens: int
    slot_ids: torch.Tensor  # [T] int32, adapter slot of each token, -1 = none
    num_adapted_tokens: int  # tokens with slot >= 0
    # One entry per segment (= per distinct slot in the step), ordered by slot.
    segment_slots: tuple[int, ...]
    segment_starts: tuple[int, ...]  # offset of the segment's first token in token_order
    segment_lengths: tuple[int, ...]  # tokens in the segment (the slot's token count)
    max_segment_length: int
    token_order: torch.Tensor  # [num_adapted_tokens] int64, rows grouped by segment, row order inside
    segment_table: torch.Tensor  # [3, num_segments] int32: slot, start, length (kernel input)
    segment_rows: tuple[Rows, ...]  # rows of each segment: a slice when contiguous, else an index
    adapted_rows: Rows  # rows with an adapter, in row order
    adapted_slot_ids: torch.Tensor  # [num_adapted_tokens] int64, slot of each adapted row, row order
    # Memo for backends that derive per-step plans from this batch (filled by the first layer
    # that needs one, read by the rest of the step); not part of the batch's meaning.
    plans: dict[object, object] = field(default_factory=dict, repr=False)

    @property
    def has_adapters(self) -> bool:
        return self.num_adapted_tokens > 0

    @property
    def num_segments(self) -> int:
        return len(self.segment_slots)

    @classmethod
    def build(
        cls, slot_ids: Sequence[int] | torch.Tensor, device: torch.device | str = "cpu"
    ) -> AdapterBatch:
        """Group the tokens of one step by adapter slot (slot -1 = no adapter)."""
        ids = slot_ids.tolist() if isinstance(slot_ids, torch.Tensor) else list(slot_ids)
        device = torch.device(device)
        rows_by_slot: dict[int, list[int]] = {}
        for row, slot in enumerate(ids):
            if slot >= 0:
                rows_by_slot.setdefault(slot, []).append(row)
            elif slot != -1:
                raise ValueError(f"adapter slot ids must be >= 0 or -1 (no adapter), got {slot} at row {row}")

        segment_slots = tuple(sorted(rows_by_slot))
        segment_lengths = tuple(len(rows_by_slot[s]) for s in segment_slots)
        segment_starts: list[int] = []
        order: list[int] = []
        segment_rows: list[Rows] = []
        for slot in segment_slots:
            rows = rows_by_slot[slot]
            segment_starts.append(len(order))
            order.extend(rows)
            segment_rows.append(as_rows(rows, device))
        adapted = [row for row, slot in enumerate(ids) if slot >= 0]

        def as_tensor(values: list[int] | list[list[int]], dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).to(device)

        return cls(
            num_tokens=len(ids),
            slot_ids=as_tensor(ids, torch.int32),
            num_adapted_tokens=len(adapted),
            segment_slots=segment_slots,
            segment_starts=tuple(segment_starts),
            segment_lengths=segment_lengths,
            max_segment_length=max(segment_lengths, default=0),
            token_order=as_tensor(order, torch.int64),
            segment_table=as_tensor(
                [list(segment_slots), segment_starts, list(segment_lengths)], torch.int32
            ),
            segment_rows=tuple(segment_rows),
            adapted_rows=as_rows(adapted, device),
            adapted_slot_ids=as_tensor([ids[row] for row in adapted], torch.int64),
        )


def as_rows(rows: list[int], device: torch.device) -> Rows:
    """A slice when the rows are one contiguous run (views, no gather), else an int64 index."""
    if not rows or rows[-1] - rows[0] + 1 == len(rows):
        return slice(rows[0] if rows else 0, rows[-1] + 1 if rows else 0)
    return torch.tensor(rows, dtype=torch.int64).to(device)
