"""Slot pools: how one kind of adapter is stored on the device and applied by the model.

A pool owns `num_slots` device slots of one layout. Its life cycle for one adapter:

    pool.refusal(adapter)    # None when it can hold the adapter, else why not (any thread)
    form = pool.prepare(adapter)   # LOADER thread: the device-ready form (converted, validated)
    pool.fill(slot, form)    # ENGINE thread: copies only
    pool.clear(slot)
    pool.term(layer, group)  # what an adapted linear calls: term(x, y, step) adds the pool's part
    pool.plan(step)          # once per step: the backend's plan over all of the pool's stacks

`LoraSlotPool` is the first kind: one kernels.LoraStack per (layer, fused projection group),
holding plain LoRA factors of rank <= its max rank. Compressed kinds (MoS shards, ComPEFT codes)
add pools with their own device form and kernels behind the same protocol.

This module does not know requests, LRU order, pins or which adapter sits in which slot
(adapters_store/device_slots.py does); slot ids here are the pool's own, 0 .. num_slots - 1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from adapters_store.adapter import LoadedAdapter
from adapters_store.spec import BaseModelSpec
from kernels import AdapterStep, LoraBackend, LoraStack, LoraTerm

Group = tuple[str, ...]  # fused projections of one adapted linear, e.g. ("q_proj", "k_proj", "v_proj")
Term = Callable[[torch.Tensor, torch.Tensor, AdapterStep], None]


class DeviceForm(Protocol):
    """An adapter made ready for one pool's slots (device, dtype, layout): fill only copies it."""

    @property
    def nbytes(self) -> int: ...


class SlotPool(Protocol):
    kind: str  # "lora", ...
    num_slots: int
    backend: LoraBackend
    slot_nbytes: int  # device bytes one slot holds: the cheapest pool that accepts an adapter wins

    def refusal(self, adapter: LoadedAdapter) -> str | None:
        """None when this pool can hold `adapter`; otherwise why not (for the user's error)."""
        ...

    def accepts(self, adapter: LoadedAdapter) -> bool: ...

    def prepare(self, adapter: LoadedAdapter) -> DeviceForm:
        """The device-ready form (loader thread; thread-safe: touches no slot)."""
        ...

    def fill(self, slot: int, form: DeviceForm) -> None:
        """Copy a prepared form into `slot` (engine thread)."""
        ...

    def clear(self, slot: int) -> None: ...

    def term(self, layer: int, group: Group) -> Term: ...

    def plan(self, step: AdapterStep) -> AdapterStep:
        """`step` with this pool's backend plan attached, made once per step."""
        ...


class StackedSlots:
    """What every pool of per-key stacks shares (keys: (layer, group), or a group spanning layers):
    `fill` copies a form's parts into each stack holding some (clearing the others), `clear` clears all."""

    _stacks: Mapping[
        Any, Any
    ]  # stacks with set_slot / clear_slot (and in_features, output_slices for _stack_parts)

    def refusal(self, adapter: LoadedAdapter) -> str | None:
        raise NotImplementedError

    def accepts(self, adapter: LoadedAdapter) -> bool:
        return self.refusal(adapter) is None

    def _fill_parts(self, slot: int, parts_by_key: Mapping[Any, Any], unpack: bool = True) -> None:
        """Each stack's `set_slot(slot, *parts)` (`set_slot(slot, parts)` when not `unpack`), or its clear."""
        for key, stack in self._stacks.items():
            parts = parts_by_key.get(key)
            if parts is None:
                stack.clear_slot(slot)
            elif unpack:
                stack.set_slot(slot, *parts)
            else:
                stack.set_slot(slot, parts)

    def clear(self, slot: int) -> None:
        for stack in self._stacks.values():
            stack.clear_slot(slot)

    def _stack_parts(
        self,
        name: str,
        factors: Mapping[tuple[int, str], Any],
        convert: Callable[[int, str, Any], tuple[torch.Tensor, torch.Tensor, float]],
    ) -> tuple[dict[Any, GroupParts], int]:
        """Per (layer, group) stack: each projection's converted (A, B, scale), None where not adapted.

        factors: (layer, projection) -> anything with A [rank, in] and B [out, rank] (checked
        against the stack); convert(layer, projection, factor) gives the stack's form of it.
        Returns the groups holding any, and the bytes of the converted tensors."""
        groups: dict[Any, GroupParts] = {}
        nbytes = 0
        for (layer, group), stack in self._stacks.items():
            a_list: list[torch.Tensor | None] = []
            b_list: list[torch.Tensor | None] = []
            scales: list[float] = []
            for projection, width in zip(group, stack.output_slices, strict=True):
                f = factors.get((layer, projection))
                if f is None:
                    a_list.append(None)
                    b_list.append(None)
                    scales.append(0.0)
                    continue
                rank = int(f.A.shape[0])
                if f.A.shape != (rank, stack.in_features) or f.B.shape != (width, rank):
                    raise ValueError(
                        f"adapter {name!r} layer {layer} {projection}: expected A [{rank}, "
                        f"{stack.in_features}] and B [{width}, {rank}], got {tuple(f.A.shape)} "
                        f"and {tuple(f.B.shape)}"
                    )
                a, b, scale = convert(layer, projection, f)
                nbytes += a.numel() * a.element_size() + b.numel() * b.element_size()
                a_list.append(a)
                b_list.append(b)
                scales.append(scale)
            if any(a is not None for a in a_list):
                groups[layer, group] = (a_list, b_list, scales)
        return groups, nbytes


GroupParts = tuple[
    list[torch.Tensor | None], list[torch.Tensor | None], list[float]
]  # set_slot's A, B, scales


@dataclass(frozen=True, eq=False)
class LoraForm:
    """Per (layer, group): each projection's A [rank, in] and B [out, rank] (None = not adapted) and
    scale, in the pool's dtype and device."""

    groups: dict[tuple[int, Group], tuple[list[torch.Tensor | None], list[torch.Tensor | None], list[float]]]
    rank: int
    nbytes: int


class LoraSlotPool(StackedSlots):
    """Plain LoRA factors in one LoraStack per (layer, fused group), zero-padded to `max_rank`."""

    kind = "lora"

    def __init__(
        self,
        spec: BaseModelSpec,
        fused: Sequence[Group],
        num_slots: int,
        backend: LoraBackend,
        device: torch.device | str,
        dtype: torch.dtype = torch.float32,
        max_rank: int | None = None,
    ) -> None:
        """fused: the model's adapted linears as projection groups in output order, e.g.
        [("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)].
        max_rank: the rank its slots hold (default: spec.max_rank)."""
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.spec = spec
        self.num_slots = num_slots
        self.backend = backend
        self.max_rank = spec.max_rank if max_rank is None else max_rank
        if self.max_rank < 1:
            raise ValueError(f"max_rank must be >= 1, got {self.max_rank}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.groups = tuple(tuple(g) for g in fused)
        self._stacks: dict[tuple[int, Group], LoraStack] = {}
        for layer in range(spec.num_layers):
            for group in self.groups:
                in_features = spec.features[group[0]][0]
                if any(spec.features[p][0] != in_features for p in group):
                    raise ValueError(f"fused projections {group} do not share their input size")
                widths = tuple(spec.features[p][1] for p in group)
                self._stacks[layer, group] = LoraStack.empty(
                    num_slots,
                    self.max_rank,
                    in_features,
                    widths,
                    layout=backend.stack_layout,
                    dtype=dtype,
                    device=device,
                )
        element = torch.empty((), dtype=dtype).element_size()
        self.slot_nbytes = sum(
            (s.num_slices * s.in_features + s.out_features) * s.max_rank * element
            for s in self._stacks.values()
        )

    def stack(self, layer: int, group: Group) -> LoraStack:
        return self._stacks[layer, group]

    def stacks(self) -> Iterator[tuple[int, Group, LoraStack]]:
        for (layer, group), stack in self._stacks.items():
            yield layer, group, stack

    def refusal(self, adapter: LoadedAdapter) -> str | None:
        if adapter.rank > self.max_rank:
            return f"rank {adapter.rank} exceeds the pool's max rank {self.max_rank}"
        return None

    def prepare(self, adapter: LoadedAdapter) -> LoraForm:
        reason = self.refusal(adapter)
        if reason is not None:
            raise ValueError(f"adapter {adapter.name!r}: {reason}")

        def to_slot(layer: int, projection: str, w: Any) -> tuple[torch.Tensor, torch.Tensor, float]:
            return w.A.to(self.device, self.dtype), w.B.to(self.device, self.dtype), w.scale

        groups, nbytes = self._stack_parts(adapter.name, adapter.lora_weights(), to_slot)
        return LoraForm(groups=groups, rank=adapter.rank, nbytes=nbytes)

    def fill(self, slot: int, form: DeviceForm) -> None:
        assert isinstance(form, LoraForm), type(form)
        self._fill_parts(slot, form.groups)

    def term(self, layer: int, group: Group) -> Term:
        return LoraTerm(self.backend, self._stacks[layer, tuple(group)])

    def plan(self, step: AdapterStep) -> AdapterStep:
        return step.with_plan(self.backend.plan_step(step, self._stacks.values()))
