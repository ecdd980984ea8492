"""lora_expand: y[t] += h[t] @ B[slot]^T per token, SGMV-style over the step's slot segments.

Holds the Triton kernel, its launcher and the torch reference side by side. Fused projections:
h holds P rank slices (from a fused shrink) and projection p adds h's slice p times its B rows
into its own output slice of y (q|k|v, gate|up laid out as in the fused base output).
The loop over the rank stops at each slot's true rank, so a rank-8 adapter in a rank-64 stack
reads and multiplies 8 columns of B, not 64.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from kernels.metadata import AdapterBatch


@triton.jit
def _lora_expand_kernel(
    # Pointers
    h_ptr,  # [T, P * R]
    b_ptr,  # [S, N, R]
    y_ptr,  # [T, N], updated in place
    ranks_ptr,  # [S] int32 (read only when HAS_RANKS)
    slice_offsets_ptr,  # [P + 1] int32: projection p writes columns offsets[p] : offsets[p + 1]
    token_order_ptr,  # [num_adapted_tokens] int64: rows grouped by segment
    segment_table_ptr,  # [3, G] int32: slot, start, length
    # Sizes
    num_segments,
    R,  # rank of one projection slice (the stack's max rank)
    n_blocks,  # column blocks of the widest slice
    # Strides
    stride_ht,
    stride_hr,
    stride_bs,
    stride_bn,
    stride_br,
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
    n_start = tl.load(slice_offsets_ptr + pid_p) + pid_n * BLOCK_N
    n_end = tl.load(slice_offsets_ptr + pid_p + 1)
    if n_start >= n_end:
        return
    slot = tl.load(segment_table_ptr + pid_seg).to(tl.int64)
    seg_start = tl.load(segment_table_ptr + num_segments + pid_seg)
    rank = R
    if HAS_RANKS:
        rank = tl.load(ranks_ptr + slot)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < seg_len
    rows = tl.load(token_order_ptr + seg_start + offs_m, mask=mask_m, other=0).to(tl.int64)
    offs_n = n_start + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_end
    offs_r = tl.arange(0, BLOCK_R)
    h_ptrs = h_ptr + rows[:, None] * stride_ht + (pid_p * R + offs_r)[None, :] * stride_hr
    b_ptrs = b_ptr + slot * stride_bs + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_br

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r in range(0, tl.cdiv(rank, BLOCK_R)):  # stops at the slot's rank: padding is skipped
        r_left = rank - r * BLOCK_R
        h = tl.load(h_ptrs, mask=mask_m[:, None] & (offs_r[None, :] < r_left), other=0.0).to(tl.float32)
        b = tl.load(b_ptrs, mask=(offs_r[:, None] < r_left) & mask_n[None, :], other=0.0).to(tl.float32)
        acc += tl.dot(h, b, input_precision="ieee")  # [BLOCK_M, BLOCK_N]
        h_ptrs += BLOCK_R * stride_hr
        b_ptrs += BLOCK_R * stride_br

    y_ptrs = y_ptr + rows[:, None] * stride_yt + offs_n[None, :] * stride_yn
    mask = mask_m[:, None] & mask_n[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + acc).to(y_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=64)
def _slice_offsets(widths: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """[P + 1] int32 column offsets, made once per (widths, device) rather than once per call."""
    offsets = [0]
    for width in widths:
        offsets.append(offsets[-1] + width)
    return torch.tensor(offsets, dtype=torch.int32, device=device)


def _one_buffer(lora_b: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
    """The [S, N, r] buffer when the slices are consecutive views of one (the triton stack layout)."""
    first = lora_b[0]
    offset = 0
    for b in lora_b:
        if b.stride() != first.stride() or b.data_ptr() != first.data_ptr() + offset * first.element_size():
            return None
        offset += b.shape[1] * b.stride(1)
    return first.as_strided((first.shape[0], sum(b.shape[1] for b in lora_b), first.shape[2]), first.stride())


def lora_expand(
    h: torch.Tensor,
    lora_b: Sequence[torch.Tensor] | torch.Tensor,
    batch: AdapterBatch,
    y: torch.Tensor,
    *,
    slot_ranks: torch.Tensor | None = None,
) -> None:
    """Per token, add its adapter's up-projection of h to y, in place; fused over P output slices.

    Semantics (s = batch.slot_ids, B_p = lora_b[p], o_p = sum of the widths of B_0..B_{p-1};
    tokens with s[t] == -1 are left unchanged)::

        y[t, o_p : o_p + out_p] += h[t, p*r : (p+1)*r] @ B_p[s[t]].T

    Shape:
        h: [T, P * r]; lora_b: P x [S, out_p, r] (or one [S, N, r] tensor: P = 1);
        y: [T, sum(out_p)]; slot_ranks: [S], rank_s <= r (columns of B past it are zero, skipped).
    DType:
        h: float32 (or y's dtype); lora_b, y: float32 / bfloat16 / float16 (accumulated in fp32);
        slot_ranks: int32.
    """
    # 1) check shapes
    b_slices = (lora_b,) if isinstance(lora_b, torch.Tensor) else tuple(lora_b)
    num_tokens, h_cols = h.shape
    num_slots, _, rank = b_slices[0].shape
    widths = tuple(b.shape[1] for b in b_slices)
    assert all(b.shape[0] == num_slots and b.shape[2] == rank for b in b_slices), [b.shape for b in b_slices]
    assert h_cols == len(b_slices) * rank, (tuple(h.shape), len(b_slices), rank)
    assert tuple(y.shape) == (num_tokens, sum(widths)), (tuple(y.shape), num_tokens, widths)
    assert batch.num_tokens == num_tokens, (batch.num_tokens, num_tokens)
    assert batch.token_order.device == h.device == y.device, "batch, h and y must share a device"
    # 2) nothing to allocate: y is updated in place
    if not batch.has_adapters or rank == 0:
        return
    buffer = _one_buffer(b_slices)
    if buffer is None:  # slices in separate buffers: one launch per slice
        offset = 0
        for p, b in enumerate(b_slices):
            y_p = y[:, offset : offset + b.shape[1]]
            _launch(h[:, p * rank : (p + 1) * rank], b, (b.shape[1],), batch, y_p, slot_ranks)
            offset += b.shape[1]
        return
    # 3) launch
    _launch(h, buffer, widths, batch, y, slot_ranks)


def _launch(
    h: torch.Tensor,
    lora_b: torch.Tensor,  # [S, N, r]
    widths: tuple[int, ...],
    batch: AdapterBatch,
    y: torch.Tensor,
    slot_ranks: torch.Tensor | None,
) -> None:
    rank = lora_b.shape[2]
    block_m = 16 if batch.max_segment_length <= 16 else 32
    block_n = max(16, min(128, triton.next_power_of_2(max(widths))))
    block_r = max(16, min(64, triton.next_power_of_2(rank)))
    n_blocks = triton.cdiv(max(widths), block_n)
    grid = (triton.cdiv(batch.max_segment_length, block_m), len(widths) * n_blocks, batch.num_segments)
    _lora_expand_kernel[grid](
        h,
        lora_b,
        y,
        slot_ranks if slot_ranks is not None else batch.segment_table,  # unread placeholder
        _slice_offsets(widths, y.device),
        batch.token_order,
        batch.segment_table,
        batch.num_segments,
        rank,
        n_blocks,
        h.stride(0),
        h.stride(1),
        lora_b.stride(0),
        lora_b.stride(1),
        lora_b.stride(2),
        y.stride(0),
        y.stride(1),
        HAS_RANKS=slot_ranks is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_R=block_r,
    )


def lora_expand_ref(
    h: torch.Tensor,
    lora_b: Sequence[torch.Tensor] | torch.Tensor,
    batch: AdapterBatch,
    y: torch.Tensor,
    *,
    slot_ranks: torch.Tensor | None = None,
) -> None:
    """The reference for lora_expand: a per-token gather, computed in fp32.

    Reads only batch.slot_ids; slot_ranks is ignored (padding is zero by contract).
    """
    del slot_ranks
    b_slices = (lora_b,) if isinstance(lora_b, torch.Tensor) else tuple(lora_b)
    rank = b_slices[0].shape[2]
    slots = batch.slot_ids.long()
    has_adapter = (slots >= 0).view(-1, 1)
    slots = slots.clamp(min=0)
    deltas = [
        torch.einsum("tr,tnr->tn", h[:, p * rank : (p + 1) * rank].float(), b[slots].float())
        for p, b in enumerate(b_slices)
    ]
    y.copy_((y.float() + torch.cat(deltas, dim=1) * has_adapter).to(y.dtype))
