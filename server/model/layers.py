"""Building blocks: RMSNorm and the one adapter-aware linear layer every projection goes through."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
        # Stored transposed and contiguous ([in, out]): x @ W^T then streams the weight row by
        # row, which MKL runs up to 2x faster than F.linear for decode-sized batches on CPU.
        self.weight_t = nn.Parameter(weight.t().contiguous(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.projections = projections
        self.out_features = out_features
        # Filled in by the adapter store: a callable (x, y, adapter_batch) -> None adding to y in place.
        self.adapter_term: Any = None

    def forward(self, x: torch.Tensor, adapter_batch: Any = None) -> torch.Tensor:
        y = torch.matmul(x, self.weight_t) if self.bias is None else torch.addmm(self.bias, x, self.weight_t)
        if self.adapter_term is not None and adapter_batch is not None:
            self.adapter_term(x, y, adapter_batch)
        return y
