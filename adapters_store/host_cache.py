"""The host tier: loaded adapters in host memory, least recently used evicted first, counted in bytes.

`get_or_load(name)` returns the cached adapter or loads it through the loader it was given;
concurrent misses for one name share one load. An adapter bigger than the whole capacity is
refused before anything is evicted, and a failed load leaves the cache as it was; the callers
that waited for it get a message-only copy of its error (no traceback that could keep the
refused file's bytes alive). Evicting or removing an entry drops the cache's reference: memory
is freed once no caller holds the adapter.
This module knows neither disk layouts nor formats; the loader does.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from adapters_store import lifecycle_log
from adapters_store.adapter import LoadedAdapter
from adapters_store.errors import AdapterTooLarge, message_only

MiB = 1 << 20


@dataclass(frozen=True)
class HostCacheStats:
    """A snapshot of the host tier. Misses count calls that found no entry; loads count loader calls."""

    capacity_bytes: int
    entries: int
    bytes: int
    hits: int
    misses: int
    evictions: int
    loads: int
    load_failures: int
    load_seconds_total: float
    last_load_seconds: float


class _PendingLoad:
    """One load in flight; callers that miss on the same name wait for it."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.adapter: LoadedAdapter | None = None
        self.error: BaseException | None = None  # message only: raised as a fresh copy by each waiter
        self.cancelled = False  # removed or replaced meanwhile: do not cache the result


class HostCache:
    """Thread-safe LRU of LoadedAdapter by bytes (`adapter.nbytes`), holding at most `capacity_bytes`."""

    def __init__(self, capacity_bytes: int, load: Callable[[str], LoadedAdapter]) -> None:
        if capacity_bytes < 1:
            raise ValueError(f"host cache capacity must be >= 1 byte, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self._load = load
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, LoadedAdapter] = OrderedDict()  # least recently used first
        self._bytes = 0
        self._pending: dict[str, _PendingLoad] = {}
        self._hits = self._misses = self._evictions = self._loads = self._load_failures = 0
        self._load_seconds_total = self._last_load_seconds = 0.0

    def get_or_load(self, name: str) -> LoadedAdapter:
        """The adapter `name`, loaded (once, whoever else asks meanwhile) if it is not cached."""
        with self._lock:
            adapter = self._entries.get(name)
            if adapter is not None:
                self._entries.move_to_end(name)
                self._hits += 1
                return adapter
            self._misses += 1
            pending = self._pending.get(name)
            owner = pending is None
            if pending is None:
                pending = self._pending[name] = _PendingLoad()
        if not owner:
            pending.done.wait()
            if pending.error is not None:
                raise message_only(pending.error)
            assert pending.adapter is not None
            return pending.adapter
        return self._run_load(name, pending)

    def _run_load(self, name: str, pending: _PendingLoad) -> LoadedAdapter:
        started = time.perf_counter()
        try:
            adapter = self._load(name)
            if adapter.name != name:
                raise RuntimeError(f"the loader returned adapter {adapter.name!r} for {name!r}")
        except BaseException as exc:
            with self._lock:
                self._load_failures += 1
                self._finish(name, pending)
            self._settle(pending, error=exc)
            raise
        seconds = time.perf_counter() - started
        try:
            with self._lock:
                self._loads += 1
                self._load_seconds_total += seconds
                self._last_load_seconds = seconds
                self._finish(name, pending)
                if not pending.cancelled:
                    self._insert(adapter)
        except AdapterTooLarge as exc:
            self._settle(pending, error=exc)
            raise
        self._settle(pending, adapter=adapter)
        return adapter

    def _finish(self, name: str, pending: _PendingLoad) -> None:
        if self._pending.get(name) is pending:
            del self._pending[name]

    @staticmethod
    def _settle(
        pending: _PendingLoad, adapter: LoadedAdapter | None = None, error: BaseException | None = None
    ) -> None:
        pending.adapter = adapter
        pending.error = message_only(error) if error is not None else None
        pending.done.set()

    def put(self, adapter: LoadedAdapter) -> None:
        """Insert (or replace) `adapter` as most recently used, evicting LRU entries to make room."""
        with self._lock:
            self._insert(adapter)
            pending = self._pending.pop(adapter.name, None)
            if pending is not None:
                pending.cancelled = True  # an older load of this name must not overwrite it

    def _insert(self, adapter: LoadedAdapter) -> None:
        if adapter.nbytes > self.capacity_bytes:
            raise AdapterTooLarge(
                f"adapter {adapter.name!r} needs {adapter.nbytes / MiB:.1f} MiB of host memory but the whole "
                f"host cache holds {self.capacity_bytes / MiB:.1f} MiB; raise --host-cache-mb"
            )
        old = self._entries.pop(adapter.name, None)
        if old is not None:
            self._bytes -= old.nbytes
        while self._entries and self._bytes + adapter.nbytes > self.capacity_bytes:
            self._evict_lru()
        self._entries[adapter.name] = adapter
        self._bytes += adapter.nbytes

    def _evict_lru(self) -> str:
        name, adapter = self._entries.popitem(last=False)
        self._bytes -= adapter.nbytes
        self._evictions += 1
        lifecycle_log.evicted(name, "host", bytes=adapter.nbytes)
        return name

    def evict(self, name: str | None = None) -> str | None:
        """Evict `name` (or the least recently used entry); returns the evicted name, None if nothing was."""
        with self._lock:
            if name is None:
                return self._evict_lru() if self._entries else None
            adapter = self._entries.pop(name, None)
            if adapter is None:
                return None
            self._bytes -= adapter.nbytes
            self._evictions += 1
            lifecycle_log.evicted(name, "host", bytes=adapter.nbytes)
            return name

    def discard(self, name: str, adapter: LoadedAdapter) -> bool:
        """Drop `name` if its entry is still `adapter` (a version found stale); True if it was."""
        with self._lock:
            if self._entries.get(name) is not adapter:
                return False
            del self._entries[name]
            self._bytes -= adapter.nbytes
            return True

    def remove(self, name: str) -> bool:
        """Drop `name` for good (unload): its entry, and the result of any load of it in flight."""
        with self._lock:
            pending = self._pending.pop(name, None)
            if pending is not None:
                pending.cancelled = True
            adapter = self._entries.pop(name, None)
            if adapter is not None:
                self._bytes -= adapter.nbytes
            return adapter is not None or pending is not None

    def peek(self, name: str) -> LoadedAdapter | None:
        """The cached adapter without loading it or touching the LRU order or the stats."""
        with self._lock:
            return self._entries.get(name)

    def names(self) -> list[str]:
        """Cached names, least recently used first."""
        with self._lock:
            return list(self._entries)

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def stats(self) -> HostCacheStats:
        with self._lock:
            return HostCacheStats(
                capacity_bytes=self.capacity_bytes,
                entries=len(self._entries),
                bytes=self._bytes,
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
                loads=self._loads,
                load_failures=self._load_failures,
                load_seconds_total=self._load_seconds_total,
                last_load_seconds=self._last_load_seconds,
            )
