"""Rotary position embeddings: inverse frequencies (default, linear, llama3 scaling) and rotation.

Uses the rotate-half convention of Hugging Face Llama checkpoints (GGUF q/k weights come back
permuted to it by transformers' loader).
"""

from __future__ import annotations

import math

import torch

from server.model.arch import RopeConfig


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """[head_dim // 2] fp32 inverse frequencies after the configured scaling."""
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if rope.rope_type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.rope_type == "llama3":
        inv_freq = _llama3_scaled(inv_freq, rope)
    return inv_freq.float()


def _llama3_scaled(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    # Long wavelengths are divided by `factor`, short ones kept, the band between interpolated.
    old_len = rope.original_max_position_embeddings
    low_freq_wavelen = old_len / rope.low_freq_factor
    high_freq_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    interpolated = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, interpolated, scaled)


class RotaryTable:
    """cos/sin for every position up to `max_positions`, in the model's dtype (computed in fp32).

    Both are laid out over the whole head_dim, the sine with the sign of rotate-half folded in
    (-sin on the first half), so a rotation is x * cos + roll(x, D/2) * sin (kernels/model_ops.py).
    """

    def __init__(
        self, rope: RopeConfig, head_dim: int, max_positions: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        inv_freq = inverse_frequencies(rope, head_dim)
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        cos = torch.cat((angles.cos(), angles.cos()), dim=-1)  # [max_positions, head_dim]
        sin = torch.cat((-angles.sin(), angles.sin()), dim=-1)
        self.cos = cos.to(device=device, dtype=dtype)
        self.sin = sin.to(device=device, dtype=dtype)
