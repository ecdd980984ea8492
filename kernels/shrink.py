"""lora_shrink: h = w * scale[slot] * x @ A[slot]^T per token, SGMV-style over the step's slot segments.

Holds the Triton kernel, its launcher and the torch reference side by side; tests compare the
kernel (and the torch backend) against the reference. Several projections that read the same
input are fused by stacking their A along the rank dim (P slices of r rows each, see stack.py):
one pass over x serves q|k|v or gate|up.

Triton runs on CPU only under TRITON_INTERPRET=1 (set before this module is imported), which
computes bf16 wrongly, so every operand is upcast to fp32 on load. LoRA terms are memory-bound,
so fp32 math costs the GPU next to nothing and keeps results close to the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.metadata import AdapterBatch


@triton.jit
def _lora_shrink_kernel(
    # Pointers
    x_ptr,  # [T, K]
    a_ptr,  # [S, P * R, K]
    h_ptr,  # [T, P * R] fp32, zero-initialised
    scale_ptr,  # [S, P] fp32
    ranks_ptr,  # [S] int32 (read only when HAS_RANKS)
    weights_ptr,  # [T] fp32 per-row pair weight (read only when HAS_WEIGHTS)
    token_order_ptr,  # [num_adapted_tokens] int64: rows grouped by segment
    segment_table_ptr,  # [3, G] int32: slot, start, length
    # Sizes
    num_segments,
    K,
    R,  # rank of one projection slice (the stack's max rank)
    # Strides
    stride_xt,
    stride_xk,
    stride_as,
    stride_ar,
    stride_ak,
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

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < seg_len
    rows = tl.load(token_order_ptr + seg_start + offs_m, mask=mask_m, other=0).to(tl.int64)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None] * stride_xt + offs_k[None, :] * stride_xk
    a_ptrs = (
        a_ptr + slot * stride_as + (pid_p * R + offs_r)[None, :] * stride_ar + offs_k[:, None] * stride_ak
    )

    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        x = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0).to(tl.float32)
        a = tl.load(a_ptrs, mask=(offs_k[:, None] < k_left) & mask_r[None, :], other=0.0).to(tl.float32)
        acc += tl.dot(x, a, input_precision="ieee")  # [BLOCK_M, BLOCK_R]
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak
    acc *= tl.load(scale_ptr + slot * stride_ss + pid_p * stride_sp)
    if HAS_WEIGHTS:  # a mixture's pair weight, per row
        acc *= tl.load(weights_ptr + rows, mask=mask_m, other=0.0)[:, None]

    h_ptrs = h_ptr + rows[:, None] * stride_ht + (pid_p * R + offs_r)[None, :] * stride_hr
    tl.store(h_ptrs, acc, mask=mask_m[:, None] & mask_r[None, :])


def lora_shrink(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    batch: AdapterBatch,
    scale: torch.Tensor,
    *,
    slot_ranks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per token, project x to its adapter's rank space: fused over P projection slices.

    Semantics (s = batch.slot_ids, w = batch.weights or 1.0; tokens with s[t] == -1 get zeros)::

        h[t].view(P, r) = w[t] * scale[s[t]].view(P, 1) * (x[t] @ lora_a[s[t]].T).view(P, r)

    Shape:
        x: [T, d_in]; lora_a: [S, P * r, d_in]; scale: [S] (P = 1) or [S, P];
        slot_ranks: [S], rank_s <= r (rows past it are zero padding, skipped); returns h: [T, P * r].
    DType:
        x, lora_a: float32 / bfloat16 / float16; scale: float32; slot_ranks: int32;
        h: float32 (accumulated in fp32).
    """
    # 1) check shapes
    num_tokens, in_features = x.shape
    num_slots, rows, a_in = lora_a.shape
    scale2 = scale.view(num_slots, -1)
    num_slices = scale2.shape[1]
    assert a_in == in_features and rows % num_slices == 0, (tuple(x.shape), tuple(lora_a.shape), scale.shape)
    assert batch.num_tokens == num_tokens, (batch.num_tokens, num_tokens)
    assert batch.token_order.device == x.device == lora_a.device, "batch, x and lora_a must share a device"
    rank = rows // num_slices
    # 2) allocate the output (rows of tokens without an adapter stay zero)
    h = torch.zeros(num_tokens, rows, dtype=torch.float32, device=x.device)
    if not batch.has_adapters or rank == 0:
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
    _lora_shrink_kernel[grid](
        x,
        lora_a,
        h,
        scale2,
        slot_ranks if slot_ranks is not None else scale2,  # unread placeholder when no ranks
        batch.weights if batch.weights is not None else scale2,  # unread placeholder when no weights
        batch.token_order,
        batch.segment_table,
        batch.num_segments,
        in_features,
        rank,
        x.stride(0),
        x.stride(1),
        lora_a.stride(0),
        lora_a.stride(1),
        lora_a.stride(2),
        h.stride(0),
        h.stride(1),
        scale2.stride(0),
        scale2.stride(1),
        HAS_RANKS=slot_ranks is not None,
        HAS_WEIGHTS=batch.weights is not None,
        BLOCK_M=block_m,
        BLOCK_R=block_r,
        BLOCK_K=block_k,
    )
    return h


def lora_shrink_ref(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    batch: AdapterBatch,
    scale: torch.Tensor,
    *,
    slot_ranks: torch.Tensor | None = None,
) -> torch.Tensor:
    """The reference for lora_shrink: a per-token gather, computed in fp32.

    Reads only batch.slot_ids and batch.weights; slot_ranks is ignored (padding is zero by contract).
    """
    del slot_ranks
    num_tokens = x.shape[0]
    num_slots, rows, _ = lora_a.shape
    scale2 = scale.view(num_slots, -1).float()
    num_slices = scale2.shape[1]
    slots = batch.slot_ids.long()
    has_adapter = slots >= 0
    slots = slots.clamp(min=0)
    h = torch.einsum("td,trd->tr", x.float(), lora_a[slots].float())  # [T, P * r]
    h = h.view(num_tokens, num_slices, rows // num_slices) * scale2[slots].view(num_tokens, num_slices, 1)
    weights = has_adapter.float() if batch.weights is None else batch.weights.float() * has_adapter
    return h.reshape(num_tokens, rows) * weights.view(-1, 1)
