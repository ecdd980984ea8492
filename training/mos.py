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
the `mos` format, written by adapters_store.mos.save_mos (load_mos reads it): `mos_config.json` + `mos_model.safetensors`
with `pool.{proj}.A|B` and int32 `index.{layer}.{proj}.A|B`.

This module knows transformers' Llama-family module layout (`model.layers[i].self_attn|mlp`); it
knows nothing of flags or of the serving engine.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapters_store.mos import MosLayout
from training.config import TrainConfig, TrainingError

if TYPE_CHECKING:
    import torch


def check_layout(layout: MosLayout) -> None:
    """TrainingError unless the layout's row counts are whole and its index tables can be drawn."""
    if layout.R <= 0 or not 0 <= layout.private_rank <= layout.R:
        raise TrainingError(
            f"MoS needs 0 <= --private-rank <= --equivalent-rank and a positive budget, got p = "
            f"{layout.private_rank}, R = {layout.R}"
        )
    _whole((layout.R - layout.private_rank) * layout.num_layers * layout.shards, "(R - p) * L * l")
    _whole(layout.private_rank * layout.shards, "p * l")
    if layout.private_rows > layout.picks:
        raise TrainingError(
            f"each layer owns {layout.private_rows} private rows but picks only r * l = {layout.picks}; "
            "lower --private-rank or raise --rank"
        )
    if layout.picks - layout.private_rows > layout.public_rows:
        raise TrainingError(
            f"each index table needs {layout.picks - layout.private_rows} distinct public rows but the pool "
            f"has {layout.public_rows}; raise --equivalent-rank or lower --rank"
        )


def draw(layout: MosLayout, layer: int, generator: torch.Generator) -> torch.Tensor:
    """One index table: layer `layer`'s private rows and distinct random public rows, shuffled."""
    import torch

    first_private = layout.private_start(layer)
    private = torch.arange(first_private, first_private + layout.private_rows)
    public = torch.randperm(layout.public_rows, generator=generator)[: layout.picks - layout.private_rows]
    rows = torch.cat([private, public])
    return rows[torch.randperm(len(rows), generator=generator)]


def _whole(value: float, what: str) -> None:
    if abs(value - round(value)) > 1e-9 or value < 0:
        raise TrainingError(
            f"MoS row count {what} = {value:g} is not a whole number; choose --equivalent-rank, "
            "--private-rank and --shards so that it is"
        )


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
        check_layout(self.layout)
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
                index_a = draw(self.layout, layer_index, generator)
                index_b = draw(self.layout, layer_index, generator)  # independent: pair dissociation
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

        from adapters_store.mos import save_mos

        try:
            save_mos(
                out,
                self.layout,
                self.alpha,
                self.pools,
                self.indices,
                base_model=base_model,
                dtype=getattr(torch, dtype),
            )
        except OSError as exc:
            raise TrainingError(f"--out {out}: cannot save the adapter ({exc.strerror or exc})") from None


def _projection(layer: Any, projection: str) -> Any:
    for block in (layer.self_attn, layer.mlp):
        if hasattr(block, projection):
            return getattr(block, projection)
    raise TrainingError(f"--targets: the model's layers have no {projection}")
