"""The store end to end: adapter roots on disk -> host cache, lazy loads, LoadAdapter / UnloadAdapter semantics."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from adapters_store import (
    AdapterError,
    AdapterExists,
    AdapterNotFound,
    AdapterRoots,
    AdapterStore,
    AdapterTooLarge,
)
from tests.adapters_store.adapter_cases import TINY_SPEC, assert_matches_peft, rewrite_weights
from tests.adapters_store.conftest import AdapterFactory

Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
# fp32 bytes of an r=4 adapter on q_proj and v_proj, 2 layers: 2 * 4 * (4*(64+64) + 4*(64+32))
QV_R4_BYTES = 7168


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = Path(os.path.realpath(tmp_path)) / "adapters"
    root.mkdir()
    return root


def _store(root: Path, capacity: int = 1 << 20) -> AdapterStore:
    return AdapterStore(TINY_SPEC, AdapterRoots([root]), capacity)


def test_root_adapters_load_lazily_on_first_get(make_adapter: AdapterFactory, root: Path) -> None:
    _, model = make_adapter(name="sql", root=root, r=4, target_modules=["q_proj", "v_proj"])
    make_adapter(name="chat", root=root, seed=1, r=4, target_modules=["q_proj", "v_proj"])
    store = _store(root)
    assert [(s.name, s.tier) for s in store.list()] == [("chat", "disk"), ("sql", "disk")]
    adapter = store.get("sql")
    assert_matches_peft(adapter, model)
    assert store.get("sql") is adapter
    assert [(s.name, s.tier) for s in store.list()] == [("chat", "disk"), ("sql", "host")]
    stats = store.stats()
    assert (stats.loads, stats.hits, stats.bytes) == (1, 1, QV_R4_BYTES)
    with pytest.raises(AdapterNotFound, match="no adapter named 'nope'"):
        store.get("nope")


def test_evicted_adapters_come_back_from_disk(make_adapter: AdapterFactory, root: Path) -> None:
    for seed, name in enumerate(["a", "b"]):
        make_adapter(name=name, root=root, seed=seed, r=4, target_modules=["q_proj", "v_proj"])
    store = _store(root, capacity=QV_R4_BYTES + 1)  # room for one
    first = store.get("a")
    store.get("b")
    assert store.host.names() == ["b"]
    again = store.get("a")
    assert again is not first and again.checksum == first.checksum
    assert store.stats().evictions == 2


def test_load_registers_a_path_and_unload_forgets_it(make_adapter: AdapterFactory, root: Path) -> None:
    _, model = make_adapter(name="v2", root=root / "team", r=4, target_modules=["q_proj"])
    store = _store(root)
    adapter = store.load("team-v2", "team/v2")
    assert_matches_peft(adapter, model)
    assert adapter.source == root / "team" / "v2"
    assert [(s.name, s.tier) for s in store.list()] == [("team-v2", "host")]
    store.host.evict("team-v2")
    assert store.get("team-v2").checksum == adapter.checksum  # reloaded from its registered path
    store.unload("team-v2")
    assert store.list() == [] and store.stats().bytes == 0
    with pytest.raises(AdapterNotFound):
        store.get("team-v2")
    with pytest.raises(AdapterNotFound, match="not loaded"):
        store.unload("team-v2")


def test_a_bad_adapter_changes_nothing_already_loaded(make_adapter: AdapterFactory, root: Path) -> None:
    make_adapter(name="good", root=root, r=4, target_modules=["q_proj"])
    bad, _ = make_adapter(name="bad", root=root, seed=1, r=4, target_modules=["q_proj"])
    rewrite_weights(bad, lambda t: t[Q_B].fill_(float("nan")))
    store = _store(root)
    good = store.load("mine", "good")
    before = store.stats()
    with pytest.raises(AdapterError, match="non-finite"):
        store.load("mine", "bad", replace=True)
    with pytest.raises(AdapterError, match="non-finite"):
        store.get("bad")  # lazily, from the root
    assert store.get("mine") is good
    after = store.stats()
    assert (after.entries, after.bytes, after.evictions) == (before.entries, before.bytes, before.evictions)
    assert [(s.name, s.tier) for s in store.list()] == [("bad", "disk"), ("good", "disk"), ("mine", "host")]


def test_load_under_a_taken_name_needs_replace(make_adapter: AdapterFactory, root: Path) -> None:
    make_adapter(name="a", root=root, r=4, target_modules=["q_proj"])
    _, model_b = make_adapter(name="b", root=root, seed=1, r=4, target_modules=["q_proj"])
    store = _store(root)
    first = store.get("a")
    assert store.load("a", "a") is first  # the same directory: nothing to do
    with pytest.raises(AdapterExists, match="already registered from .*replace"):
        store.load("a", "b")
    replaced = store.load("a", "b", replace=True)
    assert_matches_peft(replaced, model_b)
    assert store.get("a") is replaced
    assert store.load("a", "b", replace=True) is not replaced  # replace re-reads the files


def test_load_refuses_reserved_names_and_escaping_paths(make_adapter: AdapterFactory, root: Path) -> None:
    make_adapter(name="a", root=root, r=4, target_modules=["q_proj"])
    outside, _ = make_adapter(name="outside", root=root.parent, r=4, target_modules=["q_proj"])
    store = _store(root)
    with pytest.raises(AdapterError, match="reserved"):
        store.load("auto", "a")
    with pytest.raises(AdapterError, match="not a valid adapter name"):
        store.load("../a", "a")
    with pytest.raises(AdapterError, match=r"'\.\.'"):
        store.load("x", "../outside")
    with pytest.raises(AdapterError, match="outside the adapter roots"):
        store.load("x", str(outside))
    (root / "link").symlink_to(outside)
    with pytest.raises(AdapterError, match="outside its adapter root"):
        store.load("x", "link")
    with pytest.raises(AdapterError, match="outside its adapter root"):
        store.get("link")
    assert len(store.host) == 0


def test_too_big_for_the_host_cache(make_adapter: AdapterFactory, root: Path) -> None:
    make_adapter(name="a", root=root, r=4, target_modules=["q_proj", "v_proj"])
    store = _store(root, capacity=QV_R4_BYTES - 1)
    with pytest.raises(AdapterTooLarge, match="--host-cache-mb"):
        store.load("a2", "a")
    with pytest.raises(AdapterTooLarge):
        store.get("a")
    assert [s.name for s in store.list()] == ["a"]


def test_unload_of_a_root_adapter_frees_memory_until_asked_again(
    make_adapter: AdapterFactory, root: Path
) -> None:
    make_adapter(name="a", root=root, dtype=torch.float16, r=4, target_modules=["q_proj", "v_proj"])
    store = _store(root)
    store.get("a")
    store.unload("a")
    assert store.stats().bytes == 0
    assert store.get("a").nbytes == QV_R4_BYTES  # fp16 on disk, fp32 in the host tier
