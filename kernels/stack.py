"""LoraStack: the LoRA weights of every device slot for one (possibly fused) projection of one layer.

Shapes (the kernels' contract; P = number of fused projections, r = the stack's max rank):

    lora_a [S, P * r, d_in]         rows p*r : p*r + rank_s are projection p's A of slot s, rest zero
    lora_b P x [S, out_p, r]        projection p's B; columns >= rank_s zero
    scale  [S, P] float32           alpha / r (or alpha / sqrt(r)) of slot s for projection p
    slot_ranks [S] int32            rank_s <= r: backends skip the zero padding past it where they can

Projection p writes y[:, o_p : o_p + out_p] (o_p = sum of the widths before it), the layout of the
fused base output (q|k|v, gate|up). A slot with rank 0 is empty.

Memory layout is the backend's choice (`layout`), the shapes above are views either way:
"triton" stores A as [S, P*r, d_in] and all B in one [S, N, r] buffer (one kernel launch for all
slices); "torch" stores A as [S, d_in, P*r] and each B as [S, r, out_p], so that a token's weights
are whole rows that `embedding_bag` reads without a gathered copy (see torch_backend.py).

The stack keeps host copies of ranks and scales so CPU-side strategy choices need no device
sync. It does not know adapter formats, names or which adapter sits in which slot.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

StackLayout = Literal["triton", "torch"]


@dataclass(eq=False)
class LoraStack:
    lora_a: torch.Tensor  # [S, P * r, d_in]
    lora_b: tuple[torch.Tensor, ...]  # P x [S, out_p, r]
    scale: torch.Tensor  # [S, P] float32
    slot_ranks: torch.Tensor  # [S] int32
    output_slices: tuple[int, ...]
    host_ranks: list[int]  # mirror of slot_ranks
    host_scales: list[tuple[float, ...]]  # mirror of scale

    @classmethod
    def empty(
        cls,
        num_slots: int,
        max_rank: int,
        in_features: int,
        output_slices: Sequence[int],
        *,
        layout: StackLayout,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> LoraStack:
        """A stack with every slot empty (rank 0, zero weights), stored in `layout`."""
        slices = tuple(output_slices)
        p = len(slices)
        zeros = functools.partial(torch.zeros, dtype=dtype, device=device)
        lora_a: torch.Tensor
        lora_b: tuple[torch.Tensor, ...]
        if layout == "triton":
            lora_a = zeros(num_slots, p * max_rank, in_features)
            lora_b = tuple(zeros(num_slots, sum(slices), max_rank).split(slices, dim=1))
        elif layout == "torch":
            lora_a = zeros(num_slots, in_features, p * max_rank).transpose(1, 2)
            lora_b = tuple(zeros(num_slots, max_rank, width).transpose(1, 2) for width in slices)
        else:
            raise ValueError(f"unknown stack layout {layout!r}: use 'triton' or 'torch'")
        return cls(
            lora_a=lora_a,
            lora_b=lora_b,
            scale=torch.zeros(num_slots, p, dtype=torch.float32, device=device),
            slot_ranks=torch.zeros(num_slots, dtype=torch.int32, device=device),
            output_slices=slices,
            host_ranks=[0] * num_slots,
            host_scales=[(0.0,) * p] * num_slots,
        )

    @functools.cached_property
    def transposed(self) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """A^T [S, d_in, P * r] and each B_p^T [S, r, out_p]: contiguous views in the torch layout."""
        return self.lora_a.transpose(1, 2), tuple(b.transpose(1, 2) for b in self.lora_b)

    @functools.cached_property
    def in_torch_layout(self) -> bool:
        """Whether A^T and every B_p^T are contiguous (the "torch" layout), checked once per stack."""
        a_t, b_t = self.transposed
        return a_t.is_contiguous() and all(b.is_contiguous() for b in b_t)

    @functools.cached_property  # shapes never change
    def num_slots(self) -> int:
        return int(self.lora_a.shape[0])

    @property
    def num_slices(self) -> int:
        return len(self.output_slices)

    @functools.cached_property  # shapes never change
    def max_rank(self) -> int:
        return int(self.lora_b[0].shape[2])

    @functools.cached_property  # shapes never change
    def in_features(self) -> int:
        return int(self.lora_a.shape[2])

    @functools.cached_property  # shapes never change
    def out_features(self) -> int:
        return sum(self.output_slices)

    def set_slot(
        self,
        slot: int,
        lora_a: Sequence[torch.Tensor | None],
        lora_b: Sequence[torch.Tensor | None],
        scales: Sequence[float],
    ) -> None:
        """Write one adapter into `slot`: per projection A [rank_p, d_in] and B [out_p, rank_p].

        None for a projection the adapter does not target. The slot's rank is the largest rank_p;
        smaller ranks and untargeted projections are zero-padded.
        """
        p, r = self.num_slices, self.max_rank
        if not len(lora_a) == len(lora_b) == len(scales) == p:
            raise ValueError(f"expected {p} A, B and scale entries (one per projection {self.output_slices})")
        ranks = [0 if a is None else int(a.shape[0]) for a in lora_a]
        if max(ranks) > r:
            raise ValueError(f"adapter rank {max(ranks)} exceeds this stack's max rank {r}")
        a_rows = self.lora_a[slot].unflatten(0, (p, r))  # [P, r, d_in] view, either layout
        a_rows.zero_()
        for i, (a, b, width) in enumerate(zip(lora_a, lora_b, self.output_slices, strict=True)):
            if (a is None) != (b is None):
                raise ValueError(f"projection {i}: give both A and B or neither")
            if a is not None and b is not None:
                if a.shape != (ranks[i], self.in_features) or b.shape != (width, ranks[i]):
                    raise ValueError(
                        f"projection {i}: expected A [{ranks[i]}, {self.in_features}] and "
                        f"B [{width}, {ranks[i]}], got {tuple(a.shape)} and {tuple(b.shape)}"
                    )
                a_rows[i, : ranks[i]].copy_(a)
            self.lora_b[i][slot].zero_()
            if b is not None:
                self.lora_b[i][slot, :, : ranks[i]].copy_(b)
        rank = max(ranks)
        self.scale[slot] = torch.tensor([float(s) for s in scales], dtype=torch.float32)
        self.slot_ranks[slot] = rank
        self.host_ranks[slot] = rank
        self.host_scales[slot] = tuple(float(s) for s in scales)

    def clear_slot(self, slot: int) -> None:
        """Empty `slot`: its tokens then add nothing (and cost nothing where the backend can skip)."""
        self.lora_a[slot].zero_()
        for b in self.lora_b:
            b[slot].zero_()
        self.scale[slot] = 0.0
        self.slot_ranks[slot] = 0
        self.host_ranks[slot] = 0
        self.host_scales[slot] = (0.0,) * self.num_slices
