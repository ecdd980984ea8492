"""The engine's view of adapters: names -> host tier -> device-ready form -> device slots.

A request's adapters start loading when it is accepted: on a loader thread each is read into
the host tier (or found there) and turned into its device-ready form by the device slots
(`DeviceSlots.prepare`); the scheduler admits the request once every form is ready and a device
slot can be pinned for each, so a cold adapter never stalls the running batch beyond the copy
into its slot. An adapter whose version a device slot holds already is not prepared again (that
decode cost a compressed adapter 1.5-2.7 ms of loader CPU per request, and a GPU form a host ->
device copy): its load only finds it in the host tier; should the slot be taken before the request
is admitted, the request waits for a fresh preparation on the loader (`acquire`), never on the
engine thread. Only loads in flight are remembered here: a finished load is held by the requests
that wait for it and nothing else, so `--host-cache-mb` bounds what stays in memory and an
evicted adapter is read from disk again. Edits on disk are seen on a host hit too (the store
compares the files' fingerprint): a new version gets a fresh device slot and the old one's slots
are invalidated (requests running on them finish there). A refused load's future holds a
message-only error, so nothing of the refused file stays referenced.

Load / unload / list are the RPCs' entry points and may be called from any thread; `snapshot`
reads memory only (the roots' listing is cached and refreshed in the background), so a metrics
scrape costs the same with 8 or 10,000 adapters on disk.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

import torch

from adapters_store import AdapterNotFound, AdapterStore, LoadedAdapter, check_adapter_name
from adapters_store.config_check import ConfigCheck
from adapters_store.device_slots import (
    AdapterKey,
    DeviceSlots,
    DeviceSlotStats,
    DeviceStep,
    NotResident,
    ReadyAdapter,
)
from adapters_store.errors import message_only, shown
from adapters_store.host_cache import HostCacheStats
from adapters_store.store import StoredAdapter
from server.engine.events import AdapterSnapshot, EngineEvents, NoEvents
from server.engine.sequence import Sequence as EngineSequence
from server.engine.threads import one_intra_op_thread
from server.model.llama import LlamaModel

# The model's adapted linears, as fused projection groups in output order.
FUSED_PROJECTIONS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))
# The tiers from coldest to warmest: a mixture is as cold as its coldest adapter.
TIER_ORDER = ("disk", "host", "device")
# How old the cached listing of the adapter roots may get before a background rescan.
ROOTS_RESCAN_S = 5.0


@dataclass(frozen=True)
class AdapterStatus:
    """One adapter as ListAdapters shows it."""

    name: str
    format: str  # "" while only on disk and its config cannot be served
    rank: int
    nbytes: int  # host (compact) form; 0 while only on disk
    tier: str  # "device" | "host" | "disk"
    pinned: bool  # a running request uses it
    load_count: int  # disk -> host loads
    requests_served: int
    source: str  # its directory relative to its adapter root (clients never see absolute paths)
    target_modules: tuple[str, ...]
    error: str = ""  # why it cannot be served, when known without serving it ("" = nothing known)


class AdapterManager:
    def __init__(self, store: AdapterStore, slots: DeviceSlots, loader_threads: int = 2) -> None:
        self.store = store
        self.slots = slots
        self.events: EngineEvents = NoEvents()  # the engine sets its own
        self.wake: Callable[[], None] = lambda: None  # the engine's: a load it waits for is done
        # Torch on one thread each (threads.one_intra_op_thread): a MoS adapter's materialization
        # with the engine's count left pools that slowed every later step.
        self._loader = ThreadPoolExecutor(
            loader_threads, thread_name_prefix="loramux-adapter-load", initializer=one_intra_op_thread
        )
        self._lock = threading.Lock()
        self._in_flight: dict[str, Future[ReadyAdapter]] = {}  # name -> its load, only while it runs
        self._again: dict[str, Future[ReadyAdapter]] = {}  # name -> its fresh preparation, while it runs
        self._served: Counter[str] = Counter()
        self._loads: Counter[str] = Counter()
        self._host_loads = 0  # every disk -> host load, explicit LoadAdapter included
        self._versions: dict[str, AdapterKey] = {}  # name -> the version its last load gave
        self._root_names: frozenset[str] = frozenset(store.roots.list())
        self._root_names_at = time.monotonic()
        self._rescanning = False
        self._config_check = ConfigCheck(store.spec)  # adapters found on disk: their configs, checked

    @classmethod
    def attach(cls, model: LlamaModel, store: AdapterStore, slots: DeviceSlots) -> AdapterManager:
        """Give every adapted linear of `model` its adapter terms (one per slot pool)."""
        slots.attach(model)
        return cls(store, slots)

    def shutdown(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)

    @property
    def num_slots(self) -> int:
        return self.slots.num_slots

    # -- request side ----------------------------------------------------------------------------

    def check_known(self, name: str) -> None:
        """Raise AdapterNotFound unless `name` (well-formed, not reserved) can be served."""
        check_adapter_name(name, lookup=True)
        if not self.store.knows(name):
            raise AdapterNotFound(
                f"adapter {shown(name)} is not loaded and not in the adapter roots; load it first "
                "(LoadAdapter / --adapter-root) or list them with ListAdapters"
            )

    def is_listed(self, name: str) -> bool:
        """Whether `name` is an adapter as last seen (loaded, registered or in the roots' cached
        listing); memory only, unlike `check_known`."""
        with self._lock:
            in_roots = name in self._root_names
        return in_roots or name in self.store.registered_names() or self.store.host.peek(name) is not None

    def tier(self, names: Sequence[str]) -> str:
        """Where the adapters `names` are now, as a request for them finds them: the coldest of
        "device" (in a current device slot), "host" (in the host cache only) and "disk" (neither: a
        cold start, also while another request's read of it is still running); "" for none (the base
        model). Memory only and cheap (any thread, called for every request): what is on disk, or
        changed there since, is not looked at.
        """
        if not names:
            return ""
        on_device = self._on_device()
        tiers = [
            "device" if name in on_device else "host" if self.store.host.peek(name) is not None else "disk"
            for name in names
        ]
        return min(tiers, key=TIER_ORDER.index)

    def prefetch(self, name: str) -> Future[ReadyAdapter]:
        """Start (or join) the load of `name`: disk -> host on a loader thread, then its device-ready
        form. The future's result is what `acquire` takes; its error is the adapter's refusal."""
        with self._lock:
            future = self._in_flight.get(name)
            started = future is None
            if future is None:
                future = self._loader.submit(self._load_ready, name)
                self._in_flight[name] = future
        if started:  # outside the lock: a load that is already done runs the callback right here
            future.add_done_callback(lambda done: self._forget(name, done))
        return future

    def _forget(self, name: str, future: Future[ReadyAdapter]) -> None:
        with self._lock:
            if self._in_flight.get(name) is future:
                del self._in_flight[name]

    def acquire(self, seq: EngineSequence) -> tuple[tuple[int, float], ...] | None:
        """Pin a device slot for every adapter of `seq` (all or none): (slot, weight) pairs, or None
        while some slot is not free or a form must be prepared again (on the loader: a load that
        found its adapter in a slot since taken, or of a version unloaded or replaced since). Raises
        what filling a slot raised (nothing stays pinned)."""
        ready = [load.result() for load in seq.adapter_loads]
        weights = [weight for _, weight in seq.request.adapters.adapters]
        pinned: dict[int, tuple[int, float]] = {}
        # Those found in a slot first: one with a form must not take the slot of a later member.
        order = sorted(range(len(ready)), key=lambda i: ready[i].form is not None)
        try:
            for i in order:
                if not self._is_current(ready[i]):
                    self._prepare_again(seq, i)
                    self.release(list(pinned.values()))
                    return None
                fills = self.slots.stats().loads  # only the engine thread fills slots: a change is ours
                try:
                    slot = self.slots.acquire(ready[i])
                except NotResident:  # its slot went to another adapter since its load looked
                    self._prepare_again(seq, i)
                    self.release(list(pinned.values()))
                    return None
                if slot is None:
                    self.release(list(pinned.values()))
                    return None
                pinned[i] = (slot, weights[i])
                device = self.slots.stats()
                if device.loads != fills:
                    self.events.adapter_loaded("device", device.last_load_seconds)
        except BaseException:
            self.release(list(pinned.values()))
            raise
        with self._lock:
            self._served.update(seq.request.adapters.names)
        return tuple(pinned[i] for i in range(len(ready)))

    def _is_current(self, ready: ReadyAdapter) -> bool:
        """Whether `ready` is the version of its adapter requests get now (not unloaded or replaced
        since it was loaded)."""
        with self._lock:
            return self._versions.get(ready.key[0]) == ready.key

    def _prepare_again(self, seq: EngineSequence, i: int) -> None:
        """Replace `seq`'s load i by one that reads and prepares its adapter afresh on a loader thread
        (engine thread; the engine is woken when it is done). Requests that need it at once share
        one such load."""
        name = seq.request.adapters.names[i]
        with self._lock:
            load = self._again.get(name)
            if load is None:
                load = self._loader.submit(self._load_ready, name, reuse_slot=False)
                self._again[name] = load
                started = True
            else:
                started = False
        if started:
            load.add_done_callback(lambda done: self._forget_again(name, done))
            load.add_done_callback(lambda _: self.wake())
        loads = list(seq.adapter_loads)
        loads[i] = load
        seq.adapter_loads = tuple(loads)

    def _forget_again(self, name: str, load: Future[ReadyAdapter]) -> None:
        with self._lock:
            if self._again.get(name) is load:
                del self._again[name]

    def release(self, slots: Sequence[tuple[int, float]]) -> None:
        for slot, _ in slots:
            self.slots.release(slot)

    def step_metadata(
        self, token_pairs: list[tuple[tuple[int, float], ...]], device: torch.device
    ) -> DeviceStep | None:
        """The step's adapter metadata, built once: every row's (device slot, weight) pairs, split per
        slot pool, with each pool backend's plan for the step."""
        return self.slots.step(token_pairs, device)

    def _load_ready(self, name: str, reuse_slot: bool = True) -> ReadyAdapter:
        """Loader thread: the adapter in the host tier (read from disk if needed), device-ready (with
        no form when `reuse_slot` and a current device slot holds that version).

        Raises a message-only copy of a refusal: the future keeps it, and a traceback's frames
        would keep the refused file's bytes and tensors alive with it.
        """
        error: BaseException | None = None
        try:
            return self._read_and_prepare(name, reuse_slot)
        except BaseException as exc:
            error = message_only(exc)
        self.slots.invalidate(name)  # whatever version a slot holds, it is not served any more
        raise error

    def _read_and_prepare(self, name: str, reuse_slot: bool) -> ReadyAdapter:
        adapter = self.read(name)
        ready = (self.slots.resident(adapter) if reuse_slot else None) or self.slots.prepare(adapter)
        self._use_version(name, ready.key)
        return ready

    def read(self, name: str) -> LoadedAdapter:
        """`name` in the host tier, read from disk if needed (cold, evicted, or its files changed),
        and then counted as a host load (any thread: the loader, the router)."""
        cached = self.store.host.peek(name)
        started = time.perf_counter()
        adapter = self.store.get(name)
        if adapter is not cached:
            self.events.adapter_loaded("host", time.perf_counter() - started)
            self._count_host_load(name)
        return adapter

    def _use_version(self, name: str, key: AdapterKey) -> None:
        """Requests from now on get version `key` of `name`: slots of other versions are invalidated."""
        with self._lock:
            previous = self._versions.get(name)
            self._versions[name] = key
        if previous is not None and previous != key:
            self.slots.invalidate(name, keep=key)

    def _count_host_load(self, name: str) -> None:
        with self._lock:
            self._loads[name] += 1
            self._host_loads += 1

    # -- RPC side --------------------------------------------------------------------------------

    def load(self, name: str, path: str, format: str | None = None, replace: bool = False) -> LoadedAdapter:
        """Validate and register the adapter at `path` as `name` (a bad one changes nothing)."""
        previous = self.store.host.peek(name)
        started = time.perf_counter()
        adapter = self.store.load(name, path, format, replace=replace)
        if adapter is not previous:
            self.events.adapter_loaded("host", time.perf_counter() - started)
            self._count_host_load(name)
        with self._lock:
            self._in_flight.pop(name, None)  # requests from now on get this version
            self._versions.pop(name, None)
        if previous is not None and adapter is not previous:
            self.slots.invalidate(name)  # new weights: requests from now on get a fresh slot
        return adapter

    def unload(self, name: str) -> None:
        """Free the host copy and the device slot (at once, or when its last running request ends)."""
        self.store.unload(name)
        with self._lock:
            self._in_flight.pop(name, None)
            self._versions.pop(name, None)
        self.slots.invalidate(name)

    def list(self) -> list[AdapterStatus]:
        """Every adapter the server can serve; scans the roots (call it off the event loop)."""
        in_roots = self.store.roots.list()
        self._set_root_names(frozenset(in_roots))
        listed = self.store.list(in_roots)
        on_device = self._on_device()
        with self._lock:
            served, loads = Counter(self._served), Counter(self._loads)
        statuses = [
            self._status(stored, self.store.roots.relative(stored.directory), on_device, served, loads)
            for stored in listed
        ]
        self._config_check.forget_except({stored.directory for stored in listed})
        return [self._on_disk(stored, status) for stored, status in zip(listed, statuses, strict=True)]

    def _on_disk(self, stored: StoredAdapter, status: AdapterStatus) -> AdapterStatus:
        """`status` of an adapter not in host memory, completed without loading it: why it cannot be
        served (its last refusal, its files unchanged since, else the cheap config check), or what
        its config says (format, rank, targets)."""
        if stored.adapter is not None:
            return status
        refusal = self.store.refusal(stored.name)
        if refusal:
            return replace(status, error=refusal)
        summary = self._config_check.checked(stored.directory, status.source)  # one check, either
        if isinstance(summary, str):
            return replace(status, error=summary)
        return replace(
            status, format=summary.format, rank=summary.rank, target_modules=summary.target_modules
        )

    def stats(self) -> tuple[HostCacheStats, DeviceSlotStats]:
        return self.store.stats(), self.slots.stats()

    def host_loads(self) -> int:
        """Disk -> host loads so far, by requests and by LoadAdapter."""
        with self._lock:
            return self._host_loads

    def snapshot(self) -> AdapterSnapshot:
        """Tier counts, loads and evictions from memory only (the roots' listing as last scanned)."""
        self._rescan_if_stale()
        device = set(self._on_device())
        host = set(self.store.host.names()) - device
        with self._lock:
            in_roots = self._root_names
        known = in_roots | self.store.registered_names()
        host_stats, slot_stats = self.stats()
        return AdapterSnapshot(
            tiers={"device": len(device), "host": len(host), "disk": len(known - device - host)},
            host_loads=self.host_loads(),
            device_loads=slot_stats.loads,
            host_evictions=host_stats.evictions,
            device_evictions=slot_stats.evictions,
            num_slots=slot_stats.num_slots,
        )

    def _on_device(self) -> dict[str, bool]:
        """Adapters in a (current) device slot -> whether a running request pins it."""
        on_device: dict[str, bool] = {}
        for info in self.slots.slots():
            if not info.stale:
                on_device[info.name] = on_device.get(info.name, False) or info.pins > 0
        return on_device

    def _rescan_if_stale(self) -> None:
        with self._lock:
            if self._rescanning or time.monotonic() - self._root_names_at < ROOTS_RESCAN_S:
                return
            self._rescanning = True
        try:
            self._loader.submit(self._rescan)
        except RuntimeError:  # shut down
            with self._lock:
                self._rescanning = False

    def _rescan(self) -> None:
        try:
            self._set_root_names(frozenset(self.store.roots.list()))
        finally:
            with self._lock:
                self._rescanning = False

    def _set_root_names(self, names: frozenset[str]) -> None:
        with self._lock:
            self._root_names = names
            self._root_names_at = time.monotonic()

    @staticmethod
    def _status(
        stored: StoredAdapter,
        source: str,
        on_device: dict[str, bool],
        served: Counter[str],
        loads: Counter[str],
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
            source=source,
            target_modules=adapter.target_modules if adapter else (),
        )
