"""Issue 9 (hardening), adapter half: every break an attacker found is refused clearly, fast, and
without keeping memory. Which modules a config targets is checked against PEFT in
test_peft_lora.py (MATCHING_CASES run on RE2 now); here the refusals and their costs.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import struct
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

from adapters_store import AdapterError, AdapterRoots, AdapterStore, AdapterTooLarge, BaseModelSpec
from adapters_store import store as store_module
from adapters_store.errors import message_only, shown
from adapters_store.formats import load_adapter
from adapters_store.limits import MAX_ABS_SCALE, MAX_ABS_WEIGHT
from adapters_store.names import check_adapter_name
from tests.adapters_store.adapter_cases import TINY_SPEC, edit_config, rewrite_weights
from tests.adapters_store.conftest import AdapterFactory

Q_KEY = "base_model.model.model.layers.0.self_attn.q_proj"
MiB = 1 << 20


def _refusal(directory: Path, spec: BaseModelSpec = TINY_SPEC, **kwargs: Any) -> tuple[str, float]:
    """(message, seconds) of loading `directory`, which must be refused with an AdapterError."""
    started = time.perf_counter()
    with pytest.raises(AdapterError) as caught:
        load_adapter(directory, spec, "a", **kwargs)
    return str(caught.value), time.perf_counter() - started


# -- 1. regular expressions run in linear time -------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [
        {"target_modules": r"model\.layers\.0(?:.|.|.)*Q"},
        {"target_modules": "(.*a){30}"},
        {"exclude_modules": "(x+x+)+y", "target_modules": ".*q_proj"},
        {"rank_pattern": {"(q|q|q|q)*_proj(.*)*$Z": 2}},
        {"alpha_pattern": {"(.*.*)*X": 2}},
    ],
    ids=["reported", "nested-repeat", "exclude", "rank-key", "alpha-key"],
)
def test_backtracking_patterns_answer_at_once(make_adapter: AdapterFactory, changes: dict[str, Any]) -> None:
    directory, _ = make_adapter(r=4, target_modules=["q_proj"])
    edit_config(directory, **changes)
    started = time.perf_counter()
    with contextlib.suppress(AdapterError):  # e.g. "selects no module": the time and the error type matter
        load_adapter(directory, TINY_SPEC, "a")
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"target_modules": r"(q)\1_proj"}, "target_modules"),
        ({"exclude_modules": "(?!x).*v_proj", "target_modules": ".*_proj"}, "exclude_modules"),
        ({"rank_pattern": {"(?<=self_attn\\.)q_proj": 2}}, r"rank_pattern key"),
        ({"alpha_pattern": {"q_proj(?=)": 2}}, r"alpha_pattern key"),
        (
            {"target_modules": ["q_proj"], "layers_to_transform": [0], "layers_pattern": "(l)\\1"},
            "layers_pattern",
        ),
        ({"target_modules": "q" * 5000}, "target_modules"),
    ],
    ids=["backreference", "lookahead", "lookbehind", "empty-lookahead", "layers-pattern", "too-long"],
)
def test_patterns_re2_cannot_run_are_refused_by_field(
    make_adapter: AdapterFactory, changes: dict[str, Any], field: str
) -> None:
    directory, _ = make_adapter(r=4, target_modules=["q_proj"])
    edit_config(directory, **changes)
    message, _ = _refusal(directory)
    assert field.replace("\\", "") in message
    assert len(message) < 600


# -- 5. malformed configs are AdapterErrors, never anything else -------------------------------


def _write_config(directory: Path, text: str) -> None:
    (directory / "adapter_config.json").write_text(text)


def test_a_5000_digit_rank_is_a_json_error(make_adapter: AdapterFactory) -> None:
    directory, _ = make_adapter(r=4, target_modules=["q_proj"])
    config = (directory / "adapter_config.json").read_text()
    _write_config(directory, config.replace('"r": 4', '"r": ' + "9" * 5000))
    message, _ = _refusal(directory)
    assert "adapter_config.json is not valid JSON" in message and len(message) < 600


def test_deep_nesting_is_a_json_error(make_adapter: AdapterFactory) -> None:
    directory, _ = make_adapter(r=4, target_modules=["q_proj"])
    config = json.loads((directory / "adapter_config.json").read_text())
    text = json.dumps(config)[:-1] + ', "deep": ' + "[" * 200_000 + "]" * 200_000 + "}"
    _write_config(directory, text)
    message, _ = _refusal(directory)
    assert "adapter_config.json is not valid JSON" in message


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"r": 10**300}, "r = <an integer of"),
        ({"lora_alpha": 10**400}, "lora_alpha must be a finite number"),
        ({"rank_pattern": {"q_proj": 10**50}}, "exceeds the server's max rank"),
        ({"layers_to_transform": [-1, 10**30]}, "selects no module"),
        ({"layers_to_transform": list(range(2000))}, "at most 1024"),
        ({"rank_pattern": {f"k{i}": 2 for i in range(2000)}}, "rank_pattern has 2000 entries"),
        ({"target_modules": {"q_proj": 1}}, "target_modules must be a string or a list"),
        ({"use_dora": "x" * 10_000}, "(10000 characters)"),
        ({"peft_type": ["LORA"] * 5000}, "peft_type"),
        ({"use_rslora": "yes"}, "use_rslora must be true or false, got 'yes'"),
    ],
    ids=[
        "huge-r",
        "huge-alpha",
        "huge-pattern-rank",
        "odd-layers",
        "many-layers",
        "many-keys",
        "dict",
        "long",
        "list",
        "rslora-string",
    ],
)
def test_malformed_fields_are_named_with_bounded_messages(
    make_adapter: AdapterFactory, changes: dict[str, Any], expected: str
) -> None:
    directory, _ = make_adapter(r=4, target_modules=["q_proj"])
    edit_config(directory, **changes)
    message, _ = _refusal(directory)
    assert expected in message
    assert len(message) < 600


def test_a_5000_digit_layer_number_in_a_tensor_name(make_adapter: AdapterFactory) -> None:
    directory, _ = make_adapter(r=4, target_modules=["q_proj"])
    key = "base_model.model.model.layers." + "7" * 5000 + ".self_attn.q_proj.lora_A.weight"
    rewrite_weights(directory, lambda tensors: tensors.__setitem__(key, torch.zeros(4, 64)))
    message, _ = _refusal(directory)
    assert "number of 5000 digits" in message and len(message) < 600


def test_a_directory_or_an_unreadable_file_is_an_adapter_error(make_adapter: AdapterFactory) -> None:
    directory, _ = make_adapter(r=4, target_modules=["q_proj"])
    weights = directory / "adapter_model.safetensors"
    weights.unlink()
    weights.mkdir()
    assert "adapter_model.safetensors is a directory" in _refusal(directory)[0]
    weights.rmdir()
    weights.write_bytes(b"")
    if os.geteuid() != 0:  # root reads files whatever their mode
        weights.chmod(0)
        assert "cannot read a/adapter_model.safetensors: Permission denied" in _refusal(directory)[0]


def test_a_fifo_is_refused_without_blocking(make_adapter: AdapterFactory) -> None:
    directory, _ = make_adapter(r=4, target_modules=["q_proj"])
    expected = {  # opening a FIFO to read would wait for a writer forever
        "adapter_model.safetensors": "a/adapter_model.safetensors is not a regular file",
        "adapter_config.json": "a holds no adapter loramux recognises",  # not even taken for an adapter
    }
    for name, message in expected.items():
        (directory / name).unlink()
        os.mkfifo(directory / name)
        assert message in _refusal(directory)[0]


# -- 2. the safetensors header is checked before any data is read ------------------------------


def _header_file(path: Path, header: dict[str, Any], data_bytes: int, pad_to: int | None = None) -> None:
    """A safetensors file with `header`, then `data_bytes` of (sparse) data."""
    encoded = json.dumps(header).encode()
    with path.open("wb") as file:
        file.write(struct.pack("<Q", len(encoded)) + encoded)
    os.truncate(path, 8 + len(encoded) + data_bytes if pad_to is None else pad_to)


def _entry(shape: list[int], begin: int, dtype: str = "F32") -> dict[str, Any]:
    size = 4 if dtype == "F32" else 2
    numel = 1
    for n in shape:
        numel *= n
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, begin + numel * size]}


def _q_header(a_shape: list[int], b_shape: list[int]) -> tuple[dict[str, Any], int]:
    a = _entry(a_shape, 0)
    b = _entry(b_shape, a["data_offsets"][1])
    return {f"{Q_KEY}.lora_A.weight": a, f"{Q_KEY}.lora_B.weight": b}, b["data_offsets"][1]


def _refused_without_reading(directory: Path, expected: str, **kwargs: Any) -> None:
    tracemalloc.start()
    try:
        message, seconds = _refusal(directory, **kwargs)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert expected in message
    assert seconds < 1.0
    assert peak < 8 * MiB, f"refusing it allocated {peak / MiB:.0f} MiB"


@pytest.mark.parametrize(
    ("a_shape", "b_shape", "expected"),
    [
        ([4, 25_000_000], [64, 4], "shape [4, 25000000], expected [4, 64]"),  # 400 MB of A
        ([4, 64], [64, 4], "holds 400002048 after the header"),  # right header, 400 MB of junk after it
    ],
    ids=["oversized-tensor", "trailing-bytes"],
)
def test_big_sparse_files_are_refused_from_the_header(
    make_adapter: AdapterFactory, a_shape: list[int], b_shape: list[int], expected: str
) -> None:
    directory, _ = make_adapter(r=4, target_modules=["q_proj"], layers_to_transform=[0])
    header, data_bytes = _q_header(a_shape, b_shape)
    extra = 400_000_000 if a_shape == [4, 64] else 0
    _header_file(directory / "adapter_model.safetensors", header, data_bytes + extra)
    _refused_without_reading(directory, expected)


def test_an_adapter_bigger_than_its_limit_is_refused_before_its_data(make_adapter: AdapterFactory) -> None:
    directory, _ = make_adapter(r=16, target_modules="all-linear")
    _refused_without_reading(directory, "MiB one adapter may take", max_bytes=1024)
    with pytest.raises(AdapterTooLarge):
        load_adapter(directory, TINY_SPEC, "a", max_bytes=1024)


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        (struct.pack("<Q", 1 << 40), "its header claims 1099511627776 bytes"),
        (struct.pack("<Q", 100) + b"{", "its header claims 100 bytes but the file is"),
        (b"\x01\x02", "too short for a header"),
        (struct.pack("<Q", 2) + b"[]", "must hold a JSON object"),
        (struct.pack("<Q", 6) + b'{"a":1', "header is not valid JSON"),
    ],
    ids=["huge-length", "short-header", "short-file", "not-object", "bad-json"],
)
def test_malformed_headers_are_adapter_errors(
    make_adapter: AdapterFactory, prefix: bytes, expected: str
) -> None:
    directory, _ = make_adapter(r=4, target_modules=["q_proj"])
    (directory / "adapter_model.safetensors").write_bytes(prefix)
    assert expected in _refusal(directory)[0]


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda h: h[f"{Q_KEY}.lora_B.weight"].update(data_offsets=[0, 1024]), "overlaps another"),
        (lambda h: h[f"{Q_KEY}.lora_A.weight"].update(data_offsets=[4, 1028]), "leaves a gap"),
        (lambda h: h[f"{Q_KEY}.lora_A.weight"].update(dtype="F99"), "unknown dtype 'F99'"),
        (lambda h: h[f"{Q_KEY}.lora_A.weight"].update(shape=[4, -64]), "malformed shape"),
        (lambda h: h[f"{Q_KEY}.lora_A.weight"].update(shape=[4, 65]), "declares 1024 bytes"),
        (lambda h: h.update(__metadata__={"format": 1}), "__metadata__"),
    ],
    ids=["overlap", "gap", "dtype", "negative-shape", "size-mismatch", "metadata"],
)
def test_inconsistent_headers_are_refused(make_adapter: AdapterFactory, edit: Any, expected: str) -> None:
    directory, _ = make_adapter(r=4, target_modules=["q_proj"])
    header, data_bytes = _q_header([4, 64], [64, 4])
    edit(header)
    _header_file(directory / "adapter_model.safetensors", header, data_bytes)
    assert expected in _refusal(directory)[0]


# -- 4. values whose products cannot stay finite -----------------------------------------------


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            lambda t: t[f"{Q_KEY}.lora_A.weight"].view(-1).__setitem__(3, 3e38),
            "lora_A.weight holds values up to",
        ),
        (
            lambda t: t[f"{Q_KEY}.lora_B.weight"].view(-1).__setitem__(0, -1e30),
            "lora_B.weight holds values up to",
        ),
        (lambda t: t[f"{Q_KEY}.lora_B.weight"].view(-1).__setitem__(0, 65505.0), "|x| <= 65504"),
    ],
    ids=["A-3e38", "B-1e30", "just-above-fp16"],
)
def test_weights_beyond_the_fp16_range_are_refused(
    make_adapter: AdapterFactory, change: Any, expected: str
) -> None:
    directory, _ = make_adapter(r=4, target_modules=["q_proj"])
    rewrite_weights(directory, change)
    assert expected in _refusal(directory)[0]


def test_weights_at_the_fp16_limit_load(make_adapter: AdapterFactory) -> None:
    directory, _ = make_adapter(r=4, target_modules=["q_proj"])
    rewrite_weights(directory, lambda t: t[f"{Q_KEY}.lora_A.weight"].view(-1).__setitem__(0, -MAX_ABS_WEIGHT))
    load_adapter(directory, TINY_SPEC, "a")


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"lora_alpha": 1e37}, "lora_alpha = 1e+37"),
        ({"alpha_pattern": {"q_proj": 1e9}}, "alpha_pattern['q_proj'] = 1e+09"),
        ({"lora_alpha": -MAX_ABS_SCALE * 4 - 4}, "lora_alpha"),
        ({"lora_alpha": 4e5, "use_rslora": True}, "sqrt(rank)"),
    ],
    ids=["alpha", "alpha-pattern", "negative", "rslora"],
)
def test_scales_beyond_the_limit_are_refused(
    make_adapter: AdapterFactory, changes: dict[str, Any], field: str
) -> None:
    directory, _ = make_adapter(r=4, target_modules=["q_proj"])
    edit_config(directory, **changes)
    message = _refusal(directory)[0]
    assert field in message and f"|scale| <= {MAX_ABS_SCALE:g}" in message


# -- 7 and 9. bounded messages without server paths -------------------------------------------


def test_shown_bounds_any_value() -> None:
    assert shown("sql") == "'sql'"
    assert len(shown("x" * 10_000)) < 120 and "(10000 characters)" in shown("x" * 10_000)
    assert len(shown(10**5000)) < 120
    assert len(shown(list(range(100_000)))) < 120


def test_a_10000_character_name_or_path_is_not_echoed(tmp_path: Path) -> None:
    with pytest.raises(AdapterError) as caught:
        check_adapter_name("n" * 10_000, lookup=True)
    assert len(str(caught.value)) < 300
    roots = AdapterRoots([tmp_path])
    for path in ("p" * 10_000, "/" + "p" * 10_000, "a/../" + "p" * 10_000):
        with pytest.raises(AdapterError) as caught:
            roots.resolve_path(path)
        assert len(str(caught.value)) < 300


def test_messages_name_paths_relative_to_the_root(make_adapter: AdapterFactory, tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside-secret"
    directory, _ = make_adapter(name="sql", root=root / "team", r=4, target_modules=["q_proj"])
    make_adapter(name="evil", root=outside, r=4, target_modules=["q_proj"])
    (root / "escape").symlink_to(outside / "evil", target_is_directory=True)
    edit_config(directory, r=2)
    store = AdapterStore(TINY_SPEC, AdapterRoots([root]), 64 * MiB)
    with pytest.raises(AdapterError) as caught:
        store.load("sql", "team/sql")
    assert "team/sql/adapter_model.safetensors" in str(caught.value)
    with pytest.raises(AdapterError) as caught:
        store.get("escape")
    for message in (str(caught.value),):
        assert str(tmp_path) not in message and "outside-secret" not in message
    with pytest.raises(AdapterError) as caught:
        store.get("nothing")
    assert str(tmp_path) not in str(caught.value)
    assert store.roots.relative(directory.resolve()) == "team/sql"


# -- kept errors hold no memory; refusals are remembered until the files change ---------------


def _big_spec() -> BaseModelSpec:
    return BaseModelSpec(num_layers=1, features={"q_proj": (4096, 4096)}, max_rank=64)


def _big_adapter(directory: Path, b_value: float) -> None:
    """A 4 MiB rank-64 q_proj adapter for _big_spec() whose B holds `b_value` once."""
    directory.mkdir(parents=True)
    config = {"peft_type": "LORA", "r": 64, "lora_alpha": 64, "target_modules": ["q_proj"]}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    b = torch.zeros(4096, 64)
    b[7, 7] = b_value
    tensors = {f"{Q_KEY}.lora_A.weight": torch.ones(64, 4096), f"{Q_KEY}.lora_B.weight": b}
    safetensors.torch.save_file(tensors, directory / "adapter_model.safetensors")


def test_a_kept_refusal_keeps_nothing_of_the_file(tmp_path: Path) -> None:
    _big_adapter(tmp_path / "root" / "nan", float("nan"))  # refused after its data was read
    store = AdapterStore(_big_spec(), AdapterRoots([tmp_path / "root"]), 256 * MiB)
    gc.collect()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for _ in range(3):
            with pytest.raises(AdapterError, match="non-finite"):
                store.get("nan")
        gc.collect()
        after, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak - before > 2 * MiB  # it did read the file once
    assert after - before < 512 * 1024, f"{(after - before) / MiB:.1f} MiB stayed referenced"


def test_message_only_drops_traceback_and_chain() -> None:
    try:
        try:
            raise KeyError("inner")
        except KeyError as inner:
            raise AdapterError("outer") from inner
    except AdapterError as exc:
        copy = message_only(exc)
    assert type(copy) is AdapterError and str(copy) == "outer"
    assert copy.__traceback__ is None and copy.__cause__ is None and copy.__context__ is None


def test_a_refusal_is_remembered_until_its_files_change(
    make_adapter: AdapterFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory, _ = make_adapter(name="broken", root=tmp_path / "root", r=4, target_modules=["q_proj"])
    good_config = (directory / "adapter_config.json").read_text()
    edit_config(directory, target_modules=r"(q)\1")
    reads: list[str] = []
    real_read = AdapterStore._read
    monkeypatch.setattr(
        AdapterStore, "_read", lambda self, *args: reads.append(args[0]) or real_read(self, *args)
    )
    store = AdapterStore(TINY_SPEC, AdapterRoots([tmp_path / "root"]), 64 * MiB)
    for _ in range(3):
        with pytest.raises(AdapterError, match="target_modules"):
            store.get("broken")
    assert reads == ["broken"] and store.refused_names() == {"broken"}
    (directory / "adapter_config.json").write_text(good_config)  # a change (size, mtime, ctime)
    assert store.get("broken").rank == 4
    assert reads == ["broken", "broken"] and store.refused_names() == set()


def test_changed_files_are_read_again_and_broken_ones_are_not_served_stale(
    make_adapter: AdapterFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "FRESHNESS_CHECK_S", 0.0)
    root = tmp_path / "root"
    directory, _ = make_adapter(name="live", root=root, r=4, target_modules=["q_proj"])
    store = AdapterStore(TINY_SPEC, AdapterRoots([root]), 64 * MiB)
    first = store.get("live")
    assert store.get("live") is first  # unchanged: the cached version
    rewrite_weights(directory, lambda t: t[f"{Q_KEY}.lora_A.weight"].mul_(2))
    second = store.get("live")
    assert second.checksum != first.checksum
    torch.testing.assert_close(
        second.lora_weights()[(0, "q_proj")].A, 2 * first.lora_weights()[(0, "q_proj")].A
    )
    edit_config(directory, r=2)  # now broken: its shapes say rank 4
    with pytest.raises(AdapterError, match="expected \\[2, 64\\]"):
        store.get("live")
    assert store.host.peek("live") is None


def test_a_cached_version_is_compared_with_the_disk_at_most_once_a_second(
    make_adapter: AdapterFactory, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    directory, _ = make_adapter(name="live", root=root, r=4, target_modules=["q_proj"])
    store = AdapterStore(TINY_SPEC, AdapterRoots([root]), 64 * MiB)
    first = store.get("live")
    rewrite_weights(directory, lambda t: t[f"{Q_KEY}.lora_A.weight"].mul_(2))
    assert store.get("live") is first  # within FRESHNESS_CHECK_S of the load: not looked at yet
    time.sleep(store_module.FRESHNESS_CHECK_S + 0.05)
    assert store.get("live").checksum != first.checksum
