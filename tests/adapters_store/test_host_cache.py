"""The host tier: LRU by bytes, eviction order, remove, too-big adapters, and one load per concurrent miss."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from adapters_store import AdapterError, AdapterTooLarge, HostCache, LoraAdapter


def fake(name: str, nbytes: int) -> LoraAdapter:
    return LoraAdapter(
        name=name,
        format="peft-lora",
        source=Path("/nowhere") / name,
        checksum="sha256:0",
        nbytes=nbytes,
        rank=1,
        target_modules=(),
        modules={},
    )


class CountingLoader:
    """Loads fake adapters of the given sizes, counting calls per name."""

    def __init__(self, sizes: dict[str, int]) -> None:
        self.sizes = sizes
        self.calls: dict[str, int] = {}

    def __call__(self, name: str) -> LoraAdapter:
        self.calls[name] = self.calls.get(name, 0) + 1
        if name not in self.sizes:
            raise AdapterError(f"no adapter {name!r}")
        return fake(name, self.sizes[name])


def test_lru_by_bytes_evicts_the_least_recently_used() -> None:
    loader = CountingLoader({"a": 40, "b": 40, "c": 40})
    cache = HostCache(100, loader)
    a = cache.get_or_load("a")
    cache.get_or_load("b")
    assert cache.get_or_load("a") is a  # a is now the most recently used
    cache.get_or_load("c")  # 120 > 100: evict b, not a
    assert cache.names() == ["a", "c"]
    stats = cache.stats()
    assert (stats.entries, stats.bytes, stats.hits, stats.misses, stats.evictions, stats.loads) == (
        2,
        80,
        1,
        3,
        1,
        3,
    )
    assert stats.load_seconds_total >= stats.last_load_seconds >= 0.0
    cache.get_or_load("b")  # back from the loader, evicting a (LRU now)
    assert cache.names() == ["c", "b"]
    assert loader.calls == {"a": 1, "b": 2, "c": 1}


def test_a_large_adapter_evicts_as_many_as_needed() -> None:
    cache = HostCache(100, CountingLoader({"a": 30, "b": 30, "c": 30, "big": 90}))
    for name in "abc":
        cache.get_or_load(name)
    cache.get_or_load("big")
    assert cache.names() == ["big"]
    assert cache.stats().evictions == 3


def test_too_big_adapter_is_refused_and_evicts_nothing() -> None:
    cache = HostCache(100, CountingLoader({"a": 60, "huge": 101}))
    cache.get_or_load("a")
    with pytest.raises(AdapterTooLarge, match=r"'huge' needs .* MiB .*--host-cache-mb"):
        cache.get_or_load("huge")
    assert cache.names() == ["a"]
    assert cache.stats().bytes == 60
    with pytest.raises(AdapterTooLarge):
        cache.put(fake("huge", 101))
    assert cache.names() == ["a"]


def test_remove_frees_for_real_and_evict_counts() -> None:
    loader = CountingLoader({"a": 10, "b": 10, "c": 10})
    cache = HostCache(100, loader)
    for name in "abc":
        cache.get_or_load(name)
    assert cache.remove("b") is True
    assert cache.remove("b") is False
    assert "b" not in cache and cache.stats().bytes == 20
    assert cache.evict() == "a"  # the least recently used
    assert cache.evict("c") == "c"
    assert cache.evict() is None and len(cache) == 0
    stats = cache.stats()
    assert (stats.bytes, stats.evictions) == (0, 2)
    cache.get_or_load("b")
    assert loader.calls["b"] == 2


def test_failed_load_changes_nothing_and_is_retried() -> None:
    loader = CountingLoader({"a": 10})
    cache = HostCache(100, loader)
    cache.get_or_load("a")
    for _ in range(2):
        with pytest.raises(AdapterError, match="no adapter 'bad'"):
            cache.get_or_load("bad")
    assert cache.names() == ["a"]
    assert loader.calls["bad"] == 2
    assert cache.stats().load_failures == 2


def test_put_replaces_and_peek_does_not_touch_order() -> None:
    cache = HostCache(100, CountingLoader({}))
    cache.put(fake("a", 10))
    cache.put(fake("b", 10))
    newer = fake("a", 30)
    cache.put(newer)
    assert cache.names() == ["b", "a"] and cache.stats().bytes == 40
    assert cache.peek("b") is not None and cache.peek("missing") is None
    assert cache.names() == ["b", "a"]
    assert cache.get_or_load("a") is newer


def _blocking_loader(
    release: threading.Event, calls: list[str], fail: bool = False
) -> Callable[[str], LoraAdapter]:
    def load(name: str) -> LoraAdapter:
        calls.append(name)
        assert release.wait(5)
        if fail:
            raise AdapterError(f"{name} is broken")
        return fake(name, 10)

    return load


def _wait_for(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 5
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.001)


@pytest.mark.parametrize("fail", [False, True])
def test_concurrent_misses_load_once(fail: bool) -> None:
    release, calls = threading.Event(), list[str]()
    cache = HostCache(100, _blocking_loader(release, calls, fail))
    results: list[object] = []

    def get() -> None:
        try:
            results.append(cache.get_or_load("a"))
        except AdapterError as exc:
            results.append(exc)

    threads = [threading.Thread(target=get) for _ in range(8)]
    for thread in threads:
        thread.start()
    _wait_for(lambda: cache.stats().misses == 8)
    release.set()
    for thread in threads:
        thread.join(5)
    assert calls == ["a"]
    assert len(results) == 8
    if fail:
        assert all(isinstance(r, AdapterError) for r in results)
        assert len(cache) == 0
    else:
        assert all(r is results[0] for r in results)
        assert cache.names() == ["a"]


def test_remove_during_a_load_keeps_the_result_out() -> None:
    release, calls = threading.Event(), list[str]()
    cache = HostCache(100, _blocking_loader(release, calls))
    thread = threading.Thread(target=cache.get_or_load, args=("a",))
    thread.start()
    _wait_for(lambda: calls == ["a"])
    assert cache.remove("a") is True
    release.set()
    thread.join(5)
    assert len(cache) == 0


def test_loader_must_return_the_requested_name() -> None:
    cache = HostCache(100, lambda name: fake("other", 10))
    with pytest.raises(RuntimeError, match="returned adapter 'other' for 'a'"):
        cache.get_or_load("a")


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="capacity"):
        HostCache(0, CountingLoader({}))
