"""The loaded-adapter types every format produces, and the common way to read them as LoRA factors.

An adapter in the host tier keeps its format's compact form (for `peft-lora` that is simply the
fp32 A and B of each module). Whatever the format, `lora_weights()` materializes per-module
`A [rank, in]`, `B [out, rank]` and `scale`, which is all the device tier needs to fill a slot:
`delta_y = scale * (x @ A.T) @ B.T`. The compressed formats keep their compact tensors beside it
for the kernels that read them directly: `MosAdapter` (shard pools + index tables) and
`CompeftAdapter` (ternary signs with one gamma). This module knows no files.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from adapters_store.compeft_config import ModuleLayout

ModuleKey = tuple[int, str]  # (layer index, projection name), e.g. (3, "q_proj")


@dataclass(frozen=True, eq=False)
class LoraWeights:
    """One adapted projection: `y += scale * (x @ A.T) @ B.T`. Tensors are fp32, CPU, read-only by convention."""

    A: torch.Tensor  # [rank, in_features]
    B: torch.Tensor  # [out_features, rank]
    scale: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def nbytes(self) -> int:
        return self.A.numel() * self.A.element_size() + self.B.numel() * self.B.element_size()


@dataclass(frozen=True, eq=False)
class LoadedAdapter(ABC):
    """A validated adapter held in host memory.

    name: the identifier requests use.
    format: "peft-lora" (later "mos", "compeft").
    source: the directory it was read from (real path, inside an adapter root when served).
    checksum: "sha256:<hex>" of its weight file, as read.
    nbytes: bytes of its host (compact) form, what the host cache counts.
    rank: its largest per-module rank (what a device slot must hold).
    target_modules: the projections it adapts in at least one layer, in PROJECTIONS order.
    """

    name: str
    format: str
    source: Path
    checksum: str
    nbytes: int
    rank: int
    target_modules: tuple[str, ...]

    @abstractmethod
    def lora_weights(self) -> Mapping[ModuleKey, LoraWeights]:
        """Per (layer, projection) fp32 A, B and scale; modules it does not adapt are absent."""


@dataclass(frozen=True, eq=False)
class LoraAdapter(LoadedAdapter):
    """An adapter whose compact form is plain LoRA factors (`peft-lora`): materializing is free."""

    modules: Mapping[ModuleKey, LoraWeights]

    def lora_weights(self) -> Mapping[ModuleKey, LoraWeights]:
        return self.modules

    @property
    def ranks(self) -> dict[ModuleKey, int]:
        """Each adapted module's rank (they differ with PEFT's rank_pattern)."""
        return {key: weights.rank for key, weights in self.modules.items()}

    @property
    def layers(self) -> tuple[int, ...]:
        """The layer indices it adapts, ascending."""
        return tuple(sorted({layer for layer, _ in self.modules}))


@dataclass(frozen=True, eq=False)
class MosAdapter(LoadedAdapter):
    """A Mixture-of-Shards adapter (`mos`): per projection one pool pair shared by every layer.

    pools[proj] = (pool_A [N, in/l], pool_B [N, out/l]) fp32; indices[(layer, proj)] = (index_A,
    index_B), each int64 [r * l] into the pool's rows. Per module, with l = shards_per_vector:
    `A = pool_A[index_A].reshape(r, in)`, `B = pool_B[index_B].reshape(r, out).T`, and the served
    term is `y += scale * B (A x)` with `scale = lora_alpha / r`.
    """

    r: int
    shards_per_vector: int
    lora_alpha: float
    pools: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
    indices: Mapping[ModuleKey, tuple[torch.Tensor, torch.Tensor]]

    @property
    def scale(self) -> float:
        return self.lora_alpha / self.r

    def lora_weights(self) -> Mapping[ModuleKey, LoraWeights]:
        # One gather per projection and factor over all its layers, then views: ~420 small
        # gathers (30 layers x 7 projections x A, B) cost several times more than 14 large ones.
        by_projection: dict[str, list[ModuleKey]] = {}
        for key in self.indices:
            by_projection.setdefault(key[1], []).append(key)
        weights = {}
        for projection, keys in by_projection.items():
            pool_a, pool_b = self.pools[projection]
            a_all = pool_a.index_select(0, torch.cat([self.indices[key][0] for key in keys]))
            b_all = pool_b.index_select(0, torch.cat([self.indices[key][1] for key in keys]))
            a_all = a_all.reshape(len(keys), self.r, -1)  # [modules, r, in]
            b_all = b_all.reshape(len(keys), self.r, -1).transpose(1, 2).contiguous()  # [modules, out, r]
            for i, key in enumerate(keys):
                weights[key] = LoraWeights(A=a_all[i], B=b_all[i], scale=self.scale)
        return weights


@dataclass(frozen=True, eq=False)
class TernaryFactors:
    """One ComPEFT module: `A^ = gamma * sign_A`, `B^ = gamma * sign_B`, `y += scale * B^ (A^ x)`."""

    sign_A: torch.Tensor  # [rank, in_features] int8 in {-1, 0, 1}
    sign_B: torch.Tensor  # [out_features, rank] int8 in {-1, 0, 1}
    scale: float  # the LoRA scale (alpha / r), gamma not included

    @property
    def rank(self) -> int:
        return int(self.sign_A.shape[0])


@dataclass(frozen=True, eq=False)
class CompeftAdapter(LoadedAdapter):
    """A ComPEFT adapter (`compeft`): sparse ternary A and B with one scalar gamma for all of them.

    The host form is the coded file's payload (see adapters_store/compeft.py); `ternary()` decodes
    it to each module's signs, `lora_weights()` to `gamma * signs` in fp32.
    """

    gamma: float
    density: float

    @abstractmethod
    def ternary(self) -> Mapping[ModuleKey, TernaryFactors]:
        """Per (layer, projection) its int8 signs and LoRA scale, decoded from the compact form."""

    def sign_layout(self) -> tuple[torch.Tensor, tuple[ModuleLayout, ...]]:
        """Every module's signs end to end in one int8 vector (its A [rank, in] then its B
        [out, rank], row-major) and where each module sits in it: what GPU slots pack in one pass.
        This default copies `ternary()` into one vector; a decoder that makes one returns it."""
        factors = self.ternary()
        parts = [s.reshape(-1) for f in factors.values() for s in (f.sign_A, f.sign_B)]
        vector = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int8)
        layout, offset = [], 0
        for (layer, projection), f in factors.items():
            if f.sign_A.dim() != 2 or f.sign_B.dim() != 2 or f.sign_A.shape[0] != f.sign_B.shape[1]:
                raise ValueError(
                    f"layer {layer} {projection}: expected sign_A [rank, in] and sign_B [out, rank], got "
                    f"{tuple(f.sign_A.shape)} and {tuple(f.sign_B.shape)}"
                )
            rank, in_features = f.sign_A.shape
            out_features = f.sign_B.shape[0]
            layout.append(ModuleLayout(layer, projection, rank, in_features, out_features, f.scale, offset))
            offset += f.sign_A.numel() + f.sign_B.numel()
        return vector, tuple(layout)

    def lora_weights(self) -> Mapping[ModuleKey, LoraWeights]:
        return {
            key: LoraWeights(
                A=f.sign_A.to(torch.float32) * self.gamma,
                B=f.sign_B.to(torch.float32) * self.gamma,
                scale=f.scale,
            )
            for key, f in self.ternary().items()
        }
