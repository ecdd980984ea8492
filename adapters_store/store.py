"""The adapter store the server talks to: adapter roots on disk -> host cache, by adapter name.

A name is served from, in order: a directory registered by an explicit load (`load`, the
LoadAdapter RPC), or the subdirectory of that name in the adapter roots, loaded lazily on first
use. The host cache may evict an adapter at any time; the next `get` reads it from disk again.
A refused adapter raises AdapterError and changes nothing that was loaded or registered. The
device tier (slots, pinning) is built on top by the server; this module knows nothing of devices.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from adapters_store.adapter import LoadedAdapter
from adapters_store.errors import AdapterExists, AdapterNotFound
from adapters_store.formats import load_adapter
from adapters_store.host_cache import HostCache, HostCacheStats
from adapters_store.names import check_adapter_name
from adapters_store.roots import AdapterRoots
from adapters_store.spec import BaseModelSpec


@dataclass(frozen=True)
class StoredAdapter:
    """One name the store can serve. `adapter` is set when it is in the host tier ("host"), else None ("disk")."""

    name: str
    directory: Path
    tier: str  # "host" | "disk"
    adapter: LoadedAdapter | None


@dataclass(frozen=True)
class _Registration:
    path: str  # as the load request gave it: resolved again (and re-checked) on every read
    directory: Path
    format: str | None


class AdapterStore:
    """Adapters by name over the roots in `roots`, validated against `spec`, cached in `host_cache_bytes`."""

    def __init__(self, spec: BaseModelSpec, roots: AdapterRoots, host_cache_bytes: int) -> None:
        self.spec = spec
        self.roots = roots
        self.host = HostCache(host_cache_bytes, self._load_from_disk)
        self._lock = threading.Lock()
        self._registered: dict[str, _Registration] = {}

    def get(self, name: str) -> LoadedAdapter:
        """The adapter `name` from the host tier, read from disk first if needed (AdapterNotFound if unknown)."""
        check_adapter_name(name)
        return self.host.get_or_load(name)

    def load(
        self, name: str, path: str, format: str | None = None, *, replace: bool = False
    ) -> LoadedAdapter:
        """Validate the adapter at `path` (inside a root) and register it as `name` in the host tier.

        Loading a name again from the directory it already comes from returns it as is (re-read when
        `replace`); another directory needs `replace=True`. A refused adapter changes nothing.
        """
        check_adapter_name(name)
        directory = self.roots.resolve_path(path)
        current = self._directory_of(name)
        if current is not None and current != directory and not replace:
            raise AdapterExists(
                f"adapter {name!r} is already registered from {current}; unload it first or load with replace"
            )
        if current == directory and not replace:
            return self.get(name)
        adapter = load_adapter(directory, self.spec, name, format)
        with self._lock:
            self.host.put(adapter)  # raises AdapterTooLarge before changing anything
            self._registered[name] = _Registration(path, directory, format)
        return adapter

    def unload(self, name: str) -> None:
        """Forget an explicit load of `name` and free its host memory; a root's adapter can be loaded again lazily."""
        check_adapter_name(name)
        with self._lock:
            registered = self._registered.pop(name, None) is not None
            cached = self.host.remove(name)
        if not (registered or cached) and self._root_directory(name) is None:
            raise AdapterNotFound(f"adapter {name!r} is not loaded and not in the adapter roots")

    def list(self, in_roots: dict[str, Path] | None = None) -> list[StoredAdapter]:
        """Every name the store can serve (roots and explicit loads), sorted by name.

        `in_roots`: the roots' listing when the caller has just taken it (`roots.list()`).
        """
        directories = dict(self.roots.list() if in_roots is None else in_roots)
        with self._lock:
            directories.update({name: reg.directory for name, reg in self._registered.items()})
        listed = []
        for name in sorted(directories):
            adapter = self.host.peek(name)
            tier = "host" if adapter is not None else "disk"
            listed.append(StoredAdapter(name, directories[name], tier, adapter))
        return listed

    def registered_names(self) -> frozenset[str]:
        """Names registered by an explicit load (memory only, no filesystem access)."""
        with self._lock:
            return frozenset(self._registered)

    def knows(self, name: str) -> bool:
        """Whether `name` is registered by a load or present in a root (nothing is read)."""
        return self._directory_of(name) is not None

    def stats(self) -> HostCacheStats:
        return self.host.stats()

    def _directory_of(self, name: str) -> Path | None:
        with self._lock:
            registration = self._registered.get(name)
        return registration.directory if registration is not None else self._root_directory(name)

    def _root_directory(self, name: str) -> Path | None:
        try:
            return self.roots.resolve(name)
        except AdapterNotFound:
            return None

    def _load_from_disk(self, name: str) -> LoadedAdapter:
        with self._lock:
            registration = self._registered.get(name)
        if registration is not None:
            directory = self.roots.resolve_path(registration.path)
            return load_adapter(directory, self.spec, name, registration.format)
        return load_adapter(self.roots.resolve(name), self.spec, name)
