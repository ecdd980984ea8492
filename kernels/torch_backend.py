"""The torch backend: LoRA shrink / expand on CPU, built for speed on small decode batches.

Two ways to run a step's adapter term, chosen per layer from the step's counts (or forced):

- segments: per slot, one matmul over its tokens (`x[rows] @ A[s]^T`, then `addmm_` into y).
  Weights are read once per slot; each slot costs a few torch calls (~7 us each on the 2-core
  CPUs). Wins for prefill chunks and popular adapters. Rows are views when a slot's tokens are
  contiguous, index_select / index_add_ otherwise.
- gather: one gathered product for all tokens. With the torch stack layout (A stored [S, d_in, P*r],
  each B stored [S, r, out]) this is `embedding_bag` over weight rows: every token reads exactly
  its slot's rows once, no gathered copy (3-4x faster than index_select + bmm at decode batch 32).
  Other layouts fall back to index_select + bmm.

Mixed ranks: both paths stop the expand at each slot's own rank (segment: B[s, :, :rank]; gather:
bags of rank rows per token). The shrink reads the stack's full rank: in the torch layout a slot's
A is [d_in, P*r] with the rank innermost, so its padding shares cache lines with the live columns
and skipping it would save no memory traffic.

`auto` compares, from the step's counts and a stack's weight bytes, looping every slot with
looping the slots whose tokens are worth a matmul and gathering the rest (a prefill chunk beside
a decode batch), and takes the cheaper. The choice is memoised in the step's AdapterBatch, so the
30 layers of a step make it once per stack shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from kernels.metadata import AdapterBatch, Rows, as_rows
from kernels.stack import LoraStack, StackLayout

Strategy = Literal["auto", "segments", "gather"]

# Cost model (fitted on the 2-core AVX2 machines, fp32, SmolLM2 shapes; bench/kernels_bench.py):
# a small torch call costs ~7.5 us; past the first read from memory (which every path pays), a
# gathered product re-reads a slot's weights from cache at ~100 GB/s per token, and a per-slot
# matmul streams its tokens through them at about twice that rate.
_OP_US = 7.5
_REREAD_BYTES_PER_US = 100_000.0
_MATMUL_BYTES_PER_US = 200_000.0


@dataclass(frozen=True)
class _Split:
    """Which tokens of a step take which path: looped segments, the other tokens gathered."""

    key: tuple[object, ...]  # identifies the split within its step
    loop_segments: tuple[int, ...]  # segment indices run as per-slot matmuls
    gather_rows: Rows  # rows run as one gathered product, in row order
    gather_slots: torch.Tensor  # [num_gathered] int64, slot of each gathered row
    gather_slot_list: tuple[int, ...]  # the same on the host
    gather_unique_slots: tuple[int, ...]  # the slots of the gathered segments

    @property
    def num_gathered(self) -> int:
        return len(self.gather_slot_list)


@dataclass(frozen=True)
class _Bags:
    """embedding_bag inputs for the gathered expand: token t sums rows slot_t * r + j, j < rank."""

    indices: torch.Tensor  # [sum of ranks] int64, rows of B viewed as [S * r, out]
    offsets: torch.Tensor  # [num_gathered] int64
    weight_index: tuple[torch.Tensor, ...]  # per slice p: [sum of ranks] int64 into h.view(-1)


class TorchBackend:
    """LoRA shrink / expand with torch ops (CPU; also runs anywhere torch does)."""

    name = "torch"
    stack_layout: StackLayout = "torch"

    def __init__(self, strategy: Strategy = "auto", fused_gather: bool = False) -> None:
        """fused_gather: run add_lora's gather path as one fused CPU kernel per stack
        (torch.ops.loramux_cpu.lora_gather, kernels/cpu_extension.py must be loaded) for fp32 CPU
        stacks in the torch layout; other stacks keep the torch ops."""
        if strategy not in ("auto", "segments", "gather"):
            raise ValueError(f"unknown torch backend strategy {strategy!r}: use auto, segments or gather")
        self.strategy = strategy
        self.fused_gather = fused_gather

    # ---- public ops (same semantics as kernels.shrink.lora_shrink / kernels.expand.lora_expand)

    def shrink(
        self,
        x: torch.Tensor,
        lora_a: torch.Tensor,
        batch: AdapterBatch,
        scale: torch.Tensor,
        *,
        slot_ranks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """h = scale[slot] * x @ A[slot]^T per token, fused over P slices; see kernels.shrink.lora_shrink."""
        num_slots, rows, _ = lora_a.shape
        scale2 = scale.view(num_slots, -1)
        h = torch.zeros(batch.num_tokens, rows, dtype=torch.float32, device=x.device)
        if not batch.has_adapters:
            return h
        ranks = _host_ranks(slot_ranks, num_slots, rows // scale2.shape[1])
        split = self._split(batch, _slot_bytes(lora_a, [rows * lora_a.shape[2]]), scale2.shape[1])
        scales = scale2.tolist()
        for i in split.loop_segments:
            slot = batch.segment_slots[i]
            if ranks[slot]:
                seg_rows = batch.segment_rows[i]
                h_seg = _shrink_segment(x, lora_a, slot, seg_rows, scales[slot])
                _write_rows(h, seg_rows, h_seg)
        if split.num_gathered:
            _write_rows(h, split.gather_rows, _shrink_gathered(x, lora_a, batch, split, scale2))
        return h

    def expand(
        self,
        h: torch.Tensor,
        lora_b: Sequence[torch.Tensor] | torch.Tensor,
        batch: AdapterBatch,
        y: torch.Tensor,
        *,
        slot_ranks: torch.Tensor | None = None,
    ) -> None:
        """y[t, slice p] += h[t, slice p] @ B_p[slot]^T in place; see kernels.expand.lora_expand."""
        b_slices = (lora_b,) if isinstance(lora_b, torch.Tensor) else tuple(lora_b)
        if not batch.has_adapters:
            return
        num_slots, _, rank = b_slices[0].shape
        ranks = _host_ranks(slot_ranks, num_slots, rank)
        split = self._split(
            batch, _slot_bytes(b_slices[0], [b.shape[1] * rank for b in b_slices]), len(b_slices)
        )
        alphas = (1.0,) * len(b_slices)
        for i in split.loop_segments:
            slot = batch.segment_slots[i]
            if ranks[slot]:
                seg_rows = batch.segment_rows[i]
                h_seg = h[seg_rows] if isinstance(seg_rows, slice) else h.index_select(0, seg_rows)
                _expand_segment(h_seg.to(y.dtype), b_slices, slot, ranks[slot], seg_rows, y, alphas)
        if split.num_gathered:
            rows = split.gather_rows
            h_gathered = h[rows] if isinstance(rows, slice) else h.index_select(0, rows)
            _expand_gathered(h_gathered.to(y.dtype), b_slices, batch, split, ranks, y)

    def add_lora(self, x: torch.Tensor, y: torch.Tensor, stack: LoraStack, batch: AdapterBatch) -> None:
        """y += the adapter term of every token: shrink then expand, per projection slice of y.

        Scales are applied as the expand's alpha on the segment path (no extra call per slot).
        """
        if not batch.has_adapters:
            return
        r = stack.max_rank
        weight_bytes = [stack.num_slices * r * stack.in_features] + [w * r for w in stack.output_slices]
        fused = self.fused_gather and _fusable(x, y, stack)
        split = self._split(batch, _slot_bytes(stack.lora_a, weight_bytes), stack.num_slices, fused)
        for i in split.loop_segments:
            slot = batch.segment_slots[i]
            rank = stack.host_ranks[slot]
            if rank:
                seg_rows = batch.segment_rows[i]
                x_seg = x[seg_rows] if isinstance(seg_rows, slice) else x.index_select(0, seg_rows)
                h_seg = torch.mm(x_seg, stack.lora_a[slot].t())  # [n, P * r], unscaled
                _expand_segment(h_seg, stack.lora_b, slot, rank, seg_rows, y, stack.host_scales[slot])
        if split.num_gathered:
            if fused:
                a_t, b_t = stack.transposed
                rows = _gather_row_index(batch, split)
                torch.ops.loramux_cpu.lora_gather(
                    x, y, rows, split.gather_slots, a_t, b_t, stack.scale, stack.slot_ranks
                )
                return
            h = _shrink_gathered(x, stack.lora_a, batch, split, stack.scale)
            _expand_gathered(h, stack.lora_b, batch, split, stack.host_ranks, y)

    # ---- strategy

    def _split(
        self, batch: AdapterBatch, slot_bytes: float, num_slices: int, fused_gather: bool = False
    ) -> _Split:
        """The cheaper of looping all segments, or looping those worth a matmul and gathering the rest."""
        if self.strategy == "segments":
            return _split_at(batch, tuple(range(batch.num_segments)))
        if self.strategy == "gather":
            return _split_at(batch, ())
        key = ("torch_choice", slot_bytes, num_slices, fused_gather)
        loop = batch.plans.get(key)
        if loop is None:
            gather_calls = 1 if fused_gather else 4 + 3 * num_slices
            loop = _cheapest_loop_set(batch, slot_bytes, num_slices, gather_calls)
            batch.plans[key] = loop
        assert isinstance(loop, tuple)
        return _split_at(batch, loop)


def _cheapest_loop_set(
    batch: AdapterBatch, slot_bytes: float, num_slices: int, gather_calls: int
) -> tuple[int, ...]:
    """Segments to loop, from the step's counts and one slot's weight bytes (the cost model above).

    A looped segment pays its calls (one matmul + one per slice; twice that when its rows must be
    gathered and scattered) and streams its tokens through a matmul; a gathered token re-reads its
    slot's weights. The gathered product has fixed calls of its own (`gather_calls`: ~4 + 3 per
    slice in torch ops, one for the fused kernel), so looping everything can beat the mix when few
    slots remain to gather.
    """
    gather_us = slot_bytes / _REREAD_BYTES_PER_US  # per gathered token
    matmul_us = slot_bytes / _MATMUL_BYTES_PER_US  # per looped token
    calls_us = (1 + num_slices) * _OP_US
    loop_us = [
        (calls_us if isinstance(rows, slice) else 2 * calls_us) + n * matmul_us
        for n, rows in zip(batch.segment_lengths, batch.segment_rows, strict=True)
    ]
    mixed = tuple(i for i, n in enumerate(batch.segment_lengths) if loop_us[i] < n * gather_us)
    mixed_us = sum(loop_us[i] for i in mixed)
    if len(mixed) < batch.num_segments:
        gathered_tokens = batch.num_adapted_tokens - sum(batch.segment_lengths[i] for i in mixed)
        mixed_us += gather_calls * _OP_US + gathered_tokens * gather_us
    return tuple(range(batch.num_segments)) if sum(loop_us) <= mixed_us else mixed


def _split_at(batch: AdapterBatch, loop_segments: tuple[int, ...]) -> _Split:
    """Memoised per step: loop these segments, gather the others' tokens (in row order)."""
    key = ("torch_split", loop_segments)
    cached = batch.plans.get(key)
    if cached is None:
        looped = set(loop_segments)
        gathered = [i for i in range(batch.num_segments) if i not in looped]
        gather_rows: Rows
        if len(gathered) == batch.num_segments:  # every adapted token
            gather_rows, slots = batch.adapted_rows, batch.adapted_slot_ids
            slot_list = batch.adapted_slot_ids.tolist()
        else:
            row_slots = sorted(
                (row, batch.segment_slots[i]) for i in gathered for row in _row_list(batch.segment_rows[i])
            )
            rows = [row for row, _ in row_slots]
            slot_list = [slot for _, slot in row_slots]
            device = batch.token_order.device
            gather_rows = as_rows(rows, device)
            slots = torch.tensor(slot_list, dtype=torch.int64).to(device)
        unique = tuple(batch.segment_slots[i] for i in gathered)
        cached = _Split(key, loop_segments, gather_rows, slots, tuple(slot_list), unique)
        batch.plans[key] = cached
    assert isinstance(cached, _Split)
    return cached


def _fusable(x: torch.Tensor, y: torch.Tensor, stack: LoraStack) -> bool:
    a_t, b_t = stack.transposed
    return (
        x.device.type == "cpu"
        and x.dim() == y.dim() == 2
        and x.stride(1) == y.stride(1) == 1
        and x.dtype == y.dtype == stack.lora_a.dtype == torch.float32
        and a_t.is_contiguous()
        and all(b.is_contiguous() for b in b_t)
    )


def _gather_row_index(batch: AdapterBatch, split: _Split) -> torch.Tensor:
    """Memoised per step: the gathered rows as an int64 index (a run of rows becomes an arange)."""
    rows = split.gather_rows
    if not isinstance(rows, slice):
        return rows
    key = ("torch_gather_rows", split.key)
    cached = batch.plans.get(key)
    if cached is None:
        cached = torch.arange(rows.start, rows.stop, dtype=torch.int64)
        batch.plans[key] = cached
    assert isinstance(cached, torch.Tensor)
    return cached


def _input_bags(batch: AdapterBatch, split: _Split, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Memoised per step: shrink bags, token t sums rows slot_t * d_in + k weighted by x[t, k]."""
    key = ("torch_input_bags", split.key, in_features)
    cached = batch.plans.get(key)
    if cached is None:
        slots = split.gather_slots
        indices = ((slots * in_features).view(-1, 1) + torch.arange(in_features, device=slots.device)).view(
            -1
        )
        offsets = torch.arange(0, split.num_gathered * in_features, in_features, device=slots.device)
        cached = (indices, offsets)
        batch.plans[key] = cached
    assert isinstance(cached, tuple)
    return cached


def _bags(batch: AdapterBatch, split: _Split, ranks: Sequence[int], r: int, num_slices: int) -> _Bags:
    """Memoised per step and rank pattern: expand bags, token t sums rows slot_t * r + j, j < rank."""
    key = ("torch_bags", split.key, r, num_slices, tuple(ranks[s] for s in split.gather_unique_slots))
    cached = batch.plans.get(key)
    if cached is None:
        indices: list[int] = []
        weight_index: list[int] = []
        offsets: list[int] = []
        for t, slot in enumerate(split.gather_slot_list):
            rank = ranks[slot]
            offsets.append(len(indices))
            indices.extend(range(slot * r, slot * r + rank))
            weight_index.extend(range(t * num_slices * r, t * num_slices * r + rank))
        device = split.gather_slots.device
        index = torch.tensor(weight_index, dtype=torch.int64)
        cached = _Bags(
            indices=torch.tensor(indices, dtype=torch.int64).to(device),
            offsets=torch.tensor(offsets, dtype=torch.int64).to(device),
            weight_index=tuple((index + p * r).to(device) for p in range(num_slices)),
        )
        batch.plans[key] = cached
    assert isinstance(cached, _Bags)
    return cached


# ---- segment path


def _shrink_segment(
    x: torch.Tensor, lora_a: torch.Tensor, slot: int, rows: Rows, scales: Sequence[float]
) -> torch.Tensor:
    """scale * x[rows] @ A[slot]^T -> [n, P * r] fp32."""
    x_seg = x[rows] if isinstance(rows, slice) else x.index_select(0, rows)
    h = torch.mm(x_seg, lora_a[slot].t()).float()
    if len(set(scales)) == 1:
        return h.mul_(scales[0])
    return h.view(h.shape[0], len(scales), -1).mul_(torch.tensor(scales).view(-1, 1)).view(h.shape)


def _expand_segment(
    h: torch.Tensor,  # [n, P * r], rows of one slot
    lora_b: Sequence[torch.Tensor],  # P x [S, out_p, r]
    slot: int,
    rank: int,
    rows: Rows,
    y: torch.Tensor,
    alphas: Sequence[float],
) -> None:
    """y[rows, slice_p] += alpha_p * h[:, slice p, :rank] @ B_p[slot, :, :rank]^T, for each p."""
    r = lora_b[0].shape[2]
    # Scattered rows: the slices' products land in one buffer, then one index_add_ of whole rows
    # (index_add_ into a column slice with alpha 1 takes a ~6x slower scatter path in torch).
    out = y[rows] if isinstance(rows, slice) else y.new_empty(h.shape[0], y.shape[1])
    beta = 1.0 if isinstance(rows, slice) else 0.0  # 0: the buffer's garbage is ignored
    offset = 0
    for p, b in enumerate(lora_b):
        width = b.shape[1]
        b_p = b[slot, :, :rank].t()  # [rank, out_p]: contiguous rows in the torch layout
        out[:, offset : offset + width].addmm_(h[:, p * r : p * r + rank], b_p, beta=beta, alpha=alphas[p])
        offset += width
    if not isinstance(rows, slice):
        y.index_add_(0, rows, out)


# ---- gather path


def _shrink_gathered(
    x: torch.Tensor, lora_a: torch.Tensor, batch: AdapterBatch, split: _Split, scale: torch.Tensor
) -> torch.Tensor:
    """scale[s_t] * x[t] @ A[s_t]^T for the gathered tokens -> [n, P * r] fp32."""
    rows, slots, n = split.gather_rows, split.gather_slots, split.num_gathered
    x_g = x[rows] if isinstance(rows, slice) else x.index_select(0, rows)
    num_slots, width, in_features = lora_a.shape
    a_t = lora_a.transpose(1, 2)  # [S, d_in, P * r]
    if a_t.is_contiguous():  # torch layout: h[t] = sum_k x[t, k] * A^T[s_t, k, :], an embedding bag
        indices, offsets = _input_bags(batch, split, in_features)
        h = _bag_sum(a_t.view(num_slots * in_features, width), indices, offsets, x_g.reshape(-1))
    else:
        h = torch.bmm(lora_a.index_select(0, slots), x_g.unsqueeze(2)).view(n, width)
    h = h.float()
    scale2 = scale.view(num_slots, -1)
    num_slices = scale2.shape[1]
    h.view(n, num_slices, -1).mul_(scale2.index_select(0, slots).view(n, num_slices, 1))
    return h


def _expand_gathered(
    h: torch.Tensor,  # [n, P * r], the gathered tokens
    lora_b: Sequence[torch.Tensor],
    batch: AdapterBatch,
    split: _Split,
    ranks: Sequence[int],
    y: torch.Tensor,
) -> None:
    """y[t, slice_p] += h[t, slice p] @ B_p[s_t]^T for the gathered tokens."""
    rows, slots, n = split.gather_rows, split.gather_slots, split.num_gathered
    num_slots, _, r = lora_b[0].shape
    h = h.to(y.dtype)
    bags = _bags(batch, split, ranks, r, len(lora_b)) if _torch_layout(lora_b) else None
    deltas = []
    for p, b in enumerate(lora_b):
        width = b.shape[1]
        if bags is not None:  # B_p stored [S, r, out]: token t sums rows slot_t * r + j weighted by h
            weights = h.reshape(-1).index_select(0, bags.weight_index[p])
            rows_of_b = b.transpose(1, 2).view(num_slots * r, width)
            deltas.append(_bag_sum(rows_of_b, bags.indices, bags.offsets, weights))
        else:
            deltas.append(
                torch.bmm(b.index_select(0, slots), h[:, p * r : (p + 1) * r].unsqueeze(2)).view(n, width)
            )
    if isinstance(rows, slice):
        offset = 0
        for delta in deltas:
            y[rows, offset : offset + delta.shape[1]].add_(delta)
            offset += delta.shape[1]
    else:  # whole rows in one index_add_ (see _expand_segment)
        y.index_add_(0, rows, deltas[0] if len(deltas) == 1 else torch.cat(deltas, dim=1))


# ---- helpers


def _bag_sum(
    weight: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor, per_sample_weights: torch.Tensor
) -> torch.Tensor:
    """out[b] = sum_i per_sample_weights[i] * weight[indices[i]] over bag b's i (embedding_bag, mode sum).

    Called through torch.embedding_bag rather than F.embedding_bag: ~2 us less per call.
    """
    return torch.embedding_bag(weight, indices, offsets, False, 0, False, per_sample_weights, False)[0]


def _row_list(rows: Rows) -> list[int]:
    return list(range(rows.start, rows.stop)) if isinstance(rows, slice) else rows.tolist()


def _torch_layout(lora_b: Sequence[torch.Tensor]) -> bool:
    return all(b.transpose(1, 2).is_contiguous() for b in lora_b)


def _slot_bytes(like: torch.Tensor, elements: Sequence[int]) -> float:
    return float(sum(elements) * like.element_size())


def _host_ranks(slot_ranks: torch.Tensor | None, num_slots: int, rank: int) -> list[int]:
    return slot_ranks.tolist() if slot_ranks is not None else [rank] * num_slots


def _write_rows(h: torch.Tensor, rows: Rows, values: torch.Tensor) -> None:
    if isinstance(rows, slice):
        h[rows] = values
    else:
        h.index_copy_(0, rows, values)
