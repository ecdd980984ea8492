"""The router's saved tables (server/router/state.py): read back equal, and a save writes only what changed.

No model: a small selector learned on random clusters, prototypes of random vectors. The oracle for
"read back" is the tables saved (every tensor equal, the scores of new features equal); for "only
what changed", the adapter files on disk (names, inodes and modification times).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from server.router.prototypes import AdapterPrototypes
from server.router.selector import Selector
from server.router.state import TableFiles
from server.router.tables import Known, Tables

DIM = 8
KEY = {"model": "tiny", "layer": 1}


def _cluster(i: int, n: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(i)
    return torch.randn(DIM, generator=g) * 3 + torch.randn(n, DIM, generator=g)


def _prototypes(seed: int) -> AdapterPrototypes:
    g = torch.Generator().manual_seed(100 + seed)
    keys = [(layer, proj) for layer in range(2) for proj in ("q_proj", "up_proj")]
    vectors = {k: torch.randn(DIM, generator=g) for k in keys}
    return AdapterPrototypes(
        vectors, {k: 0.1 * j for j, k in enumerate(keys)}, {k: 1.0 + j for j, k in enumerate(keys)}
    )


def _tables(count: int) -> Tables:
    tables = Tables(Selector(DIM))
    for i in range(count):
        _learn(tables, f"a{i}", i)
    tables.prototypes["weights-only"] = _prototypes(0)
    tables.known["weights-only"] = Known("", (), "sha256:w")
    return tables


def _learn(tables: Tables, name: str, seed: int) -> None:
    tables.selector.learn(name, _cluster(seed), steps=20)
    tables.prototypes[name] = _prototypes(seed + 1)
    tables.known[name] = Known(f"digest-{name}", (f"registered for {name}", "ünïcode ✓"), f"sha256:{name}")


def _adapter_files(path: Path) -> dict[str, tuple[int, int]]:
    folder = path.with_suffix(".adapters")
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}


def test_saved_tables_are_read_back_equal(tmp_path: Path) -> None:
    path = tmp_path / "router.safetensors"
    tables = _tables(3)
    TableFiles(path).save(tables, KEY)
    loaded = TableFiles(path).load(KEY, DIM)
    assert loaded is not None
    a, b = tables.selector, loaded.selector
    assert b.classes == a.classes and b.temperature == a.temperature and b.count == a.count
    for name in ("weight", "bias", "mean", "m2"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), rtol=0, atol=0)
    for name in a.classes:
        torch.testing.assert_close(b.train[name], a.train[name], rtol=0, atol=0)
        torch.testing.assert_close(b.held[name], a.held[name], rtol=0, atol=0)
    feature = torch.randn(DIM, generator=torch.Generator().manual_seed(7))
    before, after = a.scores(feature), b.scores(feature)
    torch.testing.assert_close(after.probabilities, before.probabilities)
    torch.testing.assert_close(after.distance, before.distance)
    assert after.limit == before.limit
    assert loaded.known == tables.known
    assert sorted(loaded.prototypes) == sorted(tables.prototypes)
    for name, prototypes in tables.prototypes.items():
        got = loaded.prototypes[name]
        assert got.mean == prototypes.mean and got.spread == prototypes.spread
        assert sorted(got.vectors) == sorted(prototypes.vectors)
        for k, vector in prototypes.vectors.items():
            torch.testing.assert_close(got.vectors[k], vector, rtol=0, atol=0)


def test_a_save_writes_only_the_adapters_that_changed(tmp_path: Path) -> None:
    path = tmp_path / "router.safetensors"
    files = TableFiles(path)
    tables = _tables(3)
    files.save(tables, KEY)
    first = _adapter_files(path)
    assert len(first) == 4  # a0, a1, a2 and the weights-only adapter

    grown = tables.copy()
    _learn(grown, "a3", 3)
    files.save(grown, KEY)
    second = _adapter_files(path)
    assert len(second) == 5 and {k: v for k, v in second.items() if k in first} == first  # untouched

    # a restart: the tables read back and saved unchanged write no adapter file
    again = TableFiles(path)
    loaded = again.load(KEY, DIM)
    assert loaded is not None
    again.save(loaded, KEY)
    assert _adapter_files(path) == second

    # more examples registered for one adapter: its file alone is replaced
    changed = loaded.copy()
    changed.known["a1"] = Known("digest-a1", ("one more",), "sha256:a1")
    again.save(changed, KEY)
    third = _adapter_files(path)
    assert len(third) == 5 and len(set(third) - set(second)) == 1
    assert TableFiles(path).load(KEY, DIM).known["a1"].runtime_prompts == ("one more",)  # type: ignore[union-attr]

    # a forgotten adapter's file is deleted
    forgotten = changed.copy()
    forgotten.selector.forget("a0")
    del forgotten.prototypes["a0"], forgotten.known["a0"]
    again.save(forgotten, KEY)
    assert len(_adapter_files(path)) == 4
    reloaded = TableFiles(path).load(KEY, DIM)
    assert reloaded is not None and reloaded.selector.classes == ["a1", "a2", "a3"]


def test_tables_that_cannot_be_reused_start_afresh(tmp_path: Path) -> None:
    path = tmp_path / "router.safetensors"
    assert TableFiles(path).load(KEY, DIM) is None  # nothing saved
    TableFiles(path).save(_tables(2), KEY)
    assert TableFiles(path).load({**KEY, "layer": 2}, DIM) is None  # another setting
    assert TableFiles(path).load(KEY, DIM + 1) is None  # another model width
    header = json.loads(path.with_suffix(".json").read_text())
    token = header["adapters"]["a1"]["file"]
    adapter_file = path.with_suffix(".adapters") / f"{token}.safetensors"
    kept = adapter_file.read_bytes()
    adapter_file.write_bytes(b"garbage")
    assert TableFiles(path).load(KEY, DIM) is None  # a broken adapter file
    adapter_file.unlink()
    assert TableFiles(path).load(KEY, DIM) is None  # a missing one
    adapter_file.write_bytes(kept)
    assert TableFiles(path).load(KEY, DIM) is not None
    path.with_suffix(".json").write_text(json.dumps({**header, "version": 2}))
    assert TableFiles(path).load(KEY, DIM) is None  # the one-file tables of before
