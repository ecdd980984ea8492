"""Reading and writing a Mixture-of-Shards directory (`mos`) as a validated, compact host-form adapter.

Layout (DESIGN.md, adapters_store): `mos_config.json` = {"format": "mos", "base_model", "r", "R",
"shards_per_vector" (l), "private_rank" (p), "lora_alpha", "target_modules", "num_layers" (L)} and
`mos_model.safetensors` with, per targeted projection, `pool.{proj}.A` [N, in/l] and
`pool.{proj}.B` [N, out/l] (F32/F16/BF16), N = R * L * l, and per layer `index.{layer}.{proj}.A|B`
int32 [r * l]. The first (R - p) * L * l pool rows are public; then layer i owns the p * l private
rows from (R - p) * L * l + i * p * l. A layer's index tables pick public rows or its own private
rows only. R and p may be fractional as long as both row counts are whole numbers.

As for `peft-lora`: the config and the weight file's header are checked first (names, dtypes,
shapes against the base model, the host form's size against `max_bytes`); then the data is read
once, hashed, and every value checked (pools finite, |x| <= MAX_ABS_WEIGHT; indices inside the
pool and the layer's share of it). A refusal is an AdapterError naming the field or tensor and the
file (relative to its adapter root). Unknown config keys are ignored. This module knows the MoS
file layout; it knows no caches, roots or devices.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from io import BufferedReader
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from adapters_store.adapter import ModuleKey, MosAdapter
from adapters_store.errors import AdapterError, AdapterTooLarge, shown
from adapters_store.limits import MAX_ABS_SCALE
from adapters_store.peft_config import read_config_json
from adapters_store.safetensors_header import SafetensorsHeader, TensorEntry, read_header
from adapters_store.spec import BaseModelSpec
from adapters_store.weights_file import FLOAT_DTYPES, float_tensor, read_data

FORMAT = "mos"
CONFIG_FILE = "mos_config.json"
WEIGHTS_FILE = "mos_model.safetensors"
INDEX_DTYPE = "I32"
MiB = 1 << 20
_POOL_KEY = re.compile(r"pool\.(?P<projection>\w+)\.(?P<ab>[AB])")
_INDEX_KEY = re.compile(r"index\.(?P<layer>[0-9]+)\.(?P<projection>\w+)\.(?P<ab>[AB])")


@dataclass(frozen=True)
class MosLayout:
    """The row bookkeeping of one MoS adapter: r per layer, budget R, l shards, p private, L layers."""

    r: int
    R: float
    shards: int  # l, shards per vector
    private_rank: float  # p
    num_layers: int  # L

    @property
    def public_rows(self) -> int:
        """(R - p) * L * l: the rows every layer may pick (whole in a layout parse_mos_config accepted)."""
        return round((self.R - self.private_rank) * self.num_layers * self.shards)

    @property
    def private_rows(self) -> int:
        """p * l: the rows each layer owns."""
        return round(self.private_rank * self.shards)

    @property
    def num_rows(self) -> int:
        """N = R * L * l."""
        return self.public_rows + self.private_rows * self.num_layers

    @property
    def picks(self) -> int:
        """r * l: the rows one index table picks."""
        return self.r * self.shards

    def private_start(self, layer: int) -> int:
        return self.public_rows + layer * self.private_rows

    def owner(self, row: int) -> int | None:
        """The layer that owns pool row `row` (< num_rows), or None for a public row."""
        if row < self.public_rows:
            return None
        return (row - self.public_rows) // self.private_rows


@dataclass(frozen=True)
class MosConfig:
    layout: MosLayout
    lora_alpha: float
    target_modules: tuple[str, ...]  # in the spec's PROJECTIONS order
    base_model: str | None


def load_mos(
    directory: Path | str,
    spec: BaseModelSpec,
    name: str,
    *,
    label: str | None = None,
    max_bytes: int | None = None,
) -> MosAdapter:
    """Load and validate the MoS adapter in `directory` against `spec`, registered as `name`.

    label: the directory as messages name it (default its name); max_bytes: the most host memory
    (fp32 pools + int64 indices) the adapter may take, else AdapterTooLarge before its data is read.
    """
    directory = Path(directory)
    label = label or directory.name
    config_source = f"{label}/{CONFIG_FILE}"
    config = parse_mos_config(read_config_json(directory / CONFIG_FILE, config_source), spec, config_source)
    layout = config.layout
    where = f"{label}/{WEIGHTS_FILE}"
    with _open_weights(directory / WEIGHTS_FILE, where) as file:
        header = read_header(file, where)
        pool_entries, index_entries = _check_header(header, config, spec, where)
        nbytes = 4 * sum(e.numel for pair in pool_entries.values() for e in pair)
        nbytes += 8 * sum(e.numel for pair in index_entries.values() for e in pair)
        if max_bytes is not None and nbytes > max_bytes:
            raise AdapterTooLarge(
                f"{where}: the adapter needs {nbytes / MiB:.1f} MiB of host memory (fp32 pools, int64 "
                f"indices), more than the {max_bytes / MiB:.1f} MiB one adapter may take; raise "
                "--max-adapter-mb (at most --host-cache-mb) or use a smaller adapter"
            )
        data = read_data(file, header, where)
    checksum = "sha256:" + hashlib.sha256(data).hexdigest()
    pools = {
        projection: (float_tensor(data, header, a, where), float_tensor(data, header, b, where))
        for projection, (a, b) in pool_entries.items()
    }
    indices = _indices(data, header, index_entries, layout, where)
    del data
    return MosAdapter(
        name=name,
        format=FORMAT,
        source=directory,
        checksum=checksum,
        nbytes=nbytes,
        rank=layout.r,
        target_modules=config.target_modules,
        r=layout.r,
        shards_per_vector=layout.shards,
        lora_alpha=config.lora_alpha,
        pools=pools,
        indices=indices,
    )


def parse_mos_config(raw: Mapping[str, Any], spec: BaseModelSpec, source: str) -> MosConfig:
    """Check a mos_config.json dict against the base model; `source` names the file in messages."""

    def fail(field: str, problem: str) -> AdapterError:
        return AdapterError(f"{source}: {field} {problem}")

    if raw.get("format") != FORMAT:
        raise fail("format", f"must be {FORMAT!r}, got {shown(raw.get('format'))}")
    base_model = raw.get("base_model")
    if base_model is not None and not isinstance(base_model, str):
        raise fail("base_model", f"must be a string, got {shown(base_model)}")
    num_layers = _positive_int(raw.get("num_layers"), "num_layers", fail)
    if num_layers != spec.num_layers:
        raise fail(
            "num_layers",
            f"= {num_layers} but the base model has {spec.num_layers} layers: was the adapter trained for "
            "another base model?",
        )
    targets = _target_modules(raw.get("target_modules"), spec, fail)
    r = _positive_int(raw.get("r"), "r", fail)
    if r > spec.max_rank:
        raise fail(
            "r",
            f"= {r} exceeds the server's max rank {spec.max_rank}; restart the server with a larger "
            "--max-rank or use a lower-rank adapter",
        )
    shards = _positive_int(raw.get("shards_per_vector"), "shards_per_vector", fail)
    for projection in targets:
        in_features, out_features = spec.features[projection]
        for side, size in (("in", in_features), ("out", out_features)):
            if size % shards:
                raise fail(
                    "shards_per_vector",
                    f"= {shards} does not divide {projection}'s {side}_features {size} ({projection} is "
                    f"{in_features} -> {out_features} in the base model); every targeted projection's "
                    "in and out features must be multiples of it",
                )
    budget = _finite_number(raw.get("R"), "R", fail)
    if not budget > 0:
        raise fail("R", f"must be > 0 (the equivalent rank budget), got {shown(raw.get('R'))}")
    private = _finite_number(raw.get("private_rank"), "private_rank", fail)
    if not 0 <= private <= budget:
        raise fail("private_rank", f"must be in [0, R = {budget:g}], got {shown(raw.get('private_rank'))}")
    _whole(private * shards, "private_rank", "private_rank * shards_per_vector", fail)
    public_rows = (budget - private) * num_layers * shards
    _whole(public_rows, "R", "(R - private_rank) * num_layers * shards_per_vector", fail)
    alpha = _finite_number(raw.get("lora_alpha"), "lora_alpha", fail)
    if not abs(alpha / r) <= MAX_ABS_SCALE:
        raise fail(
            "lora_alpha",
            f"= {alpha:g} with r = {r} gives a scale of {alpha / r:g} (alpha / r); loramux accepts "
            f"|scale| <= {MAX_ABS_SCALE:g}, beyond which the adapter's output cannot stay finite",
        )
    layout = MosLayout(r=r, R=budget, shards=shards, private_rank=private, num_layers=num_layers)
    return MosConfig(layout, alpha, targets, base_model)


def _positive_int(value: Any, field: str, fail: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise fail(field, f"must be an integer >= 1, got {shown(value)}")
    return value


def _finite_number(value: Any, field: str, fail: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise fail(field, f"must be a finite number, got {shown(value)}")
    try:
        number = float(value)
    except OverflowError:  # an integer beyond float range
        number = math.inf
    if not math.isfinite(number):
        raise fail(field, f"must be a finite number, got {shown(value)}")
    return number


def _whole(value: float, field: str, what: str, fail: Any) -> None:
    if abs(value - round(value)) > 1e-9 * max(1.0, abs(value)):
        raise fail(
            field,
            f"makes {what} = {value:g} pool rows, not a whole number; choose R, private_rank and "
            "shards_per_vector so that (R - private_rank) * num_layers * l and private_rank * l are whole",
        )


def _target_modules(value: Any, spec: BaseModelSpec, fail: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise fail("target_modules", f"must be a non-empty list of projection names, got {shown(value)}")
    for projection in value:
        if projection not in spec.features:
            raise fail(
                "target_modules",
                f"entry {shown(projection)} is not a projection loramux adapts ({', '.join(spec.projections)})",
            )
    if len(set(value)) != len(value):
        raise fail("target_modules", f"lists a projection twice: {shown(value)}")
    return tuple(p for p in spec.projections if p in value)


def _open_weights(path: Path, where: str) -> BufferedReader:
    if not path.is_file():
        if path.exists():  # a directory, FIFO, socket or device: reading it could block or never end
            raise AdapterError(f"{where} is not a regular file; it must be the adapter's safetensors file")
        raise AdapterError(f"{where} is missing: a MoS directory needs {WEIGHTS_FILE} beside {CONFIG_FILE}")
    try:
        return path.open("rb")
    except OSError as exc:
        raise AdapterError(f"cannot read {where}: {exc.strerror or type(exc).__name__}") from None


PoolEntries = dict[str, tuple[TensorEntry, TensorEntry]]
IndexEntries = dict[ModuleKey, tuple[TensorEntry, TensorEntry]]


def _check_header(
    header: SafetensorsHeader, config: MosConfig, spec: BaseModelSpec, where: str
) -> tuple[PoolEntries, IndexEntries]:
    """Every expected tensor present with its dtype and shape, and nothing else."""
    layout = config.layout
    for key in sorted(header.tensors):
        reason = _why_unexpected(key, config)
        if reason is not None:
            raise AdapterError(f"{where}: unexpected tensor {shown(key)}: {reason}")

    def entry(key: str, what: str) -> TensorEntry:
        found = header.tensors.get(key)
        if found is None:
            raise AdapterError(
                f"{where}: missing tensor {key} ({what}); the config targets {', '.join(config.target_modules)} "
                f"over {layout.num_layers} layers (the file is incomplete)"
            )
        return found

    pools: PoolEntries = {}
    for projection in config.target_modules:
        in_features, out_features = spec.features[projection]
        pair = []
        for ab, features in (("A", in_features), ("B", out_features)):
            pool = entry(f"pool.{projection}.{ab}", f"the {projection} pool of {ab}")
            if pool.dtype not in FLOAT_DTYPES:
                raise AdapterError(
                    f"{where}: tensor {pool.name} has dtype {pool.dtype}; expected F32, F16 or BF16 (a float tensor)"
                )
            expected = (layout.num_rows, features // layout.shards)
            if pool.shape != expected:
                raise AdapterError(
                    f"{where}: tensor {pool.name} has shape {shown(list(pool.shape))}, expected "
                    f"{list(expected)} (N = R * num_layers * shards_per_vector = {layout.num_rows} rows of "
                    f"{projection}'s {'in' if ab == 'A' else 'out'}_features {features} / shards_per_vector "
                    f"{layout.shards}): was the adapter trained for another base model?"
                )
            pair.append(pool)
        pools[projection] = (pair[0], pair[1])
    indices: IndexEntries = {}
    for layer in range(layout.num_layers):
        for projection in config.target_modules:
            pair = []
            for ab in ("A", "B"):
                index = entry(
                    f"index.{layer}.{projection}.{ab}", f"layer {layer}'s {projection} index of {ab}"
                )
                if index.dtype != INDEX_DTYPE or index.shape != (layout.picks,):
                    raise AdapterError(
                        f"{where}: tensor {index.name} is {index.dtype} {shown(list(index.shape))}; an index "
                        f"table is I32 (int32) [{layout.picks}] (r * shards_per_vector = {layout.r} * "
                        f"{layout.shards})"
                    )
                pair.append(index)
            indices[layer, projection] = (pair[0], pair[1])
    return pools, indices


def _why_unexpected(key: str, config: MosConfig) -> str | None:
    """None for a tensor the config expects, else why it is refused."""
    pool, index = _POOL_KEY.fullmatch(key), _INDEX_KEY.fullmatch(key)
    match = pool or index
    if match is None:
        return "a MoS file holds only pool.{proj}.A|B and index.{layer}.{proj}.A|B"
    if match["projection"] not in config.target_modules:
        return f"{shown(match['projection'])} is not in the config's target_modules"
    if index is not None and int(index["layer"]) >= config.layout.num_layers:
        return f"layer {shown(index['layer'])}, but num_layers is {config.layout.num_layers}"
    if index is not None and index["layer"] != str(int(index["layer"])):
        return "layer numbers have no leading zeros"
    return None


def _indices(
    data: bytearray, header: SafetensorsHeader, entries: IndexEntries, layout: MosLayout, where: str
) -> dict[ModuleKey, tuple[torch.Tensor, torch.Tensor]]:
    """Every index table as int64, checked at once: each row public or the layer's own private row."""
    tables = [table for pair in entries.values() for table in pair]
    flat = torch.cat(
        [
            torch.frombuffer(data, dtype=torch.int32, count=t.numel, offset=header.data_start + t.begin)
            for t in tables
        ]
    ).to(torch.int64)  # [2 * modules * picks], a copy of its own
    layers = torch.tensor([layer for layer, _ in entries for _ab in "AB"]).repeat_interleave(layout.picks)
    own_start = layout.public_rows + layers * layout.private_rows
    allowed = (flat >= 0) & (flat < layout.num_rows)
    allowed &= (flat < layout.public_rows) | ((flat >= own_start) & (flat < own_start + layout.private_rows))
    if not bool(allowed.all()):
        position = int((~allowed).nonzero()[0])
        table = tables[position // layout.picks]
        raise _bad_row(table.name, int(flat[position]), int(layers[position]), layout, where)
    split = flat.split(layout.picks)
    return {key: (split[2 * i], split[2 * i + 1]) for i, key in enumerate(entries)}


def _bad_row(tensor: str, row: int, layer: int, layout: MosLayout, where: str) -> AdapterError:
    public = f"public rows 0-{layout.public_rows - 1}" if layout.public_rows else "no public rows"
    start = layout.private_start(layer)
    own = (
        f"its private rows {start}-{start + layout.private_rows - 1}"
        if layout.private_rows
        else "no private rows"
    )
    allowed = f"layer {layer} may pick {public} and {own}"
    if not 0 <= row < layout.num_rows:
        return AdapterError(
            f"{where}: tensor {tensor} holds row {row}, outside the pool's {layout.num_rows} rows; {allowed}"
        )
    return AdapterError(
        f"{where}: tensor {tensor} holds row {row}, a private row of layer {layout.owner(row)}; {allowed}"
    )


def save_mos(
    directory: Path | str,
    layout: MosLayout,
    lora_alpha: float,
    pools: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    indices: Mapping[ModuleKey, tuple[torch.Tensor, torch.Tensor]],
    *,
    base_model: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write `mos_config.json` + `mos_model.safetensors` in `directory` (created if needed).

    pools: projection -> (pool_A [N, in/l], pool_B [N, out/l]), saved in `dtype`; indices: (layer,
    projection) -> (index_A, index_B) [r * l], saved as int32. Writes what it is given: `load_mos`
    is the check. target_modules are the pools' projections, in the order given.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for projection, (pool_a, pool_b) in pools.items():
        tensors[f"pool.{projection}.A"] = pool_a.detach().to(dtype).contiguous()
        tensors[f"pool.{projection}.B"] = pool_b.detach().to(dtype).contiguous()
    for (layer, projection), (index_a, index_b) in indices.items():
        tensors[f"index.{layer}.{projection}.A"] = index_a.to(torch.int32).contiguous()
        tensors[f"index.{layer}.{projection}.B"] = index_b.to(torch.int32).contiguous()
    config = {
        "format": FORMAT,
        "base_model": base_model,
        "r": layout.r,
        "R": _plain(layout.R),
        "shards_per_vector": layout.shards,
        "private_rank": _plain(layout.private_rank),
        "lora_alpha": _plain(lora_alpha),
        "target_modules": list(pools),
        "num_layers": layout.num_layers,
    }
    # save() + write_bytes, not save_file: the file gets the umask's mode (save_file's is 0600,
    # which a server running as another user cannot read)
    (directory / WEIGHTS_FILE).write_bytes(save(tensors, metadata={"format": "pt"}))
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def _plain(value: float) -> float | int:
    """JSON numbers as people write them: 8, not 8.0."""
    return int(value) if float(value).is_integer() else value
