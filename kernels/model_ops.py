"""The decoder's hot ops behind one interface (norms, rotary + KV write, decode attention, SwiGLU,
the base-weight matmul layout): fused CPU kernels, or torch (any device).

A decode step at batch 32 on CPU spent about a third of its time outside the GEMMs, in ~45 small
torch ops per layer (RMSNorm alone is six, rotary four, attention builds a mask and calls SDPA).
`FusedCpuOps` runs each group as one pass over memory (kernels/csrc/); `TorchOps` is the
reference the tests compare against and the path for GPUs, other dtypes, and machines without a
C++ compiler. `select_model_ops` picks one when the model is built; layers never branch.

Semantics (one line of torch each; T tokens, H query heads, Hkv KV heads, D head_dim):
- rms_norm(x[T, E], w[E], eps) = x * rsqrt(mean(x^2, -1) + eps) * w  (normalised in fp32)
- add_rms_norm(h[T, E], d[T, E], w, eps): h += d; return rms_norm(h, w, eps)
- rotary_kv_write(qkv[T, (H + 2Hkv) D], rotary, slots[T], k_cache, v_cache, H) -> q[T, H, D]:
  q, k = rope(qkv's q and k heads at each token's position); k_cache[slots, :, positions] = k;
  v_cache[slots, :, positions] = v
- decode_attention(q[n, H, D], k_cache, v_cache, decode, scale) -> [n, H, D]: per sequence i,
  softmax(q_i K_i^T * scale) V_i over its cached positions < decode.lengths[i], GQA by head groups
- silu_mul(gu[T, 2I]) = silu(gu[:, :I]) * gu[:, I:]
- packed_linear(x[T, K], pack_linear(W[N, K]), b, N) = F.linear(x, W, b): W laid out in panels of
  one vector of columns, streamed with prefetch (decode products are bound by reading W)
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from kernels import cpu_extension

log = logging.getLogger(__name__)

KERNEL_CHOICES = ("auto", "fused", "torch")


@dataclass(frozen=True)
class DecodeMeta:
    """Where the decode rows of one step read their context; built once per step."""

    slots: torch.Tensor  # [n] int64 KV slot of each decoding sequence
    lengths: torch.Tensor  # [n] int64 cached positions each attends to (its position + 1)
    max_len: int  # max(lengths)
    slot_start: int | None  # set when slots are start, start+1, ...: the cache is viewed, not gathered

    @functools.cached_property
    def mask(self) -> torch.Tensor:
        """[n, 1, 1, max_len] bool, True = attend: the torch path's SDPA mask, made on first use."""
        positions = torch.arange(self.max_len, device=self.lengths.device).view(1, 1, 1, -1)
        return positions < self.lengths.view(-1, 1, 1, 1)

    @classmethod
    def build(cls, slots: list[int], positions: list[int], device: torch.device) -> DecodeMeta:
        n = len(slots)
        lengths = torch.tensor([p + 1 for p in positions], dtype=torch.int64)  # moved to device below
        max_len = max(positions, default=-1) + 1
        contiguous = n > 0 and slots == list(range(slots[0], slots[0] + n))
        return cls(
            slots=torch.tensor(slots, dtype=torch.int64, device=device),
            lengths=lengths.to(device),
            max_len=max_len,
            slot_start=slots[0] if contiguous else None,
        )


# ---- torch references -------------------------------------------------------------------------


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:  # torch's own kernel, same math
        return F.rms_norm(x, weight.shape, weight, eps)
    x32 = x.float()  # normalise in fp32 like Hugging Face's LlamaRMSNorm, then cast back
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def add_rms_norm_ref(
    residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    residual += delta
    return rms_norm_ref(residual, weight, eps)


def rotate_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] rotated by cos/sin [T, 1, D] (sin signed for rotate-half, see server/model/rope.py)."""
    return torch.addcmul(x * cos, torch.roll(x, x.shape[-1] // 2, dims=-1), sin)


def rotary_kv_write_ref(
    qkv: torch.Tensor,
    rotary: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    slots: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    num_heads: int,
) -> torch.Tensor:
    """rotary = (cos [T, 1, D], sin [T, 1, D], positions [T]) of the step's tokens."""
    cos, sin, positions = rotary
    kv_heads, dim = k_cache.shape[1], k_cache.shape[3]
    num_tokens = qkv.shape[0]
    qk = rotate_ref(qkv[:, : (num_heads + kv_heads) * dim].view(num_tokens, -1, dim), cos, sin)
    q, k = qk.split((num_heads, kv_heads), dim=1)
    k_cache[slots, :, positions] = k
    v_cache[slots, :, positions] = qkv[:, (num_heads + kv_heads) * dim :].view(num_tokens, kv_heads, dim)
    return q


def decode_attention_ref(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, decode: DecodeMeta, scale: float
) -> torch.Tensor:
    n, num_heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    if decode.slot_start is not None:  # a view, no copy
        start = decode.slot_start
        keys = k_cache[start : start + n, :, : decode.max_len]
        values = v_cache[start : start + n, :, : decode.max_len]
    else:
        keys = k_cache[decode.slots, :, : decode.max_len]
        values = v_cache[decode.slots, :, : decode.max_len]
    # The query heads of one KV head form the "query length" axis: no K/V repeat, one call.
    grouped = q.reshape(n, kv_heads, num_heads // kv_heads, dim)
    out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=decode.mask, scale=scale)
    return out.reshape(n, num_heads, dim)


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


# ---- the interface and its two implementations ------------------------------------------------


class ModelOps(Protocol):
    name: str

    def rotary(
        self, cos_table: torch.Tensor, sin_table: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This step's rotary argument for rotary_kv_write, from the [max_positions, D] tables."""
        ...

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor: ...

    def add_rms_norm(
        self, residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> torch.Tensor: ...

    def rotary_kv_write(
        self,
        qkv: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        slots: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        num_heads: int,
    ) -> torch.Tensor: ...

    def decode_attention(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, decode: DecodeMeta, scale: float
    ) -> torch.Tensor: ...

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor: ...

    def pack_linear(self, weight: torch.Tensor) -> torch.Tensor | None:
        """weight [N, K] in this backend's own matmul layout, or None: use torch's matmuls."""
        ...

    def packed_linear(
        self, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int
    ) -> torch.Tensor:
        """x [T, K] @ W^T + bias -> [T, N] with W as pack_linear laid it out."""
        ...


class TorchOps:
    """The references; every device and dtype."""

    name = "torch"

    def rotary(
        self, cos_table: torch.Tensor, sin_table: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return cos_table[positions].unsqueeze(1), sin_table[positions].unsqueeze(1), positions

    rms_norm = staticmethod(rms_norm_ref)
    add_rms_norm = staticmethod(add_rms_norm_ref)
    rotary_kv_write = staticmethod(rotary_kv_write_ref)
    decode_attention = staticmethod(decode_attention_ref)
    silu_mul = staticmethod(silu_mul_ref)

    def pack_linear(self, weight: torch.Tensor) -> torch.Tensor | None:
        return None  # server/model/dense.py picks torch's best layout for the device

    def packed_linear(
        self, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int
    ) -> torch.Tensor:
        raise NotImplementedError("TorchOps keeps weights in torch's layouts (pack_linear returns None)")


class FusedCpuOps:
    """torch.ops.loramux_cpu: fp32 CPU tensors only (select_model_ops sees to it)."""

    name = "fused-cpu"

    def __init__(self) -> None:
        self._ops = torch.ops.loramux_cpu

    def rotary(
        self, cos_table: torch.Tensor, sin_table: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return cos_table, sin_table, positions  # the kernel reads the tables at each token's position

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return self._ops.rms_norm(x, weight, eps)

    def add_rms_norm(
        self, residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> torch.Tensor:
        return self._ops.add_rms_norm(residual, delta, weight, eps)

    def rotary_kv_write(
        self,
        qkv: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        slots: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        num_heads: int,
    ) -> torch.Tensor:
        cos_table, sin_table, positions = rotary
        return self._ops.rotary_kv_write(
            qkv, cos_table, sin_table, positions, slots, k_cache, v_cache, num_heads
        )

    def decode_attention(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, decode: DecodeMeta, scale: float
    ) -> torch.Tensor:
        return self._ops.decode_attention(
            q.contiguous(), k_cache, v_cache, decode.slots, decode.lengths, scale
        )

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self._ops.silu_mul(gate_up)

    def pack_linear(self, weight: torch.Tensor) -> torch.Tensor | None:
        return self._ops.pack_linear_weight(weight)

    def packed_linear(
        self, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int
    ) -> torch.Tensor:
        return self._ops.packed_linear(x, packed, bias, out_features)


def select_model_ops(
    device: torch.device, dtype: torch.dtype, choice: str = "auto", build_dir: Path | None = None
) -> ModelOps:
    """`auto`: the fused kernels for fp32 on CPU when they build here, else torch; `fused`: those
    kernels or an error; `torch`: the references."""
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"model kernels must be one of {', '.join(KERNEL_CHOICES)}; got {choice!r}")
    if choice == "torch":
        return TorchOps()
    eligible = device.type == "cpu" and dtype == torch.float32
    if not eligible:
        if choice == "fused":
            raise ValueError(f"the fused CPU kernels take float32 on CPU, not {dtype} on {device.type}")
        return TorchOps()
    try:
        cpu_extension.load(build_dir)
    except cpu_extension.CpuExtensionError as exc:
        if choice == "fused":
            raise
        log.warning("fused CPU kernels unavailable, using torch ops (slower): %s", exc)
        return TorchOps()
    return FusedCpuOps()
