"""The engine's view of adapters: names -> host tier (loaded off the engine thread) -> device slots.

A request for adapter X starts X's disk -> host load on a loader thread when it is submitted,
which also prepares X's device-ready form (DeviceSlots.prepare); the scheduler admits it once X
is ready and a device slot can be pinned for it, so a cold adapter never stalls the running batch
beyond the copy into its slot. Load / unload / list
are the RPCs' entry points and may be called from any thread.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from adapters_store import AdapterNotFound, AdapterStore, LoadedAdapter, check_adapter_name
from adapters_store.device_slots import AdapterKey, DeviceSlots, DeviceSlotStats, ReadyAdapter, adapter_key
from adapters_store.host_cache import HostCacheStats
from adapters_store.store import StoredAdapter
from server.model.llama import LlamaModel

# The model's adapted linears, as fused projection groups in output order.
FUSED_PROJECTIONS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


@dataclass(frozen=True)
class AdapterStatus:
    """One adapter as ListAdapters shows it."""

    name: str
    format: str  # "" while only on disk (not read yet)
    rank: int
    nbytes: int  # host (compact) form; 0 while only on disk
    tier: str  # "device" | "host" | "disk"
    pinned: bool  # a running request uses it
    load_count: int  # disk -> host loads
    requests_served: int
    source: str
    target_modules: tuple[str, ...]


class AdapterManager:
    def __init__(self, store: AdapterStore, slots: DeviceSlots, loader_threads: int = 2) -> None:
        self.store = store
        self.slots = slots
        self._loader = ThreadPoolExecutor(loader_threads, thread_name_prefix="loramux-adapter-load")
        self._lock = threading.Lock()
        self._pending: dict[str, Future[LoadedAdapter]] = {}
        self._served: Counter[str] = Counter()
        self._loads: Counter[str] = Counter()
        self._host_loads = 0  # every disk -> host load, explicit LoadAdapter included
        # Device-ready forms made on the loader threads, until the adapter is unloaded or replaced.
        self._ready: dict[AdapterKey, ReadyAdapter] = {}
        # (tier, seconds) of every load into the host tier or a device slot; the engine's metrics set it
        self.observe_load: Callable[[str, float], None] = lambda tier, seconds: None

    @classmethod
    def attach(cls, model: LlamaModel, store: AdapterStore, slots: DeviceSlots) -> AdapterManager:
        """Give every adapted linear of `model` its adapter terms (one per slot pool)."""
        slots.attach(model)
        return cls(store, slots)

    def shutdown(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)

    # -- engine side ----------------------------------------------------------------------------

    def check_known(self, name: str) -> None:
        """Raise AdapterNotFound (or AdapterError for a malformed name) unless `name` can be served."""
        check_adapter_name(name)
        if not self.store.knows(name):
            raise AdapterNotFound(
                f"adapter {name!r} is not loaded and not in the adapter roots; load it first "
                "(LoadAdapter / --adapter-root) or list them with ListAdapters"
            )

    def prefetch(self, name: str) -> Future[LoadedAdapter]:
        """Start (or join) the disk -> host load of `name` on a loader thread."""
        with self._lock:
            future = self._pending.get(name)
            if future is None or (future.done() and (future.cancelled() or future.exception() is not None)):
                future = self._loader.submit(self._load_to_host, name)
                self._pending[name] = future
            return future

    def acquire(self, adapter: LoadedAdapter | ReadyAdapter) -> int | None:
        """Pin a device slot for `adapter` (engine thread); its device form was made on the loader
        thread (made here only when it was not). None when every slot of its pool is pinned."""
        ready = adapter if isinstance(adapter, ReadyAdapter) else self.ready(adapter)
        adapter = ready.adapter
        fills = self.slots.stats().loads  # only the engine thread fills slots: a change is our copy
        slot = self.slots.acquire(ready)
        if slot is not None:
            with self._lock:
                self._served[adapter.name] += 1
            device = self.slots.stats()
            if device.loads != fills:
                self.observe_load("device", device.last_load_seconds)
        return slot

    def release(self, slot: int) -> None:
        self.slots.release(slot)

    def ready(self, adapter: LoadedAdapter) -> ReadyAdapter:
        """`adapter`'s device-ready form, prepared once per adapter version (AdapterError when no
        slot pool can hold it)."""
        key = adapter_key(adapter)
        with self._lock:
            ready = self._ready.get(key)
        if ready is None or ready.adapter is not adapter:
            ready = self.slots.prepare(adapter)
            with self._lock:
                self._ready[key] = ready
        return ready

    def _load_to_host(self, name: str) -> LoadedAdapter:
        in_host = self.store.host.peek(name) is not None
        started = time.perf_counter()
        adapter = self.store.get(name)
        if not in_host:
            self.observe_load("host", time.perf_counter() - started)
            with self._lock:
                self._loads[name] += 1
                self._host_loads += 1
        self.ready(adapter)  # the device form, here on the loader thread (fails the load if it fits no pool)
        return adapter

    def _forget_ready(self, name: str) -> None:
        with self._lock:
            for key in [k for k in self._ready if k[0] == name]:
                del self._ready[key]

    # -- RPC side -------------------------------------------------------------------------------

    def load(self, name: str, path: str, format: str | None = None, replace: bool = False) -> LoadedAdapter:
        """Validate and register the adapter at `path` as `name` (a bad one changes nothing)."""
        previous = self.store.host.peek(name)
        started = time.perf_counter()
        adapter = self.store.load(name, path, format, replace=replace)
        if adapter is not previous:
            self.observe_load("host", time.perf_counter() - started)
        with self._lock:
            self._pending.pop(name, None)
            if adapter is not previous:
                self._loads[name] += 1
                self._host_loads += 1
        if previous is not None and adapter is not previous:
            self._forget_ready(name)
            self.slots.invalidate(name)  # new weights: requests from now on get a fresh slot
        return adapter

    def unload(self, name: str) -> None:
        """Free the host copy and the device slot (at once, or when its last running request ends)."""
        self.store.unload(name)
        with self._lock:
            self._pending.pop(name, None)
        self._forget_ready(name)
        self.slots.invalidate(name)

    def list(self) -> list[AdapterStatus]:
        on_device: dict[str, bool] = {}
        for info in self.slots.slots():
            if not info.stale:
                on_device[info.name] = on_device.get(info.name, False) or info.pins > 0
        with self._lock:
            served, loads = Counter(self._served), Counter(self._loads)
        return [self._status(stored, on_device, served, loads) for stored in self.store.list()]

    def stats(self) -> tuple[HostCacheStats, DeviceSlotStats]:
        return self.store.stats(), self.slots.stats()

    def host_loads(self) -> int:
        """Disk -> host loads so far, by requests and by LoadAdapter."""
        with self._lock:
            return self._host_loads

    @staticmethod
    def _status(
        stored: StoredAdapter, on_device: dict[str, bool], served: Counter[str], loads: Counter[str]
    ) -> AdapterStatus:
        adapter = stored.adapter
        return AdapterStatus(
            name=stored.name,
            format=adapter.format if adapter else "",
            rank=adapter.rank if adapter else 0,
            nbytes=adapter.nbytes if adapter else 0,
            tier="device" if stored.name in on_device else stored.tier,
            pinned=on_device.get(stored.name, False),
            load_count=loads[stored.name],
            requests_served=served[stored.name],
            source=str(stored.directory),
            target_modules=adapter.target_modules if adapter else (),
        )
