"""The device tier: adapters copied into slot pools, LRU over the unpinned slots, global slot ids.

One or more pools (adapters_store/slot_pools.py) hold the slots; pool i owns the contiguous
global ids offset_i .. offset_i + num_slots_i - 1, so a slot id names a pool and its local slot.
An adapter goes to the cheapest pool that accepts it (for LoRA pools: the smallest max rank that
fits). A slot is pinned while any running request uses it and is never overwritten then; an
unpinned slot keeps its adapter (a later request for it costs nothing) until the least recently
used one of its pool is needed for another adapter.

Threads: `prepare` (the device-ready form) runs on the loader threads, and so does `resident`,
which stands in for it while a current slot holds that very version: a request for an adapter
already in a slot then costs no decode or copy at all. Should that slot be taken for another
adapter before the request is admitted, `acquire` raises `NotResident` and the caller prepares
the form after all. `acquire` reserves a slot
under the lock, copies OUTSIDE it and then publishes the slot (only the engine thread acquires, so
only it fills); RPC threads invalidate and list without waiting for a copy. `step` builds each
step's metadata once: the (slot, weight) pairs of every token split per pool into local slot ids,
with each pool backend's plan; `attach` gives each adapted linear one term per pool.

Slots are keyed by the adapter object's identity (name + checksum + source): an adapter reloaded
with other weights gets a fresh slot while requests still running on the old one finish on it.
This module knows pools and loaded adapters; it knows nothing of requests or the model's code.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from adapters_store import lifecycle_log
from adapters_store.adapter import LoadedAdapter
from adapters_store.errors import AdapterError
from adapters_store.slot_pools import DeviceForm, Group, SlotPool, Term
from kernels import AdapterStep, LoraBackend, LoraStack

AdapterKey = tuple[str, str, str]  # (name, checksum, source): one version of one adapter


def adapter_key(adapter: LoadedAdapter) -> AdapterKey:
    return (adapter.name, adapter.checksum, str(adapter.source))


@dataclass(frozen=True, eq=False)
class ReadyAdapter:
    """An adapter prepared for one pool (DeviceSlots.prepare): acquire only copies `form`. No form
    (DeviceSlots.resident): a slot held this version when it was asked for, acquire only pins it."""

    adapter: LoadedAdapter
    key: AdapterKey
    pool: int  # index into DeviceSlots.pools
    form: DeviceForm | None


class NotResident(Exception):
    """`acquire` was given no form (`resident`) and no current slot holds that version any more."""

    def __init__(self, ready: ReadyAdapter) -> None:
        super().__init__(f"adapter {ready.key[0]!r} left its device slot before it was acquired")


@dataclass(frozen=True, eq=False)
class DeviceStep:
    """One step's adapter metadata: per pool, its AdapterStep (local slot ids, with its plan) or None."""

    num_tokens: int
    pools: tuple[AdapterStep | None, ...]


class AdaptedLinearLike(Protocol):
    projections: tuple[str, ...]
    adapter_terms: tuple[Callable[[torch.Tensor, torch.Tensor, DeviceStep], None], ...]


class ModelLike(Protocol):
    def adapted_linears(self) -> Iterable[tuple[int, AdaptedLinearLike]]: ...


@dataclass(frozen=True)
class PoolTerm:
    """An adapted linear's term for one pool: applies the pool's part of the step, if any."""

    pool: int
    term: Term

    def __call__(self, x: torch.Tensor, y: torch.Tensor, step: DeviceStep) -> None:
        pool_step = step.pools[self.pool]
        if pool_step is not None:
            self.term(x, y, pool_step)


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
    def __init__(self, pools: Sequence[SlotPool]) -> None:
        if not pools:
            raise ValueError("DeviceSlots needs at least one slot pool")
        self.pools = tuple(pools)
        self.offsets = tuple(sum(p.num_slots for p in self.pools[:i]) for i in range(len(self.pools)))
        self.num_slots = sum(p.num_slots for p in self.pools)
        self._pool_of = [i for i, p in enumerate(self.pools) for _ in range(p.num_slots)]
        self._lock = threading.Lock()
        self._keys: list[AdapterKey | None] = [None] * self.num_slots
        self._ranks = [0] * self.num_slots
        self._pins = [0] * self.num_slots
        self._stale = [False] * self.num_slots
        self._slot_of: dict[AdapterKey, int] = {}
        self._filling: dict[int, AdapterKey] = {}  # reserved slots being copied into, not yet published
        # Per pool, its unpinned slots, least recently used first (stale and empty ones put first).
        self._idle: list[OrderedDict[int, None]] = [
            OrderedDict((offset + s, None) for s in range(pool.num_slots))
            for offset, pool in zip(self.offsets, self.pools, strict=True)
        ]
        self._loads = 0
        self._evictions = 0
        self._last_load_seconds = 0.0

    @property
    def backend(self) -> LoraBackend:
        """The kernels backend (every pool's is the same one, chosen at start-up)."""
        return self.pools[0].backend

    def stacks(self) -> Iterator[tuple[int, tuple[str, ...], LoraStack]]:
        """Every LoRA stack of every pool (for sizing and benchmarks)."""
        for pool in self.pools:
            stacks = getattr(pool, "stacks", None)
            if stacks is not None:
                yield from stacks()

    # -- the model's side ------------------------------------------------------------------------

    def attach(self, model: ModelLike) -> None:
        """Give every adapted linear of `model` its terms, one per pool."""
        for layer, linear in model.adapted_linears():
            group: Group = tuple(linear.projections)
            linear.adapter_terms = tuple(
                PoolTerm(i, pool.term(layer, group)) for i, pool in enumerate(self.pools)
            )

    def step(
        self, token_pairs: Sequence[Sequence[tuple[int, float]]], device: torch.device | str
    ) -> DeviceStep | None:
        """The step's metadata, built once: token t's (global slot, weight) pairs split per pool into
        local slots, each pool's AdapterStep with its plan; None when no token uses an adapter."""
        per_pool: list[list[list[tuple[int, float]]]] = [[[] for _ in token_pairs] for _ in self.pools]
        used = [False] * len(self.pools)
        for t, pairs in enumerate(token_pairs):
            for slot, weight in pairs:
                if not 0 <= slot < self.num_slots:
                    raise ValueError(
                        f"token {t}: slot {slot} is not a device slot (0 .. {self.num_slots - 1})"
                    )
                pool = self._pool_of[slot]
                per_pool[pool][t].append((slot - self.offsets[pool], weight))
                used[pool] = True
        if not any(used):
            return None
        steps = tuple(
            pool.plan(AdapterStep.build(pairs, device)) if used[i] else None
            for i, (pool, pairs) in enumerate(zip(self.pools, per_pool, strict=True))
        )
        return DeviceStep(len(token_pairs), steps)

    # -- the loader's and the engine's side ------------------------------------------------------

    def prepare(self, adapter: LoadedAdapter) -> ReadyAdapter:
        """The adapter's device-ready form for the cheapest pool that accepts it (any thread).

        AdapterError when no pool can hold it, saying why each refused.
        """
        fitting = [i for i, pool in enumerate(self.pools) if pool.accepts(adapter)]
        if not fitting:
            reasons = "; ".join(
                f"{pool.kind} pool {i}: {pool.refusal(adapter)}" for i, pool in enumerate(self.pools)
            )
            raise AdapterError(
                f"adapter {adapter.name!r} fits no device slot pool ({reasons}); "
                "serve it with a larger --max-rank or reduce its rank"
            )
        best = min(fitting, key=lambda i: self.pools[i].slot_nbytes)
        form = self.pools[best].prepare(adapter)
        return ReadyAdapter(adapter=adapter, key=adapter_key(adapter), pool=best, form=form)

    def resident(self, adapter: LoadedAdapter) -> ReadyAdapter | None:
        """What `prepare` would give, without its form, while a current (not stale) slot holds this
        version of `adapter`; None otherwise (any thread). Nothing is pinned: by the time it is
        acquired the slot may have gone to another adapter (then `acquire` raises NotResident)."""
        key = adapter_key(adapter)
        with self._lock:
            slot = self._slot_of.get(key)
            if slot is None:
                return None
            pool = self._pool_of[slot]
        return ReadyAdapter(adapter=adapter, key=key, pool=pool, form=None)

    def acquire(self, ready: ReadyAdapter) -> int | None:
        """Pin a slot holding the prepared adapter, copying it in when needed (engine thread only);
        None when every slot of its pool is pinned. NotResident when `ready` has no form and no
        slot holds it now."""
        with self._lock:
            slot = self._slot_of.get(ready.key)
            if slot is not None:
                self._pins[slot] += 1
                self._idle[self._pool_of[slot]].pop(slot, None)
                return slot
            if ready.form is None:
                raise NotResident(ready)
            slot = self._take_idle_slot(ready.pool)
            if slot is None:
                return None
            evicted = None if self._stale[slot] else self._keys[slot]  # a stale one was unloaded before
            # Reserve: pinned and named, but not yet handed to anyone else by key.
            self._keys[slot] = ready.key
            self._ranks[slot] = ready.adapter.rank
            self._pins[slot] = 1
            self._stale[slot] = False
            self._filling[slot] = ready.key
        if evicted is not None:
            lifecycle_log.evicted(evicted[0], "device", slot=slot)
        start = time.perf_counter()
        pool = self.pools[ready.pool]
        pool.fill(slot - self.offsets[ready.pool], ready.form)  # the copy, outside the lock
        seconds = time.perf_counter() - start
        with self._lock:
            del self._filling[slot]
            if not self._stale[slot]:  # unloaded while copying: this request finishes on it, no other
                self._slot_of[ready.key] = slot
            self._loads += 1
            self._last_load_seconds = seconds
        lifecycle_log.loaded(
            ready.key[0],
            "device",
            slot=slot,
            pool=pool.kind,
            rank=ready.adapter.rank,
            seconds=f"{seconds:.3f}",
        )
        return slot

    def release(self, slot: int) -> None:
        """Unpin one use of `slot`; an idle slot stays loaded until it is needed (stale ones first)."""
        with self._lock:
            if self._pins[slot] <= 0:
                raise RuntimeError(f"slot {slot} released more often than acquired")
            self._pins[slot] -= 1
            if self._pins[slot] == 0:
                idle = self._idle[self._pool_of[slot]]
                idle[slot] = None
                if self._stale[slot]:
                    idle.move_to_end(slot, last=False)  # reuse it first
                    self._clear(slot)

    def invalidate(self, name: str, keep: AdapterKey | None = None) -> None:
        """Forget every slot of `name` but the version `keep` (unload, replace, files changed on disk):
        idle ones are cleared now, pinned ones when their last request finishes; no new request gets them."""
        with self._lock:
            for slot, key in self._filling.items():
                if key[0] == name and key != keep:
                    self._stale[slot] = True
            for key, slot in list(self._slot_of.items()):
                if key[0] != name or key == keep:
                    continue
                self._stale[slot] = True
                del self._slot_of[key]
                if self._pins[slot] == 0:
                    self._idle[self._pool_of[slot]].move_to_end(slot, last=False)
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

    def _take_idle_slot(self, pool: int) -> int | None:
        idle = self._idle[pool]
        if not idle:
            return None
        slot, _ = idle.popitem(last=False)  # least recently used (stale and empty ones were put first)
        old = self._keys[slot]
        if old is not None:
            if not self._stale[slot]:
                self._evictions += 1
            self._slot_of.pop(old, None)
        return slot

    def _clear(self, slot: int) -> None:
        pool = self._pool_of[slot]
        self.pools[pool].clear(slot - self.offsets[pool])
        self._keys[slot] = None
        self._ranks[slot] = 0
        self._stale[slot] = False
