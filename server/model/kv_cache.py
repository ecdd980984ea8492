"""The KV cache: per layer, one K and one V tensor [slots, kv_heads, capacity, head_dim].

A slot holds one running sequence. The length dimension grows on demand (doubling up to
max_len) so memory follows the longest sequence actually running, not the configured limit.
Slot bookkeeping (who owns which slot) belongs to the engine; this is only storage.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        num_kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device,
        initial_len: int = 128,
    ) -> None:
        self.num_slots = num_slots
        self.max_len = max_len
        self._shape = (num_slots, num_kv_heads, min(initial_len, max_len), head_dim)
        self.k = [torch.zeros(self._shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(self._shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def ensure_capacity(self, length: int) -> None:
        """Make room for `length` positions per slot (copies the cache when it grows)."""
        if length <= self.capacity:
            return
        if length > self.max_len:
            raise ValueError(f"sequence length {length} exceeds the KV cache's max_len {self.max_len}")
        new_len = self.capacity
        while new_len < length:
            new_len *= 2
        new_len = min(new_len, self.max_len)
        # Allocate everything before replacing anything: a failed allocation (out of memory)
        # leaves the cache as it was.
        grown_k, grown_v = (
            [self._grown(old, new_len) for old in self.k],
            [self._grown(old, new_len) for old in self.v],
        )
        self.k, self.v = grown_k, grown_v

    @staticmethod
    def _grown(old: torch.Tensor, new_len: int) -> torch.Tensor:
        grown = old.new_zeros(old.shape[0], old.shape[1], new_len, old.shape[3])
        grown[:, :, : old.shape[2]] = old
        return grown

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of slot src into slot dst (slot compaction)."""
        for cache in (self.k, self.v):
            for layer in cache:
                layer[dst, :, :length] = layer[src, :, :length]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
