"""Dense matmuls of the frozen base weights: y = x W^T + b, laid out once for the device.

Chosen once when the model is built, so layers call one interface and never branch on the
platform. On CPU, decode-shaped products (a few rows against a large weight) are bound by how
well the weight streams from memory (bench/RESULTS.md has the figures):
- the fused CPU kernels' packed layout (kernels/model_ops.py), when the model runs them: one
  copy of the weight in column panels, streamed with prefetch; faster than both layouts below
  at every batch size measured (1 to 512 rows);
- otherwise, 1-2 rows: MKL's gemv on a contiguous W^T streams near memory speed;
- more rows: oneDNN on a weight pre-reordered into its blocked layout is up to 2x faster than
  MKL sgemm, which re-packs the weight on every call. Without the packed layout the layer
  weights keep both of these (twice their memory); the lm_head keeps only the blocked one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels.model_ops import ModelOps

# Below this many rows the contiguous W^T path wins (measured on SmolLM2 shapes, 2-core AVX2).
_GEMV_MAX_ROWS = 2


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class Dense(nn.Module):
    """y = x W^T + b with the device's best layout. weight: [out, in]; bias: [out] or None."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        ops: ModelOps | None = None,
        keep_gemv_layout: bool = True,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.ops = ops
        self.packed: nn.Parameter | None = None
        self.blocked: nn.Parameter | None = None
        self.weight_t: nn.Parameter | None = None
        self.weight: nn.Parameter | None = None
        packed = ops.pack_linear(weight) if ops is not None else None
        if packed is not None:
            self.packed = nn.Parameter(packed, requires_grad=False)
        elif weight.device.type == "cpu" and weight.dtype == torch.float32 and onednn_available():
            blocked = torch.ops.mkldnn._reorder_linear_weight(weight, 8)  # 8: the batch-size hint
            self.blocked = nn.Parameter(blocked, requires_grad=False)
            if keep_gemv_layout:
                self.weight_t = nn.Parameter(weight.t().contiguous(), requires_grad=False)  # [in, out]
        else:
            self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            assert self.ops is not None
            return self.ops.packed_linear(x, self.packed, self.bias, self.out_features)
        if self.blocked is None:
            assert self.weight is not None
            return F.linear(x, self.weight, self.bias)
        if self.weight_t is not None and x.shape[0] <= _GEMV_MAX_ROWS:
            if self.bias is None:
                return torch.matmul(x, self.weight_t)
            return torch.addmm(self.bias, x, self.weight_t)
        return torch.ops.mkldnn._linear_pointwise(x, self.blocked, self.bias, "none", [], "")
