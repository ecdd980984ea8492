"""Building blocks: RMSNorm (with the residual add fused in) and the one adapter-aware linear
layer every projection goes through."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kernels.model_ops import ModelOps
from server.model.dense import Dense


class RMSNorm(nn.Module):
    """rms_norm(h), or with `delta`: h += delta in place, then rms_norm(h) (the residual add fused in)."""

    def __init__(self, weight: torch.Tensor, eps: float, ops: ModelOps) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps
        self.ops = ops

    def forward(self, h: torch.Tensor, delta: torch.Tensor | None = None) -> torch.Tensor:
        if delta is None:
            return self.ops.rms_norm(h, self.weight, self.eps)
        return self.ops.add_rms_norm(h, delta, self.weight, self.eps)


class AdaptedLinear(nn.Module):
    """y = x W^T + b (+ the adapter terms of each token's (slot, weight) pairs).

    One instance may hold several projections that read the same input, fused along the output
    dimension (q|k|v, gate|up); `projections` names them in order and `out_features` gives their
    widths, so adapter terms are added per projection slice. The device slots attach one term per
    slot pool (`self.adapter_terms`, adapters_store.DeviceSlots.attach); each reads its pool's part
    of the step's metadata. This layer does not know pools, slots or backends.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        projections: tuple[str, ...],
        out_features: tuple[int, ...],
        ops: ModelOps | None = None,
    ) -> None:
        super().__init__()
        assert weight.shape[0] == sum(out_features), (weight.shape, out_features)
        self.dense = Dense(weight, bias, ops)
        self.projections = projections
        self.out_features = out_features
        # Filled in by the adapter store: callables (x, y, adapter_step) -> None adding to y in place.
        self.adapter_terms: tuple[Any, ...] = ()

    def forward(self, x: torch.Tensor, adapter_step: Any = None) -> torch.Tensor:
        y = self.dense(x)
        if adapter_step is not None:
            for term in self.adapter_terms:
                term(x, y, adapter_step)
        return y
