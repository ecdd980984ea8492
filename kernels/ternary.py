"""ternary_shrink / ternary_expand: LoRA terms whose factors are ternary signs, read as 2-bit codes.

ComPEFT stores an adapter as A^ = gamma * S_A, B^ = gamma * S_B with S in {-1, 0, 1} and one gamma,
so a module's term is `y += scale * gamma^2 * S_B (S_A x)`. The slots here hold S_A and S_B as 2-bit
codes, 16 to an int32 word, packed along each product's reduction dimension (d_in for the shrink,
the rank for the expand): a quarter of a LoRA slot's bf16 bytes per weight, unpacked in registers.
`scale * gamma^2` is one float per (slot, projection), applied once to the shrink's fp32 accumulator.

Code of one entry (bits 2i, 2i+1 of its word hold entry i of 16): bit 0 = nonzero, bit 1 = negative,
so 0b00 = 0, 0b01 = +1, 0b11 = -1 and the value is `(c & 1) - (c & 2)` (0b10 is never written).
One load per word, no second bitmap to fetch; the masks of a mask + sign bitmap pair would cost the
same two bits per entry and two loads.

Same grids, segments and fused projections as kernels/shrink.py and kernels/expand.py (the SGMV
pattern over the step's slot segments); per-slot ranks stop the work at each slot's rank.
`TernaryStack` is the slot layout for one (layer, fused projection group), like kernels.LoraStack.
The references unpack the codes and multiply in fp32. This module knows no adapter format.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from kernels.expand import _one_buffer, _slice_offsets
from kernels.metadata import AdapterBatch, AdapterStep

CODES_PER_WORD = 16  # 2-bit codes in one int32 word


def packed_words(length: int) -> int:
    """int32 words that hold `length` 2-bit codes."""
    return -(-length // CODES_PER_WORD)


def pack_ternary(signs: torch.Tensor) -> torch.Tensor:
    """int8 signs [..., K] in {-1, 0, 1} -> int32 words [..., ceil(K / 16)] of 2-bit codes (entry i of a
    word in bits 2i, 2i+1; padding entries are 0). Raises ValueError on any other value."""
    if signs.numel() and not bool(((signs >= -1) & (signs <= 1)).all()):
        raise ValueError("ternary signs must be -1, 0 or 1")
    length = signs.shape[-1]
    codes = (signs != 0).to(torch.int64) | ((signs < 0).to(torch.int64) << 1)
    codes = torch.nn.functional.pad(codes, (0, packed_words(length) * CODES_PER_WORD - length))
    codes = codes.unflatten(-1, (-1, CODES_PER_WORD))  # [..., W, 16]
    shifts = torch.arange(0, 2 * CODES_PER_WORD, 2, dtype=torch.int64, device=signs.device)
    words = (codes << shifts).sum(-1)  # < 2**32: reinterpret the top bit as int32's sign
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


Matrix = tuple[int, int, int]  # (offset, rows, length): a row-major [rows, length] block of a vector


def pack_ternary_words(signs: torch.Tensor, matrices: Sequence[Matrix]) -> tuple[np.ndarray, list[int]]:
    """pack_ternary of each [rows, length] matrix found at its offset in the int8 vector `signs` (on
    the CPU), as one int32 array, and where each matrix's words start in it (row-major
    [rows, ceil(length / 16)] from there; the array is laid out by row length).

    One pass over the vector: packing a SmolLM2 adapter's 420 factors one by one took 20 ms of
    per-call overhead for 0.9 M codes. Raises ValueError on any value but -1, 0, 1."""
    if signs.dim() != 1 or signs.dtype != torch.int8:
        raise ValueError(f"expected a 1-D int8 vector of signs, got {signs.dtype} {tuple(signs.shape)}")
    values = signs.numpy()
    if values.size and not (int(values.min()) >= -1 and int(values.max()) <= 1):
        raise ValueError("ternary signs must be -1, 0 or 1")
    codes = (values != 0).view(np.uint8) | ((values < 0).view(np.uint8) << 1)
    for offset, rows, length in matrices:
        if rows < 0 or length < 0 or offset < 0 or offset + rows * length > values.size:
            raise ValueError(f"matrix [{rows}, {length}] at {offset} is outside the {values.size} signs")
    firsts, _, by_length = packed_layout(matrices)
    chunks = [
        _pack_rows(
            np.concatenate(
                [codes[matrices[i][0] : matrices[i][0] + matrices[i][1] * length] for i in members]
            ).reshape(-1, length)
        )
        for length, members in by_length.items()
        if length  # a row of no codes has no words
    ]
    return (np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int32)), firsts


def packed_layout(matrices: Sequence[Matrix]) -> tuple[list[int], int, dict[int, list[int]]]:
    """Where pack_ternary_words puts each matrix's words: the output is laid out by row length (the
    views do not care where their words are), so each length's rows are packed by one set of array
    operations, whatever the number of matrices. Returns each matrix's first word, the words in
    all, and the matrices of each row length in output order."""
    by_length: dict[int, list[int]] = {}
    for i, (_, _, length) in enumerate(matrices):
        by_length.setdefault(length, []).append(i)
    firsts, first = [0] * len(matrices), 0
    for length, members in by_length.items():
        for i in members:
            firsts[i] = first
            first += matrices[i][1] * packed_words(length)
    return firsts, first, by_length


def _pack_rows(codes: np.ndarray) -> np.ndarray:
    """uint8 2-bit codes [rows, length] -> int32 words [rows * ceil(length / 16)], row-major."""
    rows, length = codes.shape
    words = packed_words(length)
    if length <= CODES_PER_WORD:  # one word a row (a low-rank B): a shift and an or per column
        packed = np.zeros(rows, dtype=np.uint32)
        for j in range(length):
            packed |= codes[:, j].astype(np.uint32) << np.uint32(2 * j)
        return packed.view(np.int32)
    if length % CODES_PER_WORD:
        padded = np.zeros((rows, words * CODES_PER_WORD), dtype=np.uint8)
        padded[:, :length] = codes
        codes = padded
    # Four codes read as one little-endian uint32 hold code k in bits 8k, 8k+1: shifting them down
    # to bits 2k, 2k+1 makes a byte of four codes; four such bytes, read again as one little-endian
    # word, put entry i of 16 at bits 2i, 2i+1.
    quads = np.ascontiguousarray(codes).reshape(-1).view("<u4")
    octets = ((quads | (quads >> 6) | (quads >> 12) | (quads >> 18)) & 0xFF).astype(np.uint8)
    return octets.view("<u4").astype(np.uint32, copy=False).view(np.int32)


def unpack_ternary(words: torch.Tensor, length: int) -> torch.Tensor:
    """The inverse of pack_ternary: int32 words [..., W] -> int8 signs [..., length]."""
    shifts = torch.arange(0, 2 * CODES_PER_WORD, 2, dtype=torch.int64, device=words.device)
    codes = ((words.to(torch.int64) & 0xFFFFFFFF).unsqueeze(-1) >> shifts) & 3  # [..., W, 16]
    signs = (codes & 1) - (codes & 2)
    return signs.flatten(-2)[..., :length].to(torch.int8)


@triton.jit
def _decode(words, shifts):
    """2-bit codes -> fp32 {-1, 0, 1}: bit 0 = nonzero, bit 1 = negative."""
    codes = (words >> shifts) & 3
    return ((codes & 1) - (codes & 2)).to(tl.float32)


@triton.jit
def _ternary_shrink_kernel(
    # Pointers
    x_ptr,  # [T, K]
    a_ptr,  # [S, P * R, ceil(K / 16)] int32 codes
    h_ptr,  # [T, P * R] fp32, zero-initialised
    scale_ptr,  # [S, P] fp32: LoRA scale * gamma^2
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
    stride_aw,
    stride_ht,
    stride_hr,
    stride_ss,
    stride_sp,
    # Meta-parameters
    HAS_RANKS: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,  # a multiple of 16: whole words
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
    shifts = (2 * (offs_k % 16))[:, None]  # [BLOCK_K, 1]: where entry k sits in its word
    x_ptrs = x_ptr + rows[:, None] * stride_xt + offs_k[None, :] * stride_xk
    a_ptrs = (
        a_ptr
        + slot * stride_as
        + (pid_p * R + offs_r)[None, :] * stride_ar
        + (offs_k // 16)[:, None] * stride_aw
    )

    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        x = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0).to(tl.float32)
        words = tl.load(a_ptrs, mask=(offs_k[:, None] < k_left) & mask_r[None, :], other=0)
        acc += tl.dot(x, _decode(words, shifts), input_precision="ieee")  # [BLOCK_M, BLOCK_R]
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += (BLOCK_K // 16) * stride_aw
    acc *= tl.load(scale_ptr + slot * stride_ss + pid_p * stride_sp)  # scale * gamma^2, once
    if HAS_WEIGHTS:  # a mixture's pair weight, per row
        acc *= tl.load(weights_ptr + rows, mask=mask_m, other=0.0)[:, None]

    h_ptrs = h_ptr + rows[:, None] * stride_ht + (pid_p * R + offs_r)[None, :] * stride_hr
    tl.store(h_ptrs, acc, mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _ternary_expand_kernel(
    # Pointers
    h_ptr,  # [T, P * R] fp32
    b_ptr,  # [S, N, ceil(R / 16)] int32 codes
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
    stride_bw,
    stride_yt,
    stride_yn,
    # Meta-parameters
    HAS_RANKS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,  # a multiple of 16: whole words
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
    shifts = (2 * (offs_r % 16))[:, None]  # [BLOCK_R, 1]
    h_ptrs = h_ptr + rows[:, None] * stride_ht + (pid_p * R + offs_r)[None, :] * stride_hr
    b_ptrs = b_ptr + slot * stride_bs + offs_n[None, :] * stride_bn + (offs_r // 16)[:, None] * stride_bw

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r in range(0, tl.cdiv(rank, BLOCK_R)):  # stops at the slot's rank: padding is skipped
        r_left = rank - r * BLOCK_R
        h = tl.load(h_ptrs, mask=mask_m[:, None] & (offs_r[None, :] < r_left), other=0.0).to(tl.float32)
        words = tl.load(b_ptrs, mask=(offs_r[:, None] < r_left) & mask_n[None, :], other=0)
        acc += tl.dot(h, _decode(words, shifts), input_precision="ieee")  # [BLOCK_M, BLOCK_N]
        h_ptrs += BLOCK_R * stride_hr
        b_ptrs += (BLOCK_R // 16) * stride_bw

    y_ptrs = y_ptr + rows[:, None] * stride_yt + offs_n[None, :] * stride_yn
    mask = mask_m[:, None] & mask_n[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + acc).to(y_ptr.dtype.element_ty), mask=mask)


def ternary_shrink(
    x: torch.Tensor,
    codes_a: torch.Tensor,
    batch: AdapterBatch,
    scale: torch.Tensor,
    *,
    slot_ranks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per token, project x by its adapter's ternary A (2-bit codes), fused over P projection slices.

    Semantics (s = batch.slot_ids, w = batch.weights or 1.0, S_A = unpack_ternary(codes_a, d_in);
    tokens with s[t] == -1 get zeros)::

        h[t].view(P, r) = w[t] * scale[s[t]].view(P, 1) * (x[t] @ S_A[s[t]].T).view(P, r)

    Shape:
        x: [T, d_in]; codes_a: [S, P * r, ceil(d_in / 16)]; scale: [S] (P = 1) or [S, P];
        slot_ranks: [S], rank_s <= r (rows past it are zero codes, skipped); returns h: [T, P * r].
    DType:
        x: float32 / bfloat16 / float16; codes_a: int32; scale: float32 (the LoRA scale times
        gamma^2); slot_ranks: int32; h: float32.
    """
    # 1) check shapes
    num_tokens, in_features = x.shape
    num_slots, rows, words = codes_a.shape
    scale2 = scale.view(num_slots, -1)
    num_slices = scale2.shape[1]
    assert codes_a.dtype == torch.int32 and words == packed_words(in_features), (codes_a.shape, x.shape)
    assert rows % num_slices == 0, (tuple(codes_a.shape), scale.shape)
    assert batch.num_tokens == num_tokens, (batch.num_tokens, num_tokens)
    assert batch.token_order.device == x.device == codes_a.device, "batch, x and codes_a must share a device"
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
    _ternary_shrink_kernel[grid](
        x,
        codes_a,
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
        codes_a.stride(0),
        codes_a.stride(1),
        codes_a.stride(2),
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


def ternary_expand(
    h: torch.Tensor,
    codes_b: Sequence[torch.Tensor] | torch.Tensor,
    batch: AdapterBatch,
    y: torch.Tensor,
    *,
    slot_ranks: torch.Tensor | None = None,
) -> None:
    """Per token, add its adapter's ternary up-projection of h to y, in place; fused over P slices.

    Semantics (s = batch.slot_ids, S_B_p = unpack_ternary(codes_b[p], r), o_p = sum of the widths
    before slice p; tokens with s[t] == -1 are left unchanged)::

        y[t, o_p : o_p + out_p] += h[t, p*r : (p+1)*r] @ S_B_p[s[t]].T

    Shape:
        h: [T, P * r]; codes_b: P x [S, out_p, ceil(r / 16)] (or one tensor: P = 1);
        y: [T, sum(out_p)]; slot_ranks: [S], rank_s <= r (codes past it are zero, skipped).
    DType:
        h: float32; codes_b: int32; y: float32 / bfloat16 / float16 (accumulated in fp32);
        slot_ranks: int32.
    """
    # 1) check shapes
    b_slices = (codes_b,) if isinstance(codes_b, torch.Tensor) else tuple(codes_b)
    num_tokens, h_cols = h.shape
    num_slots, _, words = b_slices[0].shape
    widths = tuple(b.shape[1] for b in b_slices)
    rank = h_cols // len(b_slices)
    assert h_cols == len(b_slices) * rank and words == packed_words(rank), (h.shape, b_slices[0].shape)
    assert all(b.shape[0] == num_slots and b.shape[2] == words for b in b_slices), [b.shape for b in b_slices]
    assert all(b.dtype == torch.int32 for b in b_slices)
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
            _launch_expand(h[:, p * rank : (p + 1) * rank], b, (b.shape[1],), batch, y_p, slot_ranks)
            offset += b.shape[1]
        return
    # 3) launch
    _launch_expand(h, buffer, widths, batch, y, slot_ranks)


def _launch_expand(
    h: torch.Tensor,
    codes_b: torch.Tensor,  # [S, N, ceil(r / 16)]
    widths: tuple[int, ...],
    batch: AdapterBatch,
    y: torch.Tensor,
    slot_ranks: torch.Tensor | None,
) -> None:
    rank = h.shape[1] // len(widths)
    block_m = 16 if batch.max_segment_length <= 16 else 32
    block_n = max(16, min(128, triton.next_power_of_2(max(widths))))
    block_r = max(16, min(64, triton.next_power_of_2(rank)))
    n_blocks = triton.cdiv(max(widths), block_n)
    grid = (triton.cdiv(batch.max_segment_length, block_m), len(widths) * n_blocks, batch.num_segments)
    _ternary_expand_kernel[grid](
        h,
        codes_b,
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
        codes_b.stride(0),
        codes_b.stride(1),
        codes_b.stride(2),
        y.stride(0),
        y.stride(1),
        HAS_RANKS=slot_ranks is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_R=block_r,
    )


def ternary_shrink_ref(
    x: torch.Tensor,
    codes_a: torch.Tensor,
    batch: AdapterBatch,
    scale: torch.Tensor,
    *,
    slot_ranks: torch.Tensor | None = None,
) -> torch.Tensor:
    """The reference for ternary_shrink: unpack the codes, then a per-token gather in fp32.

    Reads only batch.slot_ids and batch.weights; slot_ranks is ignored (padding codes are zero).
    """
    del slot_ranks
    num_tokens, in_features = x.shape
    num_slots, rows, _ = codes_a.shape
    scale2 = scale.view(num_slots, -1).float()
    num_slices = scale2.shape[1]
    slots = batch.slot_ids.long()
    has_adapter = slots >= 0
    slots = slots.clamp(min=0)
    signs_a = unpack_ternary(codes_a, in_features).float()  # [S, P * r, d_in]
    h = torch.einsum("td,trd->tr", x.float(), signs_a[slots])
    h = h.view(num_tokens, num_slices, rows // num_slices) * scale2[slots].view(num_tokens, num_slices, 1)
    weights = has_adapter.float() if batch.weights is None else batch.weights.float() * has_adapter
    return h.reshape(num_tokens, rows) * weights.view(-1, 1)


def ternary_expand_ref(
    h: torch.Tensor,
    codes_b: Sequence[torch.Tensor] | torch.Tensor,
    batch: AdapterBatch,
    y: torch.Tensor,
    *,
    slot_ranks: torch.Tensor | None = None,
) -> None:
    """The reference for ternary_expand: unpack the codes, then a per-token gather in fp32.

    Reads only batch.slot_ids; slot_ranks is ignored (padding codes are zero).
    """
    del slot_ranks
    b_slices = (codes_b,) if isinstance(codes_b, torch.Tensor) else tuple(codes_b)
    rank = h.shape[1] // len(b_slices)
    slots = batch.slot_ids.long()
    has_adapter = (slots >= 0).view(-1, 1)
    slots = slots.clamp(min=0)
    deltas = [
        torch.einsum(
            "tr,tnr->tn", h[:, p * rank : (p + 1) * rank].float(), unpack_ternary(b, rank)[slots].float()
        )
        for p, b in enumerate(b_slices)
    ]
    y.copy_((y.float() + torch.cat(deltas, dim=1) * has_adapter).to(y.dtype))


def ternary_add(
    x: torch.Tensor,
    y: torch.Tensor,
    stack: TernaryStack,
    step: AdapterStep | AdapterBatch,
    *,
    reference: bool = False,
) -> None:
    """y[t, slice p] += sum_k w_tk * scale[s_tk, p] * (x[t] @ S_A_p[s_tk]^T) @ S_B_p[s_tk]^T over every
    pass of the step (reference=True: the torch references, on any device)."""
    shrink, expand = (
        (ternary_shrink_ref, ternary_expand_ref) if reference else (ternary_shrink, ternary_expand)
    )
    passes = (step,) if isinstance(step, AdapterBatch) else step.passes
    for batch in passes:  # one shrink + expand per pass: rows are distinct inside a pass
        if batch.has_adapters:
            h = shrink(x, stack.codes_a, batch, stack.scale, slot_ranks=stack.slot_ranks)
            expand(h, stack.codes_b, batch, y, slot_ranks=stack.slot_ranks)


@dataclass(eq=False)
class TernaryStack:
    """The ternary factors of every slot for one (possibly fused) projection of one layer.

    codes_a [S, P * r, ceil(d_in / 16)] int32   rows p*r : p*r + rank_s: projection p's S_A codes
    codes_b P x [S, out_p, ceil(r / 16)] int32  projection p's S_B codes (views of one buffer)
    scale   [S, P] float32                      LoRA scale * gamma^2 of slot s for projection p
    slot_ranks [S] int32                        rank_s <= r; rank 0 = empty slot

    Zero codes are zero weights: padding and untargeted projections cost no special case.
    """

    codes_a: torch.Tensor
    codes_b: tuple[torch.Tensor, ...]
    scale: torch.Tensor
    slot_ranks: torch.Tensor
    in_features: int
    output_slices: tuple[int, ...]
    host_ranks: list[int]  # mirror of slot_ranks

    @classmethod
    def empty(
        cls,
        num_slots: int,
        max_rank: int,
        in_features: int,
        output_slices: Sequence[int],
        *,
        device: torch.device | str = "cpu",
    ) -> TernaryStack:
        slices = tuple(output_slices)
        p = len(slices)
        zeros = functools.partial(torch.zeros, dtype=torch.int32, device=device)
        codes_b = zeros(num_slots, sum(slices), packed_words(max_rank))
        return cls(
            codes_a=zeros(num_slots, p * max_rank, packed_words(in_features)),
            codes_b=tuple(codes_b.split(slices, dim=1)),
            scale=torch.zeros(num_slots, p, dtype=torch.float32, device=device),
            slot_ranks=zeros(num_slots),
            in_features=in_features,
            output_slices=slices,
            host_ranks=[0] * num_slots,
        )

    @property
    def num_slots(self) -> int:
        return int(self.codes_a.shape[0])

    @property
    def num_slices(self) -> int:
        return len(self.output_slices)

    @property
    def max_rank(self) -> int:
        return int(self.codes_a.shape[1]) // self.num_slices

    @property
    def nbytes_per_slot(self) -> int:
        words = self.codes_a[0].numel() + sum(b[0].numel() for b in self.codes_b)
        return 4 * words + 4 * self.num_slices + 4

    def set_slot(
        self,
        slot: int,
        codes_a: Sequence[torch.Tensor | None],
        codes_b: Sequence[torch.Tensor | None],
        scales: Sequence[float],
    ) -> None:
        """Write one adapter into `slot`: per projection packed S_A [rank_p, ceil(d_in / 16)] and
        S_B [out_p, ceil(rank_p / 16)] (pack_ternary), None where it is not adapted; scales include
        gamma^2. The slot's rank is the largest rank_p."""
        p, r = self.num_slices, self.max_rank
        if not len(codes_a) == len(codes_b) == len(scales) == p:
            raise ValueError(
                f"expected {p} codes and scale entries (one per projection {self.output_slices})"
            )
        ranks = [0 if a is None else int(a.shape[0]) for a in codes_a]
        if max(ranks) > r:
            raise ValueError(f"adapter rank {max(ranks)} exceeds this stack's max rank {r}")
        a_rows = self.codes_a[slot].unflatten(0, (p, r))  # [P, r, words]
        a_rows.zero_()
        for i, (a, b, width) in enumerate(zip(codes_a, codes_b, self.output_slices, strict=True)):
            self.codes_b[i][slot].zero_()
            if (a is None) != (b is None):
                raise ValueError(f"projection {i}: give both S_A and S_B codes or neither")
            if a is None or b is None:
                continue
            words_b = packed_words(ranks[i])
            if a.shape != (ranks[i], packed_words(self.in_features)) or b.shape != (width, words_b):
                raise ValueError(
                    f"projection {i}: expected codes [{ranks[i]}, {packed_words(self.in_features)}] and "
                    f"[{width}, {words_b}], got {tuple(a.shape)} and {tuple(b.shape)}"
                )
            a_rows[i, : ranks[i]].copy_(a)
            self.codes_b[i][slot, :, :words_b].copy_(b)
        rank = max(ranks)
        self.scale[slot] = torch.tensor([float(s) for s in scales], dtype=torch.float32)
        self.slot_ranks[slot] = rank
        self.host_ranks[slot] = rank

    @functools.cached_property
    def codes_b_buffer(self) -> torch.Tensor:
        """codes_b as the one [S, sum(out_p), ceil(r / 16)] buffer its slices view."""
        buffer = _one_buffer(self.codes_b)
        assert buffer is not None, "codes_b are consecutive slices of one buffer (TernaryStack.empty)"
        return buffer

    def set_slot_image(
        self, slot: int, codes_a: torch.Tensor, codes_b: torch.Tensor, scale: torch.Tensor, rank: int
    ) -> None:
        """Write a slot whole, as prepared (adapters_store/compact_pools.py): codes_a
        [P * r, ceil(d_in / 16)] and codes_b [sum(out_p), ceil(r / 16)] with zeros past each
        projection's rank, and scale [P] (gamma^2 included), on this stack's device: four writes
        where set_slot makes a dozen, one projection at a time."""
        if codes_a.shape != self.codes_a.shape[1:] or codes_b.shape != self.codes_b_buffer.shape[1:]:
            raise ValueError(
                f"expected slot images {tuple(self.codes_a.shape[1:])} and "
                f"{tuple(self.codes_b_buffer.shape[1:])}, got {tuple(codes_a.shape)} and {tuple(codes_b.shape)}"
            )
        if scale.shape != (self.num_slices,) or not 0 <= rank <= self.max_rank:
            raise ValueError(f"expected {self.num_slices} scales and a rank <= {self.max_rank}, got {rank}")
        self.codes_a[slot].copy_(codes_a)
        self.codes_b_buffer[slot].copy_(codes_b)
        self.scale[slot].copy_(scale)
        self.slot_ranks[slot] = rank
        self.host_ranks[slot] = rank

    def clear_slot(self, slot: int) -> None:
        self.codes_a[slot].zero_()
        for b in self.codes_b:
            b[slot].zero_()
        self.scale[slot] = 0.0
        self.slot_ranks[slot] = 0
        self.host_ranks[slot] = 0
