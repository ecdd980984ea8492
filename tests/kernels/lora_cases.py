"""Shared kernel test cases: popularity patterns, filled stacks with mixed ranks, step batches."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kernels import AdapterBatch, LoraStack, StackLayout

POPULARITIES = ("distinct", "uniform", "zipf", "identical")
TOKEN_COUNTS = (1, 7, 33)
NUM_SLOTS = 40  # >= the largest token count, so "distinct" gives every token its own slot
MIXED_RANKS = (8, 3, 8, 5, 1, 8, 2, 0, 6, 4)  # slot s has rank MIXED_RANKS[s % 10]; 0 = empty slot


def interpreting() -> bool:
    """Whether Triton kernels run interpreted here (set by conftest.py on machines without CUDA)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def slot_ids_for(popularity: str, num_tokens: int, seed: int = 0, no_adapter_every: int = 5) -> list[int]:
    """Token -> slot under one popularity pattern, rows shuffled; every n-th token without adapter."""
    g = torch.Generator().manual_seed(seed)
    if popularity == "distinct":
        ids = torch.randperm(NUM_SLOTS, generator=g)[:num_tokens].tolist()
    elif popularity == "uniform":  # sqrt(T) adapters, tokens spread evenly over them
        active = torch.randperm(NUM_SLOTS, generator=g)[: max(1, round(math.sqrt(num_tokens)))].tolist()
        ids = [active[i % len(active)] for i in torch.randperm(num_tokens, generator=g).tolist()]
    elif popularity == "zipf":
        weights = torch.tensor([1.0 / (k + 1) ** 1.5 for k in range(NUM_SLOTS)])
        ids = torch.multinomial(weights, num_tokens, replacement=True, generator=g).tolist()
    elif popularity == "identical":
        ids = [int(torch.randint(NUM_SLOTS, (1,), generator=g))] * num_tokens
    elif popularity == "chunks":  # prefill-like: contiguous runs per adapter, then decode tokens
        ids = []
        while len(ids) < num_tokens:
            slot = int(torch.randint(NUM_SLOTS, (1,), generator=g))
            ids += [slot] * int(torch.randint(1, 12, (1,), generator=g))
        ids = ids[:num_tokens]
    else:
        raise ValueError(popularity)
    if num_tokens > 1 and no_adapter_every:
        ids = [-1 if i % no_adapter_every == no_adapter_every - 1 else s for i, s in enumerate(ids)]
    return ids


def fill_stack(stack: LoraStack, ranks: Sequence[int], seed: int = 0) -> LoraStack:
    """Random adapters of the given per-slot ranks (0 = leave empty); scales differ per projection."""
    g = torch.Generator().manual_seed(seed)
    device, dtype = stack.lora_a.device, stack.lora_a.dtype
    for slot in range(stack.num_slots):
        rank = ranks[slot % len(ranks)]
        if rank == 0:
            continue
        a: list[torch.Tensor | None] = [
            torch.randn(rank, stack.in_features, generator=g) * stack.in_features**-0.5
            for _ in range(stack.num_slices)
        ]
        b: list[torch.Tensor | None] = [
            torch.randn(width, rank, generator=g) * 0.5 for width in stack.output_slices
        ]
        if slot % 7 == 3 and stack.num_slices > 1:  # an adapter that does not target projection 1
            a[1] = b[1] = None
        stack.set_slot(
            slot,
            [None if t is None else t.to(device, dtype) for t in a],
            [None if t is None else t.to(device, dtype) for t in b],
            [0.5 + 0.25 * p + 0.01 * slot for p in range(stack.num_slices)],
        )
    return stack


@dataclass
class Case:
    slot_ids: list[int]
    batch: AdapterBatch
    stack: LoraStack
    x: torch.Tensor  # [T, d_in]
    y: torch.Tensor  # [T, N], the base output the adapter term is added to


def make_case(
    slot_ids: list[int],
    *,
    layout: StackLayout = "triton",
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    slices: Sequence[int] = (24, 8, 8),
    in_features: int = 40,
    max_rank: int = 8,
    ranks: Sequence[int] = MIXED_RANKS,
    seed: int = 0,
) -> Case:
    """A filled stack (mixed ranks by default), the step's batch, an input and a base output."""
    stack = LoraStack.empty(
        NUM_SLOTS, max_rank, in_features, slices, layout=layout, dtype=dtype, device=device
    )
    fill_stack(stack, ranks, seed)
    g = torch.Generator().manual_seed(seed + 1)
    num_tokens = len(slot_ids)
    return Case(
        slot_ids=slot_ids,
        batch=AdapterBatch.build(slot_ids, device),
        stack=stack,
        x=torch.randn(num_tokens, in_features, generator=g).to(device, dtype),
        y=torch.randn(num_tokens, sum(slices), generator=g).to(device, dtype),
    )
