"""The Triton kernels compile for a CUDA GPU (to cubin, for sm_90) on a machine without one.

The interpreter runs the kernels' logic on CPU but is lenient about what the compiler rejects
(types that change across branches, unsupported constructs); compiling ahead of time catches that.
Runs in a fresh interpreter: here the kernels were decorated for the interpreter.
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

from kernels.expand import _lora_expand_kernel
from kernels.shrink import _lora_shrink_kernel


def compile_kernel(fn, pointer_types, constexprs):
    signature = {
        name: "constexpr" if name in constexprs else pointer_types.get(name, "i32") for name in fn.arg_names
    }
    compiled = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32))
    assert "cubin" in compiled.asm, list(compiled.asm)


for dtype, has_ranks in (("fp32", True), ("bf16", False)):
    index = {"token_order_ptr": "*i64", "segment_table_ptr": "*i32", "ranks_ptr": "*i32"}
    compile_kernel(
        _lora_shrink_kernel,
        {"x_ptr": f"*{dtype}", "a_ptr": f"*{dtype}", "h_ptr": "*fp32", "scale_ptr": "*fp32",
         "weights_ptr": "*fp32", **index},
        {"HAS_RANKS": has_ranks, "HAS_WEIGHTS": has_ranks, "BLOCK_M": 16, "BLOCK_R": 16, "BLOCK_K": 64},
    )
    compile_kernel(
        _lora_expand_kernel,
        {"h_ptr": "*fp32", "b_ptr": f"*{dtype}", "y_ptr": f"*{dtype}", "slice_offsets_ptr": "*i32", **index},
        {"HAS_RANKS": has_ranks, "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_R": 16},
    )
print("ok")
"""


def test_triton_kernels_compile_for_cuda(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    result = subprocess.run(
        [sys.executable, "-c", CODE], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
