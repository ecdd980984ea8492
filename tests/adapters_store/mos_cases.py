"""Random MoS adapters made by the tests, and the MoS formula computed from raw tensors.

The index tables are drawn as the format describes (each layer picks its own private rows and
distinct public rows, shuffled; A and B drawn independently) by code of the tests' own, and
`mos_factors` assembles A and B shard by shard from the saved file without loramux's code, so the
two are independent oracles of `MosAdapter.lora_weights()`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from adapters_store import BaseModelSpec, MosLayout, save_mos

CONFIG = "mos_config.json"
WEIGHTS = "mos_model.safetensors"


def draw_index(layout: MosLayout, layer: int, generator: torch.Generator) -> torch.Tensor:
    """One index table [r * l]: the layer's p * l private rows, then distinct public rows, shuffled."""
    public = round((layout.R - layout.private_rank) * layout.num_layers * layout.shards)
    private = round(layout.private_rank * layout.shards)
    first = public + layer * private
    rows = torch.cat(
        [
            torch.arange(first, first + private),
            torch.randperm(public, generator=generator)[: layout.r * layout.shards - private],
        ]
    )
    return rows[torch.randperm(len(rows), generator=generator)]


def random_mos(
    directory: Path,
    spec: BaseModelSpec,
    layout: MosLayout,
    *,
    targets: Sequence[str] | None = None,
    lora_alpha: float = 8.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    std: float = 0.3,
) -> Path:
    """A MoS adapter with random pools (B non-zero) and index tables drawn as the format says."""
    generator = torch.Generator().manual_seed(seed)
    targets = list(targets or spec.projections)
    rows = round(layout.R * layout.num_layers * layout.shards)
    pools = {}
    for projection in targets:
        in_features, out_features = spec.features[projection]
        pools[projection] = (
            torch.randn(rows, in_features // layout.shards, generator=generator) * std,
            torch.randn(rows, out_features // layout.shards, generator=generator) * std,
        )
    indices = {
        (layer, projection): (draw_index(layout, layer, generator), draw_index(layout, layer, generator))
        for layer in range(layout.num_layers)
        for projection in targets
    }
    return save_mos(directory, layout, lora_alpha, pools, indices, base_model="tiny", dtype=dtype)


def mos_factors(directory: Path) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]]:
    """(layer, projection) -> (A [r, in], B [out, r], alpha / r) from the raw file, vector by vector:
    row k of A is the concatenation of pool_A rows index_A[k*l], ..., index_A[k*l + l - 1]."""
    config = json.loads((directory / CONFIG).read_text())
    tensors = safetensors.torch.load_file(directory / WEIGHTS)
    r, shards = config["r"], config["shards_per_vector"]
    found = {}
    for layer in range(config["num_layers"]):
        for projection in config["target_modules"]:
            factors = []
            for ab in "AB":
                pool = tensors[f"pool.{projection}.{ab}"].float()
                index = tensors[f"index.{layer}.{projection}.{ab}"].tolist()
                vectors = [torch.cat([pool[index[k * shards + j]] for j in range(shards)]) for k in range(r)]
                factors.append(torch.stack(vectors))  # [r, in] for A, [r, out] for B
            found[layer, projection] = (factors[0], factors[1].T, config["lora_alpha"] / r)
    return found


def edit_mos_config(directory: Path, **changes: Any) -> None:
    path = directory / CONFIG
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def rewrite_mos(directory: Path, change: Callable[[dict[str, torch.Tensor]], object]) -> None:
    """Apply `change` to the adapter's tensors in place and save them back."""
    path = directory / WEIGHTS
    tensors = safetensors.torch.load_file(path)
    change(tensors)
    safetensors.torch.save_file(tensors, path)
