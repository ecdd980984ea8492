"""mos_shrink / mos_expand: LoRA terms of Mixture-of-Shards adapters, gathering shards inside the kernel.

A MoS adapter keeps, per projection type, one pool pair shared by all layers, pool_A [N, d_in/l] and
pool_B [N, out/l], and per (layer, projection) index tables of r*l rows:
`A = pool_A[index_A].reshape(r, d_in)` (row j of A is the concatenation of the l shards
pool_A[index_A[j*l + i]], i = 0..l-1), `B = pool_B[index_B].reshape(r, out).T`, `y += scale * B (A x)`.
The slots here hold exactly that (pools once per slot and projection, tables per layer) and the
kernels read A and B through the tables, so a slot costs the pools' bytes, not r * L * (d_in + out).

Layout (`MosStack`, one per fused projection group, all layers; S slots, P projections, L layers):

    pool_a  [S, CA + d_in]           the P projections' pool_A rows, flat, then d_in zeros
    pool_b  [S, CB + max(out_p)]     the P projections' pool_B rows, flat, then zeros
    index_a [L, S, P, R * Lmax] int32  entry j*l + i: the element offset in pool_a[s] of shard i of row j
    index_b [L, S, P, R * Lmax] int32  the same into pool_b[s] (column block i of B^T's row j)
    shards  [S] int32                  l of the slot's adapter (1 when empty)
    scale   [L, S, P] float32          lora_alpha / r where (layer, projection) is adapted, else 0
    slot_ranks [S] int32               r of the slot's adapter (0 = empty)

Tables hold element offsets, not row numbers: the kernels add one offset per shard and need no
per-projection base or row width, and l may differ per slot. Entries past a slot's r*l, and every
entry of an unadapted (layer, projection), point at the zeros, so padding reads zeros like a LoRA
stack's padding does, and the ranks only skip work.

Grids are those of kernels/shrink.py and kernels/expand.py (token blocks, P x rank or column blocks,
segments). The shrink walks d_in shard by shard: one table entry per (row, shard), then contiguous
pool reads. The expand gathers per (row, column): a column block may straddle two shards of B^T, and
the table entries it reads are a few hundred bytes per slot, cache-resident.
This module knows no adapter file format (adapters_store builds the slot data from MosAdapter).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.expand import _slice_offsets
from kernels.metadata import AdapterBatch, AdapterStep


@triton.jit
def _mos_shrink_kernel(
    # Pointers
    x_ptr,  # [T, K]
    pool_ptr,  # [S, CA'] the slots' A shard pools, flat (element stride 1)
    index_ptr,  # [S, P, R * Lmax] int32 element offsets into pool[s] (stride 1 along the table)
    shards_ptr,  # [S] int32: l per slot
    h_ptr,  # [T, P * R] fp32, zero-initialised
    scale_ptr,  # [S, P] fp32
    ranks_ptr,  # [S] int32 (read only when HAS_RANKS)
    weights_ptr,  # [T] fp32 per-row pair weight (read only when HAS_WEIGHTS)
    token_order_ptr,  # [num_adapted_tokens] int64: rows grouped by segment
    segment_table_ptr,  # [3, G] int32: slot, start, length
    # Sizes
    num_segments,
    K,
    R,  # max rank
    # Strides
    stride_xt,
    stride_xk,
    stride_ps,
    stride_is,
    stride_ip,
    stride_ht,
    stride_hr,
    stride_ss,
    stride_sp,
    # Meta-parameters
    HAS_RANKS: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Grid: (token blocks of the longest segment, P x rank blocks, segments).
    pid_m = tl.program_id(0)
    pid_pr = tl.program_id(1)
    pid_seg = tl.program_id(2)
    seg_len = tl.load(segment_table_ptr + 2 * num_segments + pid_seg)
    if pid_m * BLOCK_M >= seg_len:
        return
    slot = tl.load(segment_table_ptr + pid_seg).to(tl.int64)
    seg_start = tl.load(segment_table_ptr + num_segments + pid_seg)
    rank = R
    if HAS_RANKS:
        rank = tl.load(ranks_ptr + slot)
    r_blocks = tl.cdiv(R, BLOCK_R)
    pid_p = pid_pr // r_blocks
    pid_r = pid_pr % r_blocks
    if pid_r * BLOCK_R >= rank:  # all padding: h stays zero
        return
    num_shards = tl.load(shards_ptr + slot)
    width = K // num_shards  # d_in / l: one shard

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < seg_len
    rows = tl.load(token_order_ptr + seg_start + offs_m, mask=mask_m, other=0).to(tl.int64)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank
    offs_k = tl.arange(0, BLOCK_K)
    table = index_ptr + slot * stride_is + pid_p * stride_ip + offs_r * num_shards  # [BLOCK_R] row starts
    pool = pool_ptr + slot * stride_ps

    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for i in range(0, num_shards):  # shard i of every row: columns i*width : (i+1)*width of A
        shard_offs = tl.load(table + i, mask=mask_r, other=0)  # [BLOCK_R] element offsets in the pool
        for c in range(0, tl.cdiv(width, BLOCK_K)):
            offs_c = c * BLOCK_K + offs_k
            mask_c = offs_c < width
            x = tl.load(
                x_ptr + rows[:, None] * stride_xt + (i * width + offs_c)[None, :] * stride_xk,
                mask=mask_m[:, None] & mask_c[None, :],
                other=0.0,
            ).to(tl.float32)
            a = tl.load(
                pool + shard_offs[None, :] + offs_c[:, None],
                mask=mask_c[:, None] & mask_r[None, :],
                other=0.0,
            ).to(tl.float32)
            acc += tl.dot(x, a, input_precision="ieee")  # [BLOCK_M, BLOCK_R]
    acc *= tl.load(scale_ptr + slot * stride_ss + pid_p * stride_sp)
    if HAS_WEIGHTS:  # a mixture's pair weight, per row
        acc *= tl.load(weights_ptr + rows, mask=mask_m, other=0.0)[:, None]

    h_ptrs = h_ptr + rows[:, None] * stride_ht + (pid_p * R + offs_r)[None, :] * stride_hr
    tl.store(h_ptrs, acc, mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _mos_expand_kernel(
    # Pointers
    h_ptr,  # [T, P * R] fp32
    pool_ptr,  # [S, CB'] the slots' B shard pools, flat (element stride 1)
    index_ptr,  # [S, P, R * Lmax] int32 element offsets into pool[s] (stride 1 along the table)
    shards_ptr,  # [S] int32: l per slot
    y_ptr,  # [T, N], updated in place
    ranks_ptr,  # [S] int32 (read only when HAS_RANKS)
    slice_offsets_ptr,  # [P + 1] int32: projection p writes columns offsets[p] : offsets[p + 1]
    token_order_ptr,  # [num_adapted_tokens] int64: rows grouped by segment
    segment_table_ptr,  # [3, G] int32: slot, start, length
    # Sizes
    num_segments,
    R,  # max rank
    n_blocks,  # column blocks of the widest slice
    # Strides
    stride_ht,
    stride_hr,
    stride_ps,
    stride_is,
    stride_ip,
    stride_yt,
    stride_yn,
    # Meta-parameters
    HAS_RANKS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # Grid: (token blocks of the longest segment, P x column blocks, segments).
    pid_m = tl.program_id(0)
    pid_pn = tl.program_id(1)
    pid_seg = tl.program_id(2)
    seg_len = tl.load(segment_table_ptr + 2 * num_segments + pid_seg)
    if pid_m * BLOCK_M >= seg_len:
        return
    pid_p = pid_pn // n_blocks
    pid_n = pid_pn % n_blocks
    slice_start = tl.load(slice_offsets_ptr + pid_p)
    n_start = slice_start + pid_n * BLOCK_N
    n_end = tl.load(slice_offsets_ptr + pid_p + 1)
    if n_start >= n_end:
        return
    slot = tl.load(segment_table_ptr + pid_seg).to(tl.int64)
    seg_start = tl.load(segment_table_ptr + num_segments + pid_seg)
    rank = R
    if HAS_RANKS:
        rank = tl.load(ranks_ptr + slot)
    num_shards = tl.load(shards_ptr + slot)
    width = (n_end - slice_start) // num_shards  # out_p / l: one shard of a row of B^T

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < seg_len
    rows = tl.load(token_order_ptr + seg_start + offs_m, mask=mask_m, other=0).to(tl.int64)
    offs_n = n_start + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_end
    shard = (offs_n - slice_start) // width  # [BLOCK_N]: which shard each column lies in
    col = (offs_n - slice_start) - shard * width
    offs_r = tl.arange(0, BLOCK_R)
    h_ptrs = h_ptr + rows[:, None] * stride_ht + (pid_p * R + offs_r)[None, :] * stride_hr
    table = index_ptr + slot * stride_is + pid_p * stride_ip + shard[None, :]  # [1, BLOCK_N]
    pool = pool_ptr + slot * stride_ps

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r in range(0, tl.cdiv(rank, BLOCK_R)):  # stops at the slot's rank: padding is skipped
        offs_rr = r * BLOCK_R + offs_r
        mask_r = offs_rr < rank
        h = tl.load(h_ptrs, mask=mask_m[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
        mask_b = mask_r[:, None] & mask_n[None, :]
        shard_offs = tl.load(
            table + offs_rr[:, None] * num_shards, mask=mask_b, other=0
        )  # [BLOCK_R, BLOCK_N]
        b = tl.load(pool + shard_offs + col[None, :], mask=mask_b, other=0.0).to(tl.float32)
        acc += tl.dot(h, b, input_precision="ieee")  # [BLOCK_M, BLOCK_N]
        h_ptrs += BLOCK_R * stride_hr

    y_ptrs = y_ptr + rows[:, None] * stride_yt + offs_n[None, :] * stride_yn
    mask = mask_m[:, None] & mask_n[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + acc).to(y_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True, eq=False)
class MosLayer:
    """One layer's view of a MosStack: what mos_shrink / mos_expand read (shapes in the module doc)."""

    pool_a: torch.Tensor  # [S, CA'] flat, element stride 1
    pool_b: torch.Tensor  # [S, CB'] flat, element stride 1
    index_a: torch.Tensor  # [S, P, R * Lmax] int32
    index_b: torch.Tensor  # [S, P, R * Lmax] int32
    shards: torch.Tensor  # [S] int32
    scale: torch.Tensor  # [S, P] float32
    slot_ranks: torch.Tensor  # [S] int32
    in_features: int
    output_slices: tuple[int, ...]
    max_rank: int

    @property
    def num_slices(self) -> int:
        return len(self.output_slices)


def _check(layer: MosLayer, batch: AdapterBatch, device: torch.device) -> None:
    num_slots, num_slices = layer.scale.shape
    assert num_slices == layer.num_slices, (layer.scale.shape, layer.output_slices)
    assert layer.index_a.shape == layer.index_b.shape and layer.index_a.shape[:2] == (num_slots, num_slices)
    assert layer.index_a.dtype == layer.index_b.dtype == torch.int32
    assert layer.index_a.stride(2) == layer.index_b.stride(2) == 1, "index tables must be contiguous rows"
    assert layer.pool_a.stride(1) == layer.pool_b.stride(1) == 1, "pools must be flat rows"
    assert batch.token_order.device == device == layer.pool_a.device, (
        "batch, inputs and pools must share a device"
    )


def mos_shrink(x: torch.Tensor, layer: MosLayer, batch: AdapterBatch) -> torch.Tensor:
    """Per token, project x by its adapter's A, gathered from shard pools; fused over P projections.

    Semantics (s = batch.slot_ids, w = batch.weights or 1.0, l = layer.shards[s], d = d_in / l,
    A_p[s][j, i*d : (i+1)*d] = pool_a[s, index_a[s, p, j*l + i] : ... + d]; rows without adapter: 0)::

        h[t].view(P, r) = w[t] * scale[s[t]].view(P, 1) * stack_p(x[t] @ A_p[s[t]].T)

    Shape:
        x: [T, d_in]; layer: a MosLayer of P projections, max rank r; returns h: [T, P * r].
    DType:
        x, pools: float32 / bfloat16 / float16; tables, shards, ranks: int32; scale, h: float32.
    """
    # 1) check shapes
    num_tokens, in_features = x.shape
    _check(layer, batch, x.device)
    assert in_features == layer.in_features and batch.num_tokens == num_tokens, (x.shape, batch.num_tokens)
    rank, num_slices = layer.max_rank, layer.num_slices
    # 2) allocate the output (rows of tokens without an adapter stay zero)
    h = torch.zeros(num_tokens, num_slices * rank, dtype=torch.float32, device=x.device)
    if not batch.has_adapters:
        return h
    # 3) launch
    block_m = 16 if batch.max_segment_length <= 16 else 32
    block_r = max(16, min(64, triton.next_power_of_2(rank)))
    block_k = max(16, min(128, triton.next_power_of_2(in_features)))
    grid = (
        triton.cdiv(batch.max_segment_length, block_m),
        num_slices * triton.cdiv(rank, block_r),
        batch.num_segments,
    )
    _mos_shrink_kernel[grid](
        x,
        layer.pool_a,
        layer.index_a,
        layer.shards,
        h,
        layer.scale,
        layer.slot_ranks,
        batch.weights if batch.weights is not None else layer.scale,  # unread placeholder when no weights
        batch.token_order,
        batch.segment_table,
        batch.num_segments,
        in_features,
        rank,
        x.stride(0),
        x.stride(1),
        layer.pool_a.stride(0),
        layer.index_a.stride(0),
        layer.index_a.stride(1),
        h.stride(0),
        h.stride(1),
        layer.scale.stride(0),
        layer.scale.stride(1),
        HAS_RANKS=True,
        HAS_WEIGHTS=batch.weights is not None,
        BLOCK_M=block_m,
        BLOCK_R=block_r,
        BLOCK_K=block_k,
    )
    return h


def mos_expand(h: torch.Tensor, layer: MosLayer, batch: AdapterBatch, y: torch.Tensor) -> None:
    """Per token, add its adapter's up-projection of h to y, B gathered from shard pools; fused over P.

    Semantics (s = batch.slot_ids, l = layer.shards[s], d_p = out_p / l, o_p = sum of the widths
    before slice p, B_p[s].T[j, i*d_p : (i+1)*d_p] = pool_b[s, index_b[s, p, j*l + i] : ... + d_p];
    tokens with s[t] == -1 are left unchanged)::

        y[t, o_p : o_p + out_p] += h[t, p*r : (p+1)*r] @ B_p[s[t]].T

    Shape:
        h: [T, P * r]; layer: a MosLayer of P projections, max rank r; y: [T, sum(out_p)].
    DType:
        h: float32; pools, y: float32 / bfloat16 / float16 (accumulated in fp32); tables: int32.
    """
    # 1) check shapes
    num_tokens = h.shape[0]
    _check(layer, batch, h.device)
    rank, widths = layer.max_rank, layer.output_slices
    assert tuple(h.shape) == (num_tokens, len(widths) * rank), (tuple(h.shape), widths, rank)
    assert tuple(y.shape) == (num_tokens, sum(widths)), (tuple(y.shape), num_tokens, widths)
    assert batch.num_tokens == num_tokens, (batch.num_tokens, num_tokens)
    # 2) nothing to allocate: y is updated in place
    if not batch.has_adapters:
        return
    # 3) launch
    block_m = 16 if batch.max_segment_length <= 16 else 32
    block_n = max(16, min(128, triton.next_power_of_2(max(widths))))
    block_r = max(16, min(64, triton.next_power_of_2(rank)))
    n_blocks = triton.cdiv(max(widths), block_n)
    grid = (triton.cdiv(batch.max_segment_length, block_m), len(widths) * n_blocks, batch.num_segments)
    _mos_expand_kernel[grid](
        h,
        layer.pool_b,
        layer.index_b,
        layer.shards,
        y,
        layer.slot_ranks,
        _slice_offsets(widths, y.device),
        batch.token_order,
        batch.segment_table,
        batch.num_segments,
        rank,
        n_blocks,
        h.stride(0),
        h.stride(1),
        layer.pool_b.stride(0),
        layer.index_b.stride(0),
        layer.index_b.stride(1),
        y.stride(0),
        y.stride(1),
        HAS_RANKS=True,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_R=block_r,
    )


def mos_factors(layer: MosLayer, slot: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Slot `slot`'s factors gathered from its pools, fp32: A [P * r, d_in] and per projection
    B_p [out_p, r] (rows / columns past its rank read the zeros)."""
    rank, num_slices = layer.max_rank, layer.num_slices
    num_shards = int(layer.shards[slot])
    table_a = layer.index_a[slot, :, : rank * num_shards].long()  # [P, r * l]
    table_b = layer.index_b[slot, :, : rank * num_shards].long()
    pool_a, pool_b = layer.pool_a[slot].float(), layer.pool_b[slot].float()
    d = layer.in_features // num_shards
    a = pool_a[table_a.unsqueeze(-1) + torch.arange(d, device=pool_a.device)]  # [P, r * l, d]
    b = []
    for p, width in enumerate(layer.output_slices):
        d_p = width // num_shards
        b_t = pool_b[table_b[p].unsqueeze(-1) + torch.arange(d_p, device=pool_b.device)]  # [r * l, d_p]
        b.append(b_t.reshape(rank, width).T)
    return a.reshape(num_slices * rank, layer.in_features), b


def mos_shrink_ref(x: torch.Tensor, layer: MosLayer, batch: AdapterBatch) -> torch.Tensor:
    """The reference for mos_shrink: each used slot's A gathered in torch, then a per-token product, fp32.

    Reads only batch.slot_ids and batch.weights."""
    num_tokens = x.shape[0]
    rank, num_slices = layer.max_rank, layer.num_slices
    h = torch.zeros(num_tokens, num_slices * rank, dtype=torch.float32, device=x.device)
    slots = batch.slot_ids.long()
    weights = batch.weights
    for slot in sorted(set(slots.tolist()) - {-1}):
        rows = (slots == slot).nonzero().view(-1)
        a, _ = mos_factors(layer, slot)
        part = (x[rows].float() @ a.T).view(-1, num_slices, rank) * layer.scale[slot].view(1, -1, 1)
        part = part.reshape(-1, num_slices * rank)
        h[rows] = part if weights is None else part * weights[rows].float().view(-1, 1)
    return h


def mos_expand_ref(h: torch.Tensor, layer: MosLayer, batch: AdapterBatch, y: torch.Tensor) -> None:
    """The reference for mos_expand: each used slot's B gathered in torch, then a per-token product, fp32.

    Reads only batch.slot_ids."""
    rank = layer.max_rank
    slots = batch.slot_ids.long()
    out = y.float()
    for slot in sorted(set(slots.tolist()) - {-1}):
        rows = (slots == slot).nonzero().view(-1)
        _, b = mos_factors(layer, slot)
        deltas = [h[rows, p * rank : (p + 1) * rank].float() @ b_p.T for p, b_p in enumerate(b)]
        out[rows] += torch.cat(deltas, dim=1)
    y.copy_(out.to(y.dtype))


def mos_add(
    x: torch.Tensor,
    y: torch.Tensor,
    layer: MosLayer,
    step: AdapterStep | AdapterBatch,
    *,
    reference: bool = False,
) -> None:
    """y[t, slice p] += sum_k w_tk * scale[s_tk, p] * (x[t] @ A_p[s_tk]^T) @ B_p[s_tk]^T over every
    pass of the step (reference=True: the torch references, on any device)."""
    shrink, expand = (mos_shrink_ref, mos_expand_ref) if reference else (mos_shrink, mos_expand)
    passes = (step,) if isinstance(step, AdapterBatch) else step.passes
    for batch in passes:  # one shrink + expand per pass: rows are distinct inside a pass
        if batch.has_adapters:
            expand(shrink(x, layer, batch), layer, batch, y)


@dataclass(frozen=True, eq=False)
class MosSlotData:
    """One adapter's part of one MosStack, laid out for its slot (MosStack.slot_data): set_slot copies it."""

    pool_a: torch.Tensor  # [n_a] the P projections' pool_A rows, flat
    pool_b: torch.Tensor  # [n_b]
    index_a: torch.Tensor  # [L, P, R * Lmax] int32 element offsets
    index_b: torch.Tensor  # [L, P, R * Lmax] int32
    shards: int
    rank: int
    scale: torch.Tensor  # [L, P] float32
    adapted: tuple[bool, ...]  # per layer: whether any projection of the group is adapted

    @property
    def nbytes(self) -> int:
        tensors = (self.pool_a, self.pool_b, self.index_a, self.index_b, self.scale)
        return sum(t.numel() * t.element_size() for t in tensors)


ModulePools = tuple[torch.Tensor, torch.Tensor]  # pool_A [N, d_in / l], pool_B [N, out / l]
ModuleTables = tuple[torch.Tensor, torch.Tensor]  # index_A [r * l], index_B [r * l] row numbers


@dataclass(eq=False)
class MosStack:
    """The MoS adapters of every slot for one (possibly fused) projection group, all layers.

    Layout in the module docstring. Pool capacities are in elements: an adapter's pools fit when
    sum_p N_p * d_in / l <= capacity_a and sum_p N_p * out_p / l <= capacity_b.
    """

    pool_a: torch.Tensor
    pool_b: torch.Tensor
    index_a: torch.Tensor
    index_b: torch.Tensor
    shards: torch.Tensor
    scale: torch.Tensor
    slot_ranks: torch.Tensor
    in_features: int
    output_slices: tuple[int, ...]
    max_rank: int
    max_shards: int
    capacity_a: int
    capacity_b: int
    host_ranks: list[int]  # mirror of slot_ranks
    host_adapted: list[list[bool]]  # [L][S]: whether the slot adapts any projection of the layer

    @classmethod
    def empty(
        cls,
        num_slots: int,
        num_layers: int,
        in_features: int,
        output_slices: Sequence[int],
        *,
        max_rank: int,
        max_shards: int,
        capacity_a: int,
        capacity_b: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> MosStack:
        slices = tuple(output_slices)
        p = len(slices)
        table = (num_layers, num_slots, p, max_rank * max_shards)
        zero_a, zero_b = capacity_a, capacity_b
        assert capacity_a + in_features < 2**31 and capacity_b + max(slices) < 2**31, "int32 offsets"
        ints = functools.partial(torch.full, dtype=torch.int32, device=device)
        return cls(
            pool_a=torch.zeros(num_slots, capacity_a + in_features, dtype=dtype, device=device),
            pool_b=torch.zeros(num_slots, capacity_b + max(slices), dtype=dtype, device=device),
            index_a=ints(table, zero_a),
            index_b=ints(table, zero_b),
            shards=ints((num_slots,), 1),
            scale=torch.zeros(num_layers, num_slots, p, dtype=torch.float32, device=device),
            slot_ranks=ints((num_slots,), 0),
            in_features=in_features,
            output_slices=slices,
            max_rank=max_rank,
            max_shards=max_shards,
            capacity_a=capacity_a,
            capacity_b=capacity_b,
            host_ranks=[0] * num_slots,
            host_adapted=[[False] * num_slots for _ in range(num_layers)],
        )

    @property
    def num_layers(self) -> int:
        return int(self.index_a.shape[0])

    @property
    def num_slices(self) -> int:
        return len(self.output_slices)

    @property
    def nbytes_per_slot(self) -> int:
        tensors = (self.pool_a, self.pool_b, self.index_a, self.index_b, self.scale)
        per_slot = sum(t.numel() * t.element_size() for t in tensors) // int(self.pool_a.shape[0])
        return per_slot + 8  # + shards, rank

    def layer(self, layer: int) -> MosLayer:
        """Views of one layer's tables and scales (they follow every later set_slot / clear_slot)."""
        return MosLayer(
            pool_a=self.pool_a,
            pool_b=self.pool_b,
            index_a=self.index_a[layer],
            index_b=self.index_b[layer],
            shards=self.shards,
            scale=self.scale[layer],
            slot_ranks=self.slot_ranks,
            in_features=self.in_features,
            output_slices=self.output_slices,
            max_rank=self.max_rank,
        )

    def refusal(self, pools: Sequence[ModulePools | None], num_shards: int, rank: int) -> str | None:
        """Why an adapter with these pools (per projection, None = untargeted), l and r cannot fill a slot."""
        if rank > self.max_rank:
            return f"rank {rank} exceeds the MoS slots' max rank {self.max_rank}"
        if not 1 <= num_shards <= self.max_shards:
            return f"shards_per_vector {num_shards} is not in 1..{self.max_shards}"
        widths = (self.in_features, *self.output_slices)
        if any(w % num_shards for w in widths):
            return f"shards_per_vector {num_shards} does not divide the projection sizes {widths}"
        used_a = used_b = 0
        for p, (pair, width) in enumerate(zip(pools, self.output_slices, strict=True)):
            if pair is None:
                continue
            pool_a, pool_b = pair
            n = int(pool_a.shape[0])
            expected_a, expected_b = (n, self.in_features // num_shards), (n, width // num_shards)
            if tuple(pool_a.shape) != expected_a or tuple(pool_b.shape) != expected_b:
                return (
                    f"projection {p}: pools {tuple(pool_a.shape)} and {tuple(pool_b.shape)}, expected "
                    f"{expected_a} and {expected_b}"
                )
            used_a += pool_a.numel()
            used_b += pool_b.numel()
        if used_a > self.capacity_a or used_b > self.capacity_b:
            return (
                f"its shard pools ({used_a} + {used_b} values) exceed the MoS slot's capacity "
                f"({self.capacity_a} + {self.capacity_b})"
            )
        return None

    def slot_data(
        self,
        pools: Sequence[ModulePools | None],
        tables: Sequence[Sequence[ModuleTables | None]],
        *,
        num_shards: int,
        rank: int,
        scale: float,
    ) -> MosSlotData:
        """One adapter laid out for a slot (touches no slot: any thread). pools: per projection;
        tables: per layer, per projection, row numbers into the pools (None = not adapted)."""
        reason = self.refusal(pools, num_shards, rank)
        if reason is not None:
            raise ValueError(reason)
        if len(tables) != self.num_layers:
            raise ValueError(f"expected index tables for {self.num_layers} layers, got {len(tables)}")
        device, dtype = self.pool_a.device, self.pool_a.dtype
        width = self.max_rank * self.max_shards
        used = rank * num_shards
        base_a: list[int] = []
        base_b: list[int] = []
        flat_a: list[torch.Tensor] = []
        flat_b: list[torch.Tensor] = []
        offset_a = offset_b = 0
        for pair in pools:
            base_a.append(offset_a)
            base_b.append(offset_b)
            if pair is not None:
                flat_a.append(pair[0].reshape(-1))
                flat_b.append(pair[1].reshape(-1))
                offset_a += pair[0].numel()
                offset_b += pair[1].numel()
        index_a = torch.full((self.num_layers, self.num_slices, width), self.capacity_a, dtype=torch.int64)
        index_b = torch.full((self.num_layers, self.num_slices, width), self.capacity_b, dtype=torch.int64)
        scales = torch.zeros(self.num_layers, self.num_slices, dtype=torch.float32)
        for layer, per_projection in enumerate(tables):
            if len(per_projection) != self.num_slices:
                raise ValueError(
                    f"layer {layer}: expected {self.num_slices} index tables, got {len(per_projection)}"
                )
        for p in range(self.num_slices):  # all layers' tables of a projection at once
            layers = [layer for layer, per_projection in enumerate(tables) if per_projection[p] is not None]
            if not layers:
                continue
            module_pools = pools[p]
            if module_pools is None:
                raise ValueError(f"layer {layers[0]} projection {p}: index tables but no pools")
            rows = int(module_pools[0].shape[0])
            for side, which, out, base, shard_width in (
                (0, "A", index_a, base_a[p], self.in_features // num_shards),
                (1, "B", index_b, base_b[p], self.output_slices[p] // num_shards),
            ):
                given = [tables[layer][p][side].reshape(-1) for layer in layers]  # type: ignore[index]
                for layer, table in zip(layers, given, strict=True):
                    if table.numel() != used:
                        raise ValueError(
                            f"layer {layer} projection {p}: index_{which} has {table.numel()} entries, expected r * l = {used}"
                        )
                stacked = torch.stack(given).long().cpu()  # [layers, r * l]
                if used and not (int(stacked.min()) >= 0 and int(stacked.max()) < rows):
                    bad = layers[int(((stacked < 0) | (stacked >= rows)).any(1).nonzero()[0])]
                    raise ValueError(
                        f"layer {bad} projection {p}: index_{which} out of the pool's {rows} rows"
                    )
                out[layers, p, :used] = base + stacked * shard_width
            scales[layers, p] = scale
        adapted = [any(pair is not None for pair in per_projection) for per_projection in tables]
        empty = torch.zeros(0, dtype=dtype)
        return MosSlotData(
            pool_a=(torch.cat(flat_a) if flat_a else empty).to(device, dtype),
            pool_b=(torch.cat(flat_b) if flat_b else empty).to(device, dtype),
            index_a=index_a.to(torch.int32).to(device),
            index_b=index_b.to(torch.int32).to(device),
            shards=num_shards,
            rank=rank,
            scale=scales.to(device),
            adapted=tuple(adapted),
        )

    def set_slot(self, slot: int, data: MosSlotData) -> None:
        """Copy prepared slot data in (pool values past it are never indexed, so left as they are)."""
        self.pool_a[slot, : data.pool_a.numel()].copy_(data.pool_a)
        self.pool_b[slot, : data.pool_b.numel()].copy_(data.pool_b)
        self.index_a[:, slot].copy_(data.index_a)
        self.index_b[:, slot].copy_(data.index_b)
        self.scale[:, slot].copy_(data.scale)
        self.shards[slot] = data.shards
        self.slot_ranks[slot] = data.rank
        self.host_ranks[slot] = data.rank
        for layer, adapted in enumerate(data.adapted):
            self.host_adapted[layer][slot] = adapted

    def clear_slot(self, slot: int) -> None:
        """Empty `slot`: every table entry points at the zeros, rank 0."""
        self.index_a[:, slot] = self.capacity_a
        self.index_b[:, slot] = self.capacity_b
        self.scale[:, slot] = 0.0
        self.shards[slot] = 1
        self.slot_ranks[slot] = 0
        self.host_ranks[slot] = 0
        for per_layer in self.host_adapted:
            per_layer[slot] = False
