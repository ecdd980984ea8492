"""The base-weight matmul against F.linear in every layout it may pick."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.model_ops import select_model_ops
from server.model.dense import Dense, onednn_available
from tests.cpu_kernels import require_compiler


@pytest.mark.parametrize("rows", [1, 2, 3, 8, 33, 512])
@pytest.mark.parametrize("with_bias", [False, True])
def test_dense_equals_linear_for_every_batch_size(rows: int, with_bias: bool) -> None:
    torch.manual_seed(rows)
    weight, bias = torch.randn(97, 64), torch.randn(97) if with_bias else None
    x = torch.randn(rows, 64)
    expected = F.linear(x, weight, bias)
    for keep_gemv_layout in (True, False):
        dense = Dense(weight, bias, keep_gemv_layout=keep_gemv_layout)
        torch.testing.assert_close(dense(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 2, 3, 8, 33, 512])
@pytest.mark.parametrize("with_bias", [False, True])
def test_dense_with_the_fused_kernels_equals_linear(rows: int, with_bias: bool) -> None:
    require_compiler()
    torch.manual_seed(rows)
    weight, bias = torch.randn(97, 64), torch.randn(97) if with_bias else None
    x = torch.randn(rows, 64)
    packed = Dense(weight, bias, select_model_ops(torch.device("cpu"), torch.float32, "fused"))
    assert packed.packed is not None and packed.blocked is None and packed.weight_t is None  # one copy
    torch.testing.assert_close(packed(x), F.linear(x, weight, bias), atol=1e-5, rtol=1e-5)


def test_cpu_fp32_uses_the_blocked_layout_and_other_dtypes_fall_back() -> None:
    weight = torch.randn(16, 8)
    assert (Dense(weight, None).blocked is not None) == onednn_available()
    half = Dense(weight.to(torch.bfloat16), None)
    assert half.blocked is None and half.weight is not None
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    torch.testing.assert_close(half(x), F.linear(x, weight.to(torch.bfloat16)))
