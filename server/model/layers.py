"""Building blocks: RMSNorm and the one adapter-aware linear layer every projection goes through."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from server.model.dense import Dense


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps
        self.shape = tuple(weight.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # torch's fused kernel, same math
            return F.rms_norm(x, self.shape, self.weight, self.eps)
        # Normalise in fp32 like the reference implementation, then cast back.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class AdaptedLinear(nn.Module):
    """y = x W^T + b (+ the adapter term of each token's adapter slot).

    One instance may hold several projections that read the same input, fused along the output
    dimension (q|k|v, gate|up); `projections` names them in order and `out_features` gives their
    widths, so adapter terms can later be added per projection slice. The adapter term is empty
    until the multi-adapter work attaches one (`self.adapter_term`); the model code does not change.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        projections: tuple[str, ...],
        out_features: tuple[int, ...],
    ) -> None:
        super().__init__()
        assert weight.shape[0] == sum(out_features), (weight.shape, out_features)
        self.dense = Dense(weight, bias)
        self.projections = projections
        self.out_features = out_features
        # Filled in by the adapter store: a callable (x, y, adapter_batch) -> None adding to y in place.
        self.adapter_term: Any = None

    def forward(self, x: torch.Tensor, adapter_batch: Any = None) -> torch.Tensor:
        y = self.dense(x)
        if self.adapter_term is not None and adapter_batch is not None:
            self.adapter_term(x, y, adapter_batch)
        return y
