"""The device tier: adapters copied into the kernels' slot stacks, LRU over the unpinned slots.

Every adapted linear of every layer has one `LoraStack` with `num_slots` slots; an adapter in
slot s has its A/B/scale at index s of all of them. A slot is pinned while any running request
uses it and is never overwritten then; an unpinned slot keeps its adapter (a later request for
it costs nothing) until the least recently used one is needed for another adapter.

Slots are keyed by the adapter object's identity (name + checksum + source): an adapter reloaded
with other weights gets a fresh slot while requests still running on the old one finish on it.
Thread-safe: the engine acquires and releases, RPC threads invalidate and list.
This module knows the kernels' stacks and loaded adapters; it knows nothing of requests.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from adapters_store.adapter import LoadedAdapter
from adapters_store.spec import BaseModelSpec
from kernels import LoraBackend, LoraStack

AdapterKey = tuple[str, str, str]  # (name, checksum, source): one version of one adapter


def adapter_key(adapter: LoadedAdapter) -> AdapterKey:
    return (adapter.name, adapter.checksum, str(adapter.source))


@dataclass(frozen=True)
class SlotInfo:
    slot: int
    name: str
    checksum: str
    rank: int
    pins: int  # running requests using it
    stale: bool  # unloaded or replaced: reused first, never handed to new requests


@dataclass(frozen=True)
class DeviceSlotStats:
    num_slots: int
    used: int
    pinned: int
    loads: int
    evictions: int
    last_load_seconds: float


class DeviceSlots:
    def __init__(
        self,
        spec: BaseModelSpec,
        fused: Sequence[tuple[str, ...]],
        num_slots: int,
        backend: LoraBackend,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        """fused: the model's adapted linears as projection groups in output order, e.g.
        [("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)]."""
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.spec = spec
        self.num_slots = num_slots
        self.backend = backend
        self._stacks: list[dict[tuple[str, ...], LoraStack]] = []
        for _ in range(spec.num_layers):
            layer: dict[tuple[str, ...], LoraStack] = {}
            for group in fused:
                in_features = spec.features[group[0]][0]
                if any(spec.features[p][0] != in_features for p in group):
                    raise ValueError(f"fused projections {group} do not share their input size")
                widths = tuple(spec.features[p][1] for p in group)
                layer[group] = LoraStack.empty(
                    num_slots,
                    spec.max_rank,
                    in_features,
                    widths,
                    layout=backend.stack_layout,
                    dtype=dtype,
                    device=device,
                )
            self._stacks.append(layer)
        self._lock = threading.Lock()
        self._keys: list[AdapterKey | None] = [None] * num_slots
        self._ranks = [0] * num_slots
        self._pins = [0] * num_slots
        self._stale = [False] * num_slots
        self._slot_of: dict[AdapterKey, int] = {}
        self._idle: OrderedDict[int, None] = OrderedDict((s, None) for s in range(num_slots))  # LRU first
        self._loads = 0
        self._evictions = 0
        self._last_load_seconds = 0.0

    def stack(self, layer: int, group: tuple[str, ...]) -> LoraStack:
        return self._stacks[layer][group]

    def stacks(self) -> Iterator[tuple[int, tuple[str, ...], LoraStack]]:
        for layer, groups in enumerate(self._stacks):
            for group, stack in groups.items():
                yield layer, group, stack

    def prepare(self, adapter: LoadedAdapter) -> LoadedAdapter:
        """The adapter's device-ready form (loader thread); for LoRA in fp32 slots, the adapter itself."""
        return adapter

    def acquire(self, adapter: LoadedAdapter) -> int | None:
        """Pin a slot holding `adapter`, copying it in when needed; None when every slot is pinned."""
        key = adapter_key(adapter)
        with self._lock:
            slot = self._slot_of.get(key)
            if slot is None:
                slot = self._take_idle_slot()
                if slot is None:
                    return None
                self._fill(slot, adapter)  # under the lock: the copy is short (a few MB)
                self._slot_of[key] = slot
                self._keys[slot] = key
                self._ranks[slot] = adapter.rank
            self._pins[slot] += 1
            self._idle.pop(slot, None)
            return slot

    def release(self, slot: int) -> None:
        """Unpin one use of `slot`; an idle slot stays loaded until it is needed (stale ones first)."""
        with self._lock:
            if self._pins[slot] <= 0:
                raise RuntimeError(f"slot {slot} released more often than acquired")
            self._pins[slot] -= 1
            if self._pins[slot] == 0:
                self._idle[slot] = None
                if self._stale[slot]:
                    self._idle.move_to_end(slot, last=False)  # reuse it first
                    self._clear(slot)

    def invalidate(self, name: str) -> None:
        """Forget every slot of `name` (unload or replace): idle ones are cleared now, pinned ones
        when their last request finishes; no new request gets them."""
        with self._lock:
            for key, slot in list(self._slot_of.items()):
                if key[0] != name:
                    continue
                self._stale[slot] = True
                del self._slot_of[key]
                if self._pins[slot] == 0:
                    self._idle.move_to_end(slot, last=False)
                    self._clear(slot)

    def slots(self) -> list[SlotInfo]:
        with self._lock:
            return [
                SlotInfo(s, key[0], key[1], self._ranks[s], self._pins[s], self._stale[s])
                for s, key in enumerate(self._keys)
                if key is not None
            ]

    def stats(self) -> DeviceSlotStats:
        with self._lock:
            return DeviceSlotStats(
                num_slots=self.num_slots,
                used=sum(key is not None for key in self._keys),
                pinned=sum(p > 0 for p in self._pins),
                loads=self._loads,
                evictions=self._evictions,
                last_load_seconds=self._last_load_seconds,
            )

    # -- under self._lock -----------------------------------------------------------------------

    def _take_idle_slot(self) -> int | None:
        if not self._idle:
            return None
        slot = next(iter(self._idle))  # least recently used (stale and empty ones were put first)
        old = self._keys[slot]
        if old is not None:
            if not self._stale[slot]:
                self._evictions += 1
            self._slot_of.pop(old, None)
        return slot

    def _fill(self, slot: int, adapter: LoadedAdapter) -> None:
        start = time.perf_counter()
        weights = adapter.lora_weights()
        for layer, groups in enumerate(self._stacks):
            for group, stack in groups.items():
                parts = [weights.get((layer, p)) for p in group]
                stack.set_slot(
                    slot,
                    [None if w is None else w.A for w in parts],
                    [None if w is None else w.B for w in parts],
                    [0.0 if w is None else w.scale for w in parts],
                )
        self._stale[slot] = False
        self._loads += 1
        self._last_load_seconds = time.perf_counter() - start

    def _clear(self, slot: int) -> None:
        for groups in self._stacks:
            for stack in groups.values():
                stack.clear_slot(slot)
        self._keys[slot] = None
        self._ranks[slot] = 0
        self._stale[slot] = False
