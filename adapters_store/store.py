"""The adapter store the server talks to: adapter roots on disk -> host cache, by adapter name.

A name is served from, in order: a directory registered by an explicit load (`load`, the
LoadAdapter RPC), or the subdirectory of that name in the adapter roots, loaded lazily on first
use. The host cache may evict an adapter at any time; the next `get` reads it from disk again.
A refused adapter raises AdapterError and changes nothing that was loaded or registered.

Files change on disk: each loaded version remembers a fingerprint of its files (size,
mtime_ns, ctime_ns and inode of the directory and of each file its format reads), and a host
hit compares it with the files again, at most once per FRESHNESS_CHECK_S per adapter: a changed
adapter is read and validated again, and if the new files are refused the request gets that
error, never the old version. A refused adapter is remembered (its fingerprint and a
message-only error) until its files change, so asking again costs a few `stat` calls, not a
read. Messages name directories relative to their adapter root. The device tier (slots,
pinning) is built on top by the server; this module knows nothing of devices.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

from adapters_store import lifecycle_log
from adapters_store.adapter import LoadedAdapter
from adapters_store.errors import AdapterError, AdapterExists, AdapterNotFound, message_only, shown
from adapters_store.formats import ADAPTER_FILES, load_adapter
from adapters_store.host_cache import HostCache, HostCacheStats
from adapters_store.names import check_adapter_name
from adapters_store.roots import AdapterRoots
from adapters_store.spec import BaseModelSpec

FRESHNESS_CHECK_S = 1.0  # how often a cached adapter's files are compared with the version loaded

FileStat = tuple[int, int, int, int] | None  # (size, mtime_ns, ctime_ns, inode); None when missing
Fingerprint = tuple[FileStat, ...]  # the directory, then each of ADAPTER_FILES


def fingerprint(directory: Path) -> Fingerprint:
    """The stat of `directory` and of each file a format reads in it: equal means unchanged."""
    return tuple(_stat(path) for path in (directory, *(directory / file for file in ADAPTER_FILES)))


def _stat(path: Path) -> FileStat:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


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


@dataclass(frozen=True)
class _Version:
    """The files one loaded adapter was read from, and when they were last compared with the disk."""

    adapter: weakref.ref[LoadedAdapter]  # not a strong reference: the host cache decides its lifetime
    directory: Path
    fingerprint: Fingerprint
    checked_at: float  # time.monotonic()


@dataclass(frozen=True)
class _Refusal:
    directory: Path
    fingerprint: Fingerprint
    error: BaseException  # message only


class AdapterStore:
    """Adapters by name over the roots in `roots`, validated against `spec`, cached in `host_cache_bytes`.

    max_adapter_bytes: the host memory one adapter may take (default: the whole cache); a bigger
    one is refused (AdapterTooLarge) from its header, before its data is read.
    """

    def __init__(
        self,
        spec: BaseModelSpec,
        roots: AdapterRoots,
        host_cache_bytes: int,
        max_adapter_bytes: int | None = None,
    ) -> None:
        self.spec = spec
        self.roots = roots
        self.host = HostCache(host_cache_bytes, self._load_from_disk)
        self.max_adapter_bytes = min(max_adapter_bytes or host_cache_bytes, host_cache_bytes)
        self._lock = threading.Lock()
        self._registered: dict[str, _Registration] = {}
        self._versions: dict[str, _Version] = {}
        self._refused: dict[str, _Refusal] = {}

    def get(self, name: str) -> LoadedAdapter:
        """The adapter `name` from the host tier, read from disk first if needed or if its files
        changed (AdapterNotFound if unknown, AdapterError if refused)."""
        check_adapter_name(name)
        adapter = self.host.get_or_load(name)
        if self._unchanged(name, adapter):
            return adapter
        self.host.discard(name, adapter)
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
                f"adapter {shown(name)} is already registered from {self.roots.relative(current)}; "
                "unload it first or load with replace"
            )
        if current == directory and not replace:
            return self.get(name)
        files = fingerprint(directory)
        started = time.perf_counter()
        try:
            adapter = self._read(name, directory, format)
            with self._lock:
                self.host.put(adapter)  # raises AdapterTooLarge before changing anything
                self._registered[name] = _Registration(path, directory, format)
                self._remember(name, adapter, directory, files)
        except AdapterError as exc:
            lifecycle_log.refused(name, exc)
            raise
        self._log_loaded(adapter, directory, time.perf_counter() - started)
        return adapter

    def unload(self, name: str) -> None:
        """Forget an explicit load of `name` and free its host memory; a root's adapter can be loaded again lazily."""
        check_adapter_name(name)
        with self._lock:
            registered = self._registered.pop(name, None) is not None
            cached = self.host.remove(name)
            self._versions.pop(name, None)
            self._refused.pop(name, None)
        if not (registered or cached) and self._root_directory(name) is None:
            raise AdapterNotFound(f"adapter {shown(name)} is not loaded and not in the adapter roots")
        lifecycle_log.unloaded(name)

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

    def refusal(self, name: str) -> str | None:
        """The message of `name`'s last refused load while its files look unchanged (memory only:
        a change is noticed at its next load), or None."""
        with self._lock:
            refused = self._refused.get(name)
        return str(refused.error) if refused is not None else None

    def refused_names(self) -> frozenset[str]:
        """Names whose last load was refused and whose files have not been seen to change since."""
        with self._lock:
            return frozenset(self._refused)

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

    def _current_directory(self, name: str) -> tuple[Path, str | None]:
        """Where `name` is read from now, resolved again (checks re-run), and its registered format."""
        with self._lock:
            registration = self._registered.get(name)
        if registration is not None:
            return self.roots.resolve_path(registration.path), registration.format
        return self.roots.resolve(name), None

    def _unchanged(self, name: str, adapter: LoadedAdapter) -> bool:
        """False if the files `adapter` was read from changed (checked at most once per FRESHNESS_CHECK_S)."""
        now = time.monotonic()
        with self._lock:
            version = self._versions.get(name)
        if (
            version is None
            or version.adapter() is not adapter
            or now - version.checked_at < FRESHNESS_CHECK_S
        ):
            return True
        try:
            directory, _ = self._current_directory(name)
        except AdapterError:  # gone, or now refused by the roots: read again, which says why
            return False
        if directory != version.directory or fingerprint(directory) != version.fingerprint:
            return False
        with self._lock:
            if self._versions.get(name) is version:
                self._versions[name] = _Version(version.adapter, directory, version.fingerprint, now)
        return True

    def _load_from_disk(self, name: str) -> LoadedAdapter:
        directory, format = self._current_directory(name)
        files = fingerprint(directory)
        with self._lock:
            refusal = self._refused.get(name)
        if refusal is not None and (refusal.directory, refusal.fingerprint) == (directory, files):
            raise message_only(refusal.error)
        started = time.perf_counter()
        try:
            adapter = self._read(name, directory, format)
        except AdapterError as exc:
            with self._lock:
                self._refused[name] = _Refusal(directory, files, message_only(exc))
            lifecycle_log.refused(name, exc)  # once: asked again, the remembered refusal is raised
            raise
        with self._lock:
            self._remember(name, adapter, directory, files)
        self._log_loaded(adapter, directory, time.perf_counter() - started)
        return adapter

    def _log_loaded(self, adapter: LoadedAdapter, directory: Path, seconds: float) -> None:
        lifecycle_log.loaded(
            adapter.name,
            "host",
            format=adapter.format,
            rank=adapter.rank,
            bytes=adapter.nbytes,
            seconds=f"{seconds:.3f}",
            source=self.roots.relative(directory),
        )

    def _read(self, name: str, directory: Path, format: str | None) -> LoadedAdapter:
        label = self.roots.relative(directory)
        return load_adapter(directory, self.spec, name, format, label=label, max_bytes=self.max_adapter_bytes)

    def _remember(self, name: str, adapter: LoadedAdapter, directory: Path, files: Fingerprint) -> None:
        """Under self._lock: `adapter` is the current version of `name`, read from `files`."""
        self._refused.pop(name, None)
        self._versions[name] = _Version(weakref.ref(adapter), directory, files, time.monotonic())
