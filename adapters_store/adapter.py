"""The loaded-adapter types every format produces, and the common way to read them as LoRA factors.

An adapter in the host tier keeps its format's compact form (for `peft-lora` that is simply the
fp32 A and B of each module). Whatever the format, `lora_weights()` materializes per-module
`A [rank, in]`, `B [out, rank]` and `scale`, which is all the device tier needs to fill a slot:
`delta_y = scale * (x @ A.T) @ B.T`. Formats with their own kernel paths (MoS shard gathers,
ComPEFT ternary codes) can expose their compact tensors beside it. This module knows no files.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

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
