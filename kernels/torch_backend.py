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
a decode batch), and takes the cheaper. `plan_step` makes that choice once per step and stack
shape (and the gathered rows' index or bags the chosen path reads), before the first layer runs;
every layer's `add_lora` only reads the plan.

Mixtures: a step with several (slot, weight) pairs per token comes as passes (kernels.metadata),
each run like a single-adapter step with its rows' weights multiplied into h.

This module does not know adapters, slots' owners or the model; only stacks and a step's metadata.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

import torch

from kernels.metadata import AdapterBatch, AdapterStep, Rows, as_rows
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
    """Which tokens of one pass take which path: looped segments, the other tokens gathered."""

    loop_segments: tuple[int, ...]  # segment indices run as per-slot matmuls
    gather_rows: Rows  # rows run as one gathered product, in row order
    gather_slots: torch.Tensor  # [num_gathered] int64, slot of each gathered row
    gather_slot_list: tuple[int, ...]  # the same on the host
    gather_unique_slots: tuple[int, ...]  # the slots of the gathered segments
    gather_weights: torch.Tensor | None  # [num_gathered] fp32 pair weights; None = all 1.0
    loop_weights: tuple[torch.Tensor | None, ...]  # per looped segment, its rows' weights [n, 1]

    @property
    def num_gathered(self) -> int:
        return len(self.gather_slot_list)


@dataclass(frozen=True)
class _Bags:
    """embedding_bag inputs for the gathered expand: token t sums rows slot_t * r + j, j < rank."""

    indices: torch.Tensor  # [sum of ranks] int64, rows of B viewed as [S * r, out]
    offsets: torch.Tensor  # [num_gathered] int64
    weight_index: tuple[torch.Tensor, ...]  # per slice p: [sum of ranks] int64 into h.view(-1)


# What the plan of a stack depends on: one slot's weight bytes, P, whether it takes the fused kernel.
_StackKey = tuple[float, int, bool]
_BagKey = tuple[int, int, tuple[int, ...]]  # r, P, ranks of the gathered slots


@dataclass(frozen=True)
class _StackPlan:
    """One pass's plan for the stacks of one shape: the split, and what its gather path reads."""

    split: _Split
    row_index: torch.Tensor | None  # fused kernel: the gathered rows as int64
    input_bags: Mapping[int, tuple[torch.Tensor, torch.Tensor]]  # torch-ops shrink, by d_in
    bags: Mapping[int, _Bags]  # torch-ops expand, by id(stack) (shared by stacks of one rank pattern)


@dataclass(frozen=True)
class TorchPlan:
    """A step's plan, made once by TorchBackend.plan_step and read by every add_lora of the step."""

    passes: tuple[Mapping[_StackKey, _StackPlan], ...]  # one per pass of the step


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
        """h = w[t] * scale[slot] * x @ A[slot]^T per token, fused over P slices; see kernels.shrink.lora_shrink."""
        num_slots, rows, _ = lora_a.shape
        scale2 = scale.view(num_slots, -1)
        h = torch.zeros(batch.num_tokens, rows, dtype=torch.float32, device=x.device)
        if not batch.has_adapters:
            return h
        ranks = _host_ranks(slot_ranks, num_slots, rows // scale2.shape[1])
        split = self._split(batch, _slot_bytes(lora_a, [rows * lora_a.shape[2]]), scale2.shape[1])
        scales = scale2.tolist()
        for i, weights in zip(split.loop_segments, split.loop_weights, strict=True):
            slot = batch.segment_slots[i]
            if ranks[slot]:
                seg_rows = batch.segment_rows[i]
                h_seg = _shrink_segment(x, lora_a, slot, seg_rows, scales[slot])
                _write_rows(h, seg_rows, h_seg if weights is None else h_seg.mul_(weights))
        if split.num_gathered:
            bags = _input_bags(split, lora_a.shape[2]) if lora_a.transpose(1, 2).is_contiguous() else None
            _write_rows(h, split.gather_rows, _shrink_gathered(x, lora_a, split, scale2, bags))
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
            bags = _bags(split, ranks, rank, len(b_slices)) if _torch_layout(b_slices) else None
            _expand_gathered(h_gathered.to(y.dtype), b_slices, split, bags, y)

    # ---- the step's plan and the call layers make

    def plan_step(self, step: AdapterStep, stacks: Iterable[LoraStack]) -> TorchPlan:
        """Everything add_lora needs for `step` over `stacks`, made once per step.

        Per pass and per stack shape: which segments loop and which tokens gather (the cost model),
        and only what that path reads: the gathered rows as an index for the fused kernel, or
        embedding_bag bags (per d_in and per rank pattern of the gathered slots) for the torch ops.
        """
        shapes: dict[_StackKey, list[LoraStack]] = {}
        for stack in stacks:
            shapes.setdefault(self._stack_key(stack), []).append(stack)
        passes = []
        for batch in step.passes:
            plans: dict[_StackKey, _StackPlan] = {}
            splits: dict[tuple[int, ...], _Split] = {}
            for key, same_shape in shapes.items():
                loop = self._loop_set(batch, key)
                split = splits.get(loop)
                if split is None:
                    split = splits[loop] = _split_at(batch, loop)
                plans[key] = _plan_gather(split, same_shape, fused=key[2])
            passes.append(MappingProxyType(plans))
        return TorchPlan(tuple(passes))

    def add_lora(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        stack: LoraStack,
        step: AdapterStep | AdapterBatch,
        plan: object = None,
    ) -> None:
        """y += the adapter term of every token: per pass, shrink then expand, per projection slice of y.

        `plan` (or step.plan) comes from plan_step; without one the plan is made for this call alone.
        Scales (and pair weights) are applied to h on the segment path, as the expand's alpha when
        the pass has no weights (no extra call per slot).
        """
        if isinstance(step, AdapterBatch):
            step = AdapterStep(step.num_tokens, (step,))
        if not step.has_adapters:
            return
        plan = plan if plan is not None else step.plan
        key = self._stack_key(stack)
        if not isinstance(plan, TorchPlan) or key not in plan.passes[0]:
            plan = self.plan_step(step, (stack,))
        fused = key[2] and _fusable_io(x, y)
        for batch, pass_plans in zip(step.passes, plan.passes, strict=True):
            if batch.has_adapters:
                self._add_pass(x, y, stack, batch, pass_plans[key], fused)

    def _add_pass(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        stack: LoraStack,
        batch: AdapterBatch,
        plan: _StackPlan,
        fused: bool,
    ) -> None:
        split = plan.split
        for i, weights in zip(split.loop_segments, split.loop_weights, strict=True):
            slot = batch.segment_slots[i]
            rank = stack.host_ranks[slot]
            if rank:
                seg_rows = batch.segment_rows[i]
                x_seg = x[seg_rows] if isinstance(seg_rows, slice) else x.index_select(0, seg_rows)
                h_seg = torch.mm(x_seg, stack.lora_a[slot].t())  # [n, P * r], unscaled
                if weights is not None:
                    h_seg.mul_(weights)
                _expand_segment(h_seg, stack.lora_b, slot, rank, seg_rows, y, stack.host_scales[slot])
        if not split.num_gathered:
            return
        if fused:
            a_t, b_t = stack.transposed
            rows = plan.row_index if plan.row_index is not None else _row_index(split)
            torch.ops.loramux_cpu.lora_gather(
                x, y, rows, split.gather_slots, a_t, b_t, stack.scale, stack.slot_ranks, split.gather_weights
            )
            return
        input_bags = bags = None
        if stack.in_torch_layout:  # else batched matmuls over gathered weights
            input_bags = plan.input_bags.get(stack.in_features) or _input_bags(split, stack.in_features)
            bags = plan.bags.get(id(stack)) or _bags(
                split, stack.host_ranks, stack.max_rank, stack.num_slices
            )
        h = _shrink_gathered(x, stack.lora_a, split, stack.scale, input_bags)
        _expand_gathered(h, stack.lora_b, split, bags, y)

    # ---- strategy

    def _stack_key(self, stack: LoraStack) -> _StackKey:
        r = stack.max_rank
        weight_bytes = [stack.num_slices * r * stack.in_features] + [w * r for w in stack.output_slices]
        return (
            _slot_bytes(stack.lora_a, weight_bytes),
            stack.num_slices,
            self.fused_gather and _fusable(stack),
        )

    def _loop_set(self, batch: AdapterBatch, key: _StackKey) -> tuple[int, ...]:
        if self.strategy == "segments":
            return tuple(range(batch.num_segments))
        if self.strategy == "gather":
            return ()
        slot_bytes, num_slices, fused_gather = key
        gather_calls = 1 if fused_gather else 4 + 3 * num_slices
        return _cheapest_loop_set(batch, slot_bytes, num_slices, gather_calls)

    def _split(self, batch: AdapterBatch, slot_bytes: float, num_slices: int) -> _Split:
        """For the public ops: this call's split, planned on the spot."""
        return _split_at(batch, self._loop_set(batch, (slot_bytes, num_slices, False)))


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
    """Loop these segments, gather the others' tokens (in row order)."""
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
    loop_weights = []
    for i in loop_segments:
        weights = batch.row_weights(batch.segment_rows[i])
        loop_weights.append(None if weights is None else weights.view(-1, 1))
    return _Split(
        loop_segments=loop_segments,
        gather_rows=gather_rows,
        gather_slots=slots,
        gather_slot_list=tuple(slot_list),
        gather_unique_slots=tuple(batch.segment_slots[i] for i in gathered),
        gather_weights=batch.row_weights(gather_rows) if gathered else None,
        loop_weights=tuple(loop_weights),
    )


def _plan_gather(split: _Split, stacks: Sequence[LoraStack], *, fused: bool) -> _StackPlan:
    """What the gather path of these same-shape stacks reads: only for the path they take."""
    if not split.num_gathered:
        return _StackPlan(split, None, MappingProxyType({}), MappingProxyType({}))
    if fused:
        return _StackPlan(split, _row_index(split), MappingProxyType({}), MappingProxyType({}))
    input_bags = {}
    by_pattern: dict[_BagKey, _Bags] = {}
    bags: dict[int, _Bags] = {}
    for stack in stacks:
        if not stack.in_torch_layout:
            continue  # batched matmuls instead of bags
        if stack.in_features not in input_bags:
            input_bags[stack.in_features] = _input_bags(split, stack.in_features)
        key = _bag_key(split, stack)
        if key not in by_pattern:
            by_pattern[key] = _bags(split, stack.host_ranks, stack.max_rank, stack.num_slices)
        bags[id(stack)] = by_pattern[key]
    return _StackPlan(split, None, MappingProxyType(input_bags), MappingProxyType(bags))


def _bag_key(split: _Split, stack: LoraStack) -> _BagKey:
    return (stack.max_rank, stack.num_slices, tuple(stack.host_ranks[s] for s in split.gather_unique_slots))


def _fusable(stack: LoraStack) -> bool:
    return stack.lora_a.device.type == "cpu" and stack.lora_a.dtype == torch.float32 and stack.in_torch_layout


def _fusable_io(x: torch.Tensor, y: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dim() == y.dim() == 2
        and x.stride(1) == y.stride(1) == 1
        and x.dtype == y.dtype == torch.float32
    )


def _row_index(split: _Split) -> torch.Tensor:
    """The gathered rows as an int64 index (a run of rows becomes an arange)."""
    rows = split.gather_rows
    if not isinstance(rows, slice):
        return rows
    return torch.arange(rows.start, rows.stop, dtype=torch.int64, device=split.gather_slots.device)


def _input_bags(split: _Split, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shrink bags: token t sums rows slot_t * d_in + k weighted by x[t, k]."""
    slots = split.gather_slots
    indices = ((slots * in_features).view(-1, 1) + torch.arange(in_features, device=slots.device)).view(-1)
    offsets = torch.arange(0, split.num_gathered * in_features, in_features, device=slots.device)
    return indices, offsets


def _bags(split: _Split, ranks: Sequence[int], r: int, num_slices: int) -> _Bags:
    """Expand bags for one rank pattern: token t sums rows slot_t * r + j, j < rank."""
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
    return _Bags(
        indices=torch.tensor(indices, dtype=torch.int64).to(device),
        offsets=torch.tensor(offsets, dtype=torch.int64).to(device),
        weight_index=tuple((index + p * r).to(device) for p in range(num_slices)),
    )


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
    x: torch.Tensor,
    lora_a: torch.Tensor,
    split: _Split,
    scale: torch.Tensor,
    input_bags: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """w_t * scale[s_t] * x[t] @ A[s_t]^T for the gathered tokens -> [n, P * r] fp32."""
    rows, slots, n = split.gather_rows, split.gather_slots, split.num_gathered
    x_g = x[rows] if isinstance(rows, slice) else x.index_select(0, rows)
    num_slots, width, in_features = lora_a.shape
    if input_bags is not None:  # torch layout: h[t] = sum_k x[t, k] * A^T[s_t, k, :], an embedding bag
        a_t = lora_a.transpose(1, 2)  # [S, d_in, P * r], contiguous
        indices, offsets = input_bags
        h = _bag_sum(a_t.view(num_slots * in_features, width), indices, offsets, x_g.reshape(-1))
    else:
        h = torch.bmm(lora_a.index_select(0, slots), x_g.unsqueeze(2)).view(n, width)
    h = h.float()
    scale2 = scale.view(num_slots, -1)
    num_slices = scale2.shape[1]
    token_scale = scale2.index_select(0, slots)  # [n, P]
    if split.gather_weights is not None:
        token_scale = token_scale * split.gather_weights.view(-1, 1)
    h.view(n, num_slices, -1).mul_(token_scale.view(n, num_slices, 1))
    return h


def _expand_gathered(
    h: torch.Tensor,  # [n, P * r], the gathered tokens
    lora_b: Sequence[torch.Tensor],
    split: _Split,
    bags: _Bags | None,  # None: not the torch layout, batched matmuls instead
    y: torch.Tensor,
) -> None:
    """y[t, slice_p] += h[t, slice p] @ B_p[s_t]^T for the gathered tokens."""
    rows, slots, n = split.gather_rows, split.gather_slots, split.num_gathered
    num_slots, _, r = lora_b[0].shape
    h = h.to(y.dtype)
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


def lora_gather_ref(
    x: torch.Tensor,
    y: torch.Tensor,
    rows: torch.Tensor,
    slots: torch.Tensor,
    a_t: torch.Tensor,
    b_t: Sequence[torch.Tensor],
    scale: torch.Tensor,
    ranks: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> None:
    """The reference for torch.ops.loramux_cpu.lora_gather (kernels/csrc/lora_gather.h), in place::

        y[rows[i], slice p] += weights[i] * scale[s, p] * (x[rows[i]] @ A_p[s]^T)[:rank_s] @ B_p[s]^T[:rank_s]

    with s = slots[i], A^T = a_t [S, d_in, P * r], B_p^T = b_t[p] [S, r, out_p]; weights None = 1.0.
    """
    r = a_t.shape[2] // len(b_t)
    w = torch.ones(rows.numel()) if weights is None else weights
    for i, (row, slot) in enumerate(zip(rows.tolist(), slots.tolist(), strict=True)):
        rank = int(ranks[slot])
        h = x[row] @ a_t[slot]  # [P * r]
        offset = 0
        for p, b in enumerate(b_t):
            coef = w[i] * scale[slot, p] * h[p * r : p * r + rank]
            y[row, offset : offset + b.shape[2]] += coef @ b[slot, :rank]
            offset += b.shape[2]
