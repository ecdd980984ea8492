"""Per-step adapter metadata: which (slot, weight) pairs each token uses, grouped by slot.

Built once per engine step and passed to every adapted layer, so that no layer groups tokens
again (30 layers x up to 4 calls per step read the same grouping).

- `AdapterStep`: token t's pairs [(slot, weight), ...] (a mixture of adapters is several pairs;
  none = no adapter), decomposed into *passes*: pass k holds the k-th pair of every token, so
  inside one pass each row appears at most once (kernels that write rows without atomics rely on
  it). A single-adapter step is one pass without weights. The backend's plan for the step
  (`LoraBackend.plan_step`) rides along, made once by whoever builds the step.
- `AdapterBatch`: one pass. A *segment* is the set of tokens of one slot, in row order; segments
  are ordered by slot. Tokens with slot -1 use no adapter (in this pass) and are in no segment.

This module does not know about ranks, stacks or backends' strategies; it only describes the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

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
    # [T] float32 weight of each row's pair (rows without a slot: 0); None = every weight is 1.0,
    # which costs the kernels nothing (the single-adapter case).
    weights: torch.Tensor | None = None
    host_weights: tuple[float, ...] | None = None  # the same on the host

    @property
    def has_adapters(self) -> bool:
        return self.num_adapted_tokens > 0

    @property
    def num_segments(self) -> int:
        return len(self.segment_slots)

    @classmethod
    def build(
        cls,
        slot_ids: Sequence[int] | torch.Tensor,
        device: torch.device | str = "cpu",
        weights: Sequence[float] | None = None,
    ) -> AdapterBatch:
        """Group the tokens of one step by adapter slot (slot -1 = no adapter); `weights` per row
        (ignored where the slot is -1) scale each row's term, None = all 1.0."""
        ids = slot_ids.tolist() if isinstance(slot_ids, torch.Tensor) else list(slot_ids)
        device = torch.device(device)
        host_weights: tuple[float, ...] | None = None
        if weights is not None:
            if len(weights) != len(ids):
                raise ValueError(f"got {len(weights)} weights for {len(ids)} tokens")
            host_weights = tuple(float(w) if s >= 0 else 0.0 for w, s in zip(weights, ids, strict=True))
            if all(w == 1.0 for w, s in zip(host_weights, ids, strict=True) if s >= 0):
                host_weights = None
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
            weights=None
            if host_weights is None
            else torch.tensor(host_weights, dtype=torch.float32).to(device),
            host_weights=host_weights,
        )

    def row_weights(self, rows: Rows) -> torch.Tensor | None:
        """[n] float32 weights of `rows` (None when every weight is 1.0)."""
        if self.weights is None:
            return None
        return self.weights[rows] if isinstance(rows, slice) else self.weights.index_select(0, rows)


TokenPairs = Sequence[Sequence[tuple[int, float]]]  # per token: its (slot, weight) pairs


@dataclass(frozen=True, eq=False)
class AdapterStep:
    """One step's adapter pairs for one family of slot stacks, as passes of at most one pair per row.

    y[t] += sum over passes k of w_tk * scale[s_tk] * B[s_tk] (A[s_tk] x[t]).
    `plan` is the backend's immutable plan for this step (LoraBackend.plan_step), or None.
    """

    num_tokens: int
    passes: tuple[AdapterBatch, ...]
    plan: object = None

    @property
    def has_adapters(self) -> bool:
        return any(p.has_adapters for p in self.passes)

    @property
    def slots(self) -> tuple[int, ...]:
        """The distinct slots of the step, over all passes (ascending)."""
        return tuple(sorted({s for p in self.passes for s in p.segment_slots}))

    @classmethod
    def build(cls, token_pairs: TokenPairs, device: torch.device | str = "cpu") -> AdapterStep:
        """Token t's (slot, weight) pairs (empty = no adapter) -> passes; weights of 1.0 cost nothing."""
        num_tokens = len(token_pairs)
        num_passes = max((len(pairs) for pairs in token_pairs), default=0)
        passes = []
        for k in range(max(num_passes, 1)):
            slots = [pairs[k][0] if len(pairs) > k else -1 for pairs in token_pairs]
            weights = [float(pairs[k][1]) if len(pairs) > k else 0.0 for pairs in token_pairs]
            for row, slot in enumerate(slots):
                if slot < 0 and len(token_pairs[row]) > k:
                    raise ValueError(f"token {row}: adapter slot ids in pairs must be >= 0, got {slot}")
            passes.append(AdapterBatch.build(slots, device, weights))
        return cls(num_tokens, tuple(passes))

    @classmethod
    def single(
        cls, slot_ids: Sequence[int] | torch.Tensor, device: torch.device | str = "cpu"
    ) -> AdapterStep:
        """One adapter (or none: -1) per token: one pass, no weights."""
        batch = AdapterBatch.build(slot_ids, device)
        return cls(batch.num_tokens, (batch,))

    def with_plan(self, plan: object) -> AdapterStep:
        return replace(self, plan=plan)


def as_rows(rows: list[int], device: torch.device) -> Rows:
    """A slice when the rows are one contiguous run (views, no gather), else an int64 index."""
    if not rows or rows[-1] - rows[0] + 1 == len(rows):
        return slice(rows[0] if rows else 0, rows[-1] + 1 if rows else 0)
    return torch.tensor(rows, dtype=torch.int64).to(device)
