"""The MoS and ternary Triton kernels compile for a CUDA GPU (to cubin, for sm_90) without one.

Like test_triton_compile.py: the interpreter is lenient about what the compiler rejects (types
that change across loops, runtime loop bounds, shifts on tensors), so compile ahead of time in a
fresh interpreter with TRITON_INTERPRET unset.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CODE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels.mos import _mos_expand_kernel, _mos_shrink_kernel
from kernels.ternary import _ternary_expand_kernel, _ternary_shrink_kernel


def compile_kernel(fn, pointer_types, constexprs):
    signature = {
        name: "constexpr" if name in constexprs else pointer_types.get(name, "i32") for name in fn.arg_names
    }
    compiled = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32))
    assert "cubin" in compiled.asm, list(compiled.asm)


index = {"token_order_ptr": "*i64", "segment_table_ptr": "*i32", "ranks_ptr": "*i32"}
for dtype, flag in (("fp32", True), ("bf16", False)):
    compile_kernel(
        _ternary_shrink_kernel,
        {"x_ptr": f"*{dtype}", "a_ptr": "*i32", "h_ptr": "*fp32", "scale_ptr": "*fp32",
         "weights_ptr": "*fp32", **index},
        {"HAS_RANKS": flag, "HAS_WEIGHTS": flag, "BLOCK_M": 16, "BLOCK_R": 16, "BLOCK_K": 64},
    )
    compile_kernel(
        _ternary_expand_kernel,
        {"h_ptr": "*fp32", "b_ptr": "*i32", "y_ptr": f"*{dtype}", "slice_offsets_ptr": "*i32", **index},
        {"HAS_RANKS": flag, "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_R": 16},
    )
    tables = {"index_ptr": "*i32", "shards_ptr": "*i32"}
    compile_kernel(
        _mos_shrink_kernel,
        {"x_ptr": f"*{dtype}", "pool_ptr": f"*{dtype}", "h_ptr": "*fp32", "scale_ptr": "*fp32",
         "weights_ptr": "*fp32", **tables, **index},
        {"HAS_RANKS": True, "HAS_WEIGHTS": flag, "BLOCK_M": 16, "BLOCK_R": 16, "BLOCK_K": 64},
    )
    compile_kernel(
        _mos_expand_kernel,
        {"h_ptr": "*fp32", "pool_ptr": f"*{dtype}", "y_ptr": f"*{dtype}", "slice_offsets_ptr": "*i32",
         **tables, **index},
        {"HAS_RANKS": True, "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_R": 16},
    )
print("ok")
"""


def test_compact_kernels_compile_for_cuda(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    result = subprocess.run(
        [sys.executable, "-c", CODE], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
