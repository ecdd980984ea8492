"""The `mos` format: A and B assembled as the formula says, the compact host form, and every kind of
bad file refused with a message naming the field or tensor and the file, before anything is used."""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from adapters_store import (
    AdapterError,
    AdapterRoots,
    AdapterStore,
    AdapterTooLarge,
    BaseModelSpec,
    MosAdapter,
    MosLayout,
    detect_format,
    load_adapter,
    load_mos,
)
from tests.adapters_store.adapter_cases import TINY_SPEC
from tests.adapters_store.mos_cases import (
    WEIGHTS,
    edit_mos_config,
    mos_factors,
    random_mos,
    rewrite_mos,
)

# TINY_SPEC: 2 layers; q 64 -> 64, k/v 64 -> 32, o 64 -> 64, gate/up 64 -> 112, down 112 -> 64.
# N = R * L * l = 32 rows: 24 public, then 4 private rows for layer 0 (24-27) and layer 1 (28-31).
LAYOUT = MosLayout(r=4, R=4, shards=4, private_rank=1, num_layers=2)
ROWS = 32


@pytest.fixture
def mos_dir(tmp_path: Path) -> Path:
    return random_mos(tmp_path / "m", TINY_SPEC, LAYOUT)


def test_assembly_equals_the_formula_from_the_raw_tensors(mos_dir: Path) -> None:
    adapter = load_mos(mos_dir, TINY_SPEC, "m")
    expected = mos_factors(mos_dir)
    weights = adapter.lora_weights()
    assert set(weights) == set(expected) and len(weights) == 2 * 7
    x = torch.randn(3, 112)
    for key, (a, b, scale) in expected.items():
        got = weights[key]
        torch.testing.assert_close(got.A, a, rtol=0, atol=0)
        torch.testing.assert_close(got.B, b, rtol=0, atol=0)
        assert got.scale == scale == 2.0
        assert got.B.abs().sum() > 0
        # y += (alpha / r) * B (A x), as a sum over the r rank-one terms
        x_in = x[:, : a.shape[1]]
        delta = sum(scale * (x_in @ a[k])[:, None] * b[:, k][None, :] for k in range(4))
        torch.testing.assert_close(scale * (x_in @ got.A.T) @ got.B.T, delta, rtol=1e-5, atol=1e-5)


def test_host_form_is_the_compact_pools_once_plus_indices(mos_dir: Path) -> None:
    assert detect_format(mos_dir) == "mos"
    adapter = load_adapter(mos_dir, TINY_SPEC, "m")
    assert isinstance(adapter, MosAdapter)
    assert (adapter.format, adapter.rank, adapter.r, adapter.shards_per_vector) == ("mos", 4, 4, 4)
    assert adapter.target_modules == TINY_SPEC.projections
    assert adapter.lora_alpha == 8.0 and adapter.scale == 2.0
    assert adapter.checksum == "sha256:" + hashlib.sha256((mos_dir / WEIGHTS).read_bytes()).hexdigest()
    pool_rows = sum(i + o for i, o in TINY_SPEC.features.values()) // 4  # per pool row pair, all projections
    index_entries = 2 * 7 * 2 * 16
    assert adapter.nbytes == 4 * ROWS * pool_rows + 8 * index_entries
    for projection, (pool_a, pool_b) in adapter.pools.items():
        in_features, out_features = TINY_SPEC.features[projection]
        assert pool_a.shape == (ROWS, in_features // 4) and pool_b.shape == (ROWS, out_features // 4)
        assert pool_a.dtype == pool_b.dtype == torch.float32
    for index_a, index_b in adapter.indices.values():
        assert index_a.dtype == index_b.dtype == torch.int64 and index_a.shape == (16,)
    with pytest.raises(
        AdapterTooLarge, match=r"m/mos_model\.safetensors: the adapter needs .*--max-adapter-mb"
    ):
        load_mos(mos_dir, TINY_SPEC, "m", max_bytes=adapter.nbytes - 1)
    assert load_mos(mos_dir, TINY_SPEC, "m", max_bytes=adapter.nbytes).nbytes == adapter.nbytes


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_pools_load_as_their_fp32_values(tmp_path: Path, dtype: torch.dtype) -> None:
    directory = random_mos(tmp_path / "h", TINY_SPEC, LAYOUT, dtype=dtype, targets=["q_proj", "down_proj"])
    adapter = load_mos(directory, TINY_SPEC, "h")
    assert adapter.target_modules == ("q_proj", "down_proj")
    for key, (a, b, _) in mos_factors(directory).items():
        torch.testing.assert_close(adapter.lora_weights()[key].A, a, rtol=0, atol=0)
        torch.testing.assert_close(adapter.lora_weights()[key].B, b, rtol=0, atol=0)


def test_fractional_budget_and_private_rank_with_whole_row_counts(tmp_path: Path) -> None:
    """R = 0.75, p = 0.25, l = 4, L = 30: 60 public rows, one private row per layer, N = 90."""
    spec = BaseModelSpec.llama(
        num_layers=30, hidden_size=16, intermediate_size=32, q_size=16, kv_size=8, max_rank=8
    )
    layout = MosLayout(r=4, R=0.75, shards=4, private_rank=0.25, num_layers=30)
    directory = random_mos(tmp_path / "f", spec, layout, targets=["v_proj", "up_proj"])
    adapter = load_mos(directory, spec, "f")
    assert adapter.pools["v_proj"][0].shape == (90, 4)
    materialized = sum(w.nbytes for w in adapter.lora_weights().values())
    assert adapter.nbytes < materialized  # a budget R = 0.75 in place of rank 4 in every layer
    for key, (a, b, _) in mos_factors(directory).items():
        assert torch.equal(adapter.lora_weights()[key].A, a) and torch.equal(adapter.lora_weights()[key].B, b)
    # 0.3 * 4 = 1.2 private rows per layer is not whole
    edit_mos_config(directory, private_rank=0.3, R=0.8)
    with pytest.raises(AdapterError, match=r"f/mos_config\.json: private_rank makes .* = 1\.2 pool rows"):
        load_mos(directory, spec, "f")


def _set_row(key: str, position: int, row: int) -> Any:
    def change(tensors: dict[str, torch.Tensor]) -> None:
        tensors[key][position] = row

    return change


def _set(key: str, value: torch.Tensor | None) -> Any:
    def change(tensors: dict[str, torch.Tensor]) -> None:
        if value is None:
            del tensors[key]
        else:
            tensors[key] = value

    return change


def _poison(key: str, value: float) -> Any:
    def change(tensors: dict[str, torch.Tensor]) -> None:
        tensors[key][3, 1] = value

    return change


W = r"m/mos_model\.safetensors: "
BAD_WEIGHTS = {
    "index out of range": (
        _set_row("index.1.q_proj.A", 5, ROWS),
        W + r"tensor index\.1\.q_proj\.A holds row 32, outside the pool's 32 rows; layer 1 may pick "
        r"public rows 0-23 and its private rows 28-31",
    ),
    "negative index": (
        _set_row("index.0.up_proj.B", 0, -1),
        W + r"tensor index\.0\.up_proj\.B holds row -1, outside",
    ),
    "another layer's private row": (
        _set_row("index.0.k_proj.B", 2, 29),
        W + r"tensor index\.0\.k_proj\.B holds row 29, a private row of layer 1; layer 0 may pick public "
        r"rows 0-23 and its private rows 24-27",
    ),
    "pool rows": (
        _set("pool.v_proj.A", torch.zeros(ROWS - 1, 16)),
        W + r"tensor pool\.v_proj\.A has shape \[31, 16\], expected \[32, 16\]",
    ),
    "pool width": (
        _set("pool.gate_proj.B", torch.zeros(ROWS, 27)),
        W + r"tensor pool\.gate_proj\.B has shape \[32, 27\], expected \[32, 28\] .*out_features 112",
    ),
    "pool dtype": (
        _set("pool.o_proj.A", torch.zeros(ROWS, 16, dtype=torch.int32)),
        W + r"tensor pool\.o_proj\.A has dtype I32; expected F32, F16 or BF16",
    ),
    "index dtype": (
        _set("index.0.q_proj.A", torch.arange(16, dtype=torch.int64)),
        W + r"tensor index\.0\.q_proj\.A is I64 \[16\]; an index table is I32 \(int32\) \[16\]",
    ),
    "index length": (
        _set("index.1.down_proj.B", torch.arange(15, dtype=torch.int32)),
        W + r"tensor index\.1\.down_proj\.B is I32 \[15\]; an index table is I32 \(int32\) \[16\]",
    ),
    "missing index": (_set("index.1.o_proj.B", None), W + r"missing tensor index\.1\.o_proj\.B"),
    "missing pool": (_set("pool.k_proj.A", None), W + r"missing tensor pool\.k_proj\.A"),
    "unexpected tensor": (
        _set("lm_head.weight", torch.zeros(2, 2)),
        W + r"unexpected tensor 'lm_head\.weight'",
    ),
    "index of a layer the model lacks": (
        _set("index.2.q_proj.A", torch.arange(16, dtype=torch.int32)),
        W + r"unexpected tensor 'index\.2\.q_proj\.A': layer '2', but num_layers is 2",
    ),
    "NaN in a pool": (
        _poison("pool.gate_proj.B", math.nan),
        W + r"tensor pool\.gate_proj\.B holds 1 non-finite",
    ),
    "inf in a pool": (_poison("pool.q_proj.A", -math.inf), W + r"tensor pool\.q_proj\.A holds 1 non-finite"),
    "huge pool value": (_poison("pool.up_proj.A", 1e6), W + r"tensor pool\.up_proj\.A holds values up to"),
}


@pytest.mark.parametrize("case", list(BAD_WEIGHTS))
def test_bad_weight_files_are_refused_naming_the_tensor(mos_dir: Path, case: str) -> None:
    change, message = BAD_WEIGHTS[case]
    rewrite_mos(mos_dir, change)
    with pytest.raises(AdapterError, match=message):
        load_mos(mos_dir, TINY_SPEC, "m")


C = r"m/mos_config\.json: "
BAD_CONFIGS = {
    "num_layers mismatch": (
        {"num_layers": 3},
        C + r"num_layers = 3 but the base model has 2 layers: was the adapter trained for another base model",
    ),
    "num_layers type": ({"num_layers": "2"}, C + r"num_layers must be an integer >= 1, got '2'"),
    "l does not divide": (
        {"shards_per_vector": 3},
        C + r"shards_per_vector = 3 does not divide q_proj's in_features 64",
    ),
    "l does not divide one projection": (
        {"shards_per_vector": 32, "target_modules": ["gate_proj"]},
        C + r"shards_per_vector = 32 does not divide gate_proj's out_features 112",
    ),
    "non-whole public rows": (
        {"R": 4.1},
        C + r"R makes \(R - private_rank\) \* num_layers \* shards_per_vector = 24\.8",
    ),
    "non-whole private rows": (
        {"private_rank": 1.1},
        C + r"private_rank makes private_rank \* shards_per_vector",
    ),
    "p above R": ({"private_rank": 5}, C + r"private_rank must be in \[0, R = 4\], got 5"),
    "negative p": ({"private_rank": -1}, C + r"private_rank must be in \[0, R = 4\]"),
    "R zero": ({"R": 0}, C + r"R must be > 0"),
    "R not a number": ({"R": "4"}, C + r"R must be a finite number, got '4'"),
    "r above max rank": ({"r": 17}, C + r"r = 17 exceeds the server's max rank 16"),
    "r zero": ({"r": 0}, C + r"r must be an integer >= 1, got 0"),
    "r float": ({"r": 4.0}, C + r"r must be an integer >= 1, got 4\.0"),
    "alpha NaN": ({"lora_alpha": math.nan}, C + r"lora_alpha must be a finite number"),
    "alpha huge": ({"lora_alpha": 1e9}, C + r"lora_alpha = 1e\+09 with r = 4 gives a scale of 2\.5e\+08"),
    "unknown target": (
        {"target_modules": ["q_proj", "lm_head"]},
        C + r"target_modules entry 'lm_head' is not a projection loramux adapts",
    ),
    "empty targets": ({"target_modules": []}, C + r"target_modules must be a non-empty list"),
    "twice targeted": (
        {"target_modules": ["q_proj", "q_proj"]},
        C + r"target_modules lists a projection twice",
    ),
    "wrong format": ({"format": "lora"}, C + r"format must be 'mos', got 'lora'"),
    "base_model type": ({"base_model": 3}, C + r"base_model must be a string, got 3"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_configs_are_refused_naming_the_field(mos_dir: Path, case: str) -> None:
    changes, message = BAD_CONFIGS[case]
    edit_mos_config(mos_dir, **changes)
    with pytest.raises(AdapterError, match=message):
        load_mos(mos_dir, TINY_SPEC, "m")


def test_a_pool_the_config_does_not_target_is_unexpected(tmp_path: Path) -> None:
    directory = random_mos(tmp_path / "m", TINY_SPEC, LAYOUT, targets=["q_proj", "v_proj"])
    edit_mos_config(directory, target_modules=["q_proj"])
    with pytest.raises(
        AdapterError,
        match=W + r"unexpected tensor '(index\.0\.v_proj\.A|pool\.v_proj\.A)': "
        r"'v_proj' is not in the config's target_modules",
    ):
        load_mos(directory, TINY_SPEC, "m")


def test_missing_truncated_or_odd_files_are_refused(mos_dir: Path) -> None:
    data = (mos_dir / WEIGHTS).read_bytes()
    (mos_dir / WEIGHTS).write_bytes(data[:-10])
    with pytest.raises(
        AdapterError, match=r"m/mos_model\.safetensors is not a valid safetensors file: .*truncated"
    ):
        load_mos(mos_dir, TINY_SPEC, "m")
    (mos_dir / WEIGHTS).unlink()
    with pytest.raises(
        AdapterError,
        match=r"m/mos_model\.safetensors is missing: a MoS directory needs mos_model\.safetensors",
    ):
        load_adapter(mos_dir, TINY_SPEC, "m")
    (mos_dir / WEIGHTS).mkdir()
    with pytest.raises(AdapterError, match=r"m/mos_model\.safetensors is not a regular file"):
        load_mos(mos_dir, TINY_SPEC, "m")
    (mos_dir / "mos_config.json").write_text("[1, 2]")
    with pytest.raises(AdapterError, match=r"m/mos_config\.json must hold a JSON object"):
        load_adapter(mos_dir, TINY_SPEC, "m")


def test_a_refused_mos_file_changes_nothing_loaded(tmp_path: Path) -> None:
    root = Path(os.path.realpath(tmp_path)) / "adapters"
    random_mos(root / "good", TINY_SPEC, LAYOUT)
    bad = random_mos(root / "bad", TINY_SPEC, LAYOUT, seed=1)
    rewrite_mos(bad, _set_row("index.0.q_proj.A", 0, 30))
    store = AdapterStore(TINY_SPEC, AdapterRoots([root]), 1 << 20)
    good = store.load("mine", "good")
    before = store.stats()
    with pytest.raises(
        AdapterError, match=r"bad/mos_model\.safetensors: tensor index\.0\.q_proj\.A holds row 30"
    ):
        store.load("mine", "bad", replace=True)
    assert store.get("mine") is good
    after = store.stats()
    assert (after.entries, after.bytes) == (before.entries, before.bytes) == (1, good.nbytes)
