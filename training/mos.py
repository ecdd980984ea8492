"""Mixture-of-Shards (MoS) training: our own MoS linear layers over a transformers model, saved as `mos`.

Per targeted projection type one pool pair is shared by every layer: `pool_A [N, in/l]`,
`pool_B [N, out/l]`, N = R * L * l (R: the equivalent rank budget, L: layers, l: shards per
vector). The first (R - p) * L * l rows are public; then layer i owns the p * l private rows
starting at (R - p) * L * l + i * p * l. Each (layer, projection) has frozen index tables of
r * l rows for A and, drawn independently, for B (pair dissociation): every layer takes its own
private rows and fills the rest with distinct public rows, shuffled. The layer computes

    A = pool_A[index_A].reshape(r, in)        B = pool_B[index_B].reshape(r, out).T
    y = base(x) + (lora_alpha / r) * B (A x)

Initialised as LoRA is: A's entries uniform in +-1/sqrt(in) (kaiming-uniform with a = sqrt(5), as
PEFT initialises lora_A), B zero, so training starts from the base model. The saved directory is
the `mos` format (adapters_store/mos.py reads it): `mos_config.json` + `mos_model.safetensors`
with `pool.{proj}.A|B` and int32 `index.{layer}.{proj}.A|B`.

This module knows transformers' Llama-family module layout (`model.layers[i].self_attn|mlp`); it
knows nothing of flags or of the serving engine.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from training.config import TrainConfig, TrainingError

if TYPE_CHECKING:
    import torch

MOS_CONFIG_FILE = "mos_config.json"
MOS_WEIGHTS_FILE = "mos_model.safetensors"


@dataclass(frozen=True)
class MosLayout:
    """The row counts of one MoS adapter over a model of `num_layers` layers."""

    r: int  # per-layer rank
    R: float  # equivalent rank budget
    shards: int  # l, shards per vector
    private_rank: float  # p
    num_layers: int  # L

    @property
    def public_rows(self) -> int:
        return _whole((self.R - self.private_rank) * self.num_layers * self.shards, "(R - p) * L * l")

    @property
    def private_rows(self) -> int:
        """Rows each layer owns."""
        return _whole(self.private_rank * self.shards, "p * l")

    @property
    def num_rows(self) -> int:
        """N = R * L * l."""
        return self.public_rows + self.private_rows * self.num_layers

    @property
    def picks(self) -> int:
        """Rows one index table picks: r * l."""
        return self.r * self.shards

    def check(self) -> None:
        """TrainingError unless the layout is realisable."""
        if self.R <= 0 or not 0 <= self.private_rank <= self.R:
            raise TrainingError(
                f"MoS needs 0 <= --private-rank <= --equivalent-rank and a positive budget, got p = "
                f"{self.private_rank}, R = {self.R}"
            )
        self.num_rows  # noqa: B018 -- checks that the row counts are whole numbers
        if self.private_rows > self.picks:
            raise TrainingError(
                f"each layer owns {self.private_rows} private rows but picks only r * l = {self.picks}; "
                "lower --private-rank or raise --rank"
            )
        if self.picks - self.private_rows > self.public_rows:
            raise TrainingError(
                f"each index table needs {self.picks - self.private_rows} distinct public rows but the pool "
                f"has {self.public_rows}; raise --equivalent-rank or lower --rank"
            )

    def draw(self, layer: int, generator: torch.Generator) -> torch.Tensor:
        """One index table: layer `layer`'s private rows and distinct random public rows, shuffled."""
        import torch

        first_private = self.public_rows + layer * self.private_rows
        private = torch.arange(first_private, first_private + self.private_rows)
        public = torch.randperm(self.public_rows, generator=generator)[: self.picks - self.private_rows]
        rows = torch.cat([private, public])
        return rows[torch.randperm(len(rows), generator=generator)]


def _whole(value: float, what: str) -> int:
    rounded = round(value)
    if abs(value - rounded) > 1e-9 or rounded < 0:
        raise TrainingError(
            f"MoS row count {what} = {value:g} is not a whole number; choose --equivalent-rank, "
            "--private-rank and --shards so that it is"
        )
    return int(rounded)


def mos_linear_class() -> type:
    """The MoS layer (defined on first use: torch is imported only when training)."""
    from torch import nn

    class MosLinear(nn.Module):
        """y = base(x) + scale * B (A x), A and B gathered from the shared pools by frozen indices."""

        def __init__(
            self,
            base: nn.Linear,
            pools: tuple[nn.Parameter, nn.Parameter],
            indices: tuple[torch.Tensor, torch.Tensor],
            r: int,
            scale: float,
        ) -> None:
            super().__init__()
            self.base = base
            self.pool_a, self.pool_b = pools  # shared with every layer: not registered here
            self.index_a, self.index_b = indices  # frozen, CPU: plain attributes, not state
            self.r = r
            self.scale = scale

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = self.pool_a.index_select(0, self.index_a).reshape(self.r, -1)  # [r, in]
            b_t = self.pool_b.index_select(0, self.index_b).reshape(self.r, -1)  # [r, out] = B.T
            return self.base(x) + self.scale * ((x @ a.T) @ b_t)

    return MosLinear


class MosAdapterModule:
    """The trainable pools of one MoS adapter attached to a transformers model."""

    def __init__(self, base: Any, config: TrainConfig, projections: list[str]) -> None:
        import torch
        from torch import nn

        layers = base.model.layers
        self.layout = MosLayout(
            r=config.rank,
            R=config.equivalent_rank,
            shards=config.shards,
            private_rank=config.private_rank,
            num_layers=len(layers),
        )
        self.layout.check()
        self.projections = projections
        self.alpha = config.alpha
        self.pools: dict[str, tuple[nn.Parameter, nn.Parameter]] = {}
        self.indices: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        generator = torch.Generator().manual_seed(config.seed)
        mos_linear = mos_linear_class()
        for projection in projections:
            first = _projection(layers[0], projection)
            in_features, out_features = first.in_features, first.out_features
            for size, what in ((in_features, "input"), (out_features, "output")):
                if size % config.shards:
                    raise TrainingError(
                        f"--shards {config.shards} does not divide {projection}'s {what} size {size}"
                    )
            bound = 1.0 / math.sqrt(in_features)  # PEFT's lora_A init: kaiming_uniform(a=sqrt(5))
            pool_a = torch.empty(self.layout.num_rows, in_features // config.shards)
            pool_a.uniform_(-bound, bound, generator=generator)
            pool_b = torch.zeros(self.layout.num_rows, out_features // config.shards)
            pools = (nn.Parameter(pool_a), nn.Parameter(pool_b))
            self.pools[projection] = pools
            for layer_index, layer in enumerate(layers):
                index_a = self.layout.draw(layer_index, generator)
                index_b = self.layout.draw(layer_index, generator)  # independent: pair dissociation
                self.indices[layer_index, projection] = (index_a, index_b)
                block = layer.self_attn if hasattr(layer.self_attn, projection) else layer.mlp
                linear = getattr(block, projection)
                setattr(
                    block,
                    projection,
                    mos_linear(linear, pools, (index_a, index_b), config.rank, config.alpha / config.rank),
                )

    def parameters(self) -> list[torch.nn.Parameter]:
        return [param for pools in self.pools.values() for param in pools]

    @property
    def num_parameters(self) -> int:
        return sum(param.numel() for param in self.parameters())

    def save(self, out: Path, base_model: str, dtype: str) -> None:
        """`mos_config.json` + `mos_model.safetensors` (pools in `dtype`, indices int32)."""
        import torch
        from safetensors.torch import save_file

        tensors = {}
        for projection, (pool_a, pool_b) in self.pools.items():
            tensors[f"pool.{projection}.A"] = pool_a.detach().to(getattr(torch, dtype)).contiguous()
            tensors[f"pool.{projection}.B"] = pool_b.detach().to(getattr(torch, dtype)).contiguous()
        for (layer, projection), (index_a, index_b) in self.indices.items():
            tensors[f"index.{layer}.{projection}.A"] = index_a.to(torch.int32).contiguous()
            tensors[f"index.{layer}.{projection}.B"] = index_b.to(torch.int32).contiguous()
        layout = self.layout
        config = {
            "format": "mos",
            "base_model": base_model,
            "r": layout.r,
            "R": _plain(layout.R),
            "shards_per_vector": layout.shards,
            "private_rank": _plain(layout.private_rank),
            "lora_alpha": _plain(self.alpha),
            "target_modules": self.projections,
            "num_layers": layout.num_layers,
        }
        try:
            save_file(tensors, str(out / MOS_WEIGHTS_FILE), metadata={"format": "pt"})
            (out / MOS_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        except OSError as exc:
            raise TrainingError(f"--out {out}: cannot save the adapter ({exc.strerror or exc})") from None


def _plain(value: float) -> float | int:
    """JSON numbers as people write them: 8, not 8.0."""
    return int(value) if float(value).is_integer() else value


def _projection(layer: Any, projection: str) -> Any:
    for block in (layer.self_attn, layer.mlp):
        if hasattr(block, projection):
            return getattr(block, projection)
    raise TrainingError(f"--targets: the model's layers have no {projection}")
